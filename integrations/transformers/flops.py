"""``vtc.flops`` dimensions of a Hugging Face VLM, read from its config and modules.

Shapes that decide what actually runs (projector/merger layers, patch-embedding inputs, the LM head) are read off
the modules themselves; layer counts, widths and head counts off the config. The per-image token count of the
tower is fixed by the config for LLaVA-1.5 and per view for AnyRes models, but depends on the image for Qwen's
dynamic resolution, which is why ``model_dims`` takes it as an argument there.

``request_flops`` applies ``vtc.flops`` to a processor output: per batch row, the prefill FLOPs of that row's own
images and videos (each at its own size, views and frames, as the HF model encodes it) plus its LLM at the length
it really received.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
from torch import nn

from vtc.flops import FlopsBreakdown, TransformerDims, VisionDims, VLMDims, prefill_flops, transformer_flops

__all__ = ["model_dims", "request_flops", "SUPPORTED_FAMILIES"]

SUPPORTED_FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def _family_classes() -> dict[str, type]:
    """Family name -> its ``...ForConditionalGeneration`` class (imported here: transformers is optional)."""
    from transformers import (
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
        LlavaOnevisionForConditionalGeneration,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLForConditionalGeneration,
        Qwen3VLForConditionalGeneration,
    )

    return {
        "llava": LlavaForConditionalGeneration,
        "llava_next": LlavaNextForConditionalGeneration,
        "llava_onevision": LlavaOnevisionForConditionalGeneration,
        "qwen2_vl": Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
        "qwen3_vl": Qwen3VLForConditionalGeneration,
    }


def _family(model) -> str:
    classes = _family_classes()
    family = next((name for name, cls in classes.items() if isinstance(model, cls)), None)
    if family is None:
        raise TypeError(
            f"vtc.flops does not know {type(model).__name__}; supported families: "
            + ", ".join(f"{name} ({cls.__name__})" for name, cls in classes.items())
            + ". Load the model with AutoModelForImageTextToText (the ...ForConditionalGeneration class)."
        )
    return family


def _linears(module: nn.Module) -> tuple[tuple[int, int], ...]:
    """``(in, out)`` of every ``nn.Linear`` under ``module``, in registration (= execution) order."""
    return tuple((m.in_features, m.out_features) for m in module.modules() if isinstance(m, nn.Linear))


def _llm_dims(model) -> TransformerDims:
    cfg = model.config.text_config
    heads = cfg.num_attention_heads
    mlp = model.model.language_model.layers[0].mlp
    return TransformerDims(
        num_layers=cfg.num_hidden_layers,
        hidden=cfg.hidden_size,
        intermediate=cfg.intermediate_size,
        num_heads=heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        gated_mlp=hasattr(mlp, "gate_proj"),  # Llama / Qwen2 / Qwen3 MLPs; a plain fc1/fc2 MLP has no gate
    )


def _vocab(model) -> int:
    head = getattr(model, "lm_head", None)
    return head.out_features if isinstance(head, nn.Linear) else model.config.text_config.vocab_size


def _positive(name: str, value) -> int:
    try:
        result = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        result = None
    if result is None or result < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(result)


def _llava_dims(model, family: str, vision_tokens_per_image: int | None, views_per_image: int | None) -> VLMDims:
    from transformers import CLIPVisionModel, SiglipVisionModel

    tower = model.model.vision_tower
    if not isinstance(tower, (CLIPVisionModel, SiglipVisionModel)):
        raise TypeError(
            f"{type(model).__name__} has a {type(tower).__name__} vision tower; vtc.flops knows CLIPVisionModel "
            "and SiglipVisionModel towers (those of LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision)"
        )
    vcfg = model.config.vision_config
    cls_tokens = 1 if isinstance(tower, CLIPVisionModel) else 0  # CLIP prepends a class embedding, SigLIP does not
    if vision_tokens_per_image is None:
        patches = (vcfg.image_size // vcfg.patch_size) ** 2
    else:
        patches = _positive("vision_tokens_per_image", vision_tokens_per_image)
    if family == "llava":
        if views_per_image not in (None, 1):
            raise ValueError(
                f"views_per_image={views_per_image!r}: LLaVA-1.5 runs its tower once per image; leave it unset "
                "(it is for LLaVA-NeXT / OneVision AnyRes crops)"
            )
        views = 1
    elif views_per_image is None:
        raise ValueError(
            f"{type(model).__name__} runs its tower once per AnyRes view (base view + crops), a number that depends "
            "on the image size; pass views_per_image, e.g. 5 for a 2x2 crop grid (for one image: the processor's "
            "pixel_values.shape[1]; transformers' image_size_to_num_patches gives it from the image size)"
        )
    else:
        views = _positive("views_per_image", views_per_image)
    tokens = patches + cls_tokens
    # "default" drops position 0 (the CLS on CLIP) before the projector, "full" keeps every position
    projected = tokens - 1 if model.config.vision_feature_select_strategy == "default" else tokens
    patch_weight = tower.embeddings.patch_embedding.weight
    heads = vcfg.num_attention_heads
    vision = VisionDims(
        transformer=TransformerDims(
            num_layers=vcfg.num_hidden_layers,
            hidden=vcfg.hidden_size,
            intermediate=vcfg.intermediate_size,
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=vcfg.hidden_size // heads,
            gated_mlp=False,
        ),
        tokens_per_image=tokens,
        patch_embed_in=math.prod(patch_weight.shape[1:]),
        cls_tokens=cls_tokens,
        views=views,
        # SiglipVisionModel runs its pooling head when the config enables it (real OneVision checkpoints do not)
        attention_pool_head=bool(getattr(tower, "use_head", False)),
    )
    return VLMDims(
        vision=vision,
        projector=_linears(model.model.multi_modal_projector),
        projector_tokens_per_image=views * projected,
        llm=_llm_dims(model),
        vocab_size=_vocab(model),
    )


def _qwen_dims(model, family: str, vision_tokens_per_image: int | None, views_per_image: int | None) -> VLMDims:
    visual = model.model.visual
    vcfg = model.config.vision_config
    unit = vcfg.spatial_merge_size**2
    if vision_tokens_per_image is None:
        raise ValueError(
            f"{type(model).__name__} encodes each image at its own resolution; pass vision_tokens_per_image, the "
            f"image's patch count before the {vcfg.spatial_merge_size}x{vcfg.spatial_merge_size} merge "
            "(int(image_grid_thw[i].prod()) from the processor; a video counts as grid_t images of grid_h*grid_w)"
        )
    patches = _positive("vision_tokens_per_image", vision_tokens_per_image)
    if patches % unit:
        raise ValueError(
            f"vision_tokens_per_image={patches} is not a multiple of {unit}: Qwen merges "
            f"{vcfg.spatial_merge_size}x{vcfg.spatial_merge_size} patches into one LLM token, so the patch count "
            "is grid_h*grid_w with both sides even (image_grid_thw[i].prod())"
        )
    if views_per_image not in (None, 1):
        raise ValueError(f"views_per_image={views_per_image!r}: Qwen VLMs have no AnyRes views; leave it unset")
    block = visual.blocks[0]
    hidden = block.attn.qkv.in_features
    heads = vcfg.num_heads
    gated = hasattr(block.mlp, "gate_proj")  # Qwen2.5-VL: SwiGLU; Qwen2-VL / Qwen3-VL: fc1/fc2
    intermediate = block.mlp.gate_proj.out_features if gated else _linears(block.mlp)[0][1]
    window = full_layers = None
    if family == "qwen2_5_vl":
        # get_vision_window_index: windows of (window_size // merge // patch) merged tokens per side
        side = vcfg.window_size // vcfg.spatial_merge_size // vcfg.patch_size * vcfg.spatial_merge_size
        window = side * side
        full_layers = tuple(int(i) for i in (vcfg.fullatt_block_indexes or ()))
    mergers = [visual.merger]
    mergers += list(getattr(visual, "deepstack_merger_list", None) or ())  # Qwen3-VL: one merger per deepstack level
    vision = VisionDims(
        transformer=TransformerDims(
            num_layers=len(visual.blocks),
            hidden=hidden,
            intermediate=intermediate,
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            gated_mlp=gated,
        ),
        tokens_per_image=patches,
        patch_embed_in=math.prod(visual.patch_embed.proj.weight.shape[1:]),
        window=window,
        full_attention_layers=full_layers,
    )
    return VLMDims(
        vision=vision,
        projector=tuple(layer for merger in mergers for layer in _linears(merger)),
        projector_tokens_per_image=patches // unit,
        llm=_llm_dims(model),
        vocab_size=_vocab(model),
    )


def model_dims(model, vision_tokens_per_image: int | None = None, views_per_image: int | None = None) -> VLMDims:
    """``vtc.flops.VLMDims`` of a supported Hugging Face VLM (``SUPPORTED_FAMILIES``).

    ``vision_tokens_per_image``: patch tokens of one tower pass, before any merge and without CLS. LLaVA families
    derive it from the config ((image_size / patch_size)^2) when it is None; Qwen families need it (the image's
    ``image_grid_thw`` product), as their resolution is dynamic. ``views_per_image``: tower passes per image on
    LLaVA-NeXT / OneVision (base view + AnyRes crops; 1 for OneVision's multi-image prompts), required there.
    """
    family = _family(model)
    if family.startswith("llava"):
        return _llava_dims(model, family, vision_tokens_per_image, views_per_image)
    return _qwen_dims(model, family, vision_tokens_per_image, views_per_image)


# ---------------------------------------------------------------------------------------------------------------
# per request


@dataclasses.dataclass(frozen=True)
class _Visual:
    """One image or video of a call: its placeholder tokens in input_ids and the FLOPs of encoding it."""

    tokens: int
    vision: int
    projector: int


def _encode(dims: VLMDims, passes: int = 1) -> tuple[int, int]:
    """(vision, projector) FLOPs of ``passes`` x one image as ``dims`` describe it."""
    one = prefill_flops(dims, 0, 0, images=1)
    return passes * one.vision, passes * one.projector


def _grid_rows(value, key: str) -> list[tuple[int, int, int]]:
    grid = torch.as_tensor(value)
    if grid.dim() != 2 or grid.shape[-1] != 3:
        raise ValueError(f"{key} must be [n, 3] (t, h, w patches per image / video), got shape {tuple(grid.shape)}")
    return [(int(t), int(h), int(w)) for t, h, w in grid.tolist()]


def _qwen_window_sizes(model, h: int, w: int) -> tuple[int, ...]:
    """Token count of every attention window of one temporal step of an h x w patch grid (Qwen2.5-VL's
    ``get_vision_window_index``: windows of ``window_size // merge // patch`` merged tokens per side from the top
    left, the last row / column of windows partial where the merged grid does not divide)."""
    vcfg = model.config.vision_config
    merge = vcfg.spatial_merge_size
    side = vcfg.window_size // merge // vcfg.patch_size

    def spans(n: int) -> list[int]:
        return [side] * (n // side) + ([n % side] if n % side else [])

    return tuple(r * c * merge * merge for r in spans(h // merge) for c in spans(w // merge))


def _qwen_visuals(model, family: str, grids: list[tuple[int, int, int]]) -> list[_Visual]:
    """Qwen images / videos: ``t`` temporal steps of ``h x w`` patches, each its own attention span in the tower
    (``cu_seqlens`` repeats ``h*w`` ``t`` times), ``t*h*w / merge^2`` tokens in the LLM."""
    unit = model.config.vision_config.spatial_merge_size ** 2
    out = []
    for t, h, w in grids:
        dims = model_dims(model, h * w)
        if family == "qwen2_5_vl":
            window_sizes = _qwen_window_sizes(model, h, w)
            dims = dataclasses.replace(dims, vision=dataclasses.replace(dims.vision, window_sizes=window_sizes))
        out.append(_Visual(t * h * w // unit, *_encode(dims, t)))
    return out


def _image_visuals(model, family: str, inputs) -> list[_Visual]:
    if family.startswith("qwen"):
        grid = inputs.get("image_grid_thw")
        return [] if grid is None else _qwen_visuals(model, family, _grid_rows(grid, "image_grid_thw"))
    pixel_values = inputs.get("pixel_values")
    if pixel_values is None:
        return []
    if family == "llava":
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"LLaVA expects pixel_values of shape [num_images, 3, H, W], got {shape}")
        patch = model.config.vision_config.patch_size
        dims = model_dims(model, (pixel_values.shape[-2] // patch) * (pixel_values.shape[-1] // patch))
        return [_Visual(dims.projector_tokens_per_image, *_encode(dims))] * pixel_values.shape[0]
    # AnyRes: the views and the packed length of each image as the model computes them from image_sizes
    # (image_size_to_num_patches, pack_image_features; OneVision: one base view per image of a multi-image prompt)
    from .adapter import adapter_for

    adapter = adapter_for(model)
    sizes = adapter._image_sizes(inputs)
    crops = adapter._needs_crops(inputs, len(sizes))
    limit = adapter._aspect_limit(inputs)
    out = []
    for size, crop in zip(sizes, crops):
        dims = model_dims(model, views_per_image=adapter.num_views(size, crop))
        out.append(_Visual(adapter.packed_layout(size, crop, limit).num_tokens, *_encode(dims)))
    return out


def _video_visuals(model, family: str, inputs) -> list[_Visual]:
    if family.startswith("qwen"):
        grid = inputs.get("video_grid_thw")
        return [] if grid is None else _qwen_visuals(model, family, _grid_rows(grid, "video_grid_thw"))
    videos = inputs.get("pixel_values_videos")
    if videos is None:
        return []
    if family != "llava_onevision":
        raise ValueError(f"inputs hold pixel_values_videos, but {type(model).__name__} takes no videos")
    # get_video_features: every frame one tower pass (one view) and the projector on all its tokens, then 2x2
    # bilinear pooling (no matmul) to ceil(s/2)^2 tokens per frame, and one newline after the video
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    per_frame = math.ceil(side / 2) ** 2
    dims = model_dims(model, views_per_image=1)
    return [_Visual(int(v.shape[0]) * per_frame + 1, *_encode(dims, int(v.shape[0]))) for v in videos]


def _rows_of(visuals: list[_Visual], counts: list[int], what: str) -> list[int]:
    """The batch row of every image (video), in order: each row holds as many as fill its placeholder tokens."""
    rows, i = [], 0
    for b, count in enumerate(counts):
        left = count
        while left > 0 and i < len(visuals):
            left -= visuals[i].tokens
            rows.append(b)
            i += 1
        if left != 0:
            raise ValueError(
                f"row {b} of input_ids has {count} {what} placeholder tokens, which the {what}s of the inputs do not "
                f"fill exactly ({what} tokens in order: {[v.tokens for v in visuals]}); pass a processor output "
                "unchanged (input_ids with the expanded placeholders, and the pixel inputs of the same call)"
            )
    if i != len(visuals):
        raise ValueError(
            f"the inputs hold {len(visuals)} {what}s but input_ids has placeholders for only {i} of them; pass the "
            "input_ids and pixel inputs of the same processor call"
        )
    return rows


def request_flops(model, inputs, llm_lengths: list[int] | None = None) -> list[FlopsBreakdown]:
    """Per batch row of ``inputs`` (a processor output for ``model``), the prefill FLOPs of that row's request.

    vision + projector: the row's own images and videos, each as the HF model encodes it (images and videos are
    matched to rows by their placeholder tokens, in order). LLaVA-1.5: one tower pass per image. LLaVA-NeXT /
    OneVision: the AnyRes views the model derives from ``image_sizes`` (``image_size_to_num_patches``; one view per
    image in a OneVision multi-image prompt, per ``batch_num_images``); OneVision videos: one pass per frame of
    ``pixel_values_videos``. Qwen: ``image_grid_thw`` / ``video_grid_thw``, one tower pass of ``h*w`` patches per
    temporal step (the attention span of ``cu_seqlens``), Qwen2.5-VL's windows counted exactly.

    llm: the LLM at ``llm_lengths[b]`` tokens when given (the length the LLM really received; under vtc
    ``vtc.last_prompt_lengths(model)[b][1]``), else the row's unpadded length (``attention_mask`` sum). lm_head:
    one position (as ``generate``'s prefill / ``logits_to_keep=1``). A batched forward runs the LLM on the padded
    length instead; its vision and projector are the sum over the rows.
    """
    family = _family(model)
    if not hasattr(inputs, "get"):
        raise ValueError(f"inputs must be the processor's output (a dict), got {type(inputs).__name__}")
    ids = inputs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"inputs['input_ids'] must be a [batch, length] tensor (return_tensors='pt'), got {shape}")
    batch = ids.shape[0]
    mask = inputs.get("attention_mask")
    lengths = [int(n) for n in mask.sum(dim=-1).tolist()] if mask is not None else [ids.shape[1]] * batch
    if llm_lengths is not None:
        llm_lengths = list(llm_lengths)
        if len(llm_lengths) != batch:
            raise ValueError(f"llm_lengths has {len(llm_lengths)} entries for a batch of {batch} rows; give one "
                             "per row, e.g. [n for _, n in vtc.last_prompt_lengths(model)]")
        lengths = [_positive(f"llm_lengths[{b}]", n) for b, n in enumerate(llm_lengths)]

    from .adapter import adapter_for

    adapter = adapter_for(model)
    vision, projector = [0] * batch, [0] * batch
    for what, token_id, visuals in (
        ("image", adapter.image_token_id(), _image_visuals(model, family, inputs)),
        ("video", adapter.video_token_id(), _video_visuals(model, family, inputs)),
    ):
        counts = [0] * batch if token_id is None else [int(n) for n in (ids == token_id).sum(dim=-1).tolist()]
        for visual, b in zip(visuals, _rows_of(visuals, counts, what)):
            vision[b] += visual.vision
            projector[b] += visual.projector
    llm, vocab = _llm_dims(model), _vocab(model)
    return [
        FlopsBreakdown(vision=vision[b], projector=projector[b], llm=transformer_flops(llm, lengths[b]),
                       lm_head=2 * llm.hidden * vocab)
        for b in range(batch)
    ]
