"""How an AnyRes image's budget is split over its views (base view + crops): pure tensor code, no model imports.

The image budget counts visual tokens only (newlines are layout, ``vtc.layout``). An allocation turns it into
per-view budgets that sum exactly to it, each capped at its view's visible tokens (overflow redistributed; a view
may get 0 and is dropped); then each view is selected on its own grid (``vtc.multiview.select_views``). Strategies:
``even`` (default), ``hired`` (HiRED, arXiv 2408.10945) and ``globalcom2`` (GlobalCom², arXiv 2501.05179); towers
without CLS read received attention instead; ``holov`` (HoloV, arXiv 2510.02912) is registered with its compressor in
``vtc.compressors.holov``. See docs/methods/allocation.md, hired.md, globalcom2.md and holov.md.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Sequence

import torch
import torch.nn.functional as F

from .budget_split import even_budgets, split_budget
from .compressor import top_k_sorted
from .selection import Details, Selection
from .signals import Signal, SignalKind, TowerInfo

if TYPE_CHECKING:  # pragma: no cover
    from .multiview import MultiViewTokens


# ==================================================================================================== pure functions
def region_sums(scores: torch.Tensor, regions: torch.Tensor, num_views: int) -> torch.Tensor:
    """``[num_views]``: the sum of ``scores`` over the base tokens assigned to each view (``regions``; -1 = none)."""
    out = torch.zeros(num_views, dtype=torch.float64)
    valid = regions >= 0
    out.index_add_(0, regions[valid].cpu(), scores.double().cpu()[valid])
    return out


def hired_budgets(total: int, sizes: Sequence[int], base_scores: torch.Tensor, regions: torch.Tensor,
                  alpha: float = 0.5, rule: str = "paper") -> list[int]:
    """HiRED's per-view budgets (view 0 = the base view; docs/methods/hired.md).

    ``base_scores``: ``[N_base]`` early-layer CLS attention of the base view; ``regions``: the crop each base token
    corresponds to (``PackedLayout.base_regions``: "spatial" for ``rule="paper"``, "bands" for ``rule="code"``).
    """
    if rule not in ("paper", "code"):
        raise ValueError(f"hired rule must be 'paper' or 'code', got {rule!r}")
    sizes = [int(s) for s in sizes]
    total = min(int(total), sum(sizes))
    base = min(int(math.floor(total * alpha)), sizes[0])
    scores = base_scores.double().reshape(-1).cpu()
    if rule == "code":  # count the top int(N * (1 - alpha)) base tokens per region
        top = top_k_sorted(scores, min(int(scores.numel() * (1 - alpha)), scores.numel()))
        mask = torch.zeros_like(scores)
        mask[top] = 1.0
        scores = mask
    weights = region_sums(scores, regions, len(sizes))[1:].clamp(min=0)
    crops = split_budget(total - base, weights, sizes[1:])
    base += total - base - sum(crops)  # what the crops cannot hold goes back to the base view
    return [base] + crops


def globalcom2_sigma(region_scores: torch.Tensor, tau: float = 10.0) -> torch.Tensor:
    """``softmax((S - max S) / tau)`` over the crops' region scores (GlobalCom²'s crop weights)."""
    s = region_scores.double()
    return torch.softmax((s - s.max()) / tau, dim=0)


def globalcom2_budgets(total: int, sizes: Sequence[int], sigma: torch.Tensor) -> list[int]:
    """Budgets in proportion to ``N_base`` (ratio ``R``) and ``V_i * (1 + sigma_i - 1/n)`` (ratio ``R * (...)``)."""
    sizes = [int(s) for s in sizes]
    n = len(sizes) - 1
    weights = [float(sizes[0])] + [v * max(0.0, 1.0 + float(s) - 1.0 / n) for v, s in zip(sizes[1:], sigma.tolist())]
    return split_budget(total, weights, sizes)


def guided_scores(local: torch.Tensor, global_part: torch.Tensor) -> torch.Tensor:
    """GlobalCom²'s crop token score: L2-normalised local scores plus L2-normalised global (thumbnail) scores."""
    local = F.normalize(local.float().reshape(-1), dim=0)
    global_part = F.normalize(global_part.float().reshape(-1).to(local.device), dim=0)
    return local + global_part


def resize_map(scores: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``) of a ``rows x cols`` score map to ``size``."""
    if size[0] == 0 or size[1] == 0:
        return scores.new_zeros(size, dtype=torch.float32)
    image = scores.float().reshape(1, 1, *grid)
    return F.interpolate(image, size=list(size), mode="bilinear", align_corners=False)[0, 0]


# ==================================================================================================== strategies
class Allocation:
    """Base class of the allocation strategies (dataclasses registered with ``register_allocation``)."""

    name: ClassVar[str] = ""

    def signals(self, tower: TowerInfo) -> tuple[Signal, ...]:
        """Signals the strategy reads (captured on every view, next to the compressor's)."""
        return ()

    def budgets(self, image: "MultiViewTokens", k: int) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def select_view(self, image: "MultiViewTokens", view: int, k: int) -> Selection | None:
        """The strategy's own selection of ``k`` tokens of ``view``; ``None`` lets the compressor select."""
        return None

    def options(self) -> dict:
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}


_ALLOCATIONS: dict[str, type[Allocation]] = {}


def register_allocation(cls):
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name` to be registered")
    if cls.name in _ALLOCATIONS and _ALLOCATIONS[cls.name] is not cls:
        raise ValueError(f"an allocation named {cls.name!r} is already registered")
    _ALLOCATIONS[cls.name] = cls
    return cls


def list_allocations() -> list[str]:
    return sorted(_ALLOCATIONS)


def create_allocation(spec: "str | Allocation | None" = None) -> Allocation:
    """An allocation from its name (``"even"``, ``"hired"``, ``"globalcom2"``, ``"holov"``) or an instance; ``None`` =
    even."""
    if spec is None:
        return Even()
    if isinstance(spec, Allocation):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"allocation must be one of {list_allocations()} or an Allocation instance, got {spec!r}")
    try:
        return _ALLOCATIONS[spec]()
    except KeyError:
        raise ValueError(f"unknown allocation {spec!r}; choose one of {', '.join(list_allocations())} "
                         "(options through an instance, e.g. vtc.allocation.HiRED(alpha=0.4))") from None


def _score(image: "MultiViewTokens", view: int, signal: Signal) -> torch.Tensor:
    return image.view_signal(view, signal)


def _attention_signal(tower: TowerInfo, layer: int) -> Signal:
    return tower.attention_signal(layer)


def _logit_signal(tower: TowerInfo, layer: int) -> Signal:
    kind = SignalKind.CLS_LOGITS if tower.has_cls else SignalKind.RECEIVED_ATTENTION
    return Signal(kind, tower.layer_index(layer))


def _as_logits(signal: Signal, value: torch.Tensor) -> torch.Tensor:
    if signal.kind == SignalKind.RECEIVED_ATTENTION:  # no-CLS fallback: the log of a probability is a logit
        return value.float().clamp(min=torch.finfo(torch.float32).tiny).log()
    return value.float()


@register_allocation
@dataclass
class Even(Allocation):
    """Equal budget per non-empty view, remainder to the first; the compressor selects (docs/methods/allocation.md)."""

    name = "even"

    def budgets(self, image, k):
        return even_budgets(k, image.layout.view_sizes)


@register_allocation
@dataclass
class HiRED(Allocation):
    """HiRED: thumbnail share ``alpha``, crops by their share of early-layer CLS attention (docs/methods/hired.md).

    Options:
      alpha: the base view's share of the budget (default 0.5, the paper's).
      layer: the "initial" ViT layer whose CLS attention (received attention on towers without CLS) allocates the
        crops' budget (default 0, the reference's ``vit_top_layer``).
      rule: ``"paper"`` (default: region sums over spatially corresponding base tokens, Eq. 1) or ``"code"`` (the
        reference's counts of top tokens per row band).
    """

    name = "hired"
    alpha: float = 0.5
    layer: int = 0
    rule: str = "paper"

    def __post_init__(self):
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise ValueError(f"hired alpha must be a number in [0, 1], got {self.alpha!r}")
        if self.rule not in ("paper", "code"):
            raise ValueError(f"hired rule must be 'paper' or 'code', got {self.rule!r}")

    def signals(self, tower):
        return (_attention_signal(tower, self.layer),)

    def budgets(self, image, k):
        layout = image.layout
        signal = _attention_signal(image.tower, self.layer)
        regions = layout.base_regions("spatial" if self.rule == "paper" else "bands")
        return hired_budgets(k, layout.view_sizes, _score(image, 0, signal), regions, self.alpha, self.rule)


@register_allocation
@dataclass
class GlobalCom2(Allocation):
    """GlobalCom²: thumbnail-guided crop ratios and (by default) token scores (docs/methods/globalcom2.md).

    Options:
      tau: softmax temperature over the crops' region scores (default 10, the paper's).
      layer: the ViT layer whose CLS logits score the tokens; default the last layer (reference: layer 23 of
        CLIP-L, not the feature layer).
      regions: how base tokens are assigned to crops for the region scores: ``"blocks"`` (default, the reference:
        equal blocks of the base grid) or ``"spatial"`` (as HiRED's paper, padding-aware).
      select: ``"guided"`` (default, the paper: GlobalCom² picks the tokens) or ``"compressor"`` (only its budgets
        are used).
    """

    name = "globalcom2"
    tau: float = 10.0
    layer: int | None = None
    regions: str = "blocks"
    select: str = "guided"

    def __post_init__(self):
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not self.tau > 0:
            raise ValueError(f"globalcom2 tau must be a number > 0, got {self.tau!r}")
        if self.regions not in ("blocks", "spatial"):
            raise ValueError(f"globalcom2 regions must be 'blocks' or 'spatial', got {self.regions!r}")
        if self.select not in ("guided", "compressor"):
            raise ValueError(f"globalcom2 select must be 'guided' or 'compressor', got {self.select!r}")

    def _signal(self, tower: TowerInfo) -> Signal:
        return _logit_signal(tower, tower.num_layers - 1 if self.layer is None else self.layer)

    def signals(self, tower):
        return (self._signal(tower),)

    def _base_map(self, image) -> torch.Tensor:
        signal = self._signal(image.tower)
        return _as_logits(signal, _score(image, 0, signal))

    def budgets(self, image, k):
        layout = image.layout
        if layout.canvas is None:
            return even_budgets(k, layout.view_sizes)
        scores = region_sums(self._base_map(image), layout.base_regions(self.regions), layout.num_views)[1:]
        return globalcom2_budgets(k, layout.view_sizes, globalcom2_sigma(scores, self.tau))

    def select_view(self, image, view, k):
        if self.select != "guided":
            return None
        signal = self._signal(image.tower)
        local = _as_logits(signal, _score(image, view, signal))
        if view == 0:
            return Selection(indices=top_k_sorted(local, k), scores=local, details=Details(signals=(signal,)))
        layout = image.layout
        global_map = resize_map(self._base_map(image), layout.base, layout.canvas.shape)
        r0, r1, c0, c1 = layout.canvas_rect(view)
        score = guided_scores(local, global_map[r0:r1, c0:c1])
        return Selection(indices=top_k_sorted(score, k).to(image.features.device), scores=score,
                         details=Details(signals=(signal,)))
