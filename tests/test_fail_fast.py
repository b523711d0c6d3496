"""Mistakes fail before a model loads, with one message: bad images, compressors, options, budgets, model refs.

The model loaders are replaced by functions that fail the test, so "before the model loads" is checked by
mechanism, not by timing. The Hub is made unreachable by pointing huggingface_hub at a closed localhost port (the
tests never depend on this machine's network), and the retry path (huggingface_hub's back-off sleep) is made to
fail the test too.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import warnings

import pytest
from PIL import Image

import vtc
from vtc import cli
from vtc.integrations.transformers import preflight
from vtc.integrations.transformers.default import unknown_words, unknown_words_message
from vtc.integrations.transformers.preflight import ModelNotFoundError, resolve_model_ref

HUB_ID = "vtc-test-owner/no-such-model"


class Loaded(AssertionError):
    """A model loader was called although the request should have failed before it."""


def _never(*args, **kwargs):
    raise Loaded(f"the model was loaded ({args!r})")


@pytest.fixture
def no_model_loads(monkeypatch):
    """Every way a model gets loaded fails the test."""
    import transformers

    monkeypatch.setattr(cli, "_load", _never)
    monkeypatch.setattr(vtc, "load_default", _never)
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", _never)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", _never)


@pytest.fixture
def hub_unreachable(monkeypatch, tmp_path):
    """huggingface_hub talks to a closed localhost port, has an empty cache, and must not retry (back-off sleep)."""
    import huggingface_hub.utils._http as hf_http
    from huggingface_hub import constants

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now: connection refused
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))

    def no_retry(seconds):
        raise AssertionError(f"huggingface_hub's retry back-off ran (sleep {seconds})")

    monkeypatch.setattr(hf_http.time, "sleep", no_retry)


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection or name lookup fails the test (recorded, in case something swallows the error)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def _fake_cache(root, repo_id: str) -> None:
    """A Hugging Face hub cache entry holding ``config.json`` for ``repo_id``."""
    commit = "0" * 40
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")


# ------------------------------------------------------------------------------------------------- vtc run


def test_run_rejects_a_missing_image_before_loading(no_model_loads, tmp_path):
    with pytest.raises(SystemExit, match="cannot read image: image file not found"):
        cli.main(["run", "--image", str(tmp_path / "missing.png"), "--model", "some/model"])


@pytest.mark.parametrize("argv, message", [
    (["--compressor", "nosuch"], "unknown compressor 'nosuch'"),
    (["--compressor", "random", "--option", "sed=1"], "unknown option.*sed.*valid options: \\['seed'\\]"),
    (["--compressor", "random", "--option", "seed=a"], "compressor 'random': option seed must be an int, got 'a'"),
    (["--compressor", "pool", "--option", "mode=max"], "'mean' or 'sample'"),
    (["--compressor", "random", "--option", "seed"], "write key=value"),
    (["--compressor", "random", "--option", "pool.mode=sample"], "'pool' is not a compressor of this run"),
    (["--compressor", "random", "--option", "images_as_video=perhaps"], "option images_as_video must be True or "
                                                                        "False"),
    (["--compressor", "random", "--option", "allocation=lots"], "unknown allocation"),
    (["--compressor", "random", "--compressor", "pool", "--option", "seed=1"], "applies to every compressor of "
                                                                               "the run; compressor.key=value"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1"),
    (["--max-new-tokens", "-3"], "--max-new-tokens must be an integer >= 1"),
    (["--budget", "0"], "budget must be"),
])
def test_run_rejects_bad_arguments_before_loading(argv, message, no_model_loads, capsys, tmp_path):
    """One line naming the problem, exit status 2, and the model never loads."""
    image = tmp_path / "ok.png"
    Image.new("RGB", (8, 8)).save(image)
    assert cli.main(["run", "--image", str(image), "--model", "some/model", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err) and err.count("\n") == 1, err


def test_run_options_are_read_by_type_and_scoped():
    assert cli._run_options(["seed=3", "positions=keep"], ["random"]) == {"random": {"seed": 3, "positions": "keep"}}
    options = cli._run_options(["random.seed=3", "pool.mode=sample", "video_budget=0.5", "images_as_video=yes"],
                               ["random", "pool"])
    assert options == {"random": {"seed": 3, "video_budget": 0.5, "images_as_video": True},
                       "pool": {"mode": "sample", "video_budget": 0.5, "images_as_video": True}}
    layers = cli._run_options(["layers=3,5", "start_layer=none"], ["cls_attention"])["cls_attention"]
    assert layers == {"layers": (3, 5), "start_layer": None}


def test_run_with_an_option_reaches_apply(capsys, tmp_path):
    assert cli.main(["run", "--budget", "4", "--compressor", "random", "--option", "seed=5", "--no-grid",
                     "--per-kind", "1", "--timing-runs", "1", "--out-dir", str(tmp_path)]) == 0
    assert "random" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------- option types


@pytest.mark.parametrize("name, options, message", [
    ("random", {"seed": "a"}, "compressor 'random': option seed must be an int, got 'a'"),
    ("random", {"seed": 1.5}, "option seed must be an int, got 1.5"),
    ("random", {"seed": True}, "option seed must be an int, got True"),
    ("cls_attention", {"layers": "x"}, "option layers must be None or a tuple of int, got 'x'"),
    ("cls_attention", {"start_layer": "3"}, "option start_layer must be None or an int, got '3'"),
    ("pool", {"mode": 3}, "mode"),
])
def test_option_type_errors_name_the_option(name, options, message):
    with pytest.raises((TypeError, ValueError), match=message.replace("(", "\\(").replace(")", "\\)")):
        vtc.create_compressor(name, **options)


def test_well_typed_options_still_build():
    assert vtc.create_compressor("random", seed=3).seed == 3
    assert vtc.create_compressor("cls_attention", layers=[1, 2]).layers == [1, 2]  # lists are sequences too
    assert vtc.create_compressor("hiprune", alpha=1).alpha == 1  # an int is a number


# ------------------------------------------------------------------------------------------------- model refs


@pytest.mark.parametrize("ref", ["/no/such/model", "./no-such-model", "~/no-such-model-vtc", "a/b/c", "C:\\models\\x"])
def test_a_missing_path_fails_at_once_without_network(ref, no_network):
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        resolve_model_ref(ref)
    assert no_network == []


def test_a_file_is_not_a_model_folder(tmp_path, no_network):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="it is a file, not a folder"):
        resolve_model_ref(str(path))
    assert resolve_model_ref(str(tmp_path)).source == "folder"


def test_unreachable_hub_fails_with_one_message_and_no_retries(hub_unreachable, tmp_path):
    with pytest.raises(ModelNotFoundError) as error:
        resolve_model_ref(HUB_ID)
    text = str(error.value)
    assert text.startswith(f"cannot load model '{HUB_ID}': it is neither a local folder nor reachable on the "
                           "Hugging Face Hub (")
    assert "pass a local save_pretrained folder" in text and "\n" not in text
    assert str(tmp_path) not in text and "hf-cache" not in text  # no cache or temp paths in the message


def test_offline_without_cache_asks_nobody(monkeypatch, tmp_path, no_network):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(ModelNotFoundError, match="neither a local folder nor in the local Hugging Face cache, and "
                                                 "HF_HUB_OFFLINE is set"):
        resolve_model_ref(HUB_ID)
    assert no_network == []
    _fake_cache(tmp_path / "hf-cache", HUB_ID)
    assert resolve_model_ref(HUB_ID) == preflight.ModelRef(HUB_ID, "cache", local_files_only=True)
    assert no_network == []


def test_a_cached_model_loads_from_the_cache_when_the_hub_is_unreachable(hub_unreachable, tmp_path):
    from huggingface_hub import constants

    _fake_cache(tmp_path / "hf-cache", HUB_ID)
    assert constants.HF_HUB_CACHE == str(tmp_path / "hf-cache")
    resolved = resolve_model_ref(HUB_ID)
    assert (resolved.source, resolved.local_files_only) == ("cache", True)
    assert "using the copy in the local cache" in resolved.note


def test_cli_plugin_and_demo_fail_fast_on_an_unreachable_hub(hub_unreachable, monkeypatch, tmp_path):
    """The three loaders resolve the reference first: the message, and from_pretrained is never called."""
    import transformers

    from vtc.demo.engine import DemoError, Engine

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", _never)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", _never)
    with pytest.raises(SystemExit, match="neither a local folder nor reachable on the Hugging Face Hub"):
        cli._load(HUB_ID)
    with pytest.raises(DemoError, match="neither a local folder nor reachable on the Hugging Face Hub"):
        Engine(models=[HUB_ID], examples_dir=tmp_path / "examples")  # a served model is checked at start
    engine = Engine(examples_dir=tmp_path / "examples", allow_any_model=True)  # the model cache loads via cli._load
    with pytest.raises(DemoError, match="neither a local folder nor reachable on the Hugging Face Hub"):
        engine.model(HUB_ID)
    pytest.importorskip("lmms_eval")
    from vtc.eval.lmms.model import VtcModel

    with pytest.raises(RuntimeError, match="vtc: cannot load model .*neither a local folder nor reachable"):
        VtcModel(pretrained=HUB_ID, progress=False, device="cpu")


def test_hf_hub_offline_from_the_environment_is_respected(tmp_path):
    """A fresh process with HF_HUB_OFFLINE=1 and an empty cache: one message naming the setting, exit status 1."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-m", "vtc", "run", "--model", HUB_ID, "--compressor", "pool"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: cannot load model '{HUB_ID}': it is neither a "
                                                           "local folder nor in the local Hugging Face cache")
    assert "HF_HUB_OFFLINE is set" in done.stderr and "Retrying" not in done.stderr


# ------------------------------------------------------------------------------------------------- plugin, eval, demo


def test_plugin_checks_compressor_options_before_loading(no_model_loads):
    pytest.importorskip("lmms_eval")
    from vtc.eval.lmms.model import VtcModel

    for args, message in (("compressor=random,budget=4,seed=a", "option seed must be an int, got 'a'"),
                          ("compressor=nosuch,budget=4", "unknown compressor 'nosuch'"),
                          ("compressor=random,budget=4,sed=1", "valid options"),
                          ("compressor=none,max_new_tokens=lots", "max_new_tokens must be an integer"),
                          ("compressor=random,budget=4,images_as_video=maybe", "images_as_video")):
        with pytest.raises((TypeError, ValueError), match=message):
            VtcModel.create_from_arg_string(f"pretrained={HUB_ID},{args}", {"progress": False, "device": "cpu"})


def test_plugin_reads_model_args_by_option_type():
    """lmms-eval hands ``layer=-1`` over as ``-1.0``: it is read as the int the option is."""
    pytest.importorskip("lmms_eval")
    from vtc.eval.lmms.model import VtcModel
    from vtc.integrations.transformers import get_state

    model, processor = vtc.load_default()
    lm = VtcModel.create_from_arg_string("compressor=fastervlm,budget=4,layer=-1",
                                         {"model": model, "processor": processor, "progress": False, "device": "cpu"})
    assert get_state(lm.model).compressor.layer == -1 and type(get_state(lm.model).compressor.layer) is int
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm._warn_unknown_words("What colour is the shape ?")
        lm._warn_unknown_words("What colour is the shape at the center ?")  # no new word: no second warning
    texts = [str(w.message) for w in caught]
    assert len(texts) == 1 and "'What', 'colour'" in texts[0]
    vtc.remove(model)


def test_eval_rejects_unknown_tasks_before_loading(no_model_loads, tmp_path):
    pytest.importorskip("lmms_eval")
    from vtc.eval.lmms import sweep

    with pytest.raises(sweep.EvalFailure, match="unknown task"):
        sweep.sweep(None, ["random"], [4], ["no_such_task_vtc"], [], 1, "cpu", 1, tmp_path)


def test_demo_checks_options_before_loading(tmp_path):
    pytest.importorskip("av")
    from vtc.demo.engine import DemoError, Engine, Spec

    engine = Engine(examples_dir=tmp_path / "examples", loader=_never)
    media = engine.load_media(engine.examples[0].path)
    for spec, message in ((Spec("random", "4", "seed=a"), "compressor A \\(random\\): compressor 'random': option "
                                                          "seed must be an int, got 'a'"),
                          (Spec("nosuch", "4"), "compressor A \\(nosuch\\): unknown compressor"),
                          (Spec("random", "4", "images_as_video=3"), "images_as_video must be True or False")):
        with pytest.raises(DemoError, match=message):
            engine.run(media, "how many shapes are there ?", [spec])
    assert engine.loads == 0


# ------------------------------------------------------------------------------------------------- unknown words


@pytest.fixture(scope="module")
def default_processor():
    from transformers import AutoProcessor

    from vtc.integrations.transformers.default import DEFAULT_MODEL_DIR

    return AutoProcessor.from_pretrained(DEFAULT_MODEL_DIR)


def test_unknown_words_of_the_embedded_model(default_processor):
    assert unknown_words(default_processor, "what color is the shape at the center ?") == []
    assert unknown_words(default_processor, "What colour is the shape at the center? What") == ["What", "colour"]
    message = unknown_words_message(default_processor, "What colour is the shape ?")
    assert "'What', 'colour'" in message and "'what' for 'What'" in message


def test_cli_warns_about_unknown_words(default_processor, monkeypatch, capsys):
    class Stop(Exception):
        pass

    class Processor:
        tokenizer = default_processor.tokenizer

        def apply_chat_template(self, *args, **kwargs):
            return "prompt"

        def __call__(self, **kwargs):
            raise Stop

    monkeypatch.setattr(cli, "_load", lambda ref: ((object(), Processor()), "stub"))
    with pytest.raises(Stop):
        cli.main(["run", "--compressor", "pool", "--question", "How many shapes are there ?"])
    assert "warning: the model does not know the word 'How'" in capsys.readouterr().err


def test_demo_status_names_unknown_words(tmp_path):
    pytest.importorskip("av")
    from vtc.demo.engine import Engine, Spec

    engine = Engine(examples_dir=tmp_path / "examples")
    media = engine.load_media(engine.examples[0].path)
    result = engine.run(media, "How many shapez are there ?", [Spec("pool", "4")], max_new_tokens=1)
    assert len(result.notes) == 1 and "'How', 'shapez'" in result.notes[0]
    from vtc.demo.app import with_notes  # the status box: the status line, then one warning line per note

    assert with_notes("done: 1 compressor(s)", result.notes) == f"done: 1 compressor(s)\nwarning: {result.notes[0]}"
    assert engine.run(media, "how many shapes are there ?", [Spec("pool", "4")], max_new_tokens=1).notes == []
