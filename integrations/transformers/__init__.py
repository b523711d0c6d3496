"""vtc for Hugging Face transformers (5.x): per-instance, reversible wrapping of a VLM's generate/forward.

Like PEFT, wrapping touches only the given model instance: ``generate`` and ``forward`` become instance attributes
that delegate to the class methods, and ``remove`` deletes them again, so the class and every other instance stay
untouched and the model is bit-identical to before. Hooks exist only during a wrapped call.
"""

from __future__ import annotations

from vtc.budget import Budget, validate_budget
from vtc.compressor import create_compressor
from vtc.selection import ImageSelection

from .adapter import FamilyAdapter, adapter_for, supported_families
from .cut import CutState, wrap_forward, wrap_generate

_STATE_ATTR = "_vtc_state"
_INTEGRATION_OPTIONS = ("positions",)


def apply(model, compressor="cls_attention", budget: Budget = 64, **options):
    """Wrap ``model`` in place; see ``vtc.apply``. Re-applying replaces the previous configuration."""
    budget = validate_budget(budget)
    adapter = adapter_for(model)
    positions = options.pop("positions", None) or adapter.position_modes[0]
    if positions not in adapter.position_modes:
        raise ValueError(
            f"positions={positions!r} is not available for {adapter.family}; choose one of {adapter.position_modes}"
        )
    compressor_obj = create_compressor(compressor, **options)
    # fail now, not at the first generate, when the compressor cannot run on this tower
    compressor_obj.signals(adapter.tower_info())
    if is_applied(model):
        remove(model)
    state = CutState(
        adapter=adapter,
        compressor=compressor_obj,
        budget=budget,
        positions=positions,
        original_generate=model.generate,
        original_forward=model.forward,
    )
    setattr(model, _STATE_ATTR, state)
    model.generate = wrap_generate(state)
    model.forward = wrap_forward(state)
    return model


def remove(model):
    """Undo ``apply`` (a no-op on a model that is not wrapped); returns the model."""
    if not is_applied(model):
        return model
    for name in ("generate", "forward", _STATE_ATTR):
        if name in model.__dict__:
            delattr(model, name)
    return model


def is_applied(model) -> bool:
    return isinstance(getattr(model, "__dict__", {}).get(_STATE_ATTR), CutState)


def last_selection(model) -> list[ImageSelection]:
    state = getattr(model, "__dict__", {}).get(_STATE_ATTR)
    if state is None:
        raise ValueError("this model is not wrapped by vtc; call vtc.apply(model, ...) first")
    return list(state.records)


def get_state(model) -> CutState:
    state = getattr(model, "__dict__", {}).get(_STATE_ATTR)
    if state is None:
        raise ValueError("this model is not wrapped by vtc; call vtc.apply(model, ...) first")
    return state


__all__ = ["FamilyAdapter", "apply", "get_state", "is_applied", "last_selection", "remove", "supported_families"]
