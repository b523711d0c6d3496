"""vtc.flops: hand-computed goldens, a cross-check against torch.utils.flop_counter on the tiny models, bad input.

FlopCounterMode counts matmuls, convolutions and attention kernels only, the same scope as ``vtc.flops.FORMULA``,
so even at the tiny models' widths (where norms and softmax are not negligible) the two must agree. It has no
formula for CPU's fused SDPA kernel, so the counts run under the math backend, whose matmuls it does count (the
full L x L square, as the formula states).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import vtc
from helpers import IMAGE_SIZES
from vtc.flops import (
    FORMULA,
    FlopsBreakdown,
    TransformerDims,
    VisionDims,
    VLMDims,
    decode_flops_per_token,
    prefill_flops,
    transformer_flops,
)
from vtc.integrations.transformers.flops import model_dims, request_flops
from vtc.testing import FAMILIES, VIDEO_FAMILIES, build_prompt, build_tiny, random_image

TOLERANCE = 0.05  # the bound; the tiny models measure 0.00 % except Qwen2.5-VL's partial windows

# ---------------------------------------------------------------------------------------------------------------
# goldens (every number below is worked out by hand from FORMULA)

LLM = TransformerDims(num_layers=2, hidden=8, intermediate=16, num_heads=2, num_kv_heads=1, head_dim=4,
                      gated_mlp=True)
TOWER = TransformerDims(num_layers=1, hidden=4, intermediate=8, num_heads=1, num_kv_heads=1, head_dim=4,
                        gated_mlp=False)


def test_transformer_flops_golden():
    # L=3 queries, C=5 keys, h=8, H*d=8, K*d=4, i=16, gated; per layer:
    #   q 2*3*8*8=384, k+v 2*2*3*8*4=384, out 2*3*8*8=384, scores+weighted 2*2*3*5*8=480, MLP 3*2*3*8*16=2304
    assert transformer_flops(LLM, 3, 5) == 2 * (384 + 384 + 384 + 480 + 2304)  # 7872
    # default context = the full 3x3 square: attention 2*2*3*3*8 = 288
    assert transformer_flops(LLM, 3) == 2 * (384 * 3 + 288 + 2304)  # 7488
    # plain MLP: 2*2*3*8*16 = 1536
    plain = TransformerDims(2, 8, 16, 2, 1, 4, gated_mlp=False)
    assert transformer_flops(plain, 3, 5) == 2 * (384 * 3 + 480 + 1536)  # 6336
    assert transformer_flops(LLM, 0) == 0


def test_prefill_and_decode_golden():
    # tower pass on 5 tokens (4 patches + CLS): patch embed 2*4*12*4 = 384; layer: q 160, k+v 320, out 160,
    # attention 2*2*5*5*4 = 400, MLP 2*2*5*4*8 = 640 -> 1680; pass = 2064; 3 images x 2 views -> 12384
    vision = VisionDims(TOWER, tokens_per_image=5, patch_embed_in=12, cls_tokens=1, views=2)
    # projector: 8 tokens per image (2 views x 4), per token 2*4*6 + 2*6*6 = 120; 3 images -> 2880
    vlm = VLMDims(vision, projector=((4, 6), (6, 6)), projector_tokens_per_image=8, llm=LLM, vocab_size=10)
    got = prefill_flops(vlm, text_tokens=1, visual_tokens_kept=2, images=3)
    # LLM at 1 + 2 = 3 tokens: 7488 (above); LM head on one position: 2*8*10 = 160
    assert got == FlopsBreakdown(vision=12384, projector=2880, llm=7488, lm_head=160)
    assert got.total == 22912
    assert got.as_dict() == {"vision": 12384, "projector": 2880, "llm": 7488, "lm_head": 160, "total": 22912}
    # one decode step attending to 5 keys: q 128, k+v 128, out 128, attention 2*2*1*5*8 = 160, MLP 768 -> 1312
    # per layer, 2 layers + LM head 160
    assert decode_flops_per_token(vlm, 5) == 2 * 1312 + 160


def test_windowed_layers_and_pooling_head_golden():
    two = TransformerDims(2, 4, 8, 1, 1, 4, gated_mlp=False)
    full = VisionDims(two, tokens_per_image=5, patch_embed_in=12)
    windowed = VisionDims(two, tokens_per_image=5, patch_embed_in=12, window=2, full_attention_layers=(1,))

    def vision(v):
        return prefill_flops(VLMDims(v, (), 0, LLM, 10), 0, 0).vision

    # layer 0 windowed: attention 2*2*5*2*4 = 160 instead of 2*2*5*5*4 = 400
    assert vision(full) - vision(windowed) == 400 - 160
    # a window at least as large as the image is the whole image
    assert vision(VisionDims(two, 5, 12, window=64)) == vision(full)
    # the exact windows 2 + 2 + 1: attention 2*2*(2*2 + 2*2 + 1*1)*4 = 144, where min(window, N) gives 160
    exact = VisionDims(two, tokens_per_image=5, patch_embed_in=12, window=2, full_attention_layers=(1,),
                       window_sizes=(2, 2, 1))
    assert vision(windowed) - vision(exact) == 160 - 144
    # SigLIP pooling head on 5 tokens, h=4, i=8: probe q 2*4*4=32, k+v 2*2*5*4*4=320, scores+weighted 2*2*5*4=80,
    # out 32, MLP on one token 2*2*4*8=128
    pooled = VisionDims(two, tokens_per_image=5, patch_embed_in=12, attention_pool_head=True)
    assert vision(pooled) - vision(full) == 32 + 320 + 80 + 32 + 128


def test_formula_names_every_part():
    for part in ("vision", "projector", "llm", "lm_head", "Decode", "window", "causal"):
        assert part in FORMULA


# ---------------------------------------------------------------------------------------------------------------
# cross-check against torch.utils.flop_counter on the tiny models

SIZES = {  # (width, height); Qwen2.5-VL 96x96 = 3x3 whole windows, so the windowed term is exact
    "llava": (48, 48),
    "llava_next": (48, 48),  # 2x2 crops: 5 views
    "llava_onevision": (64, 40),  # 2x2 crops: 5 views
    "qwen2_vl": (96, 96),
    "qwen2_5_vl": (96, 96),
    "qwen3_vl": (96, 64),
}


def measured(fn) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        fn()
    return counter.get_total_flops()


def rel(got: int, expected: int) -> float:
    return abs(got - expected) / expected


class Case:
    """A tiny model, one processed single-image prompt, and its dims."""

    def __init__(self, family: str, size=None):
        self.family = family
        self.model, self.processor = build_tiny(family)
        self.inputs = self.processor(images=[random_image(*(size or SIZES[family]))],
                                     text=[build_prompt(self.processor, "what is in the image ?")],
                                     return_tensors="pt")
        ids = self.inputs["input_ids"]
        self.length = ids.shape[1]
        self.visual = int((ids == self.model.config.image_token_id).sum())
        self.text = self.length - self.visual
        if family.startswith("qwen"):
            self.dims = model_dims(self.model, int(self.inputs["image_grid_thw"][0].prod()))
        elif family == "llava":
            self.dims = model_dims(self.model)
        else:  # AnyRes: one tower pass per view
            self.dims = model_dims(self.model, views_per_image=self.inputs["pixel_values"].shape[1])

    def llm_flops(self, tokens: int) -> int:
        embeds = torch.randn(1, tokens, self.dims.llm.hidden)
        return measured(lambda: self.model.model.language_model(inputs_embeds=embeds))


@pytest.fixture(scope="module", params=FAMILIES)
def case(request):
    return Case(request.param)


def test_full_forward_matches(case):
    """One forward with pixel_values + input_ids, logits for the last position only (as generate's prefill)."""
    expected = prefill_flops(case.dims, case.text, case.visual)
    got = measured(lambda: case.model(**case.inputs, logits_to_keep=1))
    assert rel(got, expected.total) < TOLERANCE, (case.family, got, expected)
    # a plain forward computes the logits of every position: the formula's one position times the length
    all_logits = measured(lambda: case.model(**case.inputs))
    assert rel(all_logits - got, (case.length - 1) * expected.lm_head) < TOLERANCE


@pytest.mark.parametrize("share", [1.0, 0.25])
def test_llm_forward_matches_at_kept_length(case, share):
    kept = max(1, round(case.visual * share))
    expected = prefill_flops(case.dims, case.text, kept).llm
    got = case.llm_flops(case.text + kept)
    assert rel(got, expected) < TOLERANCE, (case.family, share, got, expected)


def test_llava_tower_and_projector_separately():
    c = Case("llava")
    expected = prefill_flops(c.dims, c.text, c.visual)
    pixels = c.inputs["pixel_values"]
    assert c.dims.vision.tokens_per_image == 37  # 6x6 patches + CLS
    tower = c.model.model.vision_tower
    assert rel(measured(lambda: tower(pixels, output_hidden_states=True)), expected.vision) < TOLERANCE
    features = torch.randn(1, c.dims.projector_tokens_per_image, c.dims.projector[0][0])
    assert rel(measured(lambda: c.model.model.multi_modal_projector(features)), expected.projector) < TOLERANCE


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_qwen_vision_with_merger(family):
    """Qwen's visual module is tower + merger(s) (Qwen3-VL: deepstack mergers too): vision + projector."""
    c = Case(family)
    expected = prefill_flops(c.dims, c.text, c.visual)
    got = measured(lambda: c.model.model.visual(c.inputs["pixel_values"], grid_thw=c.inputs["image_grid_thw"]))
    assert rel(got, expected.vision + expected.projector) < TOLERANCE, (got, expected)


def test_qwen2_5_vl_partial_windows_are_an_upper_bound():
    # 64x48 -> 8x6 patches, 4x3 merged tokens, windows of 2x2 merged: two whole (16 patches) and two half (8)
    c = Case("qwen2_5_vl", size=(64, 48))
    expected = prefill_flops(c.dims, c.text, c.visual)
    got = measured(lambda: c.model.model.visual(c.inputs["pixel_values"], grid_thw=c.inputs["image_grid_thw"]))
    assert expected.vision + expected.projector >= got
    assert rel(got, expected.vision + expected.projector) < TOLERANCE


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_pruned_forward_matches_kept_length(family):
    """vtc.apply keeping 1/4 of the visual tokens: the tower and projector still see all, the LLM the rest."""
    c = Case(family)
    kept = c.visual // 4
    vtc.apply(c.model, "random", budget=kept)
    try:
        got = measured(lambda: c.model(**c.inputs, logits_to_keep=1))
    finally:
        vtc.remove(c.model)
    expected = prefill_flops(c.dims, c.text, kept)
    assert rel(got, expected.total) < TOLERANCE, (got, expected)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_decode_step_matches(family):
    c = Case(family)
    language_model, head = c.model.model.language_model, c.model.lm_head
    embeds = torch.randn(1, c.length + 1, c.dims.llm.hidden)
    with torch.no_grad():
        cache = language_model(inputs_embeds=embeds[:, :-1], use_cache=True).past_key_values

    def step():
        head(language_model(inputs_embeds=embeds[:, -1:], past_key_values=cache).last_hidden_state)

    got = measured(step)
    expected = decode_flops_per_token(c.dims, c.length + 1)
    assert rel(got, expected) < TOLERANCE, (got, expected)


# ---------------------------------------------------------------------------------------------------------------
# request_flops: per batch row of a processor output, against the counted forward of that row alone


def chat(processor, images: int = 0, video: bool = False, question: str = "what is in the image ?") -> str:
    content = [{"type": "image"}] * images + [{"type": "video"}] * video + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


def video_frames(seed: int = 0) -> np.ndarray:
    # 6 frames of 56x42: OneVision 6 tower passes; Qwen 3 temporal steps of a 6x8 grid (Qwen2.5-VL: partial windows)
    return np.stack([np.array(random_image(56, 42, seed=100 + seed + i)) for i in range(6)])


def process(family: str, processor, texts, images=None, videos=None):
    kwargs = {"text": texts, "return_tensors": "pt", "padding": True}
    if images is not None:
        kwargs["images"] = images
    if videos is not None:
        kwargs["videos"] = videos
        if family == "qwen3_vl":  # keep every frame (its processor otherwise resamples at a default fps)
            kwargs["do_sample_frames"] = False
    return processor(**kwargs)


def counted(model, inputs) -> int:
    return measured(lambda: model(**inputs, logits_to_keep=1))


def check_request(model, inputs, label, exact: bool = False):
    (got,) = request_flops(model, inputs)
    expected = counted(model, inputs)
    assert rel(got.total, expected) < TOLERANCE, (label, got, expected)
    if exact:
        assert got.total == expected, (label, got, expected)
    return got


def llm_dims(family, model):
    """The LLM's dims (any image's model_dims: the LLM does not depend on it)."""
    if family.startswith("qwen"):
        return model_dims(model, 4).llm
    return model_dims(model, views_per_image=None if family == "llava" else 1).llm


@pytest.fixture(scope="module", params=FAMILIES)
def tiny_model(request):
    model, processor = build_tiny(request.param)
    return request.param, model, processor


def test_request_one_image(tiny_model):
    family, model, processor = tiny_model
    image = random_image(*IMAGE_SIZES[family][1])  # OneVision 128x96: 17 views, downscaled canvas
    inputs = process(family, processor, [chat(processor, 1)], images=[image])
    got = check_request(model, inputs, family)
    assert got.llm == transformer_flops(llm_dims(family, model), inputs["input_ids"].shape[1])


def test_request_two_images_of_different_sizes(tiny_model):
    """One prompt, two images: their own views / grids each (OneVision: base view only, as in any multi-image
    prompt; Qwen2.5-VL: the 64x48 image's partial windows counted exactly)."""
    family, model, processor = tiny_model
    images = [random_image(*size, seed=i) for i, size in enumerate(IMAGE_SIZES[family])]
    inputs = process(family, processor, [chat(processor, 2)], images=[images])
    two = check_request(model, inputs, family, exact=family == "qwen2_5_vl")  # min(window, N) would overcount
    singles = [request_flops(model, process(family, processor, [chat(processor, 1)], images=[image]))[0]
               for image in images]
    if family != "llava_onevision":  # OneVision encodes an image of a multi-image prompt differently (no crops)
        assert two.vision == sum(s.vision for s in singles) and two.projector == sum(s.projector for s in singles)


def test_request_batch_rows_match_each_row_alone(tiny_model):
    """Two rows with different images, left padded: each row's request FLOPs are those of the row run alone; the
    batched forward adds up the rows' vision and projector but runs the LLM on the padded length."""
    family, model, processor = tiny_model
    images = [random_image(*size, seed=i) for i, size in enumerate(IMAGE_SIZES[family])]
    texts = [chat(processor, 1), chat(processor, 1, question="how many red circle are there in the image ?")]
    inputs = process(family, processor, texts, images=images)
    mask = inputs["attention_mask"]
    assert (mask == 0).any()  # really padded
    rows = request_flops(model, inputs)
    for b, (text, image) in enumerate(zip(texts, images)):
        alone = process(family, processor, [text], images=[image])
        assert rows[b] == request_flops(model, alone)[0]
        assert rel(rows[b].total, counted(model, alone)) < TOLERANCE, (family, b)
    assert (rows[0].vision == rows[1].vision) == (family == "llava")  # LLaVA-1.5 resizes every image to 48x48
    padded = transformer_flops(llm_dims(family, model), mask.shape[1])
    batched = sum(r.vision + r.projector + r.lm_head for r in rows) + len(rows) * padded
    assert rel(batched, counted(model, inputs)) < TOLERANCE, family


@pytest.mark.parametrize("with_image", [False, True], ids=["video", "image+video"])
@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_request_video(family, with_image):
    """OneVision: every frame one tower pass, projected, pooled 2x2, plus one newline; Qwen: one tower pass per
    temporal step (t of them), Qwen3-VL's timestamped per-step placeholder runs included."""
    model, processor = build_tiny(family)
    images = [random_image(64, 48)] if with_image else None
    inputs = process(family, processor, [chat(processor, int(with_image), video=True)], images=images,
                     videos=[video_frames()])
    got = check_request(model, inputs, (family, with_image))
    if not with_image:
        video = request_flops(model, inputs)[0]
        assert got == video and video.vision > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_request_compressed(family):
    """vtc keeping ~1/4 of the visual tokens: request_flops at the length the LLM received matches the forward."""
    model, processor = build_tiny(family)
    inputs = process(family, processor, [chat(processor, 1)], images=[random_image(*IMAGE_SIZES[family][0])])
    full = request_flops(model, inputs)[0]
    vtc.apply(model, "random", budget=8)
    try:
        expected = counted(model, inputs)
        (had, received), = vtc.last_prompt_lengths(model)
        got = request_flops(model, inputs, [received])[0]
    finally:
        vtc.remove(model)
    assert had == int(inputs["attention_mask"].sum()) and received < had
    assert (got.vision, got.projector, got.lm_head) == (full.vision, full.projector, full.lm_head)
    assert got.llm < full.llm
    assert rel(got.total, expected) < TOLERANCE, (family, got, expected)


def test_request_compressed_video_batch():
    """Two rows, each an image and a video, compressed: every row at its own received length."""
    family = "qwen2_vl"
    model, processor = build_tiny(family)
    texts = [chat(processor, 1, video=True), chat(processor, 1, video=True, question="what is the color ?")]
    images, videos = [random_image(64, 48), random_image(96, 96, seed=1)], [video_frames(0), video_frames(6)]
    inputs = process(family, processor, texts, images=images, videos=videos)
    vtc.apply(model, "random", budget=6)
    try:
        counted(model, inputs)
        received = [n for _, n in vtc.last_prompt_lengths(model)]
    finally:
        vtc.remove(model)
    rows = request_flops(model, inputs, received)
    for b, text in enumerate(texts):
        alone = process(family, processor, [text], images=[images[b]], videos=[videos[b]])
        vtc.apply(model, "random", budget=6)
        try:
            expected = counted(model, alone)
        finally:
            vtc.remove(model)
        assert rel(rows[b].total, expected) < TOLERANCE, (b, rows[b], expected)


def test_request_flops_bad_input():
    model, processor = build_tiny("qwen2_vl")
    inputs = process("qwen2_vl", processor, [chat(processor, 1)], images=[random_image(64, 48)])
    with pytest.raises(ValueError, match="llm_lengths has 2 entries"):
        request_flops(model, inputs, [10, 10])
    with pytest.raises(ValueError, match="llm_lengths\\[0\\]"):
        request_flops(model, inputs, [0])
    other = process("qwen2_vl", processor, [chat(processor, 1)], images=[random_image(96, 96)])
    with pytest.raises(ValueError, match="placeholder"):
        request_flops(model, {**inputs, "image_grid_thw": other["image_grid_thw"]})
    with pytest.raises(ValueError, match="input_ids"):
        request_flops(model, {"input_ids": inputs["input_ids"][0]})
    with pytest.raises(TypeError, match="supported families"):
        request_flops(torch.nn.Linear(2, 2), inputs)


# ---------------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda v: prefill_flops(v, -1, 0), "text_tokens"),
        (lambda v: prefill_flops(v, 3, 2.5), "visual_tokens_kept"),
        (lambda v: prefill_flops(v, 3, 2, images=True), "images"),
        (lambda v: prefill_flops(v, 3, 2, images=0), "images=0"),
        (lambda v: decode_flops_per_token(v, 0), "context_len"),
        (lambda v: transformer_flops(LLM, 4, "8"), "context"),
        (lambda v: transformer_flops(LLM, -4), "new_tokens"),
        (lambda v: prefill_flops(LLM, 3, 2), "VLMDims"),
    ],
)
def test_bad_arguments_name_themselves(call, name):
    vlm = VLMDims(VisionDims(TOWER, 5, 12), ((4, 8),), 4, LLM, 10)
    with pytest.raises(ValueError, match=name):
        call(vlm)


def test_bad_dims():
    with pytest.raises(ValueError, match="hidden"):
        TransformerDims(2, 0, 16, 2, 1, 4, True)
    with pytest.raises(ValueError, match="num_kv_heads"):
        TransformerDims(2, 8, 16, 3, 2, 4, True)
    with pytest.raises(ValueError, match="gated_mlp"):
        TransformerDims(2, 8, 16, 2, 1, 4, "yes")
    with pytest.raises(ValueError, match="full_attention_layers"):
        VisionDims(TOWER, 5, 12, window=2, full_attention_layers=(3,))
    with pytest.raises(ValueError, match="cls_tokens"):
        VisionDims(TOWER, 1, 12, cls_tokens=1)
    with pytest.raises(ValueError, match="projector"):
        VLMDims(VisionDims(TOWER, 5, 12), (4, 8), 4, LLM, 10)
    with pytest.raises(ValueError, match="window_sizes.*sum to 4"):
        VisionDims(TOWER, 5, 12, window=2, window_sizes=(2, 2))
    with pytest.raises(ValueError, match="needs window"):
        VisionDims(TOWER, 5, 12, window_sizes=(5,))


def test_model_dims_bad_input():
    with pytest.raises(TypeError, match="llava_onevision.*qwen3_vl"):
        model_dims(torch.nn.Linear(2, 2))
    qwen, _ = build_tiny("qwen2_vl")
    with pytest.raises(ValueError, match="image_grid_thw"):
        model_dims(qwen)
    with pytest.raises(ValueError, match="multiple of 4"):
        model_dims(qwen, 30)
    with pytest.raises(ValueError, match="views_per_image"):
        model_dims(build_tiny("llava_next")[0])
    with pytest.raises(ValueError, match="views_per_image"):
        model_dims(build_tiny("llava")[0], views_per_image=3)
