"""Train the embedded default model (``vtc.load_default()``) from scratch on the synthetic data, on a CPU.

    python -m vtc.eval.default_model.train --out my-default-model        # ~95 min on 2 CPU cores, resumable

The model is a real ``LlavaForConditionalGeneration`` -- a CLIP vision tower *with a CLS token* (224 px, patch 16:
196 visual tokens per image), a 2-layer MLP projector and a small Llama LM over a word-level vocabulary -- so every
vtc integration path used on it is the one used on llava-hf checkpoints. Several images in one prompt are video
frames (8 by default).

Stage 1 pre-trains the vision tower alone. The CLS token (through ``post_layernorm``) predicts which
(colour, shape) pairs and glyph letters are present and how many shapes there are -- the objective that makes CLS
attention land on objects, which is what CLS-attention pruning relies on. Dense heads on the patch tokens of the
feature layer predict what covers each patch (colour, shape, letter, whether an object's centre is in it), which
3x3 cell it lies in and its row and column, so the visual tokens handed to the LM are easy to read and carry their
own place (after pruning with ``positions="reindex"``, a token's sequence position no longer says where it was).

Stage 2 freezes the tower and trains projector + LM on question answering over *cached* tower features: a fixed
pool of training images and videos goes through the frozen tower once (``build_bank``) and stage 2 samples its
batches from it, instead of re-running the tower at every visit. Each image is one multi-turn sequence (up to
``--turns`` questions, loss on the answers only); the first steps ask only questions the image alone can answer,
videos join after a curriculum of images only, and for the first part an alignment objective pulls each projected
visual token towards the words that describe its patch (its colour, shape or letter and its cell).

Everything is seeded (data by split/index and step, weights by ``--seed``), single-process, with a progress bar.
The run is resumable: every ``--checkpoint-every`` steps each stage saves its state (and the feature cache its
chunks) under ``--checkpoints`` (default ``<out>.checkpoints`` beside the output, never inside it), keyed by the
settings that stage depends on; running the same command again continues where it stopped, with the same result
as an uninterrupted run. The output is a ``save_pretrained`` folder (fp16 weights + processor files) that
``vtc.load_default(path)`` loads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pathlib
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import synthetic as syn

IMAGE_SIZE = 224
PATCH = 16
GRID = IMAGE_SIZE // PATCH
FRAMES = 8
SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
CHAT_WORDS = ("USER", "ASSISTANT", ":")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ ' ' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ 'ASSISTANT: ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ ' </s> ' }}"
    "{% else %}"
    "{{ 'USER: ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] in ('image', 'video') %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ ' ' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

#: Sizes: 2.9 M parameters in the tower, 3.4 M in projector + LM; 12.7 MB in fp16.
TOWER = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4)
LM = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)


# -- model and processor ------------------------------------------------------------------------------------


def build_tokenizer():
    from vtc.testing import word_level_tokenizer

    return word_level_tokenizer(SPECIALS, CHAT_WORDS + tuple(syn.vocabulary()), CHAT_TEMPLATE)


def build_model(seed: int = 0):
    """``(model, processor)`` with seeded random weights, in the shipped architecture."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tok = build_tokenizer()
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH, **TOWER),
        text_config=LlamaConfig(vocab_size=len(tok), max_position_embeddings=8192,
                                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id, tie_word_embeddings=True, **LM),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id, gen.bos_token_id = tok.pad_token_id, tok.eos_token_id, tok.bos_token_id
    gen.max_new_tokens = 4
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                           crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE)
    return model, processor


def pixel_tensor(processor, images) -> torch.Tensor:
    return processor.image_processor(images=images, return_tensors="pt")["pixel_values"]


# -- stage 1: the vision tower ------------------------------------------------------------------------------

PAIRS = [(c, s) for c in syn.COLORS for s in syn.SHAPES]
COLOR_CLASSES = ("background",) + tuple(syn.COLORS) + ("black",)
SHAPE_CLASSES = ("background",) + syn.SHAPES + ("letter",)


class TowerHeads(nn.Module):
    """Training-only heads for stage 1 (not shipped)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.presence = nn.Linear(hidden, len(PAIRS) + len(syn.LETTERS))
        self.count = nn.Linear(hidden, syn.MAX_OBJECTS + 1)
        self.dense_norm = nn.LayerNorm(hidden)
        self.color = nn.Linear(hidden, len(COLOR_CLASSES))
        self.shape = nn.Linear(hidden, len(SHAPE_CLASSES))
        self.letter = nn.Linear(hidden, len(syn.LETTERS) + 1)
        self.cell = nn.Linear(hidden, 9)
        self.row = nn.Linear(hidden, GRID)
        self.col = nn.Linear(hidden, GRID)
        self.centre = nn.Linear(hidden, 1)


def patch_targets(sample: syn.ImageSample) -> dict[str, np.ndarray]:
    """Per-patch labels from the object-id map: the object covering most of a patch (>= 15 % of it; glyph strokes
    >= 8 %), else background."""
    ids = sample.id_map.reshape(GRID, PATCH, GRID, PATCH).transpose(0, 2, 1, 3).reshape(GRID * GRID, PATCH * PATCH)
    n = len(sample.objects)
    coverage = np.stack([(ids == i).mean(axis=1) for i in range(n)], axis=1) if n else np.zeros((GRID * GRID, 0))
    owner = coverage.argmax(axis=1) if n else np.zeros(GRID * GRID, dtype=int)
    best = coverage.max(axis=1) if n else np.zeros(GRID * GRID)
    color = np.zeros(GRID * GRID, dtype=np.int64)
    shape = np.zeros(GRID * GRID, dtype=np.int64)
    letter = np.zeros(GRID * GRID, dtype=np.int64)
    centre = np.zeros(GRID * GRID, dtype=np.float32)
    for p in range(GRID * GRID):
        if n == 0:
            break
        obj = sample.objects[owner[p]]
        if best[p] >= (0.08 if obj.shape == "letter" else 0.15):
            color[p] = COLOR_CLASSES.index(obj.color)
            shape[p] = SHAPE_CLASSES.index(obj.shape)
            letter[p] = syn.LETTERS.index(obj.letter) + 1 if obj.letter else 0
    for obj in sample.objects:
        cx, cy = (obj.box[0] + obj.box[2]) / 2, (obj.box[1] + obj.box[3]) / 2
        centre[int(cy // PATCH) * GRID + int(cx // PATCH)] = 1.0
    rows, cols = np.divmod(np.arange(GRID * GRID), GRID)
    cell = (rows * 3 // GRID) * 3 + cols * 3 // GRID
    return dict(color=color, shape=shape, letter=letter, centre=centre, cell=cell, row=rows, col=cols)


def image_targets(sample: syn.ImageSample) -> dict[str, np.ndarray]:
    presence = np.zeros(len(PAIRS) + len(syn.LETTERS), dtype=np.float32)
    count = 0
    for obj in sample.objects:
        if obj.shape == "letter":
            presence[len(PAIRS) + syn.LETTERS.index(obj.letter)] = 1
        else:
            presence[PAIRS.index((obj.color, obj.shape))] = 1
            count += 1
    return dict(presence=presence, count=np.int64(count), **patch_targets(sample))


def stage1_loss(tower, heads: TowerHeads, pixels: torch.Tensor, targets: dict[str, torch.Tensor],
                weights: dict[str, float] | None = None):
    """Weighted sum of the stage-1 objectives (weight 1 unless ``weights`` says otherwise) and their values."""
    weights = weights or {}
    out = tower(pixel_values=pixels)
    cls = out.pooler_output
    patches = heads.dense_norm(out.last_hidden_state[:, 1:])
    losses = {
        "presence": F.binary_cross_entropy_with_logits(heads.presence(cls), targets["presence"]),
        "count": F.cross_entropy(heads.count(cls), targets["count"]),
        "color": F.cross_entropy(heads.color(patches).flatten(0, 1), targets["color"].flatten()),
        "shape": F.cross_entropy(heads.shape(patches).flatten(0, 1), targets["shape"].flatten()),
        "letter": F.cross_entropy(heads.letter(patches).flatten(0, 1), targets["letter"].flatten()),
        "cell": F.cross_entropy(heads.cell(patches).flatten(0, 1), targets["cell"].flatten()),
        "row": F.cross_entropy(heads.row(patches).flatten(0, 1), targets["row"].flatten()),
        "col": F.cross_entropy(heads.col(patches).flatten(0, 1), targets["col"].flatten()),
        "centre": F.binary_cross_entropy_with_logits(heads.centre(patches).squeeze(-1), targets["centre"]),
    }
    total = sum(weights.get(k, 1.0) * v for k, v in losses.items())
    return total, {k: float(v.detach()) for k, v in losses.items()}


#: Stage 1 opens with the dense shape loss alone: mixed with the easy objectives from the start (colour, letter and
#: centre are learnt in ~50 steps) it stalls at chance, because telling a square from a circle needs attention
#: between an object's patches, which forms only once the shape gradient has the tower to itself. Measured
#: (validation, shape of an object from its patches): 25 % after 250 mixed steps; shape-only 27 % at step 100, 63 % at
#: 200, 90 % at 400. Then every objective joins, shape and the CLS presence objective (what makes CLS attention land
#: on objects) weighted up; shape keeps improving (92 % 100 steps later) while the rest is learnt.
SHAPE_ONLY = {"shape": 1.0, "presence": 0.0, "count": 0.0, "color": 0.0, "letter": 0.0, "cell": 0.0, "row": 0.0,
              "col": 0.0, "centre": 0.0}
ALL_OBJECTIVES = {"shape": 3.0, "presence": 3.0}


def _collate_targets(items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.stack([it[k] for it in items])) for k in items[0]}


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * 0.95 + 0.05


# -- checkpoints --------------------------------------------------------------------------------------------


def fingerprint(settings: dict) -> str:
    """A short stable hash of the settings a stage's result depends on (names its checkpoint folder)."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


class Checkpoints:
    """Training state saved under one folder, written atomically (a crash mid-write leaves the previous file).

    Each stage keeps its own sub-folder named by the fingerprint of the settings it depends on, so a changed
    setting starts that stage afresh while earlier stages (and the cached tower features) are reused.
    """

    def __init__(self, folder: pathlib.Path):
        self.folder = pathlib.Path(folder)

    def path(self, name: str) -> pathlib.Path:
        return self.folder / f"{name}.pt"

    def load(self, name: str):
        path = self.path(name)
        return torch.load(path, weights_only=False) if path.is_file() else None

    def save(self, name: str, obj) -> None:
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(obj, tmp)
        os.replace(tmp, path)


def _interrupt_point(stage: int, step: int) -> None:
    """Called after every checkpointed step; tests replace it to simulate an interruption."""


class Clock:
    """Training seconds, continued across resumed runs."""

    def __init__(self, offset: float = 0.0):
        self.offset, self.started = offset, time.perf_counter()

    def __call__(self) -> float:
        return self.offset + time.perf_counter() - self.started


def train_stage1(model, processor, steps: int, batch: int, lr: float, shape_only: float, log,
                 ckpt: Checkpoints | None = None, every: int = 50, clock: Clock | None = None) -> dict:
    """Stage 1; with ``ckpt``, resumes from its ``stage1`` state and saves it every ``every`` steps."""
    from tqdm import tqdm

    tower = model.model.vision_tower
    heads = TowerHeads(tower.config.hidden_size)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05, betas=(0.9, 0.98))
    start, stats = 0, {}
    state = ckpt.load("stage1") if ckpt else None
    if state is not None:
        tower.load_state_dict(state["tower"])
        heads.load_state_dict(state["heads"])
        opt.load_state_dict(state["optimizer"])
        start, stats = state["step"], state["stats"]
    tower.train()
    bar = tqdm(range(start, steps), desc="stage 1 (vision tower)", unit="step", mininterval=5, initial=start,
               total=steps)
    for step in bar:
        index = step * batch  # the data is a function of the step: nothing to restore on resume
        samples = [syn.make_image_sample("train", index + i) for i in range(batch)]
        pixels = pixel_tensor(processor, [s.image for s in samples])
        targets = _collate_targets([image_targets(s) for s in samples])
        for group in opt.param_groups:
            group["lr"] = lr * _schedule(step, steps, max(1, steps // 20))
        weights = SHAPE_ONLY if step < shape_only * steps else ALL_OBJECTIVES
        loss, parts = stage1_loss(tower, heads, pixels, targets, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        stats = {k: 0.9 * stats.get(k, v) + 0.1 * v for k, v in parts.items()}
        bar.set_postfix({k: f"{v:.3f}" for k, v in stats.items()}, refresh=False)
        if step % 100 == 0 or step == steps - 1:
            log({"stage": 1, "step": step, **stats})
        if ckpt and ((step + 1) % every == 0 or step == steps - 1):
            ckpt.save("stage1", {"tower": tower.state_dict(), "heads": heads.state_dict(),
                                 "optimizer": opt.state_dict(), "step": step + 1, "stats": stats,
                                 "seconds": clock() if clock else 0.0})
            _interrupt_point(1, step + 1)
    tower.eval()
    return {"images_seen": steps * batch, **stats}


@torch.no_grad()
def fold_feature_scale(tower, pixels: torch.Tensor, target_norm: float) -> float:
    """Rescale the tower's residual stream so its visual tokens have mean norm ``target_norm``; returns the factor.

    A trained tower's tokens come out with norm ~50 against text embeddings of ~1, which slows the projector and LM
    in stage 2. Multiplying ``pre_layrnorm`` and every residual branch's output projection by one factor scales the
    whole residual stream by it; the LayerNorms inside the layers and ``post_layernorm`` cancel the factor, so the
    attention maps (what CLS-attention pruning reads) and the CLS output are unchanged.
    """
    vm = getattr(tower, "vision_model", tower)  # transformers 5 flattens CLIPVisionModel
    tokens = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
    factor = target_norm / float(tokens.norm(dim=-1).mean())
    modules = [vm.pre_layrnorm] + [m for layer in vm.encoder.layers for m in (layer.self_attn.out_proj, layer.mlp.fc2)]
    for module in modules:
        module.weight.mul_(factor)
        module.bias.mul_(factor)
    return factor


# -- stage 2: projector + LM on question answering, over cached tower features ------------------------------


def qa_text(questions: list[syn.Question], num_images: int) -> str:
    """The multi-turn training sequence; its first turn is exactly the chat template's single-turn prompt."""
    turns = []
    for i, q in enumerate(questions):
        images = "<image>\n" * num_images if i == 0 else ""
        turns.append(f"USER: {images}{q.text} ASSISTANT: {q.answer} </s>")
    return " ".join(turns)


def _answer_labels(tok, ids: torch.Tensor) -> torch.Tensor:
    """Loss targets: the answer word after each ``ASSISTANT :`` and its ``</s>``; everything else -100."""
    labels = torch.full_like(ids, -100)
    assistant, colon = tok.convert_tokens_to_ids("ASSISTANT"), tok.convert_tokens_to_ids(":")
    starts = ((ids[:, :-3] == assistant) & (ids[:, 1:-2] == colon)).nonzero()
    for row, col in starts.tolist():
        labels[row, col + 2: col + 4] = ids[row, col + 2: col + 4]
    return labels


def _right_padded(tok, texts: list[str]):
    side = tok.padding_side
    tok.padding_side = "right"
    try:
        return tok(texts, padding=True, return_tensors="pt")
    finally:
        tok.padding_side = side


def qa_batch(processor, texts: list[str], images: list) -> dict[str, torch.Tensor]:
    """Processor inputs (pixels included) with answer-only labels: what the model sees at inference."""
    tok = processor.tokenizer
    side = tok.padding_side
    tok.padding_side = "right"
    try:
        inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
    finally:
        tok.padding_side = side
    inputs["labels"] = _answer_labels(tok, inputs["input_ids"])
    return inputs


def qa_tokens(tokenizer, texts: list[str], tokens_per_image: int = GRID * GRID) -> dict[str, torch.Tensor]:
    """``qa_batch``'s ``input_ids`` / ``attention_mask`` / ``labels`` without pixels: each ``<image>`` expanded to
    the tower's token count, as the processor does (tested equal), for training on cached features."""
    enc = _right_padded(tokenizer, [t.replace("<image>", "<image>" * tokens_per_image) for t in texts])
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": _answer_labels(tokenizer, enc["input_ids"])}


@torch.no_grad()
def tower_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """The feature layer's patch tokens (``vision_feature_layer``, CLS dropped): what the projector receives."""
    out = model.model.vision_tower(pixel_values=pixels, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def multimodal_embeds(model, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Text embeddings with the projected ``features`` [images, tokens, dim] in the image-token rows, in order --
    the model's own merge, from cached tower outputs."""
    embeds = model.get_input_embeddings()(input_ids)
    visual = model.model.multi_modal_projector(features.to(embeds.dtype)).flatten(0, -2)
    mask = (input_ids == model.config.image_token_id).unsqueeze(-1)
    return embeds.masked_scatter(mask, visual)


def patch_words(sample: syn.ImageSample, word_ids: dict[str, int]) -> np.ndarray:
    """[196, 4] vocabulary ids describing each patch (colour, shape or letter, the words of its cell), -1 padded:
    the targets of the alignment objective."""
    t = patch_targets(sample)
    out = np.full((GRID * GRID, 4), -1, dtype=np.int16)
    for p in range(GRID * GRID):
        words = []
        if 0 < t["color"][p] < len(COLOR_CLASSES) - 1:
            words.append(COLOR_CLASSES[t["color"][p]])
        if t["letter"][p]:
            words.append(syn.LETTERS[t["letter"][p] - 1])
        elif 0 < t["shape"][p] < len(SHAPE_CLASSES) - 1:
            words.append(SHAPE_CLASSES[t["shape"][p]])
        words += syn.CELLS[t["cell"][p]].split()
        out[p, : len(words)] = [word_ids[w] for w in words]
    return out


def alignment_loss(model, features: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Mean -log p(word | projected token) over each patch's describing words, p = softmax over the (tied) word
    embeddings: pulls a visual token towards the words that describe it, as a captioning-style projector alignment
    does, so the LM can match question words against visual tokens from the first steps."""
    visual = model.model.multi_modal_projector(features.float())
    logp = (visual @ model.get_input_embeddings().weight.T).log_softmax(-1)
    words = words.long()
    mask = words >= 0
    return -(logp.gather(-1, words.clamp(min=0)) * mask).sum() / mask.sum()


@dataclass
class FeatureBank:
    """Cached feature-layer tokens (fp16) of a fixed pool of training images and videos, with their questions.

    The tower is frozen in stage 2, so each pooled image goes through it once instead of at every visit; stage 2
    samples its batches from the pool (deterministically per step)."""

    images: torch.Tensor  # [N, 196, D]
    image_questions: list
    image_words: torch.Tensor  # [N, 196, 4] int16
    videos: torch.Tensor  # [M, FRAMES, 196, D]
    video_questions: list


IMAGE_POOL_START = 10_000_000  # stage 1 reads train images from 0 up: stage 2's pool is disjoint from them


def build_bank(model, processor, num_images: int, num_videos: int, ckpt: Checkpoints | None, chunk: int = 250,
               frames: int = FRAMES) -> FeatureBank:
    """Features of train images ``IMAGE_POOL_START + i`` and videos ``i``, computed chunk by chunk (each chunk
    saved in ``ckpt`` and reused by a resumed run)."""
    from tqdm import tqdm

    tok = processor.tokenizer
    word_ids = {w: tok.convert_tokens_to_ids(w) for w in syn.vocabulary()}
    parts = {"images": [], "image_questions": [], "image_words": [], "videos": [], "video_questions": []}
    bar = tqdm(total=num_images + num_videos, desc="caching tower features", unit="sample", mininterval=5)
    for start in range(0, num_images, chunk):
        n = min(chunk, num_images - start)
        name = f"bank/images-{start:07d}-{n}"
        part = ckpt.load(name) if ckpt else None
        if part is None:
            samples = [syn.make_image_sample("train", IMAGE_POOL_START + start + i) for i in range(n)]
            feats = [tower_features(model, pixel_tensor(processor, [s.image for s in samples[k:k + 50]]))
                     for k in range(0, n, 50)]
            part = {"features": torch.cat(feats).half(), "questions": [s.questions for s in samples],
                    "words": torch.from_numpy(np.stack([patch_words(s, word_ids) for s in samples]))}
            if ckpt:
                ckpt.save(name, part)
        parts["images"].append(part["features"])
        parts["image_questions"] += part["questions"]
        parts["image_words"].append(part["words"])
        bar.update(n)
    for start in range(0, num_videos, chunk // frames):
        n = min(chunk // frames, num_videos - start)
        name = f"bank/videos{frames}-{start:07d}-{n}"
        part = ckpt.load(name) if ckpt else None
        if part is None:
            samples = [syn.make_video_sample("train", start + i, num_frames=frames) for i in range(n)]
            feats = [tower_features(model, pixel_tensor(processor, s.frames)) for s in samples]
            part = {"features": torch.stack(feats).half(), "questions": [s.questions for s in samples]}
            if ckpt:
                ckpt.save(name, part)
        parts["videos"].append(part["features"])
        parts["video_questions"] += part["questions"]
        bar.update(n)
    bar.close()
    dim = model.config.vision_config.hidden_size
    cat = (lambda xs, shape: torch.cat(xs) if xs else torch.zeros(shape, dtype=torch.float16))
    return FeatureBank(cat(parts["images"], (0, GRID * GRID, dim)), parts["image_questions"],
                       cat(parts["image_words"], (0, GRID * GRID, 4)).to(torch.int16),
                       cat(parts["videos"], (0, frames, GRID * GRID, dim)), parts["video_questions"])


#: Question kinds that cannot be answered from the text alone: with ``--grounding`` > 0 stage 2 opens with only
#: these, so the LM learns to read the visual tokens before it can settle into answering from priors.
GROUNDING_KINDS = frozenset({"color_at", "shape_at", "letter"})


def stage2_batch(bank: FeatureBank, tok, step: int, seed: int, video: bool, batch: int, turns: int,
                 kinds: frozenset[str] | None = None):
    """``(inputs, features)`` of stage-2 step ``step``: a pure function of (bank, step, seed), so a resumed run
    draws exactly the batches an uninterrupted one would."""
    rng = np.random.default_rng([seed, step])
    pool = bank.video_questions if video else bank.image_questions
    rows = rng.choice(len(pool), size=min(batch, len(pool)), replace=False)
    texts = []
    for row in rows.tolist():
        questions = [q for q in pool[row] if kinds is None or q.kind in kinds] or list(pool[row])
        order = rng.permutation(len(questions))[:turns]
        texts.append(qa_text([questions[i] for i in order], bank.videos.shape[1] if video else 1))
    rows_t = torch.from_numpy(rows)
    features = bank.videos[rows_t].flatten(0, 1) if video else bank.images[rows_t]
    return qa_tokens(tok, texts), features, rows_t


@torch.no_grad()
def proxy_accuracy(model, tok, features: torch.Tensor, questions: list, batch: int = 32) -> dict[str, float]:
    """Single-turn accuracy of the next-token argmax after ``ASSISTANT:`` on cached validation features, by kind
    (a cheap progress signal while training; the reported figures come from ``accuracy.evaluate``)."""
    was_training = model.training
    model.eval()
    items = [(i, q) for i, qs in enumerate(questions) for q in qs]
    right: dict[str, int] = {}
    total: dict[str, int] = {}
    for k in range(0, len(items), batch):
        chunk = items[k: k + batch]
        enc = _right_padded(tok, [f"USER: {'<image>' * features.shape[1]}\n{q.text} ASSISTANT:" for _, q in chunk])
        ids = enc["input_ids"]
        feats = features[torch.tensor([i for i, _ in chunk])]
        logits = model(inputs_embeds=multimodal_embeds(model, ids, feats), attention_mask=enc["attention_mask"]).logits
        last = enc["attention_mask"].sum(1) - 1
        pred = logits[torch.arange(len(chunk)), last].argmax(-1).tolist()
        for (_, q), p in zip(chunk, pred):
            for key in ("all", q.kind):
                total[key] = total.get(key, 0) + 1
                right[key] = right.get(key, 0) + int(tok.convert_ids_to_tokens(p) == q.answer)
    model.train(was_training)
    return {k: round(right[k] / total[k], 3) for k in sorted(total)}


def train_stage2(model, processor, bank: FeatureBank, steps: int, batch: int, video_batch: int, video_every: int,
                 video_from: float, turns: int, lr: float, grounding: float, align: float, align_until: float,
                 seed: int, log, ckpt: Checkpoints | None = None, every: int = 50, clock: Clock | None = None,
                 val: tuple | None = None, eval_every: int = 500) -> dict:
    """Stage 2 on ``bank``; with ``ckpt``, resumes from its ``stage2`` state and saves it every ``every`` steps.
    ``val`` = (features, questions) of validation images for the logged proxy accuracy."""
    from tqdm import tqdm

    tok = processor.tokenizer
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    start, images, videos, stats = 0, 0, 0, {}
    state = ckpt.load("stage2") if ckpt else None
    if state is not None:
        model.load_state_dict(state["weights"], strict=False)
        opt.load_state_dict(state["optimizer"])
        start, images, videos, stats = state["step"], state["images"], state["videos"], state["stats"]
    model.train()
    model.model.vision_tower.eval()
    has_videos = len(bank.video_questions) > 0
    bar = tqdm(range(start, steps), desc="stage 2 (projector + LM)", unit="step", mininterval=5, initial=start,
               total=steps)
    for step in bar:
        use_video = has_videos and step >= video_from * steps and step % video_every == 0
        kinds = GROUNDING_KINDS if step < grounding * steps and not use_video else None
        inputs, features, rows = stage2_batch(bank, tok, step, seed, use_video,
                                              video_batch if use_video else batch, turns, kinds)
        if use_video:
            videos += len(rows)
        else:
            images += len(rows)
        for group in opt.param_groups:
            group["lr"] = lr * _schedule(step, steps, max(1, steps // 25))
        embeds = multimodal_embeds(model, inputs["input_ids"], features)
        loss = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], labels=inputs["labels"]).loss
        total = loss
        if align > 0 and not use_video and step < align_until * steps:
            aux = alignment_loss(model, features, bank.image_words[rows])
            total = loss + align * aux
            a = float(aux.detach())
            stats["align_loss"] = 0.9 * stats.get("align_loss", a) + 0.1 * a
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        key = "video_loss" if use_video else "image_loss"
        value = float(loss.detach())
        stats[key] = 0.9 * stats.get(key, value) + 0.1 * value
        bar.set_postfix({k: f"{v:.3f}" for k, v in stats.items()}, refresh=False)
        if step % 100 == 0 or step == steps - 1:
            record = {"stage": 2, "step": step, "images": images, "videos": videos, **stats}
            if val is not None and (step % eval_every == 0 or step == steps - 1):
                record["validation_proxy"] = proxy_accuracy(model, tok, *val)
            log(record)
        if ckpt and ((step + 1) % every == 0 or step == steps - 1):
            trainable = dict(zip(names, (p.detach() for p in params)))
            ckpt.save("stage2", {"weights": trainable, "optimizer": opt.state_dict(), "step": step + 1,
                                 "images": images, "videos": videos, "stats": stats,
                                 "seconds": clock() if clock else 0.0})
            _interrupt_point(2, step + 1)
    model.eval()
    return {"images_seen": images, "videos_seen": videos, **stats}


# -- main ---------------------------------------------------------------------------------------------------

#: settings that do not change the trained weights (left out of the checkpoint fingerprints)
_NOT_TRAINING = ("out", "checkpoints", "threads", "checkpoint_every", "eval_images", "eval_videos", "eval_every",
                "proxy_images")
_STAGE1 = ("seed", "stage1_steps", "stage1_batch", "stage1_lr", "shape_only", "feature_norm")


def default_checkpoints(out: pathlib.Path) -> pathlib.Path:
    """``<out>.checkpoints`` beside the output folder (so never inside the shipped model folder)."""
    return out.parent / f"{out.name}.checkpoints"


def round_to_fp16(module: nn.Module) -> None:
    """Round weights to what the fp16 checkpoint will hold, so stage 2 trains on the features shipped inference
    computes."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtc.eval.default_model.train",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (save_pretrained layout)")
    parser.add_argument("--checkpoints", help="folder for resumable training state and cached tower features "
                                              "(default: <out>.checkpoints beside --out); a rerun resumes from it")
    parser.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--stage1-steps", type=int, default=1100)
    parser.add_argument("--stage1-batch", type=int, default=32)
    parser.add_argument("--stage1-lr", type=float, default=1e-3)
    parser.add_argument("--shape-only", type=float, default=0.36,
                        help="fraction of stage 1 that trains the dense shape objective alone")
    parser.add_argument("--feature-norm", type=float, default=5.0,
                        help="mean norm the visual tokens are rescaled to after stage 1 (0: leave as trained)")
    parser.add_argument("--pool-images", type=int, default=12000, help="training images cached for stage 2")
    parser.add_argument("--pool-videos", type=int, default=2000, help="training videos cached for stage 2")
    parser.add_argument("--stage2-steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=8, help="images per stage-2 step")
    parser.add_argument("--video-batch", type=int, default=2, help="videos per stage-2 video step")
    parser.add_argument("--video-every", type=int, default=2, help="every n-th step is a video step ...")
    parser.add_argument("--video-from", type=float, default=0.2, help="... once this fraction of stage 2 is done")
    parser.add_argument("--turns", type=int, default=16, help="max questions per training sequence")
    parser.add_argument("--grounding", type=float, default=0.1,
                        help="fraction of stage 2 that asks only questions the image alone can answer")
    parser.add_argument("--align", type=float, default=0.5,
                        help="weight of the projector alignment objective (visual token -> describing words)")
    parser.add_argument("--align-until", type=float, default=0.5, help="... over this fraction of stage 2")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=500, help="stage-2 steps between proxy validations ...")
    parser.add_argument("--proxy-images", type=int, default=60, help="... on this many validation images (0: none)")
    parser.add_argument("--eval-images", type=int, default=300, help="validation images after training")
    parser.add_argument("--eval-videos", type=int, default=100, help="validation videos after training")
    args = parser.parse_args(argv)
    # checked before any model is built or checkpoint read: a typo must not cost a stage
    if args.pool_images < args.batch:
        parser.error(f"--pool-images ({args.pool_images}) must hold at least one batch (--batch {args.batch})")
    if 0 < args.pool_videos < args.video_batch:
        parser.error(f"--pool-videos ({args.pool_videos}) must be 0 or hold at least one --video-batch "
                     f"({args.video_batch})")
    for name in ("stage1_steps", "stage2_steps", "stage1_batch", "batch", "video_batch", "video_every", "turns",
                 "checkpoint_every", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    torch.set_num_threads(args.threads)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = pathlib.Path(args.checkpoints) if args.checkpoints else default_checkpoints(out)
    settings = {k: v for k, v in vars(args).items() if k not in _NOT_TRAINING}
    sizes = {"tower": TOWER, "lm": LM, "frames": FRAMES}
    fp1 = fingerprint({**{k: settings[k] for k in _STAGE1}, **sizes})
    ck1 = Checkpoints(root / f"stage1-{fp1}")
    ck2 = Checkpoints(root / f"stage2-{fingerprint({**settings, **sizes})}")
    done1, state1, state2 = ck1.load("done"), ck1.path("stage1").is_file(), ck2.load("stage2")
    resumed = done1 is not None or state1
    seconds = max([0.0] + [s["seconds"] for s in (done1, state2) if s is not None])
    if state1 and done1 is None:
        seconds = max(seconds, ck1.load("stage1")["seconds"])
    clock = Clock(seconds)
    log_path = out / "training_log.jsonl"
    if not resumed or not log_path.is_file():
        log_path.write_text("")
    else:
        print(f"resuming from {root.name} ({seconds / 60:.1f} training minutes done)")

    def log(record):
        record["seconds"] = round(clock(), 1)
        with log_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    model, processor = build_model(args.seed)
    tower = model.model.vision_tower
    if done1 is None:
        torch.manual_seed(args.seed)
        s1 = train_stage1(model, processor, args.stage1_steps, args.stage1_batch, args.stage1_lr, args.shape_only,
                          log, ck1, args.checkpoint_every, clock)
        if args.feature_norm > 0:
            probe = pixel_tensor(processor, [syn.make_image_sample("train", 20_000_000 + i).image for i in range(32)])
            s1["feature_scale"] = fold_feature_scale(tower, probe, args.feature_norm)
        round_to_fp16(tower)
        done1 = {"tower": tower.state_dict(), "stats": s1, "seconds": clock()}
        ck1.save("done", done1)
    tower.load_state_dict(done1["tower"])
    tower.eval()
    s1, t1 = done1["stats"], done1["seconds"]

    bank = build_bank(model, processor, args.pool_images, args.pool_videos, ck1)
    val = None
    if args.proxy_images > 0:
        val_samples = [syn.make_image_sample("validation", i) for i in range(args.proxy_images)]
        val = (tower_features(model, pixel_tensor(processor, [s.image for s in val_samples])).half(),
               [s.questions for s in val_samples])
    s2 = train_stage2(model, processor, bank, args.stage2_steps, args.batch, args.video_batch, args.video_every,
                      args.video_from, args.turns, args.lr, args.grounding, args.align, args.align_until, args.seed,
                      log, ck2, args.checkpoint_every, clock, val, args.eval_every)
    t2 = clock() - t1

    model.half().save_pretrained(out)
    processor.save_pretrained(out)
    model.float()
    from .accuracy import evaluate

    val_result = evaluate(model, processor, split="validation", num_images=args.eval_images,
                          num_videos=args.eval_videos)
    summary = {"args": {k: v for k, v in vars(args).items() if k not in ("out", "checkpoints")},  # no paths
               "torch": torch.__version__, "threads": torch.get_num_threads(), "stage1": s1, "stage2": s2,
               "stage1_seconds": round(t1), "stage2_seconds": round(t2), "total_seconds": round(clock()),
               "validation": val_result, "parameters": sum(p.numel() for p in model.parameters())}
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({"validation": {k: val_result[k] for k in ("image_accuracy", "video_accuracy")},
                      "minutes": round(clock() / 60, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
