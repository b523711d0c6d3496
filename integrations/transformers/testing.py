"""Tiny, fully offline checkpoints of every registered family for tests and benchmarks (``vtc.testing``).

No model hub is reachable, so everything here (tokenizer, chat template, image processors, configs, random weights)
is built in code. Models are small enough that one is built in tens of milliseconds on CPU, yet they keep the parts
that token compression touches: real vision-token grids, the families' layouts and positions, left padding and
multi-image prompts. ``save_tiny`` / ``load_tiny`` produce an on-disk checkpoint that ``AutoModelForImageTextToText``
and ``AutoProcessor`` (and so lmms-eval's HF wrappers) can load like a real one.

Nothing here knows a family: each family's file in ``families/`` registers its ``TinyModel`` (``register_tiny``: its
builder, placeholder tokens, chat template and test image sizes, with the token counts those sizes give documented
next to the builder), and this module assembles the shared parts (tokenizer, seeding, saving, prompts, images). The
family lists below are read from the registry when this module is imported.
"""

from __future__ import annotations

import contextvars
import pathlib
from collections.abc import Mapping

import numpy as np
import torch
import transformers
from PIL import Image
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from .adapter import adapter_class, tiny_families, tiny_model

__all__ = [
    "FAMILIES",
    "QWEN_FAMILIES",
    "VIDEO_FAMILIES",
    "ANYRES_FAMILIES",
    "LLAVA_FAMILIES",
    "IMAGE_SIZES",
    "families",
    "word_level_tokenizer",
    "build_tokenizer",
    "tiny_text_config",
    "build_tiny",
    "save_tiny",
    "load_tiny",
    "random_image",
    "build_prompt",
]


def families(**traits) -> tuple[str, ...]:
    """The registered families with a tiny model, in registration order; ``traits`` keep those whose adapter class
    has these attribute values (e.g. ``families(multi_view=True)``)."""
    return tuple(f for f in tiny_families()
                 if all(getattr(adapter_class(f), name) == value for name, value in traits.items()))


#: every family with a tiny model (a family registered later, e.g. by a test, is not in these tuples)
FAMILIES = families()
#: families with M-RoPE positions (the Qwen-VL style: ``image_grid_thw`` inputs, kept tokens keep their ids)
QWEN_FAMILIES = families(mrope=True)
#: families with 1-D positions (the LLaVA style: ``pixel_values`` per image or per view)
LLAVA_FAMILIES = families(mrope=False)
#: families whose videos vtc compresses (``pixel_values_videos``)
VIDEO_FAMILIES = families(supports_video=True)
#: AnyRes families: an image is a base view plus crops, packed with image_newline tokens
ANYRES_FAMILIES = families(multi_view=True)


class _ImageSizes(Mapping):
    """family -> the ``(width, height)`` test image sizes of its tiny model, read from the registry on access."""

    def __getitem__(self, family: str) -> list[tuple[int, int]]:
        return list(tiny_model(family).image_sizes)

    def __iter__(self):
        return iter(tiny_families())

    def __len__(self) -> int:
        return len(tiny_families())


#: ``IMAGE_SIZES[family]``: the sizes tests give its images, in turn (see each family's ``register_tiny``)
IMAGE_SIZES = _ImageSizes()

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
    """The tiny models' tokenizer: test words, digits and punctuation plus the family's placeholder tokens, with its
    chat template (see ``word_level_tokenizer``)."""
    tiny = tiny_model(family)
    return word_level_tokenizer(_BASE_SPECIALS + tuple(tiny.placeholders), _WORDS + _DIGITS + _PUNCT,
                                tiny.chat_template)


_TEXT_LAYERS: contextvars.ContextVar[int | None] = contextvars.ContextVar("vtc_tiny_text_layers", default=None)


def tiny_text_config(config_cls, tok, **overrides):
    """A tiny LLM config of ``config_cls`` (width 64, 2 layers, 4 heads over 2 KV heads) for ``tok``'s vocabulary;
    ``overrides`` replace or add fields (``config_cls=dict`` gives the fields as a dict)."""
    fields = dict(
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
    fields.update(overrides)
    if _TEXT_LAYERS.get() is not None:  # build_tiny(..., text_layers=n)
        fields["num_hidden_layers"] = _TEXT_LAYERS.get()
    return config_cls(**fields)


def build_tiny(family: str, seed: int = 0, text_layers: int | None = None):
    """Build ``(model, processor)`` for ``family`` with seeded random weights (``text_layers``: an LLM of that many
    layers instead of the family's tiny default, for LLM-side compressors, which drop at layer 2 and later).

    The model is in eval mode, uses the default attention implementation, and
    has pad/eos/bos set in its generation config so ``generate`` with left
    padding works and survives ``save_pretrained``.
    """
    tok = build_tokenizer(family)
    torch.manual_seed(seed)
    token = _TEXT_LAYERS.set(text_layers)
    try:
        model, processor = tiny_model(family).build(tok)
    finally:
        _TEXT_LAYERS.reset(token)
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
