"""The lmms-eval plugin (model id ``vtc``) end to end: registration, offline tasks, every family, budgets through
``--model_args``, the results files of a real ``python -m lmms_eval`` run and a 2-process data-parallel run.

lmms-eval exits 0 even when a model fails to load, so every end-to-end check reads the results and samples, never
just the exit code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch
from lmms_eval import evaluator
from lmms_eval.tasks import TaskManager

import vtc
from vtc.eval.lmms import tasks as lmms_tasks
from vtc.eval.lmms.model import VtcModel
from vtc import testing as tiny

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "OMP_NUM_THREADS": "1"}
IMAGES, VIDEOS, QUESTIONS = 3, 2, 2


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    return lmms_tasks.write_tasks(tmp_path_factory.mktemp("tasks"), images=IMAGES, videos=VIDEOS,
                                  questions=QUESTIONS)


@pytest.fixture(scope="module")
def task_manager(tasks_dir):
    return TaskManager(verbosity="WARNING", include_path=[str(tasks_dir)])


@pytest.fixture(scope="module")
def default_model():
    return vtc.load_default()


def evaluate(lm, tasks, task_manager, limit=None):
    out = evaluator.simple_evaluate(model=lm, tasks=list(tasks), task_manager=task_manager, limit=limit,
                                    batch_size=lm.batch_size, device="cpu", log_samples=True, verbosity="WARNING")
    assert out is not None and set(tasks) <= set(out["results"])
    return out


def responses(out, task):
    return [s["filtered_resps"] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]


def test_entry_point_registers_the_vtc_model_and_stays_light():
    names = {ep.name: ep.value for ep in entry_points(group="lmms_eval.models")}
    assert names.get("vtc") == "vtc.eval.lmms.entry:manifests"
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    registry = ModelRegistryV2()
    registry.load_entrypoint_manifests()
    assert registry.get_model_class("vtc") is VtcModel
    code = ("import sys, vtc.eval.lmms.entry as e; e.manifests(); "
            "print(sorted(m for m in ('transformers', 'vtc.eval.lmms.model', 'vtc.integrations.transformers') "
            "if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"  # the model class (and transformers) load only when --model vtc is used


def test_written_tasks_hold_the_held_out_questions(tasks_dir):
    rows = [json.loads(line) for line in open(tasks_dir / "image.jsonl")]
    assert len(rows) == IMAGES * QUESTIONS
    from vtc.eval.default_model import synthetic

    first = synthetic.make_image_sample("test", 0).questions[0]
    assert (rows[0]["question"], rows[0]["answer"]) == (first.text, first.answer)
    assert rows[0]["answer"] in rows[0]["choices"]
    videos = [json.loads(line) for line in open(tasks_dir / "video.jsonl")]
    assert len(videos) == VIDEOS * QUESTIONS
    clip = vtc.video_io.load_video(videos[0]["video"], num_frames=8)
    frames = synthetic.make_video_sample("test", 0).frames
    import numpy as np

    # lossless: the decoded frames are the generated ones (up to colour-conversion rounding)
    diff = np.abs(np.asarray(clip.frames[3], dtype=int) - np.asarray(frames[3], dtype=int))
    assert diff.mean() < 1.0
    again = lmms_tasks.write_tasks(tasks_dir, images=IMAGES, videos=VIDEOS, questions=QUESTIONS)
    assert again == tasks_dir  # the same sizes reuse the folder


def test_default_model_end_to_end_counts_and_baseline(default_model, task_manager):
    model, processor = default_model
    tasks = ["vtc_shapes_image", "vtc_shapes_video", "vtc_shapes_image_mc"]
    base = VtcModel(model=model, processor=processor, compressor="none", progress=False)
    base_out = evaluate(base, tasks, task_manager)
    lm = VtcModel(model=model, processor=processor, compressor="hiprune", budget=0.25, progress=False)
    out = evaluate(lm, tasks, task_manager)
    vtc.remove(model)
    for result in (base_out, out):
        assert result["results"]["vtc_shapes_image"]["nonempty,none"] == 1.0
        assert result["results"]["vtc_shapes_video"]["nonempty,none"] == 1.0
        assert len(result["samples"]["vtc_shapes_image_mc"]) == IMAGES * QUESTIONS
    by_request = {s.request: s for s in base.sample_stats}
    assert by_request["generate_until"].visual_tokens_out == by_request["generate_until"].visual_tokens_in
    for stats in lm.sample_stats:
        if stats.videos:  # 8 frames of 196 tokens, one video budget: a quarter of all of them
            assert (stats.visual_tokens_in, stats.visual_tokens_out) == (8 * 196, 392)
        else:
            assert (stats.visual_tokens_in, stats.visual_tokens_out) == (196, 49)
        assert stats.prompt_tokens_in - stats.prompt_tokens_out == stats.visual_tokens_in - stats.visual_tokens_out
        assert stats.total_seconds > 0 and stats.prefill_flops > 0
    flops = {s.task: s.prefill_flops for s in lm.sample_stats}
    base_flops = {s.task: s.prefill_flops for s in base.sample_stats}
    assert all(flops[t] < base_flops[t] for t in tasks)
    # the counts reach lmms-eval's per-sample log
    logged = out["samples"]["vtc_shapes_image"][0]["token_counts"][0]
    assert logged["visual_tokens_out"] == 49 and logged["compressor"] == "hiprune" and "first_token_seconds" in logged


def test_keep_all_matches_the_baseline_on_both_paths(default_model, task_manager):
    model, processor = default_model
    tasks = ["vtc_shapes_image", "vtc_shapes_image_mc"]
    base = evaluate(VtcModel(model=model, processor=processor, compressor="none", progress=False), tasks,
                    task_manager)
    keep_all = evaluate(VtcModel(model=model, processor=processor, compressor="cls_attention", budget=1.0,
                                 progress=False), tasks, task_manager)
    vtc.remove(model)
    assert responses(keep_all, "vtc_shapes_image") == responses(base, "vtc_shapes_image")
    ll_base = [float(x) for r in responses(base, "vtc_shapes_image_mc") for pair in r for x in pair[:1]]
    ll_all = [float(x) for r in responses(keep_all, "vtc_shapes_image_mc") for pair in r for x in pair[:1]]
    assert ll_all == pytest.approx(ll_base, abs=1e-5)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_every_family_generates_and_scores_through_the_plugin(family, tiny_dirs, task_manager):
    tasks = ["vtc_shapes_image", "vtc_shapes_image_mc"] + (
        ["vtc_shapes_video"] if family in tiny.VIDEO_FAMILIES or family == "llava" else [])
    lm = VtcModel(pretrained=str(tiny_dirs[family]), compressor="random", budget=4, max_frames_num=4,
                  max_new_tokens=3, progress=False, device="cpu")
    model = lm.model
    out = evaluate(lm, tasks, task_manager, limit=2)
    for task in tasks:
        assert len(out["samples"][task]) == 2
    assert {s.request for s in lm.sample_stats} == {"generate_until", "loglikelihood"}
    for stats in lm.sample_stats:
        assert stats.visual_tokens_out < stats.visual_tokens_in
        units = stats.images + stats.videos
        if family not in tiny.ANYRES_FAMILIES:  # AnyRes keeps its kept rows' newline tokens on top
            assert stats.visual_tokens_out == 4 * units
        assert stats.prefill_flops > 0
    # keep-all through the plugin == the uncompressed baseline (same loaded weights)
    vtc.remove(model)
    processor = lm.processor
    base = evaluate(VtcModel(model=model, processor=processor, compressor="none", max_frames_num=4,
                             max_new_tokens=3, progress=False), tasks, task_manager, limit=2)
    same = evaluate(VtcModel(model=model, processor=processor, compressor="random", budget=1.0, max_frames_num=4,
                             max_new_tokens=3, progress=False), tasks, task_manager, limit=2)
    vtc.remove(model)
    for task in tasks:
        assert responses(same, task) == responses(base, task)


def test_video_methods_run_on_a_family_without_a_video_input(default_model, task_manager):
    """`vtc eval` asks every encoder-side compressor by default, the video methods included; on LLaVA-1.5 (no video
    input) the plugin refused them at construction, so the default sweep on the embedded model stopped after nine
    runs. Now a prompt's images are one video there: a video task's 8 frames share the budget, an image task's
    picture is a one-frame video."""
    model, processor = default_model
    lm = VtcModel(model=model, processor=processor, compressor="dycoke", budget=0.25, progress=False)
    assert lm.options["images_as_video"] is True
    out = evaluate(lm, ["vtc_shapes_image", "vtc_shapes_video"], task_manager, limit=2)
    vtc.remove(model)
    assert len(out["samples"]["vtc_shapes_image"]) == len(out["samples"]["vtc_shapes_video"]) == 2
    for stats in lm.sample_stats:
        assert stats.visual_tokens_out == round(0.25 * stats.visual_tokens_in)  # 196 -> 49, 8 x 196 -> 392
        assert stats.visual_tokens_in == (8 * 196 if stats.videos else 196)
    with pytest.raises(ValueError, match="images_as_video=True"):  # saying no explicitly is still refused
        VtcModel(model=model, processor=processor, compressor="dycoke", budget=0.25, images_as_video=False,
                 progress=False)
    vtc.remove(model)


def test_a_video_method_on_anyres_views_is_refused_at_construction(tiny_dirs):
    with pytest.raises(ValueError, match="dycoke"):
        VtcModel(pretrained=str(tiny_dirs["llava_next"]), compressor="dycoke", budget=4, progress=False,
                 device="cpu")


def make(arg_string, default_model):
    model, processor = default_model
    return VtcModel.create_from_arg_string(arg_string, {"model": model, "processor": processor,
                                                        "progress": False, "device": "cpu"})


@pytest.mark.parametrize("args, budget", [("compressor=hiprune,budget=64", 64), ("compressor=hiprune,budget=0.25", 0.25),
                                          ("compressor=fastervlm,budget=1.0,layer=3", 1.0),
                                          ("compressor=visionzip,budget=20,video_budget=0.5", 20)])
def test_budget_and_options_parse_from_model_args(args, budget, default_model):
    lm = make(args, default_model)
    try:
        from vtc.integrations.transformers import get_state

        state = get_state(lm.model)
        assert lm.budget == budget and type(lm.budget) is type(budget)
        assert state.budget == budget
        if "video_budget" in args:
            assert state.video_budget == 0.5
        if "layer=3" in args:
            assert state.compressor.layer == 3
    finally:
        vtc.remove(lm.model)


@pytest.mark.parametrize("args, message", [
    ("compressor=hiprune", "needs a budget"),
    ("compressor=hiprune,budget=0", "budget"),
    ("compressor=hiprune,budget=1.5", "budget"),
    ("compressor=hiprune,budget=lots", "budget"),
    ("compressor=none,budget=64", "takes no compression options"),
    ("compressor=nosuch,budget=4", "nosuch"),
    ("compressor=hiprune,budget=4,bogus=1", "bogus"),
    ("compressor=fastervlm,budget=4,layer=10", "out of range"),
    ("compressor=none,batch_size=0", "batch_size"),
    ("compressor=none,dtype=float8", "dtype"),
])
def test_bad_model_args_fail_with_the_fix(args, message, default_model):
    model, processor = default_model
    if "dtype" in args:  # dtype matters only when the plugin loads the model itself
        with pytest.raises(ValueError, match=message):
            VtcModel.create_from_arg_string(args, {"progress": False})
        return
    with pytest.raises((ValueError, TypeError), match=message):
        make(args, default_model)
    assert not vtc.is_applied(model)


def test_unloadable_model_names_the_path():
    with pytest.raises(RuntimeError, match="cannot load model '/no/such/model'"):
        VtcModel(pretrained="/no/such/model", progress=False)


def _run(cmd, tmp_path, timeout=300):
    env = dict(os.environ, **OFFLINE_ENV, HF_HOME=str(tmp_path / "hf"))
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=timeout)


def _results(out_dir):
    found = sorted(out_dir.rglob("*_results.json"))
    assert found, "lmms-eval wrote no results file"
    samples = {}
    for path in out_dir.rglob("*_samples_*.jsonl"):
        task = path.stem.split("_samples_")[1]
        samples[task] = [json.loads(line) for line in open(path)]
    return json.loads(found[-1].read_text()), samples


def test_lmms_eval_command_line_writes_results(tasks_dir, tmp_path):
    """``python -m lmms_eval --model vtc ...``: the real entry point, checked through its results files."""
    out = tmp_path / "out"
    proc = _run([sys.executable, "-m", "lmms_eval", "--model", "vtc", "--model_args",
                 "compressor=fastervlm,budget=32,model_name=vtc-default__fastervlm_32",
                 "--tasks", lmms_tasks.TAG, "--include_path", str(tasks_dir), "--limit", "2", "--device", "cpu",
                 "--output_path", str(out), "--log_samples"], tmp_path)
    results, samples = _results(out)
    # lmms-eval's own layout: --output_path/<model name>/, named by model_name= when there is no pretrained=
    assert [p.name for p in out.iterdir()] == ["vtc-default__fastervlm_32"], proc.stderr[-3000:]
    assert set(lmms_tasks.TASKS) <= set(results["results"]), proc.stderr[-3000:]
    for task in lmms_tasks.TASKS:
        assert results["n-samples"][task]["effective"] == 2
        for sample in samples[task]:
            counts = sample["token_counts"][0]
            # an image keeps 32 tokens; a video's 8 frames share one budget of 32 (video_budget defaults to budget)
            assert counts["visual_tokens_out"] == 32 and counts["compressor"] == "fastervlm"


def test_accelerate_data_parallel_on_two_cpu_processes(tasks_dir, tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2 -m lmms_eval``: on a CPU-only machine the two processes
    form a gloo group; each serves half the documents and rank 0 writes all of them."""
    out = tmp_path / "out"
    proc = _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                 "29517", "-m", "lmms_eval", "--model", "vtc", "--model_args", "compressor=random,budget=16",
                 "--tasks", "vtc_shapes_image", "--include_path", str(tasks_dir), "--device", "cpu",
                 "--output_path", str(out), "--log_samples"], tmp_path)
    results, samples = _results(out)
    assert results["n-samples"]["vtc_shapes_image"]["effective"] == IMAGES * QUESTIONS, proc.stderr[-3000:]
    rows = samples["vtc_shapes_image"]
    assert sorted(s["doc_id"] for s in rows) == list(range(IMAGES * QUESTIONS))
    assert {s["token_counts"][0]["rank"] for s in rows} == {0, 1}
    assert all(s["token_counts"][0]["visual_tokens_out"] == 16 for s in rows)


def test_plugin_runs_on_the_device_it_is_given(default_model):
    model, processor = default_model
    lm = VtcModel(model=model, processor=processor, compressor="none", device="cpu", progress=False)
    assert lm.device == torch.device("cpu") and next(lm.model.parameters()).device.type == "cpu"


def test_llm_side_compressor_generates_and_scores_through_the_plugin(default_model, task_manager):
    """FastV through lmms-eval (generate_until and loglikelihood): the LLM-side records reach the stats (tokens
    after the drop, FLOPs at each layer's own length); keep-all equals the uncompressed baseline."""
    model, processor = default_model
    tasks = ["vtc_shapes_image", "vtc_shapes_image_mc"]
    lm = VtcModel(model=model, processor=processor, compressor="fastv", budget=20, max_new_tokens=3,
                  progress=False)
    try:
        evaluate(lm, tasks, task_manager, limit=2)
        stats = list(lm.sample_stats)
    finally:
        vtc.remove(model)
    base_lm = VtcModel(model=model, processor=processor, compressor="none", max_new_tokens=3, progress=False)
    base = evaluate(base_lm, tasks, task_manager, limit=2)
    assert {s.request for s in stats} == {"generate_until", "loglikelihood"}
    full_flops = {s.request: s.prefill_flops for s in base_lm.sample_stats}
    for s in stats:
        assert s.visual_tokens_out == 20 * s.images < s.visual_tokens_in
        assert 0 < s.prefill_flops < full_flops[s.request]
    same = evaluate(VtcModel(model=model, processor=processor, compressor="fastv", budget=1.0, max_new_tokens=3,
                             progress=False), tasks, task_manager, limit=2)
    vtc.remove(model)
    for task in tasks:
        assert responses(same, task) == responses(base, task)
