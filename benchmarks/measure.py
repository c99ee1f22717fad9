"""One measurement: peak memory and forward / backward times of one case.

Memory
  GPU: inputs allocated -> warm-up step(s) -> gradients dropped ->
  ``torch.cuda.reset_peak_memory_stats()``; baseline = ``torch.cuda.memory_allocated()``;
  one forward + backward; peak = ``torch.cuda.max_memory_allocated()``.
  CPU: measured in a fresh process per case (see ``sweep``). glibc is told to
  serve every allocation >= 64 KiB with its own mmap (``mallopt(M_MMAP_THRESHOLD)``,
  which also turns off its adaptive threshold) so freed blocks go back to the OS
  and the resident set tracks live tensors (torch's CPU allocator does no caching).
  Inputs allocated and written -> one warm-up step -> gradients dropped ->
  baseline = VmRSS; the peak-RSS counter is reset (``echo 5 > /proc/self/clear_refs``);
  one forward + backward; peak = VmHWM. Where the counter cannot be reset the
  warm-up is skipped and the peak is VmHWM (or ``ru_maxrss``) since process start.
  Reported: ``peak_extra`` = peak - baseline (includes the gradients, which every
  method must return) and ``extra_minus_grads`` = ``peak_extra`` - bytes of the
  gradients (the working memory of the method). RSS counts a page when it is first
  written: a gradient allocated with ``torch.empty`` and filled chunk by chunk is
  only fully resident at the end, so a chunked method's peak can read lower than
  its allocator-level peak by up to one chunk of the gradient.

Time
  Warm-up step(s), then repeated iterations of ``loss = f()`` and ``loss.backward()``
  with the gradients dropped before each; forward, backward and their sum are timed
  per iteration (CUDA events on GPU, ``time.perf_counter`` on CPU, where work is
  synchronous) and the medians reported. On CPU the timing runs in its own fresh
  process with glibc's default allocator settings (the mmap setting above would
  add page-fault cost to every large temporary).
"""
from __future__ import annotations

import ctypes
import gc
import math
import os
import resource
import statistics
import sys
import time
import traceback

import torch

from .cases import DTYPES, Case, input_bytes, make_inputs
from .methods import build

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 * 1024


# --------------------------------------------------------------------------- CPU memory


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


# --------------------------------------------------------------------------- one case


def _sync(dev: torch.device):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _drop_grads(ts):
    for t in ts:
        t.grad = None


def _measure_memory(case: Case, f, grads, dev) -> tuple[dict, torch.Tensor]:
    def step():
        _drop_grads(grads)
        loss = f()
        loss.backward()
        return loss

    mem = {}
    if dev.type == "cuda":
        for _ in range(max(1, case.warmup)):
            step()
        _drop_grads(grads)
        gc.collect()
        _sync(dev)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        loss = step()
        _sync(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        mem["method"] = "cuda max_memory_allocated - memory_allocated after inputs (warm)"
    else:
        can_reset = reset_rss_peak()
        if can_reset:
            for _ in range(max(1, case.warmup)):
                step()
            _drop_grads(grads)
            gc.collect()
            base = rss_now()
            reset_rss_peak()
            loss = step()
            peak = rss_peak()
            mem["method"] = "VmHWM - VmRSS after inputs, peak counter reset after one warm-up step"
        else:
            gc.collect()
            base = rss_now()
            loss = step()
            peak = rss_peak()
            mem["method"] = "peak RSS since start - RSS after inputs (cold: no warm-up, counter not resettable)"
        if base is None:
            raise RuntimeError("cannot read the resident set size (/proc/self/status) on this system")
    gb = sum(t.grad.numel() * t.grad.element_size() for t in grads if t.grad is not None)
    mem.update(baseline_bytes=int(base), peak_bytes=int(peak), peak_extra_bytes=int(peak - base),
               grads_bytes=int(gb), extra_minus_grads_bytes=int(peak - base - gb))
    return mem, loss


def _measure_time(case: Case, f, grads, dev) -> dict:
    for _ in range(max(1, case.warmup)):
        _drop_grads(grads)
        f().backward()
    _sync(dev)
    fwd, bwd, tot = [], [], []
    t_start = time.perf_counter()
    for r in range(max(1, case.repeats)):
        _drop_grads(grads)
        if dev.type == "cuda":
            e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            e0.record()
            loss = f()
            e1.record()
            loss.backward()
            e2.record()
            e2.synchronize()
            a, b = e0.elapsed_time(e1), e1.elapsed_time(e2)
        else:
            t0 = time.perf_counter()
            loss = f()
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            a, b = (t1 - t0) * 1e3, (t2 - t1) * 1e3
        fwd.append(a)
        bwd.append(b)
        tot.append(a + b)
        del loss
        if r + 1 >= 3 and time.perf_counter() - t_start > case.time_budget_s:
            break
    _drop_grads(grads)
    return {"fwd_ms": statistics.median(fwd), "bwd_ms": statistics.median(bwd), "fwd_bwd_ms": statistics.median(tot),
            "fwd_bwd_min_ms": min(tot), "runs": len(tot), "samples_fwd_ms": [round(t, 4) for t in fwd],
            "samples_bwd_ms": [round(t, 4) for t in bwd], "samples_fwd_bwd_ms": [round(t, 4) for t in tot],
            "clock": "cuda events" if dev.type == "cuda" else "time.perf_counter"}


def run_case(case: Case, mode: str = "both") -> dict:
    """``mode``: "memory" (also gives loss and gradient norms), "time", or "both"."""
    dev = torch.device(case.device)
    out: dict = {"status": "ok"}
    try:
        inputs = make_inputs(case)
        out["input_bytes"] = input_bytes(inputs)
        f, grads, impl, note = build(case, inputs)
        out["impl"] = impl
        if note:
            out["note"] = note
        t0 = time.perf_counter()
        if mode in ("memory", "both"):
            mem, loss = _measure_memory(case, f, grads, dev)
            out["memory"] = mem
            out["loss"] = float(loss.detach().float())
            out["grad_norms"] = [float(torch.linalg.vector_norm(t.grad.float()).double()) if t.grad is not None
                                 else None for t in grads]
            out["finite"] = bool(math.isfinite(out["loss"]) and all(
                g is not None and math.isfinite(g) for g in out["grad_norms"]))
            del loss
            _drop_grads(grads)
        if mode in ("time", "both"):
            out["time"] = _measure_time(case, f, grads, dev)
        out["wall_s"] = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 -- every failure becomes a row, never a crash of the sweep
        oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
        out["status"] = ("oom: " if oom else "error: ") + f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        out["traceback"] = traceback.format_exc(limit=6)[-3000:]
    return out


def child_main(case_dict: dict, mode: str, conn) -> None:
    """Entry point of a measurement process (CPU isolation)."""
    try:
        if mode == "memory":
            malloc_release_to_os()
        res = run_case(Case(**case_dict), mode)
    except BaseException as e:  # noqa: BLE001
        res = {"status": f"error: {type(e).__name__}: {e}"}
    conn.send(res)
    conn.close()


# --------------------------------------------------------------------------- ceilings


def measure_ceilings(device: str, dtype: str, quick: bool = False) -> dict:
    """The device's matmul rate and copy bandwidth, measured now (median of repeats).

    GPU: a large ``torch.matmul`` in the benchmark dtype (bf16: the tensor-core rate)
    on random data, timed with CUDA events; a large device-to-device copy, counting
    bytes read + written. CPU: the same with fp32 matmul (labelled as such)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        mdt = DTYPES[dtype] if dtype != "fp32" else torch.float32
        n = 4096 if quick else 8192
        copy_elems = (1 << 26) if quick else (1 << 29)     # 4 B elems: 256 MiB / 2 GiB
        reps = 5 if quick else 20
    else:
        mdt = torch.float32
        n = 1024 if quick else 2048
        copy_elems = (1 << 22) if quick else (1 << 26)     # 16 MiB / 256 MiB
        reps = 3 if quick else 7
    g = torch.Generator(device=dev)
    g.manual_seed(1234)
    a = torch.randn(n, n, generator=g, device=dev).to(mdt)
    b = torch.randn(n, n, generator=g, device=dev).to(mdt)

    def timed(fn) -> float:
        fn()
        _sync(dev)
        ts = []
        for _ in range(reps):
            if dev.type == "cuda":
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                fn()
                e1.record()
                e1.synchronize()
                ts.append(e0.elapsed_time(e1) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    t_mm = timed(lambda: torch.matmul(a, b))
    del a, b
    src = torch.randn(copy_elems, generator=g, device=dev)
    dst = torch.empty_like(src)
    t_cp = timed(lambda: dst.copy_(src))
    nbytes = 2 * src.numel() * src.element_size()
    del src, dst
    return {
        "matmul_tflops": 2 * n ** 3 / t_mm / 1e12,
        "matmul_dtype": str(mdt).replace("torch.", ""),
        "matmul_shape": [n, n, n],
        "matmul_label": (f"measured {str(mdt).replace('torch.', '')} torch.matmul on "
                         + ("the GPU" if dev.type == "cuda" else f"the CPU ({torch.get_num_threads()} threads)")),
        "copy_gbps": nbytes / t_cp / 1e9,
        "copy_bytes": nbytes,
        "copy_label": "large tensor copy, bytes read + written",
    }


def combine_ceilings(start: dict, end: dict) -> dict:
    """The ceilings measured before and after the cases: on a shared machine the larger
    of the two is the device's."""
    keys = ("matmul_tflops", "copy_gbps")
    return {**start, "start": {k: start[k] for k in keys}, "end": {k: end[k] for k in keys},
            **{k: max(start[k], end[k]) for k in keys},
            "rule": "measured before and after the cases; the larger of the two is used"}


#: how memory and time are measured, by device type (recorded in every results JSON)
MEMORY_METHOD = {
    "cuda": "GPU: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() "
            "once the inputs exist (after warm-up).",
    "cpu": "CPU: each case in a fresh process; glibc mallopt(M_MMAP_THRESHOLD=64 KiB) so freed blocks return "
           "to the OS; inputs allocated and written, one warm-up step, then peak RSS (VmHWM, reset via "
           "/proc/self/clear_refs) minus RSS before the measured step. RSS counts pages when first written, so "
           "a gradient buffer filled chunk by chunk hides part of a chunked method's temporaries "
           "(benchmarks/memory_model.py predicts both the allocator-level and the RSS figure).",
}
TIMING_METHOD = {
    "cuda": "CUDA events around forward and backward, median over repeats after warm-up",
    "cpu": "time.perf_counter around forward and backward (CPU work is synchronous), median "
           "over repeats after warm-up, in its own fresh process with default malloc settings",
}


def device_info(device: str) -> dict:
    dev = torch.device(device)
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        return {"type": "cuda", "name": torch.cuda.get_device_name(dev), "memory_bytes": p.total_memory,
                "capability": list(torch.cuda.get_device_capability(dev)), "cuda": torch.version.cuda,
                "count": torch.cuda.device_count()}
    name = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import platform
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    return {"type": "cpu", "name": name or platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "memory_bytes": mem}
