"""The embedded default model: a small LLaVA trained here on synthetic shapes, shipped inside the package.

It lets the main command, the evaluation harness and the demo show real behaviour with no download: its CLS
attention lands on objects, and pruning the wrong tokens costs accuracy. ``python -m vtc.eval.train_default``
reproduces it; the README's "Embedded default model" section is its card (data, training, size, accuracy, limits).
"""

from __future__ import annotations

import pathlib

#: Package data: a ``save_pretrained`` folder (fp16 safetensors + processor files + training summary).
DEFAULT_MODEL_DIR = pathlib.Path(__file__).with_name("default_model")
DEFAULT_MODEL_NAME = "vtc-shapes-llava (embedded default)"


def default_model_path() -> pathlib.Path:
    return DEFAULT_MODEL_DIR


def load_default(path=None, *, dtype=None):
    """``(model, processor)`` of the embedded default model (or of a folder written by ``train_default``).

    Weights are stored in fp16 and loaded as float32 unless ``dtype`` says otherwise (fp16 matmuls are slow or
    missing on many CPUs). The model is in eval mode.
    """
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = pathlib.Path(path) if path is not None else DEFAULT_MODEL_DIR
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"no model found in {folder} (config.json and model.safetensors are needed). The embedded default "
            "ships inside the vtc package: reinstall vtc, or train one with "
            "`python -m vtc.eval.train_default --out DIR` and pass that folder."
        )
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype or torch.float32)
    model.eval()
    processor = AutoProcessor.from_pretrained(folder)
    return model, processor
