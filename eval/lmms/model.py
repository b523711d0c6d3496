"""vtc as an lmms-eval model: one model id (``vtc``) for every supported family, any compressor, any budget.

    python -m lmms_eval --model vtc \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,compressor=hiprune,budget=64 --tasks mme

``pretrained`` is a local ``save_pretrained`` folder or a hub id (default: vtc's embedded model); the family comes
from the checkpoint (``AutoModelForImageTextToText``), so one wrapper serves LLaVA-1.5, LLaVA-NeXT,
LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL and Qwen3-VL. ``compressor=none`` is the uncompressed baseline; otherwise
``budget`` is required (int: tokens per image, float in (0, 1]: fraction kept), and every other key is a vtc option
(``video_budget``, ``positions``, ``allocation``, ``images_as_video``) or a compressor option (``start_layer=16``),
checked when the model loads. Prompts go through the processor's chat template; a video (a file path from the
task) is sampled to ``max_frames_num`` frames and given as a video to families with a video input, and as that many
images sharing ``video_budget`` to LLaVA-1.5 / NeXT (``images_as_video``). A video-only compressor (``fastvid``,
``dycoke``, ...) on a family without a video input treats every prompt's images as one video
(``images_as_video=True`` by default there: an image task's picture is a one-frame video).

Output folder: lmms-eval names ``--output_path/<folder>/`` after ``pretrained=`` (``llava-hf__llava-1.5-7b-hf``), or,
without one (the embedded model), after ``model_name=`` -- e.g. ``model_name=vtc-default__hiprune_64`` -- else it
writes at the top level. Result files are time-stamped, so runs at several budgets never overwrite each other;
``vtc eval`` names each run's folder ``<model>__<compressor>_<budget>`` itself.

Each response carries its measurements in lmms-eval's per-sample ``token_counts`` (samples JSONL): prompt tokens
before and after compression, visual tokens in and out, time to first token, generate time and peak memory; the
model keeps the same records in ``sample_stats``. Loglikelihood requests return lmms-eval's convention, the mean
negative log-likelihood of the continuation (tasks take the argmin) and whether it is the greedy continuation.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from tqdm import tqdm

import vtc
from vtc.image_io import to_rgb
from vtc.integrations.transformers.preflight import (ModelNotFoundError, check_request, coerce_request_options,
                                                     resolve_model_ref)

from ..measure import FirstTokenClock, PeakMemory, make_cpu_memory_measurable, sync

NONE = "none"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class SampleStats(TokenCounts):
    """lmms-eval's per-sample token counts, plus what vtc measured for the request (logged as one dict)."""

    task: str | None = None
    doc_id: int | None = None
    request: str = "generate_until"
    compressor: str = NONE
    budget: float | int | None = None
    images: int = 0
    videos: int = 0
    visual_tokens_in: int = 0
    visual_tokens_out: int = 0
    prompt_tokens_in: int = 0
    prompt_tokens_out: int = 0
    first_token_seconds: float | None = None  # generate: prefill incl. vision tower and selection (loglikelihood:
    total_seconds: float = 0.0  # the forward)
    peak_memory_bytes: int | None = None
    peak_memory_source: str | None = None
    rank: int = 0  # the data-parallel process that served it (accelerate launch)
    prefill_flops: int | None = None  # analytic (vtc.flops.FORMULA) at the length the LLM received
    prefill_flops_parts: dict | None = None  # vision / projector / llm / lm_head

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _parse_budget(value):
    """``--model_args`` values arrive typed by lmms-eval ("64" -> 64, "0.25" -> 0.25); Python callers may pass
    strings too."""
    if value is None:
        return None
    if isinstance(value, str):
        return vtc.parse_budget(value)
    return vtc.validate_budget(value)


def _int_arg(name: str, value, minimum: int) -> int:
    """An integer ``--model_args`` value (lmms-eval hands ``8`` as 8 and ``8.0`` as 8.0), or an error naming it."""
    try:
        number = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or not number.is_integer() or number < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(number)


class VtcModel(lmms):
    """See the module docstring. ``model`` / ``processor`` may be given as objects (in-process sweeps reuse one
    loaded model); otherwise ``pretrained`` is loaded."""

    is_simple = True
    task_name = None  # the task of the request being served (error messages)

    def __init__(self, pretrained: str | None = None, compressor: str = NONE, budget=None, video_budget=None,
                 device: str | None = None, dtype: str = "auto", batch_size: int | str = 1,
                 max_frames_num: int = 8, max_new_tokens: int = 64, device_map: str | None = None,
                 model=None, processor=None, max_batch_size=None, progress: bool = True, model_name: str | None = None,
                 **options) -> None:
        # max_batch_size: passed by lmms-eval's CLI to every model; batches here are fixed (batch_size)
        # model_name: read by lmms-eval itself (not by vtc) to name the --output_path folder when there is no
        # pretrained= (the embedded model); recorded here only
        super().__init__()
        self.model_name = model_name
        from accelerate import Accelerator

        # data parallel (accelerate launch --multi_gpu --num_processes N): one replica per process; on a machine
        # without CUDA (or with device=cpu) the processes form a gloo group on the CPU
        on_cpu = (device is not None and torch.device(device).type == "cpu") or not torch.cuda.is_available()
        accelerator = Accelerator(cpu=on_cpu)
        self.accelerator = accelerator
        if accelerator.num_processes > 1:
            self._device = accelerator.device  # one replica per process (data parallel)
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size_per_gpu = _int_arg("batch_size", batch_size, 1)
        self.max_frames_num = _int_arg("max_frames_num", max_frames_num, 1)
        self.max_new_tokens = _int_arg("max_new_tokens", max_new_tokens, 1)
        self.progress = bool(progress)
        if self._device.type == "cpu":
            make_cpu_memory_measurable()  # per-request peak resident memory (see vtc.eval.measure)
        self.compressor = str(compressor).lower() if isinstance(compressor, str) else compressor
        self.budget = _parse_budget(budget)
        video_budget = _parse_budget(video_budget)
        if self.compressor == NONE:
            extra = {k: v for k, v in (("budget", budget), ("video_budget", video_budget)) if v is not None}
            extra.update(options)
            if extra:
                raise ValueError(
                    f"compressor=none is the uncompressed baseline and takes no compression options, got "
                    f"{sorted(extra)}; drop them, or name a compressor ({', '.join(vtc.list_compressors())})")
        elif self.budget is None:
            raise ValueError(f"compressor={self.compressor} needs a budget: add budget=<int tokens per image> or "
                             "budget=<fraction in (0, 1]> to --model_args")
        else:  # the compressor and its options, checked (and text read by type) before any model loads
            options = coerce_request_options(self.compressor, options)
            request = dict(options, **({"video_budget": video_budget} if video_budget is not None else {}))
            check_request(self.compressor, self.budget, request)
        self._unknown_words: set[str] = set()
        if model is None:
            model, processor, self.pretrained = self._load(pretrained, dtype, device_map)
        elif processor is None:
            raise ValueError("pass the model's processor together with model=")
        else:
            self.pretrained = pretrained or type(model).__name__
        if device_map is None:
            model.to(self._device)
        self._model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        if getattr(processor, "chat_template", None) is None and getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(f"{self.pretrained}: the processor has no chat template; vtc builds prompts with it. "
                             "Use a chat/instruct checkpoint or save one with a chat_template.")
        from vtc.integrations.transformers import adapter_for

        adapter = adapter_for(model)  # unsupported models fail here, naming the supported families
        self.native_video = adapter.video_token_id() is not None and getattr(processor, "video_processor", None) \
            is not None
        self.placeholder_ids = [i for i in (adapter.image_token_id(), adapter.video_token_id()) if i is not None]
        self.options = dict(options)
        if video_budget is not None:
            self.options["video_budget"] = video_budget
        if self.compressor != NONE and vtc.get_compressor_class(self.compressor).video_only \
                and not self.native_video:
            # a video method (it compares frames) on LLaVA-1.5 / NeXT: a video task's frames are one video anyway;
            # an image is a one-frame video, as in `vtc run` and the demo (refused by families where it cannot be)
            self.options.setdefault("images_as_video", True)
        self._images_as_video = None
        if self.compressor != NONE:
            self._apply(images_as_video=bool(self.options.get("images_as_video", False)))
        self.sample_stats: list[SampleStats] = []

    # -- loading and wrapping ---------------------------------------------------------------------------------
    @staticmethod
    def _load(pretrained, dtype, device_map):
        torch_dtype = None if dtype in (None, "auto") else _DTYPES.get(dtype)
        if dtype not in (None, "auto") and torch_dtype is None:
            raise ValueError(f"dtype={dtype!r} is not one of auto, {', '.join(_DTYPES)}")
        if pretrained in (None, "", "default"):
            from vtc.integrations.transformers.default import DEFAULT_MODEL_NAME

            model, processor = vtc.load_default(dtype=torch_dtype)
            return model, processor, DEFAULT_MODEL_NAME
        try:  # a missing folder, or a hub id with the Hub unreachable: one message now, not minutes of retries
            resolved = resolve_model_ref(pretrained)
        except ModelNotFoundError as exc:
            raise RuntimeError(f"vtc: {exc}") from None
        if resolved.note:
            warnings.warn(resolved.note, stacklevel=2)
        from transformers import AutoModelForImageTextToText, AutoProcessor

        kwargs = {"dtype": torch_dtype or "auto", "local_files_only": resolved.local_files_only}
        if device_map:
            kwargs["device_map"] = device_map
        try:
            model = AutoModelForImageTextToText.from_pretrained(resolved.ref, **kwargs)
            processor = AutoProcessor.from_pretrained(resolved.ref, local_files_only=resolved.local_files_only)
        except Exception as exc:  # the harness would log and carry on: say why and how to fix it
            raise RuntimeError(f"vtc: cannot load model {pretrained!r}: {exc}. Pass a local save_pretrained folder, "
                               "or a hub id on a machine with hub access.") from exc
        model.eval()
        return model, processor, str(pretrained)

    def _apply(self, images_as_video: bool) -> None:
        """(Re)wrap the model when a request needs a different ``images_as_video`` setting than the current one."""
        if self.compressor == NONE or self._images_as_video == images_as_video:
            return
        options = dict(self.options)
        options["images_as_video"] = images_as_video
        options.setdefault("processor", self.processor)  # for QuoTA's scorer=self (the model rates frames)
        vtc.apply(self._model, self.compressor, budget=self.budget, **options)
        self._images_as_video = images_as_video

    # -- lmms-eval's model interface ---------------------------------------------------------------------------
    @property
    def model(self):
        return self._model

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    @property
    def rank(self):
        return self._rank

    @property
    def world_size(self):
        return self._world_size

    def _visuals(self, doc_to_visual, task, split, doc_id) -> list:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        return list(visuals or [])

    def _encode(self, contexts: list[str], visuals: list[list], suffixes: list[str] | None = None):
        """Processor inputs for a batch of prompts; returns (inputs, images, videos, whether frames went in as
        images) -- the counts are of the task's visuals, a video counting once however it is fed."""
        from PIL import Image

        texts, images, videos = [], [], []
        as_video = False
        n_images = sum(isinstance(item, Image.Image) for items in visuals for item in items)
        n_videos = sum(isinstance(item, str) for items in visuals for item in items)
        for i, (context, items) in enumerate(zip(contexts, visuals)):
            content = []
            for item in items:
                if isinstance(item, Image.Image):
                    content.append({"type": "image"})
                    images.append(to_rgb(item))  # vtc.image_io: 16-bit, EXIF, transparency, animations
                elif isinstance(item, str):
                    clip = vtc.video_io.load_video(item, num_frames=self.max_frames_num)
                    if self.native_video:
                        import numpy as np

                        content.append({"type": "video"})
                        videos.append(np.stack([np.asarray(to_rgb(f)) for f in clip.frames]))
                    else:  # LLaVA-1.5 / NeXT see a video as its frames, one budget for all of them
                        content.extend({"type": "image"} for _ in clip.frames)
                        images.extend(to_rgb(f) for f in clip.frames)
                        as_video = True
                else:
                    raise TypeError(f"vtc: a visual must be a PIL image or a video file path, got {type(item).__name__}"
                                    f" (task {self.task_name!r}); fix the task's doc_to_visual")
            content.append({"type": "text", "text": context})
            self._warn_unknown_words(context)
            prompt = self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                        add_generation_prompt=True, tokenize=False)
            texts.append(prompt + (suffixes[i] if suffixes else ""))
        kwargs = {"text": texts, "return_tensors": "pt", "padding": True}
        if images:
            kwargs["images"] = images
        if videos:
            kwargs["videos"] = videos
            if getattr(getattr(self.processor, "video_processor", None), "do_sample_frames", None) is not None:
                kwargs["do_sample_frames"] = False  # the frames are already sampled: no fps resampling
        inputs = self.processor(**kwargs)
        # floating tensors (pixels) in the model's dtype, as the HF wrappers of lmms-eval pass them
        return inputs.to(self._device, dtype=self._model.dtype), n_images, n_videos, as_video

    def _warn_unknown_words(self, text: str) -> None:
        """Warn (once per word) about words of a prompt the model's tokenizer only knows as its unknown token -- the
        embedded default model's vocabulary is 103 words."""
        from vtc.integrations.transformers.default import unknown_words

        new = [w for w in unknown_words(self.processor, text) if w not in self._unknown_words]
        if new:
            self._unknown_words.update(new)
            warnings.warn(f"vtc: {self.pretrained} does not know the word{'s' if len(new) > 1 else ''} "
                          f"{', '.join(map(repr, new))} (task {self.task_name!r}): "
                          f"{'they reach' if len(new) > 1 else 'it reaches'} the model as an unknown token",
                          stacklevel=3)

    def _flops(self, inputs) -> list:
        """Per row: the analytic prefill FLOPs of the call just made, at the length the LLM received."""
        from vtc.integrations.transformers.flops import llm_layer_lengths, request_flops

        if self.compressor == NONE:
            return request_flops(self._model, inputs, None)
        per_layer = llm_layer_lengths(self._model)  # LLM-side compressors: each layer at its own length
        lengths = per_layer or [kept for _, kept in vtc.last_prompt_lengths(self._model)]
        return request_flops(self._model, inputs, lengths or None)

    def _counts(self, input_ids: torch.Tensor, mask: torch.Tensor) -> list[tuple[int, int, int, int]]:
        """Per row: (prompt tokens in, out, visual in, visual out) of the call just made."""
        real = mask != 0
        visual = torch.isin(input_ids, torch.tensor(self.placeholder_ids, device=input_ids.device)) & real
        rows = []
        lengths = vtc.last_prompt_lengths(self._model) if self.compressor != NONE else []
        if self.compressor != NONE:
            from vtc.integrations.transformers.flops import llm_layer_lengths

            per_layer = llm_layer_lengths(self._model)  # LLM-side: what the last layer holds
            if per_layer is not None:
                lengths = [(n, layers[-1]) for (n, _), layers in zip(lengths, per_layer)]
        for b in range(input_ids.shape[0]):
            n, v = int(real[b].sum()), int(visual[b].sum())
            kept = lengths[b][1] if b < len(lengths) else n
            rows.append((n, kept, v, v - (n - kept)))
        return rows

    def generate_until(self, requests: list[Instance]) -> list:
        results: list = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: str(requests[i].args[2]))
        bar = tqdm(total=len(requests), disable=(self.rank != 0 or not self.progress),
                   desc="vtc responding")
        batch: list[int] = []

        def flush():
            if batch:
                for i, out in zip(batch, self._generate_batch([requests[i] for i in batch])):
                    results[i] = out
                bar.update(len(batch))
                batch.clear()

        for i in order:
            if batch and requests[i].args[1] != requests[batch[0]].args[1]:
                flush()  # one set of generation kwargs per batch
            batch.append(i)
            if len(batch) == self.batch_size_per_gpu:
                flush()
        flush()
        bar.close()
        return results

    def _generate_batch(self, requests: list[Instance]) -> list[GenerationResult]:
        contexts, visuals = [], []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args[:6]
            self.task_name = task
            contexts.append(context)
            visuals.append(self._visuals(doc_to_visual, task, split, doc_id))
        gen_kwargs = dict(requests[0].args[1] or {})
        until = gen_kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        inputs, n_images, n_videos, as_video = self._encode(contexts, visuals)
        self._apply(images_as_video=as_video or bool(self.options.get("images_as_video", False)))
        temperature = float(gen_kwargs.pop("temperature", 0) or 0)
        num_beams = int(gen_kwargs.pop("num_beams", 1) or 1)
        generate_kwargs = {
            "max_new_tokens": int(gen_kwargs.pop("max_new_tokens", self.max_new_tokens)),
            "do_sample": temperature > 0,
            "num_beams": num_beams,
        }
        if temperature > 0:
            generate_kwargs["temperature"] = temperature
            if gen_kwargs.get("top_p") is not None:
                generate_kwargs["top_p"] = float(gen_kwargs["top_p"])
        clock = FirstTokenClock() if num_beams == 1 else None
        if clock is not None:
            generate_kwargs["streamer"] = clock
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with PeakMemory(self._device) as peak, torch.inference_mode():
            start = time.perf_counter()
            out = self._model.generate(**inputs, pad_token_id=pad, **generate_kwargs)
            sync(self._device)
            total = time.perf_counter() - start
        prompt_len = inputs["input_ids"].shape[1]
        texts = self.tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
        first = None if clock is None or clock.first_token_at is None else clock.first_token_at - start
        counts = self._counts(inputs["input_ids"], inputs["attention_mask"])
        flops = self._flops(inputs)
        outputs = []
        for b, (request, text) in enumerate(zip(requests, texts)):
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            stats = self._stats(request, "generate_until", n_images, n_videos, counts[b], first, total, peak)
            stats.input_tokens = counts[b][1]
            stats.output_tokens = int((out[b, prompt_len:] != pad).sum())
            stats.prefill_flops, stats.prefill_flops_parts = flops[b].total, flops[b].as_dict()
            self.sample_stats.append(stats)
            outputs.append(GenerationResult(text=text, token_counts=stats))
        return outputs

    def _stats(self, request, kind, n_images, n_videos, counts, first, total, peak) -> SampleStats:
        n_in, n_out, v_in, v_out = counts
        _, _, _, doc_id, task, _ = request.args[:6]
        return SampleStats(task=task, doc_id=int(doc_id), request=kind, compressor=str(self.compressor),
                           budget=self.budget, images=n_images, videos=n_videos, visual_tokens_in=v_in,
                           visual_tokens_out=v_out, prompt_tokens_in=n_in, prompt_tokens_out=n_out,
                           first_token_seconds=None if first is None else round(first, 6),
                           total_seconds=round(total, 6), peak_memory_bytes=peak.bytes,
                           peak_memory_source=peak.source, rank=self.rank)

    def loglikelihood(self, requests: list[Instance]) -> list:
        results = []
        for request in tqdm(requests, disable=(self.rank != 0 or not self.progress),
                            desc="vtc loglikelihood"):
            context, target, doc_to_visual, doc_id, task, split = request.args[:6]
            self.task_name = task
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            visuals = self._visuals(doc_to_visual, task, split, doc_id)
            prompt, n_images, n_videos, as_video = self._encode([context], [visuals])
            inputs, _, _, _ = self._encode([context], [visuals], suffixes=[continuation])
            self._apply(images_as_video=as_video or bool(self.options.get("images_as_video", False)))
            n_cont = inputs["input_ids"].shape[1] - prompt["input_ids"].shape[1]
            if n_cont < 1:
                raise ValueError(f"vtc: the continuation {continuation!r} of {task} doc {doc_id} adds no tokens")
            with PeakMemory(self._device) as peak, torch.inference_mode():
                start = time.perf_counter()
                logits = self._model(**inputs, logits_to_keep=n_cont + 1).logits
                sync(self._device)
                total = time.perf_counter() - start
            # the continuation is the end of the sequence, so positions from the end survive compression
            cont_ids = inputs["input_ids"][0, -n_cont:]
            log_probs = torch.log_softmax(logits[0, -n_cont - 1:-1].float(), dim=-1)
            token_lp = log_probs.gather(-1, cont_ids[:, None]).squeeze(-1)
            greedy = bool((log_probs.argmax(-1) == cont_ids).all())
            counts = self._counts(inputs["input_ids"], inputs["attention_mask"])[0]
            stats = self._stats(request, "loglikelihood", n_images, n_videos, counts, total, total, peak)
            stats.input_tokens = counts[1]
            flops = self._flops(inputs)[0]
            stats.prefill_flops, stats.prefill_flops_parts = flops.total, flops.as_dict()
            self.sample_stats.append(stats)
            # lmms-eval 0.7.3 turns a bare (float, bool) result into a string; GenerationResult keeps the pair
            results.append(GenerationResult(text=(float(-token_lp.mean()), greedy), token_counts=stats))
        return results

    def generate_until_multi_round(self, requests) -> list:
        raise NotImplementedError("vtc's lmms-eval model answers single-round tasks (generate_until, "
                                  "loglikelihood, multiple_choice); multi-round tasks are not supported yet")
