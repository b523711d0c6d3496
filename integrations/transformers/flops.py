"""``vtc.flops`` dimensions of a Hugging Face VLM, read from its config and modules.

Shapes that decide what actually runs (projector/merger layers, patch-embedding inputs, the LM head) are read off
the modules themselves; layer counts, widths and head counts off the config. The per-image token count of the
tower may be fixed by the config or depend on the image (dynamic resolution), which is why ``model_dims`` takes it
as an argument. Each family's adapter knows its tower (``FamilyAdapter.model_dims``) and how the model encodes the
images and videos of a call (``image_passes`` / ``video_passes``); the LLM side and the per-request sum are shared
and live here.

``request_flops`` applies ``vtc.flops`` to a processor output: per batch row, the prefill FLOPs of that row's own
images and videos (each at its own size, views and frames, as the HF model encodes it) plus its LLM at the length
it really received.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch import nn

from vtc.flops import FlopsBreakdown, TransformerDims, VLMDims, layered_flops, prefill_flops, transformer_flops

from .adapter import adapter_for, describe_families, placeholder_rows

__all__ = ["TowerPasses", "model_dims", "request_flops"]


@dataclasses.dataclass(frozen=True)
class TowerPasses:
    """One image or video of a call as its model encodes it: ``passes`` runs of the tower (and projector) as
    ``dims`` describe one image, and ``tokens`` placeholder tokens of it in the LLM's input."""

    tokens: int
    dims: VLMDims
    passes: int = 1


# ------------------------------------------------------------------------------------ building blocks for adapters
def linear_shapes(module: nn.Module) -> tuple[tuple[int, int], ...]:
    """``(in, out)`` of every ``nn.Linear`` under ``module``, in registration (= execution) order."""
    return tuple((m.in_features, m.out_features) for m in module.modules() if isinstance(m, nn.Linear))


def llm_dims(model) -> TransformerDims:
    """The language model's dimensions (``config.text_config`` and its first MLP)."""
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


def vocab_size(model) -> int:
    """Rows of the LM head (the config's vocabulary size when the head is not a plain ``nn.Linear``)."""
    head = getattr(model, "lm_head", None)
    return head.out_features if isinstance(head, nn.Linear) else model.config.text_config.vocab_size


def positive_int(name: str, value) -> int:
    """``value`` as an int >= 1 (``name`` names it in the error)."""
    try:
        result = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        result = None
    if result is None or result < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(result)


# ---------------------------------------------------------------------------------------------------------- per model
def _adapter(model):
    try:
        return adapter_for(model)
    except TypeError:
        raise TypeError(
            f"vtc.flops does not know {type(model).__name__}; supported families: {describe_families()}. Load the "
            "model with AutoModelForImageTextToText (the ...ForConditionalGeneration class)."
        ) from None


def model_dims(model, vision_tokens_per_image: int | None = None, views_per_image: int | None = None) -> VLMDims:
    """``vtc.flops.VLMDims`` of a supported Hugging Face VLM (any registered family, ``supported_families()``).

    ``vision_tokens_per_image``: patch tokens of one tower pass, before any merge and without CLS. Families whose
    tower input has a fixed size (LLaVA's) derive it from the config ((image_size / patch_size)^2) when it is None;
    dynamic-resolution families (Qwen's) need it (the image's ``image_grid_thw`` product). ``views_per_image``:
    tower passes per image for AnyRes families (base view + crops; 1 for OneVision's multi-image prompts), required
    there.
    """
    return _adapter(model).model_dims(vision_tokens_per_image, views_per_image)


# -------------------------------------------------------------------------------------------------------- per request
def _encode(passes: TowerPasses) -> tuple[int, int]:
    """(vision, projector) FLOPs of ``passes.passes`` x one image as ``passes.dims`` describe it."""
    one = prefill_flops(passes.dims, 0, 0, images=1)
    return passes.passes * one.vision, passes.passes * one.projector


def llm_layer_lengths(model) -> list[list[int]] | None:
    """Per prompt of the last wrapped call, the tokens each LLM layer held (padding excluded) under an LLM-side
    compressor -- the received length minus, per image, the visual tokens dropped before that layer; ``None``
    when the model's compressor acts between encoder and LLM (every layer holds the received length)."""
    from . import get_state

    state = get_state(model)
    if state.llm is None:
        return None
    num_layers = len(state.adapter.language_model().layers)
    out = []
    for b, (_, received) in enumerate(state.prompt_lengths):
        lengths = [received] * num_layers
        for record in state.llm_records:
            if record.batch_index == b:
                for j in range(num_layers):
                    lengths[j] -= record.num_tokens - record.tokens_at(j)
        out.append(lengths)
    return out


def _encoded_inputs(model, inputs) -> dict:
    """What the vision tower encodes for ``inputs``: ``inputs`` themselves, or -- when vtc resizes the pictures
    before the encoder (``downsample``) -- the grids it resizes them to, so the tower is counted at its real size."""
    from . import get_state, is_applied
    from .cut import resize_plan

    if not is_applied(model):
        return inputs
    state = get_state(model)
    plan = resize_plan(state, inputs)
    if plan is None:
        return inputs
    return {**inputs, **state.adapter.resize_inputs(inputs, plan[0] or None, plan[1] or None, pixels=False)}


def request_flops(model, inputs, llm_lengths: list[int] | None = None) -> list[FlopsBreakdown]:
    """Per batch row of ``inputs`` (a processor output for ``model``), the prefill FLOPs of that row's request.

    vision + projector: the row's own images and videos, each as the HF model encodes it (images and videos are
    matched to rows by their placeholder tokens, in order; see the adapters' ``image_passes`` / ``video_passes``,
    e.g. AnyRes views from ``image_sizes``, Qwen's ``image_grid_thw`` / ``video_grid_thw`` with one tower pass of
    ``h*w`` patches per temporal step and Qwen2.5-VL's windows counted exactly, OneVision's one pass per frame;
    on a model wrapped with a compressor that resizes the pictures before the encoder, ``downsample``, at the
    resized grids).

    llm: the LLM at ``llm_lengths[b]`` tokens when given (the length the LLM really received; under vtc
    ``vtc.last_prompt_lengths(model)[b][1]``) -- or, an entry being one length per LLM layer, each layer at its
    own length (LLM-side compressors: ``llm_layer_lengths(model)``) -- else the row's unpadded length
    (``attention_mask`` sum). lm_head:
    one position (as ``generate``'s prefill / ``logits_to_keep=1``). A batched forward runs the LLM on the padded
    length instead; its vision and projector are the sum over the rows.
    """
    adapter = _adapter(model)
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
        lengths = [[positive_int(f"llm_lengths[{b}][{j}]", x) for j, x in enumerate(n)]
                   if isinstance(n, (list, tuple)) else positive_int(f"llm_lengths[{b}]", n)
                   for b, n in enumerate(llm_lengths)]

    vision, projector = [0] * batch, [0] * batch
    encoded = _encoded_inputs(model, inputs)
    for what, token_id, visuals, runs in (
        ("image", adapter.image_token_id(), adapter.image_passes(encoded), adapter.image_passes(inputs)),
        ("video", adapter.video_token_id(), adapter.video_passes(encoded), adapter.video_passes(inputs)),
    ):
        rows = placeholder_rows(ids, token_id, [visual.tokens for visual in runs], what)
        for visual, b in zip(visuals, rows):
            v, p = _encode(visual)
            vision[b] += v
            projector[b] += p
    llm, vocab = llm_dims(model), vocab_size(model)
    return [
        FlopsBreakdown(vision=vision[b], projector=projector[b],
                       llm=layered_flops(llm, lengths[b]) if isinstance(lengths[b], list)
                       else transformer_flops(llm, lengths[b]),
                       lm_head=2 * llm.hidden * vocab)
        for b in range(batch)
    ]
