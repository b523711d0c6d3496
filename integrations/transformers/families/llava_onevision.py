"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP tower (no CLS), AnyRes as LLaVA-NeXT.

Layout (``LlavaOnevisionModel.pack_image_features``): as LLaVA-NeXT (``llava_next.py``: base view without newline,
then the unpadded crop canvas with one ``image_newline`` per row) plus two differences, both from the source:

* ``vision_aspect_ratio="anyres_max_N"`` (default ``anyres_max_9``): when the unpadded canvas holds more than about
  ``N`` views' worth of tokens (``ratio = sqrt(rows * cols / (N * s^2)) > 1.1``), it is bilinearly downscaled to
  ``int(rows // ratio) x int(cols // ratio)`` before the newlines are added. A crop's visible grid is then the
  output cells whose centre falls in the crop, and its signals are resampled exactly like the features
  (``PackedLayout.canvas_values``).
* In a prompt with several images (``batch_num_images`` > 1 for that prompt) every image is encoded as its base view
  only, followed by **one** newline (``PackedLayout(base_newline=True)``): a single view, kept like any image; the
  trailing newline closes the whole view, so it is kept whenever the image keeps a token.

The tower has no CLS token, so every CLS-based compressor uses the documented fallback (``TowerInfo.has_cls`` is
False: ``TowerInfo.attention_signal`` gives received attention -- the head-mean attention a token receives, summed
over all queries of its view (``SignalKind.RECEIVED_ATTENTION``) -- instead of CLS attention; HiRED's allocation does the same and GlobalCom² uses the
log of it in place of CLS logits, see ``vtc.allocation``). The "full" feature strategy (the checkpoints' setting)
keeps every patch.

Videos (``encode_videos``): each sampled frame is one frame of the video's budget (its 2x2-pooled grid); the single
newline the model appends after a video's frames (``mm_newline_position="one_token"``) is layout and always kept.
Positions: 1-D, as LLaVA-1.5: ``"reindex"`` (default) or ``"keep"``.

Pixels: images as LLaVA-NeXT (``llava_next.py``). Video frames (``video_token_boxes``): every sampled frame is resized
by the video processor (``size``, ``crop_size``) and its patch grid bilinearly pooled to ``ceil(side / 2)`` per
axis; a token's box is its footprint (about 2x2 patches). FLOPs: videos take one tower pass per frame.
"""

from __future__ import annotations

import inspect
import math
from fractions import Fraction

import torch

from ..adapter import EncodedVideos, TinyModel, register_adapter, register_tiny
from ..capture import ProjectionCapture
from ..flops import TowerPasses
from ..geometry import (
    Affine,
    TokenBoxes,
    copy_boxes,
    finish_boxes,
    grid_boxes,
    pixel_span,
    video_processor_of,
    view_chain,
)
from .llava import LLAVA_TEMPLATE, TINY_PATCH, tiny_tower_config
from .llava_next import TINY_VIEW, AnyResAdapter


@register_adapter
class LlavaOnevisionAdapter(AnyResAdapter):
    family = "llava_onevision"
    display_name = "LLaVA-OneVision"
    modeling_module = "transformers.models.llava_onevision.modeling_llava_onevision"
    consumed_keys = AnyResAdapter.consumed_keys + ("image_sizes_videos", "batch_num_images")
    supports_video = True

    @classmethod
    def model_classes(cls):
        from transformers import LlavaOnevisionForConditionalGeneration

        return (LlavaOnevisionForConditionalGeneration,)

    def _needs_crops(self, inputs: dict, num_images: int) -> list[bool]:
        counts = inputs.get("batch_num_images")
        if counts is None:  # as the model: every image is a single-image prompt
            return [True] * num_images
        counts = [int(n) for n in torch.as_tensor(counts).reshape(-1).tolist()]
        if sum(counts) != num_images:
            raise ValueError(
                f"batch_num_images {counts} counts {sum(counts)} images but image_sizes has {num_images}; pass the "
                "batch_num_images, pixel_values and image_sizes of the same processor call"
            )
        return [n == 1 for n in counts for _ in range(n)]

    def _aspect_limit(self, inputs: dict) -> int | None:
        setting = inputs.get("vision_aspect_ratio") or self.model.config.vision_aspect_ratio
        try:
            return int(str(setting).strip("anyres_max_"))  # as LlavaOnevisionModel.pack_image_features
        except ValueError:
            raise ValueError(f"vision_aspect_ratio must look like 'anyres_max_9', got {setting!r}") from None

    def encode_videos(self, inputs: dict, signals) -> EncodedVideos:
        """Every sampled frame is one frame of the video's budget: the tower's patch grid, projected and bilinearly
        pooled to ``ceil(side / 2)`` per axis by the model (``apply_pooling``); its signals are pooled the same way
        (bilinear, as the features), so a frame's scores line up with its tokens. The one ``image_newline`` the
        model appends after each video is layout, always kept."""
        pixel_values = inputs.get("pixel_values_videos")
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 5:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(
                f"{self.display_name} expects pixel_values_videos of shape [num_videos, frames, 3, H, W], got "
                f"{shape}; build inputs with the model's own processor"
            )
        drop = self._check_strategy(inputs)
        get_video = self.model.model.get_video_features
        params = inspect.signature(get_video).parameters
        kwargs = {key: inputs[key] for key in params if key != "kwargs" and inputs.get(key) is not None}
        heads = self.vision.config.num_attention_heads
        capture = ProjectionCapture(self.layers, signals, heads, cls_index=0 if self.has_cls() else None)
        with capture:
            output = get_video(**kwargs, return_dict=True)
        num_videos, num_frames = pixel_values.shape[:2]
        side = self.vision.config.image_size // self.vision.config.patch_size
        pooled = (math.ceil(side / 2), math.ceil(side / 2))
        n = pooled[0] * pooled[1]
        packed = output.pooler_output  # [videos, frames * n + 1, D]
        if packed.shape[1] != num_frames * n + 1:
            raise NotImplementedError(
                f"{self.display_name} returned {packed.shape[1]} tokens per video for {num_frames} frames; vtc expects "
                f"{num_frames} x {n} pooled tokens plus one newline from this transformers version's get_video_features"
            )
        pooled_signals = {sig: _pool_like_features(value[:, drop:], side, pooled)
                          for sig, value in capture.results.items()}
        capture.results.clear()
        frames, grids, frame_signals, suffix = [], [], [], []
        for v in range(num_videos):
            frames.append(list(torch.split(packed[v, : num_frames * n], [n] * num_frames)))
            grids.append([pooled] * num_frames)
            frame_signals.append([{sig: val[v * num_frames + t] for sig, val in pooled_signals.items()}
                                  for t in range(num_frames)])
            suffix.append(packed[v, num_frames * n:])
        return EncodedVideos(output=output, frames=frames, grids=grids, signals=frame_signals, suffix=suffix,
                             timestamps=[None] * num_videos)

    def shrink_video_output(self, encoded: EncodedVideos, kept, kept_levels):
        # the model flattens [videos, tokens, D] itself; kept counts differ per video, so hand one row of all of them
        return type(encoded.output)(pooler_output=torch.cat(list(kept), dim=0)[None])

    def video_token_boxes(self, processor, inputs: dict, video_index: int, width: int, height: int,
                          offset: int = 0) -> list[TokenBoxes]:
        vp = video_processor_of(processor)
        pixel_values = inputs.get("pixel_values_videos")
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 5:
            raise ValueError("LLaVA-OneVision video boxes need the call's pixel_values_videos [num_videos, frames, 3, "
                             "H, W]; pass the inputs the model was called with")
        if video_index >= pixel_values.shape[0]:
            raise IndexError(f"video_index {video_index + offset} is out of range: pixel_values_videos of this call "
                             f"holds {pixel_values.shape[0]} video(s)"
                             + (f" (after {offset} image sequence(s))" if offset else ""))
        cfg = self.vision.config
        token_px, side = cfg.patch_size, cfg.image_size // cfg.patch_size
        out_h, out_w, ay, ax = view_chain(vp, height, width)
        if (out_h, out_w) != tuple(pixel_values.shape[-2:]):
            raise ValueError(
                f"the video processor turns {width}x{height} frames into {out_w}x{out_h} pixels but "
                f"pixel_values_videos are {pixel_values.shape[-1]}x{pixel_values.shape[-2]}: pass the processor that "
                "built the inputs and the size of the sampled frames"
            )
        pooled = math.ceil(side / 2)  # LlavaOnevisionModel.apply_pooling: bilinear to ceil(side / 2) per axis

        def spans(valid: int, axis: Affine, limit: int) -> list:
            return [pixel_span(float(Fraction(i * side, pooled) * token_px),
                               float(Fraction((i + 1) * side, pooled) * token_px), valid, axis, limit)
                    for i in range(pooled)]

        boxes = finish_boxes(grid_boxes(spans(out_h, ay, height), spans(out_w, ax, width)),
                             torch.zeros(pooled * pooled, dtype=torch.long),
                             (round(side / pooled), round(side / pooled)))
        return [copy_boxes(boxes) for _ in range(pixel_values.shape[1])]

    def video_passes(self, inputs: dict) -> list[TowerPasses]:
        """``get_video_features``: every frame one tower pass (one view) and the projector on all its tokens, then
        2x2 bilinear pooling (no matmul) to ``ceil(s / 2)^2`` tokens per frame, and one newline after the video."""
        videos = inputs.get("pixel_values_videos")
        if videos is None:
            return []
        side = self.model.config.vision_config.image_size // self.model.config.vision_config.patch_size
        per_frame = math.ceil(side / 2) ** 2
        dims = self.model_dims(views_per_image=1)
        return [TowerPasses(int(v.shape[0]) * per_frame + 1, dims, int(v.shape[0])) for v in videos]


def _pool_like_features(value: torch.Tensor, side: int, size: tuple[int, int]) -> torch.Tensor:
    """``[frames, side*side(, d)]`` per-patch values -> ``[frames, h*w(, d)]``, bilinear like ``apply_pooling``."""
    frames = value.shape[0]
    extra = value.shape[2:]
    grid = value.reshape(frames, side, side, -1).permute(0, 3, 1, 2).float()
    out = torch.nn.functional.interpolate(grid, size=size, mode="bilinear")
    out = out.permute(0, 2, 3, 1).reshape(frames, size[0] * size[1], *extra)
    return out


# ---------------------------------------------------------------------------------------- tiny checkpoint (tests)
#: the LLaVA template plus a ``<video>`` item
ONEVISION_TEMPLATE = LLAVA_TEMPLATE.replace(
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}",
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}{% elif item['type'] == 'video' %}{{ '<video>\n' }}",
)
_TINY_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [96, 96], [128, 128]]


def build_tiny(tok):
    """Tiny LLaVA-OneVision: a SigLIP tower (no CLS) of 32 px views as LLaVA-NeXT's, pinpoints up to 128x128 with
    ``anyres_max_9``, a 2-layer Qwen2 LLM. 64x40 -> 70 tokens as NeXT; 128x96 -> 4x4 crops, 16x16 canvas unpadded to
    12x16 and downscaled (anyres_max_9) to 10x13: 16 + 130 + 10 = 156. In a prompt with several images each image is
    its base view plus one newline (17 tokens), as OneVision's processor and model do."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    from ..testing import tiny_text_config

    ids = tok.convert_tokens_to_ids
    config = LlavaOnevisionConfig(
        vision_config=tiny_tower_config(SiglipVisionConfig, TINY_VIEW),
        text_config=tiny_text_config(Qwen2Config, tok),
        image_token_index=ids("<image>"),
        video_token_index=ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=_TINY_PINPOINTS,
    )
    model = LlavaOnevisionForConditionalGeneration(config)
    size = {"height": TINY_VIEW, "width": TINY_VIEW}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=_TINY_PINPOINTS),
        tokenizer=tok,
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        num_image_tokens=(TINY_VIEW // TINY_PATCH) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=ONEVISION_TEMPLATE,
    )
    return model, processor


# 64x40 -> 2x2 crops cut mid-crop by unpadding (5 views, 70 tokens), 128x96 -> 4x4 crops unpadded and downscaled by
# anyres_max_9 (17 views, 156 tokens)
register_tiny(LlavaOnevisionAdapter, TinyModel(build=build_tiny, placeholders=("<image>", "<video>"),
                                               chat_template=ONEVISION_TEMPLATE, image_sizes=((64, 40), (128, 96))))
