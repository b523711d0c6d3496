"""Qwen3-VL DeepStack: every deepstack level handed to the LLM holds exactly the selection of the visual tokens."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import vtc
from helpers import QUESTIONS, greedy, make_inputs, reduce_by_hand, skip_if_resized
from vtc.compressor import Compressor, VisualTokens
from vtc import testing as tiny
from vtc.selection import Selection
from vtc.video import VideoTokens

CASES = [(name, {}) for name in vtc.list_compressors("encoder")] + [("visionzip", {"merge": "target_plus_mean"})]


def capture_llm_inputs(model):
    """Pre-hook on the text model: what each call of it receives (prefill first)."""
    seen = []

    def hook(module, args, kwargs):
        embeds = kwargs.get("deepstack_visual_embeds")
        seen.append({
            "deepstack": None if embeds is None else [e.detach().clone() for e in embeds],
            "mask": None if kwargs.get("visual_pos_masks") is None else kwargs["visual_pos_masks"].clone(),
        })

    return seen, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("compressor, options", CASES, ids=[f"{n}-{'-'.join(map(str, o.values())) or 'default'}"
                                                              for n, o in CASES])
def test_deepstack_levels_are_the_kept_rows_of_each_level(tiny_dirs, compressor, options):
    model, processor = tiny.load_tiny(tiny_dirs["qwen3_vl"])
    skip_if_resized(model, compressor)  # downsample resizes first: tests/test_downsample.py holds its oracle
    inputs = make_inputs(processor, "qwen3_vl", QUESTIONS, [2, 1])  # 3 images of 2 sizes, left-padded batch
    with torch.no_grad():
        full = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    num_levels = len(model.config.vision_config.deepstack_visual_indexes)
    assert num_levels >= 2 and len(full.deepstack_features) == num_levels

    vtc.apply(model, compressor, budget=5, **options)
    seen, handle = capture_llm_inputs(model)
    greedy(model, inputs, max_new_tokens=3)
    handle.remove()
    records = vtc.last_selection(model)
    assert [r.num_kept for r in records] == [5, 5, 5]

    prefill = seen[0]
    got = prefill["deepstack"]
    assert got is not None and len(got) == num_levels
    merge = options.get("merge", "mean")
    for level, received in zip(full.deepstack_features, got):
        expected = torch.cat([reduce_by_hand(rows, r.selection, merge) for rows, r in zip(level, records)])
        assert received.shape == (15, level[0].shape[-1])  # exactly the budget, every image
        if all(r.selection.features is None for r in records):
            assert torch.equal(received, expected)  # pruning: the kept rows themselves
        else:
            assert torch.allclose(received, expected, atol=1e-6)
    # the injected rows land on the kept placeholders: 5 per image, in the shrunk prompt
    assert prefill["mask"].sum(dim=1).tolist() == [10, 5]
    assert all(step["deepstack"] is None for step in seen[1:])  # decode steps inject nothing


def test_deepstack_keep_all_equals_the_model_own_levels(tiny_dirs):
    model, processor = tiny.load_tiny(tiny_dirs["qwen3_vl"])
    inputs = make_inputs(processor, "qwen3_vl", QUESTIONS[:1], [2])
    seen, handle = capture_llm_inputs(model)
    baseline = greedy(model, inputs, max_new_tokens=2)
    vtc.apply(model, "pool", budget=1.0)
    assert greedy(model, inputs, max_new_tokens=2).tolist() == baseline.tolist()
    handle.remove()
    reference, wrapped = seen[0]["deepstack"], seen[len(seen) // 2]["deepstack"]
    assert all(torch.equal(a, b) for a, b in zip(reference, wrapped))


@dataclass
class FeatureNormMerge(Compressor):
    """A merging compressor whose groups depend on the features (pairs of tokens by feature norm)."""

    name = "feature_norm_merge_test"

    def select(self, tokens: VisualTokens, k: int) -> Selection:
        order = torch.argsort(tokens.features.float().norm(dim=-1), stable=True)
        groups = [torch.sort(chunk).values for chunk in torch.tensor_split(order, k)]
        indices, slots = torch.sort(torch.stack([g[0] for g in groups]))
        groups = tuple(groups[int(i)] for i in slots)
        features = torch.stack([tokens.features[g].mean(dim=0) for g in groups])
        return Selection(indices=indices, features=features, groups=groups)


def test_feature_dependent_merge_is_refused_with_a_clear_error(tiny_dirs):
    model, processor = tiny.load_tiny(tiny_dirs["qwen3_vl"])
    vtc.apply(model, FeatureNormMerge(), budget=4)
    with pytest.raises(RuntimeError, match="groups that depend on the features.*deepstack"):
        greedy(model, make_inputs(processor, "qwen3_vl", QUESTIONS[:1], [1]), max_new_tokens=1)

    other, processor = tiny.load_tiny(tiny_dirs["qwen2_vl"])  # without extra levels it runs as usual
    vtc.apply(other, FeatureNormMerge(), budget=4)
    greedy(other, make_inputs(processor, "qwen2_vl", QUESTIONS[:1], [1]), max_new_tokens=1)
    assert [r.num_kept for r in vtc.last_selection(other)] == [4]


@pytest.mark.parametrize("compressor", ["random", "pool", "quota", "progressive"])
def test_images_as_video_levels_get_the_video_selection(tiny_dirs, compressor):
    """``images_as_video``: a prompt's images are the frames of one video, and every deepstack level of those images
    gets the video's selection (kept rows, or the same merge), frame by frame."""
    model, processor = tiny.load_tiny(tiny_dirs["qwen3_vl"])
    inputs = make_inputs(processor, "qwen3_vl", QUESTIONS, [2, 1])
    with torch.no_grad():
        full = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    vtc.apply(model, compressor, budget=64, video_budget=10, images_as_video=True)
    seen, handle = capture_llm_inputs(model)
    greedy(model, inputs, max_new_tokens=2)
    handle.remove()
    records, videos = vtc.last_selection(model), vtc.last_video_selection(model)
    assert [v.num_kept for v in videos] == [10, 10]
    got = seen[0]["deepstack"]
    assert got is not None and len(got) == len(full.deepstack_features)
    for level, received in zip(full.deepstack_features, got):
        expected = []
        for video in videos:
            frames = [r for r in records if r.extra["video"] == video.video_index]
            rows = [level[r.image_index] for r in frames]
            flat = video.selection.flat(VideoTokens([VisualTokens(x, grid=r.grid) for x, r in zip(rows, frames)]))
            expected.append(reduce_by_hand(torch.cat(rows), flat))
        expected = torch.cat(expected)
        assert received.shape == expected.shape == (20, level[0].shape[-1])
        assert torch.allclose(received, expected, atol=1e-6)
