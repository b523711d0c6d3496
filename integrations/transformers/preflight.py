"""Checks made before a model is loaded, so a mistake costs seconds, not a multi-minute checkpoint load.

* ``resolve_model_ref(ref)`` -- where a model reference points: a local ``save_pretrained`` folder; a path that
  does not exist (a clear error at once); or a Hugging Face Hub id, which is probed **once** with a short timeout
  and no retries. Loading a hub id with an unreachable Hub otherwise spends 50+ s in ``huggingface_hub``'s retries
  (``utils/_http.py``: ``http_backoff`` retries network errors 5 times with exponential back-off, which
  ``file_download`` turns on when no local copy exists) before failing. ``HF_HUB_OFFLINE`` is respected: only the
  local Hugging Face cache is consulted. A model already in the cache loads from it when the Hub cannot be reached.
* ``check_request(compressor, budget, options)`` -- the compressor name, every option (unknown ones and wrong
  types, named) and the budgets, exactly as ``vtc.apply`` would judge them, without a model; checks that need the
  model's family (``positions``, layer ranges) still happen at ``apply``.
* ``coerce_request_options(compressor, options)`` -- option values given as text (command lines, lmms-eval's
  ``--model_args``) read by each option's type.

Used by ``vtc run`` / ``vtc eval`` / ``vtc demo`` and the lmms-eval plugin.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from vtc.budget import parse_budget, validate_budget
from vtc.compressor import Compressor, create_compressor, get_compressor_class
from vtc.inllm import LLMCompressor
from vtc.options import coerce_options, coerce_text

from . import _INTEGRATION_OPTIONS as INTEGRATION_OPTIONS  # options vtc.apply takes itself; the rest: the compressor's

#: seconds the Hub gets to answer the one probe request
PROBE_TIMEOUT = 5.0


class ModelNotFoundError(OSError):
    """A model reference that is neither a usable local folder nor loadable from the Hub or the local cache."""


@dataclass(frozen=True)
class ModelRef:
    """Where a model reference points: ``source`` is ``"folder"``, ``"hub"`` or ``"cache"`` (the local Hugging Face
    cache, used offline or with the Hub unreachable); pass ``local_files_only`` on to ``from_pretrained``."""

    ref: str
    source: str
    local_files_only: bool = False
    note: str | None = None  # e.g. "the Hub is unreachable: the cached copy is used"


def _looks_like_path(text: str) -> bool:
    """Whether ``text`` cannot be a hub id (``name`` or ``owner/name``) and so must be meant as a local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if text.startswith((".", "/", "~")) or "\\" in text or text.endswith("/") or os.path.isabs(text):
        return True
    try:
        validate_repo_id(text)
    except HFValidationError:
        return True
    return False


def _in_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - an unreadable cache is no cache
        return False
    return isinstance(found, str)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:160]}"


def _probe(repo_id: str, timeout: float) -> tuple[str, str] | None:
    """One request for the model's info (``HfApi.model_info``: a single GET, no retry loop), bounded by a thread
    join as well, since name resolution is not covered by the HTTP timeout. ``None`` when the Hub answers that the
    model exists (or is gated: ``from_pretrained`` then says what to do); else ``(kind, reason)`` with kind
    ``"unreachable"`` or ``"missing"``."""
    outcome: list = []

    def ask():
        from huggingface_hub import HfApi, constants
        from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

        try:
            HfApi(endpoint=constants.ENDPOINT).model_info(repo_id, timeout=timeout)
            outcome.append(None)
        except GatedRepoError:
            outcome.append(None)
        except RepositoryNotFoundError:
            outcome.append(("missing", "no such model on the Hub; a private model needs `hf auth login`"))
        except HfHubHTTPError as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status is not None and status < 500 and status not in (408, 429):
                outcome.append(None)  # the Hub answered; from_pretrained reports the details
            else:
                outcome.append(("unreachable", f"the Hub answered HTTP {status}"))
        except Exception as exc:  # noqa: BLE001 - connection refused, DNS failure, timeout, proxy, TLS ...
            outcome.append(("unreachable", _short(exc)))

    worker = threading.Thread(target=ask, name="vtc-hub-probe", daemon=True)
    worker.start()
    worker.join(timeout + 2.0)
    if not outcome:
        return "unreachable", f"no answer within {timeout + 2.0:g} s"
    return outcome[0]


def resolve_model_ref(ref, *, timeout: float = PROBE_TIMEOUT) -> ModelRef:
    """Where ``ref`` (a local folder or a hub id) points; ``ModelNotFoundError`` with one message saying what to
    pass instead when it points nowhere. See the module docstring; at most one network request, of at most
    ``timeout`` seconds (none with ``HF_HUB_OFFLINE`` set)."""
    from huggingface_hub import constants

    text = os.fspath(ref).strip() if isinstance(ref, (str, os.PathLike)) else None
    if not text:
        raise ModelNotFoundError(f"cannot load model {ref!r}: give a local save_pretrained folder or a hub id")
    folder = os.path.expanduser(text)
    if os.path.isdir(folder):
        return ModelRef(folder, "folder")
    if os.path.exists(folder):
        raise ModelNotFoundError(f"cannot load model {text!r}: it is a file, not a folder; pass the save_pretrained "
                                 "folder that holds config.json")
    if _looks_like_path(text):
        raise ModelNotFoundError(f"cannot load model {text!r}: no such folder, and it is not a hub id; pass an "
                                 "existing save_pretrained folder, or a hub id such as llava-hf/llava-1.5-7b-hf")
    cached = _in_cache(text)
    if constants.HF_HUB_OFFLINE:
        if cached:
            return ModelRef(text, "cache", local_files_only=True)
        raise ModelNotFoundError(
            f"cannot load model {text!r}: it is neither a local folder nor in the local Hugging Face cache, and "
            "HF_HUB_OFFLINE is set, so the Hub is not asked; pass a local folder, download the model where the Hub "
            f"is reachable (hf download {text}), or unset HF_HUB_OFFLINE")
    problem = _probe(text, timeout)
    if problem is None:
        return ModelRef(text, "hub")
    kind, reason = problem
    if cached:
        return ModelRef(text, "cache", local_files_only=True,
                        note=f"{text}: not available from the Hub ({reason}); using the copy in the local cache")
    if kind == "missing":
        raise ModelNotFoundError(f"cannot load model {text!r}: it is neither a local folder nor a model on the "
                                 f"Hugging Face Hub ({reason}); check the spelling, or pass a local folder")
    raise ModelNotFoundError(
        f"cannot load model {text!r}: it is neither a local folder nor reachable on the Hugging Face Hub ({reason}); "
        "pass a local save_pretrained folder, or run where the Hub is reachable (HF_HUB_OFFLINE=1 uses the local "
        "cache only)")


def _compressor_options(options: dict) -> dict:
    return {k: v for k, v in options.items() if k not in INTEGRATION_OPTIONS}


def coerce_request_options(compressor, options: dict) -> dict:
    """``options`` with text values read by type: the compressor's options by their field annotations,
    ``images_as_video`` / ``decouple_query`` as booleans, ``video_budget`` as a budget. Errors name the option."""
    out = dict(options)
    for key in ("images_as_video", "decouple_query"):
        if isinstance(out.get(key), str):
            out[key] = coerce_text(out[key], bool, "vtc", key)
    if isinstance(out.get("video_budget"), str):
        out["video_budget"] = parse_budget(out["video_budget"])
    if isinstance(compressor, str):
        cls = get_compressor_class(compressor)
        out.update(coerce_options(cls, _compressor_options(out), f"compressor {compressor!r}"))
    return out


def check_request(compressor, budget, options: dict | None = None) -> Compressor:
    """Raise what ``vtc.apply(model, compressor, budget, **options)`` would raise about the request itself
    (unknown compressor, unknown or mistyped option, bad budget / video budget / allocation) -- without a model.
    Returns the compressor it would build."""
    from vtc.allocation import create_allocation

    options = dict(options or {})
    validate_budget(budget)
    if options.get("video_budget") is not None:
        validate_budget(options["video_budget"])
    if "images_as_video" in options and not isinstance(options["images_as_video"], bool):
        raise TypeError(f"images_as_video must be True or False, got {options['images_as_video']!r}")
    if options.get("positions") is not None and not isinstance(options["positions"], str):
        raise TypeError(f"positions must be a position mode name such as 'keep' or 'reindex', got "
                        f"{options['positions']!r}")
    if options.get("allocation") is not None:
        create_allocation(options["allocation"])
    built = create_compressor(compressor, **_compressor_options(options))
    if isinstance(built, LLMCompressor):
        built.check_budget(budget)
        if options.get("encoder") is not None:
            from . import _encoder_stage

            _encoder_stage(options["encoder"])
    return built


__all__ = ["INTEGRATION_OPTIONS", "ModelNotFoundError", "ModelRef", "PROBE_TIMEOUT", "check_request",
           "coerce_request_options", "resolve_model_ref"]
