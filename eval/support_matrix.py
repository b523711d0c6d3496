"""The README's support matrix (family x compressor x image / multi-image / video), generated from the test results.

    python -m vtc.eval.support_matrix [--readme README.md]

Runs the tests marked ``@pytest.mark.support(column)`` -- the generated registry x family equality tests
(keep-all == unwrapped, compressed == hand-built prompt, batch of 2 == singles, forward path; the multi-image prompt
test; and for video families the video tests: keep-all, hand-built, image + video in one prompt, exact video budgets)
-- and rewrites the block between the ``support-matrix`` markers of the README. A cell is "yes" only when every one
of its tests passed in that run; ``tests/conftest.py`` collects the outcomes (``--support-matrix PATH``).
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import tempfile

START, END = "<!-- support-matrix:start -->", "<!-- support-matrix:end -->"
#: a cell's columns: the argument of ``@pytest.mark.support(...)`` on the tests that make it up
COLUMNS = ("image", "multi-image", "video")


def render(outcomes: dict[tuple[str, str, str], list[bool]]) -> str:
    """Markdown table: one row per family, one column per compressor, ``image / multi-image / video`` per cell."""
    families = sorted({f for f, _, _ in outcomes})
    compressors = sorted({c for _, c, _ in outcomes})

    def cell(family, compressor):
        marks = []
        for column in COLUMNS:
            runs = outcomes.get((family, compressor, column))
            marks.append("–" if not runs else ("yes" if all(runs) else "**FAIL**"))
        return " / ".join(marks)

    lines = ["| family | " + " | ".join(f"`{c}`" for c in compressors) + " |",
             "|---|" + "---|" * len(compressors)]
    for family in families:
        lines.append(f"| `{family}` | " + " | ".join(cell(family, c) for c in compressors) + " |")
    total = sum(len(v) for v in outcomes.values())
    lines.append("")
    lines.append(f"Cells read *image / multi-image / video* (– : the family has no video input, or the method is "
                 "refused there: a video-only method on a family without a video input -- LLaVA-1.5 takes it with "
                 "`images_as_video=True`, LLaVA-NeXT's AnyRes images are not frames); generated from "
                 f"{total} test results "
                 "(`python -m vtc.eval.support_matrix`).")
    return "\n".join(lines) + "\n"


def update_readme(readme: pathlib.Path, table: str) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"error: {readme} has no {START} ... {END} block to fill; add the two markers first")
    block = f"{START}\n{table}{END}"
    readme.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S))


def main(argv=None) -> int:
    import pytest

    parser = argparse.ArgumentParser(prog="python -m vtc.eval.support_matrix", description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", default="README.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "matrix.md"
        code = pytest.main(["-q", "-p", "no:cacheprovider", "tests", "-m", "support", "--support-matrix", str(out)])
        if code not in (0, 1) or not out.exists():
            print(f"error: the support tests did not run (pytest exit {code})", file=sys.stderr)
            return 1
        table = out.read_text()
    update_readme(pathlib.Path(args.readme), table)
    print(table)
    return int(code)


if __name__ == "__main__":
    raise SystemExit(main())
