"""Prefill speedup of vtc on a LLaVA-1.5-shaped model, next to the ideal speedup of a zero-overhead pruner.

Why: dropping visual tokens before the LLM only pays if what vtc does to get there -- capturing the attention signal
inside the vision tower, selecting, shortening the prompt and splicing the kept features back -- costs little next
to what the shorter prompt saves. The yardstick is the same LLM on a prompt that simply *is* shorter: no capture,
no selection, no re-packing. Target: measured prefill speedup >= 0.9 x that ideal speedup at 64 / 128 / 192 of
LLaVA-1.5's 576 visual tokens.

What: a real ``transformers.LlavaForConditionalGeneration`` built from its config with random weights (seeded), SDPA
attention, eval mode: the vision tower of CLIP ViT-L/14-336 (width 1024, MLP 4096, 24 layers, 16 heads, 336 px,
patch 14, quick_gelu; ``vision_feature_layer=-2``, ``"default"`` strategy -> 24 x 24 = 576 visual tokens), LLaVA's
2-layer GELU projector, and a Llama LLM of LLaVA-1.5-7B's width (4096, MLP 11008, 32 heads, 32,064-token vocabulary
with ``<image>`` = 32000 and ``<pad>`` = 32001 as in llava-hf/llava-1.5-7b-hf) but only ``--llm-layers`` layers
(default 4; the 7B has 32). The prompt is laid out like LLaVA-1.5's: ``--text-before`` text tokens (BOS first), the
576 ``<image>`` placeholders, ``--text-after`` text tokens (random ids; 5 + 35 = 40 text tokens by default), one
random 1 x 3 x 336 x 336 image. The ``--vision-*`` / ``--llm-*`` / ``--image-size`` / ``--vocab`` flags shrink the
model (the unit test builds a tiny one); with the defaults it is ~1.4 B parameters at 4 LLM layers (~5.6 GB fp32).

Variants, all timed in the same run; a *prefill* is one forward pass (no generate loop) under
``torch.inference_mode()`` with ``use_cache=True`` and ``logits_to_keep=1``, as ``generate``'s first step runs it:

  full      the unwrapped model on the full prompt: tower + projector + LLM over text + 576 tokens
  vtc@k     ``vtc.apply(model, --compressor, budget=k)``, the same forward on the same full prompt and pixels
            (vtc's wrapped forward encodes the image with its capture hooks, selects k tokens and hands the LLM a
            prompt of text + k), then ``vtc.remove``; apply and remove are inside the timed call
  ideal@k   no compressor: the same tower call (``model.model.get_image_features``, as the model runs it) plus the
            same LLM (``model.model.language_model`` + ``lm_head`` on the last position) on a hand-built
            ``inputs_embeds`` of length text + k: the real text embeddings around the first k projected image
            features. This is what a pruner with zero overhead would cost.
  tower     ``model.model.get_image_features`` alone (tower + projector)
  llm@N     the LLM + head alone on the hand-built full-length prompt (text + N = 576 image features, computed
            once beforehand): with few LLM layers the tower weighs a lot, and these two say how much

Per k: measured speedup = t(full) / t(vtc@k), ideal speedup = t(full) / t(ideal@k), and their ratio
(= t(ideal@k) / t(vtc@k)) against the 0.9 target; vtc's overhead t(vtc@k) - t(ideal@k). All figures are measured
in this run on this model; nothing is extrapolated to other depths.

Checks (once, untimed, in the first warm-up round, which always runs): a forward pre-hook on the language model
records the length of every variant's LLM input, which must be text + 576 for full / llm, and text + k for vtc@k and
ideal@k; full's logits are compared with llm@N's (the hand-built prompt reproduces the model's own splice), and
each vtc@k's logits with the LLM on the hand-built prompt holding vtc's kept tokens (vtc runs exactly that LLM).

Time: after the warm-up rounds, each round times every variant once, in a rotating order; median, min and max over
rounds are reported. On CPU it also reports the share of CPU the process got while timing (other work on the machine
skews CPU timings). No assertions -- it prints figures (and ``--json`` writes them).

    python -m vtc.eval.bench.prefill [--device cpu] [--dtype float32] [--llm-layers 4] [--budgets 64,128,192]
        [--compressor fastervlm] [--rounds 5] [--warmup 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from vtc.eval.bench.common import (
    CpuShare, describe_device, environment, finish, rotating_rounds, run_summary, time_once, write_report,
)

TARGET_RATIO = 0.9
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BOS_ID, EOS_ID = 1, 2
#: ids at the end of the vocabulary that LLaVA-1.5's tokenizer adds (<image> = vocab - 64 = 32000, <pad> = 32001)
ADDED_IDS = 64


@dataclass(frozen=True)
class Shape:
    """The model's shape. Defaults: LLaVA-1.5-7B (CLIP ViT-L/14-336 + Vicuna-7B width), ``llm_layers`` layers."""

    vision_width: int = 1024
    vision_mlp: int = 4096
    vision_layers: int = 24
    vision_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    llm_width: int = 4096
    llm_mlp: int = 11008
    llm_layers: int = 4
    llm_heads: int = 32
    vocab_size: int = 32064

    @property
    def image_tokens(self) -> int:
        """Visual tokens per image under the ``"default"`` strategy (CLS dropped): the patch grid."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def image_token_id(self) -> int:
        return self.vocab_size - ADDED_IDS

    @property
    def pad_token_id(self) -> int:
        return self.vocab_size - ADDED_IDS + 1


def build_model(shape: Shape, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """``LlavaForConditionalGeneration`` of ``shape`` with seeded random weights, eval mode, SDPA attention."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=shape.vision_width,
        intermediate_size=shape.vision_mlp,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        hidden_size=shape.llm_width,
        intermediate_size=shape.llm_mlp,
        num_hidden_layers=shape.llm_layers,
        num_attention_heads=shape.llm_heads,
        num_key_value_heads=shape.llm_heads,  # Vicuna-7B: multi-head attention, no GQA
        vocab_size=shape.vocab_size,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        pad_token_id=shape.pad_token_id,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=shape.image_token_id,
        image_seq_length=shape.image_tokens,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    with torch.device(device):  # random init where the model runs: a 7B-shaped model in seconds on a GPU
        model = LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation("sdpa")
    return model.to(dtype=dtype)


@dataclass
class Prompt:
    input_ids: torch.Tensor  # [1, before + image tokens + after]
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor  # [1, 3, S, S]
    before: torch.Tensor  # [1, before] text ids before the image (BOS first)
    after: torch.Tensor  # [1, after] text ids after it

    @property
    def text_tokens(self) -> int:
        return self.before.shape[1] + self.after.shape[1]


def build_prompt(shape: Shape, text_before: int, text_after: int, seed: int, device: str,
                 dtype: torch.dtype) -> Prompt:
    """LLaVA-1.5's layout: text, the image's placeholders, text; random text ids (no added ids), random pixels."""
    gen = torch.Generator().manual_seed(seed)
    before = torch.cat([torch.tensor([BOS_ID]), torch.randint(3, shape.image_token_id, (text_before - 1,),
                                                               generator=gen)])
    after = torch.randint(3, shape.image_token_id, (text_after,), generator=gen)
    image = torch.full((shape.image_tokens,), shape.image_token_id)
    input_ids = torch.cat([before, image, after])[None]
    pixels = torch.randn(1, 3, shape.image_size, shape.image_size, generator=gen)
    return Prompt(
        input_ids=input_ids.to(device),
        attention_mask=torch.ones_like(input_ids).to(device),
        pixel_values=pixels.to(device=device, dtype=dtype),
        before=before[None].to(device),
        after=after[None].to(device),
    )


# ------------------------------------------------------------------------------------------------------ variants
@dataclass
class Variant:
    name: str
    run: object  # () -> logits or the model's output
    description: str
    visual_tokens: int | None  # image features the LLM gets (None: the LLM is not run)
    selections: list = field(default_factory=list)  # vtc@k: vtc.last_selection of the last call


def make_variants(model, prompt: Prompt, budgets: list[int], compressor: str):
    """``(variants, features, llm)``: the variants by name, the full image features ``[N, D]`` that ``llm@N`` and
    the checks use (computed once here), and ``llm(visual)``, the LLM + head on text around ``visual``."""
    import vtc

    lm, head, embed = model.model.language_model, model.lm_head, model.get_input_embeddings()
    ids, mask, pixels = prompt.input_ids, prompt.attention_mask, prompt.pixel_values
    text = prompt.text_tokens
    features = model.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output[0]
    image_tokens = features.shape[0]
    masks = {n: torch.ones(1, text + n, dtype=mask.dtype, device=mask.device) for n in budgets + [image_tokens]}

    def llm(visual: torch.Tensor):
        """The LLM + head on text embeddings around ``visual`` ([n, D]), as LlavaModel splices them."""
        embeds = torch.cat([embed(prompt.before), visual[None].to(model.dtype), embed(prompt.after)], dim=1)
        out = lm(inputs_embeds=embeds, attention_mask=masks.get(visual.shape[0]), use_cache=True)
        return head(out.last_hidden_state[:, -1:])

    def full():
        return model(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_cache=True, logits_to_keep=1)

    def tower():
        return model.model.get_image_features(pixel_values=pixels, return_dict=True)

    def llm_only():
        return llm(features)

    variants = {
        "full": Variant("full", full, f"unwrapped model, text {text} + {image_tokens} image tokens", image_tokens),
        "tower": Variant("tower", tower, "model.model.get_image_features (tower + projector)", None),
        f"llm@{image_tokens}": Variant(f"llm@{image_tokens}", llm_only,
                                       f"LLM + head on a hand-built text {text} + {image_tokens} prompt",
                                       image_tokens),
    }

    def compressed(k: int, variant: Variant):
        def run():
            vtc.apply(model, compressor, budget=k)
            try:
                out = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_cache=True,
                            logits_to_keep=1)
                variant.selections = vtc.last_selection(model)
            finally:
                vtc.remove(model)
            return out

        return run

    def ideal(k: int):
        def run():
            image = model.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output[0]
            return llm(image[:k])

        return run

    for k in budgets:
        v = Variant(f"vtc@{k}", None, f"vtc.apply({compressor!r}, budget={k}) + full forward + vtc.remove", k)
        v.run = compressed(k, v)
        variants[v.name] = v
        variants[f"ideal@{k}"] = Variant(f"ideal@{k}", ideal(k),
                                         f"get_image_features + LLM + head on text {text} + first {k} features", k)
    return variants, features, llm


def _logits(out) -> torch.Tensor:
    return (out if isinstance(out, torch.Tensor) else out.logits)[:, -1].float()


def check_pass(model, variants: dict, names: list[str], features: torch.Tensor, llm) -> dict:
    """One untimed call of every variant with a pre-hook on the language model recording its input length; logits
    of ``full`` vs ``llm@N`` and of each ``vtc@k`` vs the LLM on vtc's own kept tokens."""
    seen: list[int] = []

    def hook(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = kwargs.get("input_ids", args[0] if args else None)
        seen.append(int(embeds.shape[1]))

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    lengths, logits = {}, {}
    try:
        for name in names:
            seen.clear()
            out = variants[name].run()
            lengths[name] = seen[-1] if seen else None
            if variants[name].visual_tokens is not None:
                logits[name] = _logits(out)
            del out
    finally:
        handle.remove()
    image_tokens = features.shape[0]
    diffs = {"full_vs_llm": (logits["full"] - logits[f"llm@{image_tokens}"]).abs().max().item()}
    kept_counts = {}
    for name, v in variants.items():
        if not name.startswith("vtc@"):
            continue
        sel = v.selections[0].selection
        kept = features[sel.indices.to(features.device)] if sel.features is None else sel.features
        kept_counts[name] = int(kept.shape[0])
        diffs[name] = (logits[name] - _logits(llm(kept))).abs().max().item()
    return {"llm_tokens": lengths, "max_abs_diff": diffs, "kept": kept_counts}


# ------------------------------------------------------------------------------------------------------ report
def _parse_budgets(text: str) -> list[int]:
    return list(dict.fromkeys(int(part) for part in text.split(",") if part.strip()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtc.eval.bench.prefill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--budgets", default="64,128,192", help="comma-separated visual tokens kept (of 576)")
    parser.add_argument("--compressor", default="fastervlm", help="vtc compressor (registry name)")
    parser.add_argument("--rounds", "--repeats", dest="rounds", type=int, default=5,
                        help="timed rounds; each times every variant once")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed rounds first (at least 1 is always run: it checks the LLM's input lengths)")
    parser.add_argument("--text-before", type=int, default=5, help="text tokens before the image, BOS included")
    parser.add_argument("--text-after", type=int, default=35, help="text tokens after the image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    shape_args = parser.add_argument_group("model shape (defaults: LLaVA-1.5-7B with --llm-layers layers)")
    default = Shape()
    shape_args.add_argument("--llm-layers", type=int, default=default.llm_layers,
                            help=f"LLM layers (default {default.llm_layers}; LLaVA-1.5-7B has 32)")
    for flag, attr in (("--llm-width", "llm_width"), ("--llm-mlp", "llm_mlp"), ("--llm-heads", "llm_heads"),
                       ("--vocab", "vocab_size"), ("--vision-width", "vision_width"),
                       ("--vision-mlp", "vision_mlp"), ("--vision-layers", "vision_layers"),
                       ("--vision-heads", "vision_heads"), ("--image-size", "image_size"),
                       ("--patch-size", "patch_size")):
        shape_args.add_argument(flag, dest=attr, type=int, default=getattr(default, attr),
                                help=f"default {getattr(default, attr)}")
    args = parser.parse_args(argv)
    shape = Shape(**{name: getattr(args, name) for name in asdict(default)})
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be >= 1, --warmup >= 0")
    if args.text_before < 1 or args.text_after < 0:
        parser.error("--text-before must be >= 1 (it holds BOS), --text-after >= 0")
    if min(asdict(shape).values()) < 1 or shape.image_size % shape.patch_size:
        parser.error("model shape values must be >= 1 and --image-size a multiple of --patch-size")
    if shape.vocab_size < ADDED_IDS + 4:
        parser.error(f"--vocab must be >= {ADDED_IDS + 4} (the last {ADDED_IDS} ids are LLaVA's added tokens)")
    if shape.vision_layers < 2:
        parser.error("--vision-layers must be >= 2 (LLaVA reads the second-to-last layer)")
    try:
        budgets = _parse_budgets(args.budgets)
    except ValueError:
        parser.error(f"--budgets must be comma-separated integers, got {args.budgets!r}")
    if not budgets or not all(0 < k < shape.image_tokens for k in budgets):
        parser.error(f"--budgets must be in 1..{shape.image_tokens - 1} (the image has {shape.image_tokens} tokens)")

    wall_start = time.perf_counter()
    dtype = DTYPES[args.dtype]
    model = build_model(shape, args.device, dtype, args.seed)
    build_s = time.perf_counter() - wall_start
    parameters = sum(p.numel() for p in model.parameters())
    prompt = build_prompt(shape, args.text_before, args.text_after, args.seed, args.device, dtype)
    text, image_tokens = prompt.text_tokens, shape.image_tokens

    device_name = describe_device(args.device)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device_name}, dtype {args.dtype}")
    print(f"LlavaForConditionalGeneration (random weights, seed {args.seed}, {parameters / 1e9:.2f} B parameters, "
          f"built in {build_s:.1f} s), attn_implementation={model.config.text_config._attn_implementation}")
    print(f"  vision: CLIP width {shape.vision_width}, MLP {shape.vision_mlp}, {shape.vision_layers} layers, "
          f"{shape.vision_heads} heads, {shape.image_size} px / patch {shape.patch_size}, feature layer -2, "
          f"'default' strategy -> {image_tokens} tokens")
    layers = f"{shape.llm_layers} layer{'s' if shape.llm_layers != 1 else ''}"
    print(f"  LLM: Llama width {shape.llm_width}, MLP {shape.llm_mlp}, {layers}, "
          f"{shape.llm_heads} heads, vocab {shape.vocab_size}")
    print(f"prompt: {args.text_before} text + {image_tokens} <image> + {args.text_after} text = "
          f"{prompt.input_ids.shape[1]} tokens; budgets {budgets} with {args.compressor}; "
          f"prefill = one forward, use_cache=True, logits_to_keep=1; "
          f"warm-up {max(1, args.warmup)}, {args.rounds} rounds", flush=True)

    times: dict[str, list[float]] = {}
    with torch.inference_mode():
        variants, features, llm = make_variants(model, prompt, budgets, args.compressor)
        names = list(variants)
        times = {name: [] for name in names}
        check = check_pass(model, variants, names, features, llm)  # the first warm-up round
        for _ in range(max(0, args.warmup - 1)):
            for name in names:
                time_once(variants[name].run, args.device)
        with CpuShare() as cpu:
            rotating_rounds({name: variants[name].run for name in names}, args.rounds, args.device, times, log=True)
        share = cpu.share

    expected = {name: (text + v.visual_tokens if v.visual_tokens is not None else None)
                for name, v in variants.items()}
    print()
    print("LLM input length (checked once, untimed, by a forward pre-hook on the language model):")
    lengths_ok = True
    for name in names:
        got, want = check["llm_tokens"][name], expected[name]
        if want is None:
            print(f"  {name:<10} LLM not run" + ("" if got is None else f" -- but it saw {got} tokens"))
            lengths_ok &= got is None
            continue
        ok = got == want
        lengths_ok &= ok
        verdict = "" if ok else f"  MISMATCH: expected {want}"
        print(f"  {name:<10} {got} tokens (text {text} + {want - text} visual){verdict}")

    medians = {name: statistics.median(values) for name, values in times.items()}
    lows = {name: min(values) for name, values in times.items()}
    base, low = medians["full"], lows["full"]
    print()
    print(f"{'variant':<10} {'LLM tokens':>10} {'median ms':>10} {'x full':>7} {'min ms':>9} {'max ms':>9}  what")
    for name in names:
        v = variants[name]
        tokens = check["llm_tokens"][name]
        print(f"{name:<10} {'-' if tokens is None else tokens:>10} {medians[name]:>10.1f} "
              f"{medians[name] / base:>7.3f} {lows[name]:>9.1f} {max(times[name]):>9.1f}  {v.description}")

    llm_name = f"llm@{image_tokens}"
    parts = {
        "tower_ms": medians["tower"],
        "llm_ms": medians[llm_name],
        "tower_share": medians["tower"] / base,
        "llm_share": medians[llm_name] / base,
    }
    print()
    print(f"full prefill {base:.1f} ms: tower + projector {parts['tower_ms']:.1f} ms ({parts['tower_share']:.0%}), "
          f"LLM + head on {text + image_tokens} tokens {parts['llm_ms']:.1f} ms ({parts['llm_share']:.0%}) "
          f"-- with {layers} in the LLM (measured here)")

    speedups = {}
    print()
    print(f"{'budget':>8} {'LLM tokens':>10} {'measured':>9} {'ideal':>7} {'ratio':>6} {'ratio(min)':>10} "
          f"{'overhead ms':>12}  target >= {TARGET_RATIO:.2f} x ideal")
    for k in budgets:
        vtc_name, ideal_name = f"vtc@{k}", f"ideal@{k}"
        measured, ideal = base / medians[vtc_name], base / medians[ideal_name]
        ratio = measured / ideal
        min_ratio = (low / lows[vtc_name]) / (low / lows[ideal_name])
        tokens = check["llm_tokens"][vtc_name]
        speedups[str(k)] = {
            "kept": check["kept"][vtc_name],
            "llm_tokens": tokens,
            "llm_tokens_ok": tokens == text + k,
            "measured_speedup": measured,
            "ideal_speedup": ideal,
            "ratio": ratio,
            "within_target": ratio >= TARGET_RATIO,
            "overhead_ms": medians[vtc_name] - medians[ideal_name],
            "min_measured_speedup": low / lows[vtc_name],
            "min_ideal_speedup": low / lows[ideal_name],
            "min_ratio": min_ratio,
        }
        s = speedups[str(k)]
        print(f"{f'{k}/{image_tokens}':>8} {tokens:>10} {measured:>8.2f}x {ideal:>6.2f}x {ratio:>6.3f} "
              f"{min_ratio:>10.3f} {s['overhead_ms']:>12.1f}  {'within' if s['within_target'] else 'BELOW'} target")
    print()
    diffs = check["max_abs_diff"]
    print(f"sanity: max |logit diff| full vs {llm_name} (hand-built prompt): {diffs['full_vs_llm']:.2e}; "
          + ", ".join(f"{name} vs the LLM on its kept tokens: {diffs[name]:.2e}" for name in diffs
                      if name.startswith("vtc@")))
    print(f"sanity: LLM input lengths {'as expected' if lengths_ok else 'NOT as expected (see above)'}")
    wall = finish(args.device, share, wall_start)

    if args.json:
        report = {
            **environment(device_name),
            "dtype": args.dtype,
            "seed": args.seed,
            "warmup": max(1, args.warmup),
            "rounds": args.rounds,
            "compressor": args.compressor,
            "budgets": budgets,
            "target_ratio": TARGET_RATIO,
            "model": {
                "class": type(model).__name__,
                "attn_implementation": model.config.text_config._attn_implementation,
                "parameters": parameters,
                "build_s": build_s,
                "shape": asdict(shape),
                "vision_feature_layer": model.config.vision_feature_layer,
                "vision_feature_select_strategy": model.config.vision_feature_select_strategy,
                "image_token_id": shape.image_token_id,
            },
            "prompt": {
                "text_before": args.text_before,
                "text_after": args.text_after,
                "text_tokens": text,
                "image_tokens": image_tokens,
                "sequence_length": int(prompt.input_ids.shape[1]),
            },
            "variants": {
                name: {
                    "description": variants[name].description,
                    "visual_tokens": variants[name].visual_tokens,
                    "llm_tokens": check["llm_tokens"][name],
                    "expected_llm_tokens": expected[name],
                    "median_ms": medians[name],
                    "ratio_to_full": medians[name] / base,
                    "min_ms": lows[name],
                    "max_ms": max(times[name]),
                    "times_ms": times[name],
                }
                for name in names
            },
            "speedups": speedups,
            "parts": parts,
            "sanity": {"llm_lengths_ok": lengths_ok, "max_abs_logit_diff": diffs},
            **run_summary(args.device, share, wall),
        }
        write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
