"""Offline lmms-eval tasks on the embedded default model's held-out data (the synthetic *test* split).

    python -m vtc.eval.lmms.tasks DIR [--images 100 --videos 30 --questions 4]
    python -m lmms_eval --model vtc --model_args compressor=hiprune,budget=64 --tasks vtc_shapes \\
        --include_path DIR --output_path out --log_samples

writes, into ``DIR``, the images (PNG), the videos (lossless H.264 MP4 at 2 fps), one JSONL per task and the task
YAMLs, so the whole evaluation path runs on a fresh machine with no hub:

  vtc_shapes_image     image VQA, generate_until: one-word answers, exact match on the first word
  vtc_shapes_video     video QA, generate_until: the task hands the model a video file path, as video tasks do
  vtc_shapes_image_mc  the image questions as multiple choice (the loglikelihood path): the answer among every
                       word of its kind (the six colours, the five shapes, yes / no, the numbers, ...)

The tag ``vtc_shapes`` runs all three. The YAMLs hold absolute paths because ``datasets`` resolves relative
``data_files`` against the working directory, not the YAML's; move the folder and write it again. Questions are the
first ``--questions`` of each sample, as in ``vtc.eval.default_model.fidelity``.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from ..default_model import synthetic as syn

TASKS = ("vtc_shapes_image", "vtc_shapes_video", "vtc_shapes_image_mc")
TAG = "vtc_shapes"
FORMAT_VERSION = 2
_MANIFEST = "vtc_tasks.json"

_COMMON = """\
test_split: test
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: ""
metadata:
  version: {version}
"""

_HEADER = """\
task: {task}
tag: {tag}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
"""

_GENERATE = _HEADER + """\
output_type: generate_until
doc_to_visual: !function utils.{visual}
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
  num_beams: 1
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
  - metric: nonempty
    aggregation: mean
    higher_is_better: true
include: _vtc_shapes_template
"""

_MULTIPLE_CHOICE = _HEADER + """\
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_image
doc_to_choice: choices
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
include: _vtc_shapes_template
"""

_UTILS = '''"""Task functions of the vtc_shapes tasks (written by python -m vtc.eval.lmms.tasks)."""
from vtc.eval.lmms.tasks import doc_to_image, doc_to_text, doc_to_video, process_results  # noqa: F401
'''


# -- the task functions (the written utils.py imports these) -------------------------------------------------

def doc_to_image(doc):
    from vtc.image_io import load_image

    return [load_image(doc["image"])]


def doc_to_video(doc):
    return [doc["video"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def first_word(text: str) -> str:
    words = text.strip().lower().split()
    return words[0].strip(".,!?;:") if words else ""


def process_results(doc, results):
    """``exact_match``: the first word of the answer is the one-word truth; ``nonempty``: anything was said."""
    answer = results[0] if results else ""
    return {"exact_match": float(first_word(answer) == doc["answer"]), "nonempty": float(bool(answer.strip()))}


# -- writing ---------------------------------------------------------------------------------------------------

def answer_choices(answer: str) -> list[str]:
    """Every word of the answer's kind: the multiple-choice options of a question."""
    vocabularies = (list(syn.COLORS), list(syn.SHAPES), ["yes", "no"], list(syn.LETTERS), list(syn.DIRECTIONS),
                    list(syn.NUMBER_WORDS[: 2 * syn.MAX_OBJECTS + 1]), list(syn.NUMBER_WORDS))
    for words in vocabularies:
        if answer in words:
            return words
    raise ValueError(f"answer {answer!r} belongs to no known answer vocabulary")


def _write_video(frames, path: pathlib.Path, fps: float) -> None:
    import av
    import numpy as np

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv444p"
        stream.options = {"crf": "0"}  # lossless: the model sees the frames it was trained on
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame.convert("RGB")), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_tasks(directory, images: int = 100, videos: int = 30, questions: int = 4, progress=None) -> pathlib.Path:
    """Write the three tasks into ``directory`` (created); returns it, absolute. Reuses a folder already written
    with the same sizes."""
    for name, value in (("images", images), ("videos", videos), ("questions", questions)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    root = pathlib.Path(directory).expanduser().resolve()
    wanted = {"format": FORMAT_VERSION, "images": images, "videos": videos, "questions": questions,
              "root": str(root)}
    manifest = root / _MANIFEST
    if manifest.is_file():
        try:
            if json.loads(manifest.read_text()) == wanted:
                return root
        except ValueError:
            pass
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{root} exists and is not a folder; choose another place for the tasks")
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "videos").mkdir(exist_ok=True)
    image_rows, video_rows = [], []
    for i in range(images):
        sample = syn.make_image_sample("test", i)
        path = root / "images" / f"test_{i:05d}.png"
        sample.image.save(path)
        for j, q in enumerate(sample.questions[:questions]):
            image_rows.append({"question_id": f"image-{i}-{j}", "image": str(path), "question": q.text,
                               "answer": q.answer, "kind": q.kind, "choices": answer_choices(q.answer)})
        if progress:
            progress(1)
    for i in range(videos):
        sample = syn.make_video_sample("test", i)
        path = root / "videos" / f"test_{i:05d}.mp4"
        _write_video(sample.frames, path, sample.fps)
        for j, q in enumerate(sample.questions[:questions]):
            video_rows.append({"question_id": f"video-{i}-{j}", "video": str(path), "question": q.text,
                               "answer": q.answer, "kind": q.kind})
        if progress:
            progress(1)
    for name, rows in (("image", image_rows), ("video", video_rows)):
        with open(root / f"{name}.jsonl", "w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    # the shared part has no .yaml suffix: lmms-eval loads every *.yaml of the folder as a task
    (root / "_vtc_shapes_template").write_text(_COMMON.format(version=FORMAT_VERSION))
    (root / "vtc_shapes_image.yaml").write_text(
        _GENERATE.format(task="vtc_shapes_image", tag=TAG, data=root / "image.jsonl", visual="doc_to_image"))
    (root / "vtc_shapes_video.yaml").write_text(
        _GENERATE.format(task="vtc_shapes_video", tag=TAG, data=root / "video.jsonl", visual="doc_to_video"))
    (root / "vtc_shapes_image_mc.yaml").write_text(
        _MULTIPLE_CHOICE.format(task="vtc_shapes_image_mc", tag=TAG, data=root / "image.jsonl"))
    (root / "utils.py").write_text(_UTILS)
    manifest.write_text(json.dumps(wanted, indent=1))
    return root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtc.eval.lmms.tasks", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--videos", type=int, default=30)
    parser.add_argument("--questions", type=int, default=4, help="questions per image / video")
    args = parser.parse_args(argv)
    root = write_tasks(args.directory, args.images, args.videos, args.questions)
    print(f"wrote {', '.join(TASKS)} (tag {TAG}) to {root}\n"
          f"run: python -m lmms_eval --model vtc --model_args compressor=none --tasks {TAG} --include_path {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
