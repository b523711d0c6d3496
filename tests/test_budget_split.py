"""Integer budget splitting (vtc.budget_split): views of an AnyRes image, frames of a video."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vtc import VisualTokens, create_compressor
from vtc.budget_split import even_budgets, split_budget, water_fill
from vtc.video import VideoTokens, select_frames_evenly


# ================================================================================================ split_budget
def test_split_budget_by_hand():
    assert split_budget(10, [1, 1, 1], [10, 10, 10]) == [4, 3, 3]  # remainder to the first views
    assert split_budget(2, [1, 1, 1, 1, 1], [9] * 5) == [1, 1, 0, 0, 0]  # fewer tokens than views
    assert split_budget(10, [3, 1], [4, 100]) == [4, 6]  # the capped view's overflow goes to the other
    assert split_budget(10, [1, 0, 0], [2, 5, 5]) == [2, 4, 4]  # zero-weight views share what is left evenly
    assert split_budget(100, [1, 1], [3, 4]) == [3, 4]  # never more than the views hold
    assert split_budget(5, [0, 0], [0, 9]) == [0, 5]  # empty views get nothing
    assert split_budget(7, [0.5, 0.25, 0.25], [10, 10, 10]) == [3, 2, 2]  # 3.5 / 1.75 / 1.75: largest remainders
    with pytest.raises(ValueError, match="finite and >= 0"):
        split_budget(3, [1, -1], [3, 3])
    with pytest.raises(ValueError, match="2 weights for 3 views"):
        split_budget(3, [1, 1], [3, 3, 3])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 100), st.integers(0, 40)), min_size=1, max_size=12), st.integers(0, 300))
def test_split_budget_property(views, total):
    weights, caps = [w for w, _ in views], [c for _, c in views]
    budgets = split_budget(total, weights, caps)
    assert sum(budgets) == min(total, sum(caps))
    assert all(0 <= b <= c for b, c in zip(budgets, caps))
    # views that are not full get their proportional share of what the full views left, within one token
    free = [i for i in range(len(caps)) if budgets[i] < caps[i]]
    if free and sum(weights[i] for i in free) > 0:
        rest = sum(budgets[i] for i in free)
        mass = sum(weights[i] for i in free)
        for i in free:
            assert abs(budgets[i] - rest * weights[i] / mass) < 1 + 1e-9
    # even: budgets of non-empty, non-full views differ by at most one
    even = even_budgets(total, caps)
    open_views = [b for b, c in zip(even, caps) if 0 < c and b < c]
    assert not open_views or max(open_views) - min(open_views) <= 1


# -- water-filling of frame budgets (video) ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "weights", "caps", "floor", "expected"),
    [
        (10, [1, 1, 0, 2], [4, 4, 4, 4], 0, [3, 3, 0, 4]),  # kappa = 3: 3 + 3 + 0 + min(4, 6); weight 0 dropped
        (10, [1, 1, 0, 2], [4, 4, 4, 4], 2, [2, 2, 2, 4]),  # the floor lifts the zero-weight frame
        (3, [1, 1, 0, 2], [4, 4, 4, 4], 2, [1, 1, 0, 1]),  # floor 2 x 4 frames > 3: lowered to 3 // 4 = 0
        (100, [0.9, 0.05, 0.05], [50, 50, 50], 0, [50, 25, 25]),  # the capped frame's excess goes to the others
        (12, [0, 0, 0], [5, 5, 5], 0, [4, 4, 4]),  # all-zero weights share evenly
        (99, [1, 2], [10, 10], 0, [10, 10]),  # more budget than tokens: everything
        (5, [1, 4], [10, 10], 0, [1, 4]),
    ],
)
def test_water_fill_golden(total, weights, caps, floor, expected):
    assert water_fill(total, weights, caps, floor) == expected


@settings(deadline=None, max_examples=200)
@given(
    st.lists(st.tuples(st.floats(0, 10), st.integers(0, 40)), min_size=1, max_size=12),
    st.integers(0, 300),
    st.integers(0, 6),
)
def test_water_fill_sums_exactly_within_floor_and_cap(frames, total, floor):
    weights, caps = [w for w, _ in frames], [c for _, c in frames]
    budgets = water_fill(total, weights, caps, floor)
    assert sum(budgets) == min(total, sum(caps))
    assert all(0 <= b <= c for b, c in zip(budgets, caps))
    if sum(min(floor, c) for c in caps) <= min(total, sum(caps)):
        assert all(b >= min(floor, c) for b, c in zip(budgets, caps))
    # monotone in the weight among uncapped frames: a heavier frame never gets fewer tokens (up to rounding)
    for i in range(len(frames)):
        for j in range(len(frames)):
            if weights[i] > weights[j] and budgets[i] < caps[i] and budgets[j] > max(floor, 1):
                assert budgets[i] >= budgets[j] - 1


def test_water_fill_rejects_bad_input():
    with pytest.raises(ValueError, match="weights"):
        water_fill(5, [1.0], [3, 3])
    with pytest.raises(ValueError, match="finite"):
        water_fill(5, [float("nan"), 1.0], [3, 3])
    with pytest.raises(ValueError, match="floor"):
        water_fill(5, [1.0, 1.0], [3, 3], floor=-1)


# -- image compressors on a video: every frame the same share ------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=6), st.integers(1, 80))
def test_frames_evenly_share_the_even_split(sizes, total):
    """An image compressor on a video gives its frames ``even_budgets`` (one rule for views and frames)."""
    g = torch.Generator().manual_seed(0)
    video = VideoTokens([VisualTokens(torch.randn(n, 4, generator=g), grid=(1, n)) for n in sizes])
    total = min(total, sum(sizes))
    result = select_frames_evenly(create_compressor("random"), video, total)
    assert [r.budget for r in result.frames] == even_budgets(total, sizes)
    assert [r.num_kept for r in result.frames] == even_budgets(total, sizes)
