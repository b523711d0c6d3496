"""`vtc` command line: `vtc run` (the main job), `vtc eval`, `vtc demo` (the web demo) and `vtc list`.

`vtc run` (``RUN_DESCRIPTION``) answers questions with the full visual-token set and with every requested
compressor at the budget. By default (the embedded model, no ``--image``) it asks a held-out set of the synthetic
test split (``held_out_set``: the first question of each of the 10 question kinds in each of the first 4 test images
that have one, 40 questions) in one left-padded batch per compressor, and prints per compressor its accuracy next to
all tokens' (with the paired difference), the visual tokens in -> out per image and its warm median time to first
token relative to all tokens. It draws what one compressor kept on question 1's image with the demo's renderer
(``vtc.demo.render``) into ``vtc_run/example.png`` and ends with the next steps. With ``--image`` (or ``--question``,
or ``--model``) it asks one question instead.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import statistics
import sys
import time
from dataclasses import dataclass
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


RUN_DESCRIPTION = """\
Answer questions with all visual tokens and with each compressor at the budget, on the embedded default model.

Default (no --image): a held-out set of the synthetic test split the embedded model never trained on -- for each
of the 10 question kinds, the first question of that kind in each of the first 4 test images that have one (40
questions; --per-kind N for N per kind). Per compressor: right k/n next to all tokens (and the difference), visual
tokens in -> out per image, and the warm median time to first token relative to all tokens. Question 1's image is
drawn into OUT_DIR/example.png: the image as all tokens see it, and the tokens one compressor kept (--show).

With --image: one question about your picture (with --model: your checkpoint). --model without --image asks one
question about a bundled synthetic image, with no expected answer (that is the embedded model's task only).
Every argument is checked before the model loads."""

#: question kinds of the synthetic image data (``vtc.eval.default_model.synthetic``), in the order the held-out set
#: lists them: spatial ones first, so question 1 (the example drawn to a PNG) asks about one place in the image
HELD_OUT_KINDS = ("color_at", "shape_at", "count", "count_color", "count_shape", "exists", "left_of", "above",
                  "letter", "letter_exists")
DEFAULT_PER_KIND = 4  # x 10 kinds = 40 questions
DEFAULT_TIMING_RUNS = 5
DEFAULT_OUT_DIR = "vtc_run"
EXAMPLE_PNG = "example.png"
_MAX_SEARCH_IMAGES = 10_000  # test images searched for the held-out set (a letter is in ~30 % of them)
NEXT_STEPS = (
    ("vtc demo", "web demo: your own image or video, compressors side by side, the kept tokens drawn"),
    ("vtc eval", "lmms-eval benchmarks per compressor and budget (all of them: ~25 min on 2 CPU cores)"),
    ('vtc.apply(model, "hiprune", budget=64)',
     "in Python, on your own Hugging Face checkpoint (vtc.remove(model) undoes it)"),
)


def held_out_set(per_kind: int = DEFAULT_PER_KIND, start: int = 0) -> list[tuple[int, object]]:
    """The questions of the default ``vtc run``: ``(test image index, synthetic.Question)`` pairs.

    The rule: for each question kind of ``HELD_OUT_KINDS``, in that order, the first question of that kind in each
    of the first ``per_kind`` synthetic *test* images (from image ``start`` on) that have one: ``per_kind`` x 10
    questions (40 by default), from the held-out split the embedded model never saw in training. Deterministic:
    every sample is a pure function of (split, index).
    """
    from .eval.default_model import synthetic

    if per_kind < 1:
        raise ValueError(f"--per-kind must be an integer >= 1, got {per_kind}")
    found: dict[str, list] = {kind: [] for kind in HELD_OUT_KINDS}
    for index in range(start, start + _MAX_SEARCH_IMAGES):
        questions = synthetic.make_image_sample("test", index).questions
        for kind, picked in found.items():
            first = next((q for q in questions if q.kind == kind), None)
            if first is not None and len(picked) < per_kind:
                picked.append((index, first))
        if all(len(picked) == per_kind for picked in found.values()):
            return [pair for kind in HELD_OUT_KINDS for pair in found[kind]]
    raise ValueError(f"--per-kind {per_kind}: the test split has too few images with every question kind")


def budget_words(budget, num_tokens: int) -> str:
    """The budget as a person reads it (``vtc.budget.describe_budget`` for one image)."""
    from .budget import describe_budget

    return describe_budget(budget, num_tokens, "image")


def relative_time(ratio: float) -> str:
    """A time relative to all tokens: ``"0.62x time"``, or ``"1.30x time (slower)"`` when it is slower."""
    return f"{ratio:.2f}x time" + (" (slower)" if round(ratio, 2) > 1 else "")


def _single_question(path: str | None, question: str | None, sample_index: int, known: bool):
    """``(image, question, expected answer or None, label)``: the user's image, or synthetic test image
    ``sample_index``; the expected answer only where it is known and the model's own task (``known``).

    The file goes through ``vtc.image_io.load_image`` (EXIF orientation, 16-bit / float scaled by their real range,
    transparency on white, first frame of an animation with a note)."""
    from .image_io import load_image

    if path is None:
        from .eval.default_model import synthetic

        sample = synthetic.make_image_sample("test", sample_index)
        label = f"synthetic test image #{sample_index}"
        if question is None:
            spatial = [q for q in sample.questions if q.kind in ("color_at", "shape_at")]
            chosen = spatial[0] if spatial else sample.questions[0]
            return sample.image, chosen.text, chosen.answer if known else None, label
        answers = {q.text: q.answer for q in sample.questions}
        return sample.image, question, answers.get(question) if known else None, label
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


@dataclass
class _Plan:
    """Everything ``vtc run`` was asked, checked before the model loads."""

    budget: object
    names: list[str]
    skipped: list[str]
    options: dict[str, dict]
    show: str
    out_dir: pathlib.Path
    held_out: bool
    items: list[tuple]  # (image, question, expected answer or None, image label)
    per_kind: int = DEFAULT_PER_KIND
    images: list[int] | None = None  # held-out set: the test images it asks about


def _plan_run(args) -> _Plan:
    """Check every argument and build the questions; raises ``ValueError`` / ``TypeError`` (one message)."""
    import vtc
    from .integrations.transformers.preflight import check_request

    budget = vtc.parse_budget(args.budget)
    for flag, value, low in (("--max-new-tokens", args.max_new_tokens, 1), ("--timing-runs", args.timing_runs, 1),
                             ("--sample", args.sample, 0)):
        if value < low:
            raise ValueError(f"{flag} must be an integer >= {low}, got {value}")
    held_out = args.image is None and args.question is None and args.model is None
    if args.per_kind is not None and not held_out:
        raise ValueError("--per-kind sizes the held-out set of the embedded model; it has no effect with --image, "
                         "--question or --model")
    if args.image is not None and args.sample != 0:
        raise ValueError("--sample picks a synthetic test image; it has no effect with --image")
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
    show = args.show or names[0]
    if show not in names:
        raise ValueError(f"--show {show!r} is not a compressor of this run ({', '.join(names)})")
    out_dir = pathlib.Path(args.out_dir)
    existing = next(p for p in (out_dir, *out_dir.parents) if p.exists())  # ends at "." or "/"
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out-dir {str(out_dir)!r}: {str(existing)!r} is not a folder this user can write to")
    if held_out:
        from .eval.default_model import synthetic

        per_kind = DEFAULT_PER_KIND if args.per_kind is None else args.per_kind
        pairs = held_out_set(per_kind, args.sample)
        images = {i: synthetic.make_image_sample("test", i).image for i in sorted({i for i, _ in pairs})}
        items = [(images[i], q.text, q.answer, f"synthetic test image #{i}") for i, q in pairs]
        return _Plan(budget, names, skipped, options, show, out_dir, True, items, per_kind, sorted(images))
    item = _single_question(args.image, args.question, args.sample, known=args.model is None)
    return _Plan(budget, names, skipped, options, show, out_dir, False, [item])


def _right(answer: str, expected: str | None) -> bool | None:
    """The accuracy rule of ``vtc.eval.default_model.accuracy``: the first word equals the one-word answer."""
    return None if expected is None else (answer.split() or [""])[0] == expected


def cmd_run(args) -> int:
    """``vtc run``: see ``build_parser`` (help of ``run``) and the module docstring."""
    import torch

    import vtc

    plan = _plan_run(args)  # everything the user typed, before the model loads (minutes for a 7B checkpoint)
    (model, processor), label = _load(args.model)
    from .integrations.transformers.default import unknown_words_message

    image, question, expected, image_label = plan.items[0]
    if not plan.held_out and (warning := unknown_words_message(processor, question)) is not None:
        print(f"warning: {warning}", file=sys.stderr)
    inputs = processor(images=[image], text=[_chat_prompt(processor, question)], return_tensors="pt")
    inputs = inputs.to(model.device)
    n_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    n = len(plan.items)
    if plan.held_out:
        first = "the first synthetic test image" if plan.per_kind == 1 else \
            f"each of the first {plan.per_kind} synthetic test images"
        print(f"model: {label}\nquestions: {n} held-out, {plan.per_kind} of each of the {len(HELD_OUT_KINDS)} "
              f"question kinds (the first of its kind in {first} that have one: images "
              f"#{plan.images[0]}-#{plan.images[-1]})")
    else:
        print(f"model: {label}\nimage: {image_label}\nquestion: {question!r}"
              + (f" (expected answer: {expected!r})" if expected is not None else ""))
    print(f"budget: {budget_words(plan.budget, n_visual)}\npositions: {_positions_line(model, plan.options)}\n")
    if plan.skipped:
        print(f"video methods ({', '.join(plan.skipped)}) compare frames, so they are left out on one image; "
              "run them on a video with `vtc demo` or `vtc eval`\n")
    video_input = _has_video_input(model)
    for name in plan.names:  # one image as a one-frame video on a model without a video input
        if vtc.get_compressor_class(name).video_only and not video_input:
            plan.options[name].setdefault("images_as_video", True)

    def generate(batch, max_new_tokens):
        with torch.no_grad():
            return model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)

    # the held-out set: one batch, left-padded (the embedded tokenizer's padding side) as accuracy.evaluate does,
    # preprocessed once and asked again under every compressor
    batch = inputs if not plan.held_out else processor(
        images=[it[0] for it in plan.items], text=[_chat_prompt(processor, it[1]) for it in plan.items],
        padding=True, return_tensors="pt").to(model.device)

    def answers() -> list[str]:
        out = generate(batch, args.max_new_tokens)
        return [text.strip() for text in processor.batch_decode(out[:, batch["input_ids"].shape[1]:],
                                                                skip_special_tokens=True)]

    class applied:  # `with applied(name):` the compressor for the block (None: all tokens)
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            if self.name is not None:
                vtc.apply(model, self.name, budget=plan.budget, **plan.options[self.name])

        def __exit__(self, *exc):
            if self.name is not None:
                vtc.remove(model)

    runs = [None, *plan.names]
    progress = _Progress()
    got, kept, examples = {}, {None: n_visual}, {}  # examples: records of question 1 (image, video, LLM-side)
    for name in runs:  # the answers, then one single-question run: the warm-up of the timing, and the picture
        progress.step(name or "all tokens")
        with applied(name):
            got[name] = answers()
            if name is not None:
                if llm := vtc.last_llm_selection(model):  # LLM-side: tokens per LLM layer, comparable to the rest
                    kept[name] = f"{statistics.fmean(r.average_tokens for r in llm):.1f}*"
                else:
                    dropped = statistics.fmean(had - left for had, left in vtc.last_prompt_lengths(model))
                    kept[name] = _number(n_visual - dropped)
            generate(inputs, 1)
            if name is not None:
                examples[name] = _Records(vtc.last_selection(model), vtc.last_video_selection(model),
                                          vtc.last_llm_selection(model))
    # warm time to first token: round-robin over the runs, so load that comes and goes on the machine hits all alike
    seconds: dict = {name: [] for name in runs}
    for round_ in range(args.timing_runs):
        progress.step(f"timing, round {round_ + 1} of {args.timing_runs}")
        for name in runs:
            with applied(name):
                start = time.perf_counter()
                generate(inputs, 1)
                seconds[name].append(time.perf_counter() - start)
    progress.done()
    median = {name: statistics.median(s) for name, s in seconds.items()}
    right = {name: [_right(a, it[2]) for a, it in zip(answers_, plan.items)] for name, answers_ in got.items()}
    table = _Table(plan.held_out, n, n_visual, right[None], median[None])
    table.header()
    for name in runs:
        table.row(name or "all tokens", got[name], right[name], kept[name], median[name])
    base_answers, show_answer = got[None], got[plan.show][0]
    table.footnotes(examples, args.timing_runs)
    spread = max(max(s) / min(s) for s in seconds.values())
    if spread > 2:  # a busy machine: say so rather than let the column look exact
        print(f"note: the runs of one compressor took up to {spread:.1f}x as long as each other: other work on this "
              "machine makes the time column rough; rerun when it is idle")
    if args.show_grid:
        for name, records in examples.items():
            _print_grids(name, records, n_visual)
    print()
    head = f"example: question 1{f' of {n}' if n > 1 else ''}, {image_label}: {question!r}" + (
        f" (expected {expected!r})" if expected is not None else "")
    print(head)
    verdict = {True: " (right)", False: " (wrong)", None: ""}
    print(f"  all tokens answered {base_answers[0]!r}{verdict[_right(base_answers[0], expected)]}; {plan.show} "
          f"answered {show_answer!r}{verdict[_right(show_answer, expected)]}")
    path = plan.out_dir / EXAMPLE_PNG
    try:
        caption = _write_example(path, model, processor, inputs, image, plan.show, examples[plan.show], n_visual)
        print(f"  picture: {path} ({caption})")
    except (ValueError, NotImplementedError) as exc:  # a family without token geometry: say so, the run stands
        print(f"  no picture: {exc}")
    print("\nnext steps:")
    width = max(len(cmd) for cmd, _ in NEXT_STEPS)
    for cmd, what in NEXT_STEPS:
        print(f"  {cmd:<{width}}  {what}")
    return 0


class _Progress:
    """One stderr line saying which run is going (only on a terminal: logs and tests stay clean)."""

    def __init__(self):
        self.live = sys.stderr.isatty()
        self.width = 0

    def step(self, what: str) -> None:
        if self.live:
            line = f"running: {what}"
            print("\r" + line.ljust(self.width), end="", file=sys.stderr, flush=True)
            self.width = max(self.width, len(line))

    def done(self) -> None:
        if self.live:
            print("\r" + " " * self.width + "\r", end="", file=sys.stderr, flush=True)


@dataclass
class _Records:
    images: list
    videos: list
    llm: list


def _number(value: float) -> str:
    return str(round(value)) if abs(value - round(value)) < 1e-9 else f"{value:.1f}"


class _Table:
    """The per-compressor rows of ``vtc run``: accuracy (held-out set) or the answer (one question), visual tokens
    in -> out, and the warm median time to first token relative to all tokens."""

    def __init__(self, held_out: bool, n: int, n_visual: int, base_right: list, base_time: float):
        self.held_out, self.n, self.n_visual = held_out, n, n_visual
        self.base_right, self.base_time = base_right, base_time

    def header(self):
        if self.held_out:
            print(f"{'compressor':<18} {'right':<13} {'vs all tokens':<19} {'visual tokens':<15} "
                  "time to first token")
        else:
            print(f"{'compressor':<18} {'visual tokens':<15} {'time to first token':<22} answer")

    def row(self, name, answers, right, kept, seconds):
        tokens = f"{self.n_visual} -> {kept}"
        timing = (f"1.00x ({seconds * 1000:.0f} ms)" if name == "all tokens"
                  else relative_time(seconds / self.base_time))
        if self.held_out:
            from .eval.default_model.accuracy import paired_difference

            k = sum(bool(r) for r in right)
            score = f"{f'{k}/{self.n}':<7}{100 * k / self.n:3.0f} %"
            if name == "all tokens":
                diff = ""
            else:
                delta, se = paired_difference([int(bool(r)) for r in right], [int(bool(r)) for r in self.base_right])
                diff = f"{100 * delta:+5.1f} pts (±{100 * se:.1f})"
            print(f"{name:<18} {score:<13} {diff:<19} {tokens:<15} {timing}")
        else:
            verdict = {True: "  (right)", False: "  (wrong)", None: ""}[right[0]]
            print(f"{name:<18} {tokens:<15} {timing:<22} {answers[0]!r}{verdict}")

    def footnotes(self, examples: dict, runs: int):
        llm = {name: r.llm[0] for name, r in examples.items() if r.llm}
        if llm:
            first = next(iter(llm.values()))
            print(f"* inside the LLM: visual tokens per LLM layer on average (the FLOPs-equivalent budget); visual "
                  f"tokens from each drop on, of {first.num_tokens} ({first.num_layers} LLM layers):")
            width = max(map(len, llm))
            for name, record in llm.items():
                print(f"    {name + ':':<{width + 1}} "
                      + ", ".join(f"layer {s.layer}: {int(s.kept.numel())}" for s in record.stages))
        if self.held_out:
            print(f"right: the first word of the greedy answer equals the one-word ground truth; ± is the paired "
                  f"standard error of the difference over the same {self.n} questions (one question = "
                  f"{100 / self.n:.1f} points)")
        which = "question 1" if self.held_out else "the question"
        print(f"time: median of {runs} warm runs on {which} (generate with max_new_tokens=1, after a warm-up run; "
              f"the runs take turns), relative to all tokens ({self.base_time * 1000:.0f} ms); other work on the "
              "machine moves it")


def _print_grids(name: str, records: _Records, n_visual: int) -> None:
    """The ASCII picture of what ``name`` kept on question 1 (``--show-grid``): '#' kept, '.' pruned."""
    if records.images:
        print(f"{name}: kept {sum(r.num_kept for r in records.images)}/{n_visual} tokens ('#' kept, '.' pruned)")
        for record in records.images:
            print(_grid_picture(record))
    for record in records.llm:
        side = math.isqrt(record.num_tokens)
        if side * side == record.num_tokens:  # a square grid: draw what the last layers see
            print(f"{name}: the last LLM layers see {int(record.kept.numel())}/{record.num_tokens} tokens")
            print(_grid_picture(SimpleNamespace(grid=(side, side), indices=record.kept, num_prefix_tokens=0)))


def _write_example(path: pathlib.Path, model, processor, inputs, image, name: str, records: _Records,
                   n_visual: int) -> str:
    """Write the example PNG: the image as all tokens see it | the tokens ``name`` kept on it (``vtc.demo.render``,
    pruned tokens dimmed, merged groups outlined); returns what the picture shows."""
    from .demo import render
    from .integrations.transformers.geometry import image_token_boxes

    boxes = image_token_boxes(model, processor, inputs, 0, image.size)
    if records.images:
        record = records.images[0]
        kept, groups, what = record.indices, record.selection.groups, f"{name}: {record.num_kept} of {n_visual} kept"
    elif records.videos:  # a video method on a one-frame video (images_as_video)
        selection = records.videos[0].selection.frames[0].selection
        kept, groups, what = selection.indices, selection.groups, f"{name}: {selection.num_kept} of {n_visual} kept"
    elif records.llm:
        record = records.llm[0]
        if record.num_tokens != len(boxes.boxes):
            raise ValueError(f"{name} drops tokens inside the LLM and its indices do not map onto this image's "
                             "token boxes")
        kept, groups = record.kept, None
        what = f"{name}: the {int(record.kept.numel())} of {n_visual} the last LLM layers see"
    else:
        raise ValueError(f"{name} left no selection record on this image")
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = render.side_by_side([(render.all_tokens(image, boxes), f"all {n_visual} tokens"),
                                   (render.token_overlay(image, boxes, kept, groups), what)])
    picture.save(path)
    return (f"{picture.width}x{picture.height}; left: all {n_visual} tokens on the model's token grid, right: "
            f"{what}, pruned tokens dimmed")


def _positions_line(model, options: dict[str, dict]) -> str:
    """Which position mode the run uses (the family default unless ``--option positions=...``) and the others."""
    import vtc

    modes = vtc.position_modes(model)
    used = {opts.get("positions") or modes[0] for opts in options.values()} or {modes[0]}
    others = [m for m in modes if m not in used]
    text = (f"{next(iter(used))} ({vtc.POSITION_MODES.get(next(iter(used)), '')})" if len(used) == 1
            else "per compressor (" + ", ".join(f"{n}: {o.get('positions') or modes[0]}"
                                                for n, o in options.items()) + ")")
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

    from .eval.lmms import standin, table as paper_table

    if args.standin_docs < 1:
        raise ValueError(f"--standin-docs must be >= 1 (documents per stand-in task), got {args.standin_docs}")
    preset = paper_table.PRESETS.get(args.preset) if args.preset else None
    default_budgets = preset["budgets"] if preset else sweep.DEFAULT_BUDGETS
    budgets = [vtc.parse_budget(str(b)) for b in (args.budget or [str(b) for b in default_budgets])]
    compressors = args.compressor or vtc.list_compressors("encoder")
    unknown = [c for c in compressors if c not in vtc.list_compressors()]
    if unknown:
        raise ValueError(f"unknown compressor(s) {unknown}; choose from {', '.join(vtc.list_compressors())}")
    default_tasks = ",".join(preset["tasks"]) if preset else ",".join(sweep.DEFAULT_TASKS)
    tasks = [t for part in (args.tasks or default_tasks).split(",") for t in [part.strip()] if t]
    if args.standin and preset and not args.tasks:  # a preset runs what has stand-ins here and names the rest
        left_out = [t for t in tasks if t not in standin.STANDIN_TASKS]
        tasks = [t for t in tasks if t in standin.STANDIN_TASKS]
        if left_out:
            print(f"--preset {args.preset} --standin: no stand-in data for {', '.join(left_out)} "
                  "(they need the hub: run without --standin there); running the others", file=sys.stderr)
    if args.standin:
        standin.check_tasks(tasks)  # a task without stand-in data: one message naming it, before anything loads
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    include = [pathlib.Path(p) for p in args.include_path or []]
    env, task_names = {}, {}
    if args.standin:
        written = standin.write_standins(out / "standin", tasks, n_docs=args.standin_docs)
        include.append(written.include_path)
        env = written.env
        task_names = {name: task for task, name in written.tasks.items()}
        tasks = written.task_names
    if any(t.startswith(lmms_tasks.TAG) for t in tasks):
        include.append(lmms_tasks.write_tasks(args.tasks_dir or out / "tasks", images=args.task_images,
                                              videos=args.task_videos, questions=args.task_questions))
    runs = 1 + len(compressors) * len(budgets)
    try:
        with tqdm(total=runs, desc="vtc eval", unit="run") as bar:
            result = sweep.sweep(args.model, compressors, budgets, tasks, include, args.limit, args.device,
                                 args.batch_size, out, progress=bar, positions=args.positions, env=env,
                                 task_names=task_names, skip_unsupported=not args.compressor)
        (out / "vtc_eval.json").write_text(json.dumps(result, indent=1))
        rows = paper_table.standard_table(result)
        (out / "vtc_table.md").write_text(paper_table.to_markdown(rows))
        (out / "vtc_table.csv").write_text(paper_table.to_csv(rows))
        plotted = sweep.plot(result, out / "vtc_eval.png")
        print(sweep.table(result))
        print("\nthe papers' layout (value ± standard error; n documents per benchmark; avg % = mean over benchmarks "
              "of value / value with all tokens):\n")
        print(paper_table.to_markdown(rows))
        for why in result["skipped_compressors"].values():
            print(f"left out (every encoder-side compressor was asked for; this model refuses it): {why}")
        written_files = ["vtc_eval.json", "vtc_table.md", "vtc_table.csv"] + (["vtc_eval.png"] if plotted else [])
        print(f"wrote {', '.join(str(out / f) for f in written_files)} and lmms-eval's own results and per-sample "
              f"logs in {out}/<model>__<compressor>_<budget>/")
        for warning in sweep.check(result):
            print(f"warning: {warning}", file=sys.stderr)
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
        from .demo.engine import DemoError, Engine, check_host
    except ImportError as exc:
        print(f"error: vtc demo needs gradio ({exc}); install it with pip install 'vtc[demo]'", file=sys.stderr)
        return 1
    if args.timing_runs < 1:
        print(f"error: --timing-runs must be an integer >= 1, got {args.timing_runs}", file=sys.stderr)
        return 1
    try:
        check_host(args.host, args.allow_any_model, args.share == "yes")
        # every --model is resolved now (a missing folder, an unreachable hub id fail here, not in a request)
        engine = Engine(models=args.model, allow_any_model=args.allow_any_model, timing_runs=args.timing_runs)
        engine.model()  # load the start model now: a bad --model fails here, and the first request is fast
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        launch(engine=engine, host=args.host, port=args.port, share=args.share == "yes")
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
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
    from .eval.lmms.table import PRESETS  # plain data, no lmms-eval import

    parser = argparse.ArgumentParser(prog="vtc", description="training-free visual-token compression for VLMs")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser(
        "run", help="answer questions with all visual tokens and with each compressor (the default command)",
        description=RUN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--model", help="local save_pretrained folder or hub id (default: the embedded model). The "
                                     "held-out set is the embedded model's own task, so with --model and no --image "
                                     "one question is asked about synthetic test image --sample, with no expected "
                                     "answer claimed; pass --image for your own picture")
    run.add_argument("--image", help="your image file: one question about it (default: the held-out set)")
    run.add_argument("--question", help="the question (with --image: default 'what color is the shape at the center "
                                        "?'; without: one question about synthetic test image --sample instead of "
                                        "the held-out set)")
    run.add_argument("--sample", type=int, default=0,
                     help="synthetic test image where the held-out set starts, or the one image asked about with "
                          "--question or --model (default 0)")
    run.add_argument("--per-kind", type=int, metavar="N",
                     help=f"held-out set: N questions of each of the {len(HELD_OUT_KINDS)} question kinds "
                          f"(default {DEFAULT_PER_KIND}: {DEFAULT_PER_KIND * len(HELD_OUT_KINDS)} questions)")
    run.add_argument("--compressor", action="append",
                     help="compressor name (repeatable; default: every registered one but the video-only methods)")
    run.add_argument("--budget", default="0.25", help="int tokens per image or float ratio in (0, 1] (default 0.25)")
    run.add_argument("--option", action="append", metavar="KEY=VALUE",
                     help="compressor or vtc option (repeatable): key=value for every compressor of the run, "
                          "compressor.key=value for one (e.g. --option random.seed=3, --option positions=keep)")
    run.add_argument("--show", metavar="NAME", help="compressor whose kept tokens the example picture draws "
                                                     "(default: the first of the run)")
    run.add_argument("--out-dir", default=DEFAULT_OUT_DIR,
                     help=f"folder for {EXAMPLE_PNG}, the example picture; created if missing "
                          f"(default ./{DEFAULT_OUT_DIR})")
    run.add_argument("--timing-runs", type=int, default=DEFAULT_TIMING_RUNS, metavar="N",
                     help=f"warm runs timed per compressor after a warm-up; the median is shown "
                          f"(default {DEFAULT_TIMING_RUNS})")
    run.add_argument("--max-new-tokens", type=int, default=4, help="answer length in tokens (default 4)")
    run.add_argument("--show-grid", dest="show_grid", action="store_true",
                     help="also print each compressor's kept tokens on question 1 as an ASCII grid ('#' kept)")
    run.add_argument("--no-grid", dest="show_grid", action="store_false", help=argparse.SUPPRESS)  # the old default
    run.set_defaults(func=cmd_run)
    ev = sub.add_parser("eval", help="sweep compressors x budgets x lmms-eval tasks: accuracy, tokens, FLOPs, "
                                     "latency, memory (JSON + plot + table)")
    ev.add_argument("--model", help="local save_pretrained folder or hub id (default: the embedded model)")
    ev.add_argument("--compressor", action="append",
                    help="repeatable (default: every encoder-side compressor, the video methods included; the "
                         "LLM-side ones only when named)")
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
    ev.add_argument("--standin", action="store_true",
                    help="run the named lmms-eval benchmarks (mme, pope, gqa, ..., videomme, mvbench) on stand-in data "
                         "in each task's own schema, written into OUT/standin (no hub needed; docs/standin.md)")
    ev.add_argument("--standin-docs", type=int, default=20, metavar="N",
                    help="documents per stand-in task (default 20)")
    ev.add_argument("--preset", choices=sorted(PRESETS),
                    help="a paper's table: its benchmarks and budgets, unless --tasks / --budget say otherwise ("
                         + "; ".join(f"{k}: {v['what']}" for k, v in PRESETS.items()).replace("%", "%%") + ")")
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
    demo.add_argument("--model", action="append", metavar="DIR_OR_HUB_ID",
                      help="a model to serve: local save_pretrained folder or hub id; repeat for several (the "
                           "first is the page's default). The page offers exactly these (default: the embedded "
                           "model); each is checked at start")
    demo.add_argument("--allow-any-model", action="store_true",
                      help="also let the page load any local folder or hub id typed into it; refused unless "
                           "--host is a loopback address (127.0.0.1, ::1, localhost) and --share is no")
    demo.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1; 0.0.0.0 for "
                                                         "every interface)")
    demo.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    demo.add_argument("--share", choices=("no", "yes"), default="no",
                      help="also open a public gradio.live link (default no)")
    demo.add_argument("--timing-runs", type=int, default=3, metavar="N",
                      help="runs behind each time to first token the page shows, taking turns between all tokens "
                           "and the compressors; the median is shown (default 3)")
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
