"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP-style tower, one square grid per image.

Layout: ``vision_feature_select_strategy="default"`` drops the CLS token, so an image is its (H/p) x (W/p) patch
grid in raster order; ``"full"`` keeps the CLS token first (one prefix token). The feature layer is
``num_layers + vision_feature_layer`` (22 of 24 for CLIP-L/14-336 with the usual -2).

Positions: LLaVA numbers the spliced sequence contiguously, and every encoder-side method in the literature hands
it a shorter visual run, so ``positions="reindex"`` (contiguous) is the default. ``positions="keep"`` passes the
kept tokens' original positions (gaps where tokens were dropped). Caveat: transformers treats gapped 1-D positions
as packed sequences under flash-attention when no attention mask is present (bs=1 generate drops an all-ones
mask), which would break attention -- use ``"keep"`` with SDPA/eager only.
"""

from __future__ import annotations


from vtc.signals import Signal, TowerInfo

from ..adapter import EncodedImages, FamilyAdapter, ImageLayout, register_adapter
from ..capture import ProjectionCapture


@register_adapter
class LlavaAdapter(FamilyAdapter):
    family = "llava"
    position_modes = ("reindex", "keep")

    @classmethod
    def model_classes(cls):
        from transformers import LlavaForConditionalGeneration

        return (LlavaForConditionalGeneration,)

    # -- tower -----------------------------------------------------------------------------------------------
    @property
    def vision(self):
        tower = self.model.model.vision_tower
        return getattr(tower, "vision_model", tower)  # v5 flattens CLIPVisionModel; older nesting still works

    @property
    def layers(self):
        return self.vision.encoder.layers

    def _feature_layer_setting(self, inputs: dict | None = None):
        layer = (inputs or {}).get("vision_feature_layer")
        return self.model.config.vision_feature_layer if layer is None else layer

    def _strategy(self, inputs: dict | None = None) -> str:
        strategy = (inputs or {}).get("vision_feature_select_strategy")
        return self.model.config.vision_feature_select_strategy if strategy is None else strategy

    def has_cls(self) -> bool:
        return getattr(self.vision.embeddings, "class_embedding", None) is not None

    def tower_info(self, inputs: dict | None = None) -> TowerInfo:
        num_layers = len(self.layers)
        setting = self._feature_layer_setting(inputs)
        hidden_index = max(setting) if isinstance(setting, (list, tuple)) else int(setting)
        # hidden_states[j] is the output of layer j-1 (j = 0: the embeddings)
        layer = (hidden_index + num_layers if hidden_index < 0 else hidden_index - 1)
        if layer < 0:
            raise ValueError(
                f"vision_feature_layer={setting} selects the embeddings, before any attention layer; "
                "attention-based compressors need a layer index of 1 or more"
            )
        return TowerInfo(name="clip" if self.has_cls() else "siglip", num_layers=num_layers, feature_layer=layer,
                         has_cls=self.has_cls())

    # -- encoding --------------------------------------------------------------------------------------------
    def encode(self, inputs: dict, signals: tuple[Signal, ...]) -> EncodedImages:
        enc_kwargs = self.encoder_kwargs(inputs)
        pixel_values = enc_kwargs["pixel_values"]
        if pixel_values.dim() != 4:
            raise ValueError(
                f"LLaVA expects pixel_values of shape [num_images, 3, H, W], got {tuple(pixel_values.shape)}"
            )
        heads = self.vision.config.num_attention_heads
        cls_index = 0 if self.has_cls() else None
        capture = ProjectionCapture(self.layers, signals, heads, cls_index=cls_index)
        with capture:
            output = self.model.model.get_image_features(**enc_kwargs, return_dict=True)
        features = list(output.pooler_output)
        patch = self.vision.config.patch_size
        rows, cols = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
        strategy = self._strategy(inputs)
        prefix = 1 if (strategy == "full" and self.has_cls()) else 0
        drop = 1 if (strategy == "default" and self.has_cls()) else 0
        layouts, per_image = [], []
        for i, feats in enumerate(features):
            layout = ImageLayout(grid=(rows, cols), num_prefix_tokens=prefix)
            if feats.shape[0] != prefix + rows * cols:
                raise NotImplementedError(
                    f"image {i} has {feats.shape[0]} visual tokens but a {rows}x{cols} grid; "
                    "this LLaVA variant's layout is not supported by the llava adapter"
                )
            layouts.append(layout)
            per_image.append({sig: value[i, drop:] for sig, value in capture.results.items()})
        capture.results.clear()
        return EncodedImages(output=output, features=features, layouts=layouts, signals=per_image)
