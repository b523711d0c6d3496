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

Videos (``pixel_values_videos``) go the same way: the family's ``get_video_features`` split into frames, one budget
per video shared by its frames (``vtc.video``), unkept video placeholders dropped, positions from the original
sequence. Calls without ``pixel_values`` or ``pixel_values_videos`` (text-only prompts, and generate's own inner
forward calls) pass straight through.

Steps (1)-(3), and the keep-mask over the prompt, are ``select_call``: the one code path shared by the wrapped methods
(``shrink``) and the dry run (``dry_run``, ``vtc.select``), which returns the records without running the LLM.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from vtc.allocation import Allocation, Even
from vtc.budget import Budget
from vtc.compressor import Compressor, VisualTokens, run_compressor
from vtc.multiview import MultiViewTokens, select_views
from vtc.selection import ImageSelection, Selection, SelectionRecords
from vtc.video import VideoRecord, VideoTokens, run_video_compressor

from .adapter import EncodedImages, EncodedVideos, FamilyAdapter


@dataclass
class CutState:
    """Everything vtc keeps on a wrapped model instance (``model._vtc_state``)."""

    adapter: FamilyAdapter
    compressor: Compressor
    budget: Budget
    positions: str
    records: list[ImageSelection] = field(default_factory=list)
    #: how an AnyRes image's budget is split over its views (multi-view families only)
    allocation: Allocation = field(default_factory=Even)
    #: the budget of each video (all its frames); ``None``: the same as ``budget``
    video_budget: Budget | None = None
    video_records: list[VideoRecord] = field(default_factory=list)
    #: QuoTA's "self" scorer (``frame_scorer.SelfFrameScorer``), set when a processor is passed to ``apply``
    frame_scorer: Any = None
    #: treat the images of each prompt as the frames of one video (models without a video input, e.g. LLaVA-1.5,
    #: which see a video as a sequence of images): one ``video_budget`` per prompt, shared by its images
    images_as_video: bool = False
    #: per prompt of the last call: (tokens it had, tokens the LLM received), padding excluded
    prompt_lengths: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class ShrunkInputs:
    kwargs: dict
    original_input_ids: torch.Tensor
    new_length: int


@contextlib.contextmanager
def offloaded_weights_loaded(model):
    """Load accelerate-offloaded weights that vtc's encoder calls need, for the duration of the block.

    With accelerate offloading (``cpu_offload``, ``"cpu"`` / ``"disk"`` entries of a ``device_map``) a module's own
    weights are loaded only inside its own ``forward``. vtc calls ``model.model.get_image_features`` and the input
    embeddings outside that forward, so parameters held by the model or its direct children (LLaVA-NeXT's
    ``image_newline``, or a whole offloaded ``model.model`` block) would still be on the meta device. Their hooks
    load them here and offload them again on exit; without accelerate, or without offloading, this does nothing.
    """
    try:
        from accelerate.utils import align_module_device, has_offloaded_params
    except ImportError:  # accelerate not installed: nothing can be offloaded
        yield
        return
    with contextlib.ExitStack() as stack:
        for module in (model, *model.children()):
            if has_offloaded_params(module):
                stack.enter_context(align_module_device(module))
        yield


def _embed_query(model, input_ids: torch.Tensor, mask: torch.Tensor, placeholder_ids) -> list[torch.Tensor]:
    """Per batch row: embeddings of its text tokens (for query-aware compressors)."""
    embeddings = model.get_input_embeddings()
    out = []
    for row, row_mask in zip(input_ids, mask):
        text_mask = row_mask != 0
        for token_id in placeholder_ids:
            text_mask &= row != token_id
        out.append(embeddings(row[text_mask]).detach())
    return out


def replay_merge(selection: Selection, level: torch.Tensor) -> torch.Tensor:
    """A merge stated as coefficients (``Selection.weights``) applied to another feature set of the same tokens."""
    rows = [w.to(level.device, torch.float32) @ level[g.to(level.device)].float()
            for g, w in zip(selection.groups, selection.weights)]
    return torch.stack(rows).to(level.dtype)


def reduce_level(compressor: Compressor, tokens: VisualTokens, selection: Selection,
                 level: torch.Tensor) -> torch.Tensor:
    """``selection`` applied to another feature set of the same tokens (a Qwen3-VL deepstack level, ``[N, D]``).

    Kept tokens take their own rows. A merge stated as coefficients (``Selection.weights``) is replayed on the level.
    Otherwise merged tokens get the same merge: the compressor is run again on the level's
    features with the same signals, query and budget. Every built-in merging compressor (pool, visionzip) forms
    its groups from the grid and the captured signals only, so the re-run reproduces the groups and merges the
    level's rows with the compressor's own rule; a compressor whose groups depend on the features is refused.
    """
    if selection.features is None:
        return level[selection.indices.to(level.device)]
    if selection.weights is not None:  # the merge is stated as coefficients: replay it on this level
        return replay_merge(selection, level)
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


def reduce_video_level(compressor: Compressor, video: VideoTokens, selection: Selection, level: torch.Tensor,
                       budget: Budget) -> torch.Tensor:
    """A video's flat ``selection`` applied to another feature set of its tokens (Qwen3-VL deepstack, ``[N, D]``):
    kept rows, a merge stated as coefficients replayed, or else the compressor re-run on the level (refused if its
    groups then differ, as ``reduce_level``)."""
    if selection.features is None:
        return level[selection.indices.to(level.device)]
    if selection.weights is not None:
        return replay_merge(selection, level)
    parts = torch.split(level, video.frame_sizes)
    frames = [dataclasses.replace(f, features=p) for f, p in zip(video.frames, parts)]
    again = run_video_compressor(compressor, dataclasses.replace(video, frames=frames), budget).flat(video)
    same = again.features is not None and torch.equal(again.indices.cpu(), selection.indices.cpu()) and all(
        torch.equal(a.cpu(), b.cpu()) for a, b in zip(again.groups or (), selection.groups or ()))
    if not same:
        raise RuntimeError(
            f"compressor {compressor.name!r} merges video tokens into groups that depend on the features, so its "
            "merge cannot be applied to this model's extra feature levels (Qwen3-VL deepstack); use a pruning "
            "compressor or one that states its merge weights"
        )
    return again.features.to(level.dtype)


def frame_scores(state: CutState, frames: list[torch.Tensor], text_ids: torch.Tensor) -> torch.Tensor:
    """Per-frame relevance from the wrapped model itself (QuoTA's "self" scorer), for compressors that ask."""
    scorer = state.frame_scorer
    if scorer is None:
        raise ValueError(
            f"compressor {state.compressor.name!r} scores frames with the wrapped model, which needs its tokenizer: "
            f"vtc.apply(model, {state.compressor.name!r}, ..., processor=processor)"
        )
    model = state.adapter.model
    return scorer.score(model, frames, scorer.prompt(model, scorer.question(text_ids)))


def select_videos(state: CutState, videos: EncodedVideos, video_rows: list[int], queries, tower,
                  text_ids: list[torch.Tensor] | None = None
                  ) -> tuple[list[VideoRecord], list[Selection], list[list[torch.Tensor]]]:
    """Run the compressor on every video of the call: per video its record, its flat selection over the frames'
    tokens, and the selection applied to its extra feature levels."""
    budget = state.video_budget if state.video_budget is not None else state.budget
    own = set(state.compressor.signals(tower))  # not the allocation's: those are for AnyRes images
    records, flats, kept_levels = [], [], []
    for v, (frames, grids, signals) in enumerate(zip(videos.frames, videos.grids, videos.signals)):
        query = queries[video_rows[v]] if queries is not None else None
        tokens = [VisualTokens(features=f, grid=g, signals={k: x for k, x in sig.items() if k in own}, query=query)
                  for f, g, sig in zip(frames, grids, signals)]
        stamps = videos.timestamps[v] if videos.timestamps else None
        scores = None
        if getattr(state.compressor, "needs_frame_scores", False) and len(frames) > 1:
            scores = frame_scores(state, frames, text_ids[video_rows[v]])
        video = VideoTokens(frames=tokens, timestamps=stamps, query=query, frame_scores=scores)
        result = run_video_compressor(state.compressor, video, budget)
        flat = result.flat(video)
        levels = videos.levels[v] if videos.levels else []
        kept_levels.append([reduce_video_level(state.compressor, video, flat, level, budget) for level in levels])
        flats.append(_detached(flat))
        records.append(VideoRecord(video_index=v, batch_index=video_rows[v], grids=list(grids), selection=result,
                                   compressor=state.compressor.name, timestamps=stamps,
                                   num_suffix_tokens=int(videos.suffix[v].shape[0]) if videos.suffix else 0))
    return records, flats, kept_levels


def select_image_sequences(state: CutState, encoded: EncodedImages, image_rows: list[int], queries, tower,
                           text_ids: list[torch.Tensor] | None) -> tuple[list[ImageSelection], list[VideoRecord]]:
    """``images_as_video``: the images of each prompt are the frames of one video, selected by the video path; each
    image keeps its frame's selection, so the rest of the cut is the image cut."""
    budget = state.video_budget if state.video_budget is not None else state.budget
    own = set(state.compressor.signals(tower))
    by_row: dict[int, list[int]] = {}
    for i, row in enumerate(image_rows):
        by_row.setdefault(row, []).append(i)
    records: list[ImageSelection | None] = [None] * len(encoded.features)
    videos = []
    for v, (row, members) in enumerate(sorted(by_row.items())):
        if any(encoded.layouts[i].packed is not None for i in members):
            raise ValueError(
                "images_as_video treats each image as one frame, but these images are AnyRes (several views); "
                "pass the frames as a video (pixel_values_videos) or use images_as_video=False"
            )
        query = queries[row] if queries is not None else None
        frames = [VisualTokens(features=encoded.features[i], grid=encoded.layouts[i].grid,
                               signals={k: x for k, x in encoded.signals[i].items() if k in own},
                               query=query, num_prefix_tokens=encoded.layouts[i].num_prefix_tokens) for i in members]
        scores = None
        if getattr(state.compressor, "needs_frame_scores", False) and len(frames) > 1:
            scores = frame_scores(state, [f.features for f in frames], text_ids[row])
        video = VideoTokens(frames=frames, query=query, frame_scores=scores)
        result = run_video_compressor(state.compressor, video, budget)
        for frame, (i, record) in enumerate(zip(members, result.frames)):
            records[i] = ImageSelection(
                image_index=i, batch_index=row, num_tokens=frames[frame].num_tokens, grid=frames[frame].grid,
                budget=record.budget, selection=_detached(record.selection), compressor=state.compressor.name,
                num_prefix_tokens=frames[frame].num_prefix_tokens, extra={"video": v, "frame": frame})
        videos.append(VideoRecord(video_index=v, batch_index=row, grids=[f.grid for f in frames], selection=result,
                                  compressor=state.compressor.name))
    encoded.kept_levels = [[] for _ in encoded.features]
    return records, videos


def _detached(selection: Selection) -> Selection:
    return Selection(
        indices=selection.indices.detach(),
        features=None if selection.features is None else selection.features.detach(),
        groups=selection.groups,
        scores=None if selection.scores is None else selection.scores.detach(),
        weights=None if selection.weights is None else tuple(w.detach() for w in selection.weights),
        details=selection.details,
    )


def _image_slots(input_ids: torch.Tensor, image_token_id: int, counts: list[int],
                 what: str = "image") -> tuple[torch.Tensor, list[int]]:
    """Flat (row-major) positions of every image (video) placeholder, and the batch row each one sits in."""
    flat = (input_ids == image_token_id).flatten().nonzero().squeeze(-1)
    if flat.numel() != sum(counts):
        raise ValueError(
            f"the prompt has {flat.numel()} {what} placeholder tokens but the {what}s give {sum(counts)} visual "
            f"tokens; build inputs with the model's processor so each {what} placeholder is expanded"
        )
    starts = torch.tensor([0] + counts[:-1]).cumsum(0).tolist()
    rows = [int(flat[s]) // input_ids.shape[1] if c else 0 for s, c in zip(starts, counts)]
    return flat, rows


def _take_prompt(inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Pop ``input_ids`` and ``attention_mask`` (all ones when absent) from a wrapped call's inputs."""
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
    return input_ids, attention_mask


@dataclass
class SelectedCall:
    """What steps 1-3 give for one call: the records, and what the cut needs to apply them."""

    encoded: EncodedImages  # ``kept_levels`` filled
    videos: EncodedVideos | None
    records: list[ImageSelection]
    video_records: list[VideoRecord]  # images_as_video sequences first, then the call's videos
    keep: torch.Tensor  # [B, L] bool: the prompt tokens the LLM receives (padding excluded)
    kept_features: list[torch.Tensor]  # per image: its kept (or merged) features
    kept_videos: list[torch.Tensor]  # per video: its kept (or merged) features, then its suffix
    kept_video_levels: list[list[torch.Tensor]]
    prompt_lengths: list[tuple[int, int]]  # per prompt: (tokens it had, tokens the LLM receives), padding excluded
    has_images: bool = False


def select_call(state: CutState, inputs: dict, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> SelectedCall:
    """Steps 1-3 -- plan, capture and encode, select -- and the keep-mask over the prompt; ``inputs`` is only read.

    The one path from pixels to records, shared by the wrapped methods (``shrink``) and the dry run (``dry_run``), so
    a dry run's records are those of the call it stands for.
    """
    model, adapter = state.adapter.model, state.adapter
    tower = adapter.tower_info(inputs)
    signals = declared_signals(state, tower)
    has_images = inputs.get("pixel_values") is not None
    has_videos = inputs.get("pixel_values_videos") is not None
    image_token_id, video_token_id = adapter.image_token_id(), adapter.video_token_id()
    with offloaded_weights_loaded(model):
        if has_images:
            encoded = adapter.encode(inputs, signals)
        else:
            encoded = EncodedImages(output=None, features=[], layouts=[], signals=[])
        videos = adapter.encode_videos(inputs, signals) if has_videos else None
        queries = (
            _embed_query(model, input_ids, attention_mask, (image_token_id, video_token_id))
            if state.compressor.uses_query else None
        )
    text_ids = None  # per row: the prompt's text tokens, for a scorer that asks the model about the frames
    if getattr(state.compressor, "needs_frame_scores", False):
        placeholders = torch.tensor([i for i in (image_token_id, video_token_id) if i is not None])
        text_ids = [row[(m != 0) & ~torch.isin(row, placeholders.to(row.device))]
                    for row, m in zip(input_ids, attention_mask)]
    keep = torch.ones(input_ids.numel(), dtype=torch.bool, device=input_ids.device)
    records, kept_features, image_videos = [], [], []
    if has_images:
        counts = [int(f.shape[0]) for f in encoded.features]
        flat_slots, image_rows = _image_slots(input_ids, image_token_id, counts)
        if state.images_as_video:
            records, image_videos = select_image_sequences(state, encoded, image_rows, queries, tower, text_ids)
        else:
            records, image_videos = select_images(state, encoded, image_rows, queries, tower), []
        # keep-mask over the original sequence: text always, image tokens as selected
        keep[flat_slots] = False
        offset = 0
        for record, feats in zip(records, encoded.features):
            sel = record.selection
            keep[flat_slots[offset + sel.indices.to(flat_slots.device)]] = True
            offset += record.num_tokens
            kept_features.append(
                feats[sel.indices.to(feats.device)] if sel.features is None else sel.features.to(feats.dtype))
    video_records, kept_videos, kept_video_levels = [], [], []
    if videos is not None:
        sizes = [sum(int(f.shape[0]) for f in frames) for frames in videos.frames]
        suffix = [int(x.shape[0]) for x in videos.suffix] if videos.suffix else [0] * len(sizes)
        video_slots, video_rows = _image_slots(input_ids, video_token_id, [n + k for n, k in zip(sizes, suffix)],
                                               what="video")
        video_records, flats, kept_video_levels = select_videos(state, videos, video_rows, queries, tower, text_ids)
        keep[video_slots] = False
        offset = 0
        for v, (flat, n, k) in enumerate(zip(flats, sizes, suffix)):
            keep[video_slots[offset + flat.indices.to(video_slots.device)]] = True
            keep[video_slots[offset + n: offset + n + k]] = True  # layout tokens after the frames
            frames = torch.cat(videos.frames[v])
            kept = frames[flat.indices.to(frames.device)] if flat.features is None else flat.features.to(frames.dtype)
            if k:
                kept = torch.cat([kept, videos.suffix[v].to(kept.dtype)])
            kept_videos.append(kept)
            offset += n + k
    real = attention_mask != 0
    # the batch's old padding goes too: rows are re-padded to the longest kept prompt, not to the old length
    keep = keep.view_as(input_ids) & real
    lengths = [(int(n), int(k)) for n, k in zip(real.sum(dim=1).tolist(), keep.sum(dim=1).tolist())]
    return SelectedCall(encoded=encoded, videos=videos, records=records, video_records=image_videos + video_records,
                        keep=keep, kept_features=kept_features, kept_videos=kept_videos,
                        kept_video_levels=kept_video_levels, prompt_lengths=lengths, has_images=has_images)


def shrink(state: CutState, inputs: dict, with_labels: bool) -> ShrunkInputs:
    """Steps 1-5: encode, select (``select_call``), and build the shortened inputs for the original method."""
    model, adapter = state.adapter.model, state.adapter
    input_ids, attention_mask = _take_prompt(inputs)
    user_positions = inputs.pop("position_ids", None)
    mm_token_type_ids = inputs.pop("mm_token_type_ids", None)
    labels = inputs.pop("labels", None) if with_labels else None

    selected = select_call(state, inputs, input_ids, attention_mask)
    encoded, videos, keep = selected.encoded, selected.videos, selected.keep
    encoded.position_inputs.update(adapter.position_inputs(inputs))
    if mm_token_type_ids is not None:
        encoded.position_inputs["mm_token_type_ids"] = mm_token_type_ids
    for key in adapter.encoder_kwargs(inputs):
        inputs.pop(key, None)
    for key in adapter.consumed_keys:
        inputs.pop(key, None)

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
    mm_outputs = {}
    if selected.has_images:
        mm_outputs["image"] = adapter.shrink_output(encoded, selected.kept_features, selected.records)
    mm_outputs.update(encoded.extra_outputs)
    if videos is not None:
        mm_outputs["video"] = adapter.shrink_video_output(videos, selected.kept_videos, selected.kept_video_levels)
    out["mm_encoder_outputs"] = mm_outputs
    state.records = selected.records
    state.video_records = selected.video_records
    state.prompt_lengths = selected.prompt_lengths
    inputs.update(out)
    return ShrunkInputs(kwargs=inputs, original_input_ids=input_ids, new_length=new_length)


def dry_run(state: CutState, inputs: dict) -> SelectionRecords:
    """The records a wrapped ``generate`` / ``forward`` with ``inputs`` would make, without running the LLM.

    Runs ``select_call`` (vision tower, signal capture, selection) under ``torch.no_grad`` on a copy of ``inputs``;
    the language model runs only where the selection itself asks it (QuoTA's ``scorer="self"``). The model's state
    is left as it was: ``last_selection`` / ``last_video_selection`` / ``last_prompt_lengths`` still describe the
    last wrapped call. Keys other than the processor's outputs (e.g. ``max_new_tokens``) are ignored.
    """
    inputs = dict(inputs)
    if not _has_visual_inputs(inputs):
        return SelectionRecords(images=[], videos=[], prompt_lengths=_unshrunk_lengths(inputs))
    input_ids, attention_mask = _take_prompt(inputs)
    saved = state.records, state.video_records, state.prompt_lengths
    try:  # a selection that asks the wrapped model (QuoTA's query decoupling) must not leave its call's records
        with torch.no_grad():
            selected = select_call(state, inputs, input_ids, attention_mask)
    finally:
        state.records, state.video_records, state.prompt_lengths = saved
    return SelectionRecords(images=selected.records, videos=selected.video_records,
                            prompt_lengths=selected.prompt_lengths)


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


def _has_visual_inputs(inputs: dict) -> bool:
    return inputs.get("pixel_values") is not None or inputs.get("pixel_values_videos") is not None


def _unshrunk_lengths(inputs: dict) -> list[tuple[int, int]]:
    mask = inputs.get("attention_mask")
    ids = inputs.get("input_ids")
    if mask is None and ids is None:
        return []
    lengths = mask.sum(dim=1).tolist() if mask is not None else [ids.shape[1]] * ids.shape[0]
    return [(int(n), int(n)) for n in lengths]


#: the instance attribute holding a wrapped model's ``CutState``
STATE_ATTR = "_vtc_state"


def run_generate(state: CutState, original, args: tuple, kwargs: dict):
    """A wrapped ``generate``: shrink the prompt, run ``original``, hand back the caller's own prompt ids."""
    inputs = _bind(original, args, kwargs)
    if not _has_visual_inputs(inputs):
        state.records, state.video_records = [], []
        state.prompt_lengths = _unshrunk_lengths(inputs)
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


def run_forward(state: CutState, original, args: tuple, kwargs: dict):
    """A wrapped ``forward``: shrink the prompt (and labels), run ``original``."""
    inputs = _bind(original, args, kwargs)
    if not _has_visual_inputs(inputs):
        return original(**inputs)
    return original(**shrink(state, inputs, with_labels=True).kwargs)


_RUNNERS = {"generate": run_generate, "forward": run_forward}


class WrappedMethod:
    """vtc's ``generate`` / ``forward`` on one model instance (``model.__dict__[name]``).

    It keeps what ``model.<name>`` resolved to before ``apply``: an instance attribute already there (accelerate's
    hooked ``forward`` from ``device_map=`` / ``dispatch_model`` / ``cpu_offload`` / ``add_hook_to_module``, another
    wrapper) or, when there was none, the class method, looked up at call time. ``unwrap`` puts exactly that back.

    Why a small object and not a closure: its references (model, state, previous method) are plain attributes, so
    ``copy.deepcopy(model)`` and pickling (``torch.save(model)``) rebind them to the copy -- a copy runs its own
    weights and records its own selections -- where a closure would keep calling the original instance.

    It acts only while its state is the model's state; after ``vtc.remove`` (or a new ``apply``) it is a pure
    pass-through, so a wrapper installed on top of vtc's after ``apply`` (which keeps a reference to it) still
    behaves exactly as what vtc wrapped.
    """

    def __init__(self, model, state: CutState, name: str):
        self.model, self.state, self.name = model, state, name
        self.has_previous = name in model.__dict__
        self.previous = model.__dict__.get(name)
        self.__name__ = name

    @property
    def original(self):
        """What this wrapper calls: the method ``model.<name>`` resolved to before ``apply``."""
        if self.has_previous:
            return self.previous
        return getattr(type(self.model), self.name).__get__(self.model, type(self.model))

    @property
    def __wrapped__(self):  # inspect.signature(model.forward) and friends see the original method
        return self.original

    @property
    def active(self) -> bool:
        return self.model.__dict__.get(STATE_ATTR) is self.state

    def __call__(self, *args, **kwargs):
        if not self.active:
            return self.original(*args, **kwargs)
        return _RUNNERS[self.name](self.state, self.original, args, kwargs)

    def unwrap(self) -> None:
        """Put back what ``model.<name>`` was before ``apply``: re-set an instance attribute, or delete ours."""
        if self.has_previous:
            setattr(self.model, self.name, self.previous)
        else:
            delattr(self.model, self.name)

    def __repr__(self) -> str:
        return f"<vtc-wrapped {self.name} of {type(self.model).__name__} ({self.state.compressor.name})>"


def wrap(model, state: CutState) -> None:
    """Install ``state`` and vtc's ``generate`` / ``forward`` on ``model`` (instance attributes only)."""
    wrappers = {name: WrappedMethod(model, state, name) for name in _RUNNERS}
    setattr(model, STATE_ATTR, state)
    for name, wrapper in wrappers.items():
        setattr(model, name, wrapper)


def unwrap(model) -> None:
    """Undo ``wrap``: each of vtc's methods still in place is replaced by what it wrapped. A vtc method that was
    wrapped again after ``apply`` (it is no longer the instance attribute) stays inside that wrapper as a
    pass-through, so the outer wrapper keeps working."""
    state = model.__dict__.get(STATE_ATTR)
    for name in _RUNNERS:
        current = model.__dict__.get(name)
        if isinstance(current, WrappedMethod) and current.state is state:
            current.unwrap()
    delattr(model, STATE_ATTR)
