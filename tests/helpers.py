"""Helpers shared by the tests: processor inputs for images and videos, greedy generation, and the hand-built
shortened prompts (the references the wrapped model must equal). Fixtures and hooks stay in ``conftest.py``."""

from __future__ import annotations

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vtc
from vtc.compressor import VisualTokens
from vtc.signals import TowerInfo
from vtc import testing as tiny
from vtc.integrations.transformers.adapter import adapter_for
from vtc.testing import QWEN_FAMILIES
from vtc.video import VideoTokens

QUESTIONS = ["what is the color ?", "how many red circle are there in the image ?"]

# the towers most golden tests describe: CLIP-L/14-336 as LLaVA-1.5 reads it (layer 22, a CLS token) and
# Qwen2.5-VL-7B's ViT (no CLS, full attention every 8th block)
CLIP_L = TowerInfo(name="clip", num_layers=24, feature_layer=22, has_cls=True)
QWEN25 = TowerInfo(name="qwen2_5_vit", num_layers=32, feature_layer=31, has_cls=False,
                   full_attention_layers=(7, 15, 23, 31))

# (width, height) of the test images per family, from its tiny model (``register_tiny`` in families/<family>.py); Qwen
# images differ in size so multi-image prompts mix token counts and windows
IMAGE_SIZES = tiny.IMAGE_SIZES


def make_inputs(processor, family: str, questions: list[str], images_per_prompt: list[int], first_image: int = 0):
    """Processor inputs for a batch: prompt ``i`` has ``images_per_prompt[i]`` images (left padding).

    Image ``n`` of the batch (counting from ``first_image``) always has the same size and pixels, so a prompt can
    be rebuilt alone with ``first_image`` set to the index of its first image in the batch.
    """
    texts, images, n = [], [], first_image
    for question, count in zip(questions, images_per_prompt):
        texts.append(tiny.build_prompt(processor, question, num_images=count))
        row = []
        for _ in range(count):
            width, height = IMAGE_SIZES[family][n % len(IMAGE_SIZES[family])]
            row.append(tiny.random_image(width, height, seed=n))
            n += 1
        images.append(row)
    kwargs = {"text": texts, "return_tensors": "pt", "padding": True}
    if n > first_image:
        # OneVision's processor reads a flat list as one image per prompt (batch_num_images all 1); nest it so a
        # prompt with several images is a multi-image prompt, as the model's chat template would make it
        kwargs["images"] = images if len(texts) > 1 or family == "llava_onevision" else images[0]
    return processor(**kwargs)


def greedy(model, inputs, max_new_tokens: int = 6):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)


def reduce_by_hand(level: torch.Tensor, selection, merge: str = "mean") -> torch.Tensor:
    """A selection applied to one image's rows of another feature set: kept rows, or each group merged by hand."""
    if selection.features is None:
        return level[selection.indices]
    merged = []
    for i, (index, group) in enumerate(zip(selection.indices.tolist(), selection.groups)):
        if selection.weights is not None:  # the merge states its coefficients (bilinear resize, running means)
            merged.append(selection.weights[i].float() @ level[group].float())
        elif merge == "mean":
            merged.append(level[group].float().mean(dim=0))
        else:  # visionzip "target_plus_mean": the target (the slot's own token) plus the mean of the other members
            others = group[group != index]
            target = level[index].float()
            merged.append(target + level[others].float().mean(dim=0) if others.numel() else target)
    return torch.stack(merged).to(level.dtype)


# -- images ---------------------------------------------------------------------------------------------------------

def image_token_id(model) -> int:
    return int(model.config.image_token_id)


def prompt_ids(args, kwargs) -> torch.Tensor:
    """``input_ids`` of a call to ``model.model`` (LLaVA-NeXT passes it positionally)."""
    return (kwargs["input_ids"] if "input_ids" in kwargs else args[0]).clone()


def hook_census(model) -> list[tuple[str, int, int]]:
    return [(name, len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()]


def hand_built(model, inputs, family: str, positions: str = "reindex"):
    """The shortened prompt built by hand from the recorded selection: the reference the cut must equal."""
    records = vtc.last_selection(model)
    enc_keys = {"pixel_values", "image_grid_thw", "image_sizes", "batch_num_images"}
    with torch.no_grad():
        full = model.model.get_image_features(**{k: v for k, v in inputs.items() if k in enc_keys}, return_dict=True)
    feats = [f[r.indices] if r.selection.features is None else r.selection.features
             for f, r in zip(full.pooler_output, records)]
    for f, r in zip(full.pooler_output, records):  # the built-in merges (pool, visionzip) are group means
        if r.selection.features is not None:
            assert torch.allclose(reduce_by_hand(f, r.selection), r.selection.features, atol=1e-5)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    is_img = ids == image_token_id(model)
    keep = torch.ones_like(ids, dtype=torch.bool)
    slots = is_img.flatten().nonzero().squeeze(-1)
    keep.view(-1)[slots] = False
    offset = 0
    for r in records:
        keep.view(-1)[slots[offset + r.indices]] = True
        offset += r.num_tokens
    assert ids.shape[0] == 1, "hand-built reference is for one prompt"
    video = None
    if inputs.get("pixel_values_videos") is not None:  # videos get their own recorded selection (video_budget)
        video = video_reference(model, inputs, keep, family)
    short = {"input_ids": ids[:, keep[0]], "attention_mask": mask[:, keep[0]]}
    if family in QWEN_FAMILIES:
        pos, _ = model.model.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                            image_grid_thw=inputs["image_grid_thw"], attention_mask=mask,
                                            video_grid_thw=inputs.get("video_grid_thw"),
                                            second_per_grid_ts=inputs.get("second_per_grid_ts"))
        mrope = pos[:, :, keep[0]]
        text = torch.arange(mrope.shape[-1], device=mrope.device)[None, None]
        short["position_ids"] = torch.cat([text, mrope], dim=0)
        short["mm_token_type_ids"] = inputs["mm_token_type_ids"][:, keep[0]]
    elif positions == "keep":
        short["position_ids"] = torch.arange(ids.shape[1], device=ids.device)[None, keep[0]]
    image = BaseModelOutputWithPooling(pooler_output=tuple(feats))
    if family == "qwen3_vl":  # every deepstack level gets the image's selection too
        deepstack = [tuple(reduce_by_hand(f, r.selection) for f, r in zip(level, records))
                     for level in full.deepstack_features]
        image = type(full)(pooler_output=tuple(feats), deepstack_features=deepstack)
    short["mm_encoder_outputs"] = {"image": image}
    if video is not None:
        short["mm_encoder_outputs"]["video"] = video
    return short, int(keep.sum())


# -- videos ---------------------------------------------------------------------------------------------------------

# video ``n`` of a batch: (frame seeds, width, height). Frames repeat so progressive really folds tokens across
# frames (on Qwen a temporal step fuses two frames: video 0 is steps A, A, B). OneVision stacks the videos of a batch
# into one tensor, so its videos share a frame count; Qwen's differ in size and length.
VIDEOS = {
    "qwen": [([0, 0, 0, 0, 1, 1], 56, 42), ([3, 3, 4, 4], 84, 56)],
    "llava_onevision": [([0, 0, 1, 1, 2, 2], 56, 42), ([3, 4, 5, 3, 4, 5], 84, 56)],
}


def video_token_id(model) -> int:
    return adapter_for(model).video_token_id()


def make_video(family: str, n: int) -> np.ndarray:
    seeds, width, height = VIDEOS["llava_onevision" if family == "llava_onevision" else "qwen"][n]
    return np.stack([np.array(tiny.random_image(width, height, seed=100 + s)) for s in seeds])


def video_inputs(processor, family: str, questions: list[str], first_video: int = 0, image: bool = False):
    """One video per prompt (video ``first_video + i`` for prompt ``i``), optionally an image before it; left
    padding."""
    texts, videos = [], []
    for i, question in enumerate(questions):
        content = ([{"type": "image"}] if image else []) + [{"type": "video"}, {"type": "text", "text": question}]
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                   tokenize=False))
        videos.append(make_video(family, first_video + i))
    kwargs = {"text": texts, "videos": videos, "return_tensors": "pt", "padding": True}
    if image:
        kwargs["images"] = [[tiny.random_image(64, 48, seed=first_video + i)] for i in range(len(questions))]
    if family == "qwen3_vl":  # keep every frame (its processor otherwise resamples at a default fps)
        kwargs["do_sample_frames"] = False
    inputs = processor(**kwargs)
    if family == "qwen2_5_vl":
        # 1 s per temporal step (2 fps, as real inputs): without video metadata the processor assumes 24 fps, and every
        # step would then round to the same temporal M-RoPE id
        inputs["second_per_grid_ts"] = torch.ones_like(inputs["second_per_grid_ts"])
    return inputs


def merge_by_hand(level: torch.Tensor, selection) -> torch.Tensor:
    """A (flat) selection applied to a video's rows of a feature set: kept rows, a merge stated as coefficients
    replayed, or else each group's mean (the built-in merges without weights: pool, visionzip)."""
    if selection.features is None:
        return level[selection.indices]
    if selection.weights is not None:
        rows = [w.float() @ level[g].float() for g, w in zip(selection.groups, selection.weights)]
        return torch.stack(rows).to(level.dtype)
    return reduce_by_hand(level, selection)


def full_video_features(model, inputs):
    args = [inputs["pixel_values_videos"]]
    if inputs.get("video_grid_thw") is not None:  # Qwen; OneVision's frames are fixed-size
        args.append(inputs["video_grid_thw"])
    with torch.no_grad():
        return model.model.get_video_features(*args, return_dict=True)


def video_reference(model, inputs, keep: torch.Tensor, family: str):
    """The video part of a hand-built shortened prompt: clears the unkept video placeholders in ``keep`` (``[B, L]``,
    edited in place) and returns the ``mm_encoder_outputs["video"]`` holding, per video, the unwrapped model's own
    features at the kept indices (merged ones checked against the full features), OneVision's newline, and on
    Qwen3-VL every deepstack level gathered (merged) the same way."""
    records = vtc.last_video_selection(model)
    full = full_video_features(model, inputs)
    slots = (inputs["input_ids"] == video_token_id(model)).flatten().nonzero().squeeze(-1)
    keep.view(-1)[slots] = False
    deepstack = list(getattr(full, "deepstack_features", None) or [])
    kept, kept_levels, offset = [], [[] for _ in deepstack], 0
    assert len(records) == len(full.pooler_output)
    for v, record in enumerate(records):
        n = record.num_tokens
        feats, suffix = full.pooler_output[v][:n], full.pooler_output[v][n:]
        assert suffix.shape[0] == record.num_suffix_tokens == (1 if family == "llava_onevision" else 0)
        sizes = [rows * cols for rows, cols in record.grids]
        video = VideoTokens([VisualTokens(features=f, grid=g) for f, g in zip(torch.split(feats, sizes), record.grids)])
        flat = record.selection.flat(video)
        assert flat.indices.tolist() == torch.cat(
            [r.selection.indices + o for r, o in zip(record.selection.frames, video.offsets())]).tolist()
        if flat.features is None:
            picked = feats[flat.indices]
        else:  # the recorded merge equals the group means / stated weights of the full features
            picked = flat.features
            assert torch.allclose(merge_by_hand(feats, flat), picked, atol=1e-5)
        kept.append(torch.cat([picked, suffix]))
        for j, level in enumerate(deepstack):
            kept_levels[j].append(merge_by_hand(level[v], flat))
        keep.view(-1)[slots[offset + flat.indices]] = True
        keep.view(-1)[slots[offset + n: offset + n + suffix.shape[0]]] = True  # the newline, always kept
        offset += n + suffix.shape[0]
    assert offset == slots.numel()
    if family == "llava_onevision":  # the model flattens [videos, tokens, D] itself
        return type(full)(pooler_output=torch.cat(kept)[None])
    if deepstack:
        return type(full)(pooler_output=tuple(kept), deepstack_features=[tuple(level) for level in kept_levels])
    return type(full)(pooler_output=tuple(kept))


def skip_if_resized(model, compressor: str) -> None:
    """Skip an exact-budget / original-positions oracle for a compressor that resizes the pictures before the
    encoder on this family (``downsample`` on the Qwen families): the LLM then receives the prompt of a smaller
    picture, with that prompt's own positions and ``h * w <= k`` tokens. Its oracle -- the processor's prompt for
    the smaller picture -- is in tests/test_downsample.py."""
    import pytest

    from vtc import create_compressor

    if create_compressor(compressor).input_grid((2, 2), 1) is not None and adapter_for(model).can_resize_inputs:
        pytest.skip(f"{compressor} resizes before the encoder here; its oracle is in tests/test_downsample.py")


def skip_if_refused(model, compressor: str) -> None:
    """Skip an image test for a video-only compressor (``Compressor.video_only``) on a family without a video input:
    ``vtc.apply`` refuses it there unless ``images_as_video=True`` (tests/test_video_only.py checks the refusal)."""
    import pytest

    from vtc import get_compressor_class

    if get_compressor_class(compressor).video_only and not adapter_for(model).supports_video:
        pytest.skip(f"{compressor} compares frames; refused without a video input (tests/test_video_only.py)")
