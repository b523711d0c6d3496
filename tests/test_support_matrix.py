"""The README's support matrix is generated, complete and green (it is rewritten by python -m vtc.eval.support_matrix)."""

import pathlib
import re

import vtc
from vtc.eval.support_matrix import END, START, render
from vtc import testing as tiny

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_render_marks_failures_and_missing_cells():
    table = render({("a", "x", "image"): [True, True], ("a", "x", "multi-image"): [True, False],
                    ("b", "x", "image"): [True]})
    assert "| `a` | yes / **FAIL** / – |" in table
    assert "| `b` | yes / – / – |" in table


def test_readme_matrix_covers_every_family_and_compressor_and_is_green():
    text = README.read_text()
    block = text[text.index(START) + len(START): text.index(END)]
    header = next(line for line in block.splitlines() if line.startswith("| family"))
    assert re.findall(r"`([a-z0-9_]+)`", header) == sorted(vtc.list_compressors())
    rows = {re.match(r"\| `([a-z0-9_]+)`", line).group(1): line for line in block.splitlines()
            if re.match(r"\| `[a-z0-9_]+`", line)}
    assert sorted(rows) == sorted(tiny.FAMILIES)
    video_only = [n for n in vtc.list_compressors() if vtc.get_compressor_class(n).video_only]
    for family, line in rows.items():
        if family in tiny.VIDEO_FAMILIES:
            assert line.count("yes / yes / yes") == len(vtc.list_compressors()), line
        else:  # the video-only methods are refused there (images_as_video=True aside): "–", never "FAIL"
            assert line.count("yes / yes / –") == len(vtc.list_compressors()) - len(video_only), line
            assert line.count("– / – / –") == len(video_only), line
