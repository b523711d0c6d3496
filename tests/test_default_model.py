"""The embedded default model: ships with the package, loads offline, answers held-out questions; its training
script runs end to end and trains on exactly the prompt format used at inference."""

import json

import pytest
import torch

import vtc
from vtc.eval.default_model import synthetic as syn
from vtc.eval.default_model import train as train_default
from vtc.eval.default_model.accuracy import answer, evaluate, single_turn_prompt
from vtc.integrations.transformers.default import DEFAULT_MODEL_DIR


@pytest.fixture(scope="module")
def default_model():
    return vtc.load_default()


def test_ships_as_package_data_within_the_size_limit():
    weights = DEFAULT_MODEL_DIR / "model.safetensors"
    assert weights.is_file()
    assert weights.stat().st_size <= 25 * 1024 * 1024
    for name in ("config.json", "processor_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (DEFAULT_MODEL_DIR / name).is_file(), name


def test_architecture_is_the_documented_one(default_model):
    from transformers import CLIPVisionModel, LlavaForConditionalGeneration

    model, processor = default_model
    assert type(model) is LlavaForConditionalGeneration
    assert isinstance(model.model.vision_tower, CLIPVisionModel)  # a CLS token: CLS-attention methods apply
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) * 2 <= 25 * 1024 * 1024  # fp16 bytes
    image = syn.make_image_sample("test", 0).image
    inputs = processor(images=[image], text=[single_turn_prompt(processor, "how many shapes are there ?")],
                       return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 196


# A fixed handful of held-out test questions (test split, ground truth from the generator) over the kinds the
# shipped weights answer reliably (see the README card): a smoke test that the weights load and reach the LM intact.
FIXED = [
    ("image", 0, "color_at"), ("image", 2, "color_at"), ("image", 1, "shape_at"), ("image", 3, "shape_at"),
    ("image", 6, "shape_at"), ("image", 1, "count"), ("image", 4, "left_of"), ("image", 3, "count_shape"),
    ("video", 0, "disappeared_color"), ("video", 1, "appeared_last_color"), ("video", 3, "appeared_last_shape"),
    ("video", 2, "video_count"),
]


def _fixed_questions():
    out = []
    for medium, index, kind in FIXED:
        sample = syn.make_image_sample("test", index) if medium == "image" else syn.make_video_sample("test", index)
        q = next(q for q in sample.questions if q.kind == kind)
        images = [sample.image] if medium == "image" else sample.frames
        out.append((q, images))
    return out


def test_answers_fixed_test_questions(default_model):
    model, processor = default_model
    items = _fixed_questions()
    got = [answer(model, processor, [q.text], [imgs])[0] for q, imgs in items]
    assert got == [q.answer for q, _ in items]


def test_held_out_accuracy_matches_the_card(default_model):
    """A slice of the test split: accuracy close to what the README reports (not a tuned threshold: the card's
    full-split figure minus a margin for the small slice)."""
    model, processor = default_model
    summary = json.loads((DEFAULT_MODEL_DIR / "training_summary.json").read_text())
    result = evaluate(model, processor, split="test", num_images=40, num_videos=0, questions_per_sample=3)
    assert result["image_questions"] == 120
    assert result["image_accuracy"] >= summary["validation"]["image_accuracy"] - 0.08


def test_training_prompt_equals_the_inference_prompt():
    """The first turn of a training sequence is token-for-token the chat template's single-turn prompt."""
    _, processor = train_default.build_model()
    sample = syn.make_image_sample("train", 0)
    q = sample.questions[0]
    batch = train_default.qa_batch(processor, [train_default.qa_text(sample.questions[:3], 1)], [sample.image])
    prompt = processor(images=[sample.image], text=[single_turn_prompt(processor, q.text)], return_tensors="pt")
    n = prompt["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"][0, :n], prompt["input_ids"][0])
    tok = processor.tokenizer
    assert tok.convert_ids_to_tokens(int(batch["input_ids"][0, n])) == q.answer
    labelled = batch["labels"][0][batch["labels"][0] != -100]
    assert tok.convert_ids_to_tokens(labelled.tolist()) == [
        w for qq in sample.questions[:3] for w in (qq.answer, "</s>")]
    assert "<unk>" not in tok.convert_ids_to_tokens(batch["input_ids"][0].tolist())


def test_patch_targets_follow_the_objects():
    sample = syn.make_image_sample("train", 3, glyph_probability=1.0)
    targets = train_default.patch_targets(sample)
    color = targets["color"].reshape(14, 14)
    for obj in sample.objects:
        cx, cy = (obj.box[0] + obj.box[2]) // 2, (obj.box[1] + obj.box[3]) // 2
        if obj.shape != "letter":
            assert train_default.COLOR_CLASSES[color[cy // 16, cx // 16]] == obj.color
    assert targets["centre"].sum() == len(sample.objects)
    assert sorted(set(targets["cell"].tolist())) == list(range(9))


TINY_TRAINING = ["--stage1-steps", "3", "--stage1-batch", "2", "--pool-images", "4", "--pool-videos", "2",
                 "--stage2-steps", "4", "--batch", "2", "--video-batch", "1", "--video-from", "0.5", "--video-every",
                 "2", "--eval-images", "2", "--eval-videos", "1", "--proxy-images", "2", "--eval-every", "2",
                 "--checkpoint-every", "1", "--threads", "1"]


def test_an_interrupted_training_run_resumes_to_the_same_model(tmp_path, monkeypatch):
    """Run once straight through; run again interrupted in stage 1 and in stage 2 and restarted with the same
    command each time: the restarts continue from the checkpoints and end with bit-identical weights (so the
    training is deterministic, too)."""
    assert train_default.main(["--out", str(tmp_path / "a"), *TINY_TRAINING]) == 0
    assert (tmp_path / "a.checkpoints").is_dir() and not (tmp_path / "a" / "stage1").exists()

    class Interrupted(Exception):
        pass

    for stop in [(1, 2), (2, 2)]:
        def interrupt(stage, step, stop=stop):
            if (stage, step) == stop:
                raise Interrupted
        monkeypatch.setattr(train_default, "_interrupt_point", interrupt)
        with pytest.raises(Interrupted):
            train_default.main(["--out", str(tmp_path / "b"), *TINY_TRAINING])
    seen = []
    monkeypatch.setattr(train_default, "_interrupt_point", lambda stage, step: seen.append((stage, step)))
    assert train_default.main(["--out", str(tmp_path / "b"), *TINY_TRAINING]) == 0
    assert seen == [(2, 3), (2, 4)]  # only the steps after the last checkpoint ran

    model_a, _ = vtc.load_default(tmp_path / "a")
    model_b, _ = vtc.load_default(tmp_path / "b")
    for (name, pa), (_, pb) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(pa, pb), name
    summary = json.loads((tmp_path / "b" / "training_summary.json").read_text())
    assert summary["stage2"]["videos_seen"] >= 1 and summary["stage1"]["images_seen"] == 6
    assert "checkpoints" not in summary["args"] and str(tmp_path) not in json.dumps(summary)
    log = [json.loads(line) for line in (tmp_path / "b" / "training_log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in log} == {1, 2}
    assert "validation_proxy" in log[-1]


def test_a_changed_stage2_setting_reuses_stage1_and_the_feature_cache(tmp_path, monkeypatch):
    """Checkpoints are keyed by the settings each stage depends on: a new stage-2 learning rate trains stage 2
    afresh but neither re-trains the tower nor recomputes the cached training features."""
    assert train_default.main(["--out", str(tmp_path / "a"), *TINY_TRAINING]) == 0
    stage1, features = [], []
    real_stage1, real_features = train_default.train_stage1, train_default.tower_features
    monkeypatch.setattr(train_default, "train_stage1", lambda *a, **k: stage1.append(1) or real_stage1(*a, **k))
    monkeypatch.setattr(train_default, "tower_features",
                        lambda model, pixels: features.append(len(pixels)) or real_features(model, pixels))
    assert train_default.main(["--out", str(tmp_path / "a"), *TINY_TRAINING, "--lr", "2e-3"]) == 0
    assert stage1 == [] and features == [2]  # only the two proxy-validation images went through the tower
    stage2 = [p.name for p in (tmp_path / "a.checkpoints").iterdir() if p.name.startswith("stage2-")]
    assert len(stage2) == 2


def test_cached_training_tokens_equal_the_processor_tokens():
    """Stage 2 tokenises without pixels; its ids, mask and labels equal the processor's (image tokens expanded)."""
    _, processor = train_default.build_model()
    samples = [syn.make_image_sample("train", i) for i in range(3)]
    texts = [train_default.qa_text(s.questions[: 2 + i], 1) for i, s in enumerate(samples)]
    full = train_default.qa_batch(processor, texts, [s.image for s in samples])
    cached = train_default.qa_tokens(processor.tokenizer, texts)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(full[key], cached[key]), key
    video = syn.make_video_sample("train", 0)
    text = [train_default.qa_text(video.questions[:2], len(video.frames))]
    full = train_default.qa_batch(processor, text, video.frames)
    assert torch.equal(full["input_ids"], train_default.qa_tokens(processor.tokenizer, text)["input_ids"])


def test_training_on_cached_features_is_training_on_pixels():
    """The loss from cached tower features (the model's own merge rebuilt) equals the full model's loss on pixels."""
    model, processor = train_default.build_model(seed=2)
    samples = [syn.make_image_sample("train", i) for i in range(2)]
    texts = [train_default.qa_text(s.questions[:3], 1) for s in samples]
    full = train_default.qa_batch(processor, texts, [s.image for s in samples])
    with torch.no_grad():
        want = model(**full).loss
        features = train_default.tower_features(model, full["pixel_values"])
        cached = train_default.qa_tokens(processor.tokenizer, texts)
        embeds = train_default.multimodal_embeds(model, cached["input_ids"], features)
        got = model(inputs_embeds=embeds, attention_mask=cached["attention_mask"], labels=cached["labels"]).loss
    assert torch.allclose(got, want, atol=1e-5)


def test_alignment_targets_name_what_covers_each_patch():
    _, processor = train_default.build_model()
    tok = processor.tokenizer
    ids = {w: tok.convert_tokens_to_ids(w) for w in syn.vocabulary()}
    sample = syn.make_image_sample("train", 3, glyph_probability=1.0)
    words = train_default.patch_words(sample, ids)
    names = [[tok.convert_ids_to_tokens(int(i)) for i in row if i >= 0] for row in words]
    assert names[0][-2:] == ["top", "left"] and names[-1][-2:] == ["bottom", "right"]
    for obj in sample.objects:
        cx, cy = (obj.box[0] + obj.box[2]) // 2, (obj.box[1] + obj.box[3]) // 2
        described = names[(cy // 16) * 14 + cx // 16]
        if obj.shape == "letter":
            assert obj.letter in described
        else:
            assert obj.color in described and obj.shape in described
        assert described[-len(syn.CELLS[obj.cell].split()):] == syn.CELLS[obj.cell].split()


def test_load_default_names_the_fix_for_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="vtc.eval.default_model.train"):
        vtc.load_default(tmp_path)


def test_cls_attention_lands_on_objects(default_model):
    """Stage 1's point: the feature layer's CLS attention concentrates on object patches (uniform attention would
    put exactly the objects' area share there)."""
    from vtc.eval.default_model.fidelity import cls_attention_on_objects

    model, processor = default_model
    stats = cls_attention_on_objects(model, processor, num_images=10)
    assert stats["attention_on_objects"] > 2 * stats["object_area"]
    assert not vtc.is_applied(model)


def test_folding_the_feature_scale_keeps_attention_and_cls_output():
    """The stage-1 -> stage-2 rescale changes only the size of the visual tokens, not what the tower attends to."""
    model, processor = train_default.build_model(seed=1)
    tower = model.model.vision_tower
    pixels = train_default.pixel_tensor(processor, [syn.make_image_sample("train", i).image for i in range(2)])
    tower.config._attn_implementation = "eager"
    with torch.no_grad():
        before = tower(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
        factor = train_default.fold_feature_scale(tower, pixels, target_norm=3.0)
        after = tower(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
    assert factor > 0 and factor != 1.0
    tokens = after.hidden_states[-1][:, 1:]
    assert tokens.norm(dim=-1).mean().item() == pytest.approx(3.0, rel=1e-4)

    def relative_error(a, b):  # equal up to the LayerNorm epsilon, which does not scale with the stream
        return float((a - b).norm() / b.norm())

    assert relative_error(tokens / factor, before.hidden_states[-1][:, 1:]) < 1e-3
    for a, b in zip(after.attentions, before.attentions):
        assert relative_error(a, b) < 1e-3
    assert relative_error(after.pooler_output, before.pooler_output) < 1e-3


def test_paired_difference_by_hand():
    from vtc.eval.default_model.accuracy import paired_difference

    # per-question differences 1, 0, 0, 1: mean 0.5, sample variance (4 * 0.25) / 3, standard error sqrt(1/12)
    diff, se = paired_difference([1, 1, 0, 1], [0, 1, 0, 0])
    assert diff == 0.5 and se == pytest.approx((1 / 12) ** 0.5)
    with pytest.raises(ValueError, match="same non-zero number"):
        paired_difference([1], [1, 0])


def test_separated_pairs_lists_only_differences_beyond_two_standard_errors():
    from vtc.eval.default_model.fidelity import separated_pairs

    n = 100
    runs = {"good": {"image": [1] * 90 + [0] * 10}, "bad": {"image": [0] * 50 + [1] * 40 + [0] * 10},
            "twin": {"image": [1] * 89 + [0] * 11}}
    pairs = separated_pairs(runs, "image")
    # good vs bad: differences are 1 on 50 questions -> 50 points, se = sqrt(0.25 * 100 / 99 / 100) ~ 5 points
    # good vs twin: one question differs -> 1 point with se 1 point: within the noise
    assert [(p["better"], p["worse"]) for p in pairs] == [("good", "bad"), ("twin", "bad")]
    assert pairs[0]["points"] == 50.0 and pairs[0]["stderr_points"] == pytest.approx(100 * (0.25 * n / (n - 1) / n) ** 0.5,
                                                                                   abs=0.01)


@pytest.mark.parametrize("args, message", [(["--pool-images", "4", "--batch", "8"], "--pool-images"),
                                           (["--pool-videos", "1", "--video-batch", "2"], "--pool-videos"),
                                           (["--stage2-steps", "0"], "--stage2-steps must be >= 1")])
def test_training_rejects_bad_settings_before_building_anything(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit):
        train_default.main(["--out", str(tmp_path / "m"), *args])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.checkpoints").exists()
