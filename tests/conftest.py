"""Shared fixtures: tiny random-weight models of the real transformers classes, saved and reloaded from disk."""

from __future__ import annotations

import pytest
import torch

from vtc import testing as tiny

FAMILIES = tiny.FAMILIES

# (width, height) of the test images per family, from its tiny model (``register_tiny`` in families/<family>.py); Qwen
# images differ in size so multi-image prompts mix token counts and windows
IMAGE_SIZES = tiny.IMAGE_SIZES


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """One save_pretrained folder per family, built once per session."""
    root = tmp_path_factory.mktemp("tiny")
    return {family: tiny.save_tiny(family, root / family, seed=0) for family in FAMILIES}


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def loaded(tiny_dirs, family):
    """A fresh (model, processor) pair loaded from disk, so wrapping in one test never leaks into another."""
    model, processor = tiny.load_tiny(tiny_dirs[family])
    return model, processor


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


# -- the README's support matrix is generated from these tests (python -m vtc.eval.support_matrix) ----------------

_support_outcomes: dict[tuple[str, str, str], list[bool]] = {}


def pytest_addoption(parser):
    parser.addoption("--support-matrix", metavar="PATH", default=None,
                     help="write the family x compressor support matrix (markdown) from this run's results")
    parser.addoption("--update-screenshot", action="store_true", default=False,
                     help="tests/test_demo_browser.py also writes its screenshot to docs/demo.png (the README's)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    from vtc.eval.support_matrix import SUPPORT_TESTS

    column = SUPPORT_TESTS.get(getattr(item, "originalname", ""))
    params = getattr(getattr(item, "callspec", None), "params", {})
    family = params.get("family", params.get("video_family"))
    if column and family and "compressor" in params and (report.when == "call" or report.failed):
        _support_outcomes.setdefault((family, params["compressor"], column), []).append(report.passed)
    return report


def pytest_sessionfinish(session):
    path = session.config.getoption("--support-matrix")
    if path:
        from vtc.eval.support_matrix import render

        with open(path, "w") as fh:
            fh.write(render(_support_outcomes))
