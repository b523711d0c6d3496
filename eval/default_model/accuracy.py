"""Question-answering accuracy of a model on the synthetic splits, optionally under a vtc compressor.

Each question is asked alone (single turn, the chat template's prompt) and answered greedily; an answer is right
when its first generated word equals the one-word ground truth. Images and videos are scored separately (videos
are sent as their frames, several images in one prompt), with a break-down by question kind.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from . import synthetic as syn


def single_turn_prompt(processor, question: str, num_images: int = 1) -> str:
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


def answer(model, processor, questions: list[str], images_per_question: list[list], max_new_tokens: int = 2
           ) -> list[str]:
    """Greedy answers (first word) to a batch of questions, each with its own list of images."""
    prompts = [single_turn_prompt(processor, q, len(imgs)) for q, imgs in zip(questions, images_per_question)]
    flat = [im for imgs in images_per_question for im in imgs]
    inputs = processor(images=flat, text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [(t.split() or [""])[0] for t in texts]


def _items(split: str, num_images: int, num_videos: int, questions_per_sample: int, num_frames: int):
    for i in range(num_images):
        s = syn.make_image_sample(split, i)
        for q in s.questions[:questions_per_sample]:
            yield "image", q, [s.image]
    for i in range(num_videos):
        v = syn.make_video_sample(split, i, num_frames=num_frames)
        for q in v.questions[:questions_per_sample]:
            yield "video", q, v.frames


def evaluate(model, processor, split: str = "test", num_images: int = 200, num_videos: int = 60,
             questions_per_sample: int = 4, num_frames: int = 8, batch_size: int = 16, on_batch=None,
             per_question: bool = False) -> dict:
    """Accuracy on the first ``num_images`` images and ``num_videos`` videos of ``split``.

    Returns ``image_accuracy``, ``video_accuracy`` (``None`` when no such items), counts, their standard errors
    (``image_stderr``, ``video_stderr``: sqrt(p(1-p)/n)) and ``by_kind`` accuracies; with ``per_question`` also
    ``correct`` = {"image": [0/1 ...], "video": [...]} in question order, for paired comparisons between runs on the
    same questions. ``on_batch(n)`` is called after each batch (progress bars).
    """
    right: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    correct: dict[str, list[int]] = {"image": [], "video": []}
    batch: list = []

    def flush():
        if not batch:
            return
        # one medium per batch keeps prompt lengths (and padding) similar
        got = answer(model, processor, [q.text for _, q, _ in batch], [imgs for _, _, imgs in batch])
        for (medium, q, _), a in zip(batch, got):
            correct[medium].append(int(a == q.answer))
            for key in (medium, f"{medium}/{q.kind}"):
                total[key] += 1
                right[key] += int(a == q.answer)
        if on_batch is not None:
            on_batch(len(batch))
        batch.clear()

    medium_now = None
    for medium, q, imgs in _items(split, num_images, num_videos, questions_per_sample, num_frames):
        limit = batch_size if medium == "image" else max(1, batch_size // 4)
        if medium != medium_now or len(batch) >= limit:
            flush()
            medium_now = medium
        batch.append((medium, q, imgs))
    flush()

    def acc(key):
        return right[key] / total[key] if total[key] else None

    def stderr(key):
        return math.sqrt(acc(key) * (1 - acc(key)) / total[key]) if total[key] else None

    result = {
        "split": split,
        "image_accuracy": acc("image"),
        "video_accuracy": acc("video"),
        "image_questions": total["image"],
        "video_questions": total["video"],
        "image_stderr": stderr("image"),
        "video_stderr": stderr("video"),
        "by_kind": {k: round(right[k] / total[k], 4) for k in sorted(total) if "/" in k},
    }
    if per_question:
        result["correct"] = correct
    return result


def paired_difference(a: list[int], b: list[int]) -> tuple[float, float]:
    """``(mean(a) - mean(b), its standard error)`` for two runs scored on the same questions (0/1 each): the
    standard error of the mean per-question difference, which is what separates two methods asked the same
    questions (smaller than combining the two runs' own errors when their mistakes overlap)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired runs need the same non-zero number of questions, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    mean = sum(diffs) / len(diffs)
    var = sum((d - mean) ** 2 for d in diffs) / max(1, len(diffs) - 1)
    return mean, math.sqrt(var / len(diffs))
