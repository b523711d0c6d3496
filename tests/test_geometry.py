"""Token boxes on the user's original image (``vtc.integrations.transformers.geometry``) for all six tiny families,
the embedded default model, videos, processor-config variants and checkpoint-resolution geometry (LLaVA-v1.6 336/14,
OneVision 384/14, Qwen2-VL 14 px patches, on towers of tiny width).

Alignment: every image of a batched call under ``vtc.apply(model, "random", budget=1.0)`` gets ``record.num_tokens``
boxes (every video frame ``rows * cols``), NaN exactly for the prefix / newline tokens (and, where an image is padded,
for tokens that see padding only).

The strong check: the picture's colour encodes its coordinates (R = x / W, G = y / H, B = 255 marks image pixels), so
the pixels the model actually sees for a token -- read from ``pixel_values`` (``pixel_values_videos``) and de-normalised,
and laid out into tokens by transformers' own code (LLaVA's patch grid; AnyRes: ``pack_image_features``, which tiles,
unpads, downscales and adds newlines; OneVision videos: ``apply_pooling``; Qwen: the processor's flattened patch rows,
``merge**2`` consecutive rows per token) -- say where that token looks. Their mean must lie inside the token's box
or within half a patch of it -- in fact within ``PRECISION`` patches of its centre -- for every token of several
wide / tall / square images per family. Boxes lie inside the image (they are clipped to it). Padding is told apart
from the image by its blue channel (each pixel's image share ``a`` is read from B, and the padding colour is removed),
so tokens partly in padding are checked on their image part and tokens with no image pixel must have no box.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import vtc
from vtc import testing as tiny
from vtc.integrations.transformers.geometry import TokenBoxes, image_token_boxes, video_token_boxes

QUESTION = "what is in the image ?"

#: per family: the prompts of one batched call, each a list of (width, height) images. Wide, tall and square per
#: family; NeXT 64x20 / 20x64 are unpadded (rows / columns cut off the 1x2 / 2x1 canvas), 64x40 is cut mid-crop;
#: OneVision 128x96 / 96x128 are unpadded and downscaled by anyres_max_9, and its 2-image prompt encodes each image as
#: a pad-to-square base view; Qwen 200x150 is shrunk to max_pixels, 20x20 grown to min_pixels.
IMAGES = {
    "llava": [[(96, 40)], [(40, 96)], [(64, 64)], [(37, 53)]],
    "llava_next": [[(64, 20)], [(20, 64)], [(48, 48)], [(64, 40)], [(100, 30)]],
    "llava_onevision": [[(64, 40)], [(128, 96)], [(96, 128)], [(40, 100)], [(50, 50)], [(64, 20), (30, 60)]],
    "qwen2_5_vl": [[(96, 40)], [(40, 96), (64, 64)], [(200, 150)], [(20, 20)]],
    "qwen2_vl": [[(96, 40)], [(40, 96), (64, 64)], [(200, 150)], [(20, 20)]],
    "qwen3_vl": [[(96, 40)], [(40, 96), (64, 64)], [(200, 150)], [(20, 20)]],
}
DEFAULT_IMAGES = [[(300, 200)], [(200, 300)], [(224, 224)]]
#: (width, height, frames) of the coordinate video per video family
VIDEO = {"llava_onevision": (72, 40, 3), "qwen2_5_vl": (72, 40, 4), "qwen2_vl": (40, 72, 4), "qwen3_vl": (88, 56, 4)}

#: the geometry is exact up to resampling and 8-bit colour: a token's pixels centre within this many patches of its box
#: centre (measured: <= 0.04 everywhere but at the edge of OneVision's pad-to-square base views, where the bicubic
#: resize blends image and padding: <= 0.09); the rule the demo may rely on is "inside, or within half a patch"
PRECISION = 0.15
#: ... except on a OneVision canvas downscaled by anyres_max_N when the view size is not a multiple of the patch (384 px
#: views of 14 px patches: the tower never sees the last 6 px of each crop). A downscaled token's box is its footprint
#: on the canvas, but near a crop seam the bilinear resize mixes tokens of two crops across that unseen strip, so
#: their pixels centre up to ~0.21 patch off the footprint's centre (measured) -- inside the half-patch rule.
SEAM_PRECISION = 0.3
NEWLINE = torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64)  # marks packed tokens without pixels (a < 0)


# ------------------------------------------------------------------------------------------------------------ pixels
def coord_image(width: int, height: int) -> Image.Image:
    """R = (x + .5) / W * 255, G = (y + .5) / H * 255 (pixel centres), B = 255: smooth, so a resize keeps it linear."""
    arr = np.empty((height, width, 3), np.uint8)
    arr[..., 0] = np.round((np.arange(width) + 0.5) / width * 255)[None, :]
    arr[..., 1] = np.round((np.arange(height) + 0.5) / height * 255)[:, None]
    arr[..., 2] = 255
    return Image.fromarray(arr)


def denormalise(values: torch.Tensor, proc, channel_dim: int) -> torch.Tensor:
    """``pixel_values`` back to 0..255 colour (image_mean / image_std, rescale factor)."""
    x = values.double()
    shape = [1] * x.dim()
    shape[channel_dim] = 3
    if proc.do_normalize:
        x = x * torch.tensor(proc.image_std, dtype=torch.float64).view(shape) \
            + torch.tensor(proc.image_mean, dtype=torch.float64).view(shape)
    if proc.do_rescale:
        x = x / proc.rescale_factor
    return x


def image_share(rgb: torch.Tensor, pad, channel_dim: int) -> torch.Tensor:
    """Per pixel ``(a*R_img, a*G_img, a)``: ``a`` = share of image in the pixel (from B), the padding colour removed."""
    r, g, b = rgb.unbind(channel_dim)
    a = (b - pad[2]) / (255.0 - pad[2])
    return torch.stack([r - (1 - a) * pad[0], g - (1 - a) * pad[1], a], dim=-1)


def grid_stats(rgb: torch.Tensor, patch: int, pad) -> torch.Tensor:
    """``[..., 3, H, W]`` colour -> ``[..., rows * cols, 3]`` per-patch sums of ``image_share``, raster order."""
    share = image_share(rgb, pad, -3)  # [..., H, W, 3]
    *lead, h, w, _ = share.shape
    rows, cols = h // patch, w // patch
    share = share[..., : rows * patch, : cols * patch, :].reshape(*lead, rows, patch, cols, patch, 3)
    return share.sum(dim=(-4, -2)).reshape(*lead, rows * cols, 3)


def mean_colour_pad(proc) -> tuple[int, int, int]:
    return tuple(int(x * 255) for x in proc.image_mean)  # OneVision's pad_to_square background


# ------------------------------------------------------------------------------------------------------------ truth
def llava_truth(model, processor, inputs, i: int, prefix: int) -> torch.Tensor:
    proc = processor.image_processor
    rgb = denormalise(inputs["pixel_values"][i], proc, 0)
    stats = grid_stats(rgb, model.config.vision_config.patch_size, (0.0, 0.0, 0.0))
    return torch.cat([NEWLINE.expand(prefix, 3), stats])


def anyres_truth(model, processor, inputs, i: int) -> torch.Tensor:
    """Per-view patch statistics packed by the model's own ``pack_image_features`` (tiling, unpadding, OneVision's
    bilinear downscale, newlines)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    proc, cfg = processor.image_processor, model.config
    counts = inputs.get("batch_num_images")
    crops = True if counts is None else [n == 1 for n in counts.tolist() for _ in range(n)][i]
    views = image_size_to_num_patches(image_size=inputs["image_sizes"][i].tolist(),
                                      grid_pinpoints=cfg.image_grid_pinpoints,
                                      patch_size=cfg.vision_config.image_size) if crops else 1
    pad = (0.0, 0.0, 0.0) if crops else mean_colour_pad(proc)
    rgb = denormalise(inputs["pixel_values"][i, :views], proc, 1)
    stats = grid_stats(rgb, cfg.vision_config.patch_size, pad)  # [views, side*side, 3]
    sizes = inputs["image_sizes"][i : i + 1]
    from transformers import LlavaOnevisionForConditionalGeneration

    if isinstance(model, LlavaOnevisionForConditionalGeneration):
        packed, _ = model.model.pack_image_features([stats], sizes, image_newline=NEWLINE,
                                                    vision_aspect_ratio=cfg.vision_aspect_ratio)
    else:
        packed, _ = model.model.pack_image_features([stats], sizes, cfg.vision_feature_select_strategy,
                                                    image_newline=NEWLINE)
    return packed[0]


def qwen_rows_truth(model, proc, rows: torch.Tensor) -> torch.Tensor:
    """Flattened patch rows ``[n, C*T*p*p]`` (the processor's order) -> per merged token sums (merge**2 rows each)."""
    vis = model.config.vision_config
    p, t = vis.patch_size, vis.temporal_patch_size
    rgb = denormalise(rows.reshape(-1, 3, t, p, p), proc, 1)
    share = image_share(rgb, (0.0, 0.0, 0.0), 1)  # [n, T, p, p, 3]
    per_row = share.sum(dim=(1, 2, 3))
    unit = vis.spatial_merge_size ** 2
    return per_row.reshape(-1, unit, 3).sum(dim=1)


def qwen_truth(model, processor, inputs, i: int) -> torch.Tensor:
    sizes = inputs["image_grid_thw"].prod(-1).tolist()
    start = sum(sizes[:i])
    return qwen_rows_truth(model, processor.image_processor, inputs["pixel_values"][start : start + sizes[i]])


def image_truth(family, model, processor, inputs, i: int, prefix: int) -> torch.Tensor:
    if family in tiny.QWEN_FAMILIES:
        return qwen_truth(model, processor, inputs, i)
    if family in tiny.ANYRES_FAMILIES:
        return anyres_truth(model, processor, inputs, i)
    return llava_truth(model, processor, inputs, i, prefix)


# ------------------------------------------------------------------------------------------------------------ checks
def check_boxes(boxes: TokenBoxes, truth: torch.Tensor, size: tuple[int, int], label: str,
                expect_no_padding_only: bool = True) -> float:
    """The strong check; returns the worst centre error in patches (the callers hold it to ``PRECISION``)."""
    width, height = size
    assert isinstance(boxes, TokenBoxes) and len(boxes) == truth.shape[0], label
    assert boxes.boxes.dtype == torch.float32 and boxes.views.dtype == torch.int64, label
    nan = torch.isnan(boxes.boxes)
    assert torch.equal(nan.any(1), nan.all(1)), label
    nan = nan.any(1)
    assert torch.equal(nan, boxes.views == -1), label
    share = truth[:, 2]
    marker, empty, seen = share < -0.5, (share.abs() < 1e-6), share > 0.5
    assert nan[marker].all() and nan[empty].all(), f"{label}: tokens without image pixels need NaN boxes"
    assert not nan[seen].any(), f"{label}: tokens that see image pixels need boxes"
    if expect_no_padding_only:
        assert torch.equal(nan, marker), f"{label}: NaN rows must be exactly the prefix / newline tokens"
    b = boxes.boxes.double()
    finite = ~nan
    # rule: every box lies inside the image (clipped to it), with a positive area
    assert (b[finite, 0] >= 0).all() and (b[finite, 1] >= 0).all(), label
    assert (b[finite, 2] <= width + 1e-4).all() and (b[finite, 3] <= height + 1e-4).all(), label
    assert (b[finite, 2] > b[finite, 0]).all() and (b[finite, 3] > b[finite, 1]).all(), label
    check = seen & finite
    mean_x = truth[check, 0] / share[check] / 255 * width
    mean_y = truth[check, 1] / share[check] / 255 * height
    centre_x = (b[check, 0] + b[check, 2]) / 2
    centre_y = (b[check, 1] + b[check, 3]) / 2
    # half a patch, per view (the median token of the view, over its unit of patches)
    views = boxes.views[check]
    worst = 0.0
    for view in views.unique().tolist():
        sel = views == view
        bw = (b[check][sel, 2] - b[check][sel, 0]).median() / boxes.unit[1]
        bh = (b[check][sel, 3] - b[check][sel, 1]).median() / boxes.unit[0]
        err = torch.maximum((mean_x[sel] - centre_x[sel]).abs() / bw, (mean_y[sel] - centre_y[sel]).abs() / bh)
        k = int(err.argmax())
        assert float(err[k]) <= 0.5, (f"{label}, view {view}: the pixels of a token centre at "
                                      f"({float(mean_x[sel][k]):.2f}, {float(mean_y[sel][k]):.2f}) but its box is "
                                      f"{b[check][sel][k].tolist()} ({float(err[k]):.2f} patches off)")
        inside = ((mean_x[sel] >= b[check][sel, 0] - bw / 2) & (mean_x[sel] <= b[check][sel, 2] + bw / 2)
                  & (mean_y[sel] >= b[check][sel, 1] - bh / 2) & (mean_y[sel] <= b[check][sel, 3] + bh / 2))
        assert inside.all(), label
        worst = max(worst, float(err.max()))
    return worst


def covers_image(boxes: TokenBoxes, view: int, size: tuple[int, int], fraction: float = 1.0) -> None:
    """A view that shows the whole image uncut: its boxes tile it (areas sum to the image's, or to the ``fraction``
    of it the tower's patches reach: a 384 px view of 14 px patches leaves its last 6 px rows / columns unseen)."""
    b = boxes.boxes[boxes.views == view].double()
    area = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).sum()
    assert float(area) == pytest.approx(size[0] * size[1] * fraction, rel=1e-4)


# ------------------------------------------------------------------------------------------------------------ calls
def image_call(processor, family: str, prompts: list[list[tuple[int, int]]]):
    texts = [tiny.build_prompt(processor, QUESTION, num_images=len(p)) for p in prompts]
    images = [[coord_image(w, h) for w, h in p] for p in prompts]
    return processor(text=texts, images=images, return_tensors="pt", padding=True)


def run_records(model, inputs):
    vtc.apply(model, "random", budget=1.0)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    return vtc.last_selection(model), vtc.last_video_selection(model)


def no_pixel_tokens(record) -> torch.Tensor:
    mask = torch.zeros(record.num_tokens, dtype=torch.bool)
    mask[: record.num_prefix_tokens] = True
    if record.layout is not None:
        mask |= record.layout.is_newline()
    return mask


def check_call(family, model, processor, prompts, inputs=None) -> float:
    inputs = inputs if inputs is not None else image_call(processor, family, prompts)
    records, _ = run_records(model, inputs)
    sizes = [s for p in prompts for s in p]
    assert [r.image_index for r in records] == list(range(len(sizes)))
    for record, size in zip(records, sizes):
        i = record.image_index
        boxes = image_token_boxes(model, processor, inputs, i, size)
        label = f"{family} image {i} ({size[0]}x{size[1]})"
        # 1. aligned with the record: one box per token, NaN exactly for tokens without pixels
        assert len(boxes) == record.num_tokens, label
        base_only = record.layout is not None and record.layout.canvas is None
        if not base_only:
            assert torch.equal(torch.isnan(boxes.boxes).any(1), no_pixel_tokens(record)), label
        # 2. the strong check against the pixels the model sees
        truth = image_truth(family, model, processor, inputs, i, record.num_prefix_tokens)
        worst = check_boxes(boxes, truth, size, label, expect_no_padding_only=not base_only)
        vision = model.config.vision_config
        seams = record.layout is not None and record.layout.canvas is not None and record.layout.canvas.resized \
            and vision.image_size % vision.patch_size != 0
        assert worst <= (SEAM_PRECISION if seams else PRECISION), label
        if family in tiny.QWEN_FAMILIES:
            assert boxes.unit == (2, 2)
            covers_image(boxes, 0, size)
        else:
            assert boxes.unit == (1, 1)
        if record.layout is not None and record.layout.canvas is not None:
            vision = model.config.vision_config
            seen = (vision.image_size // vision.patch_size) * vision.patch_size / vision.image_size
            covers_image(boxes, 0, size, seen**2)  # the base view is the whole image squashed
            assert set(boxes.views.tolist()) <= set(range(-1, record.layout.num_views))
    vtc.remove(model)


# ------------------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_image_boxes_match_the_pixels_each_token_sees(family):
    model, processor = tiny.build_tiny(family)
    check_call(family, model, processor, IMAGES[family])


def test_default_model_boxes():
    model, processor = vtc.load_default()
    check_call("llava", model, processor, DEFAULT_IMAGES)


def test_llava_boxes_cover_the_centre_crop_only():
    """The tiny LLaVA resizes the shortest edge to 48 and center-crops 48x48: a wide image loses its sides."""
    model, processor = tiny.build_tiny("llava")
    inputs = image_call(processor, "llava", [[(96, 40)]])
    boxes = image_token_boxes(model, processor, inputs, 0, (96, 40))
    assert boxes.boxes[:, 1].min() == 0 and boxes.boxes[:, 3].max() == 40
    # resized to int(48 * 96 / 40) = 115 x 48, crop columns [33, 81) of it
    assert float(boxes.boxes[:, 0].min()) == pytest.approx(33 * 96 / 115, abs=1e-4)
    assert float(boxes.boxes[:, 2].max()) == pytest.approx(81 * 96 / 115, abs=1e-4)


def clip_variant(processor, pil: bool = False, **kwargs):
    from transformers import CLIPImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor.image_processor = (CLIPImageProcessorPil if pil else CLIPImageProcessor)(**kwargs)
    return processor


@pytest.mark.parametrize("variant", ["squash", "crop_inside", "crop_pads", "crop_pads_pil", "full_strategy"])
def test_llava_follows_the_processor_config(variant):
    """Boxes follow what the processor's config says: resize to height/width (no crop), a crop smaller than the
    resized image, a crop larger than it (padding: tokens entirely in padding get no box; the PIL backend pads
    ceil, torchvision floor), and the CLS prefix of the "full" strategy."""
    model, processor = tiny.build_tiny("llava")
    prompts = [[(96, 40)], [(40, 96)], [(50, 50)]]
    padding_only = False
    if variant == "squash":
        clip_variant(processor, size={"height": 48, "width": 48}, do_center_crop=False)
    elif variant == "crop_inside":
        clip_variant(processor, size={"shortest_edge": 64}, crop_size={"height": 48, "width": 48})
    elif variant in ("crop_pads", "crop_pads_pil"):
        clip_variant(processor, pil=variant.endswith("pil"), size={"height": 41, "width": 33},
                     crop_size={"height": 48, "width": 48})
        padding_only = True
    else:
        model.config.vision_feature_select_strategy = "full"
        processor.vision_feature_select_strategy = "full"
    inputs = image_call(processor, "llava", prompts)
    records, _ = run_records(model, inputs)
    for record, (size,) in zip(records, prompts):
        boxes = image_token_boxes(model, processor, inputs, record.image_index, size)
        assert len(boxes) == record.num_tokens
        assert record.num_prefix_tokens == (1 if variant == "full_strategy" else 0)
        truth = llava_truth(model, processor, inputs, record.image_index, record.num_prefix_tokens)
        assert check_boxes(boxes, truth, size, f"{variant} {size}", expect_no_padding_only=not padding_only) \
            <= PRECISION
        if variant == "squash":
            covers_image(boxes, 0, size)
        if padding_only:
            # resized to 33 px wide, cropped to 48: torchvision pads (48 - 33) // 2 = 7 px on the left (the image is
            # columns [7, 40): token column 5 = [40, 48) is all padding), the PIL backend pads ceil = 8 ([8, 41):
            # token column 0 = [0, 8) is all padding)
            nan_cols = torch.isnan(boxes.boxes[:, 0]).reshape(6, 6).all(0).tolist()
            assert nan_cols == ([True] + [False] * 5 if variant.endswith("pil") else [False] * 5 + [True])


def check_video(family, model, processor, width: int, height: int, frames: int) -> None:
    video = np.stack([np.array(coord_image(width, height))] * frames)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    kwargs = {"text": [processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)],
              "videos": [video], "return_tensors": "pt"}
    if family == "qwen3_vl":
        kwargs["do_sample_frames"] = False
    inputs = processor(**kwargs)
    _, videos = run_records(model, inputs)
    record = videos[0]
    per_frame = video_token_boxes(model, processor, inputs, 0, (width, height))
    assert len(per_frame) == record.num_frames == len(record.selection.frames)
    vp, vision = processor.video_processor, model.config.vision_config
    if family in tiny.QWEN_FAMILIES:
        truth = qwen_rows_truth(model, vp, inputs["pixel_values_videos"])
        truths = list(torch.split(truth, [r * c for r, c in record.grids]))
        assert record.num_frames == math.ceil(frames / vision.temporal_patch_size)
        seen = 1.0
    else:
        rgb = denormalise(inputs["pixel_values_videos"][0], vp, 1)  # [frames, 3, S, S]
        stats = grid_stats(rgb, vision.patch_size, (0.0, 0.0, 0.0))
        truths = list(model.model.apply_pooling(stats))  # the model's own bilinear 2x2 pooling
        assert record.num_frames == frames
        seen = ((vision.image_size // vision.patch_size) * vision.patch_size / vision.image_size) ** 2
    for t, (boxes, (rows, cols), truth) in enumerate(zip(per_frame, record.grids, truths)):
        assert len(boxes) == rows * cols
        assert boxes.unit == (2, 2)
        assert check_boxes(boxes, truth, (width, height), f"{family} video frame {t}") <= PRECISION
        covers_image(boxes, 0, (width, height), seen)
    vtc.remove(model)


@pytest.mark.parametrize("family", tiny.VIDEO_FAMILIES)
def test_video_boxes_match_the_pixels_each_token_sees(family):
    model, processor = tiny.build_tiny(family)
    check_video(family, model, processor, *VIDEO[family])


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision", "qwen2_vl"])
def test_boxes_are_in_the_original_when_the_processor_got_a_resized_copy(family):
    """AnyRes reads the size the processor saw from image_sizes and Qwen resizes the whole picture, so boxes land on
    the user's original even when a resized copy went to the processor (the colours encode coordinates as fractions
    of the picture, so the same truth holds in the original's pixels)."""
    model, processor = tiny.build_tiny(family)
    given, original = [(64, 20), (128, 96), (40, 100)], [(200, 62), (1000, 750), (41, 99)]
    inputs = image_call(processor, family, [[s] for s in given])
    for i, size in enumerate(original):
        boxes = image_token_boxes(model, processor, inputs, i, size)
        truth = image_truth(family, model, processor, inputs, i, 0)
        assert check_boxes(boxes, truth, size, f"{family} {given[i]} -> {size}") <= PRECISION


# ---------------------------------------------------------------------------------------------- checkpoint geometry
def real_geometry(family: str):
    """The processors of the real checkpoints (LLaVA-v1.6: 336 px views of 14 px patches and its 5 pinpoints;
    OneVision: 384 px views, 27x27 patches -- odd, so unpadding, anyres_max_9 and the video pooling 27 -> 14 are not
    multiples of 2 -- and its 36 pinpoints; Qwen2-VL: 14 px patches, 56*56 .. 28*28*1280 pixels), on models whose
    towers have checkpoint resolution but tiny widths."""
    import transformers as tf

    from vtc.integrations.transformers.families.qwen2_5_vl import qwen_text_config, qwen_token_ids

    tok = tiny.build_tokenizer(family)
    ids = tok.convert_tokens_to_ids
    vision = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, patch_size=14)
    if family == "llava_next":
        pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        config = tf.LlavaNextConfig(vision_config=tf.CLIPVisionConfig(image_size=336, **vision),
                                    text_config=tiny.tiny_text_config(tf.LlamaConfig, tok), image_token_index=ids("<image>"),
                                    image_grid_pinpoints=pinpoints)
        processor = tf.LlavaNextProcessor(
            image_processor=tf.LlavaNextImageProcessor(size={"shortest_edge": 336},
                                                       crop_size={"height": 336, "width": 336},
                                                       image_grid_pinpoints=pinpoints),
            tokenizer=tok, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
            chat_template=tok.chat_template)
        model = tf.LlavaNextForConditionalGeneration(config)
    elif family == "llava_onevision":
        image_processor = tf.LlavaOnevisionImageProcessor()  # 384x384 views, the 36 checkpoint pinpoints
        config = tf.LlavaOnevisionConfig(vision_config=tf.SiglipVisionConfig(image_size=384, **vision),
                                         text_config=tiny.tiny_text_config(tf.Qwen2Config, tok),
                                         image_token_index=ids("<image>"), video_token_index=ids("<video>"),
                                         vision_feature_layer=-1, vision_feature_select_strategy="full",
                                         image_grid_pinpoints=image_processor.image_grid_pinpoints)
        processor = tf.LlavaOnevisionProcessor(
            image_processor=image_processor, tokenizer=tok, video_processor=tf.LlavaOnevisionVideoProcessor(),
            num_image_tokens=27 * 27, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
            chat_template=tok.chat_template)
        model = tf.LlavaOnevisionForConditionalGeneration(config)
    else:
        config = tf.Qwen2VLConfig(text_config=qwen_text_config(tok),
                                  vision_config=dict(depth=1, embed_dim=16, hidden_size=64, mlp_ratio=1, num_heads=2,
                                                     patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
                                  **qwen_token_ids(tok))
        processor = tf.Qwen2VLProcessor(image_processor=tf.Qwen2VLImageProcessor(), tokenizer=tok,
                                        video_processor=tf.Qwen2VLVideoProcessor(),
                                        chat_template=tok.chat_template)
        model = tf.Qwen2VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval(), processor


#: wide (unpadded rows), tall (unpadded columns), and for OneVision two that are unpadded and then downscaled by
#: anyres_max_9 (1600x1100: 3x5 crops of 384 px, the 81x135 canvas unpadded to 81x117, downscaled to 67x97;
#: 1000x1400: 4x3 crops, 108x81 unpadded to 108x77, downscaled to 95x68) -- (width, height)
REAL_IMAGES = {
    "llava_next": [[(800, 300)], [(333, 700)], [(640, 480)]],
    "llava_onevision": [[(800, 300)], [(333, 700)], [(1600, 1100)], [(1000, 1400)],
                        [(500, 240), (240, 500)]],
    "qwen2_vl": [[(800, 300)], [(333, 700)], [(640, 480)]],
}


#: OneVision's video frames: 384 px, 27x27 patches pooled to 14x14 (a footprint of 27/14 patches)
REAL_VIDEO = {"llava_onevision": (320, 180, 2), "qwen2_vl": (320, 180, 2)}


@pytest.mark.parametrize("family", sorted(REAL_IMAGES))
def test_checkpoint_geometry(family):
    model, processor = real_geometry(family)
    check_call(family, model, processor, REAL_IMAGES[family])
    if family in REAL_VIDEO:
        check_video(family, model, processor, *REAL_VIDEO[family])


def test_images_as_video_frames_are_the_prompt_images():
    model, processor = tiny.build_tiny("llava")
    prompts = [[(96, 40), (40, 96)], [(64, 64)]]
    inputs = image_call(processor, "llava", prompts)
    vtc.apply(model, "random", budget=1.0, images_as_video=True)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    videos = vtc.last_video_selection(model)
    assert len(videos) == 2
    frames = video_token_boxes(model, processor, inputs, 0, (96, 40))
    assert [len(f) for f in frames] == [r * c for r, c in videos[0].grids]
    assert torch.equal(frames[0].boxes, image_token_boxes(model, processor, inputs, 0, (96, 40)).boxes)
    assert len(video_token_boxes(model, processor, inputs, 1, (64, 64))) == 1


def test_clear_errors():
    model, processor = tiny.build_tiny("llava")
    inputs = image_call(processor, "llava", [[(64, 64)]])
    with pytest.raises(IndexError, match="holds 1 image"):
        image_token_boxes(model, processor, inputs, 1, (64, 64))
    with pytest.raises(ValueError, match="width, height"):
        image_token_boxes(model, processor, inputs, 0, (64,))
    with pytest.raises(ValueError, match="no video input"):
        video_token_boxes(model, processor, inputs, 0, (64, 64))
    clip_variant(processor, size={"height": 40, "width": 40}, do_center_crop=False)
    with pytest.raises(ValueError, match="pass the processor that built the inputs"):
        image_token_boxes(model, processor, inputs, 0, (64, 64))
    qwen, qwen_processor = tiny.build_tiny("qwen2_vl")
    with pytest.raises(ValueError, match="image_grid_thw"):
        image_token_boxes(qwen, qwen_processor, {}, 0, (64, 64))
