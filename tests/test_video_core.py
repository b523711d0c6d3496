"""``VideoSelection.flat()``: one ``Selection`` over a video's concatenated tokens, merge weights included."""

from __future__ import annotations

import pytest
import torch

from vtc import VisualTokens
from vtc.selection import Selection
from vtc.video import FrameRecord, VideoSelection, VideoTokens

D = 4


def video(*sizes: int) -> VideoTokens:
    g = torch.Generator().manual_seed(0)
    return VideoTokens([VisualTokens(torch.randn(n, D, generator=g), grid=(1, n)) for n in sizes])


def merged(frame: VisualTokens, indices, groups, weights) -> Selection:
    """A merged selection of one frame whose features are ``weights @ x[groups]`` (weights may be left out)."""
    groups = tuple(torch.tensor(g) for g in groups)
    coefficients = tuple(torch.tensor(w, dtype=torch.float32) for w in weights)
    features = torch.stack([w @ frame.features[g] for g, w in zip(groups, coefficients)])
    return Selection(indices=torch.tensor(indices), features=features, groups=groups, weights=coefficients)


def records(*selections: Selection) -> list[FrameRecord]:
    return [FrameRecord(frame=t, budget=s.num_kept, selection=s) for t, s in enumerate(selections)]


def test_flat_from_per_frame_weights_and_gathered_frames():
    v = video(4, 3, 2)
    first = merged(v.frames[0], [0, 2], [[0, 1], [2, 3]], [[0.25, 0.75], [0.5, 0.5]])
    gathered = Selection(indices=torch.tensor([1]))  # frame 1 keeps token 1 as it is
    empty = Selection(indices=torch.zeros(0, dtype=torch.long))
    sel = VideoSelection(records(first, gathered, empty), budget=3).validate(v)
    flat = sel.flat(v)
    assert flat.indices.tolist() == [0, 2, 5]
    assert [g.tolist() for g in flat.groups] == [[0, 1], [2, 3], [5]]
    assert [w.tolist() for w in flat.weights] == [[0.25, 0.75], [0.5, 0.5], [1.0]]
    x = torch.cat([f.features for f in v.frames])
    for feature, group, weight in zip(flat.features, flat.groups, flat.weights):
        torch.testing.assert_close(weight @ x[group], feature)
    flat.validate(v.num_tokens, expected=3)


def test_flat_without_weights_when_a_merged_frame_has_none():
    v = video(4, 4)
    first = merged(v.frames[0], [0], [[0, 1]], [[0.5, 0.5]])
    second = merged(v.frames[1], [3], [[2, 3]], [[0.5, 0.5]])
    second.weights = None
    flat = VideoSelection(records(first, second), budget=2).validate(v).flat(v)
    assert flat.weights is None and [g.tolist() for g in flat.groups] == [[0, 1], [6, 7]]


def test_flat_without_merges_has_neither_features_nor_weights():
    v = video(3, 3)
    sel = VideoSelection(records(Selection(indices=torch.tensor([0, 2])), Selection(indices=torch.tensor([1]))),
                         budget=3)
    flat = sel.validate(v).flat(v)
    assert flat.indices.tolist() == [0, 2, 4] and flat.features is None and flat.weights is None
    assert [g.tolist() for g in flat.groups] == [[0], [2], [4]]


def test_flat_groups_state_cross_frame_merges():
    """A compressor folding frame 1's token 0 into frame 0's output fills flat_groups / flat_weights; the per-frame
    record keeps its same-frame group (for the demo) and no per-frame weights."""
    v = video(2, 2)
    x = torch.cat([f.features for f in v.frames])
    out0 = 0.6 * x[0] + 0.4 * x[2]
    first = Selection(indices=torch.tensor([0, 1]), features=torch.stack([out0, x[1]]),
                      groups=(torch.tensor([0]), torch.tensor([1])))
    second = Selection(indices=torch.tensor([1]), features=x[3:4], groups=(torch.tensor([1]),),
                       weights=(torch.tensor([1.0]),))
    flat_groups = (torch.tensor([0, 2]), torch.tensor([1]), torch.tensor([3]))
    flat_weights = (torch.tensor([0.6, 0.4]), torch.tensor([1.0]), torch.tensor([1.0]))
    sel = VideoSelection(records(first, second), budget=3, flat_groups=flat_groups, flat_weights=flat_weights)
    flat = sel.validate(v).flat(v)
    assert flat.groups is flat_groups and flat.weights is flat_weights
    for feature, group, weight in zip(flat.features, flat.groups, flat.weights):
        torch.testing.assert_close(weight @ x[group], feature)
    # without flat_groups the cross-frame part is unknown: the per-frame groups, and no weights
    plain = VideoSelection(records(first, second), budget=3).flat(v)
    assert [g.tolist() for g in plain.groups] == [[0], [1], [3]] and plain.weights is None


def test_validate_rejects_inconsistent_flat_merges():
    v = video(2)
    sel = Selection(indices=torch.tensor([0]), features=v.frames[0].features[:1], groups=(torch.tensor([0]),))
    with pytest.raises(RuntimeError, match="1 tokens"):
        VideoSelection(records(sel), budget=1, flat_groups=()).validate(v)
    with pytest.raises(RuntimeError, match="sizes differ"):
        VideoSelection(records(sel), budget=1, flat_groups=(torch.tensor([0, 1]),),
                       flat_weights=(torch.tensor([1.0]),)).validate(v)
    with pytest.raises(RuntimeError, match="without flat groups"):
        VideoSelection(records(sel), budget=1, flat_weights=(torch.tensor([1.0]),)).validate(v)
