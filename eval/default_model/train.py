"""Train the embedded default model (``vtc.load_default()``) from scratch on the synthetic data, on a CPU.

    python -m vtc.eval.default_model.train --out my-default-model        # ~80 min on 2 CPU cores

The model is a real ``LlavaForConditionalGeneration`` -- a CLIP vision tower *with a CLS token* (224 px, patch 16:
196 visual tokens per image), a 2-layer MLP projector and a small Llama LM over a word-level vocabulary -- so every
vtc integration path used on it is the one used on llava-hf checkpoints. Several images in one prompt are video
frames (8 by default).

Stage 1 pre-trains the vision tower alone. The CLS token (through ``post_layernorm``) predicts which
(colour, shape) pairs and glyph letters are present and how many shapes there are -- the objective that makes CLS
attention land on objects, which is what CLS-attention pruning relies on. Dense heads on the patch tokens of the
feature layer predict what covers each patch (colour, shape, letter, whether an object's centre is in it) and which
3x3 cell it lies in, so the visual tokens handed to the LM are easy to read and keep their own position (after
pruning, a token's sequence position no longer says where it was).

Stage 2 freezes the tower and trains projector + LM on question answering: each image is one multi-turn sequence
(up to ``--turns`` questions, loss on the answers only), and videos join after a curriculum of images only.

Everything is seeded (data by split/index, weights by ``--seed``), single-process, with a progress bar; the output
is a ``save_pretrained`` folder (fp16 weights + processor files) that ``vtc.load_default(path)`` loads.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time

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
    return dict(color=color, shape=shape, letter=letter, centre=centre, cell=cell)


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
SHAPE_ONLY = {"shape": 1.0, "presence": 0.0, "count": 0.0, "color": 0.0, "letter": 0.0, "cell": 0.0, "centre": 0.0}
ALL_OBJECTIVES = {"shape": 3.0, "presence": 3.0}


def _collate_targets(items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.stack([it[k] for it in items])) for k in items[0]}


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * 0.95 + 0.05


def train_stage1(model, processor, steps: int, batch: int, lr: float, shape_only: float, log) -> dict:
    from tqdm import tqdm

    tower = model.model.vision_tower
    heads = TowerHeads(tower.config.hidden_size)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05, betas=(0.9, 0.98))
    tower.train()
    index = 0
    stats: dict[str, float] = {}
    bar = tqdm(range(steps), desc="stage 1 (vision tower)", unit="step", mininterval=5)
    for step in bar:
        samples = [syn.make_image_sample("train", index + i) for i in range(batch)]
        index += batch
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
    tower.eval()
    return {"images_seen": index, **stats}


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


# -- stage 2: projector + LM on question answering ----------------------------------------------------------


def qa_text(questions: list[syn.Question], num_images: int) -> str:
    """The multi-turn training sequence; its first turn is exactly the chat template's single-turn prompt."""
    turns = []
    for i, q in enumerate(questions):
        images = "<image>\n" * num_images if i == 0 else ""
        turns.append(f"USER: {images}{q.text} ASSISTANT: {q.answer} </s>")
    return " ".join(turns)


def qa_batch(processor, texts: list[str], images: list) -> dict[str, torch.Tensor]:
    tok = processor.tokenizer
    side = tok.padding_side
    tok.padding_side = "right"
    try:
        inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
    finally:
        tok.padding_side = side
    ids = inputs["input_ids"]
    labels = torch.full_like(ids, -100)
    assistant, colon = tok.convert_tokens_to_ids("ASSISTANT"), tok.convert_tokens_to_ids(":")
    starts = ((ids[:, :-3] == assistant) & (ids[:, 1:-2] == colon)).nonzero()
    for row, col in starts.tolist():
        labels[row, col + 2: col + 4] = ids[row, col + 2: col + 4]  # the answer word and </s>
    inputs["labels"] = labels
    return inputs


#: Question kinds that cannot be answered from the text alone: stage 2 opens with only these, so the LM learns to
#: read the visual tokens before it can settle into answering from priors (counts and yes/no are half right blind).
GROUNDING_KINDS = frozenset({"color_at", "shape_at", "letter"})


def image_step_batch(processor, start: int, batch: int, turns: int, rng: np.random.Generator,
                     kinds: frozenset[str] | None = None):
    samples = [syn.make_image_sample("train", 10_000_000 + start + i) for i in range(batch)]
    chosen = [[q for q in s.questions if kinds is None or q.kind in kinds] for s in samples]
    texts = [qa_text(qs[: int(rng.integers(turns // 2, turns + 1))], 1) for qs in chosen]
    return qa_batch(processor, texts, [s.image for s in samples])


def video_step_batch(processor, start: int, batch: int, turns: int, rng: np.random.Generator):
    samples = [syn.make_video_sample("train", start + i, num_frames=FRAMES) for i in range(batch)]
    texts = [qa_text(s.questions[: int(rng.integers(turns // 2, turns + 1))], len(s.frames)) for s in samples]
    return qa_batch(processor, texts, [f for s in samples for f in s.frames])


def train_stage2(model, processor, steps: int, batch: int, video_batch: int, video_every: int, video_from: float,
                 turns: int, lr: float, grounding: float, seed: int, log) -> dict:
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    model.train()
    model.model.vision_tower.eval()
    images = videos = 0
    stats: dict[str, float] = {}
    bar = tqdm(range(steps), desc="stage 2 (projector + LM)", unit="step", mininterval=5)
    for step in bar:
        use_video = step >= video_from * steps and step % video_every == 0
        if use_video:
            inputs = video_step_batch(processor, videos, video_batch, turns, rng)
            videos += video_batch
        else:
            kinds = GROUNDING_KINDS if step < grounding * steps else None
            inputs = image_step_batch(processor, images, batch, turns, rng, kinds)
            images += batch
        for group in opt.param_groups:
            group["lr"] = lr * _schedule(step, steps, max(1, steps // 25))
        loss = model(**inputs).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        key = "video_loss" if use_video else "image_loss"
        value = float(loss.detach())
        stats[key] = 0.9 * stats.get(key, value) + 0.1 * value
        bar.set_postfix({k: f"{v:.3f}" for k, v in stats.items()}, refresh=False)
        if step % 100 == 0 or step == steps - 1:
            log({"stage": 2, "step": step, "images": images, "videos": videos, **stats})
    model.eval()
    return {"images_seen": images, "videos_seen": videos, **stats}


# -- main ---------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtc.eval.default_model.train",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (save_pretrained layout)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--stage1-steps", type=int, default=1100)
    parser.add_argument("--stage1-batch", type=int, default=32)
    parser.add_argument("--stage1-lr", type=float, default=1e-3)
    parser.add_argument("--shape-only", type=float, default=0.36,
                        help="fraction of stage 1 that trains the dense shape objective alone")
    parser.add_argument("--feature-norm", type=float, default=5.0,
                        help="mean norm the visual tokens are rescaled to after stage 1 (0: leave as trained)")
    parser.add_argument("--grounding", type=float, default=0.15,
                        help="fraction of stage 2 that asks only questions the image alone can answer")
    parser.add_argument("--stage2-steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=16, help="images per stage-2 step")
    parser.add_argument("--video-batch", type=int, default=4, help="videos per stage-2 video step")
    parser.add_argument("--video-every", type=int, default=2, help="every n-th step is a video step ...")
    parser.add_argument("--video-from", type=float, default=0.3, help="... once this fraction of stage 2 is done")
    parser.add_argument("--turns", type=int, default=8, help="max questions per training sequence")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-images", type=int, default=300, help="validation images after training")
    parser.add_argument("--eval-videos", type=int, default=100, help="validation videos after training")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "training_log.jsonl"
    log_path.write_text("")
    started = time.perf_counter()

    def log(record):
        record["seconds"] = round(time.perf_counter() - started, 1)
        with log_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    model, processor = build_model(args.seed)
    torch.manual_seed(args.seed)
    s1 = train_stage1(model, processor, args.stage1_steps, args.stage1_batch, args.stage1_lr, args.shape_only, log)
    if args.feature_norm > 0:
        probe = pixel_tensor(processor, [syn.make_image_sample("train", 20_000_000 + i).image for i in range(32)])
        s1["feature_scale"] = fold_feature_scale(model.model.vision_tower, probe, args.feature_norm)
    t1 = time.perf_counter() - started
    s2 = train_stage2(model, processor, args.stage2_steps, args.batch, args.video_batch, args.video_every,
                      args.video_from, args.turns, args.lr, args.grounding, args.seed, log)
    t2 = time.perf_counter() - started - t1

    model.half().save_pretrained(out)
    processor.save_pretrained(out)
    model.float()
    from .accuracy import evaluate

    val = evaluate(model, processor, split="validation", num_images=args.eval_images, num_videos=args.eval_videos)
    settings = {k: v for k, v in vars(args).items() if k != "out"}  # no machine paths in the shipped summary
    summary = {"args": settings, "torch": torch.__version__, "threads": torch.get_num_threads(), "stage1": s1, "stage2": s2, "stage1_seconds": round(t1),
               "stage2_seconds": round(t2), "validation": val,
               "parameters": sum(p.numel() for p in model.parameters())}
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({"validation": {k: val[k] for k in ("image_accuracy", "video_accuracy")},
                      "minutes": round((time.perf_counter() - started) / 60, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
