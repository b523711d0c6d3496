"""`vtc` command line: `vtc run` (the main job), `vtc eval`, `vtc demo` (the web demo) and `vtc list`.

`vtc run` answers one question about one image with the full visual-token set and with every requested
compressor at the budget, and shows what each kept. Without ``--model`` it uses the embedded default model (a small
LLaVA trained on synthetic shapes, shipped with the package) and, without ``--image``, a held-out test image of the
data it was trained on, so the expected answer is known and printed next to each compressor's.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from types import SimpleNamespace


def _load(model_ref: str | None):
    """``((model, processor), label)``: the embedded default model, a local folder or a hub id.

    The reference is resolved first (``preflight.resolve_model_ref``): a folder that does not exist, or a hub id
    while the Hub is unreachable (or ``HF_HUB_OFFLINE`` is set and the model is not cached), fails at once with one
    message instead of after minutes of download retries.
    """
    import vtc

    if model_ref is None:
        from .integrations.transformers.default import DEFAULT_MODEL_NAME

        return vtc.load_default(), DEFAULT_MODEL_NAME
    from .integrations.transformers.preflight import ModelNotFoundError, resolve_model_ref

    try:
        resolved = resolve_model_ref(model_ref)
    except ModelNotFoundError as exc:
        raise SystemExit(f"error: {exc}") from None
    if resolved.note:
        print(f"note: {resolved.note}", file=sys.stderr)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        model = AutoModelForImageTextToText.from_pretrained(resolved.ref, local_files_only=resolved.local_files_only)
        processor = AutoProcessor.from_pretrained(resolved.ref, local_files_only=resolved.local_files_only)
    except Exception as exc:  # surface *why* loading failed, with the fix
        raise SystemExit(f"error: cannot load model {model_ref!r}: {exc}\n"
                         "Pass a local save_pretrained folder, or a hub id on a machine with hub access.") from exc
    model.eval()
    return (model, processor), model_ref


def _image_and_question(path: str | None, question: str | None, sample_index: int):
    """The user's image, or a held-out synthetic test image; the question and (when known) its answer.

    The file goes through ``vtc.image_io.load_image`` (EXIF orientation, 16-bit / float scaled by their real range,
    transparency on white, first frame of an animation with a note)."""
    from .image_io import load_image

    if path is None:
        from .eval.default_model import synthetic

        sample = synthetic.make_image_sample("test", sample_index)
        if question is None:
            spatial = [q for q in sample.questions if q.kind in ("color_at", "shape_at")]
            chosen = spatial[0] if spatial else sample.questions[0]
            return sample.image, chosen.text, chosen.answer, f"synthetic test image #{sample_index}"
        known = {q.text: q.answer for q in sample.questions}
        return sample.image, question, known.get(question), f"synthetic test image #{sample_index}"
    notes: list[str] = []
    try:
        image = load_image(path, notes=notes)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: cannot read image: {exc}") from exc
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return image, question or "what color is the shape at the center ?", None, path


def _grid_picture(record) -> str:
    rows, cols = record.grid
    kept = set(record.indices.tolist())
    prefix = record.num_prefix_tokens
    lines = []
    for r in range(rows):
        lines.append("    " + "".join("#" if (prefix + r * cols + c) in kept else "." for c in range(cols)))
    return "\n".join(lines)


def _run_options(items: list[str] | None, names: list[str]) -> dict[str, dict]:
    """``--option`` values per compressor: ``key=value`` applies to every compressor of the run,
    ``compressor.key=value`` to that one; values are read by the option's type (``preflight``)."""
    from .integrations.transformers.preflight import coerce_request_options

    per = {name: {} for name in names}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        scope, dot, option = key.rpartition(".")
        if not sep or not option.isidentifier() or (dot and not scope):
            raise ValueError(f"--option {item!r}: write key=value or compressor.key=value (e.g. --option seed=1, "
                             "--option random.seed=1)")
        if dot and scope not in per:
            raise ValueError(f"--option {item!r}: {scope!r} is not a compressor of this run ({', '.join(names)})")
        for name in [scope] if dot else names:
            per[name][option] = value
    return {name: coerce_request_options(name, options) for name, options in per.items()}


def _has_video_input(model) -> bool:
    from .integrations.transformers.adapter import adapter_for

    return adapter_for(model).supports_video


def cmd_run(args) -> int:
    import torch

    import vtc
    from .integrations.transformers.preflight import check_request

    # everything the user typed is checked before the model loads (minutes for a 7B checkpoint)
    budget = vtc.parse_budget(args.budget)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be an integer >= 1, got {args.max_new_tokens}")
    # video-only methods (they compare frames) have nothing to compare on one image: listed when named
    skipped = [] if args.compressor else [n for n in vtc.list_compressors()
                                          if vtc.get_compressor_class(n).video_only]
    names = args.compressor or [n for n in vtc.list_compressors() if n not in skipped]
    options = _run_options(args.option, names)
    for name in names:
        try:
            check_request(name, budget, options[name])
        except TypeError as exc:
            if len(names) > 1 and str(exc).startswith("unknown option"):
                raise TypeError(f"{exc} (--option key=value applies to every compressor of the run; "
                                "compressor.key=value to one)") from None
            raise
    image, question, expected, image_label = _image_and_question(args.image, args.question, args.sample)
    (model, processor), label = _load(args.model)
    from .integrations.transformers.default import unknown_words_message

    if (warning := unknown_words_message(processor, question)) is not None:
        print(f"warning: {warning}", file=sys.stderr)
    inputs = processor(images=[image], text=[_chat_prompt(processor, question)], return_tensors="pt")
    prompt_len = inputs["input_ids"].shape[1]
    print(f"model: {label}\nimage: {image_label}\nquestion: {question!r}"
          + (f" (expected answer: {expected!r})" if expected is not None else "")
          + f"\nbudget: {budget!r} visual tokens per image"
          + f"\npositions: {_positions_line(model, options)}\n")
    if skipped:
        print(f"video methods ({', '.join(skipped)}) compare frames, so they are left out on one image; "
              "run them on a video with `vtc demo` or `vtc eval`\n")
    video_input = _has_video_input(model)
    for name in names:  # one image as a one-frame video on a model without a video input
        if vtc.get_compressor_class(name).video_only and not video_input:
            options[name].setdefault("images_as_video", True)
    rows = []

    def run_once(name):
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        seconds = time.perf_counter() - start
        answer = processor.batch_decode(out[:, prompt_len:], skip_special_tokens=True)[0].strip()
        return answer, seconds

    answer, seconds = run_once(None)
    image_id = model.config.image_token_id
    n_visual = int((inputs["input_ids"] == image_id).sum())
    rows.append(("none (all tokens)", n_visual, n_visual, seconds, answer))
    for name in names:
        vtc.apply(model, name, budget=budget, **options[name])
        answer, seconds = run_once(name)
        records = vtc.last_selection(model)
        kept = sum(r.num_kept for r in records)
        if llm_records := vtc.last_llm_selection(model):  # LLM-side: tokens per LLM layer, comparable to the rest
            kept = f"{sum(r.average_tokens for r in llm_records):.1f}*"
            stages = ", ".join(f"layer {s.layer}: {int(s.kept.numel())}" for s in llm_records[0].stages)
            print(f"{name}: drops inside the LLM, visual tokens from each drop on: {stages} "
                  f"(of {llm_records[0].num_tokens}, {llm_records[0].num_layers} LLM layers)")
        rows.append((name, n_visual, kept, seconds, answer))
        if args.show_grid and records:
            print(f"{name}: kept {kept}/{n_visual} tokens ('#' kept, '.' pruned)")
            for record in records:
                print(_grid_picture(record))
        elif args.show_grid and llm_records:
            for record in llm_records:
                side = math.isqrt(record.num_tokens)
                if side * side == record.num_tokens:  # a square grid: draw what the last layers see
                    print(f"{name}: the last LLM layers see {int(record.kept.numel())}/{record.num_tokens} tokens")
                    print(_grid_picture(SimpleNamespace(grid=(side, side), indices=record.kept,
                                                        num_prefix_tokens=0)))
        vtc.remove(model)
    print()
    print(f"{'compressor':<20} {'tokens in':>9} {'tokens out':>10} {'generate s':>10}  answer")
    for name, n_in, n_out, secs, answer in rows:
        verdict = "" if expected is None else ("  (right)" if answer.split()[:1] == [expected] else "  (wrong)")
        print(f"{name:<20} {n_in:>9} {n_out:>10} {secs:>10.3f}  {answer!r}{verdict}")
    if any(isinstance(n_out, str) for _, _, n_out, _, _ in rows):
        print("* inside the LLM: visual tokens per LLM layer on average (the FLOPs-equivalent budget; each "
              "method's drops are listed above)")
    return 0


def _positions_line(model, options: dict[str, dict]) -> str:
    """Which position mode the run uses (the family default unless ``--option positions=...``) and the others."""
    import vtc

    modes = vtc.position_modes(model)
    used = {opts.get("positions") or modes[0] for opts in options.values()} or {modes[0]}
    others = [m for m in modes if m not in used]
    text = (f"{next(iter(used))} ({vtc.POSITION_MODES.get(next(iter(used)), '')})" if len(used) == 1
            else "per compressor (" + ", ".join(f"{n}: {o.get('positions') or modes[0]}" for n, o in options.items()) + ")")
    return text + (f"; also available: {', '.join(others)} (--option positions={others[0]})" if others else "")


POSITION_CHOICES = ("reindex", "keep")


def _chat_prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def cmd_eval(args) -> int:
    """Sweep compressors x budgets x tasks through lmms-eval; see ``vtc.eval.lmms.sweep``."""
    import json
    import pathlib

    try:
        from tqdm import tqdm

        from .eval.lmms import sweep, tasks as lmms_tasks
    except ImportError as exc:
        print(f"error: vtc eval needs lmms-eval, matplotlib and tqdm ({exc}); install them with "
              "pip install 'vtc[eval]'", file=sys.stderr)
        return 1
    import vtc

    budgets = [vtc.parse_budget(b) for b in (args.budget or [str(b) for b in sweep.DEFAULT_BUDGETS])]
    compressors = args.compressor or vtc.list_compressors("encoder")
    unknown = [c for c in compressors if c not in vtc.list_compressors()]
    if unknown:
        raise ValueError(f"unknown compressor(s) {unknown}; choose from {', '.join(vtc.list_compressors())}")
    tasks = [t for part in (args.tasks or ",".join(sweep.DEFAULT_TASKS)).split(",") for t in [part.strip()] if t]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    include = [pathlib.Path(p) for p in args.include_path or []]
    if any(t.startswith(lmms_tasks.TAG) for t in tasks):
        include.append(lmms_tasks.write_tasks(args.tasks_dir or out / "tasks", images=args.task_images,
                                              videos=args.task_videos, questions=args.task_questions))
    runs = 1 + len(compressors) * len(budgets)
    try:
        with tqdm(total=runs, desc="vtc eval", unit="run") as bar:
            result = sweep.sweep(args.model, compressors, budgets, tasks, include, args.limit, args.device,
                                 args.batch_size, out, progress=bar, positions=args.positions)
        (out / "vtc_eval.json").write_text(json.dumps(result, indent=1))
        sweep.plot(result, out / "vtc_eval.png")
        print(sweep.table(result))
        print(f"\nwrote {out / 'vtc_eval.json'}, {out / 'vtc_eval.png'} and per-sample logs in {out / 'samples'}")
        sweep.check(result)
    except sweep.EvalFailure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (RuntimeError, OSError) as exc:  # a model or task that cannot be loaded
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args) -> int:
    """Serve the Gradio demo (``vtc.demo.app``) until interrupted."""
    try:
        from .demo.app import launch
        from .demo.engine import DemoError, Engine
    except ImportError as exc:
        print(f"error: vtc demo needs gradio ({exc}); install it with pip install 'vtc[demo]'", file=sys.stderr)
        return 1
    engine = Engine(args.model)
    try:
        engine.model()  # load the start model now: a bad --model fails here, and the first request is fast
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        launch(engine=engine, host=args.host, port=args.port, share=args.share == "yes")
    except OSError as exc:  # the port is taken, the host cannot be bound
        print(f"error: cannot serve the demo on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_list(args) -> int:
    import vtc
    from .integrations.transformers import supported_families

    print("compressors:", ", ".join(vtc.list_compressors()))
    print("model families:", ", ".join(supported_families()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtc", description="training-free visual-token compression for VLMs")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="answer a question about an image with and without compression (default)")
    run.add_argument("--model", help="local save_pretrained folder or hub id (default: the embedded model)")
    run.add_argument("--image", help="image file (default: a held-out synthetic test image)")
    run.add_argument("--sample", type=int, default=0, help="which synthetic test image (default 0)")
    run.add_argument("--question", help="question (default: a spatial question about the synthetic image)")
    run.add_argument("--compressor", action="append", help="compressor name (repeatable; default: all registered)")
    run.add_argument("--budget", default="0.25", help="int tokens per image or float ratio in (0, 1] (default 0.25)")
    run.add_argument("--option", action="append", metavar="KEY=VALUE",
                     help="compressor or vtc option (repeatable): key=value for every compressor of the run, "
                          "compressor.key=value for one (e.g. --option random.seed=3, --option positions=keep)")
    run.add_argument("--max-new-tokens", type=int, default=4)
    run.add_argument("--no-grid", dest="show_grid", action="store_false", help="do not draw the kept-token grids")
    run.set_defaults(func=cmd_run)
    ev = sub.add_parser("eval", help="sweep compressors x budgets x lmms-eval tasks: accuracy, tokens, FLOPs, "
                                     "latency, memory (JSON + plot + table)")
    ev.add_argument("--model", help="local save_pretrained folder or hub id (default: the embedded model)")
    ev.add_argument("--compressor", action="append", help="repeatable (default: every registered compressor)")
    ev.add_argument("--budget", action="append",
                    help="repeatable; int tokens per image or float fraction in (0, 1] (default: 0.33 and 0.11)")
    ev.add_argument("--tasks", help="comma-separated lmms-eval tasks (default: the offline vtc_shapes_image, "
                                    "vtc_shapes_video and vtc_shapes_image_mc)")
    ev.add_argument("--include-path", action="append", help="extra lmms-eval task folder (repeatable)")
    ev.add_argument("--tasks-dir", help="where the offline tasks are written (default: OUT/tasks)")
    ev.add_argument("--task-images", type=int, default=60, help="held-out images in the offline tasks")
    ev.add_argument("--task-videos", type=int, default=15, help="held-out videos in the offline tasks")
    ev.add_argument("--task-questions", type=int, default=2, help="questions per image / video")
    ev.add_argument("--limit", type=int, help="at most this many documents per task")
    ev.add_argument("--positions", choices=sorted(POSITION_CHOICES),
                    help="position ids of the kept tokens in every compressed run: reindex (renumbered, the LLaVA "
                         "default) or keep (original ids); default: the model family's, printed with the table")
    ev.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    ev.add_argument("--batch-size", type=int, default=1, help="prompts per generate call (default 1: latency per "
                                                              "request)")
    ev.add_argument("--out", default="vtc_eval", help="output folder (default ./vtc_eval)")
    ev.set_defaults(func=cmd_eval)
    demo = sub.add_parser("demo", help="web demo: see which visual tokens survive, for images and videos "
                                        "(needs vtc[demo])")
    demo.add_argument("--model", help="model the page starts with: local save_pretrained folder or hub id "
                                      "(default: the embedded model); users can pick another in the page")
    demo.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1; 0.0.0.0 for "
                                                         "every interface)")
    demo.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    demo.add_argument("--share", choices=("no", "yes"), default="no",
                      help="also open a public gradio.live link (default no)")
    demo.set_defaults(func=cmd_demo)
    listing = sub.add_parser("list", help="list compressors and supported model families")
    listing.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
