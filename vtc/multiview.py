"""Selection for an AnyRes image (base view + crops, packed with newlines): allocate, select per view, add newlines.

``select_views`` is the multi-view counterpart of ``run_compressor``: it resolves the image budget over the image's
*visual* tokens (newlines excluded), asks the allocation (``vtc.allocation``) for per-view budgets, lets the
allocation or else the compressor select inside every view with a budget (each view is a ``VisualTokens`` of its own
visible grid and signals), maps the kept tokens to packed indices (``vtc.layout``), and adds the newlines the layout
rule keeps. The result is one ``Selection`` over the packed sequence, so the cut treats it like any image's; its
``details`` (``MultiViewDetails``) keep what was decided in each view.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection, Mapping

import torch

from .allocation import Allocation
from .budget import Budget, resolve_budget, validate_budget
from .compressor import Compressor, VisualTokens
from .layout import PackedLayout
from .selection import Details, Selection
from .signals import Signal, TowerInfo


@dataclass
class MultiViewTokens:
    """The packed visual tokens of one AnyRes image and, per view, the signals captured for it."""

    features: torch.Tensor  # [num_tokens, D]: the packed sequence (visual tokens and newlines)
    layout: PackedLayout
    view_signals: list[Mapping[Signal, torch.Tensor]]  # per view, laid out like its visible grid (raster order)
    tower: TowerInfo | None = None
    query: torch.Tensor | None = None  # [T, D] text embeddings of the prompt, for query-aware compressors

    def __post_init__(self):
        if self.features.shape[0] != self.layout.num_tokens:
            raise ValueError(f"{self.features.shape[0]} packed features do not match the layout's "
                             f"{self.layout.num_tokens} packed tokens")
        if len(self.view_signals) != self.layout.num_views:
            raise ValueError(f"got signals for {len(self.view_signals)} views, the layout has {self.layout.num_views}")

    def view_signal(self, view: int, signal: Signal) -> torch.Tensor:
        try:
            return self.view_signals[view][signal]
        except KeyError:
            have = ", ".join(map(str, self.view_signals[view])) or "none"
            raise KeyError(f"signal {signal} was not captured for view {view} (captured: {have})") from None

    def view(self, view: int, signals: Collection[Signal] | None = None) -> VisualTokens:
        """View ``view`` as a ``VisualTokens`` of its visible grid (only ``signals`` among its signals, if given)."""
        indices = self.layout.view_indices(view).to(self.features.device)
        captured = self.view_signals[view]
        chosen = {s: v for s, v in captured.items() if signals is None or s in signals}
        return VisualTokens(features=self.features[indices], grid=self.layout.view_grid(view), signals=chosen,
                            query=self.query)


@dataclass(frozen=True)
class MultiViewDetails(Details):
    """What was decided in each view of an AnyRes image (``Selection.details`` of the packed selection).

    Fields:
      views: per view (``PackedLayout`` order, base view first) the ``details`` of its own selection -- by the
        compressor, or by the allocation where it selects (GlobalCom²'s guided mode) -- or ``None`` for a view with
        no budget or a selector that records none. Their indices are **view-local** (into the view's visible grid,
        raster order): ``layout.view_indices(v)[i]`` is the packed index of token ``i`` of view ``v``.
      selected_by: per view, who selected it (e.g. ``"compressor 'hiprune'"``, ``"allocation 'globalcom2'"``;
        ``""`` for a view with no budget).
    ``signals`` are the views' signals, in first-seen order without repeats.
    """

    views: tuple[Details | None, ...]
    selected_by: tuple[str, ...]


@dataclass
class MultiViewSelection:
    selection: Selection  # over the packed sequence: kept tokens and kept newlines, sorted
    budget: int  # visual tokens kept (newlines excluded) = sum(view_budgets)
    view_budgets: tuple[int, ...]
    view_selections: list[Selection | None] = field(default_factory=list)  # per view, in view-local indices


def check_view_budgets(budgets, layout: PackedLayout, k: int, who: str) -> tuple[int, ...]:
    budgets = tuple(int(b) for b in budgets)
    sizes = layout.view_sizes
    if len(budgets) != len(sizes):
        raise RuntimeError(f"{who} returned {len(budgets)} view budgets for {len(sizes)} views")
    if any(b < 0 or b > s for b, s in zip(budgets, sizes)):
        raise RuntimeError(f"{who} returned view budgets {list(budgets)} outside [0, view size {list(sizes)}]")
    if sum(budgets) != k:
        raise RuntimeError(f"{who} returned view budgets {list(budgets)} summing to {sum(budgets)}, not the budget {k}")
    return budgets


def select_views(compressor: Compressor, allocation: Allocation, image: MultiViewTokens, budget: Budget,
                 compressor_signals: Collection[Signal] | None = None) -> MultiViewSelection:
    """Select ``budget`` visual tokens of a multi-view image (see the module doc).

    ``compressor_signals``: the signals the compressor declared; each view hands it only those (the allocation's
    own signals are captured next to them but are not the compressor's business).
    """
    layout = image.layout
    k = resolve_budget(validate_budget(budget), layout.num_visual_tokens)
    budgets = check_view_budgets(allocation.budgets(image, k), layout, k, f"allocation {allocation.name!r}")
    device = image.features.device
    kept, merged_index, merged_features, view_selections = [], [], [], []
    scores = torch.full((layout.num_tokens,), float("nan"), dtype=torch.float32, device=device)
    groups: dict[int, torch.Tensor] = {}
    weights: dict[int, torch.Tensor] = {}
    weights_stated = True  # every merging view stated its merge coefficients (so the packed selection can too)
    selected_by = []
    for view, k_view in enumerate(budgets):
        if k_view == 0:
            view_selections.append(None)
            selected_by.append("")
            continue
        tokens = image.view(view, compressor_signals)
        selection = allocation.select_view(image, view, k_view)
        who = f"allocation {allocation.name!r}"
        if selection is None:
            selection = compressor.select(tokens, k_view)
            who = f"compressor {compressor.name!r}"
        selection.validate(tokens.num_tokens, expected=k_view, who=f"{who} on view {view}")
        view_selections.append(selection)
        selected_by.append(who)
        packed = layout.view_indices(view).to(device)
        chosen = packed[selection.indices.to(device)]
        kept.append(chosen)
        if selection.scores is not None:
            scores[packed] = selection.scores.float().reshape(-1).to(device)
        if selection.features is not None:
            merged_index.append(chosen)
            merged_features.append(selection.features)
        if selection.groups is not None:
            for group, index in zip(selection.groups, chosen.tolist()):
                groups[index] = packed[group.to(device)]
        if selection.weights is not None:
            for w, index in zip(selection.weights, chosen.tolist()):
                weights[index] = w
        elif selection.features is not None:
            weights_stated = False
    tokens_kept = torch.cat(kept) if kept else torch.empty(0, dtype=torch.long, device=device)
    newlines = layout.kept_newlines(tokens_kept.cpu()).to(device)
    indices = torch.sort(torch.cat([tokens_kept, newlines])).values
    features = None
    if merged_index:  # gathered rows, with each merging view's output tokens in their slots
        features = image.features[indices].clone()
        slots = torch.searchsorted(indices, torch.cat(merged_index))
        features[slots] = torch.cat(merged_features).to(device=features.device, dtype=features.dtype)
    group_list = None
    if groups:
        group_list = tuple(groups.get(index, torch.tensor([index], device=device)) for index in indices.tolist())
    views = tuple(None if sel is None else sel.details for sel in view_selections)
    signals = tuple(dict.fromkeys(s for d in views if d is not None for s in d.signals))
    weight_list = None
    if weights and weights_stated:  # a kept (unmerged) token is its own group with coefficient 1
        weight_list = tuple(weights.get(index, torch.ones(1, device=device)) for index in indices.tolist())
    selection = Selection(indices=indices, features=features, groups=group_list, weights=weight_list,
                          scores=None if bool(scores.isnan().all()) else scores,
                          details=MultiViewDetails(signals=signals, views=views, selected_by=tuple(selected_by)))
    selection.validate(layout.num_tokens, expected=k + int(newlines.numel()), who="select_views")
    return MultiViewSelection(selection=selection, budget=k, view_budgets=budgets, view_selections=view_selections)
