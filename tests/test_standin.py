"""Stand-in data for real lmms-eval benchmarks (``vtc.eval.lmms.standin``): every stand-in loads through lmms-eval's
own TaskManager with the task's own functions, its answers are the true ones (a perfect prediction gets the
benchmark's top score from the task's own process_results and aggregation), and MME, POPE, Video-MME, ChartQA,
DocVQA, MMBench, an MVBench subtask, MMMU and EgoSchema run end to end through ``--model vtc`` on tiny offline
models.

That ``compressor=none`` equals the uncompressed path is tested in test_lmms_plugin.py, not here.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import yaml

from vtc import testing as tiny
from vtc.eval.lmms import standin

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
DOCS = 4
IMAGE_TASKS = ["mme", "pope", "pope_full", "gqa", "scienceqa_img", "textvqa_val", "mmbench_en_dev_static", "chartqa",
               "docvqa_val", "vqav2_val", "mmmu_val", "seedbench"]
VIDEO_TASKS = ["videomme", "egoschema_subset", "mlvu_dev", "longvideobench_val_v"]
TOP_LEVEL = IMAGE_TASKS + VIDEO_TASKS + ["mvbench"]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Every stand-in in one folder: the image tasks and the one-dataset video tasks (Video-MME, EgoSchema, MLVU,
    LongVideoBench) with 4 documents, MVBench with 1 per subtask (20 videos), written by two calls into the same
    folder."""
    root = tmp_path_factory.mktemp("standin")
    first = standin.write_standins(root, IMAGE_TASKS + VIDEO_TASKS, n_docs=DOCS)
    second = standin.write_standins(root, "mvbench", n_docs=1)
    return first, second


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Only the families these tests run (the session-wide fixture builds all six)."""
    root = tmp_path_factory.mktemp("standin_tiny")
    return {family: tiny.save_tiny(family, root / family, seed=0) for family in ("llava", "llava_next", "qwen2_vl")}


@pytest.fixture(scope="module")
def video_env(written):
    """The video tasks' utils read HF_HOME when they are imported (each time a task loads)."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in written[1].env.items():
            patch.setenv(key, value)
        yield written[1].env


@pytest.fixture(scope="module")
def task_manager(written, video_env):
    from lmms_eval.tasks import TaskManager

    return TaskManager(verbosity="WARNING", include_path=[str(written[0].include_path)])


def leaves(task_dict):
    for key, value in task_dict.items():
        if isinstance(value, dict):
            yield from leaves(value)
        else:
            yield (key if isinstance(key, str) else key.group_name), value


def load(task_manager, name):
    from lmms_eval.tasks import get_task_dict

    return dict(leaves(get_task_dict([name], task_manager)))


# -- names and errors -------------------------------------------------------------------------------------------------

def test_unknown_or_unsupported_tasks_say_which_have_standins(tmp_path):
    with pytest.raises(ValueError, match=r"no stand-in data for task\(s\) nosuch.*Stand-ins exist for: mme, pope"):
        standin.write_standins(tmp_path, ["mme", "nosuch"])
    with pytest.raises(ValueError, match="mmbench_en_dev: .*OpenAI judge.*use mmbench_en_dev_static"):
        standin.check_tasks("mmbench_en_dev")
    with pytest.raises(ValueError, match="vqav2_test: .*EvalAI server.*use vqav2_val"):
        standin.check_tasks("vqav2_test")
    with pytest.raises(ValueError, match="egoschema: .*validation server.*use egoschema_subset"):
        standin.check_tasks("egoschema")
    assert not set(standin.NO_STANDIN) & set(standin.STANDIN_TASKS)
    with pytest.raises(ValueError, match="n_docs"):
        standin.write_standins(tmp_path, ["mme"], n_docs=0)
    assert not any(tmp_path.iterdir())  # nothing written on a bad request
    assert standin.check_tasks("mme, vtc_standin_pope,mme") == ["mme", "pope"]
    assert standin.standin_name("videomme") == "vtc_standin_videomme"
    proc = subprocess.run([sys.executable, "-m", "vtc.eval.lmms.standin", str(tmp_path / "x"), "--tasks", "nosuch"],
                          check=False, capture_output=True, text=True)
    assert proc.returncode == 2 and "no stand-in data for task(s) nosuch" in proc.stderr


def test_written_set_names_tasks_docs_and_environment(written):
    images, videos = written
    assert images.tasks == {t: f"vtc_standin_{t}" for t in IMAGE_TASKS + VIDEO_TASKS}
    assert images.lmms_eval_args()[:2] == ["--tasks", ",".join(images.task_names)]
    assert images.include_path == images.root / "tasks" and videos.include_path == images.include_path
    assert images.docs["vtc_standin_mme"] == DOCS and images.docs["vtc_standin_pope_adv"] == DOCS
    assert images.docs["vtc_standin_pope"] == 3 * DOCS and images.docs["vtc_standin_pope_full"] == 3 * DOCS
    assert videos.docs["vtc_standin_mvbench"] == 20
    assert images.env["HF_HOME"] == str(images.root / "hf_home") and "HF_HUB_CACHE" in images.env
    assert images.original("vtc_standin_mme") == "mme"
    manifest = json.loads((videos.root / "vtc_standin.json").read_text())
    assert manifest["tasks"] == {"mvbench": "vtc_standin_mvbench"}
    # the overrides change where the data comes from, nothing else (GQA also swaps its image join; see standin.py)
    for path in images.include_path.glob("vtc_standin_*.yaml"):
        config = yaml.safe_load(path.read_text().replace("!function", ""))
        if "group" in config:
            continue
        assert os.path.isfile(config["include"]) and "lmms_eval/tasks/" in config["include"]
        extra = {"process_docs"} if path.stem == "vtc_standin_gqa" else set()
        assert set(config) == {"include", "task", "dataset_path", "dataset_kwargs"} | extra
        assert config["dataset_kwargs"] == {"load_from_disk": True}
    # written again with the same sizes: the datasets are reused
    marker = images.root / "data" / "mme" / "vtc_standin_dataset.json"
    before = marker.stat().st_mtime_ns
    standin.write_standins(images.root, ["mme"], n_docs=DOCS)
    assert marker.stat().st_mtime_ns == before


# -- every stand-in loads through lmms-eval with the task's own functions ------------------------------------------

@pytest.mark.parametrize("task", TOP_LEVEL)
def test_standin_loads_with_the_tasks_own_functions(task, written, task_manager):
    from PIL import Image

    spec = standin.STANDIN_TASKS[task]
    loaded = load(task_manager, spec.standin)
    expected = [standin.PREFIX + t for t in spec.subtasks] or [spec.standin]
    assert sorted(loaded) == sorted(expected)
    docs = {**written[0].docs, **written[1].docs}
    for name, t in loaded.items():
        original = standin.STANDIN_TASKS[name[len(standin.PREFIX):]]
        # the task's own functions (from lmms_eval/tasks/<task>/utils.py) and metric names
        assert "lmms_eval/tasks/" in inspect.getsourcefile(t.config.doc_to_text)
        assert [m["metric"] for m in t.config.metric_list] == list(original.metrics)
        rows = t.test_docs()
        assert len(rows) == docs[name]
        doc = rows[0]
        visuals = t.doc_to_visual(doc)
        text = t.doc_to_text(doc)
        assert isinstance(text, str) and text.strip()
        if spec.video:
            assert len(visuals) == 1 and os.path.isfile(visuals[0]) and visuals[0].startswith(video_root(written))
        else:
            assert len(visuals) == 1 and isinstance(visuals[0], Image.Image)
            if task in ("chartqa", "docvqa_val"):  # high resolution: AnyRes tiles and Qwen's dynamic resolution
                assert max(visuals[0].size) == 1024


def video_root(written):
    return str(written[0].root / "hf_home")


# -- the answers are true: a perfect prediction gets the top score from the task's own scoring ---------------------

def perfect(task, doc):
    """The right answer in the form each benchmark's parser reads."""
    if task in ("mme", "pope", "pope_adv", "gqa", "chartqa", "videomme", "seedbench", "mlvu_dev"):
        return doc["answer"]
    if task == "vqav2_val":
        return doc["answers"][0]["answer"]
    if task == "mmmu_val":  # a letter (multiple-choice) or the open answer itself
        return doc["answer"]
    if task == "egoschema_subset":
        return "ABCDE"[int(doc["answer"])]
    if task == "longvideobench_val_v":
        return "ABCDE"[doc["correct_choice"]]
    if task == "scienceqa_img":
        return "ABCDE"[doc["answer"]]
    if task in ("textvqa_val", "docvqa_val"):
        return doc["answers"][0]
    if task == "mmbench_en_dev_static":
        return doc["answer"]
    if task.startswith("mvbench_"):
        return "ABCDE"[doc["candidates"].index(doc["answer"])]
    raise KeyError(task)


TOP_SCORE = {"mme": {"mme_perception_score": 200.0, "mme_cognition_score": 200.0},  # 2 images: 1 per kind
             "pope_adv": {"pope_accuracy": 1.0, "pope_f1_score": 1.0, "pope_yes_ratio": 0.5},
             "gqa": {"exact_match": 1.0}, "scienceqa_img": {"exact_match": 1.0}, "textvqa_val": {"exact_match": 1.0},
             "mmbench_en_dev_static": {"gpt_eval_score": 100.0},
             "chartqa": {"relaxed_overall": 1.0, "relaxed_human_split": 1.0, "relaxed_augmented_split": 1.0},
             "docvqa_val": {"anls": 1.0}, "videomme": {"videomme_perception_score": 100.0},
             "mvbench_moving_direction": {"mvbench_accuracy": 100.0},
             "vqav2_val": {"exact_match": 1.0}, "mmmu_val": {"mmmu_acc": 1.0},
             "seedbench": {"seed_image": 1.0, "seed_all": 1.0}, "egoschema_subset": {"score": 1.0},
             # M-Avg averages MLVU's 7 task types, an absent one as 0: 4 documents cover 4 of them
             "mlvu_dev": {"mlvu_percetion_score": 100.0 * min(DOCS, 7) / 7}, "longvideobench_val_v": {"lvb_acc": 1.0}}


@pytest.mark.parametrize("task", list(TOP_SCORE))
def test_true_answers_get_the_top_score(task, task_manager, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MMBench's and TextVQA's aggregations write submission files
    (t,) = load(task_manager, standin.PREFIX + task).values()
    per_metric: dict[str, list] = {}
    for doc in t.test_docs():
        for metric, value in t.process_results(doc, [perfect(task, doc)]).items():
            per_metric.setdefault(metric, []).append(value)
    aggregations = t.aggregation()
    for metric, top in TOP_SCORE[task].items():
        function = aggregations[metric]
        args = [per_metric[metric]] + ([None] if len(inspect.signature(function).parameters) == 2 else [])
        assert float(function(*args)) == pytest.approx(top), metric


# -- end to end through --model vtc --------------------------------------------------------------------------------

def _results(out_dir):
    found = sorted(out_dir.rglob("*_results.json"))
    assert found, "lmms-eval wrote no results file"
    return json.loads(found[-1].read_text())


def test_lmms_eval_command_line_on_mme_pope_and_videomme(written, tiny_dirs, tmp_path):
    """``python -m lmms_eval --model vtc`` with the stand-ins' include path and environment, a tiny LLaVA: the
    benchmarks' own metrics in the results file."""
    images = written[0]
    tasks = ["vtc_standin_mme", "vtc_standin_pope", "vtc_standin_videomme"]
    out = tmp_path / "out"
    env = dict(os.environ, **OFFLINE_ENV, **images.env)
    proc = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "vtc", "--model_args",
         f"pretrained={tiny_dirs['llava']},compressor=random,budget=8,max_frames_num=4,max_new_tokens=3",
         "--tasks", ",".join(tasks), "--include_path", str(images.include_path), "--limit", "4", "--device", "cpu",
         "--output_path", str(out), "--log_samples"], check=False, capture_output=True, text=True, env=env,
        cwd=tmp_path, timeout=300)
    results = _results(out)
    assert set(tasks) <= set(results["results"]), proc.stderr[-3000:]
    assert {"mme_perception_score,none", "mme_cognition_score,none"} <= set(results["results"]["vtc_standin_mme"])
    assert {"pope_f1_score,none", "pope_accuracy,none", "pope_precision,none", "pope_recall,none",
            "pope_yes_ratio,none"} <= set(results["results"]["vtc_standin_pope"])
    assert "videomme_perception_score,none" in results["results"]["vtc_standin_videomme"]
    for task in tasks:
        assert results["n-samples"][task]["effective"] == 4


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next"])
def test_high_resolution_standins_reach_dynamic_resolution_and_anyres(family, tiny_dirs, task_manager, tmp_path,
                                                                       monkeypatch):
    """In process on a tiny Qwen2-VL and a tiny LLaVA-NeXT: ChartQA's and DocVQA's pages reach the processor at full
    size, so Qwen's dynamic resolution and LLaVA-NeXT's AnyRes give each its own token layout (exactly the processor's
    own count for a page of that size); on Qwen, MMBench's static scoring, an MVBench subtask, MMMU and EgoSchema
    report their metrics too."""
    from lmms_eval import evaluator
    from PIL import Image

    from vtc.eval.lmms.model import VtcModel

    monkeypatch.chdir(tmp_path)
    tasks = ["vtc_standin_mme", "vtc_standin_chartqa", "vtc_standin_docvqa_val"]
    if family == "qwen2_vl":
        tasks += ["vtc_standin_mmbench_en_dev_static", "vtc_standin_mvbench_moving_direction", "vtc_standin_mmmu_val",
                  "vtc_standin_egoschema_subset"]
    lm = VtcModel(pretrained=str(tiny_dirs[family]), compressor="random", budget=0.5, max_frames_num=4,
                  max_new_tokens=3, progress=False, device="cpu")
    config, processor = lm.model.config, lm.processor  # lmms-eval drops the model after the run
    out = evaluator.simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager, limit=2, batch_size=1,
                                   device="cpu", verbosity="WARNING")
    results = out["results"]
    assert "relaxed_overall,none" in results["vtc_standin_chartqa"]
    assert "anls,none" in results["vtc_standin_docvqa_val"]
    if family == "qwen2_vl":
        assert "gpt_eval_score,none" in results["vtc_standin_mmbench_en_dev_static"]
        assert "mvbench_accuracy,none" in results["vtc_standin_mvbench_moving_direction"]
        for name, metric in (("mmmu_val", "mmmu_acc"), ("egoschema_subset", "score")):
            assert f"{metric},none" in results[standin.PREFIX + name], name
    tokens = {}
    for stats in lm.sample_stats:
        tokens.setdefault(stats.task, set()).add(stats.visual_tokens_in)

    def processor_tokens(size):
        """The image tokens the model's own processor expands one image of ``size`` into. (The tiny processors cap
        the resolution -- Qwen at 128x128 pixels, LLaVA-NeXT at a 2x2 grid of 32-pixel tiles; a real Qwen2-VL gives
        a 1024x768 chart ~1000 tokens, a 224x224 image 64.)"""
        token = getattr(config, "image_token_id", None)
        token = getattr(config, "image_token_index", None) if token is None else token
        prompt = tiny.build_prompt(processor, "what is shown ?", num_images=1)
        ids = processor(text=[prompt], images=[Image.new("RGB", size)], return_tensors="pt")["input_ids"]
        return int((ids == token).sum())

    square, landscape, portrait = processor_tokens((224, 224)), processor_tokens((1024, 768)), processor_tokens(
        (768, 1024))
    assert landscape != square and portrait != square  # the page's own layout, not a square image's
    assert tokens["vtc_standin_mme"] == {square}
    assert tokens["vtc_standin_chartqa"] == {landscape}
    assert tokens["vtc_standin_docvqa_val"] == {portrait}


def test_mlvu_covers_its_seven_task_types_and_mmmu_both_question_types(tmp_path):
    """MLVU's M-Avg counts an absent task type as 0, so 7 documents reach 100; MMMU mixes multiple-choice and open
    questions, SEED-Bench holds only image questions."""
    from lmms_eval.tasks.mlvu.utils import mlvu_aggregate_results_dev, mlvu_process_results

    splits, _ = standin._mlvu(7, tmp_path, tmp_path / "hf_home")
    rows = splits["test"]
    assert {r["task_type"] for r in rows} == set(standin._MLVU_TYPES)
    assert all((tmp_path / "hf_home" / standin.MLVU_CACHE / r["video_name"]).is_file() for r in rows)
    scored = [mlvu_process_results(r, [f"({r['answer']}) {r['candidates']['ABCD'.index(r['answer'])]}"])
              ["mlvu_percetion_score"] for r in rows]
    assert mlvu_aggregate_results_dev(scored) == pytest.approx(100.0)
    mmmu, _ = standin._mmmu(4, tmp_path)
    assert [r["question_type"] for r in mmmu["validation"]] == ["multiple-choice", "open"] * 2
    seed, _ = standin._seedbench(3, tmp_path)
    assert {r["data_type"] for r in seed["test"]} == {"image"}
