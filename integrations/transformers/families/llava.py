"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP-style tower, one square grid per image.

Layout: ``vision_feature_select_strategy="default"`` drops the CLS token, so an image is its (H/p) x (W/p) patch
grid in raster order; ``"full"`` keeps the CLS token first (one prefix token). The feature layer is
``num_layers + vision_feature_layer`` (22 of 24 for CLIP-L/14-336 with the usual -2).

Positions: LLaVA numbers the spliced sequence contiguously, and every encoder-side method in the literature hands
it a shorter visual run, so ``positions="reindex"`` (contiguous) is the default. ``positions="keep"`` passes the
kept tokens' original positions (gaps where tokens were dropped). Caveat: transformers treats gapped 1-D positions
as packed sequences under flash-attention when no attention mask is present (bs=1 generate drops an all-ones
mask), which would break attention -- use ``"keep"`` with SDPA/eager only.

Pixels (``image_token_boxes``): ``CLIPImageProcessor`` (or any image processor with the same steps) resizes with
``size`` (``shortest_edge`` keeps the aspect ratio; ``height``/``width`` squashes; ``shortest_edge`` + ``longest_edge``
and ``max_height``/``max_width`` as transformers computes them), center-crops to ``crop_size`` (a crop larger than the
resized image pads it, as transformers does), then pads the batch at the bottom / right (``do_pad``). One token per
``patch_size`` patch of ``pixel_values``; under "full" the CLS token comes first (no pixels). The parts of the image
the center crop cuts away are in no token. The boxes assume the processor got the user's picture itself.

FLOPs (``model_dims``): a CLIP or SigLIP tower (CLIP adds a class embedding), one pass per image, the projector on
every kept position.
"""

from __future__ import annotations

import math

import torch

from vtc.flops import TransformerDims, VisionDims, VLMDims
from vtc.signals import Signal, TowerInfo

from ..adapter import EncodedImages, FamilyAdapter, ImageLayout, TinyModel, register_adapter, register_tiny
from ..capture import ProjectionCapture
from ..flops import TowerPasses, linear_shapes, llm_dims, positive_int, vocab_size
from ..geometry import (
    TokenBoxes,
    check_image_index,
    finish_boxes,
    grid_boxes,
    image_processor_of,
    pixel_span,
    view_chain,
)


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

    def _num_prefix(self, inputs: dict | None = None) -> int:
        """Tokens before an image's grid: the CLS under the "full" strategy (when the tower has one)."""
        return 1 if (self._strategy(inputs) == "full" and self.has_cls()) else 0

    def fixed_image_tokens(self) -> int | None:
        config = self.vision.config
        return self._num_prefix() + (config.image_size // config.patch_size) ** 2

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
        prefix = self._num_prefix(inputs)
        drop = 1 if (self._strategy(inputs) == "default" and self.has_cls()) else 0
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

    # -- pixels --------------------------------------------------------------------------------------------------
    def image_token_counts(self, inputs: dict) -> list[int]:
        pixel_values = inputs["pixel_values"]
        patch = self.vision.config.patch_size
        n = self._num_prefix(inputs) + (pixel_values.shape[-2] // patch) * (pixel_values.shape[-1] // patch)
        return [n] * pixel_values.shape[0]

    def image_token_boxes(self, processor, inputs: dict, image_index: int, width: int, height: int) -> TokenBoxes:
        ip = image_processor_of(processor)
        pixel_values = inputs.get("pixel_values")
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            raise ValueError("LLaVA token boxes need the call's pixel_values [num_images, 3, H, W] (what its processor "
                             "returns); pass the inputs the model was called with")
        image_index = check_image_index(image_index, pixel_values.shape[0], "pixel_values")
        tensor_h, tensor_w = pixel_values.shape[-2:]
        patch = self.vision.config.patch_size
        rows, cols = tensor_h // patch, tensor_w // patch
        out_h, out_w, ay, ax = view_chain(ip, height, width)
        padded = bool(getattr(ip, "do_pad", False)) and out_h <= tensor_h and out_w <= tensor_w
        if (out_h, out_w) != (tensor_h, tensor_w) and not padded:
            raise ValueError(
                f"the image processor turns a {width}x{height} image into {out_w}x{out_h} pixels but pixel_values are "
                f"{tensor_w}x{tensor_h}: pass the processor that built the inputs (with the settings of that call) and "
                "the size of the image given to it"
            )
        ys = [pixel_span(r * patch, (r + 1) * patch, out_h, ay, height) for r in range(rows)]
        xs = [pixel_span(c * patch, (c + 1) * patch, out_w, ax, width) for c in range(cols)]
        grid = grid_boxes(ys, xs)
        prefix = self._num_prefix(inputs)
        boxes = torch.cat([torch.full((prefix, 4), float("nan"), dtype=torch.float64), grid])
        views = torch.cat([torch.full((prefix,), -1, dtype=torch.long), torch.zeros(rows * cols, dtype=torch.long)])
        return finish_boxes(boxes, views, (1, 1))

    # -- dimensions ----------------------------------------------------------------------------------------------
    def _views(self, views_per_image: int | None) -> int:
        """Tower passes per image for ``model_dims`` (LLaVA-1.5: always one)."""
        if views_per_image not in (None, 1):
            raise ValueError(
                f"views_per_image={views_per_image!r}: LLaVA-1.5 runs its tower once per image; leave it unset "
                "(it is for LLaVA-NeXT / OneVision AnyRes crops)"
            )
        return 1

    def model_dims(self, vision_tokens_per_image: int | None = None, views_per_image: int | None = None) -> VLMDims:
        from transformers import CLIPVisionModel, SiglipVisionModel

        model = self.model
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
            patches = positive_int("vision_tokens_per_image", vision_tokens_per_image)
        views = self._views(views_per_image)
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
            projector=linear_shapes(model.model.multi_modal_projector),
            projector_tokens_per_image=views * projected,
            llm=llm_dims(model),
            vocab_size=vocab_size(model),
        )

    def image_passes(self, inputs: dict) -> list[TowerPasses]:
        pixel_values = inputs.get("pixel_values")
        if pixel_values is None:
            return []
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"LLaVA expects pixel_values of shape [num_images, 3, H, W], got {shape}")
        patch = self.model.config.vision_config.patch_size
        dims = self.model_dims((pixel_values.shape[-2] // patch) * (pixel_values.shape[-1] // patch))
        return [TowerPasses(dims.projector_tokens_per_image, dims)] * pixel_values.shape[0]


# ---------------------------------------------------------------------------------------- tiny checkpoint (tests)
#: a minimal LLaVA chat template; it takes both lmms-eval's list-of-items content and plain string content
LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ ' ' }}"
    "{% else %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ ' ' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
TINY_PATCH = 8  # the tiny LLaVA-style towers' patch (px)
_TINY_IMAGE = 48


def tiny_tower_config(config_cls, image_size: int, **overrides):
    """A tiny CLIP / SigLIP tower config (width 64, 4 layers) of ``image_size`` px in ``TINY_PATCH`` px patches."""
    return config_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      image_size=image_size, patch_size=TINY_PATCH, **overrides)


def build_tiny_llava(tok, model_cls, processor_cls, image_processor, tower, **config):
    """``(model, processor)`` of a tiny LLaVA-1.5-style checkpoint of ``model_cls``: the ``tower`` vision config under
    the tiny Llama LLM, features of tower layer -2 without CLS, ``TINY_PATCH`` px patches, the LLaVA chat template;
    ``config``: the family's other config fields (its image token id among them). Shared by LLaVA-1.5 and -NeXT."""
    from transformers import LlamaConfig

    from ..testing import tiny_text_config

    model = model_cls(model_cls.config_class(vision_config=tower, text_config=tiny_text_config(LlamaConfig, tok),
                                             vision_feature_layer=-2, vision_feature_select_strategy="default",
                                             **config))
    processor = processor_cls(image_processor=image_processor, tokenizer=tok, patch_size=TINY_PATCH,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=LLAVA_TEMPLATE)
    return model, processor


def square_views(image_processor_cls, side: int, **kwargs):
    """An image processor of ``image_processor_cls`` that resizes the shortest edge to ``side`` px and center-crops
    ``side`` x ``side`` (the CLIP preprocessing)."""
    return image_processor_cls(size={"shortest_edge": side}, crop_size={"height": side, "width": side}, **kwargs)


def build_tiny(tok):
    """Tiny LLaVA-1.5: a CLIP tower of 48 px images in 8 px patches (6x6 = 36 tokens per image, every image resized
    and center-cropped to 48x48), a 2-layer Llama LLM."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlavaForConditionalGeneration, LlavaProcessor

    return build_tiny_llava(tok, LlavaForConditionalGeneration, LlavaProcessor,
                            square_views(CLIPImageProcessor, _TINY_IMAGE),
                            tiny_tower_config(CLIPVisionConfig, _TINY_IMAGE),
                            image_token_id=tok.convert_tokens_to_ids("<image>"))


register_tiny(LlavaAdapter, TinyModel(build=build_tiny, placeholders=("<image>",), chat_template=LLAVA_TEMPLATE,
                                      image_sizes=((48, 48), (48, 48))))
