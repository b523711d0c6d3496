"""The encoder -> LLM cut: one model-agnostic wrapper around ``generate`` and ``forward``.

Per call with images: (1) ask the compressor (and, for AnyRes families, the allocation strategy) which signals it
needs, (2) run the family's own ``get_image_features`` with hooks on exactly those layers, (3) select per image --
an AnyRes image (LLaVA-NeXT / OneVision: base view + crops packed with newlines) by splitting its budget over its
views and selecting per view (``vtc.multiview``), newlines following the kept rows -- (4) drop the unkept placeholder
tokens from ``input_ids`` / ``attention_mask`` / ``mm_token_type_ids`` / ``labels`` and re-pack the batch,
(5) compute positions on the *original* sequence and pass those of the kept tokens, (6) call the original method
with ``mm_encoder_outputs`` holding only the kept (or merged) features -- and, where a family has extra feature
levels read at the image positions (Qwen3-VL deepstack), the same selection of every level. Nothing inside the
model is patched: the placeholder count, ``get_placeholder_mask`` and ``masked_scatter`` stay consistent by
construction, and the KV cache, masks and decode positions of ``generate`` simply see a shorter prompt.

Calls without ``pixel_values`` (text-only prompts, and generate's own inner forward calls) pass straight through.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from vtc.allocation import Allocation, Even
from vtc.budget import Budget
from vtc.compressor import Compressor, VisualTokens, run_compressor
from vtc.multiview import MultiViewTokens, select_views
from vtc.selection import ImageSelection, Selection

from .adapter import EncodedImages, FamilyAdapter


@dataclass
class CutState:
    """Everything vtc keeps on a wrapped model instance (``model._vtc_state``)."""

    adapter: FamilyAdapter
    compressor: Compressor
    budget: Budget
    positions: str
    original_generate: Any
    original_forward: Any
    records: list[ImageSelection] = field(default_factory=list)
    #: how an AnyRes image's budget is split over its views (multi-view families only)
    allocation: Allocation = field(default_factory=Even)


@dataclass
class ShrunkInputs:
    kwargs: dict
    original_input_ids: torch.Tensor
    new_length: int


def _embed_query(model, input_ids: torch.Tensor, mask: torch.Tensor, image_token_id: int) -> list[torch.Tensor]:
    """Per batch row: embeddings of its text tokens (for query-aware compressors)."""
    embeddings = model.get_input_embeddings()
    out = []
    for row, row_mask in zip(input_ids, mask):
        text = row[(row_mask != 0) & (row != image_token_id)]
        out.append(embeddings(text).detach())
    return out


def reduce_level(compressor: Compressor, tokens: VisualTokens, selection: Selection,
                 level: torch.Tensor) -> torch.Tensor:
    """``selection`` applied to another feature set of the same tokens (a Qwen3-VL deepstack level, ``[N, D]``).

    Kept tokens take their own rows. Merged tokens get the same merge: the compressor is run again on the level's
    features with the same signals, query and budget. Every built-in merging compressor (pool, visionzip) forms
    its groups from the grid and the captured signals only, so the re-run reproduces the groups and merges the
    level's rows with the compressor's own rule; a compressor whose groups depend on the features is refused.
    """
    if selection.features is None:
        return level[selection.indices.to(level.device)]
    again = compressor.select(dataclasses.replace(tokens, features=level), selection.num_kept)
    same = again.features is not None and torch.equal(again.indices.cpu(), selection.indices.cpu())
    if same and selection.groups is not None:
        same = again.groups is not None and all(
            torch.equal(a.cpu(), b.cpu()) for a, b in zip(again.groups, selection.groups)
        )
    if not same:
        raise RuntimeError(
            f"compressor {compressor.name!r} merges tokens into groups that depend on the features: run again on "
            "this model's extra feature levels (Qwen3-VL deepstack features, which must get the same selection) it "
            "formed different groups, so its merge cannot be applied to every level; on this model use a pruning "
            "compressor, or a merging one whose groups come from the grid or the captured signals only"
        )
    return again.features.to(level.dtype)


def declared_signals(state: CutState, tower) -> tuple:
    """The compressor's signals, then those of the allocation (multi-view families), without repeats."""
    signals = tuple(state.compressor.signals(tower))
    if state.adapter.multi_view:
        signals = signals + tuple(state.allocation.signals(tower))
    return tuple(dict.fromkeys(signals))


def select_multiview(state: CutState, encoded: EncodedImages, i: int, image_row: int, queries,
                     tower) -> ImageSelection:
    """An AnyRes image: allocate the budget over its views, select per view, keep the newlines of kept rows."""
    layout = encoded.layouts[i].packed
    image = MultiViewTokens(
        features=encoded.features[i],
        layout=layout,
        view_signals=encoded.views[i],
        tower=tower,
        query=queries[image_row] if queries is not None else None,
    )
    compressor_signals = set(state.compressor.signals(tower))
    result = select_views(state.compressor, state.allocation, image, state.budget, compressor_signals)
    return ImageSelection(
        image_index=i,
        batch_index=image_row,
        num_tokens=layout.num_tokens,
        grid=layout.base,
        budget=result.budget,
        selection=_detached(result.selection),
        compressor=state.compressor.name,
        layout=layout,
        view_budgets=result.view_budgets,
        allocation=state.allocation.name,
    )


def select_images(state: CutState, encoded: EncodedImages, image_rows: list[int], queries,
                  tower=None) -> list[ImageSelection]:
    """Run the compressor on every image of the call (step 3); apply each selection to the image's extra levels."""
    records = []
    encoded.kept_levels = []
    for i, (feats, layout, signals) in enumerate(zip(encoded.features, encoded.layouts, encoded.signals)):
        if layout.packed is not None:
            if encoded.levels:
                raise NotImplementedError("extra feature levels of multi-view images are not supported")
            tower = tower if tower is not None else state.adapter.tower_info()
            records.append(select_multiview(state, encoded, i, image_rows[i], queries, tower))
            encoded.kept_levels.append([])
            continue
        tokens = VisualTokens(
            features=feats,
            grid=layout.grid,
            signals=signals,
            query=queries[image_rows[i]] if queries is not None else None,
            num_prefix_tokens=layout.num_prefix_tokens,
        )
        selection = run_compressor(state.compressor, tokens, state.budget)
        levels = encoded.levels[i] if encoded.levels else []
        encoded.kept_levels.append([reduce_level(state.compressor, tokens, selection, level) for level in levels])
        records.append(
            ImageSelection(
                image_index=i,
                batch_index=image_rows[i],
                num_tokens=tokens.num_tokens,
                grid=layout.grid,
                budget=selection.num_kept,  # run_compressor checked it equals the resolved budget
                selection=_detached(selection),
                compressor=state.compressor.name,
                num_prefix_tokens=layout.num_prefix_tokens,
            )
        )
    return records


def _detached(selection: Selection) -> Selection:
    return Selection(
        indices=selection.indices.detach(),
        features=None if selection.features is None else selection.features.detach(),
        groups=selection.groups,
        scores=None if selection.scores is None else selection.scores.detach(),
    )


def _image_slots(input_ids: torch.Tensor, image_token_id: int, counts: list[int]) -> tuple[torch.Tensor, list[int]]:
    """Flat (row-major) positions of every image placeholder, and the batch row each image sits in."""
    flat = (input_ids == image_token_id).flatten().nonzero().squeeze(-1)
    if flat.numel() != sum(counts):
        raise ValueError(
            f"the prompt has {flat.numel()} image placeholder tokens but the images give {sum(counts)} visual "
            "tokens; build inputs with the model's processor so each image placeholder is expanded"
        )
    starts = torch.tensor([0] + counts[:-1]).cumsum(0).tolist()
    rows = [int(flat[s]) // input_ids.shape[1] if c else 0 for s, c in zip(starts, counts)]
    return flat, rows


def shrink(state: CutState, inputs: dict, with_labels: bool) -> ShrunkInputs:
    """Steps 1-5: encode, select, and build the shortened inputs for the original method."""
    model, adapter = state.adapter.model, state.adapter
    input_ids = inputs.pop("input_ids", None)
    if input_ids is None:
        raise ValueError(
            "vtc needs input_ids together with pixel_values (it drops placeholder tokens); inputs_embeds-only "
            "calls are not supported -- pass the processor's input_ids"
        )
    if inputs.get("inputs_embeds") is not None:
        raise ValueError("pass either input_ids or inputs_embeds, not both, to a vtc-wrapped model")
    attention_mask = inputs.pop("attention_mask", None)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    user_positions = inputs.pop("position_ids", None)
    mm_token_type_ids = inputs.pop("mm_token_type_ids", None)
    labels = inputs.pop("labels", None) if with_labels else None

    tower = adapter.tower_info(inputs)
    encoded = adapter.encode(inputs, declared_signals(state, tower))
    if mm_token_type_ids is not None:
        encoded.position_inputs["mm_token_type_ids"] = mm_token_type_ids
    for key in adapter.encoder_kwargs(inputs):
        inputs.pop(key, None)
    for key in adapter.consumed_keys:
        inputs.pop(key, None)

    image_token_id = adapter.image_token_id()
    counts = [int(f.shape[0]) for f in encoded.features]
    flat_slots, image_rows = _image_slots(input_ids, image_token_id, counts)
    queries = (
        _embed_query(model, input_ids, attention_mask, image_token_id) if state.compressor.uses_query else None
    )
    records = select_images(state, encoded, image_rows, queries, tower)

    # keep-mask over the original sequence: text always, image tokens as selected
    keep = torch.ones(input_ids.numel(), dtype=torch.bool, device=input_ids.device)
    keep[flat_slots] = False
    kept_features, offset = [], 0
    for record, feats in zip(records, encoded.features):
        sel = record.selection
        keep[flat_slots[offset + sel.indices.to(flat_slots.device)]] = True
        offset += record.num_tokens
        kept_features.append(feats[sel.indices.to(feats.device)] if sel.features is None else sel.features.to(feats.dtype))
    keep = keep.view_as(input_ids)

    if user_positions is not None:
        positions = user_positions if user_positions.dim() == 3 else user_positions[None]
        if positions.shape[0] == 4:  # Qwen's [text row; 3 M-RoPE rows]: the text row is rebuilt below
            positions = positions[1:]
    elif state.positions == "keep":
        positions = adapter.original_positions(input_ids, attention_mask, encoded)
    else:
        positions = None

    pad_left = not bool((attention_mask[:, -1] == 0).any())  # right padding shows up as zeros at the end
    lengths = keep.sum(dim=1)
    new_length = int(lengths.max())
    pad_id = _pad_id(model)

    def repack(tensor: torch.Tensor, fill) -> torch.Tensor:
        rows = []
        for b in range(input_ids.shape[0]):
            kept = tensor[..., b, keep[b]]
            pad = new_length - kept.shape[-1]
            filler = torch.full((*kept.shape[:-1], pad), fill, dtype=tensor.dtype, device=tensor.device)
            rows.append(torch.cat([filler, kept] if pad_left else [kept, filler], dim=-1))
        return torch.stack(rows, dim=-2)

    new_mask = repack(attention_mask, 0)
    out = {"input_ids": repack(input_ids, pad_id), "attention_mask": new_mask}
    if mm_token_type_ids is not None:
        out["mm_token_type_ids"] = repack(mm_token_type_ids, 0)
    if labels is not None:
        out["labels"] = repack(labels, -100)
    if positions is not None:
        out["position_ids"] = adapter.position_ids(repack(positions, 1), new_mask)
    mm_outputs = {"image": adapter.shrink_output(encoded, kept_features, records)}
    mm_outputs.update(encoded.extra_outputs)
    out["mm_encoder_outputs"] = mm_outputs
    state.records = records
    inputs.update(out)
    return ShrunkInputs(kwargs=inputs, original_input_ids=input_ids, new_length=new_length)


def _pad_id(model) -> int:
    for source in (model.generation_config, model.config, getattr(model.config, "text_config", None)):
        value = getattr(source, "pad_token_id", None) if source is not None else None
        if value is not None:
            return int(value[0] if isinstance(value, (list, tuple)) else value)
    return 0


def _bind(original, args: tuple, kwargs: dict) -> dict:
    """Turn positional arguments into keywords so the inputs can be edited by name."""
    if not args:
        return dict(kwargs)
    import inspect

    bound = inspect.signature(original).bind_partial(*args, **kwargs)
    merged = dict(bound.arguments)
    merged.update(merged.pop("kwargs", {}) or {})
    if isinstance(merged.get("inputs"), torch.Tensor) and "input_ids" not in merged:
        merged["input_ids"] = merged.pop("inputs")  # generate(ids, ...) names its first argument `inputs`
    return merged


def wrap_generate(state: CutState):
    original = state.original_generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        inputs = _bind(original, args, kwargs)
        if inputs.get("pixel_values") is None:
            state.records = []
            return original(**inputs)
        shrunk = shrink(state, inputs, with_labels=False)
        output = original(**shrunk.kwargs)
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        # callers slice the answer off at len(prompt): give them back their own prompt ids
        prompt = shrunk.original_input_ids.to(sequences.device)
        if sequences.shape[0] != prompt.shape[0]:  # num_return_sequences / beams expand each prompt in place
            prompt = prompt.repeat_interleave(sequences.shape[0] // prompt.shape[0], dim=0)
        restored = torch.cat([prompt, sequences[:, shrunk.new_length :]], dim=1)
        if isinstance(output, torch.Tensor):
            return restored
        output.sequences = restored
        return output

    return generate


def wrap_forward(state: CutState):
    original = state.original_forward

    @functools.wraps(original)
    def forward(*args, **kwargs):
        inputs = _bind(original, args, kwargs)
        if inputs.get("pixel_values") is None:
            return original(**inputs)
        shrunk = shrink(state, inputs, with_labels=True)
        return original(**shrunk.kwargs)

    return forward
