"""vtc -- training-free visual-token compression for multimodal LLMs.

    import vtc
    vtc.apply(model, "cls_attention", budget=64)   # wrap a Hugging Face VLM in place (reversible)
    model.generate(**inputs)                       # the LLM now sees 64 visual tokens per image
    vtc.last_selection(model)                      # what was kept, per image
    vtc.select(model, **inputs)                    # the same records without running the LLM (a dry run)
    vtc.remove(model)                              # bit-identical original behaviour again

The core (this package) is pure tensor code; model knowledge lives in ``vtc.integrations``.
"""

from __future__ import annotations

from . import allocation, inllm, layout, video, video_io  # noqa: F401  (vtc.allocation.HiRED(...), vtc.layout.PackedLayout)
from . import compressors as _builtin_compressors  # noqa: F401  (registers the built-in compressors)
from .budget import Budget, parse_budget, resolve_budget, validate_budget
from .compressor import (
    Compressor,
    VisualTokens,
    create_compressor,
    get_compressor_class,
    list_compressors,
    register,
    run_compressor,
    top_k_sorted,
)
from .selection import Details, ImageSelection, Selection, SelectionRecords
from .signals import Signal, SignalKind, TowerInfo

__version__ = "0.1.0"


def apply(model, compressor="cls_attention", budget: Budget = 64, **options):
    """Wrap ``model`` (a supported Hugging Face VLM) in place so its visual tokens are compressed; returns it.

    ``compressor`` is a registry name (see ``list_compressors()``) or a ``Compressor`` instance; ``budget`` is an
    int (tokens kept per image) or a float in (0, 1] (fraction kept). Integration options (e.g.
    ``positions="keep"``; for AnyRes models ``allocation="hired"``, see ``vtc.allocation``) and compressor options
    (e.g. ``start_layer=16``) are passed as keywords. Applying to an already wrapped model replaces its configuration
    (it never stacks two wrappers). On LLaVA-NeXT / OneVision the budget counts an image's visual tokens over all
    its views; newline tokens are layout, kept with their rows (``vtc.layout``).

    LLM-side compressors (``list_compressors("llm")``: ``fastv``, ``pdrop``, ``sparsevlm``, ``dart``) drop visual
    tokens *inside* the LLM at the layers of their schedule, with the attention implementation the model has, at
    any batch size; what ``budget`` means for each (tokens after the last drop, or visual tokens per LLM layer on
    average) is its ``budget_mode`` (docs/methods/). ``encoder=(compressor, budget)`` runs an encoder-side
    compressor first, e.g. ``vtc.apply(model, "fastv", budget=64, encoder=("visionzip", 192))``;
    ``last_llm_selection`` records each drop.
    """
    from .integrations.transformers import apply as _apply

    return _apply(model, compressor, budget, **options)


def remove(model):
    """Undo ``apply``: the model behaves bit-identically to before; returns it."""
    from .integrations.transformers import remove as _remove

    return _remove(model)


def last_selection(model) -> list[ImageSelection]:
    """Per image of the last wrapped call: kept indices, grid, budget and scores (empty before any call)."""
    from .integrations.transformers import last_selection as _last

    return _last(model)


def select(model, **inputs) -> SelectionRecords:
    """Dry run: what a wrapped ``generate`` / ``forward`` with these processor outputs would select, without the LLM.

    Runs the vision tower, the signal capture and the selection -- the same code as a wrapped call -- and returns a
    ``SelectionRecords``: ``images`` (as ``last_selection``), ``videos`` (as ``last_video_selection``) and
    ``prompt_lengths`` (as ``last_prompt_lengths``), for analysis, plots and overlays. ``model`` must be wrapped
    (``apply``). It leaves the model's last-call records untouched, and runs the LLM only where the selection itself
    asks it (QuoTA's ``scorer="self"``). Each record's ``selection.details`` says what the compressor decided and why.
    """
    from .integrations.transformers import select as _select

    return _select(model, **inputs)


def last_video_selection(model):
    """Per video of the last wrapped call: each frame's budget, score and kept / merged tokens
    (``vtc.video.VideoRecord``; empty before any call with videos)."""
    from .integrations.transformers import last_video_selection as _last_video

    return _last_video(model)


def last_llm_selection(model):
    """Per image of the last wrapped call under an LLM-side compressor (FastV, PyramidDrop, SparseVLM, DART): the
    visual tokens' prompt positions and, per drop, its layer and the kept indices (``vtc.inllm.LLMSelection``; its
    ``average_tokens`` is the papers' per-layer budget). Empty for encoder-side compressors and calls without
    images."""
    from .integrations.transformers import last_llm_selection as _last_llm

    return _last_llm(model)


def last_prompt_lengths(model) -> list[tuple[int, int]]:
    """Per prompt of the last wrapped call: ``(tokens it had, tokens the LLM received)``, padding excluded.

    Text is always kept, so the difference is the visual tokens pruned (or merged away); a call without images or
    videos gives equal pairs.
    """
    from .integrations.transformers import last_prompt_lengths as _lengths

    return _lengths(model)


def load_default(path=None, *, dtype=None):
    """``(model, processor)`` of the embedded default model: a small LLaVA trained on synthetic shapes (no download).

    ``path`` loads a folder written by ``python -m vtc.eval.default_model.train`` instead.
    """
    from .integrations.transformers.default import load_default as _load_default

    return _load_default(path, dtype=dtype)


def is_applied(model) -> bool:
    from .integrations.transformers import is_applied as _is_applied

    return _is_applied(model)


#: what each ``positions=`` mode does to the position ids of the kept visual tokens
POSITION_MODES = {"reindex": "kept tokens renumbered, as the papers' LLaVA code does",
                  "keep": "kept tokens keep their original position ids"}


def position_modes(model) -> tuple[str, ...]:
    """The ``positions=`` values ``apply`` accepts for this model's family; the first is the one used when
    ``positions`` is not given (``"reindex"`` on the LLaVA families, as the papers' reference code does; ``"keep"``
    on the Qwen-VL families, whose M-RoPE ids locate each token). With ``model`` wrapped, the mode in use comes
    first."""
    from .integrations.transformers import position_modes as _modes

    return _modes(model)


__all__ = [
    "POSITION_MODES",
    "Budget",
    "Compressor",
    "Details",
    "ImageSelection",
    "Selection",
    "SelectionRecords",
    "Signal",
    "SignalKind",
    "TowerInfo",
    "VisualTokens",
    "apply",
    "create_compressor",
    "get_compressor_class",
    "is_applied",
    "last_llm_selection",
    "last_prompt_lengths",
    "last_selection",
    "last_video_selection",
    "list_compressors",
    "load_default",
    "parse_budget",
    "position_modes",
    "register",
    "remove",
    "resolve_budget",
    "run_compressor",
    "select",
    "top_k_sorted",
    "validate_budget",
]
