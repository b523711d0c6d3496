"""Every bad input gets a clear error naming the problem and the fix."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import vtc
from helpers import greedy, hand_built, make_inputs
from vtc.testing import ANYRES_FAMILIES, QWEN_FAMILIES


@pytest.mark.parametrize("budget, error", [(0, ValueError), (-5, ValueError), (math.nan, ValueError), (1.5, ValueError),
                                           (True, TypeError), ("64", TypeError), (None, TypeError)])
def test_bad_budget_at_apply(loaded, budget, error):
    model, _ = loaded
    with pytest.raises(error, match="budget must be"):
        vtc.apply(model, "cls_attention", budget=budget)
    assert not vtc.is_applied(model)


def test_unknown_compressor_at_apply(loaded):
    model, _ = loaded
    with pytest.raises(ValueError, match="registered compressors: " + ", ".join(vtc.list_compressors())):
        vtc.apply(model, "hiprunee", budget=8)


def test_unknown_option_at_apply(loaded):
    model, _ = loaded
    with pytest.raises(TypeError, match="unknown option"):
        vtc.apply(model, "fastervlm", budget=8, layr=3)


def test_layer_out_of_range_fails_at_apply(loaded):
    model, _ = loaded
    with pytest.raises(ValueError, match="out of range"):
        vtc.apply(model, "fastervlm", budget=8, layer=99)


def test_unsupported_model_names_supported_families():
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=32))
    with pytest.raises(TypeError, match="does not support LlamaForCausalLM; supported model classes: llava "
                                        "\\(LlavaForConditionalGeneration\\), llava_next "
                                        "\\(LlavaNextForConditionalGeneration\\), llava_onevision "
                                        "\\(LlavaOnevisionForConditionalGeneration\\), qwen2_5_vl"):
        vtc.apply(model, "cls_attention", budget=8)


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_position_mode_not_available_for_qwen(tiny_dirs, family):
    from vtc import testing as tiny

    model, _ = tiny.load_tiny(tiny_dirs[family])
    with pytest.raises(ValueError, match=f"positions='reindex' is not available for {family}"):
        vtc.apply(model, "cls_attention", budget=8, positions="reindex")


def _drop_last_patches(inputs):
    inputs["pixel_values"] = inputs["pixel_values"][:-4]


def _llava_style_pixels(inputs):
    inputs["pixel_values"] = torch.zeros(1, 3, 48, 48)


def _other_patch_size(inputs):
    inputs["pixel_values"] = inputs["pixel_values"][:, :-3]


def _odd_grid(inputs):
    grid = inputs["image_grid_thw"].clone()
    grid[0, 1:] = torch.tensor([int(grid[0, 1] * grid[0, 2]) // 3, 3])  # same patch count, width 3
    inputs["image_grid_thw"] = grid


@pytest.mark.parametrize("family", QWEN_FAMILIES)
@pytest.mark.parametrize("spoil, message", [
    (lambda inputs: inputs.pop("image_grid_thw"), "needs image_grid_thw next to pixel_values"),
    (_llava_style_pixels, "expects pixel_values as flattened patches"),
    (_drop_last_patches, "image_grid_thw describes .* patches but pixel_values has .* rows"),
    (_other_patch_size, "pixel_values rows have .* values but this .* tower takes patches of"),
    (_odd_grid, "not divisible by the spatial merge size"),
], ids=["no-grid", "4d-pixels", "patch-count", "patch-width", "odd-grid"])
def test_bad_qwen_vision_inputs_are_named(tiny_dirs, family, spoil, message):
    from vtc import testing as tiny

    model, processor = tiny.load_tiny(tiny_dirs[family])
    inputs = make_inputs(processor, family, ["what is the color ?"], [1])
    spoil(inputs)
    vtc.apply(model, "visionzip", budget=4)
    with pytest.raises(ValueError, match=message):
        model.generate(**inputs, max_new_tokens=1)
    with pytest.raises(ValueError, match=message):
        model(**inputs)


def test_placeholder_mismatch_is_reported(loaded, family):
    model, processor = loaded
    inputs = make_inputs(processor, family, ["what is the color ?"], [1])
    image_id = model.config.image_token_id
    first = int((inputs["input_ids"][0] == image_id).nonzero()[0])
    inputs["input_ids"][0, first] = 5  # one placeholder lost, e.g. a hand-edited prompt
    vtc.apply(model, "cls_attention", budget=4)
    with pytest.raises(ValueError, match="image placeholder tokens but the images give"):
        model.generate(**inputs, max_new_tokens=2)


def test_inputs_embeds_with_pixels_is_rejected(loaded, family):
    model, processor = loaded
    inputs = make_inputs(processor, family, ["what is the color ?"], [1])
    ids = inputs.pop("input_ids")
    inputs["inputs_embeds"] = model.get_input_embeddings()(ids)
    vtc.apply(model, "cls_attention", budget=4)
    with pytest.raises(ValueError, match="needs input_ids"):
        model(**inputs)


def test_last_selection_on_unwrapped_model(loaded):
    model, _ = loaded
    with pytest.raises(ValueError, match="call vtc.apply"):
        vtc.last_selection(model)


def test_budget_above_token_count_keeps_all(loaded, family):
    model, processor = loaded
    vtc.apply(model, "fastervlm", budget=10_000)
    with torch.no_grad():
        model.generate(**make_inputs(processor, family, ["what is the color ?"], [1]), max_new_tokens=1)
    record = vtc.last_selection(model)[0]
    assert record.num_kept == record.num_tokens and record.num_kept_visual == record.num_visual_tokens == record.budget


# ---------------------------------------------------------------------------------------------- odd images
def _image(width, height, mode="RGB"):
    from vtc import testing as tiny

    return tiny.random_image(width, height, seed=3).convert(mode)


ODD_IMAGES = {
    "1x1": lambda: _image(1, 1),
    "1x400": lambda: _image(1, 400),  # width x height: very tall (AnyRes: the crop canvas is cut to zero width)
    "400x1": lambda: _image(400, 1),  # very wide (AnyRes: the crop canvas is cut to zero rows)
    "grayscale": lambda: _image(48, 40, "L"),
    "rgba": lambda: _image(48, 40, "RGBA"),
}


@pytest.mark.parametrize("kind", ODD_IMAGES)
def test_odd_images_work_or_fail_clearly(loaded, family, kind):
    """Tiny, extremely wide / tall, grayscale and RGBA images: either everything works (keep-all is the unwrapped
    model, a compressed prompt equals the hand-built one) or the processor refuses the image with a clear message."""
    from vtc import testing as tiny

    model, processor = loaded
    text = tiny.build_prompt(processor, "what is the color ?", 1)
    try:
        inputs = processor(text=[text], images=[ODD_IMAGES[kind]()], return_tensors="pt")
    except ValueError as error:  # Qwen's processor caps the aspect ratio, before vtc is involved
        assert family in QWEN_FAMILIES and kind in ("1x400", "400x1"), error
        assert "aspect ratio must be smaller than 200" in str(error)
        return
    baseline = greedy(model, inputs)
    vtc.apply(model, "fastervlm", budget=1.0)
    assert greedy(model, inputs).tolist() == baseline.tolist()
    vtc.apply(model, "hiprune", budget=3)
    out = greedy(model, inputs)
    record = vtc.last_selection(model)[0]
    assert record.num_kept_visual == record.budget == min(3, record.num_visual_tokens)
    short, short_len = hand_built(model, inputs, family)
    vtc.remove(model)
    assert out[:, inputs["input_ids"].shape[1]:].tolist() == greedy(model, short)[:, short_len:].tolist()


@pytest.mark.parametrize("family_name", ANYRES_FAMILIES)
def test_budget_below_the_number_of_views_works(tiny_dirs, family_name):
    from vtc import testing as tiny

    model, processor = tiny.load_tiny(tiny_dirs[family_name])
    inputs = make_inputs(processor, family_name, ["what is the color ?"], [1], first_image=1)
    for allocation in ("even", "hired", "globalcom2"):
        vtc.apply(model, "visionzip", budget=1, allocation=allocation)
        model.generate(**inputs, max_new_tokens=1)
        record = vtc.last_selection(model)[0]
        assert len(record.view_budgets) > 1 and sum(record.view_budgets) == record.num_kept_visual == 1


# ---------------------------------------------------------------------------------------------- AnyRes inputs
def _no_image_sizes(family, inputs):
    inputs.pop("image_sizes")


def _small_views(family, inputs):
    inputs["pixel_values"] = inputs["pixel_values"][..., :16, :16]


def _sizes_of_another_image(family, inputs):
    inputs["image_sizes"] = torch.tensor([[400, 400]])  # a square image: 2x2 crops, more views than were made


def _stacked_views(family, inputs):
    inputs["pixel_values"] = inputs["pixel_values"][0, :2]  # [views, 3, H, W] missing views


def _bad_image_sizes(family, inputs):
    inputs["image_sizes"] = torch.tensor([[0, 64]])


def _other_strategy(family, inputs):
    inputs["vision_feature_select_strategy"] = "full" if family == "llava_next" else "default"


@pytest.mark.parametrize("family_name", ANYRES_FAMILIES)
@pytest.mark.parametrize("spoil, message", [
    (_no_image_sizes, "needs image_sizes next to pixel_values"),
    (_small_views, "views must be 3x32x32"),
    (_sizes_of_another_image, "does not hold the views of the 1 images in image_sizes"),
    (_stacked_views, "pixel_values stacks 2 views but image_sizes implies"),
    (_bad_image_sizes, "are not image sizes"),
    (_other_strategy, "vision_feature_select_strategy="),
], ids=["no-sizes", "view-size", "other-sizes", "stacked", "zero-size", "strategy"])
def test_bad_anyres_inputs_are_named(tiny_dirs, family_name, spoil, message):
    from vtc import testing as tiny

    model, processor = tiny.load_tiny(tiny_dirs[family_name])
    inputs = make_inputs(processor, family_name, ["what is the color ?"], [1])
    spoil(family_name, inputs)
    vtc.apply(model, "fastervlm", budget=4)
    with pytest.raises(ValueError, match=message):
        model.generate(**inputs, max_new_tokens=1)
    with pytest.raises(ValueError, match=message):
        model(**inputs)


def test_onevision_batch_num_images_must_count_the_images(tiny_dirs):
    from vtc import testing as tiny

    model, processor = tiny.load_tiny(tiny_dirs["llava_onevision"])
    inputs = make_inputs(processor, "llava_onevision", ["what is the color ?"], [1])
    inputs["batch_num_images"] = torch.tensor([2])
    vtc.apply(model, "fastervlm", budget=4)
    with pytest.raises(ValueError, match="batch_num_images \\[2\\] counts 2 images but image_sizes has 1"):
        model.generate(**inputs, max_new_tokens=1)
