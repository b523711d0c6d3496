"""The Gradio front end: see which visual tokens survive, for an image or a video, with one or two compressors.

Only layout and formatting live here; uploads, models, locking and drawing are ``vtc.demo.engine`` and
``vtc.demo.render``, which are tested without a browser. Every handler turns errors into a line in the status box
(``error: ...``): a user sees what to fix, never a stack trace (unexpected errors are logged on the server).

Run is an async generator with no Gradio concurrency limit: it says when a model is still loading and awaits it
(``Engine.wait_for_model``, time-limited) without taking a slot, and only the work on a loaded model takes one of
``RUN_SLOTS`` -- so one user's slow model load never queues the others. The page is readable by screen readers:
the pictures get alt text naming what they show, and the status is mirrored into a ``role="status"`` live region.

    python -m vtc demo                      # embedded default model, http://127.0.0.1:7860
    python -m vtc demo --model DIR_OR_HUB_ID --model ANOTHER --host 0.0.0.0 --port 8080

The page offers exactly the engine's served models in a dropdown (labels, never server paths); a typed folder or
hub id only with ``allow_any_model``, which ``launch`` refuses on a non-loopback host (``engine.check_host``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import pathlib

import gradio as gr

import vtc
from vtc.budget import describe_budget

from . import render
from .engine import DemoError, Engine, Loading, Result, RunResult, Spec, check_host

log = logging.getLogger(__name__)

TITLE = "vtc: which visual tokens survive?"
INTRO = """\
# Which visual tokens survive?

Pick a bundled example (held-out test data of the embedded model, with its known answer) or upload an image or a
video, ask a question, and choose a compressor with a **budget**: an integer is visual tokens kept per image (for a
video: over all its frames), a fraction in (0, 1] is the share kept (`64`, `0.25`, `25%`). Kept tokens are drawn
bright on the model's real patch grid, pruned ones dimmed; the members of one merged token share an outline colour.
"""
RUN_SLOTS = 4  # requests computing at once; requests on one model also wait for its lock
CSS = """
#status textarea { font-family: ui-monospace, monospace; }
.vtc-stats p { margin: 0.15em 0; }
/* numbers and words are never split into syllables; a table too wide for the window scrolls sideways */
#table, #table *, .vtc-stats, .vtc-stats * { word-break: normal !important; overflow-wrap: normal !important;
                                             hyphens: none !important; }
#table { overflow-x: auto; }
#table table { table-layout: auto; }
.vtc-sr-only { position: absolute !important; width: 1px; height: 1px; padding: 0; margin: -1px; overflow: hidden;
               clip: rect(0, 0, 0, 0); white-space: nowrap; border: 0; }
#legend .swatch { display: inline-block; width: 1.1em; height: 1.1em; vertical-align: middle; margin-right: 0.3em;
                  border: 2px solid transparent; }
#legend li { list-style: none; margin: 0.1em 0; }
#legend ul { padding-left: 0; margin: 0.2em 0; }
"""


def _rgb(colour) -> str:
    return "rgb({}, {}, {})".format(*colour)


def _hatch_css() -> str:
    stripe, wash = _rgb(render.HATCH_COLOUR), _rgb(render.UNSEEN_COLOUR)
    return f"background: repeating-linear-gradient(-45deg, {stripe} 0 2px, {wash} 2px 6px)"


#: what the overlay's marks mean; the swatches use the drawing's own colours (demo/render.py)
LEGEND = f"""\
<div id="legend-text"><b>Legend</b> (what the pictures show)
<ul>
<li><span class="swatch" style="background: #c8c8c8; border-color: {_rgb(render.KEPT_COLOUR)}"></span><b>kept</b>
token: bright, green outline (AnyRes crops: one outline colour per crop)</li>
<li><span class="swatch" style="background: #3a3a3a"></span><b>pruned</b> token: dimmed and greyed -- the
compressor dropped it</li>
<li><span class="swatch" style="background: #9a9a9a; border-color: {_rgb(render.GROUP_COLOURS[0])}"></span>
<b>merged member</b>: half-bright, outlined in its group's colour; the <b>merge representative</b> (the token the
LLM receives) has the same colour, thicker</li>
<li><span class="swatch" style="{_hatch_css()}"></span><b>never seen by the model</b>: hatched grey -- outside
every token box (the model's center crop or padding), not pruned by the compressor</li>
<li>the <b>all tokens</b> picture draws the model's token grid in white</li>
</ul></div>
"""


#: what each picture shows, after its title (the column label), for its alt text; the all-tokens column shows the
#: plain input until a run titles it "all N tokens" (``PREVIEW_ALT``)
PREVIEW_ALT = "the input as uploaded"
PICTURE_ALT = {
    "picture-all": "the input with the model's token grid drawn; hatched areas are never seen by the model",
    "picture-a": "tokens compressor A kept, bright on the model's patch grid; pruned tokens dimmed",
    "picture-b": "tokens compressor B kept, bright on the model's patch grid; pruned tokens dimmed",
}
#: runs when the page loads: gives each result picture an alt text (its column title, which names the compressor,
#: budget and tokens kept, and what it shows; gr.Image has no alt option) and creates the status live region
PAGE_JS = """
() => {
  const alts = %s, preview = %s;
  const live = document.createElement("div");
  live.id = "status-live";
  live.className = "vtc-sr-only";
  live.setAttribute("role", "status");
  live.setAttribute("aria-live", "polite");
  document.body.appendChild(live);
  const label = (block) => {
    const title = block.querySelector("[data-testid=block-label]");
    return title ? title.textContent.trim() : "";
  };
  const update = () => {
    for (const [id, what] of Object.entries(alts)) {
      const block = document.getElementById(id);
      if (!block) continue;
      const title = label(block);
      const alt = `${title}: ${id === "picture-all" && !/^all \\d+ tokens/.test(title) ? preview : what}`;
      for (const img of block.querySelectorAll("img")) {
        if (img.getAttribute("alt") !== alt) img.setAttribute("alt", alt);
      }
    }
  };
  new MutationObserver(update).observe(document.body, {subtree: true, childList: true, characterData: true,
                                                       attributes: true, attributeFilter: ["src"]});
  update();
}
"""
#: the status box's text, copied into the live region whenever it changes (a textarea's value is not announced)
STATUS_JS = """
(text) => {
  const live = document.getElementById("status-live");
  if (live) live.textContent = text || "";
  return [];
}
"""


def page_js() -> str:
    return PAGE_JS % (json.dumps(PICTURE_ALT), json.dumps(PREVIEW_ALT))


def _gflops(flops: int) -> str:
    return f"{flops / 1e9:.3g} GFLOPs"


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f} ms"


def speed_words(baseline_seconds: float, seconds: float) -> str:
    """``"1.60× faster"`` than all tokens, or ``"1.33× slower"`` when it took longer -- never "0.75× faster"."""
    ratio = baseline_seconds / seconds
    return f"{ratio:.2f}× faster" if ratio >= 1 else f"{1 / ratio:.2f}× slower"


def options_hint(compressor: str) -> str:
    """A placeholder for the options box that is valid for ``compressor``: its first option at its default value
    (``"e.g. start_layer=None"``), or a note when it has none."""
    import dataclasses

    fields = [f for f in dataclasses.fields(vtc.get_compressor_class(compressor))]
    if not fields:
        return f"{compressor} has no options"
    first = fields[0]
    default = first.default if first.default is not dataclasses.MISSING else first.default_factory()
    return f"e.g. {first.name}={default!r} (key=value, ... or JSON)"


def _verdict(answer: str, expected: str | None) -> str:
    if expected is None:
        return ""
    return " (right)" if answer.split()[:1] == [expected] else f" (wrong; expected {expected})"


def stats_markdown(run: RunResult, baseline: RunResult, expected: str | None) -> str:
    """One column's numbers: answer, kept tokens, tokens in -> out, time to first token, FLOPs."""
    lines = [f"**answer:** {run.answer or '(empty)'}{_verdict(run.answer, expected)}"]
    if run.compressor is None:
        lines.append(f"**all {run.visual_in} visual tokens**")
    else:
        unit = "video" if run.frames else "image"
        lines.append(f"**kept {run.kept} / {run.visual_in} visual tokens** (budget: "
                     f"{describe_budget(run.budget, run.visual_in, unit)})")
        if run.positions:
            lines.append(f"positions: `{run.positions}` ({vtc.POSITION_MODES.get(run.positions, '')})")
    lines.append(f"visual tokens in → out: {run.visual_in} → {run.visual_out}")
    speed = "" if run.compressor is None or not baseline.prefill_seconds or not run.prefill_seconds else \
        f" ({speed_words(baseline.prefill_seconds, run.prefill_seconds)})"
    runs = f", median of {run.timing_runs} runs" if run.timing_runs > 1 else ", one run"
    lines.append(f"prefill (time to first token{runs}): {_ms(run.prefill_seconds)}{speed}")
    share = "" if run.compressor is None else f" ({100 * run.flops / baseline.flops:.0f} % of all tokens)"
    lines.append(f"prefill FLOPs: {_gflops(run.flops)}{share}")
    if run.options:
        lines.append("options: " + ", ".join(f"`{k}={v!r}`" for k, v in run.options.items()))
    return "\n\n".join(lines)


def table_markdown(result: Result) -> str:
    """All runs side by side (a compact summary under the pictures)."""
    runs = result.baseline.timing_runs
    timing = f"time to first token (median of {runs})" if runs > 1 else "time to first token (one run)"
    head = (f"| | answer | visual tokens in → out | {timing} | prefill FLOPs |\n"
            "|---|---|---|---|---|")
    rows = [head]
    for run in result.all_runs:
        name = "all tokens" if run.compressor is None else f"`{run.compressor}` @ {run.budget!r}"
        rows.append(f"| {name} | {run.answer}{_verdict(run.answer, result.expected)} | {run.visual_in} → "
                    f"{run.visual_out} | {_ms(run.prefill_seconds)} | {_gflops(run.flops)} |")
    known = f"; known answer: **{result.expected}**" if result.expected is not None else ""
    return (f"**{result.model_label}** · {result.kind} `{result.media_name}` · question: *{result.question}*"
            f"{known}\n\n" + "\n".join(rows))


def with_notes(status: str, notes) -> str:
    """The status line followed by one ``warning: ...`` line per note (an animation's first frame, words the model
    does not know)."""
    return "\n".join([status, *(f"warning: {note}" for note in notes or [])])


def known_answer(answers: dict, question: str) -> str:
    """The "known answer" line for ``question`` on a bundled example with ``answers``; empty for any other."""
    expected = (answers or {}).get((question or "").strip())
    return "" if expected is None else f"known answer: **{expected}**"


def build_app(engine: Engine | None = None) -> gr.Blocks:
    """The Blocks app on ``engine`` (default: a new ``Engine`` on the embedded model)."""
    engine = engine or Engine()
    examples = {e.label: e for e in engine.examples}
    compressors = vtc.list_compressors("encoder")

    def cleared():
        """What a new input clears: every picture and word that described the previous one (new updates each
        call: gradio consumes an update's value)."""
        return [gr.update(value=None, label="All tokens"), "", gr.update(value=None, label="Compressor A"), "",
                gr.update(value=None, label="Compressor B"), "", ""]

    def on_example(label):
        example = examples.get(label)
        if example is None:  # the radio was cleared by an upload
            return gr.update(), gr.update(), gr.update(), gr.update()
        return example.path, example.question, f"known answer: **{example.answer}**", dict(example.answers)

    def on_file(path, question, frames):
        """Reads a new input: the results of the previous one are cleared, the status says what was read (or
        why not), and the known answers of a bundled example are kept for the question box."""
        if not path:
            return [*cleared(), "", "", {}]
        try:
            media = engine.load_media(path, int(frames))
        except DemoError as exc:
            return [*cleared(), f"error: {exc}", "", {}]
        except Exception as exc:  # noqa: BLE001 - shown as one line, logged in full
            log.exception("reading an upload failed")
            return [*cleared(), f"error: internal error ({type(exc).__name__}: {exc}); details are in the server log",
                    "", {}]
        example = engine.example_for(media)
        answers = {} if example is None else dict(example.answers)
        what = f"{media.image.width}×{media.image.height} image" if media.kind == "image" else \
            f"video, {len(media.frames)} frames sampled of {media.duration:.1f} s"
        return [gr.update(value=engine.preview(media), label="All tokens"), *cleared()[1:],
                with_notes(f"ready: {media.name} ({what})", media.notes), known_answer(answers, question), answers]

    def on_question(question, answers):
        """An edited question: the answers shown were to another question, and the known answer follows it."""
        return [*cleared()[1:], known_answer(answers, question)]

    slots = asyncio.Semaphore(RUN_SLOTS)

    async def on_run(path, question, model_ref, frames, max_new_tokens, name_a, budget_a, options_a, compare, name_b,
                     budget_b, options_b):
        """One request, as an async generator without a Gradio concurrency limit: the input is read and the request
        checked first; a model that is not loaded yet is announced in the status and awaited (its load is
        time-limited, and shared by everyone who asks for it) without taking a slot; only the work on the loaded
        model takes one of ``RUN_SLOTS``. Yields the outputs: a "loading" status, then the results or the error."""
        failed = [None, "", None, "", None, "", ""]
        try:
            media = await asyncio.to_thread(engine.load_media, path, int(frames))
            specs = [Spec(name_a, budget_a, options_a)]
            if compare:
                specs.append(Spec(name_b, budget_b, options_b))
            engine.check(question, specs, int(max_new_tokens))
            loading = engine.load(model_ref)
            if isinstance(loading, Loading):  # the first request for this model: say why nothing happens yet
                yield [gr.update()] * len(failed) + [f"loading model {loading.label} (its first use; at most "
                                                     f"{loading.remaining():.0f} s more)…"]
                await engine.wait_for_model(model_ref)
            async with slots:
                result = await asyncio.to_thread(functools.partial(
                    engine.run, media, question, specs, model=model_ref, max_new_tokens=int(max_new_tokens)))
        except DemoError as exc:
            yield [*failed, f"error: {exc}"]
            return
        except Exception as exc:  # noqa: BLE001 - shown as one line, logged in full
            log.exception("a demo request failed")
            yield [*failed, f"error: internal error ({type(exc).__name__}: {exc}); details are in the server log"]
            return
        base = result.baseline
        a = result.runs[0]
        b = result.runs[1] if len(result.runs) > 1 else None
        # each column is titled by what it shows: "all 196 tokens", "cls_attention @ 25 % → 49 tokens"
        yield [gr.update(value=base.picture, label=base.title), stats_markdown(base, base, result.expected),
               gr.update(value=a.picture, label=a.title), stats_markdown(a, base, result.expected),
               gr.update(value=None, label="Compressor B") if b is None else gr.update(value=b.picture,
                                                                                       label=b.title),
               "" if b is None else stats_markdown(b, base, result.expected),
               table_markdown(result),
               with_notes(f"done: {len(result.runs)} compressor(s) on {result.model_label}", result.notes)]

    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                example = gr.Radio(list(examples), label="Bundled examples", elem_id="examples")
                upload = gr.File(label="…or upload an image or a video (at most "
                                       f"{engine.limits.max_bytes / 2**20:g} MB, "
                                       f"{engine.limits.max_video_seconds / 60:g} min)",
                                 type="filepath", elem_id="upload")
                question = gr.Textbox(label="Question", elem_id="question")
                expected = gr.Markdown(elem_id="expected")
                answers = gr.State({})  # the known answers of the bundled example on screen (question -> answer)
                # Run sits under the question, above the settings, so it is on screen without scrolling
                run = gr.Button("Run", variant="primary", elem_id="run")
                served = list(engine.labels.values())
                model = gr.Dropdown(served, value=engine.default_label, elem_id="model",
                                    allow_custom_value=engine.allow_any_model,
                                    label="Model: one of the served models, or a local folder or hub id"
                                    if engine.allow_any_model else "Model")
                with gr.Row():
                    frames = gr.Slider(1, engine.limits.max_frames, value=8, step=1, label="Frames per video",
                                       elem_id="frames")
                    max_new = gr.Slider(1, engine.limits.max_new_tokens, value=8, step=1, label="Max new tokens",
                                        elem_id="max-new-tokens")
                with gr.Group():
                    name_a = gr.Dropdown(compressors, value="cls_attention", label="Compressor A",
                                         elem_id="compressor-a")
                    budget_a = gr.Textbox("0.25", label="Budget A (tokens, or a fraction)", elem_id="budget-a")
                    options_a = gr.Textbox(label="Options A (key=value, ... or JSON)",
                                           placeholder=options_hint("cls_attention"), elem_id="options-a")
                compare = gr.Checkbox(label="Compare with a second compressor", elem_id="compare")
                with gr.Group(visible=False) as group_b:
                    name_b = gr.Dropdown(compressors, value="random", label="Compressor B", elem_id="compressor-b")
                    budget_b = gr.Textbox("0.25", label="Budget B (tokens, or a fraction)", elem_id="budget-b")
                    options_b = gr.Textbox(label="Options B (key=value, ... or JSON)",
                                           placeholder=options_hint("random"), elem_id="options-b")
            with gr.Column(scale=3):
                # at the top of the results, so an error is seen without scrolling
                status = gr.Textbox(label="Status", interactive=False, elem_id="status")
                with gr.Row():
                    with gr.Column(min_width=240):
                        picture_all = gr.Image(label="All tokens", type="pil", format="png", interactive=False,
                                               elem_id="picture-all")
                        stats_all = gr.Markdown(elem_id="stats-all", elem_classes="vtc-stats")
                    with gr.Column(min_width=240):
                        picture_a = gr.Image(label="Compressor A", type="pil", format="png", interactive=False,
                                             elem_id="picture-a")
                        stats_a = gr.Markdown(elem_id="stats-a", elem_classes="vtc-stats")
                    with gr.Column(visible=False, min_width=240) as column_b:
                        picture_b = gr.Image(label="Compressor B", type="pil", format="png", interactive=False,
                                             elem_id="picture-b")
                        stats_b = gr.Markdown(elem_id="stats-b", elem_classes="vtc-stats")
                gr.HTML(LEGEND, elem_id="legend")
                table = gr.Markdown(elem_id="table")

        example.change(on_example, example, [upload, question, expected, answers])
        upload.upload(lambda: None, None, example)  # an own file is no longer the selected example
        results = [picture_all, stats_all, picture_a, stats_a, picture_b, stats_b, table]
        upload.change(on_file, [upload, question, frames], [*results, status, expected, answers])
        # an edited question: the answers shown were to another one (`change`, not `input`: a pasted or
        # programmatically filled question counts too; an example sets `answers` with its question)
        question.change(on_question, [question, answers], [*results[1:], expected])
        compare.change(lambda on: (gr.update(visible=on), gr.update(visible=on)), compare, [group_b, column_b])
        # the options box's example follows the chosen compressor, so it is always a valid input
        name_a.change(lambda name: gr.update(placeholder=options_hint(name)), name_a, options_a)
        name_b.change(lambda name: gr.update(placeholder=options_hint(name)), name_b, options_b)
        run.click(on_run, [upload, question, model, frames, max_new, name_a, budget_a, options_a, compare, name_b,
                           budget_b, options_b],
                  [picture_all, stats_all, picture_a, stats_a, picture_b, stats_b, table, status],
                  concurrency_limit=None)  # on_run bounds its work itself (RUN_SLOTS), not its wait for a model
        status.change(None, status, None, js=STATUS_JS)  # screen readers hear every new status
    return demo


def launch(model: str | None = None, *, models=None, allow_any_model: bool = False, host: str = "127.0.0.1",
           port: int | None = 7860, share: bool = False, engine: Engine | None = None,
           prevent_thread_lock: bool = False, quiet: bool = False) -> gr.Blocks:
    """Build and serve the app; returns the Blocks (``.close()`` stops a server started with
    ``prevent_thread_lock=True``). ``models`` / ``allow_any_model``: see ``Engine``; an engine that allows any
    model is refused (``DemoError``) on a non-loopback host or with ``share``. Gradio's own upload limit is twice
    the engine's, so files in between get the engine's explanation rather than a bare refusal."""
    check_host(host, allow_any_model or (engine is not None and engine.allow_any_model), share)
    engine = engine or Engine(model, models=models, allow_any_model=allow_any_model)
    demo = build_app(engine)
    demo.queue()
    folders = sorted({str(pathlib.Path(e.path).parent) for e in engine.examples})
    demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=prevent_thread_lock,
                allowed_paths=folders, max_file_size=2 * engine.limits.max_bytes, show_error=False, quiet=quiet,
                ssr_mode=False, css=CSS, js=page_js())
    return demo


__all__ = ["build_app", "launch", "stats_markdown", "table_markdown", "with_notes"]
