"""Fixtures (tiny random-weight models of the real transformers classes, saved and reloaded from disk) and the
support-matrix hooks; helpers the tests import live in ``helpers.py``."""

from __future__ import annotations

import pytest

from vtc import testing as tiny
from vtc.eval.support_matrix import COLUMNS, render

FAMILIES = tiny.FAMILIES


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


# -- the README's support matrix, from the tests marked @pytest.mark.support(column) ---------------------------------

_support_outcomes: dict[tuple[str, str, str], list[bool]] = {}


def pytest_addoption(parser):
    parser.addoption("--support-matrix", metavar="PATH", default=None,
                     help="write the family x compressor support matrix (markdown) from this run's results")
    parser.addoption("--update-screenshot", action="store_true", default=False,
                     help="tests/test_demo_browser.py also writes its screenshot to docs/demo.png (the README's)")
    parser.addoption("--device", default="cpu",
                     help="where tests/test_device_equality.py runs its models (default cpu; cuda on a GPU machine, "
                          "as `make gpu-check` does)")


@pytest.fixture(scope="session")
def device(request):
    """``--device``: the torch device of tests/test_device_equality.py (the other tests always run on the CPU)."""
    import torch

    name = request.config.getoption("--device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail(f"--device {name}: this torch sees no CUDA device")
    return name


def support_cell(item) -> tuple[str, str, str] | None:
    """``(family, compressor, column)`` of a test marked ``@pytest.mark.support(column)``; ``None`` when unmarked."""
    marker = item.get_closest_marker("support")
    if marker is None:
        return None
    params = getattr(getattr(item, "callspec", None), "params", {})
    family = params.get("family", params.get("video_family"))
    column = marker.args[0] if len(marker.args) == 1 else None
    if family is None and column in COLUMNS and "compressor" in params and "family" in item.fixturenames:
        return None  # the generated tests re-run with a family fixture of their own (a toy family): not a matrix row
    if column not in COLUMNS or family is None or "compressor" not in params:
        raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.support takes one of {COLUMNS} and marks a test "
                                "parametrized by compressor and family (or video_family)")
    return family, params["compressor"], column


def pytest_collection_modifyitems(config, items):
    for item in items:  # a misplaced support marker fails the run at collection, not silently at report time
        support_cell(item)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    cell = support_cell(item)
    # a skipped test (an oracle that does not apply, e.g. downsample's resize on Qwen) does not count for the cell
    if cell is not None and not report.skipped and (report.when == "call" or report.failed):
        _support_outcomes.setdefault(cell, []).append(report.passed)
    return report


def pytest_sessionfinish(session):
    path = session.config.getoption("--support-matrix")
    if path:
        with open(path, "w") as fh:
            fh.write(render(_support_outcomes))
