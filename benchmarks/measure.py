"""One measurement: peak memory and forward / backward times of one case (with the
benchmarks' shared harness, benchmarks/harness.py).

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

import math
import os
import statistics
import time
import traceback

import torch

from .cases import DTYPES, Case, input_bytes, make_inputs
from .harness import PeakMemory, drop_grads, grad_bytes, malloc_release_to_os, reset_rss_peak, time_calls, time_phases
from .methods import build

# --------------------------------------------------------------------------- one case


def _measure_memory(case: Case, f, grads, dev) -> tuple[dict, torch.Tensor]:
    def step():
        drop_grads(grads)
        loss = f()
        loss.backward()
        return loss

    # warm-up where the peak counter can be reset after it (always on CUDA)
    warm = dev.type == "cuda" or reset_rss_peak()
    if warm:
        for _ in range(max(1, case.warmup)):
            step()
    drop_grads(grads)
    with PeakMemory(dev) as pm:
        loss = step()
    if dev.type == "cuda":
        method = "cuda max_memory_allocated - memory_allocated after inputs (warm)"
    elif warm and pm.resettable:
        method = "VmHWM - VmRSS after inputs, peak counter reset after one warm-up step"
    else:
        method = "peak RSS since start - RSS after inputs (cold: no warm-up, counter not resettable)"
    gb = grad_bytes(grads)
    mem = dict(method=method, baseline_bytes=int(pm.base), peak_bytes=int(pm.peak), peak_extra_bytes=int(pm.extra),
               grads_bytes=int(gb), extra_minus_grads_bytes=int(pm.extra - gb))
    return mem, loss


def _measure_time(case: Case, f, grads, dev) -> dict:
    fwd, bwd = ([t * 1e3 for t in s] for s in time_phases(
        [f, lambda loss: loss.backward()], dev, warmup=max(1, case.warmup), repeats=case.repeats,
        budget_s=case.time_budget_s, setup=lambda: drop_grads(grads)))
    drop_grads(grads)
    return time_record(fwd, bwd, [a + b for a, b in zip(fwd, bwd)],
                       "cuda events" if dev.type == "cuda" else "time.perf_counter")


def time_record(fwd: list, bwd: list, tot: list, clock: str, **more) -> dict:
    """A case's timing record from its per-iteration forward, backward and total samples
    (ms): medians, the best total, the samples; ``more`` after ``runs``."""
    return {"fwd_ms": statistics.median(fwd), "bwd_ms": statistics.median(bwd), "fwd_bwd_ms": statistics.median(tot),
            "fwd_bwd_min_ms": min(tot), "runs": len(tot), **more, "samples_fwd_ms": [round(t, 4) for t in fwd],
            "samples_bwd_ms": [round(t, 4) for t in bwd], "samples_fwd_bwd_ms": [round(t, 4) for t in tot],
            "clock": clock}


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
            drop_grads(grads)
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
        return statistics.median(time_calls(fn, dev, warmup=1, repeats=reps))

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
