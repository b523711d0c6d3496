"""The compressor contract and the one registry of compressors.

A compressor is a small dataclass whose fields are its options (defaults from its paper, documented on the field)
and which implements two pure functions:

* ``signals(tower) -> tuple[Signal, ...]`` -- what it needs captured from this vision tower;
* ``select(tokens, k) -> Selection`` -- which ``k`` tokens of one image survive (``1 <= k <= N``).

It never imports a model library; integrations call ``run_compressor`` which resolves the budget and checks the
contract, so every compressor is held to the same rules.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Mapping, TypeVar

import torch

from .budget import Budget, resolve_budget, validate_budget
from .selection import Selection
from .signals import Signal, TowerInfo


@dataclass
class VisualTokens:
    """The visual tokens of one image (or one view / frame) as the LLM would receive them."""

    features: torch.Tensor  # [N, D] post-projector features
    grid: tuple[int, int]  # (rows, cols) of the spatial token grid
    signals: Mapping[Signal, torch.Tensor] = field(default_factory=dict)  # each laid out like ``features``
    query: torch.Tensor | None = None  # [T, D] text embeddings of the prompt, for query-aware methods
    num_prefix_tokens: int = 0  # tokens before the grid (e.g. CLS kept by LLaVA's "full" strategy)

    def __post_init__(self):
        rows, cols = self.grid
        n = self.features.shape[0]
        if self.num_prefix_tokens + rows * cols != n:
            raise ValueError(
                f"grid {rows}x{cols} plus {self.num_prefix_tokens} prefix tokens does not match {n} visual tokens"
            )

    @property
    def num_tokens(self) -> int:
        return int(self.features.shape[0])

    def signal(self, wanted: Signal) -> torch.Tensor:
        try:
            value = self.signals[wanted]
        except KeyError:
            have = ", ".join(map(str, self.signals)) or "none"
            raise KeyError(f"signal {wanted} was not captured (captured: {have}); declare it in signals()") from None
        return value.float()


class Compressor:
    """Base class: subclasses are dataclasses registered with ``@register``."""

    name: ClassVar[str] = ""
    #: True when the compressor needs the text query (the integration then embeds the prompt).
    uses_query: ClassVar[bool] = False
    #: True when the compressor budgets a whole video itself (``vtc.video.VideoCompressor.select_video``); image
    #: compressors run on a video frame by frame, each frame an equal share of the budget.
    handles_video: ClassVar[bool] = False
    #: True when the compressor reads ``VideoTokens.frame_scores``: per-frame relevance the integration computes
    #: with the wrapped model (QuoTA's ``scorer="self"``), which the core cannot. A property may decide it per
    #: instance; the integration then needs the model's processor (``vtc.apply(..., processor=...)``).
    needs_frame_scores: ClassVar[bool] = False
    #: True for compressors that drop tokens inside the LLM (``vtc.inllm.LLMCompressor``: FastV, PyramidDrop,
    #: SparseVLM, DART); False for those that select between encoder and LLM
    acts_in_llm: ClassVar[bool] = False
    #: True for methods defined on the frames of a video (FastVID, VidCom2, DyCoke, EVS): they compare frames, so a
    #: model without a video input is refused unless ``images_as_video=True`` makes each prompt's images the frames.
    #: A single image is still a one-frame video (``select`` keeps exactly ``k`` by the method's one-frame rule).
    video_only: ClassVar[bool] = False

    def signals(self, tower: TowerInfo) -> tuple[Signal, ...]:
        return ()

    def input_grid(self, grid: tuple[int, int], k: int) -> tuple[int, int] | None:
        """The pre-encoder stage: the ``(h, w)`` token grid an image of ``grid`` tokens is resized to *before* the
        vision tower for a budget of ``k`` (``downsample``), or ``None`` (the default: no pre-encoder stage).
        Families whose tower takes any input size resize; the others call ``select`` on the full features."""
        return None

    #: True when the pre-encoder stage is required (a family that cannot resize its input is then refused)
    requires_input_resize: ClassVar[bool] = False

    def select(self, tokens: VisualTokens, k: int) -> Selection:  # pragma: no cover - abstract
        raise NotImplementedError

    def options(self) -> dict:
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}


_REGISTRY: dict[str, type[Compressor]] = {}
C = TypeVar("C", bound=type)


def register(cls: C) -> C:
    """Class decorator: add a compressor dataclass to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name` to be registered")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a compressor named {cls.name!r} is already registered ({_REGISTRY[cls.name].__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def list_compressors(where: str | None = None) -> list[str]:
    """Names of the registered compressors, sorted: all of them, or those acting at ``where`` -- ``"encoder"``
    (between encoder and LLM) or ``"llm"`` (inside the LLM)."""
    if where is None:
        return sorted(_REGISTRY)
    if where not in ("encoder", "llm"):
        raise ValueError(f"where must be 'encoder', 'llm' or None, got {where!r}")
    return sorted(name for name, cls in _REGISTRY.items() if cls.acts_in_llm == (where == "llm"))


def get_compressor_class(name: str) -> type[Compressor]:
    if not isinstance(name, str):
        raise TypeError(f"compressor must be a registered name (one of {list_compressors()}) or a Compressor")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown compressor {name!r}; registered compressors: {', '.join(list_compressors())}") from None


def create_compressor(name: str | Compressor, **options) -> Compressor:
    """Build a compressor from its registry name and options; unknown options name the valid ones.

    Each option is checked against its field's annotation (``vtc.options``): ``seed="a"`` raises
    ``TypeError("compressor 'random': option seed must be an int, got 'a'")``. The compressor's own validation
    (``__post_init__``) speaks first when it names the option; the annotation check covers what it does not.
    """
    from .options import option_type_errors

    if isinstance(name, Compressor):
        if options:
            raise TypeError("options go into the compressor instance itself when passing a Compressor object")
        return name
    cls = get_compressor_class(name)
    valid = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    unknown = sorted(set(options) - valid)
    if unknown:
        raise TypeError(
            f"unknown option(s) {unknown} for compressor {name!r}; valid options: {sorted(valid) or 'none'}"
        )
    wrong = option_type_errors(cls, options, f"compressor {name!r}")
    try:
        compressor = cls(**options)
    except (TypeError, ValueError) as exc:
        if wrong and not any(key in str(exc) for key in wrong):
            raise TypeError(next(iter(wrong.values()))) from exc
        raise
    if wrong:
        raise TypeError(next(iter(wrong.values())))
    return compressor


def run_compressor(compressor: Compressor, tokens: VisualTokens, budget: Budget) -> Selection:
    """Resolve the budget for this image, run the compressor and check what it returned."""
    k = resolve_budget(validate_budget(budget), tokens.num_tokens)
    selection = compressor.select(tokens, k)
    return selection.validate(tokens.num_tokens, expected=k, who=f"compressor {compressor.name!r}")


def find_signal(tokens: VisualTokens, kinds, layer: int | None, who: str, what: str) -> Signal:
    """The one captured signal of ``kinds`` in ``tokens`` -- ``select`` is not told the tower, so it matches by kind;
    a non-negative ``layer`` option narrows the match to that layer. ``who`` / ``what`` name the compressor and the
    signal in the errors (none captured: ``KeyError``; several: ``ValueError`` asking for ``layer``)."""
    found = [s for s in tokens.signals if s.kind in kinds]
    if layer is not None and layer >= 0:
        found = [s for s in found if s.layer == layer]
    if len(found) == 1:
        return found[0]
    have = ", ".join(map(str, tokens.signals)) or "none"
    if not found:
        raise KeyError(f"{who} needs the {what} signal, which was not captured (captured: {have})")
    raise ValueError(f"{who} found several {what} signals ({have}); set the `layer` option to pick one")


def top_k_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, returned in ascending token order.

    Ties are broken towards the lower index (a stable descending sort), so selections are deterministic across
    platforms -- ``torch.topk`` does not promise any tie order.
    """
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    return torch.sort(order[:k]).values
