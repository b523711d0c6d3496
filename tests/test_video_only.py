"""Video-only compressors (``Compressor.video_only``: FastVID, VidCom2, DyCoke, EVS compare frames): refused at
``vtc.apply`` on a model without a video input unless ``images_as_video=True``; a single image is a one-frame video."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import vtc
from vtc import testing as tiny
from vtc.selection import Selection
from vtc.video import FrameRecord, VideoCompressor, VideoSelection

VIDEO_ONLY = [n for n in vtc.list_compressors() if vtc.get_compressor_class(n).video_only]


@dataclass
class FirstTokens(VideoCompressor):
    """A stand-in video-only method (not registered): each frame keeps its first tokens, budget split evenly."""

    name = "first_tokens"
    video_only = True

    def select_video(self, video, budget):
        from vtc.budget_split import even_budgets

        budgets = even_budgets(budget, video.frame_sizes)
        frames = [FrameRecord(frame=t, budget=b, selection=Selection(indices=torch.arange(b)))
                  for t, b in enumerate(budgets)]
        return VideoSelection(frames, budget=sum(budgets))


def test_registered_video_methods_are_marked():
    assert set(VIDEO_ONLY) >= set(n for n in ("fastvid", "vidcom2", "dycoke", "evs") if n in vtc.list_compressors())


@pytest.mark.parametrize("compressor", [FirstTokens(), *VIDEO_ONLY])
def test_refused_without_a_video_input_unless_images_as_video(compressor):
    model, processor = tiny.build_tiny("llava")
    name = compressor if isinstance(compressor, str) else compressor.name
    with pytest.raises(ValueError, match="images_as_video=True"):
        vtc.apply(model, compressor, budget=4)
    assert not vtc.is_applied(model)
    vtc.apply(model, compressor, budget=4, video_budget=8, images_as_video=True)
    texts = [tiny.build_prompt(processor, "what is this ?", num_images=2)]
    inputs = processor(text=texts, images=[[tiny.random_image(64, 64, seed=0), tiny.random_image(64, 64, seed=1)]],
                       return_tensors="pt")
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    video, = vtc.last_video_selection(model)
    assert video.num_kept == 8 and video.compressor == name


@pytest.mark.parametrize("compressor", [FirstTokens(), *VIDEO_ONLY])
def test_accepted_on_a_family_with_video_input(compressor):
    model, _ = tiny.build_tiny("qwen2_vl")
    vtc.apply(model, compressor, budget=4)
    assert vtc.is_applied(model)


@pytest.mark.parametrize("compressor", [FirstTokens(), *VIDEO_ONLY])
def test_refused_on_anyres_images_without_a_video_input(compressor):
    model, _ = tiny.build_tiny("llava_next")  # its images are several views each, never frames
    for options in ({}, {"images_as_video": True}):
        with pytest.raises(ValueError, match="AnyRes views"):
            vtc.apply(model, compressor, budget=4, **options)
