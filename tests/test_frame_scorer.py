"""QuoTA's "self" frame scorer (the wrapped model rates each frame, batched) and ``images_as_video`` (a prompt's
images are the frames of one video) on tiny real-class models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vtc
from helpers import greedy, hand_built, make_inputs
from vtc import testing as tiny
from vtc.integrations.transformers import get_state
from vtc.integrations.transformers.frame_scorer import RELEVANCE_PROMPT, SelfFrameScorer


@pytest.fixture(scope="module")
def qwen():
    return tiny.build_tiny("qwen2_5_vl")


def video_inputs(processor, num_frames: int = 6, question: str = "what is the color ?"):
    video = np.stack([np.array(tiny.random_image(56, 56, seed=i)) for i in range(num_frames)])
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=[text], videos=[video], return_tensors="pt")


def test_self_scorer_rates_all_frames_in_one_batched_call(qwen):
    model, processor = qwen
    inputs = video_inputs(processor)
    vtc.apply(model, "quota", scorer="self", budget=1.0, video_budget=12, processor=processor)
    greedy(model, inputs)
    scorer = get_state(model).frame_scorer
    record = vtc.last_video_selection(model)[0]
    assert scorer.calls == 1  # 3 temporal steps, one LLM forward
    scores = [r.score for r in record.selection.frames]
    assert len(scores) == record.num_frames == 3 and all(0.0 < s < 1.0 for s in scores)
    assert sum(record.frame_budgets) == 12
    vtc.remove(model)


def test_self_score_is_p_yes_over_yes_or_no_of_frame_then_prompt(qwen):
    """The score of a frame equals P(yes) / (P(yes) + P(no)) of [frame tokens] + prompt, computed by hand."""
    model, processor = qwen
    scorer = SelfFrameScorer(processor)
    frames = [torch.randn(4, model.config.text_config.hidden_size) for _ in range(3)]
    prompt = RELEVANCE_PROMPT.format(question="is it red ?")
    got = scorer.score(model, frames, prompt)
    tok = processor.tokenizer
    text = model.get_input_embeddings()(torch.tensor(tok.encode(prompt, add_special_tokens=False)))
    yes, no = scorer._yes, scorer._no  # every single-token casing of "yes" / "no" the vocabulary has
    assert tok.convert_tokens_to_ids("yes") in yes and tok.convert_tokens_to_ids("no") in no
    for t, frame in enumerate(frames):
        with torch.no_grad():
            hidden = model.model.language_model(inputs_embeds=torch.cat([frame, text])[None]).last_hidden_state
            probs = model.lm_head(hidden[0, -1]).softmax(-1)
        p_yes, p_no = float(probs[yes].sum()), float(probs[no].sum())
        assert got[t].item() == pytest.approx(p_yes / (p_yes + p_no), abs=1e-5)


def test_self_scorer_question_is_the_prompt_text_without_roles(qwen):
    _, processor = qwen
    scorer = SelfFrameScorer(processor)
    ids = torch.tensor(processor.tokenizer.encode("USER: what is the color ? ASSISTANT:", add_special_tokens=False))
    assert scorer.question(ids).replace(" ?", "?") == "what is the color?"  # the decoder may join the "?"


def test_query_decoupling_asks_once_per_video(qwen):
    model, processor = qwen
    inputs = video_inputs(processor)
    vtc.apply(model, "quota", scorer="self", video_budget=10, processor=processor, decouple_query=True)
    greedy(model, inputs)
    scorer = get_state(model).frame_scorer
    assert scorer.generate_calls == 1 and scorer.calls == 1
    vtc.remove(model)


def test_self_scorer_without_processor_names_the_fix(qwen):
    model, processor = qwen
    vtc.apply(model, "quota", scorer="self", video_budget=10)
    with pytest.raises(ValueError, match="processor=processor"):
        greedy(model, video_inputs(processor))
    vtc.remove(model)
    with pytest.raises(ValueError, match="processor"):
        vtc.apply(model, "quota", decouple_query=True)
    with pytest.raises(TypeError, match="processor or tokenizer"):
        vtc.apply(model, "quota", scorer="self", processor=object())


# -- images_as_video ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compressor", ["random", "fastervlm", "quota", "progressive"])
def test_images_as_video_shares_one_budget_and_equals_hand_built(tiny_dirs, compressor):
    model, processor = tiny.load_tiny(tiny_dirs["llava"])
    inputs = make_inputs(processor, "llava", ["what is the color ?"], [4])
    options = {"scorer": "similarity"} if compressor == "quota" else {}
    vtc.apply(model, compressor, budget=64, video_budget=10, images_as_video=True, **options)
    out = greedy(model, inputs)
    images, videos = vtc.last_selection(model), vtc.last_video_selection(model)
    assert len(videos) == 1 and videos[0].num_frames == 4
    assert sum(r.budget for r in images) == 10 == videos[0].num_kept
    assert [r.budget for r in images] == videos[0].frame_budgets
    short, short_len = hand_built(model, inputs, "llava")
    vtc.remove(model)
    length = inputs["input_ids"].shape[1]
    assert out[:, length:].tolist() == greedy(model, short)[:, short_len:].tolist()


def test_images_as_video_keep_all_equals_unwrapped(tiny_dirs):
    model, processor = tiny.load_tiny(tiny_dirs["llava"])
    inputs = make_inputs(processor, "llava", ["what is the color ?"], [3])
    base = greedy(model, inputs)
    for compressor in vtc.list_compressors("encoder"):
        vtc.apply(model, compressor, video_budget=1.0, images_as_video=True)
        assert greedy(model, inputs).tolist() == base.tolist(), compressor
    vtc.remove(model)


def test_images_as_video_refuses_anyres_images_and_bad_flags(tiny_dirs):
    model, processor = tiny.load_tiny(tiny_dirs["llava_next"])
    inputs = make_inputs(processor, "llava_next", ["what is the color ?"], [2])
    vtc.apply(model, "random", video_budget=8, images_as_video=True)
    with pytest.raises(ValueError, match="AnyRes"):
        greedy(model, inputs)
    with pytest.raises(TypeError, match="images_as_video"):
        vtc.apply(model, "random", images_as_video="yes")
