"""Measuring one request: time to first token and peak memory, on CUDA and on CPU.

Why here: the lmms-eval plugin and ``vtc eval`` report latency and memory next to accuracy, and both must be
measured the same way. On CUDA the peak is the allocator's ``max_memory_allocated`` above the level at the start; on
CPU there is no allocator counter, so a thread samples the process's resident set (``/proc/self/statm``, Linux)
every millisecond and the peak is the highest sample above the level at the start -- call
``make_cpu_memory_measurable()`` once first, or freed memory stays resident and later runs read too low.
"""

from __future__ import annotations

import os
import threading
import time

import torch

try:  # transformers is an optional dependency of the core, but the plugin always has it
    from transformers.generation.streamers import BaseStreamer
except ImportError:  # pragma: no cover
    BaseStreamer = object


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class FirstTokenClock(BaseStreamer):
    """A generate() streamer that notes when the first new token exists.

    ``generate`` calls ``put`` once with the prompt, then once per decoding step; the second call marks the end of
    the prefill (vision tower, token selection, the LLM over the prompt and the first sampling step).
    """

    def __init__(self):
        self.puts = 0
        self.first_token_at: float | None = None

    def put(self, value):
        self.puts += 1
        if self.puts == 2:
            self.first_token_at = time.perf_counter()

    def end(self):
        pass


def make_cpu_memory_measurable() -> bool:
    """Make glibc return large freed blocks to the OS at once, so the resident set tracks live tensors.

    glibc raises its mmap threshold after the first large free; later large tensors then come from the heap and
    stay resident after they are freed, and a second measured run would see no growth. A fixed 64 KiB threshold
    keeps every tensor of interest mmap-backed. Process-wide: only the measuring entry points call it. Returns
    whether it took effect (False off glibc).
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_mmap_threshold = -3
    return bool(libc.mallopt(m_mmap_threshold, 64 * 1024))


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.bytes``: the highest memory use above the start.

    ``peak.source`` says what was measured: ``"cuda_allocated"``, ``"cpu_rss"`` or ``None`` (not measurable here,
    ``bytes`` is then ``None``).
    """

    def __init__(self, device, interval: float = 0.001):
        self.device = torch.device(device)
        self.interval = interval
        self.bytes: int | None = None
        self.source: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0
        self._high = 0

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.source = "cuda_allocated"
        else:
            start = _resident_bytes()
            if start is not None:
                self._start = self._high = start
                self.source = "cpu_rss"
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            now = _resident_bytes()
            if now is not None and now > self._high:
                self._high = now
            time.sleep(self.interval)

    def __exit__(self, *exc):
        if self.source == "cuda_allocated":
            sync(self.device)
            self.bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._start)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            now = _resident_bytes()
            if now is not None:
                self._high = max(self._high, now)
            self.bytes = max(0, self._high - self._start)
        return False
