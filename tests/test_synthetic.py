"""The synthetic data generator: deterministic, split-disjoint, and its answers agree with its own ground truth."""

import numpy as np
import pytest

from vtc.eval.default_model import synthetic as syn


def _pixels(image):
    return np.asarray(image)


def test_images_are_deterministic_per_split_and_index():
    a, b = syn.make_image_sample("train", 7), syn.make_image_sample("train", 7)
    assert np.array_equal(_pixels(a.image), _pixels(b.image))
    assert a.questions == b.questions and a.objects == b.objects
    assert np.array_equal(a.id_map, b.id_map)


def test_videos_are_deterministic():
    a, b = syn.make_video_sample("test", 3), syn.make_video_sample("test", 3)
    assert all(np.array_equal(_pixels(x), _pixels(y)) for x, y in zip(a.frames, b.frames))
    assert a.questions == b.questions and np.array_equal(a.visible, b.visible)


def test_splits_are_disjoint():
    """Same index, different split: a different scene (the split code is part of the seed)."""
    scenes = {split: syn.make_image_sample(split, 0) for split in syn.SPLITS}
    pixels = [_pixels(s.image).tobytes() for s in scenes.values()]
    assert len(set(pixels)) == 3
    # and no collisions across a few hundred samples of each split
    seen = set()
    for split in syn.SPLITS:
        for i in range(100):
            key = _pixels(syn.make_image_sample(split, i).image).tobytes()
            assert key not in seen
            seen.add(key)


@pytest.mark.parametrize("index", range(40))
def test_image_answers_match_the_scene(index):
    s = syn.make_image_sample("validation", index)
    shapes = [o for o in s.objects if o.shape != "letter"]
    assert 1 <= len(shapes) <= syn.MAX_OBJECTS
    assert len({(o.color, o.shape) for o in shapes}) == len(shapes)  # pairs are unique
    assert len({o.cell for o in s.objects}) == len(s.objects)  # one thing per cell
    assert s.image.size == (224, 224)
    for q in s.questions:
        if q.kind == "count":
            assert q.answer == syn.NUMBER_WORDS[len(shapes)]
        elif q.kind == "color_at":
            cell = q.text.split(" at the ")[1].rstrip(" ?")
            owner = [o for o in shapes if syn.CELLS[o.cell] == cell]
            assert [o.color for o in owner] == [q.answer]
        elif q.kind == "exists":
            color, shape = q.text.split()[3:5]
            assert q.answer == ("yes" if any(o.color == color and o.shape == shape for o in shapes) else "no")
        elif q.kind == "letter":
            assert [o.letter for o in s.objects if o.shape == "letter"] == [q.answer]
    # every object is drawn: it owns pixels of the id map
    for i in range(len(s.objects)):
        assert (s.id_map == i).sum() > 50


def test_video_ground_truth():
    for index in range(30):
        v = syn.make_video_sample("train", index, num_frames=12)
        assert len(v.frames) == 12 and v.visible.shape == (12, len(v.objects))
        for i, o in enumerate(v.objects):
            assert v.visible[:, i].tolist() == [o.first <= t <= o.last for t in range(12)]
        for q in v.questions:
            if q.kind == "frames_with_shape":
                shape = q.text.split()[-2]
                n = sum(any(v.visible[t, i] and o.shape == shape for i, o in enumerate(v.objects))
                        for t in range(12))
                assert q.answer == syn.NUMBER_WORDS[n]
            if q.kind == "appeared_last_color":
                last = max(o.first for o in v.objects)
                assert [o.color for o in v.objects if o.first == last] == [q.answer]
        assert v.timestamps == [t / v.fps for t in range(12)]


def test_moving_shapes_move_and_static_background_stays():
    v = next(v for v in syn.video_samples("test", 50)
             if any(o.direction and o.last - o.first >= 3 for o in v.objects))
    first, last = _pixels(v.frames[0]).astype(int), _pixels(v.frames[-1]).astype(int)
    changed = np.abs(first - last).sum(-1) > 0
    assert 0 < changed.mean() < 0.5  # something moved/appeared, most of the frame did not change


def test_every_word_is_in_the_vocabulary():
    vocab = set(syn.vocabulary())
    for s in syn.image_samples("test", 30):
        for q in s.questions:
            assert set(q.text.split()) | {q.answer} <= vocab
    for v in syn.video_samples("test", 30):
        for q in v.questions:
            assert set(q.text.split()) | {q.answer} <= vocab


@pytest.mark.parametrize("call, message", [
    (lambda: syn.make_image_sample("dev", 0), "unknown split"),
    (lambda: syn.make_image_sample("train", -1), "index must be >= 0"),
    (lambda: syn.make_image_sample("train", 0, size=32), "image size must be >= 96"),
    (lambda: syn.make_video_sample("train", 0, num_frames=4), r"num_frames must be in \[8, 32\]"),
])
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()
