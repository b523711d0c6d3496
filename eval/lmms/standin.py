"""Stand-in data for real lmms-eval benchmarks, in each task's own schema, for machines with no hub access.

    python -m vtc.eval.lmms.standin OUT --tasks mme,pope,videomme [--docs 20]
    python -m lmms_eval --model vtc --model_args compressor=none --tasks vtc_standin_mme,vtc_standin_pope \\
        --include_path OUT/tasks
    # video tasks (Video-MME, MVBench, EgoSchema, MLVU, LongVideoBench) also need the printed environment
    # (HF_HOME=OUT/hf_home ...)

For each benchmark, ``write_standins`` writes a small local dataset with exactly the columns, types, split names and
file layout the task reads, and one override YAML per task that ``include``s lmms-eval's own installed task YAML and
changes only where the data comes from (``dataset_path`` + ``dataset_kwargs: {load_from_disk: true}``). The task's
own ``doc_to_visual``, ``doc_to_text``, ``process_results``, metrics and aggregations run unchanged, so the result
table holds the benchmark's own metric names (``mme_perception_score``, ``pope_f1_score``, ``exact_match``, ...)
under the stand-in task name ``vtc_standin_<task>``.

Images and videos are synthetic (``vtc.eval.default_model.synthetic``: shapes, colours, letters, motion); the
questions are asked about that generated content, so every answer is the true one for its image or video and each
metric scores real correctness (a model that never saw the shapes scores near chance). See ``docs/standin.md``.

Two deviations from "only the dataset location changes", both unavoidable:

* GQA: the task's ``process_docs`` joins the questions with a *second* hub dataset (``lmms-lab-encoder/GQA``,
  ``testdev_balanced_images``) by ``imageId``; the stand-in replaces ``process_docs`` with the same join against the
  local copy of that images dataset (``gqa_join_images``).
* The video tasks (Video-MME, MVBench, EgoSchema, MLVU, LongVideoBench) find their videos under
  ``$HF_HOME/<cache_dir>`` (read when their ``utils.py`` is imported), not through ``dataset_path``; the
  stand-in writes the videos to ``OUT/hf_home`` and returns ``StandinSet.env`` --
  ``HF_HOME`` pointing there and ``HF_HUB_CACHE`` pinned to the hub cache in effect when the stand-ins were written,
  so models still resolve -- to set for the lmms-eval process.

With hub access nothing here is needed: ``--tasks mme`` runs the real task unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import shutil
from dataclasses import dataclass, field

import numpy as np

from ..default_model import synthetic as syn

FORMAT_VERSION = 1
PREFIX = "vtc_standin_"
DEFAULT_DOCS = 20
_MANIFEST = "vtc_standin.json"
_UTILS_MODULE = "vtc_standin_utils"

# MVBench's 20 subtasks (the order of lmms-eval's mvbench group)
MVBENCH_SUBTASKS = (
    "action_sequence", "moving_count", "action_prediction", "episodic_reasoning", "action_antonym", "action_count",
    "scene_transition", "object_shuffle", "object_existence", "fine_grained_pose", "unexpected_action",
    "moving_direction", "state_change", "object_interaction", "character_order", "action_localization",
    "counterfactual_inference", "fine_grained_action", "moving_attribute", "egocentric_navigation",
)
# MVBench's video folders under $HF_HOME/mvbench_video (lmms_eval/tasks/mvbench/utils.py DATA_LIST)
_MVBENCH_FOLDERS = {
    "object_interaction": "star/Charades_segment", "action_sequence": "star/Charades_segment",
    "action_prediction": "star/Charades_segment", "action_localization": "sta/sta_video_segment",
    "moving_count": "clevrer/video_validation", "fine_grained_pose": "nturgbd_convert",
    "character_order": "perception/videos", "object_shuffle": "perception/videos", "egocentric_navigation": "vlnqa",
    "moving_direction": "clevrer/video_validation", "episodic_reasoning": "tvqa/video_fps3_hq_segment",
    "fine_grained_action": "Moments_in_Time_Raw/videos", "scene_transition": "scene_qa/video",
    "state_change": "perception/videos", "moving_attribute": "clevrer/video_validation",
    "action_antonym": "ssv2_video_mp4", "unexpected_action": "FunQA_test/test",
    "counterfactual_inference": "clevrer/video_validation", "object_existence": "clevrer/video_validation",
    "action_count": "perception/videos",
}
# the synthetic video questions closest to each MVBench subtask (others: any question of the video)
_MVBENCH_KINDS = {
    "moving_direction": ("direction",), "egocentric_navigation": ("direction",),
    "moving_count": ("video_count",), "action_count": ("frames_with_shape",), "object_existence": ("video_exists",),
    "action_sequence": ("appeared_last_shape",), "action_prediction": ("appeared_last_shape",),
    "character_order": ("appeared_last_color",), "scene_transition": ("appeared_last_color",),
    "state_change": ("disappeared_color",), "moving_attribute": ("disappeared_color", "appeared_last_color"),
}
# the folders the video tasks read their videos from, under $HF_HOME (their YAMLs' dataset_kwargs.cache_dir)
VIDEOMME_CACHE = "videomme"
MVBENCH_CACHE = "mvbench_video"
EGOSCHEMA_CACHE = "egoschema"  # + /videos/<video_idx>.mp4
MLVU_CACHE = "mlvu"  # mlvu_dev: + /<video_name>
LONGVIDEOBENCH_CACHE = "datasets/longvideobench"  # + /videos/<video_path>
# MMMU subjects the stand-in's ids use (``validation_<subject>_<n>``; utils.DOMAIN_CAT2SUB_CAT names)
_MMMU_SUBJECTS = ("Art_Theory", "Design", "Math", "Physics", "Geography", "Computer_Science", "Electronics",
                  "Psychology")
# MLVU dev's 7 multiple-choice task types (utils.mlvu_aggregate_results_dev) and the synthetic question kinds closest
_MLVU_TYPES = {
    "plotQA": ("appeared_last_color", "disappeared_color"), "needle": ("disappeared_color", "appeared_last_shape"),
    "ego": ("direction",), "count": ("video_count", "frames_with_shape"),
    "order": ("appeared_last_shape", "appeared_last_color"), "anomaly_reco": ("appeared_last_shape",),
    "topic_reasoning": ("appeared_last_color",),
}


@dataclass(frozen=True)
class StandinSpec:
    """One lmms-eval task (or group) that has a stand-in.

    ``task``: lmms-eval's name; ``standin``: the name to pass to ``--tasks``; ``dataset``: the stand-in dataset it
    reads (several tasks can share one, e.g. POPE's splits); ``yaml``: lmms-eval's task YAML the override includes
    (relative to ``lmms_eval/tasks``), ``None`` for a group; ``subtasks``: a group's member tasks; ``video``: the
    lmms-eval run needs ``StandinSet.env``; ``metrics``: the task's own metric names, as they appear in results;
    ``split``: the task's ``test_split`` (``None`` for a group).
    """

    task: str
    dataset: str
    yaml: str | None
    metrics: tuple[str, ...] = ()
    subtasks: tuple[str, ...] = ()
    video: bool = False
    split: str | None = None

    @property
    def standin(self) -> str:
        return PREFIX + self.task

    @property
    def is_group(self) -> bool:
        return bool(self.subtasks)


def _specs() -> dict[str, StandinSpec]:
    pope = ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio")
    specs = [
        StandinSpec("mme", "mme", "mme/mme.yaml", ("mme_perception_score", "mme_cognition_score"), split="test"),
        StandinSpec("pope", "pope", "pope/pope.yaml", pope, split="test"),
        StandinSpec("pope_adv", "pope", "pope/pope_adv.yaml", pope, split="adversarial"),
        StandinSpec("pope_pop", "pope", "pope/pope_pop.yaml", pope, split="popular"),
        StandinSpec("pope_random", "pope", "pope/pope_random.yaml", pope, split="random"),
        StandinSpec("pope_full", "pope", None, pope, subtasks=("pope_adv", "pope_pop", "pope_random")),
        StandinSpec("gqa", "gqa", "gqa/gqa.yaml", ("exact_match",), split="testdev"),
        StandinSpec("scienceqa_img", "scienceqa_img", "scienceqa/scienceqa_img.yaml", ("exact_match",), split="test"),
        StandinSpec("textvqa_val", "textvqa", "textvqa/textvqa_val.yaml", ("exact_match", "submission"),
                    split="validation"),
        StandinSpec("mmbench_en_dev_static", "mmbench_en", "mmbench/mmbench_en_dev_static.yaml",
                    ("gpt_eval_score", "submission"), split="dev"),
        StandinSpec("chartqa", "chartqa", "chartqa/chartqa.yaml",
                    ("relaxed_overall", "relaxed_human_split", "relaxed_augmented_split"), split="test"),
        StandinSpec("docvqa_val", "docvqa", "docvqa/docvqa_val.yaml", ("anls",), split="validation"),
        StandinSpec("videomme", "videomme", "videomme/videomme.yaml", ("videomme_perception_score",), video=True,
                    split="test"),
        StandinSpec("mvbench", "mvbench", None, ("mvbench_accuracy",), video=True,
                    subtasks=tuple(f"mvbench_{s}" for s in MVBENCH_SUBTASKS)),
        StandinSpec("vqav2_val", "vqav2", "vqav2/vqav2_val.yaml", ("exact_match",), split="validation"),
        StandinSpec("mmmu_val", "mmmu", "mmmu/mmmu_val.yaml", ("mmmu_acc",), split="validation"),
        StandinSpec("seedbench", "seedbench", "seedbench/seedbench.yaml", ("seed_image", "seed_video", "seed_all"),
                    split="test"),
        StandinSpec("egoschema_subset", "egoschema", "egoschema/egoschema_subset.yaml", ("score",), video=True,
                    split="test"),
        StandinSpec("mlvu_dev", "mlvu", "mlvu/mlvu_dev.yaml", ("mlvu_percetion_score",), video=True, split="test"),
        StandinSpec("longvideobench_val_v", "longvideobench", "longvideobench/longvideobench_val_v.yaml",
                    ("lvb_acc",), video=True, split="validation"),
    ]
    specs += [StandinSpec(f"mvbench_{s}", "mvbench", f"mvbench/mvbench_{s}.yaml", ("mvbench_accuracy",), video=True,
                          split="train") for s in MVBENCH_SUBTASKS]
    return {spec.task: spec for spec in specs}


STANDIN_TASKS: dict[str, StandinSpec] = _specs()

# tasks asked for often that deliberately have no stand-in, and why
NO_STANDIN: dict[str, str] = {
    "mmbench_en_dev": "its gpt_eval_score asks an OpenAI judge for every answer it cannot parse (no network here); "
                      "use mmbench_en_dev_static, the same data scored by regex / substring matching",
    "mmbench_en_test": "the test split has no answers (a submission file for the MMBench server)",
    "mmbench": "a group mixing the GPT-judged and test-server tasks; use mmbench_en_dev_static",
    "docvqa_test": "the test split has no answers (a submission file for the DocVQA server); use docvqa_val",
    "textvqa_test": "the test split has no answers (a submission file for EvalAI); use textvqa_val",
    "textvqa": "a group with the answer-less test split; use textvqa_val",
    "vqav2_test": "the test(-dev) split has no answers: its only metric is a submission file scored by the EvalAI "
                  "server; use vqav2_val (the same VQA accuracy, computed locally)",
    "vqav2": "a group with vqav2_test, scored only by the EvalAI server; use vqav2_val",
    "mmmu_test": "the test split has no answers (a submission file for the MMMU server); use mmmu_val",
    "mmmu": "a group with the answer-less mmmu_test; use mmmu_val",
    "mmmu_val_reasoning": "scored by an OpenAI judge (llm_as_judge_eval; no network here); use mmmu_val",
    "egoschema": "the full set's answers are not public: its aggregation POSTs the predictions to EgoSchema's "
                 "validation server (no network here); use egoschema_subset, the 500 questions with public answers",
    "mlvu_test": "not covered: papers report MLVU's M-Avg on the dev set; the test set (6 options, 9 task types, "
                 "videos under $HF_HOME/mlvu_test) has no stand-in -- use mlvu_dev",
    "longvideobench_test_v": "the test split has no answers (a submission file); use longvideobench_val_v",
    "longvideobench_test_i": "the test split has no answers (a submission file); use longvideobench_val_v",
}


@dataclass(frozen=True)
class StandinSet:
    """What ``write_standins`` wrote and how to run it.

    ``include_path``: pass to lmms-eval (``--include_path`` / ``TaskManager(include_path=...)``); ``tasks``: the
    requested lmms-eval task name -> the stand-in name to pass to ``--tasks``; ``env``: environment the lmms-eval
    process needs (empty unless a video task is included -- see the module docstring); ``docs``: stand-in name ->
    documents it holds (a group: its subtasks' total).
    """

    root: pathlib.Path
    include_path: pathlib.Path
    tasks: dict[str, str]
    env: dict[str, str] = field(default_factory=dict)
    docs: dict[str, int] = field(default_factory=dict)

    @property
    def task_names(self) -> list[str]:
        """The stand-in task names, in the order asked for (the ``--tasks`` list)."""
        return list(self.tasks.values())

    def original(self, name: str) -> str:
        """The lmms-eval task a stand-in (or stand-in subtask) name stands for: ``vtc_standin_mme`` -> ``mme``."""
        return name.removeprefix(PREFIX)

    def lmms_eval_args(self) -> list[str]:
        """``--tasks ... --include_path ...`` for ``python -m lmms_eval``."""
        return ["--tasks", ",".join(self.task_names), "--include_path", str(self.include_path)]


# -- names ------------------------------------------------------------------------------------------------------------

def standin_name(task: str) -> str:
    """The stand-in task name of an lmms-eval task (``mme`` -> ``vtc_standin_mme``); ``ValueError`` when none."""
    return STANDIN_TASKS[check_tasks([task])[0]].standin


def check_tasks(tasks) -> list[str]:
    """The task names (a list, or a comma-separated string), checked: each must have a stand-in. A stand-in name
    (``vtc_standin_mme``) is accepted for its task. Raises ``ValueError`` naming the tasks that lack one (and why, for
    the known ones) and listing those that have one."""
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    names = [t.strip().removeprefix(PREFIX) for t in tasks if t.strip()]
    if not names:
        raise ValueError("no tasks given; stand-ins exist for: " + ", ".join(STANDIN_TASKS))
    missing = [t for t in names if t not in STANDIN_TASKS]
    if missing:
        reasons = "; ".join(f"{t}: {NO_STANDIN[t]}" for t in missing if t in NO_STANDIN)
        raise ValueError(
            f"no stand-in data for task(s) {', '.join(missing)}" + (f" ({reasons})" if reasons else "")
            + ". Stand-ins exist for: " + ", ".join(STANDIN_TASKS)
            + ". With hub access, run the real task instead (no stand-in needed).")
    return list(dict.fromkeys(names))


def lmms_eval_tasks_dir() -> pathlib.Path:
    """The installed ``lmms_eval/tasks`` folder (the override YAMLs include its task YAMLs by absolute path)."""
    import lmms_eval.tasks

    return pathlib.Path(lmms_eval.tasks.__file__).resolve().parent


# -- the task functions (the written utils module imports this) -----------------------------------------------------

def gqa_join_images(dataset, images_path):
    """GQA's ``process_docs`` against the local images dataset: each question gets the ``image`` of its ``imageId``
    (as ``lmms_eval/tasks/gqa/utils.py:gqa_process_docs`` does with the hub's ``testdev_balanced_images``)."""
    import datasets

    images = datasets.load_from_disk(str(images_path))["testdev"]
    by_id = {row["id"]: row["image"].convert("RGB") for row in images}
    # in memory, with a fixed fingerprint: no cache file beside the stand-in, no hashing of the images
    return dataset.map(lambda doc: {"image": by_id[doc["imageId"]]}, keep_in_memory=True,
                       new_fingerprint=f"vtc_standin_gqa_{dataset._fingerprint}")


# -- content --------------------------------------------------------------------------------------------------------

def _rng(*key) -> np.random.Generator:
    return np.random.default_rng([FORMAT_VERSION, *[sum(map(ord, str(k))) * 1000 + i for i, k in enumerate(key)]])


def _image(i: int, salt: int = 0):
    return syn.make_image_sample("test", 10_000 * salt + i)


def _video(i: int, salt: int = 0):
    return syn.make_video_sample("test", 10_000 * salt + i)


def _pick(questions, kinds):
    for q in questions:
        if q.kind in kinds:
            return q
    return questions[0]


def _distractors(answer: str, count: int, rng) -> list[str]:
    from .tasks import answer_choices

    pool = [w for w in answer_choices(answer) if w != answer]
    picked = list(rng.choice(pool, size=min(count, len(pool)), replace=False))
    return [str(w) for w in picked]


def _options(answer: str, count: int, rng) -> tuple[list[str], int]:
    """``count`` options holding ``answer`` at a random place; returns (options, answer index)."""
    options = _distractors(answer, count - 1, rng)
    at = int(rng.integers(len(options) + 1))
    options.insert(at, answer)
    return options, at


def _present_absent(sample, rng, mode: str = "random") -> tuple[str, str]:
    """A ``colour shape`` in the image and one that is not: ``random`` any absent pair, ``popular`` an absent pair of
    the most common shape, ``adversarial`` a present shape in another colour (POPE's three negative samplings)."""
    objects = [o for o in sample.objects if o.shape != "letter"]
    present = {(o.color, o.shape) for o in objects}
    yes = objects[int(rng.integers(len(objects)))].name if objects else None
    absent = [(c, s) for c in syn.COLORS for s in syn.SHAPES if (c, s) not in present]
    if mode == "adversarial" and objects:
        shapes = {o.shape for o in objects}
        absent = [p for p in absent if p[1] in shapes] or absent
    elif mode == "popular":
        absent = [p for p in absent if p[1] == "circle"] or absent
    no = absent[int(rng.integers(len(absent)))]
    if yes is None:  # only the glyph: ask about it
        yes = "letter"
    return _a(yes), _a(f"{no[0]} {no[1]}")


def _a(thing: str) -> str:
    return ("an " if thing[0] in "aeiou" else "a ") + thing


def _bar_chart(i: int, size=(1024, 768)):
    """A bar chart (ChartQA): coloured bars with value labels; returns (image, colours, values)."""
    from PIL import Image, ImageDraw

    rng = _rng("chart", i)
    count = int(rng.integers(3, 7))
    colours = [str(c) for c in rng.choice(list(syn.COLORS), size=count, replace=False)]
    values = [int(v) for v in rng.choice(np.arange(5, 100), size=count, replace=False)]
    image = Image.new("RGB", size, (250, 250, 250))
    draw = ImageDraw.Draw(image)
    width, height = size
    base, top = height - 90, 80
    draw.line([(60, base), (width - 40, base)], fill=(0, 0, 0), width=3)
    slot = (width - 120) // count
    font = syn._font(28)
    draw.text((60, 20), f"Chart {i}", fill=(0, 0, 0), font=font)
    for k, (colour, value) in enumerate(zip(colours, values)):
        x0 = 80 + k * slot
        y0 = base - int((base - top) * value / 100)
        draw.rectangle([x0, y0, x0 + slot - 40, base], fill=syn.COLORS[colour])
        draw.text((x0, y0 - 34), str(value), fill=(0, 0, 0), font=font)
        draw.text((x0, base + 12), colour, fill=(0, 0, 0), font=font)
    return image, colours, values


_WORDS = ("invoice", "report", "memo", "letter", "budget", "agenda", "contract", "notice", "summary", "receipt")


def _document(i: int, size=(768, 1024)):
    """A document page (DocVQA): a title, a date, a total and body lines; returns (image, fields)."""
    from PIL import Image, ImageDraw

    rng = _rng("doc", i)
    title = str(rng.choice(_WORDS))
    fields = {"title": title.upper(), "date": f"{int(rng.integers(1, 29))}/{int(rng.integers(1, 13))}/19"
              f"{int(rng.integers(60, 99))}", "total": f"${int(rng.integers(10, 999))}.00"}
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.text((60, 50), fields["title"], fill=(0, 0, 0), font=syn._font(48))
    small = syn._font(22)
    draw.text((60, 130), f"Date: {fields['date']}", fill=(0, 0, 0), font=small)
    for line in range(14):
        words = " ".join(str(w) for w in rng.choice(_WORDS, size=6))
        draw.text((60, 200 + 40 * line), words, fill=(60, 60, 60), font=small)
    draw.text((60, 200 + 40 * 15), f"Total: {fields['total']}", fill=(0, 0, 0), font=small)
    return image, fields


# -- the datasets: one writer per stand-in dataset; each returns {split: rows} (+ the Features to store) -------------

def _mme(n: int, root: pathlib.Path):
    from datasets import Features, Image, Value

    perception = ["existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR"]
    cognition = ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"]
    rows = []
    for i in range(max(1, (n + 1) // 2)):  # MME scores pairs: two questions (one yes, one no) per image
        category = perception[(i // 2) % len(perception)] if i % 2 == 0 else cognition[(i // 2) % len(cognition)]
        sample, rng = _image(i), _rng("mme", i)
        yes, no = _present_absent(sample, rng)
        qid = f"{category}/{i:04d}.png"
        pair = [(f"Is there {yes} in the image? Please answer yes or no.", "Yes"),
                (f"Is there {no} in the image? Please answer yes or no.", "No")]
        if rng.random() < 0.5:
            pair.reverse()
        for question, answer in pair:
            rows.append({"question_id": qid, "image": sample.image, "question": question, "answer": answer,
                         "category": category})
    features = Features({"question_id": Value("string"), "image": Image(), "question": Value("string"),
                         "answer": Value("string"), "category": Value("string")})
    return {"test": rows}, features


def _pope(n: int, root: pathlib.Path):
    from datasets import Features, Image, Value

    splits, counter = {}, 0
    for split in ("adversarial", "popular", "random"):
        rows = []
        for i in range(max(1, (n + 1) // 2)):
            sample, rng = _image(i, salt=1), _rng("pope", split, i)
            yes, no = _present_absent(sample, rng, split)
            pair = [(yes, "yes"), (no, "no")]
            if rng.random() < 0.5:
                pair.reverse()
            for thing, answer in pair:
                counter += 1
                rows.append({"id": str(counter), "question_id": str(counter),
                             "question": f"Is there {thing} in the image?", "answer": answer,
                             "image_source": f"synthetic_{i:06d}", "image": sample.image, "category": split})
        splits[split] = rows
    splits["test"] = [row for split in ("adversarial", "popular", "random") for row in splits[split]]
    features = Features({"id": Value("string"), "question_id": Value("string"), "question": Value("string"),
                         "answer": Value("string"), "image_source": Value("string"), "image": Image(),
                         "category": Value("string")})
    return splits, features


def _gqa(n: int, root: pathlib.Path):
    """GQA: the questions (``testdev_balanced_instructions``, no image column) and, beside them, the images
    dataset the task's process_docs joins by ``imageId`` (``testdev_balanced_images``: ``id``, ``image``)."""
    from datasets import Dataset, DatasetDict, Features, Image, Value

    rows, images = [], []
    per_image = 2
    for i in range(max(1, (n + per_image - 1) // per_image)):
        sample = _image(i, salt=2)
        image_id = f"n{i:06d}"
        images.append({"id": image_id, "image": sample.image})
        for j, q in enumerate(sample.questions[:per_image]):
            rows.append({"id": f"{i:06d}{j}", "imageId": image_id, "question": q.text.replace(" ?", "?").capitalize(),
                         "answer": q.answer, "fullAnswer": f"The answer is {q.answer}.", "isBalanced": True})
    with _quiet():
        DatasetDict({"testdev": Dataset.from_list(images, features=Features({"id": Value("string"), "image": Image()}))
                     }).save_to_disk(str(root / "images"))
    features = Features({"id": Value("string"), "imageId": Value("string"), "question": Value("string"),
                         "answer": Value("string"), "fullAnswer": Value("string"), "isBalanced": Value("bool")})
    return {"testdev": rows[:n]}, features


def _scienceqa(n: int, root: pathlib.Path):
    from datasets import Features, Image, Sequence, Value

    rows = []
    for i in range(n):
        sample, rng = _image(i, salt=3), _rng("sqa", i)
        q = _pick(sample.questions, ("color_at", "shape_at", "count_color", "count_shape"))
        choices, answer = _options(q.answer, int(rng.integers(2, 5)), rng)
        rows.append({"image": sample.image, "question": q.text.replace(" ?", "?").capitalize(), "choices": choices,
                     "answer": answer, "hint": "" if i % 2 else "The image shows coloured shapes on a 3x3 grid.",
                     "task": "closed choice", "grade": "grade3", "subject": "natural science",
                     "topic": "shapes", "category": "Shapes and colours", "skill": "Identify shapes",
                     "lecture": "", "solution": f"The answer is {q.answer}."})
    features = Features({"image": Image(), "question": Value("string"), "choices": Sequence(Value("string")),
                         "answer": Value("int8"), "hint": Value("string"), "task": Value("string"),
                         "grade": Value("string"), "subject": Value("string"), "topic": Value("string"),
                         "category": Value("string"), "skill": Value("string"), "lecture": Value("string"),
                         "solution": Value("string")})
    return {"test": rows}, features


def _textvqa(n: int, root: pathlib.Path):
    from datasets import Features, Image, Sequence, Value

    rows, i = [], 0
    while len(rows) < n:
        sample = _image(i, salt=4)
        letter = next((o.letter for o in sample.objects if o.letter), None)
        i += 1
        if letter is None and i < 50 * n:  # TextVQA asks about text in the image: keep images with a glyph
            continue
        q = _pick(sample.questions, ("letter",))
        ocr = [letter] if letter else []
        rows.append({"image_id": f"{i:016x}", "question_id": len(rows), "question": q.text.replace(" ?", "?"),
                     "question_tokens": q.text.replace(" ?", "").split(), "image": sample.image,
                     "image_width": sample.image.width, "image_height": sample.image.height,
                     "flickr_original_url": "", "flickr_300k_url": "", "answers": [q.answer] * 10,
                     "image_classes": ["shape"], "set_name": "val", "ocr_tokens": ocr})
        i += 1
    features = Features({"image_id": Value("string"), "question_id": Value("int32"), "question": Value("string"),
                         "question_tokens": Sequence(Value("string")), "image": Image(),
                         "image_width": Value("int32"), "image_height": Value("int32"),
                         "flickr_original_url": Value("string"), "flickr_300k_url": Value("string"),
                         "answers": Sequence(Value("string")), "image_classes": Sequence(Value("string")),
                         "set_name": Value("string"), "ocr_tokens": Sequence(Value("string"))})
    return {"validation": rows}, features


def _mmbench(n: int, root: pathlib.Path):
    """MMBench (en, dev): each question with its circular variants (the options rotated; ``index + k * 1e6``), as
    MMBench's CircularEval scores a question right only when every rotation is."""
    from datasets import Features, Image, Value

    rows, i = [], 0
    letters = "ABCD"
    while len(rows) < n:
        sample, rng = _image(i, salt=5), _rng("mmbench", i)
        q = _pick(sample.questions, ("color_at", "shape_at"))
        options, at = _options(q.answer, 4, rng)
        for k in range(4):
            rotated = options[k:] + options[:k]
            rows.append({"index": i + k * 1_000_000, "question": q.text.replace(" ?", "?").capitalize(),
                         "hint": "nan" if i % 2 else "The image shows coloured shapes.",
                         **dict(zip(letters, rotated)), "answer": letters[(at - k) % 4],
                         "category": "attribute_recognition" if q.kind == "color_at" else "object_localization",
                         "image": sample.image, "source": "vtc_synthetic",
                         "L2-category": "finegrained_perception (instance-level)", "comment": "nan", "split": "dev"})
        i += 1
    features = Features({"index": Value("int64"), "question": Value("string"), "hint": Value("string"),
                         **{c: Value("string") for c in letters}, "answer": Value("string"),
                         "category": Value("string"), "image": Image(), "source": Value("string"),
                         "L2-category": Value("string"), "comment": Value("string"), "split": Value("string")})
    return {"dev": rows}, features


def _chartqa(n: int, root: pathlib.Path):
    from datasets import Features, Image, Value

    rows = []
    for i in range(n):
        image, colours, values = _bar_chart(i)
        rng = _rng("chartqa", i)
        k = int(rng.integers(len(colours)))
        if i % 2 == 0:
            question, answer, kind = f"What is the value of the {colours[k]} bar?", str(values[k]), "human_test"
        else:
            question, answer, kind = "How many bars are there in the chart?", str(len(colours)), "augmented_test"
        rows.append({"type": kind, "question": question, "answer": answer, "image": image})
    features = Features({"type": Value("string"), "question": Value("string"), "answer": Value("string"),
                         "image": Image()})
    return {"test": rows}, features


def _docvqa(n: int, root: pathlib.Path):
    from datasets import Features, Image, Sequence, Value

    rows = []
    asks = {"title": "What is the title of the document?", "date": "What is the date mentioned in the document?",
            "total": "What is the total amount?"}
    for i in range(n):
        image, fields = _document(i)
        key = list(asks)[i % len(asks)]
        rows.append({"questionId": str(50_000 + i), "question": asks[key], "question_types": ["layout"],
                     "image": image, "docId": i, "ucsf_document_id": f"vtc{i:04d}", "ucsf_document_page_no": "1",
                     "answers": [fields[key]], "data_split": "val"})
    features = Features({"questionId": Value("string"), "question": Value("string"),
                         "question_types": Sequence(Value("string")), "image": Image(), "docId": Value("int32"),
                         "ucsf_document_id": Value("string"), "ucsf_document_page_no": Value("string"),
                         "answers": Sequence(Value("string")), "data_split": Value("string")})
    return {"validation": rows}, features


def _videomme(n: int, root: pathlib.Path, hf_home: pathlib.Path):
    from datasets import Features, Sequence, Value

    from .tasks import _write_video

    folder = hf_home / VIDEOMME_CACHE / "data"
    folder.mkdir(parents=True, exist_ok=True)
    domains = [("Knowledge", "Humanity & History"), ("Film & Television", "Animation"),
               ("Sports Competition", "Football"), ("Life Record", "Daily Life")]
    rows, i = [], 0
    per_video = 3
    while len(rows) < n:
        sample, rng = _video(i, salt=6), _rng("videomme", i)
        video_id = f"vtc{i:05d}"
        _write_video(sample.frames, folder / f"{video_id}.mp4", sample.fps)
        domain, sub = domains[i % len(domains)]
        for j, q in enumerate(sample.questions[:per_video]):
            options, at = _options(q.answer, 4, rng)
            kind = ("Counting Problem" if "count" in q.kind or "frames" in q.kind
                    else "Temporal Reasoning" if "disappeared" in q.kind or "appeared" in q.kind
                    else "Spatial Reasoning" if q.kind == "direction"
                    else "Object Recognition")
            rows.append({"video_id": f"{i + 1:03d}", "duration": "short", "domain": domain, "sub_category": sub,
                         "url": "", "videoID": video_id, "question_id": f"{i + 1:03d}-{j + 1}", "task_type": kind,
                         "question": q.text.replace(" ?", "?").capitalize(),
                         "options": [f"{letter}. {o}" for letter, o in zip("ABCD", options)],
                         "answer": "ABCD"[at]})
        i += 1
    features = Features({"video_id": Value("string"), "duration": Value("string"), "domain": Value("string"),
                         "sub_category": Value("string"), "url": Value("string"), "videoID": Value("string"),
                         "question_id": Value("string"), "task_type": Value("string"), "question": Value("string"),
                         "options": Sequence(Value("string")), "answer": Value("string")})
    return {"test": rows[:n]}, features


def _mvbench(n: int, root: pathlib.Path, hf_home: pathlib.Path) -> dict[str, tuple]:
    """MVBench: one dataset per subtask (split ``train``, as on the hub), the videos under each subtask's folder."""
    from datasets import Features, Sequence, Value

    from .tasks import _write_video

    out = {}
    features = Features({"video": Value("string"), "question": Value("string"),
                         "candidates": Sequence(Value("string")), "answer": Value("string")})
    for s, sub in enumerate(MVBENCH_SUBTASKS):
        folder = hf_home / MVBENCH_CACHE / _MVBENCH_FOLDERS[sub]
        folder.mkdir(parents=True, exist_ok=True)
        kinds = _MVBENCH_KINDS.get(sub, ())
        rows, i = [], 0
        while len(rows) < n:
            sample, rng = _video(i, salt=100 + s), _rng("mvbench", sub, i)
            i += 1
            fitting = [q for q in sample.questions if q.kind in kinds]
            if not fitting and kinds and i < 50 * n:  # a question of the subtask's kind, when the video has one
                continue
            q = (fitting or sample.questions)[0]
            name = f"{sub}_{len(rows):04d}.mp4"
            _write_video(sample.frames, folder / name, sample.fps)
            options, _ = _options(q.answer, int(rng.integers(3, 5)), rng)
            rows.append({"video": name, "question": q.text.replace(" ?", "?").capitalize(), "candidates": options,
                         "answer": q.answer})
        out[sub] = ({"train": rows}, features)
    return out


def _rich(questions, count: int, kinds=()):
    """The first question (of ``kinds`` when one fits) whose answer vocabulary has at least ``count`` words, so it
    can be asked as ``count`` distinct options; ``None`` when none has."""
    from .tasks import answer_choices

    fitting = [q for q in questions if len(answer_choices(q.answer)) >= count]
    return next((q for q in fitting if q.kind in kinds), fitting[0] if fitting else None)


def _digits(answer: str) -> str:
    """A count word as the digits real annotators write (``two`` -> ``2``); other answers unchanged."""
    return str(syn.NUMBER_WORDS.index(answer)) if answer in syn.NUMBER_WORDS else answer


def _question(q) -> str:
    return q.text.replace(" ?", "?").capitalize()


def _vqav2(n: int, root: pathlib.Path):
    """VQAv2 (``validation``): 2 questions per image, the 10 annotator answers (distinct ``answer_id``: the task's
    leave-one-out accuracy compares the answer dicts) all the true one; counts as digits, as annotators write them."""
    from datasets import Features, Image, Value

    rows = []
    for i in range(max(1, (n + 1) // 2)):
        sample = _image(i, salt=7)
        for j, q in enumerate(sample.questions[:2]):
            answer = _digits(q.answer)
            kind = "yes/no" if answer in ("yes", "no") else "number" if answer.isdigit() else "other"
            rows.append({"question_type": " ".join(q.text.split()[:3]), "multiple_choice_answer": answer,
                         "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": k + 1}
                                     for k in range(10)],
                         "image_id": 1_000 + i, "answer_type": kind, "question_id": (1_000 + i) * 1_000 + j,
                         "question": _question(q), "image": sample.image})
    features = Features({"question_type": Value("string"), "multiple_choice_answer": Value("string"),
                         "answers": [{"answer": Value("string"), "answer_confidence": Value("string"),
                                      "answer_id": Value("int64")}],
                         "image_id": Value("int64"), "answer_type": Value("string"), "question_id": Value("int64"),
                         "question": Value("string"), "image": Image()})
    return {"validation": rows[:n]}, features


def _mmmu(n: int, root: pathlib.Path):
    """MMMU (``validation``): ``<image 1>`` questions, alternately multiple-choice (options as the hub's string
    ``"['…', …]"``, letter answer) and open (a word or a number), ids ``validation_<subject>_<n>``."""
    from datasets import Features, Image, Value

    rows = []
    for i in range(n):
        sample, rng = _image(i, salt=8), _rng("mmmu", i)
        subject = _MMMU_SUBJECTS[i % len(_MMMU_SUBJECTS)]
        q = _rich(sample.questions, 4, ("color_at", "shape_at", "count_color", "count_shape", "count"))
        row = {"id": f"validation_{subject}_{i + 1}", "question": f"<image 1> {_question(q)}", "explanation": "",
               "img_type": "['Diagrams']", "topic_difficulty": ("Easy", "Medium", "Hard")[i % 3],
               "subfield": subject.replace("_", " "), **{f"image_{k}": None for k in range(1, 8)},
               "image_1": sample.image}
        if i % 2 == 0:
            options, at = _options(q.answer, 4, rng)
            row.update(options=repr(options), answer="ABCD"[at], question_type="multiple-choice")
        else:
            row.update(options="[]", answer=_digits(q.answer), question_type="open")
        rows.append(row)
    features = Features({"id": Value("string"), "question": Value("string"), "options": Value("string"),
                         "explanation": Value("string"), **{f"image_{k}": Image() for k in range(1, 8)},
                         "img_type": Value("string"), "answer": Value("string"), "topic_difficulty": Value("string"),
                         "question_type": Value("string"), "subfield": Value("string")})
    return {"validation": rows}, features


# SEED-Bench's image dimensions (question_type_id) closest to each synthetic question kind
_SEED_DIMENSIONS = {"shape_at": 2, "color_at": 3, "count": 5, "count_color": 5, "count_shape": 5}


def _seedbench(n: int, root: pathlib.Path):
    """SEED-Bench (``test``), the image part: ``data_type: image``, ``image`` a list of one image, 4 choices,
    letter answers (no video questions: ``seed_video`` stays empty)."""
    from datasets import Features, Image, Sequence, Value

    rows = []
    for i in range(n):
        sample, rng = _image(i, salt=9), _rng("seed", i)
        q = _rich(sample.questions, 4, (list(_SEED_DIMENSIONS)[i % len(_SEED_DIMENSIONS)],))
        options, at = _options(q.answer, 4, rng)
        rows.append({"answer": "ABCD"[at], **{f"choice_{c}": o for c, o in zip("abcd", options)},
                     "data_id": f"vtc/{i:06d}.png", "data_type": "image", "question": _question(q),
                     "question_id": str(i + 1), "question_type_id": _SEED_DIMENSIONS.get(q.kind, 3),
                     "image": [sample.image], "segment": []})
    features = Features({"answer": Value("string"), **{f"choice_{c}": Value("string") for c in "abcd"},
                         "data_id": Value("string"), "data_type": Value("string"), "question": Value("string"),
                         "question_id": Value("string"), "question_type_id": Value("int16"),
                         "image": Sequence(Image()), "segment": Sequence(Value("int64"))})
    return {"test": rows}, features


def _video_with(i: int, salt: int, count: int, kinds=(), tries: int = 50):
    """The first synthetic clip from ``i`` on with a question askable as ``count`` options (of ``kinds`` when one
    has); returns (next i, sample, question)."""
    for k in range(i, i + tries):
        sample = _video(k, salt=salt)
        q = _rich(sample.questions, count, kinds)
        if q is not None and (not kinds or q.kind in kinds or k == i + tries - 1):
            return k + 1, sample, q
    raise RuntimeError("no synthetic clip with a multiple-choice question")  # pragma: no cover


def _egoschema(n: int, root: pathlib.Path, hf_home: pathlib.Path):
    """EgoSchema ``Subset`` (``test``): one question per clip, 5 options ``"A. …"``, the answer its index as a
    string (the task compares ``str(index)``); videos at ``$HF_HOME/egoschema/videos/<video_idx>.mp4``."""
    import uuid

    from datasets import Features, Sequence, Value

    from .tasks import _write_video

    folder = hf_home / EGOSCHEMA_CACHE / "videos"
    folder.mkdir(parents=True, exist_ok=True)
    rows, i = [], 0
    while len(rows) < n:
        i, sample, q = _video_with(i, 10, 5)
        rng = _rng("egoschema", i)
        video_idx = str(uuid.UUID(bytes=bytes(rng.integers(0, 256, 16, dtype=np.uint8))))
        _write_video(sample.frames, folder / f"{video_idx}.mp4", sample.fps)
        options, at = _options(q.answer, 5, rng)
        rows.append({"question_idx": video_idx, "question": _question(q), "video_idx": video_idx,
                     "option": [f"{letter}. {o}" for letter, o in zip("ABCDE", options)], "answer": str(at)})
    features = Features({"question_idx": Value("string"), "question": Value("string"), "video_idx": Value("string"),
                         "option": Sequence(Value("string")), "answer": Value("string")})
    return {"test": rows}, features


def _mlvu(n: int, root: pathlib.Path, hf_home: pathlib.Path):
    """MLVU dev (``test``): documents cycle through the 7 task types (M-Avg averages them, an absent one counting
    0), 4 candidates written into the question as ``(A) …`` lines, letter answers; videos at
    ``$HF_HOME/mlvu/<video_name>``."""
    from datasets import Features, Sequence, Value

    from .tasks import _write_video

    folder = hf_home / MLVU_CACHE
    folder.mkdir(parents=True, exist_ok=True)
    rows, i = [], 0
    types = list(_MLVU_TYPES)
    while len(rows) < n:
        task_type = types[len(rows) % len(types)]
        i, sample, q = _video_with(i, 11, 4, _MLVU_TYPES[task_type])
        rng = _rng("mlvu", i)
        options, at = _options(q.answer, 4, rng)
        name = f"vtc_mlvu_{len(rows):04d}.mp4"
        _write_video(sample.frames, folder / name, sample.fps)
        lines = "\n".join(f"({letter}) {o}" for letter, o in zip("ABCD", options))
        rows.append({"video_name": name, "duration": len(sample.frames) / sample.fps,
                     "question": f"{_question(q)}\n{lines}", "candidates": options, "answer": "ABCD"[at],
                     "task_type": task_type, "question_id": f"{task_type}_{len(rows)}"})
    features = Features({"video_name": Value("string"), "duration": Value("float64"), "question": Value("string"),
                         "candidates": Sequence(Value("string")), "answer": Value("string"),
                         "task_type": Value("string"), "question_id": Value("string")})
    return {"test": rows}, features


# LongVideoBench question categories (referring-reasoning levels) the stand-in labels its questions with
_LVB_CATEGORIES = {"appeared_last_color": ("T3O", "L2-Relation"), "appeared_last_shape": ("T3O", "L2-Relation"),
                   "disappeared_color": ("T2O", "L2-Relation"), "video_count": ("O2E", "L1-Perception"),
                   "frames_with_shape": ("E2O", "L1-Perception"), "direction": ("S2A", "L1-Perception")}


def _longvideobench(n: int, root: pathlib.Path, hf_home: pathlib.Path):
    """LongVideoBench (``validation``): 4-5 candidates as ``option0..option4`` (``N/A`` padding),
    ``correct_choice`` an index, ``duration_group`` 15 (the 8-15 s group; the clips are 4 s); videos at
    ``$HF_HOME/datasets/longvideobench/videos/<video_path>``."""
    from datasets import Features, Sequence, Value

    from .tasks import _write_video

    folder = hf_home / LONGVIDEOBENCH_CACHE / "videos"
    folder.mkdir(parents=True, exist_ok=True)
    rows, i = [], 0
    while len(rows) < n:
        count = 5 if len(rows) % 2 else 4
        i, sample, q = _video_with(i, 12, count)
        rng = _rng("lvb", i)
        options, at = _options(q.answer, count, rng)
        video_id = f"vtc{len(rows):05d}"
        _write_video(sample.frames, folder / f"{video_id}.mp4", sample.fps)
        category, level = _LVB_CATEGORIES.get(q.kind, ("T3O", "L2-Relation"))
        padded = options + ["N/A"] * (5 - len(options))
        rows.append({"video_id": video_id, "question": _question(q), "question_wo_referring_query": _question(q),
                     "candidates": options, "correct_choice": at, "position": [0], "topic_category": "SYN-Synthetic",
                     "question_category": category, "level": level, "id": f"{video_id}_0",
                     "video_path": f"{video_id}.mp4", "subtitle_path": f"{video_id}_en.json", "duration_group": 15,
                     "starting_timestamp_for_subtitles": 0.0, "duration": len(sample.frames) / sample.fps,
                     "view_count": 0, **{f"option{k}": o for k, o in enumerate(padded)}})
    features = Features({"video_id": Value("string"), "question": Value("string"),
                         "question_wo_referring_query": Value("string"), "candidates": Sequence(Value("string")),
                         "correct_choice": Value("int64"), "position": Sequence(Value("int64")),
                         "topic_category": Value("string"), "question_category": Value("string"),
                         "level": Value("string"), "id": Value("string"), "video_path": Value("string"),
                         "subtitle_path": Value("string"), "duration_group": Value("int64"),
                         "starting_timestamp_for_subtitles": Value("float64"), "duration": Value("float64"),
                         "view_count": Value("int64"), **{f"option{k}": Value("string") for k in range(5)}})
    return {"validation": rows}, features


_IMAGE_WRITERS = {"mme": _mme, "pope": _pope, "gqa": _gqa, "scienceqa_img": _scienceqa, "textvqa": _textvqa,
                  "mmbench_en": _mmbench, "chartqa": _chartqa, "docvqa": _docvqa, "vqav2": _vqav2, "mmmu": _mmmu,
                  "seedbench": _seedbench}
# one dataset each, videos under hf_home (MVBench, one dataset per subtask, is written on its own)
_VIDEO_WRITERS = {"videomme": _videomme, "egoschema": _egoschema, "mlvu": _mlvu, "longvideobench": _longvideobench}


@contextlib.contextmanager
def _quiet():
    """No ``datasets`` progress bars while writing (restored after)."""
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def _save(splits: dict, features, path: pathlib.Path) -> dict[str, int]:
    from datasets import Dataset, DatasetDict

    with _quiet():
        DatasetDict({name: Dataset.from_list(rows, features=features) for name, rows in splits.items()}
                    ).save_to_disk(str(path))
    return {name: len(rows) for name, rows in splits.items()}


def _write_dataset(name: str, n: int, data: pathlib.Path, hf_home: pathlib.Path) -> dict[str, dict[str, int]]:
    """Write stand-in dataset ``name`` under ``data/name`` (reused when written before with the same ``n``);
    returns {dataset folder (relative to data): {split: rows}}."""
    folder = data / name
    marker = folder / "vtc_standin_dataset.json"
    wanted = {"format": FORMAT_VERSION, "docs": n}
    if marker.is_file():
        try:
            saved = json.loads(marker.read_text())
            if saved.get("format") == FORMAT_VERSION and saved.get("docs") == n:
                return saved["splits"]
        except (ValueError, KeyError):
            pass
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    if name in _IMAGE_WRITERS:
        splits, features = _IMAGE_WRITERS[name](n, folder)
        counts = {name: _save(splits, features, folder / "dataset")}
    elif name in _VIDEO_WRITERS:
        splits, features = _VIDEO_WRITERS[name](n, folder, hf_home)
        counts = {name: _save(splits, features, folder / "dataset")}
    else:
        counts = {f"{name}/{sub}": _save(splits, features, folder / sub)
                  for sub, (splits, features) in _mvbench(n, folder, hf_home).items()}
    marker.write_text(json.dumps({**wanted, "splits": counts}, indent=1))
    return counts


def _dataset_dir(spec: StandinSpec, data: pathlib.Path) -> pathlib.Path:
    if spec.dataset == "mvbench":
        return data / "mvbench" / spec.task[len("mvbench_"):]
    return data / spec.dataset / "dataset"


def _task_yaml(spec: StandinSpec, data: pathlib.Path, tasks_dir: pathlib.Path) -> str:
    lines = [f"include: {lmms_eval_tasks_dir() / spec.yaml}", f"task: {spec.standin}",
             f"dataset_path: {_dataset_dir(spec, data)}", "dataset_kwargs:", "  load_from_disk: true"]
    if spec.dataset == "gqa":
        lines.append(f"process_docs: !function {_UTILS_MODULE}.gqa_process_docs")
    return "\n".join(lines) + "\n"


def _group_yaml(spec: StandinSpec) -> str:
    members = "\n".join(f"  - {PREFIX}{t}" for t in spec.subtasks)
    return f"group: {spec.standin}\ntask:\n{members}\n"


def _expand(names: list[str]) -> list[StandinSpec]:
    """The specs to write YAMLs for: the named tasks and every subtask of a named group."""
    out: dict[str, StandinSpec] = {}
    for name in names:
        spec = STANDIN_TASKS[name]
        for sub in spec.subtasks:
            out[sub] = STANDIN_TASKS[sub]
        out[name] = spec
    return list(out.values())


def write_standins(out_dir, tasks, n_docs: int = DEFAULT_DOCS, progress=None) -> StandinSet:
    """Write stand-in data and override YAMLs for ``tasks`` (lmms-eval task names, a list or a comma-separated
    string; see ``STANDIN_TASKS``) into ``out_dir`` (created); returns the ``StandinSet`` to run them.

    ``n_docs``: documents per task (per split for POPE, per subtask for MVBench; MME rounds up to whole image pairs).
    Raises ``ValueError`` for a task with no stand-in, naming those that have one. Datasets already written with the
    same ``n_docs`` are reused; the YAMLs are rewritten every time (they hold absolute paths: move the folder and
    write it again)."""
    names = check_tasks(tasks)
    if not isinstance(n_docs, int) or isinstance(n_docs, bool) or n_docs < 1:
        raise ValueError(f"n_docs must be an int >= 1, got {n_docs!r}")
    root = pathlib.Path(out_dir).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{root} exists and is not a folder; choose another place for the stand-ins")
    data, tasks_dir, hf_home = root / "data", root / "tasks", root / "hf_home"
    data.mkdir(parents=True, exist_ok=True)
    tasks_dir.mkdir(exist_ok=True)
    specs = _expand(names)
    counts: dict[str, dict[str, int]] = {}
    for dataset in dict.fromkeys(s.dataset for s in specs):
        if progress:
            progress(dataset)
        counts.update(_write_dataset(dataset, n_docs, data, hf_home))
    for spec in specs:
        (tasks_dir / f"{spec.standin}.yaml").write_text(_group_yaml(spec) if spec.is_group
                                                        else _task_yaml(spec, data, tasks_dir))
    if any(s.dataset == "gqa" for s in specs):
        (tasks_dir / f"{_UTILS_MODULE}.py").write_text(
            '"""Written by vtc.eval.lmms.standin: GQA\'s process_docs against the local images dataset."""\n'
            "from vtc.eval.lmms.standin import gqa_join_images\n\n\n"
            "def gqa_process_docs(dataset):\n"
            f"    return gqa_join_images(dataset, {str(data / 'gqa' / 'images')!r})\n")
    docs = {}
    for spec in specs:
        if spec.is_group:
            continue
        key = f"mvbench/{spec.task[len('mvbench_'):]}" if spec.dataset == "mvbench" else spec.dataset
        docs[spec.standin] = counts[key][spec.split]
    for spec in specs:
        if spec.is_group:
            docs[spec.standin] = sum(docs[PREFIX + t] for t in spec.subtasks)
    env = {}
    if any(s.video for s in specs):
        env = standin_env(root)
    manifest = {"format": FORMAT_VERSION, "docs_per_task": n_docs, "tasks": {n: STANDIN_TASKS[n].standin
                                                                             for n in names},
                "documents": docs, "env": env, "include_path": str(tasks_dir)}
    (root / _MANIFEST).write_text(json.dumps(manifest, indent=1))
    return StandinSet(root=root, include_path=tasks_dir, tasks={n: STANDIN_TASKS[n].standin for n in names},
                      env=env, docs=docs)


def standin_env(root) -> dict[str, str]:
    """The environment the lmms-eval process needs for the video stand-ins written in ``root``: ``HF_HOME`` is where
    the video tasks' utils (Video-MME, MVBench, EgoSchema, MLVU, LongVideoBench) look for their videos;
    ``HF_HUB_CACHE`` keeps the hub cache (models) where it was, since moving ``HF_HOME`` would otherwise move it
    too."""
    from huggingface_hub import constants

    return {"HF_HOME": str(pathlib.Path(root).resolve() / "hf_home"), "HF_HUB_CACHE": str(constants.HF_HUB_CACHE)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtc.eval.lmms.standin", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--tasks", required=True, help="comma-separated lmms-eval task names, e.g. mme,pope,videomme; "
                        "'all' for every stand-in; 'list' to list them")
    parser.add_argument("--docs", type=int, default=DEFAULT_DOCS, help="documents per task (per split / subtask)")
    args = parser.parse_args(argv)
    if args.tasks == "list":
        for name, spec in STANDIN_TASKS.items():
            print(f"{name:32s} -> {spec.standin}  metrics: {', '.join(spec.metrics)}")
        return 0
    tasks = [n for n, s in STANDIN_TASKS.items() if not n.startswith("mvbench_") and n not in ("pope_adv", "pope_pop",
             "pope_random")] if args.tasks == "all" else args.tasks
    try:
        standins = write_standins(args.directory, tasks, args.docs, progress=lambda d: print(f"writing {d} ..."))
    except ValueError as error:
        parser.error(str(error))
    env = " ".join(f"{k}={v}" for k, v in standins.env.items())
    print(f"wrote {', '.join(standins.task_names)} to {standins.root}\n"
          f"run: {env + ' ' if env else ''}python -m lmms_eval --model vtc --model_args compressor=none "
          + " ".join(standins.lmms_eval_args()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
