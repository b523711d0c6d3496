"""The embedded default model: a small LLaVA trained here on synthetic shapes, shipped inside the package.

It lets the main command, the evaluation harness and the demo show real behaviour with no download: its CLS
attention lands on objects, and pruning the wrong tokens costs accuracy. ``python -m vtc.eval.default_model.train``
reproduces it; docs/default_model.md is its card (data, training, size, accuracy, limits).
"""

from __future__ import annotations

import pathlib

#: Package data: a ``save_pretrained`` folder (fp16 safetensors + processor files + training summary).
DEFAULT_MODEL_DIR = pathlib.Path(__file__).with_name("default_model")
DEFAULT_MODEL_NAME = "vtc-shapes-llava (embedded default)"


def load_default(path=None, *, dtype=None):
    """``(model, processor)`` of the embedded default model (or of a folder written by
    ``vtc.eval.default_model.train``).

    Weights are stored in fp16 and loaded as float32 unless ``dtype`` says otherwise (fp16 matmuls are slow or
    missing on many CPUs). The model is in eval mode.
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = pathlib.Path(path) if path is not None else DEFAULT_MODEL_DIR
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"no model found in {folder} (config.json and model.safetensors are needed). The embedded default "
            "ships inside the vtc package: reinstall vtc, or train one with "
            "`python -m vtc.eval.default_model.train --out DIR` and pass that folder."
        )
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype or torch.float32)
    model.eval()
    processor = AutoProcessor.from_pretrained(folder)
    return model, processor


def unknown_words(processor, text: str) -> list[str]:
    """Words of ``text`` that the model's tokenizer maps to its unknown token, each once, in order of appearance.

    The embedded default model has a word-level vocabulary of 103 lowercase words (``what color is the shape at
    the center ?``): any other word -- a capital letter, a synonym, a typo -- reaches it as ``<unk>`` and the
    answer is a guess. Works for any tokenizer with an unknown token (byte-level BPE never produces one: ``[]``).
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not text:
        return []
    words: list[str] = []
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        pieces = [text[start:end] for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"])
                  if token == unk]
    except (NotImplementedError, TypeError, ValueError, KeyError):  # a slow tokenizer: no offsets
        pieces = [word for word in text.split() if unk in tokenizer.encode(word, add_special_tokens=False)]
    for piece in pieces:
        if piece and piece not in words:
            words.append(piece)
    return words


def unknown_words_message(processor, text: str) -> str | None:
    """One line naming the words of ``text`` the model does not know (``unknown_words``), or ``None``."""
    words = unknown_words(processor, text)
    if not words:
        return None
    tokenizer = getattr(processor, "tokenizer", processor)
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    hints = [f"{w.lower()!r} for {w!r}" for w in words if w.lower() != w and w.lower() in vocab]
    hint = f" (it knows {', '.join(hints)})" if hints else ""
    listed = ", ".join(map(repr, words))
    return (f"the model does not know the word{'s' if len(words) > 1 else ''} {listed}{hint}: "
            f"{'they reach' if len(words) > 1 else 'it reaches'} it as an unknown token, so the answer is a guess")
