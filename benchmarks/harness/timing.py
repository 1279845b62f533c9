"""Timing: warm-up, then the median (with min and max) of repeated samples.

CPU samples use ``time.perf_counter`` around ``inner`` back-to-back calls (enough calls for a
sample to last a few milliseconds, so timer resolution and jitter stay small). CUDA samples use
CUDA events on the current stream. At sizes that do not fit in the cache that bounds the device's
memory traffic (the GPU's L2, the CPU's last-level cache) every sample times one call after a
read that evicts that cache, so no call reads the previous one's data from cache. CPU rows and
end-to-end rows take their peers' samples in turn instead (``time_in_turn``).
"""
from __future__ import annotations

import gc
import glob
import math
import os
import re
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Budget:
    """How long to spend on one peer of one row."""

    warmup_s: float      # at least this long (at least 2 calls; 1 when this is 0) of warm-up after the first call
    sample_s: float      # target length of one sample; short calls are repeated inside it
    total_s: float       # target time for all samples together
    min_repeats: int
    max_repeats: int


QUICK = Budget(warmup_s=0.03, sample_s=0.01, total_s=0.4, min_repeats=5, max_repeats=15)
FULL = Budget(warmup_s=0.1, sample_s=0.02, total_s=1.5, min_repeats=7, max_repeats=50)
# --sizes smallest only checks that everything runs: as few calls as still give a median.
SMOKE = Budget(warmup_s=0.0, sample_s=0.001, total_s=0.005, min_repeats=3, max_repeats=3)
# CUDA: events resolve ~1 us, so a sample of ~0.5 ms is plenty; launch-bound rows still get many calls.
QUICK_CUDA = Budget(warmup_s=0.02, sample_s=0.0005, total_s=0.2, min_repeats=10, max_repeats=50)
FULL_CUDA = Budget(warmup_s=0.05, sample_s=0.001, total_s=0.5, min_repeats=20, max_repeats=200)


@dataclass
class Timing:
    """Per-call times in milliseconds over ``repeats`` samples of ``inner`` calls each."""

    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int
    inner: int
    first_call_s: float  # wall time of the very first call: includes torch.compile's compilation
    l2_flushed: bool     # the device's cache (GPU L2, CPU LLC) was evicted before every sample


class CacheFlusher:
    """Evicts a cache of ``cache_bytes`` by reading a buffer twice its size on ``device``.

    A row that moves more than the cache still finds part of its inputs in it after the previous
    call; without the flush its large-size numbers would depend on how much of its working set
    the last call left behind. A read, not a write: a written buffer would leave the cache full of
    dirty lines, whose write-back the timed call would then pay (measured on CPU: the 4M-element
    copy fell from ~25 to ~19 GB/s); the previous call's dirty outputs are written back during the
    flush instead. The buffer is written once, so its pages are real (untouched pages all read the
    one zero page, evicting nothing). ``cache_bytes`` is what a row must move to be timed after a flush.
    """

    name = "cache"

    def __init__(self, cache_bytes: int, device: torch.device | str = "cpu"):
        self.cache_bytes = int(cache_bytes)
        self.buffer = torch.ones(2 * self.cache_bytes // 4 + 1, dtype=torch.float32, device=device)

    def __call__(self) -> None:
        self.buffer.sum()


class L2Flusher(CacheFlusher):
    """The GPU's L2 (its size from the device properties, 64 MiB where unknown)."""

    name = "GPU L2"

    def __init__(self, device: torch.device):
        props = torch.cuda.get_device_properties(device)
        super().__init__(int(getattr(props, "L2_cache_size", 0)) or 64 * 2**20, device)


DEFAULT_LLC_BYTES = 32 * 2**20  # where the machine does not say: a large desktop / small server L3


def _parse_cache_size(text: str) -> int:
    """'32768K', '1M', '512' (sysfs cache sizes) -> bytes; 0 when unreadable."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)\s*", text, re.IGNORECASE)
    if not m:
        return 0
    return int(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2).upper()]


def llc_bytes() -> int:
    """Size of the CPU's last-level cache: sysfs (cpu0's highest-level data or unified cache),
    then ``os.sysconf``, then :data:`DEFAULT_LLC_BYTES`."""
    best = (0, 0)  # (level, bytes)
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(os.path.join(index, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(index, "level")) as f:
                level = int(f.read())
            with open(os.path.join(index, "size")) as f:
                size = _parse_cache_size(f.read())
        except (OSError, ValueError):
            continue
        if kind != "Instruction" and size > 0:
            best = max(best, (level, size))
    if best[1]:
        return best[1]
    for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
        try:
            size = os.sysconf(name)
        except (ValueError, OSError):
            continue
        if size and size > 0:
            return int(size)
    return DEFAULT_LLC_BYTES


class CPUFlusher(CacheFlusher):
    """The CPU's last-level cache (its size from :func:`llc_bytes` unless given)."""

    name = "CPU LLC"

    def __init__(self, cache_bytes: int | None = None):
        super().__init__(cache_bytes or llc_bytes())


def flusher_for(device: torch.device):
    """The cache flusher of ``device``: :class:`L2Flusher` on CUDA, :class:`CPUFlusher` on CPU."""
    return L2Flusher(device) if device.type == "cuda" else CPUFlusher()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_call(fn: Callable[..., Any], args: tuple, device: torch.device) -> tuple[float, Any]:
    """Wall time of ``fn(*args)`` called alone (it carries torch.compile's compilation), and its output."""
    _sync(device)
    start = time.perf_counter()
    out = fn(*args)
    _sync(device)
    return time.perf_counter() - start, out


def _warm_up(fn: Callable[..., Any], args: tuple, device: torch.device, budget: Budget) -> float:
    """At least two warm-up calls (one when the budget asks for none: multi-second end-to-end rows);
    returns the seconds per call they took."""
    calls, start, least = 0, time.perf_counter(), 2 if budget.warmup_s > 0 else 1
    while calls < least or time.perf_counter() - start < budget.warmup_s:
        fn(*args)
        _sync(device)
        calls += 1
    return max((time.perf_counter() - start) / calls, 1e-7)


def _repeats(budget: Budget, seconds_per_repeat: float) -> int:
    return min(max(int(budget.total_s / seconds_per_repeat), budget.min_repeats), budget.max_repeats)


def _without_gc(sample: Callable[[], Any]) -> Any:
    """sample() with the garbage collector off, so a collection cannot land inside one sample."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return sample()
    finally:
        if gc_was_enabled:
            gc.enable()


def _timing(samples: list[float], repeats: int, inner: int, first_call_s: float, flush: bool) -> Timing:
    return Timing(median_ms=statistics.median(samples), min_ms=min(samples), max_ms=max(samples),
                  repeats=repeats, inner=inner, first_call_s=first_call_s, l2_flushed=flush)


def time_call(fn: Callable[..., Any], args: tuple, device: torch.device, budget: Budget,
              flusher: CacheFlusher | None = None, flush: bool = False) -> tuple[Timing, Any]:
    """Times ``fn(*args)``; returns the timing and the output of the first call (for checking).

    The first call runs alone and is timed on the wall clock (it carries torch.compile's
    compilation); warm-up follows, then the timed samples: on CPU those of :func:`time_in_turn`
    with ``fn`` alone, on CUDA event-timed ones.
    """
    first_call_s, out = first_call(fn, args, device)
    flush = bool(flush and flusher is not None)
    if device.type != "cuda":
        return time_in_turn({"fn": fn}, args, device, budget, {"fn": first_call_s},
                            flusher=flusher if flush else None)["fn"], out
    per_call = _warm_up(fn, args, device, budget)
    inner = 1 if flush else max(1, math.ceil(budget.sample_s / per_call))
    repeats = _repeats(budget, inner * per_call)
    samples = _without_gc(lambda: _cuda_samples(fn, args, device, inner, repeats, flusher if flush else None))
    return _timing(samples, repeats, inner, first_call_s, flush), out


def time_in_turn(fns: dict[str, Callable[..., Any]], args: tuple, device: torch.device, budget: Budget,
                 first_call_s: dict[str, float], prepare: dict[str, Callable[[], Any]] | None = None,
                 flusher: Callable[[], Any] | None = None) -> dict[str, Timing]:
    """Times several functions on the same inputs, one sample of each in turn.

    Timed one after the other, peers see different conditions: on a shared machine other work,
    clocks and memory state drift over a row's seconds (or, end to end, its minute). Taken in
    turn, every peer's samples span the same stretch of time, so the ratio of their medians is
    fair. A sample is ``inner`` back-to-back calls (``budget.sample_s`` long, as in
    :func:`time_call`), wall clock around them with the device synchronized on both sides; each
    peer gets the repeats it would get alone. Call each function once first (:func:`first_call`)
    and pass that call's time in ``first_call_s``. ``prepare[name]()``, where given, runs before
    each of that peer's samples, untimed (peers that share state undo each other's changes there).
    ``flusher()``, where given, evicts the cache before every peer's sample, untimed, and each
    sample is then one call (as on CUDA): otherwise the peer sampled next would find the previous
    peer's, or its own previous call's, data in cache.
    """
    prepare = prepare or {}
    per_call = {name: _warm_up(fn, args, device, budget) for name, fn in fns.items()}
    inner = {name: 1 if flusher is not None else max(1, math.ceil(budget.sample_s / t))
             for name, t in per_call.items()}
    repeats = _repeats(budget, max(inner[name] * per_call[name] for name in fns))

    def sample() -> dict[str, list[float]]:
        samples = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                if name in prepare:
                    prepare[name]()
                if flusher is not None:
                    flusher()
                _sync(device)
                start = time.perf_counter()
                for _ in range(inner[name]):
                    fn(*args)
                _sync(device)
                samples[name].append((time.perf_counter() - start) * 1e3 / inner[name])
        return samples

    return {name: _timing(s, repeats, inner[name], first_call_s[name], flusher is not None)
            for name, s in _without_gc(sample).items()}


def _cuda_samples(fn, args, device, inner: int, repeats: int, flusher: CacheFlusher | None) -> list[float]:
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(repeats)]
    for begin, end in events:
        if flusher is not None:
            flusher()
        begin.record()
        for _ in range(inner):
            fn(*args)
        end.record()
    torch.cuda.synchronize(device)
    return [begin.elapsed_time(end) / inner for begin, end in events]


def copy_bandwidth(numel: int, device: torch.device, budget: Budget, flusher=None,
                   flush: bool | None = None) -> dict:
    """Device copy bandwidth: ``dst.copy_(src)`` of ``numel`` float32, counting bytes read + written.

    The cache is evicted before every sample when ``flush`` (default: whenever a flusher is given).
    """
    src = torch.rand(numel, dtype=torch.float32, device=device).add_(0.5)
    dst = torch.empty_like(src)
    flush = flusher is not None if flush is None else flush
    timing, _ = time_call(dst.copy_, (src,), device, budget, flusher, flush=flush)
    nbytes = 2 * src.numel() * src.element_size()
    return {"numel": numel, "bytes": nbytes, "ms": timing.median_ms, "min_ms": timing.min_ms,
            "max_ms": timing.max_ms, "gbps": nbytes / (timing.median_ms * 1e-3) / 1e9,
            "l2_flushed": timing.l2_flushed}
