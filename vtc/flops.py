"""FLOPs of a VLM request with a stated formula: vision tower + projector + LLM prefill at the kept length, decode.

Pure arithmetic on model dimensions (no torch, no transformers), so a number printed next to a benchmark can be
re-derived by hand from ``FORMULA``. ``vtc.integrations.transformers.flops.model_dims`` reads the dimensions off a
Hugging Face model; ``tests/test_flops.py`` checks the result against ``torch.utils.flop_counter`` on tiny models.

Only matrix multiplications are counted (a multiply-add is 2 FLOPs). Norms, activations, softmax, RoPE, residual
adds and embedding lookups are left out: they are linear in the width, the matmuls quadratic, so at real widths
(>= 1024) they stay below 1 % of the total. The compressor's own selection cost is not included either.
"""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass

__all__ = [
    "FORMULA",
    "TransformerDims",
    "VisionDims",
    "VLMDims",
    "FlopsBreakdown",
    "transformer_flops",
    "layered_flops",
    "prefill_flops",
    "decode_flops_per_token",
]

FORMULA = """\
FLOPs = matmul multiply-adds x 2. Left out: norms, activations, softmax, RoPE, residual adds, embedding
lookups (< 1 % at real widths) and the compressor's own selection cost.

One transformer layer, L query tokens attending to C keys (width h, MLP width i, H query heads,
K key/value heads, head dim d):
  projections  2*L*h*H*d (q) + 2*2*L*h*K*d (k, v) + 2*L*H*d*h (out)
  attention    2*L*C*H*d (Q.K^T) + 2*L*C*H*d (weights.V)
  MLP          3*2*L*h*i (gated: gate, up, down)  or  2*2*L*h*i (plain: fc1, fc2)
Prefill and encoder layers use C = L: the full square, as SDPA / eager attention compute it with or
without a causal mask (and as torch.utils.flop_counter counts it); a kernel that skips masked blocks
does about half the attention term. Windowed vision layers (Qwen2.5-VL) use C = min(window, N), exact
when the merged grid divides into whole windows, an upper bound when edge windows are partial; given the
token count n_w of every window (VisionDims.window_sizes) their attention term is sum_w 2*2*n_w^2*H*d, exact.

Prefill of a request with b images (V tower passes per image: AnyRes base view + crops, else 1):
  vision     = b*V*( 2*P*p*h_v             patch embedding: P patches of p = 3*patch^2*temporal inputs
                   + tower layers at L = N  N = tower tokens per pass (P + CLS if any)
                   + SigLIP pooling head     only where the HF tower runs it: 1 probe query over N keys )
  projector  = b*M*sum_j 2*in_j*out_j      M = projected tokens per image, all of them: HF runs the
                                           projector before any pruning (Qwen: every merger, deepstack too)
  llm        = LLM layers at L = C = T + K  T = text tokens, K = visual tokens kept (all images); under an
                                           LLM-side compressor (FastV, PyramidDrop, ...) layer j runs at
                                           L_j = C_j = T + K_j, the visual tokens layer j holds
  lm_head    = 2*h*vocab                   one position: generate computes only the last logits at prefill
  prefill    = vision + projector + llm + lm_head
Decode, per generated token: LLM layers at L = 1, C = context (cached keys + the new token) + 2*h*vocab.
"""


def _count(name: str, value, minimum: int = 0, fix: str = "") -> int:
    """``value`` as a plain int >= ``minimum``, or a ValueError naming the argument and how to fix it."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int >= {minimum}, got the bool {value!r}. {fix}".rstrip())
    try:
        result = operator.index(value)
    except TypeError:
        raise ValueError(
            f"{name} must be an int >= {minimum}, got {value!r} of type {type(value).__name__}. "
            f"Pass a whole number of tokens/units, e.g. int(...). {fix}".rstrip()
        ) from None
    if result < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {result}. {fix}".rstrip())
    return int(result)


@dataclass(frozen=True)
class TransformerDims:
    """Shape of a stack of identical pre-norm transformer layers (what the FLOPs depend on, nothing else)."""

    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    gated_mlp: bool

    def __post_init__(self):
        for name in ("num_layers", "hidden", "intermediate", "num_heads", "num_kv_heads", "head_dim"):
            object.__setattr__(self, name, _count(f"TransformerDims.{name}", getattr(self, name), 1))
        if not isinstance(self.gated_mlp, bool):
            raise ValueError(
                f"TransformerDims.gated_mlp must be True (gate/up/down MLP) or False (fc1/fc2), got {self.gated_mlp!r}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"TransformerDims.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}); use num_kv_heads = num_heads for plain multi-head attention"
            )


@dataclass(frozen=True)
class VisionDims:
    """A vision tower: its layers and the sequence one pass runs on.

    ``tokens_per_image`` is the sequence length of one tower pass including ``cls_tokens`` (CLIP: 1), which have
    no patch-embedding cost. ``window`` (tokens per attention window) makes every layer not listed in
    ``full_attention_layers`` windowed (Qwen2.5-VL); ``None`` means full attention everywhere. ``views`` is the
    number of tower passes per image (LLaVA-NeXT / OneVision AnyRes: base view + crops). ``window_sizes`` (with
    ``window``) gives the token count of every window of one pass, summing to ``tokens_per_image``, so partial edge
    windows are counted exactly instead of as ``min(window, N)`` keys per token. ``attention_pool_head``
    adds SigLIP's pooling head (one probe query over all tokens, then an MLP on it), which HF runs whenever the
    config enables it even though the VLM discards its output.
    """

    transformer: TransformerDims
    tokens_per_image: int
    patch_embed_in: int
    window: int | None = None
    full_attention_layers: tuple[int, ...] | None = None
    cls_tokens: int = 0
    views: int = 1
    attention_pool_head: bool = False
    window_sizes: tuple[int, ...] | None = None

    def __post_init__(self):
        if not isinstance(self.transformer, TransformerDims):
            raise ValueError(f"VisionDims.transformer must be a TransformerDims, got {type(self.transformer).__name__}")
        object.__setattr__(self, "tokens_per_image", _count("VisionDims.tokens_per_image", self.tokens_per_image, 1))
        object.__setattr__(self, "patch_embed_in", _count("VisionDims.patch_embed_in", self.patch_embed_in, 1,
                                                          "It is channels * patch * patch * temporal_patch."))
        object.__setattr__(self, "cls_tokens", _count("VisionDims.cls_tokens", self.cls_tokens, 0))
        object.__setattr__(self, "views", _count("VisionDims.views", self.views, 1))
        if self.cls_tokens >= self.tokens_per_image:
            raise ValueError(
                f"VisionDims.cls_tokens ({self.cls_tokens}) must be below tokens_per_image ({self.tokens_per_image}),"
                " which counts the patches plus the CLS tokens"
            )
        if self.window is not None:
            object.__setattr__(self, "window", _count("VisionDims.window", self.window, 1,
                                                      "Use None for full attention in every layer."))
        if self.full_attention_layers is not None:
            layers = tuple(
                _count("VisionDims.full_attention_layers[]", i, 0) for i in self.full_attention_layers
            )
            bad = [i for i in layers if i >= self.transformer.num_layers]
            if bad:
                raise ValueError(
                    f"VisionDims.full_attention_layers {bad} are out of range for a tower of "
                    f"{self.transformer.num_layers} layers (indices start at 0)"
                )
            object.__setattr__(self, "full_attention_layers", layers)
        if self.window_sizes is not None:
            if self.window is None:
                raise ValueError("VisionDims.window_sizes needs window (the full window's token count) set too")
            try:
                sizes = tuple(self.window_sizes)
            except TypeError:
                raise ValueError(
                    f"VisionDims.window_sizes must be a sequence of ints, got {self.window_sizes!r}"
                ) from None
            sizes = tuple(_count("VisionDims.window_sizes[]", n, 1) for n in sizes)
            if sum(sizes) != self.tokens_per_image:
                raise ValueError(
                    f"VisionDims.window_sizes {sizes} sum to {sum(sizes)}, but every token of a pass is in exactly one "
                    f"window: they must sum to tokens_per_image ({self.tokens_per_image})"
                )
            object.__setattr__(self, "window_sizes", sizes)
        if not isinstance(self.attention_pool_head, bool):
            raise ValueError(f"VisionDims.attention_pool_head must be True or False, got {self.attention_pool_head!r}")


@dataclass(frozen=True)
class VLMDims:
    """A VLM: vision tower, projector (``(in, out)`` linear layers, each applied to every one of the
    ``projector_tokens_per_image`` projected tokens of an image, all views included), LLM and vocabulary."""

    vision: VisionDims
    projector: tuple[tuple[int, int], ...]
    projector_tokens_per_image: int
    llm: TransformerDims
    vocab_size: int

    def __post_init__(self):
        if not isinstance(self.vision, VisionDims):
            raise ValueError(f"VLMDims.vision must be a VisionDims, got {type(self.vision).__name__}")
        if not isinstance(self.llm, TransformerDims):
            raise ValueError(f"VLMDims.llm must be a TransformerDims, got {type(self.llm).__name__}")
        try:
            layers = tuple((a, b) for a, b in self.projector)
        except (TypeError, ValueError):
            raise ValueError(
                f"VLMDims.projector must be a sequence of (in_features, out_features) pairs, got {self.projector!r}"
            ) from None
        layers = tuple(
            (_count("VLMDims.projector in_features", a, 1), _count("VLMDims.projector out_features", b, 1))
            for a, b in layers
        )
        object.__setattr__(self, "projector", layers)
        object.__setattr__(self, "projector_tokens_per_image",
                           _count("VLMDims.projector_tokens_per_image", self.projector_tokens_per_image, 0))
        object.__setattr__(self, "vocab_size", _count("VLMDims.vocab_size", self.vocab_size, 1))


@dataclass(frozen=True)
class FlopsBreakdown:
    """FLOPs of one prefill, by part (ints; see ``FORMULA``)."""

    vision: int
    projector: int
    llm: int
    lm_head: int

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.llm + self.lm_head

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def _layer_flops(dims: TransformerDims, tokens: int, context: int) -> int:
    """One layer, ``tokens`` queries attending to ``context`` keys (the per-layer terms of ``FORMULA``)."""
    h, q_width, kv_width = dims.hidden, dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim
    projections = 2 * tokens * h * q_width + 2 * 2 * tokens * h * kv_width + 2 * tokens * q_width * h
    attention = 2 * 2 * tokens * context * q_width
    mlp = (3 if dims.gated_mlp else 2) * 2 * tokens * h * dims.intermediate
    return projections + attention + mlp


def transformer_flops(dims: TransformerDims, new_tokens: int, context: int | None = None) -> int:
    """FLOPs of ``new_tokens`` query tokens through every layer, each attending to ``context`` keys.

    ``context`` defaults to ``new_tokens``: the full L x L score matrix, which is what SDPA's math path and eager
    attention compute under a causal mask (and what ``torch.utils.flop_counter`` reports); FlashAttention-style
    kernels skip masked blocks and do about half the attention term. Matmuls only (see the module docstring).
    """
    if not isinstance(dims, TransformerDims):
        raise ValueError(f"dims must be a TransformerDims, got {type(dims).__name__}")
    new_tokens = _count("new_tokens", new_tokens, 0)
    context = new_tokens if context is None else _count(
        "context", context, 0, "It is the number of keys each query attends to (cached tokens + new ones)."
    )
    return dims.num_layers * _layer_flops(dims, new_tokens, context)


def layered_flops(dims: TransformerDims, lengths) -> int:
    """Prefill FLOPs of an LLM whose layer ``j`` runs on ``lengths[j]`` tokens (each attending to all of them):
    the per-layer lengths an LLM-side compressor leaves (``vtc.integrations.transformers.flops.llm_layer_lengths``).
    Equals ``transformer_flops(dims, n)`` when every entry is ``n``."""
    if not isinstance(dims, TransformerDims):
        raise ValueError(f"dims must be a TransformerDims, got {type(dims).__name__}")
    lengths = [_count(f"lengths[{j}]", n, 0) for j, n in enumerate(lengths)]
    if len(lengths) != dims.num_layers:
        raise ValueError(f"lengths has {len(lengths)} entries for an LLM of {dims.num_layers} layers; give one per "
                         "layer")
    return sum(_layer_flops(dims, n, n) for n in lengths)


def _tower_pass_flops(vision: VisionDims) -> int:
    """One tower pass (one view of one image): patch embedding, layers (windowed where set), pooling head."""
    t, n = vision.transformer, vision.tokens_per_image
    flops = 2 * (n - vision.cls_tokens) * vision.patch_embed_in * t.hidden
    full = set(vision.full_attention_layers or ())
    for layer in range(t.num_layers):
        windowed = vision.window is not None and layer not in full
        if windowed and vision.window_sizes is not None:  # exact: each window's tokens attend within it
            flops += _layer_flops(t, n, 0) + 2 * 2 * sum(w * w for w in vision.window_sizes) * t.num_heads * t.head_dim
        else:
            flops += _layer_flops(t, n, min(vision.window, n) if windowed else n)
    if vision.attention_pool_head:
        h, width = t.hidden, t.num_heads * t.head_dim
        # nn.MultiheadAttention: q projection of the probe, k/v projections of all n tokens, one query's scores
        # and weighted sum, out projection, then the MLP on the single pooled token
        flops += 2 * h * h + 2 * 2 * n * h * h + 2 * 2 * n * width + 2 * h * h + 2 * 2 * h * t.intermediate
    return flops


def prefill_flops(vlm: VLMDims, text_tokens: int, visual_tokens_kept: int, images: int = 1) -> FlopsBreakdown:
    """FLOPs of the prefill of one request (``FORMULA``): ``images`` images encoded in full, the LLM run on
    ``text_tokens + visual_tokens_kept`` tokens.

    ``text_tokens`` counts every non-visual position of the sequence (template, question, padding);
    ``visual_tokens_kept`` is the total over all images of the visual tokens that reach the LLM (after pruning;
    on AnyRes models including image_newline tokens). The vision tower and projector always run on every token:
    pruning happens after them. The LM head is counted for one position, as ``generate`` computes only the last
    position's logits at prefill (a plain ``forward`` without ``logits_to_keep=1`` computes all of them).
    """
    if not isinstance(vlm, VLMDims):
        raise ValueError(f"vlm must be a VLMDims (e.g. from vtc.integrations.transformers.flops.model_dims), "
                         f"got {type(vlm).__name__}")
    text_tokens = _count("text_tokens", text_tokens, 0)
    visual_tokens_kept = _count("visual_tokens_kept", visual_tokens_kept, 0,
                                "It is the total over all images of the visual tokens the LLM sees.")
    images = _count("images", images, 0)
    if images == 0 and visual_tokens_kept:
        raise ValueError(
            f"visual_tokens_kept={visual_tokens_kept} with images=0: pass the number of images the request encodes"
        )
    vision = images * vlm.vision.views * _tower_pass_flops(vlm.vision)
    projector = images * vlm.projector_tokens_per_image * sum(2 * a * b for a, b in vlm.projector)
    llm = transformer_flops(vlm.llm, text_tokens + visual_tokens_kept)
    lm_head = 2 * vlm.llm.hidden * vlm.vocab_size
    return FlopsBreakdown(vision=vision, projector=projector, llm=llm, lm_head=lm_head)


def decode_flops_per_token(vlm: VLMDims, context_len: int) -> int:
    """FLOPs of one decode step: one token through the LLM attending to ``context_len`` keys, plus the LM head.

    ``context_len`` counts the KV cache plus the new token: prefill length + tokens fed back so far, this one
    included. A whole generation of ``n`` tokens after a prefill of ``P`` costs the prefill plus this at
    ``context_len = P + 1 .. P + n - 1`` (the first token comes from the prefill's logits).
    """
    if not isinstance(vlm, VLMDims):
        raise ValueError(f"vlm must be a VLMDims, got {type(vlm).__name__}")
    context_len = _count("context_len", context_len, 1,
                         "It is the prefill length plus the tokens decoded so far, the new one included.")
    return transformer_flops(vlm.llm, 1, context_len) + 2 * vlm.llm.hidden * vlm.vocab_size
