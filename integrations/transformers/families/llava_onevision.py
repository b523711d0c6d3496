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
False: ``TowerInfo.attention_signal`` gives received attention -- the head-mean attention a token receives, averaged
over all queries of its view -- instead of CLS attention; HiRED's allocation does the same and GlobalCom² uses the
log of it in place of CLS logits, see ``vtc.allocation``). The "full" feature strategy (the checkpoints' setting)
keeps every patch.

Videos in the same call are encoded with the model's own ``get_video_features`` and passed through untouched.
Positions: 1-D, as LLaVA-1.5: ``"reindex"`` (default) or ``"keep"``.
"""

from __future__ import annotations

import inspect

import torch

from ..adapter import EncodedImages, register_adapter
from .llava_next import AnyResAdapter


@register_adapter
class LlavaOnevisionAdapter(AnyResAdapter):
    family = "llava_onevision"
    display_name = "LLaVA-OneVision"
    modeling_module = "transformers.models.llava_onevision.modeling_llava_onevision"
    consumed_keys = AnyResAdapter.consumed_keys + ("image_sizes_videos", "batch_num_images")

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

    def encode_other(self, inputs: dict, encoded: EncodedImages) -> None:
        if inputs.get("pixel_values_videos") is None:
            return
        get_video = self.model.model.get_video_features
        params = inspect.signature(get_video).parameters
        kwargs = {key: inputs[key] for key in params if key != "kwargs" and inputs.get(key) is not None}
        encoded.extra_outputs["video"] = get_video(**kwargs, return_dict=True)
