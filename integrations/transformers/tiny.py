"""Tiny, fully offline LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL and Qwen3-VL checkpoints for tests.

No model hub is reachable, so everything here (tokenizer, chat template, image
processors, configs, random weights) is built in code. Models are small enough
that one is built in tens of milliseconds on CPU, yet they keep the parts that
token compression touches: a real vision-token grid (LLaVA: 6x6 patches;
Qwen2-VL: full-attention vision blocks, 2x2 patch merging, M-RoPE;
Qwen2.5-VL: windowed and full-attention vision blocks; Qwen3-VL: interpolated
learned position embeddings, interleaved M-RoPE and two deepstack levels;
LLaVA-NeXT / OneVision: AnyRes base view plus 1x2 / 2x2 / 4x4 crops, unpadding,
image_newline tokens, OneVision's anyres_max_9 downscaling), left padding, and
multi-image prompts. ``save_tiny``/``load_tiny``
produce an on-disk checkpoint that ``AutoModelForImageTextToText`` and
``AutoProcessor`` (and so lmms-eval's HF wrappers) can load like a real one.

Image tokens per image (see ``build_tiny``):

* LLaVA: every image is resized/cropped to 48x48 -> 36 tokens (6x6 grid).
* LLaVA-NeXT (CLIP, 32 px views of 4x4 patches, pinpoints 32x64 / 64x32 / 64x64):
  a base view of 16 tokens, then the unpadded crop canvas with one newline per
  row. 64x20 (w x h) -> 1x2 crops, canvas 4x8 unpadded to 2x8: 16 + 16 + 2 = 34;
  48x48 -> 2x2 crops, 8x8 canvas: 16 + 64 + 8 = 88; 64x40 -> 2x2 crops, 8x8
  unpadded to 6x8: 16 + 48 + 6 = 70.
* LLaVA-OneVision (SigLIP, no CLS, same view size; pinpoints up to 128x128,
  anyres_max_9): 64x40 -> 70 as NeXT; 128x96 -> 4x4 crops, 16x16 canvas
  unpadded to 12x16 and downscaled (anyres_max_9) to 10x13: 16 + 130 + 10 = 156.
  In a prompt with several images each image is its base view plus one newline
  (17 tokens), as OneVision's processor and model do.
* Qwen2-VL, Qwen2.5-VL, Qwen3-VL: sides are rounded to multiples of 16 (patch
  8 x merge 2), pixel count bounded to [16*16, 128*128]; tokens = (H/16)*(W/16).
  64x48 -> 12, 96x64 -> 24, 96x96 -> 36, 128x128 -> 64.
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch
import transformers
from PIL import Image
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

__all__ = [
    "FAMILIES",
    "QWEN_FAMILIES",
    "VIDEO_FAMILIES",
    "ANYRES_FAMILIES",
    "LLAVA_FAMILIES",
    "build_tokenizer",
    "build_tiny",
    "save_tiny",
    "load_tiny",
    "random_image",
    "build_prompt",
]

FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_5_vl", "qwen2_vl", "qwen3_vl")
QWEN_FAMILIES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl")
VIDEO_FAMILIES = ("llava_onevision", "qwen2_5_vl", "qwen2_vl", "qwen3_vl")
#: AnyRes families: an image is a base view plus crops, packed with image_newline tokens
ANYRES_FAMILIES = ("llava_next", "llava_onevision")
#: every LLaVA-style family (1-D positions, ``<image>`` placeholders, ``model.model.vision_tower``)
LLAVA_FAMILIES = ("llava", "llava_next", "llava_onevision")

# Base (non-special) vocabulary: prompt words, short answers, role names,
# digits and punctuation. Anything else maps to <unk>, which is fine for tests.
_WORDS = tuple(
    "what is the in image picture photo color colour shape of a an how many "
    "red green blue yellow black white orange purple circle square triangle "
    "yes no user assistant system USER ASSISTANT User Assistant left right top "
    "bottom center middle there are describe this that it object objects and or "
    "with on at to be do does can you see which where answer question please "
    "briefly word single one two three four five number count big small large "
    "background foreground noise random pixels text "
    "What How Is Are Describe Which Where Answer Please Does Do Can There The This Yes No".split()
)
_DIGITS = tuple(str(i) for i in range(21))
_PUNCT = tuple(".,:;!?'\"()[]{}-_/*+=<>|#@&%$")
_BASE_SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")
_QWEN_SPECIALS = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|im_start|>",
    "<|im_end|>",
)
_FAMILY_SPECIALS = {
    "llava": ("<image>",),
    "llava_next": ("<image>",),
    "llava_onevision": ("<image>", "<video>"),
    **{family: _QWEN_SPECIALS for family in QWEN_FAMILIES},
}

# Minimal chat templates. They accept both the list-of-items content that
# lmms-eval's chat wrappers send and plain string content.
_LLAVA_TEMPLATE = (
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

_QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# OneVision: the LLaVA template plus a <video> item
_ONEVISION_TEMPLATE = _LLAVA_TEMPLATE.replace(
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}",
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}{% elif item['type'] == 'video' %}{{ '<video>\n' }}",
)

_TEMPLATES = {
    "llava": _LLAVA_TEMPLATE,
    "llava_next": _LLAVA_TEMPLATE,
    "llava_onevision": _ONEVISION_TEMPLATE,
    **{family: _QWEN_TEMPLATE for family in QWEN_FAMILIES},
}

# Sizes chosen so that a vision grid exists to prune and (for Qwen) window
# attention splits larger images into several windows.
_LLAVA_IMAGE_SIZE = 48
_PATCH = 8
# AnyRes: 32 px views (4x4 patches of 8 px); crop layouts 1x2, 2x1, 2x2 (and for OneVision 3x3, 4x4)
_ANYRES_VIEW = 32
_NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64]]
_ONEVISION_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [96, 96], [128, 128]]
_QWEN_MIN_PIXELS = 16 * 16
_QWEN_MAX_PIXELS = 128 * 128


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def word_level_tokenizer(specials, words, chat_template: str) -> transformers.PreTrainedTokenizerFast:
    """Word-level tokenizer built in memory (no downloads) over ``specials`` then ``words``.

    Special tokens are added as non-normalized AddedTokens so image
    placeholders tokenize as single ids even when glued to text (as processors
    expand them, e.g. ``<|image_pad|><|image_pad|>...``). "\\n" is an added
    (non-special) token so chat templates keep their line structure; plain
    whitespace is dropped. The WordPiece decoder makes ``decode`` join tokens
    with spaces. Left padding is what batched generation needs. ``specials``
    must include ``<pad> <unk> <s> </s>``.
    """
    specials = tuple(specials)
    vocab: dict[str, int] = {}
    for tok in specials + tuple(words):
        vocab.setdefault(tok, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.add_tokens([AddedToken("\n", special=False, normalized=False)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
        chat_template=chat_template,
    )


def build_tokenizer(family: str) -> transformers.PreTrainedTokenizerFast:
    """The tiny models' tokenizer: test words, digits and punctuation (see ``word_level_tokenizer``)."""
    _check_family(family)
    return word_level_tokenizer(_BASE_SPECIALS + _FAMILY_SPECIALS[family], _WORDS + _DIGITS + _PUNCT,
                                _TEMPLATES[family])


def _build_llava(tok):
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=_LLAVA_IMAGE_SIZE,
            patch_size=_PATCH,
        ),
        text_config=LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tok),
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": _LLAVA_IMAGE_SIZE},
        crop_size={"height": _LLAVA_IMAGE_SIZE, "width": _LLAVA_IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_LLAVA_TEMPLATE,
    )
    return model, processor


def _tiny_vision(config_cls, **overrides):
    return config_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      image_size=_ANYRES_VIEW, patch_size=_PATCH, **overrides)


def _tiny_text(config_cls, tok):
    return config_cls(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )


def _build_llava_next(tok):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    config = LlavaNextConfig(
        vision_config=_tiny_vision(CLIPVisionConfig),
        text_config=_tiny_text(LlamaConfig, tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=_NEXT_PINPOINTS,
    )
    model = LlavaNextForConditionalGeneration(config)
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": _ANYRES_VIEW},
        crop_size={"height": _ANYRES_VIEW, "width": _ANYRES_VIEW},
        image_grid_pinpoints=_NEXT_PINPOINTS,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_LLAVA_TEMPLATE,
    )
    return model, processor


def _build_llava_onevision(tok):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    ids = tok.convert_tokens_to_ids
    config = LlavaOnevisionConfig(
        vision_config=_tiny_vision(SiglipVisionConfig),
        text_config=_tiny_text(Qwen2Config, tok),
        image_token_index=ids("<image>"),
        video_token_index=ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=_ONEVISION_PINPOINTS,
    )
    model = LlavaOnevisionForConditionalGeneration(config)
    size = {"height": _ANYRES_VIEW, "width": _ANYRES_VIEW}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=_ONEVISION_PINPOINTS),
        tokenizer=tok,
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        num_image_tokens=(_ANYRES_VIEW // _PATCH) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=_ONEVISION_TEMPLATE,
    )
    return model, processor


def _qwen_text_config(tok, **overrides) -> dict:
    # mrope_section must sum to head_dim / 2 = 64 / 4 / 2 = 8.
    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 2, 2]}
    rope.update(overrides.pop("rope_parameters", {}))
    config = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=len(tok),
        rope_parameters=rope,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    config.update(overrides)
    return config


def _qwen_token_ids(tok) -> dict:
    ids = tok.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def _qwen_processor(processor_cls, tok, video_processor_cls=None):
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    # size = pixel-count bounds: shortest_edge = min_pixels, longest_edge = max_pixels.
    common = dict(
        patch_size=_PATCH,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": _QWEN_MIN_PIXELS, "longest_edge": _QWEN_MAX_PIXELS},
    )
    return processor_cls(
        image_processor=Qwen2VLImageProcessor(**common),
        tokenizer=tok,
        video_processor=(video_processor_cls or Qwen2VLVideoProcessor)(**common),
        chat_template=_QWEN_TEMPLATE,
    )


def _build_qwen2_5_vl(tok):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    config = Qwen2_5_VLConfig(
        text_config=_qwen_text_config(tok),
        vision_config=dict(
            depth=4,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=_PATCH,
            spatial_merge_size=2,
            temporal_patch_size=2,
            # 32 px = 2x2 merged tokens per window, so images above 32x32 use >1 window.
            window_size=32,
            fullatt_block_indexes=[1, 3],
        ),
        **_qwen_token_ids(tok),
    )
    return Qwen2_5_VLForConditionalGeneration(config), _qwen_processor(Qwen2_5_VLProcessor, tok)


def _build_qwen2_vl(tok):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    config = Qwen2VLConfig(
        text_config=_qwen_text_config(tok),
        # Qwen2-VL names the ViT width embed_dim; its hidden_size is the merger output (= the LLM width).
        vision_config=dict(
            depth=3,
            embed_dim=32,
            hidden_size=64,
            mlp_ratio=2,
            num_heads=2,
            patch_size=_PATCH,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        **_qwen_token_ids(tok),
    )
    return Qwen2VLForConditionalGeneration(config), _qwen_processor(Qwen2VLProcessor, tok)


def _build_qwen3_vl(tok):
    from transformers import (
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    config = Qwen3VLConfig(
        # 3 LLM layers: the 2 deepstack levels are added after layers 0 and 1.
        text_config=_qwen_text_config(
            tok, num_hidden_layers=3, head_dim=16, rope_parameters={"mrope_interleaved": True}
        ),
        vision_config=dict(
            depth=4,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=_PATCH,
            spatial_merge_size=2,
            temporal_patch_size=2,
            # an 8x8 learned grid, bilinearly resampled to each image's patch grid
            num_position_embeddings=64,
            deepstack_visual_indexes=[1, 2],
        ),
        **_qwen_token_ids(tok),
    )
    processor = _qwen_processor(Qwen3VLProcessor, tok, video_processor_cls=Qwen3VLVideoProcessor)
    return Qwen3VLForConditionalGeneration(config), processor


_BUILDERS = {
    "llava": _build_llava,
    "llava_next": _build_llava_next,
    "llava_onevision": _build_llava_onevision,
    "qwen2_5_vl": _build_qwen2_5_vl,
    "qwen2_vl": _build_qwen2_vl,
    "qwen3_vl": _build_qwen3_vl,
}


def build_tiny(family: str, seed: int = 0):
    """Build ``(model, processor)`` for ``family`` with seeded random weights.

    The model is in eval mode, uses the default attention implementation, and
    has pad/eos/bos set in its generation config so ``generate`` with left
    padding works and survives ``save_pretrained``.
    """
    _check_family(family)
    tok = build_tokenizer(family)
    torch.manual_seed(seed)
    model, processor = _BUILDERS[family](tok)
    gen = model.generation_config
    gen.pad_token_id = tok.pad_token_id
    gen.eos_token_id = tok.eos_token_id
    gen.bos_token_id = tok.bos_token_id
    model.eval()
    return model, processor


def save_tiny(family: str, directory, seed: int = 0) -> pathlib.Path:
    """Build a tiny checkpoint and save model + full processor to ``directory``.

    The result loads with ``AutoModelForImageTextToText``/``AutoProcessor``,
    which is what tools expecting a hub checkpoint path (lmms-eval) need.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model, processor = build_tiny(family, seed=seed)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def load_tiny(directory):
    """Load ``(model, processor)`` saved by ``save_tiny`` through the Auto classes."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(directory)
    model.eval()
    processor = AutoProcessor.from_pretrained(directory)
    return model, processor


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Seeded uniform RGB noise: deterministic test input with no data files."""
    rng = np.random.RandomState(seed)
    arr = rng.randint(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(arr)  # uint8 HxWx3 -> RGB


def build_prompt(processor, question: str, num_images: int = 1) -> str:
    """Single-turn user prompt via the processor's chat template.

    Uses ``{"type": "image"}`` items followed by the text, the same message
    shape lmms-eval's chat wrappers pass, so tests exercise the template path.
    """
    content = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": question})
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
