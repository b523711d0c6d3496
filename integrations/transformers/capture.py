"""Signal capture with hooks on exactly the declared layers; the attention implementation is never touched.

* CLIP / SigLIP-style layers (``self_attn.q_proj`` / ``k_proj``): forward hooks on the two projections. When a
  layer only has to give CLS attention or CLS logits, only the CLS query row is kept (O(N) instead of O(N^2)).
* Qwen ViT blocks (fused ``qkv``, 2-D RoPE, window attention): a forward pre-hook on ``blocks[l].attn`` sees the
  normed hidden states, ``cu_seqlens`` and the rotary tables, recomputes q/k exactly as the block does, and scores
  every ``cu_seqlens`` span separately (windows for windowed blocks, images for full ones).

Statistics are computed inside the hook, in fp32, and only the per-token results are kept; the hooks are removed
when the context exits, so nothing outlives the call.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Sequence

import torch
from torch import nn

from vtc.kernels import cls_attention_row, cls_logits_row, received_attention
from vtc.signals import Signal, SignalKind


def _by_layer(signals: Sequence[Signal]) -> dict[int, set[SignalKind]]:
    grouped: dict[int, set[SignalKind]] = defaultdict(set)
    for signal in signals:
        grouped[signal.layer].add(signal.kind)
    return grouped


class _HookSet:
    """Context manager owning some hooks and the per-call results."""

    def __init__(self):
        self.handles: list = []
        self.results: dict[Signal, torch.Tensor] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        return False


class ProjectionCapture(_HookSet):
    """CLIP/SigLIP: hooks on ``q_proj``/``k_proj`` of the declared layers.

    Results are batched over the tower's batch (one row per image/view): ``[B, S]`` for attention signals,
    ``[B, S, head_dim]`` for keys, over the tower's full sequence (CLS included where there is one).
    """

    def __init__(self, layers: nn.ModuleList, signals: Sequence[Signal], num_heads: int, cls_index: int | None = 0):
        super().__init__()
        self.layers, self.num_heads, self.cls_index = layers, num_heads, cls_index
        self.wanted = _by_layer(signals)
        if cls_index is None:
            needs_cls = sorted({str(Signal(k, layer)) for layer, kinds in self.wanted.items() for k in kinds
                                if k in (SignalKind.CLS_ATTENTION, SignalKind.CLS_LOGITS)})
            if needs_cls:
                raise ValueError(
                    f"signals {needs_cls} need a CLS token, which this vision tower does not have; compressors fall "
                    "back to received attention via TowerInfo.attention_signal"
                )

    def __enter__(self):
        cls_kinds = {SignalKind.CLS_ATTENTION, SignalKind.CLS_LOGITS}
        for layer, kinds in self.wanted.items():
            attn = self.layers[layer].self_attn
            query_kinds = kinds & (cls_kinds | {SignalKind.RECEIVED_ATTENTION})
            needs_q = bool(query_kinds)
            cls_only = bool(query_kinds) and query_kinds <= cls_kinds
            store: dict[str, torch.Tensor] = {}
            if needs_q:
                self.handles.append(attn.q_proj.register_forward_hook(self._keep_query(store, cls_only)))
            self.handles.append(attn.k_proj.register_forward_hook(self._score(layer, kinds, store)))
        return self

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, D] -> [B, H, S, d]
        b, s, _ = x.shape
        return x.reshape(b, s, self.num_heads, -1).transpose(1, 2)

    def _keep_query(self, store: dict, cls_only: bool) -> Callable:
        def hook(module, args, output):
            q = output.detach()
            store["q"] = q[:, self.cls_index : self.cls_index + 1] if cls_only else q

        return hook

    def _score(self, layer: int, kinds: set[SignalKind], store: dict) -> Callable:
        def hook(module, args, output):
            k = self._heads(output.detach())  # [B, H, S, d]
            scale = k.shape[-1] ** -0.5  # HF scales inside attention, so the q_proj output is unscaled
            if SignalKind.KEYS in kinds:
                self.results[Signal(SignalKind.KEYS, layer)] = k.float().mean(dim=1)
            q = store.pop("q", None)
            if q is None:
                return
            q = self._heads(q)
            if kinds & {SignalKind.CLS_ATTENTION, SignalKind.CLS_LOGITS}:
                if self.cls_index is None:
                    raise ValueError("this vision tower has no CLS token; use received attention instead")
                row = q[:, :, 0] if q.shape[2] == 1 else q[:, :, self.cls_index]  # [B, H, d]
                # the whole batch (AnyRes views, images) in one op: one launch per layer, not one per image
                for kind, kernel in ((SignalKind.CLS_ATTENTION, cls_attention_row),
                                     (SignalKind.CLS_LOGITS, cls_logits_row)):
                    if kind in kinds:
                        self.results[Signal(kind, layer)] = kernel(row, k, scale)
            if SignalKind.RECEIVED_ATTENTION in kinds:
                # every image of the batch is one span of one packed sequence: equal spans go through the fused
                # kernels together
                b, h, n, d = k.shape
                spans = [(i * n, (i + 1) * n) for i in range(b)]
                packed = received_attention(q.transpose(0, 1).reshape(h, b * n, d),
                                            k.transpose(0, 1).reshape(h, b * n, d), scale, spans)
                self.results[Signal(SignalKind.RECEIVED_ATTENTION, layer)] = packed.view(b, n)

        return hook


class QwenBlockCapture(_HookSet):
    """Qwen2/2.5/3-VL ViT: a pre-hook on ``blocks[l].attn`` recomputing post-RoPE q/k for the declared layers.

    Results are over the whole packed patch sequence of the call, in the ViT's own (window-permuted) order:
    ``[S]`` for attention signals and ``[S, head_dim]`` for keys; the adapter maps them to merged-token order.
    ``rotary`` is the family's ``apply_rotary_pos_emb_vision``.
    """

    def __init__(self, blocks: nn.ModuleList, signals: Sequence[Signal], rotary: Callable):
        super().__init__()
        self.blocks, self.rotary = blocks, rotary
        self.wanted = _by_layer(signals)
        unsupported = {k for kinds in self.wanted.values() for k in kinds} - {
            SignalKind.RECEIVED_ATTENTION,
            SignalKind.KEYS,
        }
        if unsupported:
            raise ValueError(
                f"signals {sorted(k.value for k in unsupported)} need a CLS token, which Qwen ViTs do not have; "
                "compressors fall back to received attention via TowerInfo.attention_signal"
            )

    def __enter__(self):
        for layer, kinds in self.wanted.items():
            attn = self.blocks[layer].attn
            self.handles.append(attn.register_forward_pre_hook(self._score(layer, kinds, attn), with_kwargs=True))
        return self

    def _score(self, layer: int, kinds: set[SignalKind], attn: nn.Module) -> Callable:
        def hook(module, args, kwargs):
            hidden = (args[0] if args else kwargs["hidden_states"]).detach()
            cu_seqlens = kwargs["cu_seqlens"]
            cos, sin = kwargs["position_embeddings"]
            seq = hidden.shape[0]
            with torch.no_grad():
                q, k, _ = attn.qkv(hidden).reshape(seq, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
                q, k = self.rotary(q, k, cos, sin)
            q, k = q.transpose(0, 1), k.transpose(0, 1)  # [H, S, d]
            if SignalKind.KEYS in kinds:
                self.results[Signal(SignalKind.KEYS, layer)] = k.float().mean(dim=0)
            if SignalKind.RECEIVED_ATTENTION in kinds:
                bounds = cu_seqlens.tolist()
                segments = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
                self.results[Signal(SignalKind.RECEIVED_ATTENTION, layer)] = received_attention(
                    q, k, attn.scaling, segments
                )

        return hook
