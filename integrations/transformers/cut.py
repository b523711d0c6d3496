"""The encoder -> LLM cut: one model-agnostic wrapper around ``generate`` and ``forward``.

A wrapped call with images (``pixel_values``) or videos (``pixel_values_videos``) goes through five stages, after
an optional stage 0:

0. **resize** (``resize_stage``, only for a compressor with a pre-encoder stage, ``Compressor.input_grid``:
   ``downsample``) -- on families whose tower takes any input size, each picture resized to a smaller grid before
   the encoder and the prompt rewritten as the processor would have built it for the smaller picture; the later
   stages then keep every token.

1. **encode** (``encode``) -- the family's own ``get_image_features`` / ``get_video_features`` run with hooks on
   exactly the layers the compressor (and, for AnyRes families, the allocation strategy) declared; the prompt's
   text is embedded for query-aware compressors. What the later stages need of the call is a ``CallContext``,
   passed to them as an argument.
2. **select** (``select_images``, ``select_videos``) -- one selection per image, on its grid; an AnyRes image
   (LLaVA-NeXT / OneVision: base view + crops packed with newlines) splits its budget over its views and selects
   per view (``vtc.multiview``), newlines following the kept rows. The frames of a video share one budget
   (``select_frames``), and so do the images of one prompt under ``images_as_video``. Every selection is applied to
   the extra feature levels the LLM reads at the same placeholders (Qwen3-VL deepstack) by ``reduce_level``.
3. **keep mask** (``keep_mask``) -- the prompt tokens the LLM receives: text always, placeholders as selected
   (a video's trailing layout tokens always), padding never.
4. **repack** (``shrink``, ``repack``) -- unkept tokens dropped from ``input_ids`` / ``attention_mask`` /
   ``mm_token_type_ids`` / ``labels``, rows re-padded to the longest kept prompt; positions computed on the
   *original* sequence and those of the kept tokens passed (``positions="keep"``); ``mm_encoder_outputs`` holding
   only the kept (or merged) features and levels.
5. **call** (``run_generate`` / ``run_forward``) -- the original method on the shortened inputs.

Stages 1-3 are ``select_call``: the one path shared by the wrapped methods and the dry run (``dry_run``,
``vtc.select``), which returns the records without running the LLM. Nothing inside the model is patched: the
placeholder count, ``get_placeholder_mask`` and ``masked_scatter`` stay consistent by construction, and the KV cache,
masks and decode positions of ``generate`` simply see a shorter prompt. Calls without ``pixel_values`` or
``pixel_values_videos`` (text-only prompts, and generate's own inner forward calls) pass straight through.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from vtc.allocation import Allocation, Even
from vtc.budget import Budget, resolve_budget
from vtc.compressor import Compressor, VisualTokens, run_compressor
from vtc.multiview import MultiViewTokens, select_views
from vtc.selection import ImageSelection, Selection, SelectionRecords
from vtc.signals import Signal, TowerInfo
from vtc.video import VideoRecord, VideoSelection, VideoTokens, run_video_compressor

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
    #: the compressor acting inside the LLM (``vtc.inllm.LLMCompressor``), its budget and the last call's records;
    #: ``encoder_cut`` False: nothing is cut between encoder and LLM (no encoder-side compressor stacked)
    llm: Any = None
    llm_budget: Budget | None = None
    llm_video_budget: Budget | None = None  # videos' budget inside the LLM (None: llm_budget)
    llm_records: list = field(default_factory=list)
    encoder_cut: bool = True
    #: True while a wrapped call runs the original method: generate's inner forward calls pass straight through
    busy: bool = False

    @property
    def frames_budget(self) -> Budget:
        """The budget shared by the frames of one video (or by one prompt's images under ``images_as_video``)."""
        return self.video_budget if self.video_budget is not None else self.budget


@dataclass
class CallContext:
    """Per-call data the select stage reads: built by ``encode``, passed as an argument, never stored."""

    state: CutState
    tower: TowerInfo
    #: per prompt row: the embeddings of its text tokens (query-aware compressors), else ``None``
    queries: list[torch.Tensor] | None = None
    #: per prompt row: its text token ids (a frame scorer asking the wrapped model about the frames), else ``None``
    text_ids: list[torch.Tensor] | None = None

    @property
    def compressor(self) -> Compressor:
        return self.state.compressor

    @functools.cached_property
    def own_signals(self) -> frozenset[Signal]:
        """The compressor's signals (not the allocation's, which only the AnyRes views read)."""
        return frozenset(self.compressor.signals(self.tower))

    def query(self, row: int) -> torch.Tensor | None:
        return None if self.queries is None else self.queries[row]

    def tokens(self, features: torch.Tensor, grid: tuple[int, int], signals: dict[Signal, torch.Tensor], row: int,
               num_prefix_tokens: int = 0) -> VisualTokens:
        """One image or frame as the compressor receives it: its own signals and the query of prompt ``row``."""
        own = {k: x for k, x in signals.items() if k in self.own_signals}
        return VisualTokens(features=features, grid=grid, signals=own, query=self.query(row),
                            num_prefix_tokens=num_prefix_tokens)


@dataclass
class KeptTokens:
    """What one image or video keeps: places in its placeholder run, and what the LLM receives there."""

    indices: torch.Tensor  # [K] ascending, into the item's placeholder run (a video's layout suffix included)
    features: torch.Tensor  # [K, D] the kept (or merged) features, in the order of ``indices``
    #: per extra feature level (Qwen3-VL deepstack): the same selection applied to it (a video's suffix excluded)
    levels: list[torch.Tensor] = field(default_factory=list)


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


# ==================================================================================================== 1. encode
def declared_signals(state: CutState, tower) -> tuple:
    """The compressor's signals, then those of the allocation (multi-view families), without repeats."""
    signals = tuple(state.compressor.signals(tower))
    if state.adapter.multi_view:
        signals = signals + tuple(state.allocation.signals(tower))
    return tuple(dict.fromkeys(signals))


def _text_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor, placeholder_ids) -> list[torch.Tensor]:
    """Per batch row: the ids of its text tokens (neither padding nor an image / video placeholder)."""
    placeholders = torch.tensor([i for i in placeholder_ids if i is not None], dtype=input_ids.dtype,
                                device=input_ids.device)
    return [row[(mask != 0) & ~torch.isin(row, placeholders)] for row, mask in zip(input_ids, attention_mask)]


def encode(state: CutState, inputs: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor
           ) -> tuple[CallContext, EncodedImages | None, EncodedVideos | None]:
    """Stage 1: the call's images and videos through the family's own encoders, capturing the declared signals,
    and the call's context (tower, per-row query embeddings and text ids where the compressor asks for them)."""
    adapter = state.adapter
    tower = adapter.tower_info(inputs)
    signals = declared_signals(state, tower)
    compressor = state.compressor
    text_ids = None
    if compressor.uses_query or compressor.needs_frame_scores:
        text_ids = _text_ids(input_ids, attention_mask, (adapter.image_token_id(), adapter.video_token_id()))
    with offloaded_weights_loaded(adapter.model):
        images = adapter.encode(inputs, signals) if inputs.get("pixel_values") is not None else None
        videos = adapter.encode_videos(inputs, signals) if inputs.get("pixel_values_videos") is not None else None
        queries = None
        if compressor.uses_query:
            embeddings = adapter.model.get_input_embeddings()
            queries = [embeddings(ids).detach() for ids in text_ids]
    context = CallContext(state, tower, queries, text_ids if compressor.needs_frame_scores else None)
    return context, images, videos


# ==================================================================================================== 2. select
def replay_merge(selection: Selection, level: torch.Tensor) -> torch.Tensor:
    """A merge stated as coefficients (``Selection.weights``) applied to another feature set of the same tokens."""
    rows = [w.to(level.device, torch.float32) @ level[g.to(level.device)].float()
            for g, w in zip(selection.groups, selection.weights)]
    return torch.stack(rows).to(level.dtype)


def reduce_level(compressor: Compressor, selection: Selection, level: torch.Tensor,
                 again: Callable[[torch.Tensor], Selection]) -> torch.Tensor:
    """``selection`` applied to another feature set of the same tokens (``level``, ``[N, D]``: a Qwen3-VL deepstack
    level of an image or a video).

    Kept tokens take their own rows; a merge stated as coefficients (``Selection.weights``) is replayed. Otherwise
    ``again(level)`` selects anew on the level's features with the same signals, query and budget: every built-in
    merging compressor (pool, visionzip) forms its groups from the grid and the captured signals only, so the re-run
    reproduces the groups and merges the level's rows with the compressor's own rule. A compressor whose groups
    then differ (they depend on the features) is refused: its merge cannot be applied to every level.
    """
    if selection.features is None:
        return level[selection.indices.to(level.device)]
    if selection.weights is not None:
        return replay_merge(selection, level)
    rerun = again(level)
    same = rerun.features is not None and torch.equal(rerun.indices.cpu(), selection.indices.cpu())
    if same and selection.groups is not None:
        same = rerun.groups is not None and all(
            torch.equal(a.cpu(), b.cpu()) for a, b in zip(rerun.groups, selection.groups)
        )
    if not same:
        raise RuntimeError(
            f"compressor {compressor.name!r} merges tokens into groups that depend on the features: run again on "
            "this model's extra feature levels (Qwen3-VL deepstack features, which must get the same selection) it "
            "formed different groups, so its merge cannot be applied to every level; on this model use a pruning "
            "compressor, one that states its merge weights (Selection.weights), or a merging one whose groups come "
            "from the grid or the captured signals only"
        )
    return rerun.features.to(level.dtype)


def _kept_features(features: torch.Tensor, selection: Selection) -> torch.Tensor:
    """The rows the LLM receives for ``selection`` of ``features``: the kept rows, or the merged features."""
    if selection.features is None:
        return features[selection.indices.to(features.device)]
    return selection.features.to(features.dtype)


def select_multiview(ctx: CallContext, images: EncodedImages, i: int, row: int) -> ImageSelection:
    """An AnyRes image: allocate the budget over its views, select per view, keep the newlines of kept rows."""
    state = ctx.state
    layout = images.layouts[i].packed
    image = MultiViewTokens(features=images.features[i], layout=layout, view_signals=images.views[i],
                            tower=ctx.tower, query=ctx.query(row))
    result = select_views(state.compressor, state.allocation, image, state.budget, set(ctx.own_signals))
    return ImageSelection(
        image_index=i,
        batch_index=row,
        num_tokens=layout.num_tokens,
        grid=layout.base,
        budget=result.budget,
        selection=_detached(result.selection),
        compressor=state.compressor.name,
        layout=layout,
        view_budgets=result.view_budgets,
        allocation=state.allocation.name,
    )


def select_image(ctx: CallContext, images: EncodedImages, i: int, row: int) -> tuple[ImageSelection, KeptTokens]:
    """Image ``i`` (of prompt ``row``) on its own: the budget of one image, its extra levels selected alike."""
    layout, features = images.layouts[i], images.features[i]
    levels = images.levels[i] if images.levels else []
    if layout.packed is not None:
        if levels:
            raise NotImplementedError("extra feature levels of multi-view images are not supported")
        record = select_multiview(ctx, images, i, row)
        return record, KeptTokens(record.selection.indices, _kept_features(features, record.selection))
    tokens = ctx.tokens(features, layout.grid, images.signals[i], row, layout.num_prefix_tokens)
    selection = run_compressor(ctx.compressor, tokens, ctx.state.budget)

    def again(level: torch.Tensor) -> Selection:
        return ctx.compressor.select(dataclasses.replace(tokens, features=level), selection.num_kept)

    record = ImageSelection(
        image_index=i,
        batch_index=row,
        num_tokens=tokens.num_tokens,
        grid=layout.grid,
        budget=selection.num_kept,  # run_compressor checked it equals the resolved budget
        selection=_detached(selection),
        compressor=ctx.compressor.name,
        num_prefix_tokens=layout.num_prefix_tokens,
    )
    kept_levels = [reduce_level(ctx.compressor, selection, level, again) for level in levels]
    return record, KeptTokens(selection.indices, _kept_features(features, record.selection), kept_levels)


def frame_scores(ctx: CallContext, frames: list[torch.Tensor], row: int) -> torch.Tensor:
    """Per-frame relevance from the wrapped model itself (QuoTA's "self" scorer), for compressors that ask."""
    state = ctx.state
    scorer = state.frame_scorer
    if scorer is None:
        raise ValueError(
            f"compressor {state.compressor.name!r} scores frames with the wrapped model, which needs its tokenizer: "
            f"vtc.apply(model, {state.compressor.name!r}, ..., processor=processor)"
        )
    model = state.adapter.model
    return scorer.score(model, frames, scorer.prompt(model, scorer.question(ctx.text_ids[row])))


def select_frames(ctx: CallContext, frames: list[VisualTokens], row: int, levels: list[torch.Tensor],
                  timestamps: list[float] | None = None
                  ) -> tuple[VideoTokens, VideoSelection, Selection, list[torch.Tensor]]:
    """Frames of prompt ``row`` sharing one budget (``CutState.frames_budget``): a video, or the prompt's images
    under ``images_as_video``.

    Returns the video, the compressor's selection, that selection flat over the frames' concatenated tokens, and
    the flat selection applied to each of ``levels`` (``[N_video, D]`` each). Frame scores come from the wrapped
    model where the compressor asks (``Compressor.needs_frame_scores``); a single frame needs none.
    """
    compressor, budget = ctx.compressor, ctx.state.frames_budget
    scores = None
    if compressor.needs_frame_scores and len(frames) > 1:
        scores = frame_scores(ctx, [f.features for f in frames], row)
    video = VideoTokens(frames=frames, timestamps=timestamps, query=ctx.query(row), frame_scores=scores)
    result = run_video_compressor(compressor, video, budget)
    flat = result.flat(video)

    def again(level: torch.Tensor) -> Selection:
        parts = torch.split(level, video.frame_sizes)
        on_level = dataclasses.replace(video, frames=[dataclasses.replace(f, features=p)
                                                      for f, p in zip(video.frames, parts)])
        return run_video_compressor(compressor, on_level, budget).flat(on_level)

    return video, result, flat, [reduce_level(compressor, flat, level, again) for level in levels]


def select_image_sequences(ctx: CallContext, images: EncodedImages, rows: list[int]
                           ) -> tuple[list[ImageSelection], list[VideoRecord], list[KeptTokens]]:
    """``images_as_video``: the images of each prompt are the frames of one video (``select_frames``); each image
    keeps its frame's selection, so the rest of the cut is the image cut."""
    by_row: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        by_row.setdefault(row, []).append(i)
    records: list[ImageSelection | None] = [None] * len(images.features)
    kept: list[KeptTokens | None] = [None] * len(images.features)
    videos = []
    num_levels = len(images.levels[0]) if images.levels else 0
    for v, (row, members) in enumerate(sorted(by_row.items())):
        if any(images.layouts[i].packed is not None for i in members):
            raise ValueError(
                "images_as_video treats each image as one frame, but these images are AnyRes (several views); "
                "pass the frames as a video (pixel_values_videos) or use images_as_video=False"
            )
        frames = [ctx.tokens(images.features[i], images.layouts[i].grid, images.signals[i], row,
                             images.layouts[i].num_prefix_tokens) for i in members]
        levels = [torch.cat([images.levels[i][j] for i in members]) for j in range(num_levels)]
        _, result, _, kept_levels = select_frames(ctx, frames, row, levels)
        per_frame = [r.num_kept for r in result.frames]
        frame_levels = [torch.split(level, per_frame) for level in kept_levels]
        for t, (i, record) in enumerate(zip(members, result.frames)):
            records[i] = ImageSelection(
                image_index=i, batch_index=row, num_tokens=frames[t].num_tokens, grid=frames[t].grid,
                budget=record.budget, selection=_detached(record.selection), compressor=ctx.compressor.name,
                num_prefix_tokens=frames[t].num_prefix_tokens, extra={"video": v, "frame": t})
            kept[i] = KeptTokens(record.selection.indices, _kept_features(images.features[i], records[i].selection),
                                 [parts[t] for parts in frame_levels])
        videos.append(VideoRecord(video_index=v, batch_index=row, grids=[f.grid for f in frames], selection=result,
                                  compressor=ctx.compressor.name))
    return records, videos, kept


def select_images(ctx: CallContext, images: EncodedImages, rows: list[int]
                  ) -> tuple[list[ImageSelection], list[VideoRecord], list[KeptTokens]]:
    """Stage 2 for the images of the call (image ``i`` in prompt ``rows[i]``): per image its record and what it
    keeps; under ``images_as_video`` also the record of each prompt's image sequence."""
    if ctx.state.images_as_video:
        return select_image_sequences(ctx, images, rows)
    selected = [select_image(ctx, images, i, row) for i, row in enumerate(rows)]
    return [record for record, _ in selected], [], [kept for _, kept in selected]


def select_videos(ctx: CallContext, videos: EncodedVideos, rows: list[int]
                  ) -> tuple[list[VideoRecord], list[KeptTokens]]:
    """Stage 2 for the videos of the call (video ``v`` in prompt ``rows[v]``): per video its record and what it
    keeps -- the selected frame tokens, then its layout suffix, always kept."""
    records, kept = [], []
    for v, row in enumerate(rows):
        frames = [ctx.tokens(f, g, s, row) for f, g, s in zip(videos.frames[v], videos.grids[v], videos.signals[v])]
        stamps = videos.timestamps[v] if videos.timestamps else None
        levels = videos.levels[v] if videos.levels else []
        video, result, flat, kept_levels = select_frames(ctx, frames, row, levels, stamps)
        flat = _detached(flat)
        features = _kept_features(torch.cat(videos.frames[v]), flat)
        indices = flat.indices
        suffix = videos.suffix[v] if videos.suffix else features[:0]
        if suffix.shape[0]:  # layout tokens after the frames (OneVision's newline)
            features = torch.cat([features, suffix.to(features.dtype)])
            tail = torch.arange(video.num_tokens, video.num_tokens + suffix.shape[0], device=indices.device)
            indices = torch.cat([indices, tail])
        kept.append(KeptTokens(indices, features, kept_levels))
        records.append(VideoRecord(video_index=v, batch_index=row, grids=list(videos.grids[v]), selection=result,
                                   compressor=ctx.compressor.name, timestamps=stamps,
                                   num_suffix_tokens=int(suffix.shape[0])))
    return records, kept


def _detached(selection: Selection) -> Selection:
    return Selection(
        indices=selection.indices.detach(),
        features=None if selection.features is None else selection.features.detach(),
        groups=selection.groups,
        scores=None if selection.scores is None else selection.scores.detach(),
        weights=None if selection.weights is None else tuple(w.detach() for w in selection.weights),
        details=selection.details,
    )


# ==================================================================================================== 3. keep mask
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


@dataclass
class Placeholders:
    """Where the images (or the videos) of a call sit in the prompt: one run of placeholder tokens each."""

    slots: torch.Tensor  # flat (row-major) positions of every placeholder, item after item
    sizes: list[int]  # placeholders of each item
    rows: list[int]  # the batch row of each item

    @classmethod
    def find(cls, input_ids: torch.Tensor, token_id: int, sizes: list[int], what: str) -> "Placeholders":
        slots, rows = _image_slots(input_ids, token_id, sizes, what=what)
        return cls(slots, sizes, rows)


def keep_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor,
              runs: list[tuple[Placeholders, list[KeptTokens]]]) -> torch.Tensor:
    """Stage 3: ``[B, L]`` bool, the prompt tokens the LLM receives -- text always, placeholders where their item's
    ``KeptTokens.indices`` say, padding never (rows are re-padded to the longest kept prompt, not the old length)."""
    keep = torch.ones(input_ids.numel(), dtype=torch.bool, device=input_ids.device)
    for where, kept in runs:
        keep[where.slots] = False
        offset = 0
        for size, item in zip(where.sizes, kept):
            keep[where.slots[offset + item.indices.to(where.slots.device)]] = True
            offset += size
    return keep.view_as(input_ids) & (attention_mask != 0)


# ==================================================================================================== 0. resize
@dataclass
class ResizedCall:
    """A call whose pictures the pre-encoder stage made smaller: the rewritten prompt and pixel inputs."""

    inputs: dict  # the call's inputs with the resized pixels and grids
    input_ids: torch.Tensor  # the prompt with each picture's surplus placeholders removed (re-padded)
    attention_mask: torch.Tensor
    per_token: dict  # labels / mm_token_type_ids repacked alike (None entries stay None)
    image_sources: list[tuple[int, int]]  # per image, the (rows, cols) token grid it had
    state: "CutState"  # the state the select stage uses: every token of the resized pictures kept


def resize_plan(state: CutState, inputs: dict) -> tuple[list, list] | None:
    """Stage 0's target grids: per image and per video the ``(rows, cols)`` token grid ``Compressor.input_grid``
    picks for its budget (a video: ``budget // steps`` tokens per temporal step, one grid for all its steps), or
    ``None`` when the call has no pre-encoder stage (the compressor has none, the family cannot resize, or the
    images of a prompt are one video's frames under ``images_as_video``)."""
    compressor, adapter = state.compressor, state.adapter
    if state.llm is not None and not state.encoder_cut:
        return None
    if compressor.input_grid((1, 1), 1) is None or not adapter.can_resize_inputs or state.images_as_video:
        return None
    images = [compressor.input_grid((rows, cols), resolve_budget(state.budget, steps * rows * cols))
              for steps, rows, cols in adapter.token_grids(inputs, "image")]
    videos = []
    for steps, rows, cols in adapter.token_grids(inputs, "video"):
        total = resolve_budget(state.frames_budget, steps * rows * cols)
        videos.append(compressor.input_grid((rows, cols), max(1, total // steps)))
    return images, videos


def resize_stage(state: CutState, inputs: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 per_token: dict) -> ResizedCall | None:
    """Stage 0 (``downsample``): each picture resized *before* the encoder to its planned grid (``resize_plan``;
    the adapter's ``resize_inputs`` rewrites the pixels and grids as the processor would have given them for the
    smaller picture), and the prompt rewritten to match -- each image (each temporal step of a video) keeps the
    first ``rows * cols`` of its placeholders. The rest of the cut then keeps every token: the LLM gets exactly the
    prompt of the smaller pictures, with the positions the model gives that prompt. ``None``: no stage."""
    plan = resize_plan(state, inputs)
    if plan is None:
        return None
    image_grids, video_grids = plan
    adapter = state.adapter
    keep = torch.ones(input_ids.numel(), dtype=torch.bool, device=input_ids.device)
    sources = []
    for what, token_id, grids in (("image", adapter.image_token_id(), image_grids),
                                  ("video", adapter.video_token_id(), video_grids)):
        shapes = adapter.token_grids(inputs, what)
        if not shapes:
            continue
        where = Placeholders.find(input_ids, token_id, [t * r * c for t, r, c in shapes], what)
        offset = 0
        for (steps, rows, cols), (new_rows, new_cols) in zip(shapes, grids):
            per_step = rows * cols
            drop = torch.arange(per_step, device=keep.device) >= new_rows * new_cols
            for step in range(steps):
                start = offset + step * per_step
                keep[where.slots[start:start + per_step][drop.to(where.slots.device)]] = False
            offset += steps * per_step
            if what == "image":
                sources.append((rows, cols))
    keep = keep.view_as(input_ids) & (attention_mask != 0)
    length = int(keep.sum(dim=1).max())
    pad_left = not bool((attention_mask[:, -1] == 0).any())
    pack = functools.partial(repack, keep=keep, length=length, pad_left=pad_left)
    fills = {"labels": -100, "mm_token_type_ids": 0}
    rewritten = dict(inputs)
    rewritten.update(adapter.resize_inputs(inputs, image_grids or None, video_grids or None))
    return ResizedCall(
        inputs=rewritten,
        input_ids=pack(input_ids, fill=_pad_id(adapter.model)),
        attention_mask=pack(attention_mask, fill=0),
        per_token={k: None if v is None else pack(v, fill=fills.get(k, 0)) for k, v in per_token.items()},
        image_sources=sources,
        state=dataclasses.replace(state, budget=1.0, video_budget=1.0),
    )


def _mark_resized(selected: "SelectedCall", resized: ResizedCall, had: list[int]) -> None:
    """Records of a resized call: each image notes the grid it had; prompt lengths count the caller's prompt."""
    for record, source in zip(selected.records, resized.image_sources):
        record.extra["resized_from"] = source
    selected.prompt_lengths = [(int(n), received) for n, (_, received) in zip(had, selected.prompt_lengths)]


# ================================================================================== stages 1-3, for a call or a dry run
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
    """What stages 1-3 give for one call: the records, and what the repack needs to apply them."""

    images: EncodedImages | None
    videos: EncodedVideos | None
    records: list[ImageSelection]
    video_records: list[VideoRecord]  # images_as_video sequences first, then the call's videos
    kept_images: list[KeptTokens]
    kept_videos: list[KeptTokens]
    keep: torch.Tensor  # [B, L] bool: the prompt tokens the LLM receives (padding excluded)
    prompt_lengths: list[tuple[int, int]]  # per prompt: (tokens it had, tokens the LLM receives), padding excluded


def select_call(state: CutState, inputs: dict, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> SelectedCall:
    """Stages 1-3 -- encode, select, keep mask -- for one call; ``inputs`` is only read.

    The one path from pixels to records, shared by the wrapped methods (``shrink``) and the dry run (``dry_run``), so
    a dry run's records are those of the call it stands for.
    """
    adapter = state.adapter
    ctx, images, videos = encode(state, inputs, input_ids, attention_mask)
    runs = []
    records, sequences, kept_images = [], [], []
    if images is not None:
        where = Placeholders.find(input_ids, adapter.image_token_id(), [int(f.shape[0]) for f in images.features],
                                  "image")
        records, sequences, kept_images = select_images(ctx, images, where.rows)
        runs.append((where, kept_images))
    video_records, kept_videos = [], []
    if videos is not None:
        suffix = [int(x.shape[0]) for x in videos.suffix] if videos.suffix else [0] * len(videos.frames)
        sizes = [sum(int(f.shape[0]) for f in frames) + k for frames, k in zip(videos.frames, suffix)]
        where = Placeholders.find(input_ids, adapter.video_token_id(), sizes, "video")
        video_records, kept_videos = select_videos(ctx, videos, where.rows)
        runs.append((where, kept_videos))
    keep = keep_mask(input_ids, attention_mask, runs)
    had = (attention_mask != 0).sum(dim=1).tolist()
    lengths = [(int(n), int(k)) for n, k in zip(had, keep.sum(dim=1).tolist())]
    return SelectedCall(images=images, videos=videos, records=records, video_records=sequences + video_records,
                        kept_images=kept_images, kept_videos=kept_videos, keep=keep, prompt_lengths=lengths)


def dry_run(state: CutState, inputs: dict) -> SelectionRecords:
    """The records a wrapped ``generate`` / ``forward`` with ``inputs`` would make, without running the LLM.

    Runs ``select_call`` (vision tower, signal capture, selection) under ``torch.no_grad`` on a copy of ``inputs``;
    the language model runs only where the selection itself asks it (QuoTA's ``scorer="self"``). The model's state
    is left as it was: ``last_selection`` / ``last_video_selection`` / ``last_prompt_lengths`` still describe the
    last wrapped call. Keys other than the processor's outputs (e.g. ``max_new_tokens``) are ignored.
    """
    inputs = dict(inputs)
    if state.llm is not None and not state.encoder_cut:
        raise ValueError(f"{state.llm.name!r} drops tokens inside the LLM: its selection needs the LLM's own run; "
                         "call generate / forward and read vtc.last_llm_selection(model)")
    if not _has_visual_inputs(inputs):
        return SelectionRecords(images=[], videos=[], prompt_lengths=_unshrunk_lengths(inputs))
    input_ids, attention_mask = _take_prompt(inputs)
    saved = state.records, state.video_records, state.prompt_lengths
    try:  # a selection that asks the wrapped model (QuoTA's query decoupling) must not leave its call's records
        with torch.no_grad():
            had = (attention_mask != 0).sum(dim=1).tolist()
            resized = resize_stage(state, inputs, input_ids, attention_mask, {})
            if resized is None:
                selected = select_call(state, inputs, input_ids, attention_mask)
            else:
                selected = select_call(resized.state, resized.inputs, resized.input_ids, resized.attention_mask)
                _mark_resized(selected, resized, had)
    finally:
        state.records, state.video_records, state.prompt_lengths = saved
    return SelectionRecords(images=selected.records, videos=selected.video_records,
                            prompt_lengths=selected.prompt_lengths)


# ==================================================================================================== 4. repack
def _pad_id(model) -> int:
    for source in (model.generation_config, model.config, getattr(model.config, "text_config", None)):
        value = getattr(source, "pad_token_id", None) if source is not None else None
        if value is not None:
            return int(value[0] if isinstance(value, (list, tuple)) else value)
    return 0


def repack(tensor: torch.Tensor, keep: torch.Tensor, length: int, fill, pad_left: bool) -> torch.Tensor:
    """``tensor`` (``[..., B, L]``) with only the ``keep`` (``[B, L]``) columns of each row, padded with ``fill`` to
    ``length`` on the side the batch was padded."""
    rows = []
    for b in range(keep.shape[0]):
        kept = tensor[..., b, keep[b]]
        filler = torch.full((*kept.shape[:-1], length - kept.shape[-1]), fill, dtype=tensor.dtype,
                            device=tensor.device)
        rows.append(torch.cat([filler, kept] if pad_left else [kept, filler], dim=-1))
    return torch.stack(rows, dim=-2)


def _original_positions(state: CutState, user_positions, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        position_inputs: dict) -> torch.Tensor | None:
    """Positions ``[R, B, L]`` of the original prompt, to pass those of the kept tokens (``None``: the model numbers
    the shortened prompt itself, ``positions="reindex"``). Positions the caller gave win."""
    if user_positions is not None:
        positions = user_positions if user_positions.dim() == 3 else user_positions[None]
        return positions[1:] if positions.shape[0] == 4 else positions  # Qwen's text row is rebuilt from the mask
    if state.positions == "keep":
        return state.adapter.original_positions(input_ids, attention_mask, position_inputs)
    return None


def encoder_outputs(adapter: FamilyAdapter, selected: SelectedCall) -> dict:
    """``mm_encoder_outputs`` for the shortened prompt: per modality, the adapter's copy of its encoder output holding
    only the kept (or merged) features, and the extra levels with the same selection."""
    outputs = {}
    if selected.images is not None:
        kept = selected.kept_images
        outputs["image"] = adapter.shrink_output(selected.images, [k.features for k in kept], [k.levels for k in kept])
    if selected.videos is not None:
        kept = selected.kept_videos
        outputs["video"] = adapter.shrink_video_output(selected.videos, [k.features for k in kept],
                                                       [k.levels for k in kept])
    return outputs


def shrink(state: CutState, inputs: dict, with_labels: bool) -> ShrunkInputs:
    """Stages 1-4: ``select_call``, then the shortened inputs for the original method."""
    model, adapter = state.adapter.model, state.adapter
    input_ids, attention_mask = _take_prompt(inputs)
    user_positions = inputs.pop("position_ids", None)
    mm_token_type_ids = inputs.pop("mm_token_type_ids", None)
    labels = inputs.pop("labels", None) if with_labels else None

    caller_ids = input_ids
    resized = resize_stage(state, inputs, input_ids, attention_mask,
                           {"labels": labels, "mm_token_type_ids": mm_token_type_ids})
    if resized is None:
        selected = select_call(state, inputs, input_ids, attention_mask)
    else:
        if user_positions is not None:
            raise ValueError(f"{state.compressor.name!r} resizes the pictures before the encoder, which changes the "
                             "prompt's positions; leave position_ids out (the model numbers the smaller prompt)")
        had = (attention_mask != 0).sum(dim=1).tolist()
        inputs.update(resized.inputs)
        input_ids, attention_mask = resized.input_ids, resized.attention_mask
        labels, mm_token_type_ids = resized.per_token["labels"], resized.per_token["mm_token_type_ids"]
        selected = select_call(resized.state, inputs, input_ids, attention_mask)
        _mark_resized(selected, resized, had)
    position_inputs = dict(adapter.position_inputs(inputs))
    if mm_token_type_ids is not None:
        position_inputs["mm_token_type_ids"] = mm_token_type_ids
    for key in (*adapter.encoder_kwargs(inputs), *adapter.consumed_keys):
        inputs.pop(key, None)
    positions = _original_positions(state, user_positions, input_ids, attention_mask, position_inputs)

    keep = selected.keep
    new_length = int(keep.sum(dim=1).max())
    pad_left = not bool((attention_mask[:, -1] == 0).any())  # right padding shows up as zeros at the end
    pack = functools.partial(repack, keep=keep, length=new_length, pad_left=pad_left)
    new_mask = pack(attention_mask, fill=0)
    out = {"input_ids": pack(input_ids, fill=_pad_id(model)), "attention_mask": new_mask}
    if mm_token_type_ids is not None:
        out["mm_token_type_ids"] = pack(mm_token_type_ids, fill=0)
    if labels is not None:
        out["labels"] = pack(labels, fill=-100)
    if positions is not None:
        out["position_ids"] = adapter.position_ids(pack(positions, fill=1), new_mask)
    out["mm_encoder_outputs"] = encoder_outputs(adapter, selected)
    state.records = selected.records
    state.video_records = selected.video_records
    state.prompt_lengths = selected.prompt_lengths
    inputs.update(out)
    return ShrunkInputs(kwargs=inputs, original_input_ids=caller_ids, new_length=new_length)


# ==================================================================================================== 5. call
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


def _image_counts(state: CutState, inputs: dict) -> list[int] | None:
    """Placeholders of each image the LLM receives, row-major: what the encoder stage kept, or the adapter's count
    of the call's images (``None`` when it has none: images are then told apart by runs of placeholders)."""
    if state.encoder_cut:
        return [int(r.indices.numel()) for r in state.records] if state.records else None
    if inputs.get("pixel_values") is None:
        return None
    try:
        return list(state.adapter.image_token_counts(inputs))
    except NotImplementedError:
        return None


def _call(state: CutState, original, inputs: dict, generating: bool, counts: list[int] | None = None):
    """``original(**inputs)``, with the LLM-side cut around it when a compressor acts inside the LLM."""
    if state.llm is None:
        return original(**inputs)
    from .llm_cut import LLMCut

    state.llm_records = []
    if generating:
        config = inputs.get("generation_config") or state.adapter.model.generation_config
        if inputs.get("use_cache", getattr(config, "use_cache", True)) is False:
            raise ValueError("vtc's LLM-side compressors need generate(..., use_cache=True): without a cache every "
                             "step would prune the whole sequence again")
    input_ids = inputs.get("input_ids")
    if input_ids is None:
        raise ValueError("vtc's LLM-side compressors find the visual tokens by their placeholder ids: pass "
                         "input_ids (not inputs_embeds)")
    adapter = state.adapter
    cut = LLMCut(state.llm, state.llm_budget, adapter.language_model(), input_ids, inputs.get("attention_mask"),
                 adapter.image_token_id(), adapter.video_token_id(), first_layer=adapter.llm_first_layer(),
                 video_budget=state.llm_video_budget, image_counts=counts)
    state.busy = True
    try:
        with cut.installed():
            output = original(**inputs)
    finally:
        state.busy = False
    state.llm_records = cut.records(state.llm.name)
    return output


def run_generate(state: CutState, original, args: tuple, kwargs: dict):
    """A wrapped ``generate``: shrink the prompt, run ``original``, hand back the caller's own prompt ids."""
    inputs = _bind(original, args, kwargs)
    if not _has_visual_inputs(inputs) or not state.encoder_cut:
        state.records, state.video_records = [], []
        state.prompt_lengths = _unshrunk_lengths(inputs)
        if not _has_visual_inputs(inputs):
            state.llm_records = []
            return original(**inputs)
        return _call(state, original, inputs, generating=True, counts=_image_counts(state, inputs))
    shrunk = shrink(state, inputs, with_labels=False)
    output = _call(state, original, shrunk.kwargs, generating=True, counts=_image_counts(state, inputs))
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
    if state.busy:  # generate's own forward calls inside an LLM-side cut
        return original(**inputs)
    if not _has_visual_inputs(inputs):
        state.llm_records = []
        return original(**inputs)
    if not state.encoder_cut:
        state.records, state.video_records = [], []
        state.prompt_lengths = _unshrunk_lengths(inputs)
        return _call(state, original, inputs, generating=False, counts=_image_counts(state, inputs))
    shrunk = shrink(state, inputs, with_labels=True)
    return _call(state, original, shrunk.kwargs, generating=False, counts=_image_counts(state, inputs))


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
