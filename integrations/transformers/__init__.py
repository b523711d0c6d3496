"""vtc for Hugging Face transformers (5.x): per-instance, reversible wrapping of a VLM's generate/forward.

Like PEFT, wrapping touches only the given model instance: ``generate`` and ``forward`` become instance attributes
(``cut.WrappedMethod``) around whatever the instance resolved them to -- the class methods, or an instance-level
``forward`` already there, such as accelerate's hook from ``device_map=`` / ``dispatch_model`` / ``cpu_offload`` --
and ``remove`` puts exactly that back, so the class and every other instance stay untouched and the model is
bit-identical to before. Hooks exist only during a wrapped call. ``copy.deepcopy`` and pickling carry the wrapping
to the copy, bound to the copy's own weights and selection records.
"""

from __future__ import annotations

from vtc.allocation import create_allocation
from vtc.budget import Budget, validate_budget
from vtc.compressor import create_compressor
from vtc.inllm import LLMCompressor, LLMSelection
from vtc.selection import ImageSelection, SelectionRecords
from vtc.video import VideoRecord

from . import families as _families  # noqa: F401  (registers the built-in family adapters)
from .adapter import (
    FamilyAdapter,
    TinyModel,
    adapter_for,
    register_adapter,
    register_tiny,
    supported_families,
    unregister_adapter,
)
from .cut import STATE_ATTR as _STATE_ATTR
from .cut import CutState, unwrap, wrap

#: the options ``apply`` takes itself; every other keyword is the compressor's (``preflight`` splits requests by it)
_INTEGRATION_OPTIONS = ("positions", "allocation", "video_budget", "processor", "decouple_query", "images_as_video",
                        "encoder")


def apply(model, compressor="cls_attention", budget: Budget = 64, **options):
    """Wrap ``model`` in place; see ``vtc.apply``. Re-applying replaces the previous configuration.

    Integration options: ``positions`` (the family's position policy) and, for AnyRes families (LLaVA-NeXT,
    LLaVA-OneVision), ``allocation`` -- how an image's budget is split over its views: ``"even"`` (default),
    ``"hired"``, ``"globalcom2"`` or a ``vtc.allocation.Allocation`` instance (see ``vtc.allocation``);
    ``video_budget`` -- the budget of each video over all its frames (int tokens or float fraction; default: the same
    value as ``budget``); ``processor`` -- the model's processor (or tokenizer), needed by QuoTA's ``scorer="self"``
    (the wrapped model rates each frame's relevance, ``frame_scorer``), with ``decouple_query=True`` to first ask it
    which objects the question is about; ``images_as_video=True`` -- the images of each prompt are the frames of
    one video sharing ``video_budget`` (for models that see a video as an image sequence, e.g. LLaVA-1.5 and vtc's
    embedded default model).
    """
    budget = validate_budget(budget)
    own = {key: options.pop(key) for key in _INTEGRATION_OPTIONS if key in options}
    video_budget = own.get("video_budget")
    if video_budget is not None:
        video_budget = validate_budget(video_budget)
    processor = own.get("processor")
    decouple_query = own.get("decouple_query", False)
    frame_scorer = None
    if processor is not None:
        from .frame_scorer import SelfFrameScorer

        frame_scorer = SelfFrameScorer(processor, decouple=bool(decouple_query))
    elif decouple_query:
        raise ValueError("decouple_query=True asks the model a question in words, which needs processor=processor")
    images_as_video = own.get("images_as_video", False)
    if not isinstance(images_as_video, bool):
        raise TypeError(f"images_as_video must be True or False, got {images_as_video!r}")
    adapter = adapter_for(model)
    positions = own.get("positions") or adapter.position_modes[0]
    if positions not in adapter.position_modes:
        raise ValueError(
            f"positions={positions!r} is not available for {adapter.family}; choose one of {adapter.position_modes}"
        )
    allocation = create_allocation(own.get("allocation"))
    if allocation.name != "even" and not adapter.multi_view:
        raise ValueError(
            f"allocation={allocation.name!r} splits the budget of an AnyRes image over its views (base + crops), "
            f"but {adapter.family} images have a single view; use it with LLaVA-NeXT / LLaVA-OneVision, or leave "
            "allocation unset"
        )
    compressor_obj = create_compressor(compressor, **options)
    llm, llm_budget, encoder_cut = None, None, True
    if isinstance(compressor_obj, LLMCompressor):
        llm, llm_budget = compressor_obj, budget
        _check_llm_schedule(adapter, llm, budget)
        stacked = own.get("encoder")
        if stacked is None:
            encoder_cut = False
            for key, fine in (("images_as_video", False), ("allocation", None), ("positions", None)):
                if own.get(key, fine) not in (fine, None) and not (key == "positions" and own[key] == "keep"):
                    raise ValueError(f"{key}={own[key]!r} configures the cut between encoder and LLM, which "
                                     f"{compressor_obj.name!r} does not make (it drops tokens inside the LLM, keeping "
                                     "their positions); stack an encoder-side compressor with encoder=(name, budget) "
                                     "to use it")
        else:
            compressor_obj, budget = _encoder_stage(stacked)
    elif own.get("encoder") is not None:
        raise ValueError(f"encoder=(compressor, budget) stacks an encoder-side compressor under an LLM-side one "
                         f"(fastv, pdrop, sparsevlm, dart); {compressor_obj.name!r} already acts between encoder "
                         "and LLM")
    if compressor_obj.video_only and not adapter.supports_video and adapter.multi_view:
        raise ValueError(f"{compressor_obj.name!r} compresses videos (it compares frames), but {adapter.family} has no "
                         "video input and its images are AnyRes views (several per image), not frames; use a model "
                         "with a video input or an image compressor")
    if compressor_obj.video_only and not adapter.supports_video and not images_as_video:
        raise ValueError(f"{compressor_obj.name!r} compresses videos (it compares frames), but {adapter.family} has no "
                         "video input; pass images_as_video=True to treat the images of each prompt as the frames "
                         "of one video, or choose an image compressor")
    if compressor_obj.requires_input_resize and (not adapter.can_resize_inputs or images_as_video):
        why = ("treats each image as a frame of one video (images_as_video=True)" if adapter.can_resize_inputs
               else f"{adapter.family} has a vision tower with a fixed input size")
        raise ValueError(f"{compressor_obj.name!r} with mode='resize' resizes the pictures before the encoder, but "
                         f"this model {why}; use mode='auto' (pools the features where it cannot resize) or "
                         "mode='pool'")
    # fail now, not at the first generate, when the compressor (or the allocation) cannot run on this tower
    compressor_obj.signals(adapter.tower_info())
    allocation.signals(adapter.tower_info())
    if is_applied(model):
        remove(model)
    state = CutState(
        adapter=adapter,
        compressor=compressor_obj,
        budget=budget,
        llm=llm,
        llm_budget=llm_budget,
        llm_video_budget=video_budget if llm is not None else None,
        encoder_cut=encoder_cut,
        positions=positions,
        allocation=allocation,
        video_budget=video_budget,
        frame_scorer=frame_scorer,
        images_as_video=images_as_video,
    )
    wrap(model, state)
    return model


def _encoder_stage(stacked) -> tuple:
    """``encoder=(compressor, budget)``: the encoder-side compressor (a name or an instance) that runs first."""
    if not isinstance(stacked, (tuple, list)) or len(stacked) != 2:
        raise TypeError("encoder must be a (compressor, budget) pair, e.g. encoder=('visionzip', 192), or "
                        f"(vtc.create_compressor('visionzip', ...), 192); got {stacked!r}")
    name, stage_budget = stacked
    stage_budget = validate_budget(stage_budget)
    obj = create_compressor(name)
    if isinstance(obj, LLMCompressor):
        raise ValueError(f"encoder=({obj.name!r}, ...) must be an encoder-side compressor; {obj.name!r} acts inside "
                         "the LLM (stack one LLM-side compressor on one encoder-side compressor)")
    return obj, stage_budget


def _check_llm_schedule(adapter, llm, budget) -> None:
    """Fail at ``apply`` when the schedule cannot run on this LLM: drop layers beyond its depth or before the
    family allows, a budget with no schedule, a budget above a fixed image token count."""
    num_layers = len(adapter.language_model().layers)
    fixed = adapter.fixed_image_tokens()
    if fixed is not None and isinstance(budget, int) and budget > fixed and llm.name != "sparsevlm":
        raise ValueError(f"budget {budget} is more than the {fixed} visual tokens of each image of this model; "
                         f"pass at most {fixed} (or a fraction such as 0.25)")
    if fixed is not None:
        llm.schedule(fixed, num_layers, budget, adapter.llm_first_layer())
        return
    try:  # the images' token counts are not known yet: a nominal 576 checks the layers and the budget's form
        llm.schedule(576, num_layers, budget, adapter.llm_first_layer())
    except ValueError:
        llm.schedule(576, num_layers, 1.0, adapter.llm_first_layer())  # raises when the layers are at fault


def remove(model):
    """Undo ``apply`` (a no-op on a model that is not wrapped); returns the model."""
    if is_applied(model):
        unwrap(model)
    return model


def position_modes(model) -> tuple[str, ...]:
    """See ``vtc.position_modes``."""
    modes = adapter_for(model).position_modes
    state = getattr(model, "__dict__", {}).get(_STATE_ATTR)
    if isinstance(state, CutState):
        return (state.positions,) + tuple(m for m in modes if m != state.positions)
    return tuple(modes)


def is_applied(model) -> bool:
    return isinstance(getattr(model, "__dict__", {}).get(_STATE_ATTR), CutState)


def last_selection(model) -> list[ImageSelection]:
    state = getattr(model, "__dict__", {}).get(_STATE_ATTR)
    if state is None:
        raise ValueError("this model is not wrapped by vtc; call vtc.apply(model, ...) first")
    return list(state.records)


def select(model, **inputs) -> SelectionRecords:
    """Dry run on a wrapped model: the records of a call with ``inputs``, without the LLM (see ``cut.dry_run``)."""
    from .cut import dry_run

    return dry_run(get_state(model), inputs)


def last_llm_selection(model) -> list[LLMSelection]:
    return list(get_state(model).llm_records)


def last_video_selection(model) -> list[VideoRecord]:
    return list(get_state(model).video_records)


def last_prompt_lengths(model) -> list[tuple[int, int]]:
    return list(get_state(model).prompt_lengths)


def get_state(model) -> CutState:
    state = getattr(model, "__dict__", {}).get(_STATE_ATTR)
    if state is None:
        raise ValueError("this model is not wrapped by vtc; call vtc.apply(model, ...) first")
    return state


__all__ = ["FamilyAdapter", "TinyModel", "apply", "get_state", "is_applied", "last_llm_selection",
           "last_prompt_lengths", "last_selection", "last_video_selection", "position_modes", "register_adapter",
           "register_tiny", "remove", "select", "supported_families", "unregister_adapter"]
