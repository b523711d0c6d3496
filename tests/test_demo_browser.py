"""The web demo as a person uses it: a real headless Chromium drives the Gradio page served on localhost.

Needs Debian's chromium (``apt-get install chromium``) and the Playwright Python client (no browser download):
a missing browser FAILS the test -- a demo nobody checked in a browser is not tested. ``--update-screenshot``
also writes the screenshot to docs/demo.png for the README.
"""

from __future__ import annotations

import io
import os
import pathlib
import re
import shutil
import socket

import numpy as np
import pytest
from PIL import Image

from vtc import testing as tiny

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ROOT = pathlib.Path(__file__).resolve().parents[1]
ARTIFACT = ROOT / "tests" / "artifacts" / "demo.png"
README_SHOT = ROOT / "docs" / "demo.png"
RUN_TIMEOUT_MS = 120_000
pytestmark = pytest.mark.filterwarnings("ignore:::gradio.queueing")  # gradio's own pandas deprecations

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
try:
    from playwright.sync_api import expect, sync_playwright
except ImportError as exc:  # pragma: no cover - the environment is incomplete
    raise RuntimeError(f"the browser tests need the Playwright Python client ({exc}): pip install -e '.[demo,dev]'")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from vtc.demo.app import launch
    from vtc.demo.engine import Engine

    served = tmp_path_factory.mktemp("served")
    tiny.save_tiny("llava", served / "tiny-llava")  # a second served model; the page shows its base name only
    engine = Engine(models=[None, str(served / "tiny-llava")], examples_dir=tmp_path_factory.mktemp("demo-examples"))
    engine.model()  # loaded before the page asks, as `vtc demo` does
    port = _free_port()
    demo = launch(engine=engine, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield engine, f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def browser():
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"the browser tests need Debian's chromium at {CHROMIUM}: run `apt-get install chromium` "
                    "(the tests never download a browser)", pytrace=False)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.goto(server[1])
    expect(page.locator("#run")).to_be_visible(timeout=30_000)
    try:
        yield page
    finally:
        context.close()


def _status(page):
    return page.locator("#status textarea")


def _picture(page, server_url: str, elem_id: str) -> Image.Image:
    """The image the browser shows in ``#elem_id``, fetched from the URL the page uses."""
    src = page.locator(f"#{elem_id} img").get_attribute("src")
    assert src, f"#{elem_id} shows no image"
    response = page.request.get(src if src.startswith("http") else server_url.rstrip("/") + src)
    assert response.ok, f"fetching {src}: HTTP {response.status}"
    return Image.open(io.BytesIO(response.body())).convert("RGB")


def test_upload_an_example_compress_and_see_the_kept_tokens(page, server, request):
    engine, url = server
    example = engine.examples[0]
    page.get_by_label("Question").fill(example.question)
    page.locator("#upload input[type=file]").set_input_files(example.path)  # the user's own upload of the file
    expect(_status(page)).to_have_value(re.compile(r"^ready: .*224×224 image"), timeout=30_000)
    expect(page.locator("#expected")).to_contain_text(f"known answer: {example.answer}")
    page.get_by_label("Budget A (tokens, or a fraction)").fill("49")
    page.locator("#run").click()
    expect(_status(page)).to_have_value(re.compile(r"^done"), timeout=RUN_TIMEOUT_MS)

    stats = page.locator("#stats-a").inner_text()
    kept = re.search(r"kept (\d+) / (\d+) visual tokens", stats)
    assert kept, stats
    assert (int(kept[1]), int(kept[2])) == (49, 196)  # the count shown equals the budget
    assert "visual tokens in → out: 196 → 49" in stats
    # a warm median with its n, and "faster" or "slower" by the measured ratio
    assert re.search(r"prefill \(time to first token, median of 3 runs\): [\d.]+ ms \([\d.]+× (faster|slower)\)",
                     stats), stats
    assert "time to first token (median of 3)" in page.locator("#table").inner_text()
    assert re.search(r"prefill FLOPs: [\d.]+ GFLOPs \(\d+ % of all tokens\)", stats)
    assert "all 196 visual tokens" in page.locator("#stats-all").inner_text()
    assert "cls_attention" in page.locator("#table").inner_text()
    # the columns are titled by what they show, and a legend explains the marks
    title_a = page.locator("#picture-a").inner_text()
    assert "cls_attention" in title_a and "tokens" in title_a, title_a
    assert "all 196 tokens" in page.locator("#picture-all").inner_text()
    legend = page.locator("#legend").inner_text()
    for words in ("kept", "pruned", "merged member", "merge representative", "never seen by the model"):
        assert words in legend, legend

    overlay = _picture(page, url, "picture-a")
    original = Image.open(example.path).convert("RGB")
    shown_input = _picture(page, url, "picture-all")
    assert overlay.size == shown_input.size
    resized = np.asarray(original.resize(overlay.size, Image.Resampling.BICUBIC), dtype=np.float64)
    assert np.abs(np.asarray(overlay, dtype=np.float64) - resized).mean() > 20  # pruned tokens are dimmed
    assert np.abs(np.asarray(overlay, dtype=np.float64) - np.asarray(shown_input, dtype=np.float64)).mean() > 20

    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACT), full_page=True)
    if request.config.getoption("--update-screenshot"):
        README_SHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ARTIFACT, README_SHOT)


def test_compare_two_compressors_on_the_bundled_video(page, server):
    engine, url = server
    video = next(e for e in engine.examples if e.kind == "video")
    page.get_by_label(video.label).check()
    expect(_status(page)).to_have_value(re.compile(r"^ready: .*video, 8 frames"), timeout=30_000)
    expect(page.get_by_label("Question")).to_have_value(video.question)
    page.get_by_label("Compare with a second compressor").check()
    page.get_by_label("Budget A (tokens, or a fraction)").fill("0.25")
    page.get_by_label("Budget B (tokens, or a fraction)").fill("64")
    page.get_by_label("Options B (key=value, ... or JSON)").fill("seed=3")
    page.locator("#run").click()
    expect(_status(page)).to_have_value(re.compile(r"^done: 2 compressor"), timeout=RUN_TIMEOUT_MS)
    assert re.search(r"kept 392 / 1568 visual tokens", page.locator("#stats-a").inner_text())
    assert re.search(r"kept 64 / 1568 visual tokens", page.locator("#stats-b").inner_text())
    strip_a, strip_b = _picture(page, url, "picture-a"), _picture(page, url, "picture-b")
    assert strip_a.width > strip_a.height and strip_a.size == strip_b.size  # 8 frames in rows of 4
    assert np.abs(np.asarray(strip_a, dtype=np.float64) - np.asarray(strip_b, dtype=np.float64)).mean() > 5


def test_the_model_is_a_dropdown_of_the_served_models(page, server):
    engine, _ = server
    labels = list(engine.labels.values())
    assert labels == ["vtc-shapes-llava (embedded default)", "tiny-llava"]
    box = page.locator("#model input")
    expect(box).to_have_value(labels[0])
    box.click()
    options = page.locator("ul[role=listbox] li")
    expect(options).to_have_count(2)
    assert [o.replace("✓", "").strip() for o in options.all_inner_texts()] == labels  # ✓ marks the selected
    assert "/" not in "".join(options.all_inner_texts())  # no server path on the page
    options.nth(1).click()
    expect(box).to_have_value("tiny-llava")
    page.get_by_label(engine.examples[0].label).check()
    expect(_status(page)).to_have_value(re.compile(r"^ready"), timeout=30_000)
    page.locator("#run").click()
    expect(_status(page)).to_have_value(re.compile(r"^done: 1 compressor\(s\) on tiny-llava"),
                                        timeout=RUN_TIMEOUT_MS)
    box.fill("/etc")  # not a served model: the dropdown takes no other value
    box.press("Enter")
    box.blur()
    expect(box).not_to_have_value("/etc")


def test_bad_uploads_and_options_show_a_message_not_a_traceback(page, server, tmp_path):
    engine, _ = server
    notes = tmp_path / "notes.txt"
    notes.write_text("shopping list\n" * 50)
    page.locator("#upload input[type=file]").set_input_files(str(notes))
    expect(_status(page)).to_have_value(re.compile(r"^error: notes\.txt is neither an image nor a video"),
                                        timeout=30_000)
    page.locator("#run").click()
    expect(_status(page)).to_have_value(re.compile(r"^error: notes\.txt is neither"), timeout=RUN_TIMEOUT_MS)

    page.get_by_label(engine.examples[1].label).check()
    expect(_status(page)).to_have_value(re.compile(r"^ready"), timeout=30_000)
    page.get_by_label("Options A (key=value, ... or JSON)").fill("no_such_option=1")
    page.locator("#run").click()
    expect(_status(page)).to_have_value(re.compile(r"^error: compressor A \(cls_attention\): .*no_such_option"),
                                        timeout=RUN_TIMEOUT_MS)
    assert "Traceback" not in page.content()


def test_run_and_status_are_on_screen_without_scrolling(page):
    """A 1400x1000 window shows Run (under the question, above the settings) and the status (at the top of the
    results) without scrolling."""
    run_box = page.locator("#run").bounding_box()
    status_box = page.locator("#status").bounding_box()
    assert run_box and run_box["y"] + run_box["height"] < 900, run_box
    assert status_box and status_box["y"] < 1000, status_box


def _run_example(page, example):
    page.get_by_label(example.label).check()
    expect(_status(page)).to_have_value(re.compile(r"^ready"), timeout=30_000)
    page.locator("#run").click()
    expect(_status(page)).to_have_value(re.compile(r"^done"), timeout=RUN_TIMEOUT_MS)
    expect(page.locator("#stats-a")).to_contain_text("kept")
    expect(page.locator("#picture-a img")).to_have_count(1)


def test_editing_the_question_clears_the_answers_and_the_known_answer_follows_it(page, server):
    engine, _ = server
    example = engine.examples[0]
    _run_example(page, example)
    expect(page.locator("#expected")).to_contain_text(f"known answer: {example.answer}")
    question = page.get_by_label("Question")
    question.fill("is there a purple unicorn?")
    for elem_id in ("stats-all", "stats-a", "table"):
        expect(page.locator(f"#{elem_id}")).not_to_contain_text("kept")
        expect(page.locator(f"#{elem_id}")).not_to_contain_text("prefill")
    expect(page.locator("#picture-a img")).to_have_count(0)  # the overlay answered another question
    expect(page.locator("#expected")).not_to_contain_text("known answer")
    other = next((q for q in example.answers if q != example.question), None)
    if other is not None:  # another question of the same sample: its own known answer
        question.fill(other)
        expect(page.locator("#expected")).to_contain_text(f"known answer: {example.answers[other]}")
    question.fill(example.question)
    expect(page.locator("#expected")).to_contain_text(f"known answer: {example.answer}")


def test_a_bad_upload_clears_the_previous_results_and_shows_the_error_on_screen(page, server, tmp_path):
    engine, _ = server
    _run_example(page, engine.examples[0])
    notes = tmp_path / "notes.txt"
    notes.write_text("shopping list\n" * 50)
    page.locator("#upload").get_by_label("Clear").click()  # the example's file goes; the upload area returns
    page.locator("#upload input[type=file]").set_input_files(str(notes))
    expect(_status(page)).to_have_value(re.compile(r"^error: notes\.txt is neither an image nor a video"),
                                        timeout=30_000)
    box = page.locator("#status").bounding_box()
    assert box and box["y"] < 1000, box  # seen without scrolling
    expect(_status(page)).to_be_in_viewport()
    for elem_id in ("picture-all", "picture-a"):
        expect(page.locator(f"#{elem_id} img")).to_have_count(0)  # nothing of the previous input stays
    for elem_id in ("stats-all", "stats-a", "table"):
        expect(page.locator(f"#{elem_id}")).not_to_contain_text("kept")
    expect(page.locator("#expected")).not_to_contain_text("known answer")


#: every word of the visible text under the selectors that the browser drew on more than one line (split mid-word)
SPLIT_WORDS_JS = """
(selectors) => {
  const split = [];
  for (const root of document.querySelectorAll(selectors)) {
    const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      for (const match of node.textContent.matchAll(/\\S+/g)) {
        const range = document.createRange();
        range.setStart(node, match.index);
        range.setEnd(node, match.index + match[0].length);
        const tops = new Set([...range.getClientRects()].filter(r => r.width > 0).map(r => Math.round(r.top)));
        if (tops.size > 1) split.push(match[0]);
      }
    }
  }
  return split;
}
"""


def test_at_800_px_numbers_stay_whole_pictures_have_alt_text_and_the_status_is_announced(browser, server):
    """A narrow window: no word or number of the results is broken across lines (a wide table scrolls instead);
    each result picture has an alt text naming what it shows; the status is a polite live region."""
    engine, url = server
    context = browser.new_context(viewport={"width": 800, "height": 1000})
    page = context.new_page()
    try:
        page.goto(url)
        expect(page.locator("#run")).to_be_visible(timeout=30_000)
        live = page.locator("#status-live")
        expect(live).to_have_attribute("role", "status")
        expect(live).to_have_attribute("aria-live", "polite")
        page.get_by_label("Compare with a second compressor").check()
        page.get_by_label(engine.examples[0].label).check()
        expect(page.locator("#picture-all img")).to_have_attribute("alt", "All tokens: the input as uploaded",
                                                                    timeout=30_000)  # before a run: no grid yet
        _run_example(page, engine.examples[0])
        status = _status(page).input_value()
        expect(live).to_have_text(status)  # what a screen reader announces is the status itself

        alts = {elem_id: page.locator(f"#{elem_id} img").get_attribute("alt")
                for elem_id in ("picture-all", "picture-a", "picture-b")}
        assert alts["picture-all"].startswith("all 196 tokens: ") and "token grid" in alts["picture-all"], alts
        assert re.match(r"cls_attention @ 25 % → 49 tokens: .*kept", alts["picture-a"]), alts
        assert re.match(r"random @ 25 % → 49 tokens: .*kept", alts["picture-b"]), alts

        selectors = "#table, .vtc-stats"
        expect(page.locator("#table table")).to_be_visible()
        for cell in page.locator("#table th, #table td").all():
            style = cell.evaluate("e => [getComputedStyle(e).wordBreak, getComputedStyle(e).overflowWrap, "
                                  "getComputedStyle(e).hyphens]")
            assert style == ["normal", "normal", "none"], style
        assert page.evaluate(SPLIT_WORDS_JS, selectors) == []
        table = page.locator("#table").bounding_box()
        assert table and table["x"] + table["width"] <= 800 + 1, table  # the page itself never scrolls sideways
        assert page.locator("#table").evaluate("e => e.scrollWidth <= e.clientWidth || "
                                               "getComputedStyle(e).overflowX === 'auto'")  # a wide table scrolls
        page.screenshot(path=str(ARTIFACT.with_name("demo-800px.png")), full_page=True)  # for a look, not checked
    finally:
        context.close()


def test_a_hanging_model_load_says_loading_and_holds_up_no_other_user(browser, tmp_path):
    """One user asks for a model whose load hangs: their status says it is loading, another user's request on the
    loaded model completes meanwhile, and the failed load ends in one message."""
    import threading

    from vtc.demo.app import launch
    from vtc.demo.engine import DemoError, Engine, _load_model

    slow, release = "org/slow-model", threading.Event()

    def loader(ref):
        if ref != slow:
            return _load_model(ref)
        assert release.wait(300)
        raise DemoError(f"cannot load model {slow!r}: the download was interrupted")

    engine = Engine(allow_any_model=True, examples_dir=tmp_path / "examples", loader=loader)
    engine.model()
    port = _free_port()
    demo = launch(engine=engine, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    contexts = [browser.new_context(viewport={"width": 1400, "height": 1000}) for _ in range(2)]
    try:
        first, second = (context.new_page() for context in contexts)
        for page in (first, second):
            page.goto(f"http://127.0.0.1:{port}/")
            expect(page.locator("#run")).to_be_visible(timeout=30_000)
            page.get_by_label(engine.examples[0].label).check()
            expect(_status(page)).to_have_value(re.compile(r"^ready"), timeout=30_000)
        box = first.locator("#model input")
        box.fill(slow)
        box.press("Enter")
        expect(box).to_have_value(slow)
        first.locator("#run").click()
        expect(_status(first)).to_have_value(re.compile(rf"^loading model {slow} \(its first use"), timeout=30_000)
        second.locator("#run").click()
        expect(_status(second)).to_have_value(re.compile(r"^done: 1 compressor"), timeout=RUN_TIMEOUT_MS)
        expect(_status(first)).to_have_value(re.compile(r"^loading model"))  # still waiting for its load
        release.set()
        expect(_status(first)).to_have_value(f"error: cannot load model {slow!r}: the download was interrupted",
                                              timeout=30_000)
    finally:
        release.set()
        for context in contexts:
            context.close()
        demo.close()
