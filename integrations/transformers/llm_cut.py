"""The second cut point: visual tokens dropped *inside* the LLM (FastV, PyramidDrop, SparseVLM, DART).

Per wrapped call, forward pre-hooks on the decoder layers (removed when the call returns) carry out the schedule of
an ``vtc.inllm.LLMCompressor`` -- with the attention implementation the user chose, at any batch size:

* **signals** -- at the layers the compressor declared, from the hidden states entering the layer and the layer's own
  weights (``input_layernorm``, ``q_proj`` / ``k_proj`` and Qwen3's ``q_norm`` / ``k_norm``, the rotary
  ``(cos, sin)`` the model hands every layer): one attention row per query (``kernels.llm_attention``, fp32, never an
  ``L x L`` map), post-rotary keys, normed hidden states;
* **drop** (prefill) -- at a stage's layer ``K`` the hidden states, the rotary ``(cos, sin)`` (gathered, so kept tokens
  keep their original positions, M-RoPE's three sections included) and a 2-D padding mask are cut to the kept
  tokens, rows re-padded on the left to the longest; the layer's attention mask is rebuilt with transformers' own
  ``create_causal_mask`` sized against layer ``K``'s cache (``layer_idx=K``). Layers ``< K`` keep the full sequence,
  so their cache, the model's positions and Qwen's ``rope_deltas`` (all read from layer 0) stay right;
* **substitution** -- the model's loop hands every layer the full-length mask and rotary tensors, so layers
  ``>= K`` get their stage's instead; at every decode step each stage's mask is rebuilt against its own cache
  length (a new token is real: a 1 is appended to the stage's 2-D mask), while decode positions need nothing: the
  model gives the new token its original next position;
* **output** -- after the last layer the sequence is laid out as the caller's again: a dropped position takes the
  hidden state of the nearest kept token before it, so logits line up with ``input_ids`` and ``labels`` (the logit
  that predicts the first text token after an image is the last *kept* visual token's, exactly as in a prompt
  built without the dropped tokens) and ``generate`` reads ``logits[:, -1]`` as usual.

Refused, with a message: a cache that already holds tokens (a second prefill would be pruned against a cache laid
out per layer), caches other than ``DynamicCache`` (a static cache sizes every layer alike), and ``generate`` without
a cache (every step would re-prune the whole sequence: a different method).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from vtc.kernels.llm_attention import apply_rotary, attention_rows
from vtc.budget import resolve_budget
from vtc.inllm import LLMCompressor, LLMSelection, LLMSignal, LLMSignalKind, LLMStageRecord, LLMTokens, Stage


@dataclass
class _Group:
    """One image (or the videos of one prompt) of one row."""

    row: int
    kind: str
    positions: torch.Tensor  # [N] original prompt positions, ascending
    budget: int
    schedule: tuple[Stage, ...]
    survivors: torch.Tensor = None  # indices into positions, ascending
    queries: torch.Tensor | None = None  # prompt positions of the compressor's text queries
    visual: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)
    records: list = field(default_factory=list)

    def __post_init__(self):
        self.survivors = torch.arange(self.positions.numel())

    def stage_at(self, layer: int) -> tuple[int, Stage] | None:
        for index, stage in enumerate(self.schedule):
            if stage.layer == layer:
                return index, stage
        return None


def visual_groups(input_ids: torch.Tensor, image_token_id: int, video_token_id: int | None,
                  image_counts: list[int] | None = None) -> list[list[tuple]]:
    """Per row: ``(kind, positions)`` of each image and of the row's videos (all video placeholders of the row: its
    videos share one budget, Qwen3-VL's per-frame runs included).

    ``image_counts``: the placeholders of each image of the call, row-major (the adapter's count, or what the encoder
    stage kept), so two images whose placeholders touch are still two images; without it, each run of consecutive
    placeholders is one image."""
    rows = []
    counts = list(image_counts) if image_counts is not None else None
    if counts is not None and sum(counts) != int((input_ids == image_token_id).sum()):
        counts = None  # the counts do not describe this prompt: fall back to runs
    for b in range(input_ids.shape[0]):
        ids = input_ids[b]
        groups = []
        image = (ids == image_token_id).nonzero().squeeze(-1)
        if image.numel() and counts is not None:
            sizes, total = [], 0
            while total < image.numel():
                sizes.append(counts.pop(0))
                total += sizes[-1]
            for run in torch.split(image, sizes):
                groups.append(("image", run))
        elif image.numel():
            breaks = (image[1:] - image[:-1] != 1).nonzero().squeeze(-1) + 1
            for run in torch.tensor_split(image, breaks.tolist()):
                groups.append(("image", run))
        if video_token_id is not None:
            video = (ids == video_token_id).nonzero().squeeze(-1)
            if video.numel():
                groups.append(("video", video))
        groups.sort(key=lambda g: int(g[1][0]))
        rows.append(groups)
    return rows


class LLMCut:
    """One wrapped call's LLM-side cut: build with the prompt the LLM receives, use as a context manager around the
    original ``generate`` / ``forward``; ``records`` afterwards."""

    def __init__(self, compressor: LLMCompressor, budget, language_model, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None, image_token_id: int, video_token_id: int | None,
                 first_layer: int = 1, video_budget=None, image_counts: list[int] | None = None):
        self.compressor, self.lm = compressor, language_model
        self.layers = list(language_model.layers)
        self.num_layers = len(self.layers)
        self.config = language_model.config
        self.length = input_ids.shape[1]
        self.batch = input_ids.shape[0]
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self.mask0 = attention_mask.bool()
        self.groups: list[_Group] = []
        self.owner = torch.full(input_ids.shape, -1, dtype=torch.long, device=device)  # group id per position
        for b, row in enumerate(visual_groups(input_ids, image_token_id, video_token_id, image_counts)):
            for kind, positions in row:
                n = int(positions.numel())
                own = video_budget if kind == "video" and video_budget is not None else budget
                resolved = own if isinstance(own, int) else resolve_budget(own, n)
                schedule = compressor.schedule(n, self.num_layers, own, first_layer)
                self.owner[b, positions] = len(self.groups)
                self.groups.append(_Group(b, kind, positions.cpu(), resolved, schedule))
        self.drop_layers = sorted({s.layer for g in self.groups for s in g.schedule})
        # signals read at a stage's own drop layer are taken before it drops (PyramidDrop ranks with the layer it
        # shortens), those of a later stage after (the layer runs on the survivors of the earlier stages)
        self.before: dict[int, set[LLMSignal]] = {}
        self.after: dict[int, set[LLMSignal]] = {}
        for group in self.groups:
            previous = 0
            for index, stage in enumerate(group.schedule):
                for signal in compressor.llm_signals(stage, index):
                    if not previous <= signal.layer <= stage.layer:
                        raise ValueError(f"compressor {compressor.name!r} reads {signal} for its drop at layer "
                                         f"{stage.layer}; a stage reads layers {previous}..{stage.layer}")
                    where = self.before if signal.layer == stage.layer else self.after
                    where.setdefault(signal.layer, set()).add(signal)
                previous = stage.layer
        self.needs_queries = any(s.kind == LLMSignalKind.QUERY_ATTENTION for v in (*self.before.values(),
                                                                                   *self.after.values()) for s in v)
        layer_types = getattr(self.config, "layer_types", None)
        self.layer_types = list(layer_types) if layer_types else ["full_attention"] * self.num_layers
        self.prefilled = False
        self.phase = None
        self.deferred = None  # (signals, layer, its input, index): captured at the next layer from the cache
        self.stage_kwargs: dict[int, dict] = {}  # drop layer -> what layers from there on receive
        self.stage_masks2d: dict[int, torch.Tensor] = {}
        self.changed = False

    # ------------------------------------------------------------------------------------------------ hooks
    @contextlib.contextmanager
    def installed(self):
        if not self.drop_layers:  # no visual tokens: nothing to cut
            yield self
            return
        handles = [layer.register_forward_pre_hook(self._pre_hook(j), with_kwargs=True)
                   for j, layer in enumerate(self.layers)]
        handles.append(self.layers[-1].register_forward_hook(self._post_hook))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _pre_hook(self, j: int):
        def hook(module, args, kwargs):
            if args:
                hidden, rest = args[0], args[1:]
            else:
                hidden, rest = kwargs.pop("hidden_states"), ()
            if j == 0:
                self._begin(hidden, kwargs)
            if self.phase == "prefill":
                cache = kwargs.get("past_key_values")
                if self.deferred is not None:  # the previous layer's keys are in the cache now
                    wanted, layer, layer_input, index = self.deferred
                    self.deferred = None
                    self._capture(wanted, layer, layer_input, keys=cache.layers[index].keys)
                if j in self.before:
                    self._capture(self.before[j], module, hidden)
                if j in self.drop_layers:
                    hidden = self._drop(j, hidden, kwargs)
                if j in self.after:
                    if self._keys_cached(j, cache):  # read the keys this layer caches instead of projecting again
                        self.deferred = (self.after[j], module, hidden, j)
                    else:
                        self._capture(self.after[j], module, hidden)
            substitute = self._kwargs_for(j)
            if substitute:
                kwargs.update(substitute)
            return (hidden, *rest), kwargs

        return hook

    def _kwargs_for(self, j: int) -> dict | None:
        stage = max((k for k in self.stage_kwargs if k <= j), default=None)
        if stage is None:
            return None
        entry = self.stage_kwargs[stage]
        out = {"attention_mask": entry["masks"][self.layer_types[j]]}
        if self.phase == "prefill":
            out["position_embeddings"] = entry["position_embeddings"]
            out["position_ids"] = None
        return out

    def _post_hook(self, module, args, output):
        if self.phase != "prefill" or not self.changed:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        kept = self.pos_to_col >= 0  # [B, L]
        ar = torch.arange(self.length, device=kept.device).expand_as(kept)
        last_kept = torch.cummax(torch.where(kept, ar, torch.zeros_like(ar)), dim=1).values
        cols = self.pos_to_col.gather(1, last_kept).clamp(min=0).to(hidden.device)
        expanded = hidden.gather(1, cols[..., None].expand(-1, -1, hidden.shape[-1]))
        return (expanded, *output[1:]) if isinstance(output, tuple) else expanded

    # ------------------------------------------------------------------------------------------------ phases
    def _begin(self, hidden: torch.Tensor, kwargs: dict) -> None:
        from transformers import DynamicCache

        cache = kwargs.get("past_key_values")
        if not self.prefilled:
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError("vtc's LLM-side compressors prune a prompt's visual tokens during its prefill; this "
                                 "call continues a cache that already holds tokens (a second turn or chunked "
                                 "prefill), which they cannot. Start from an empty cache")
            if cache is not None and not isinstance(cache, DynamicCache):
                raise ValueError(f"vtc's LLM-side compressors keep fewer tokens in the cache of later layers, which "
                                 f"needs a DynamicCache; got {type(cache).__name__} (do not pass "
                                 "cache_implementation='static' / torch.compile with them)")
            if hidden.shape[1] != self.length:
                raise ValueError(f"the LLM received {hidden.shape[1]} tokens but the prompt has {self.length}")
            self.prefilled, self.phase = True, "prefill"
            device = hidden.device
            cos, sin = kwargs["position_embeddings"]  # [B or 1, L, D]: a batch of one when positions broadcast
            cos, sin = cos.expand(self.batch, -1, -1), sin.expand(self.batch, -1, -1)
            self.cos0, self.sin0 = cos, sin
            self.cos, self.sin = cos, sin
            self.index = torch.arange(self.length, device=device).expand(self.batch, -1).clone()  # orig pos per col
            self.m2d = self.mask0.to(device)
            self.pos_to_col = self.index.clone()
            if self.needs_queries:
                self._queries(hidden)
            return
        if cache is None:
            raise ValueError("vtc's LLM-side compressors need generate(..., use_cache=True): without a cache every "
                             "step would prune the whole sequence again")
        self.phase = "decode"
        q = hidden.shape[1]
        for layer, entry in self.stage_kwargs.items():
            ones = torch.ones(self.batch, q, dtype=torch.bool, device=entry["mask2d"].device)
            entry["mask2d"] = torch.cat([entry["mask2d"], ones], dim=1)
            entry["masks"] = self._masks(layer, hidden, entry["mask2d"], cache)

    def _masks(self, layer: int, hidden: torch.Tensor, mask2d: torch.Tensor, cache) -> dict:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        masks = {}
        for kind in set(self.layer_types[layer:]):
            first = layer + self.layer_types[layer:].index(kind)
            make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
            masks[kind] = make(config=self.config, inputs_embeds=hidden, attention_mask=mask2d,
                               past_key_values=cache, position_ids=None, layer_idx=first)
        return masks

    # ------------------------------------------------------------------------------------------------ signals
    def _row_cols(self, b: int, positions: torch.Tensor) -> torch.Tensor:
        return self.pos_to_col[b, positions.to(self.pos_to_col.device)].cpu()

    def _text_after(self, group: _Group) -> torch.Tensor:
        """Prompt positions of the real non-visual tokens after the group's span."""
        b, end = group.row, int(group.positions[-1])
        after = torch.arange(end + 1, self.length, device=self.owner.device)
        after = after[(self.owner[b, after] < 0) & self.mask0[b, after].to(after.device)]
        return after

    def _queries(self, embeds: torch.Tensor) -> None:
        for group in self.groups:
            text = self._text_after(group)
            if text.numel() == 0:
                continue
            b = group.row
            chosen = self.compressor.text_queries(embeds[b, self._row_cols(b, group.positions)],
                                                  embeds[b, self._row_cols(b, text)])
            if chosen is not None:
                group.queries = text[chosen.to(text.device)].cpu()

    def _last_col(self, b: int) -> int:
        real = self.m2d[b].nonzero()
        return int(real[-1]) if real.numel() else self.m2d.shape[1] - 1

    def _keys_cached(self, j: int, cache) -> bool:
        """Whether layer ``j``'s post-rotary keys of every current token will be in ``cache`` when layer ``j + 1``
        starts: a DynamicCache on a full-attention layer (a sliding layer keeps only its window)."""
        from transformers import DynamicCache

        return (isinstance(cache, DynamicCache) and self.layer_types[j] == "full_attention"
                and j + 1 < self.num_layers and len(getattr(cache, "layers", ())) > j)

    def _capture(self, wanted: set[LLMSignal], layer, hidden: torch.Tensor, keys: torch.Tensor | None = None
                 ) -> None:
        """The ``wanted`` signals of ``layer`` from ``hidden``, the sequence entering it (current layout);
        ``keys``: the layer's post-rotary keys ``[B, Hkv, L, D]`` when the cache holds them (else projected here)."""
        kinds = {s.kind for s in wanted}
        attn = layer.self_attn
        needs_qk = kinds & {LLMSignalKind.LAST_ATTENTION, LLMSignalKind.QUERY_ATTENTION, LLMSignalKind.KEYS}
        if needs_qk:
            normed = layer.input_layernorm(hidden)
            if keys is None:
                keys = self._project(attn, attn.k_proj, getattr(attn, "k_norm", None), normed)  # [B, Hkv, L, D]
                keys = apply_rotary(keys, self.cos.to(keys.device), self.sin.to(keys.device))  # device maps
        normed_out = self.lm.norm(hidden) if LLMSignalKind.HIDDEN in kinds else None
        last_rows = {}
        for group in self.groups:
            b = group.row
            cols = self._row_cols(b, group.positions[group.survivors])
            for signal in wanted:
                if signal.kind == LLMSignalKind.LAST_ATTENTION:
                    if b not in last_rows:
                        last_rows[b] = self._rows(attn, normed, keys, b, torch.tensor([self._last_col(b)]))[0]
                    group.visual[signal] = last_rows[b][cols]
                elif signal.kind == LLMSignalKind.QUERY_ATTENTION:
                    queries = group.queries
                    if queries is None or queries.numel() == 0:  # no text after the image: its last token rates
                        query_cols = torch.tensor([self._last_col(b)])
                    else:
                        query_cols = self._row_cols(b, queries)
                    group.visual[signal] = self._rows(attn, normed, keys, b, query_cols)[:, cols]
                elif signal.kind == LLMSignalKind.KEYS:
                    flat = keys[b].transpose(0, 1).reshape(keys.shape[2], -1)  # [L, Hkv * D]
                    group.visual[signal] = flat[cols]
                    group.text[signal] = flat[self._row_cols(b, self._text_after(group))]
                elif signal.kind == LLMSignalKind.HIDDEN:
                    group.visual[signal] = normed_out[b, cols].float()
                    group.text[signal] = normed_out[b, self._row_cols(b, self._text_after(group))].float()

    @staticmethod
    def _project(attn, proj, norm, x: torch.Tensor) -> torch.Tensor:
        """``[B, heads, L, D]`` from projection ``proj`` of ``x`` (``[B, L, d]``), with the per-head norm Qwen3
        applies when present."""
        out = proj(x)
        out = out.view(*x.shape[:-1], -1, attn.head_dim)
        if norm is not None:
            out = norm(out)
        return out.transpose(1, 2)

    def _rows(self, attn, normed, keys, b: int, query_cols: torch.Tensor) -> torch.Tensor:
        """Head-mean attention rows ``[R, L]`` of row ``b``'s queries at ``query_cols``."""
        device = normed.device
        query_cols = query_cols.to(device)
        q = self._project(attn, attn.q_proj, getattr(attn, "q_norm", None), normed[b : b + 1, query_cols])
        cos, sin = self.cos.to(device), self.sin.to(device)
        q = apply_rotary(q, cos[b : b + 1, query_cols], sin[b : b + 1, query_cols])
        return attention_rows(q, keys[b : b + 1], query_cols[None], key_mask=self.m2d[b : b + 1].to(device),
                              scale=getattr(attn, "scaling", None))[0]

    # ------------------------------------------------------------------------------------------------ drop
    def _drop(self, j: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        changed = False
        for gid, group in enumerate(self.groups):
            found = group.stage_at(j)
            if found is None:
                continue
            index, stage = found
            n = int(group.survivors.numel())
            tokens = LLMTokens(num_tokens=n, stage=index, layer=j, visual=group.visual, text=group.text)
            kept = self.compressor.select_stage(tokens, stage.keep) if stage.keep < n else torch.arange(n)
            kept = torch.as_tensor(kept, dtype=torch.long).cpu()
            if kept.dim() != 1 or kept.numel() != stage.keep or (kept.numel() and (
                    int(kept.min()) < 0 or int(kept.max()) >= n or bool((kept[1:] <= kept[:-1]).any()))):
                raise ValueError(f"compressor {self.compressor.name!r} returned {kept.tolist()[:8]}... at layer {j}; "
                                 f"expected {stage.keep} sorted unique indices into {n} tokens")
            scores = self.compressor.stage_scores(tokens)
            scores = None if scores is None else scores.float().cpu()
            group.survivors = group.survivors[kept]
            group.records.append(LLMStageRecord(layer=j, kept=group.survivors.clone(), scores=scores))
            group.visual, group.text = {}, {}
            changed = changed or stage.keep < n
        if not changed:
            return hidden
        self.changed = True
        device = hidden.device
        keep_pos = self.mask0.new_ones(self.mask0.shape).to(device)  # [B, L] original positions still present
        keep_pos &= self.owner.to(device) < 0
        for group in self.groups:
            keep_pos[group.row, group.positions[group.survivors].to(device)] = True
        counts = keep_pos.sum(1)
        width = int(counts.max())
        index = torch.full((self.batch, width), -1, dtype=torch.long, device=device)
        for b in range(self.batch):
            index[b, width - int(counts[b]):] = keep_pos[b].nonzero().squeeze(-1)
        pad = index < 0
        safe = index.clamp(min=0)
        cols = self.pos_to_col.to(device).gather(1, safe)
        new_hidden = hidden.gather(1, cols[..., None].expand(-1, -1, hidden.shape[-1]))
        new_hidden = new_hidden.masked_fill(pad[..., None], 0)
        self.cos = self.cos0.gather(1, safe[..., None].expand(-1, -1, self.cos0.shape[-1]).to(self.cos0.device))
        self.sin = self.sin0.gather(1, safe[..., None].expand(-1, -1, self.sin0.shape[-1]).to(self.sin0.device))
        self.m2d = self.mask0.to(device).gather(1, safe) & ~pad
        self.index = index
        self.pos_to_col = torch.full((self.batch, self.length), -1, dtype=torch.long, device=device)
        for b in range(self.batch):
            real = ~pad[b]
            self.pos_to_col[b, index[b, real]] = real.nonzero().squeeze(-1)
        cache = kwargs.get("past_key_values")
        self.stage_kwargs[j] = {"mask2d": self.m2d.clone(), "position_embeddings": (self.cos, self.sin),
                                "masks": self._masks(j, new_hidden, self.m2d, cache)}
        return new_hidden

    # ------------------------------------------------------------------------------------------------ records
    def records(self, compressor_name: str) -> list[LLMSelection]:
        out = []
        for group in self.groups:
            stages = tuple(group.records)
            if not stages:  # the call never reached the drop (no prefill): the schedule's layers, nothing dropped
                continue
            out.append(LLMSelection(batch_index=group.row, kind=group.kind, positions=group.positions,
                                    budget=group.budget, stages=stages, num_layers=self.num_layers,
                                    compressor=compressor_name))
        return out
