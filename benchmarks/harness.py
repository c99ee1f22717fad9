"""The benchmarks' one timing and peak-memory harness.

Time
  ``Stopwatch(device)`` marks points in time: on a GPU the device is synchronized when
  the watch starts, each mark records a CUDA event and reading the laps synchronizes on
  the last one; on the CPU (synchronous work) each mark reads ``time.perf_counter``.
  ``time_phases`` / ``time_calls`` run warm-up calls, then repeats (optionally cut by a
  time budget), one ``Stopwatch`` per run; ``time_call`` times one call; ``round_robin``
  interleaves several functions, round by round, so that a drifting machine hits them
  alike; ``summary`` gives the median and the best of samples.

Memory
  ``PeakMemory(device)`` is the peak of a block beyond a baseline taken as it starts
  (garbage collected first). GPU: ``torch.cuda.max_memory_allocated()`` after
  ``reset_peak_memory_stats()``, minus ``memory_allocated()`` at the start (the cache
  emptied). CPU: peak RSS (VmHWM, its counter reset through ``/proc/self/clear_refs``)
  minus VmRSS at the start; where the counter cannot be reset the peak is the peak since
  the process started (``resettable`` says which). ``malloc_release_to_os`` makes glibc
  return freed blocks to the OS, so that the resident set tracks live tensors (torch's
  CPU allocator does no caching): call it first thing in a memory-measuring process.
"""
from __future__ import annotations

import ctypes
import gc
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

MiB = 2 ** 20

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 * 1024


def _device(device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def sync(device) -> None:
    """Wait for the work queued on ``device`` (a no-op off CUDA)."""
    device = _device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def drop_grads(tensors) -> None:
    for t in tensors:
        t.grad = None


def grad_bytes(tensors) -> int:
    """Bytes of the gradients held by ``tensors``."""
    return sum(t.grad.numel() * t.grad.element_size() for t in tensors if t.grad is not None)


# --------------------------------------------------------------------------- time


class Stopwatch:
    """Points in time on ``device``: CUDA events on a GPU, ``time.perf_counter`` on the CPU.
    Started (first mark) when made."""

    def __init__(self, device="cpu"):
        self.cuda = _device(device).type == "cuda"
        sync(device)
        self.marks: list = []
        self.mark()

    def mark(self) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def laps(self) -> list[float]:
        """Seconds between consecutive marks."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def time_phases(phases: Sequence[Callable], device="cpu", *, warmup: int = 1, repeats: int = 5,
                budget_s: float | None = None, min_repeats: int = 3,
                setup: Callable | None = None) -> list[list[float]]:
    """Seconds of each phase of repeated runs, one list per phase.

    A run calls ``setup()`` (not timed), then ``out = phases[0]()``, ``out = phases[1](out)``, ...
    with a mark after each phase. ``warmup`` untimed runs first; then ``repeats`` timed runs,
    stopped early once ``min_repeats`` are done and ``budget_s`` seconds have passed."""
    def run(watch=None):
        if setup is not None:
            setup()
        out = None
        for i, phase in enumerate(phases):
            out = phase(out) if i else phase()
            if watch is not None:
                watch.mark()
        return watch

    for _ in range(warmup):
        run()
    sync(device)
    samples: list[list[float]] = [[] for _ in phases]
    start = time.perf_counter()
    for r in range(max(1, repeats)):
        for s, lap in zip(samples, run(Stopwatch(device)).laps()):
            s.append(lap)
        if budget_s is not None and r + 1 >= min_repeats and time.perf_counter() - start > budget_s:
            break
    return samples


def time_calls(fn: Callable, device="cpu", **kw) -> list[float]:
    """Seconds of each timed call of ``fn`` (``time_phases`` with one phase; same options)."""
    return time_phases([fn], device, **kw)[0]


def time_call(fn: Callable, device="cpu") -> float:
    """Seconds of one call of ``fn``, no warm-up."""
    return time_calls(fn, device, warmup=0, repeats=1)[0]


def round_robin(fns: dict[str, Callable], rounds: int, device="cpu", *, warmup: int = 1,
                alternate: bool = False) -> dict[str, list[float]]:
    """Seconds of one call of each function per round, interleaved, after ``warmup`` calls
    of each; ``alternate``: every other round runs them in reverse order."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        names = list(fns)[::-1] if alternate and r % 2 else list(fns)
        for name in names:
            times[name].append(time_call(fns[name], device))
    return times


def summary(samples: Sequence[float]) -> dict:
    """``{"median", "best", "runs"}`` of timing samples."""
    return {"median": statistics.median(samples), "best": min(samples), "runs": len(samples)}


# --------------------------------------------------------------------------- memory


def _status() -> dict:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def rss_now() -> int | None:
    return _status().get("VmRSS")


def rss_peak() -> int:
    s = _status()
    if "VmHWM" in s:
        return s["VmHWM"]
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def reset_rss_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def malloc_release_to_os() -> bool:
    """Serve allocations >= 64 KiB by mmap so that free() returns them to the OS."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        libc.mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD)
        return ok
    except (OSError, AttributeError):
        return False


class PeakMemory:
    """``with PeakMemory(device) as m: ...``: ``m.base`` (bytes at the start), ``m.peak``
    (the block's peak), ``m.extra`` (peak - base); see the module doc."""

    def __init__(self, device="cpu"):
        self.device = _device(device)
        self.base = self.peak = 0
        self.resettable = True

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.empty_cache()
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        base = rss_now()
        if base is None:
            raise RuntimeError("cannot read the resident set size (/proc/self/status) on this system")
        self.base = base
        self.resettable = reset_rss_peak()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = rss_peak()

    @property
    def extra(self) -> int:
        return self.peak - self.base
