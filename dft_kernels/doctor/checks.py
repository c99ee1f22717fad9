"""What ``dft-kernels doctor`` measures (docs/design.md sec. 16): the environment, every
kernel through its public op against a float64 reference, and the timings of the
loss's implementations and backward options at the user's head."""
from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

#: the Triton releases the compile gate and the tests cover (pyproject, README)
TRITON_RANGE = ("3.2", "3.9")
MIN_TORCH = (2, 3)
#: error floor of the verdict per dtype (relative to the reference's largest value)
FLOOR = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
#: the kernel may be this many times worse than the same-dtype chunked PyTorch path
MULTIPLE = 8.0


def _ver(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("+")[0].split(".")[:2] if p.isdigit())


def environment(device: torch.device) -> dict:
    """Device, capability, driver, versions and whether they are supported."""
    try:
        import triton
        tv = triton.__version__
    except Exception as exc:  # noqa: BLE001 - reported, the kernels will fail their checks
        tv = f"unavailable ({type(exc).__name__})"
    lo, hi = (_ver(v) for v in TRITON_RANGE)
    got = _ver(tv)
    info = dict(device=str(device), python=platform.python_version(), torch=torch.__version__, triton=tv,
                triton_supported=f">={TRITON_RANGE[0]} (compile gate: {TRITON_RANGE[0]} .. {TRITON_RANGE[1]})",
                triton_in_range=bool(got) and lo <= got, triton_tested=bool(got) and lo <= got <= hi,
                torch_in_range=_ver(torch.__version__) >= MIN_TORCH)
    if device.type == "cuda":
        from ..ops.linear.config import arch_for
        cap = torch.cuda.get_device_capability(device)
        props = torch.cuda.get_device_properties(device)
        driver = None
        with contextlib.suppress(Exception):
            d = torch._C._cuda_getDriverVersion()
            driver = f"{d // 1000}.{d % 1000 // 10}"
        info.update(name=torch.cuda.get_device_name(device), capability=f"{cap[0]}.{cap[1]}",
                    arch=arch_for(cap).name, driver_cuda=driver, cuda_runtime=torch.version.cuda,
                    memory_gib=round(props.total_memory / 2 ** 30, 1), sms=props.multi_processor_count)
    else:
        info.update(name=platform.processor() or platform.machine(), capability=None, arch=None,
                    interpreter=os.environ.get("TRITON_INTERPRET") == "1")
    return info


# --------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class Head:
    """The problem size: tokens N, hidden size D, vocab V, teacher slots K."""
    N: int
    D: int
    V: int
    K: int = 8


SMALL_ODD = Head(N=37, D=72, V=517, K=5)
#: under the interpreter (CPU): smaller, still odd (V not a multiple of any block)
TINY_ODD = Head(N=19, D=40, V=261, K=3)


def _problem(head: Head, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    """fp32 masters of every input (hidden, weight, teacher head, logits, targets, labels
    with ignored rows), made on ``device`` (no [V, D] float64 on the host); the checks
    round them to ``dtype``, and the reference runs in float64 on the rounded values."""
    g = torch.Generator(device=device).manual_seed(seed)
    N, D, V, K = head.N, head.D, head.V, head.K
    kw = dict(generator=g, device=device)
    h, ht = torch.randn(N, D, **kw), torch.randn(N, D, **kw)
    w = torch.randn(V, D, **kw) * (4.0 / D ** 0.5)
    wt = torch.randn(V, D, **kw) * (4.0 / D ** 0.5)
    lp, idx = torch.log_softmax(torch.randn(N, V, **kw) * 3, -1).topk(min(K, V), dim=-1)
    labels = torch.randint(0, V, (N,), **kw)
    labels[::7] = -100
    return dict(h=h, w=w, ht=ht, wt=wt, index=idx, logprobs=lp, labels=labels, x=(h @ w.T) / 2)


def timing_problem(head: Head, device: torch.device, seed: int = 0) -> dict:
    """The timing inputs, made on ``device`` in fp32 (no float64 [V, D] on the host)."""
    g = torch.Generator(device=device).manual_seed(seed)
    N, D, V, K = head.N, head.D, head.V, head.K
    kw = dict(generator=g, device=device)
    lp = torch.log_softmax(torch.randn(N, K + 1, **kw), -1)[:, :K]
    labels = torch.randint(0, V, (N,), **kw)
    labels[::7] = -100
    return dict(h=torch.randn(N, D, **kw), w=torch.randn(V, D, **kw) * (4.0 / D ** 0.5),
                index=torch.randint(0, V, (N, K), **kw), logprobs=lp, labels=labels)


def _leaves(p: dict, dtype: torch.dtype, names=("h", "w")) -> list[torch.Tensor]:
    return [p[n].detach().to(dtype, copy=True).requires_grad_(True) for n in names]


def _run(fn: Callable, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    """The loss and the gradients of ``leaves`` (detached, float64)."""
    loss = fn(*leaves)
    loss.backward()
    return [loss.detach().double()] + [t.grad.double() for t in leaves]


def _err(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """The largest error over the loss and each gradient, relative to the reference's
    largest magnitude of that tensor."""
    out = 0.0
    for a, b in zip(got, ref):
        scale = max(b.abs().max().item(), 1e-30)
        out = max(out, ((a - b).abs().max().item()) / scale)
    return out


# --------------------------------------------------------------------------- kernel checks


def _losses(p: dict) -> dict[str, tuple[Callable, tuple]]:
    """kernel name -> (loss(impl) -> fn(*leaves), leaf names): each kernel's public op."""
    import dft_kernels as dk
    targets = dict(target_index=p["index"], target_logprobs=p["logprobs"], labels=p["labels"])
    return {
        "lse_gather": (lambda impl: lambda x: dk.dft_loss(x, **targets, impl=impl), ("x",)),
        "linear_lse_gather": (lambda impl: lambda h, w: dk.fused_linear_dft_loss(
            h, w, **targets, impl=impl, strategy="lean"), ("h", "w")),
        "fast": (lambda impl: lambda h, w: dk.fused_linear_dft_loss(
            h, w, **targets, impl=impl, strategy="fast"), ("h", "w")),
        "two_head": (lambda impl: lambda h, w: dk.fused_linear_distill_loss(
            h, w, p["ht"].to(h.dtype), p["wt"].to(h.dtype), p["labels"], lam=0.1, impl=impl, strategy="lean"),
                     ("h", "w")),
    }


def check_kernel(name: str, p: dict, dtype: torch.dtype) -> dict:
    """One kernel natively (impl="triton") and on the same-dtype chunked PyTorch path
    against float64 (the same rounded inputs): its error, the PyTorch path's, a verdict."""
    if name == "teacher_topk":
        return _check_topk(p, dtype)
    make, names = _losses(p)[name]
    t0 = time.perf_counter()
    try:
        ref = _run(make("reference" if name != "fast" else "torch"), [t.detach().double().requires_grad_(True)
                                                                       for t in _leaves(p, dtype, names)])
        same = _run(make("torch"), _leaves(p, dtype, names))
        got = _run(make("triton"), _leaves(p, dtype, names))
    except Exception as exc:  # noqa: BLE001 - a failing kernel is a verdict, not a crash
        return dict(kernel=name, ok=False, verdict=f"FAIL {type(exc).__name__}: {str(exc).strip()[:200]}",
                    seconds=round(time.perf_counter() - t0, 2))
    err, base = _err(got, ref), _err(same, ref)
    bound = max(MULTIPLE * base, FLOOR[dtype])
    ok = err <= bound and all(torch.isfinite(t).all() for t in got)
    verdict = (f"ok: error {err:.1e} (PyTorch path {base:.1e})" if ok else
               f"FAIL: error {err:.1e} > {bound:.1e} (PyTorch path {base:.1e})")
    return dict(kernel=name, ok=ok, error=err, torch_error=base, bound=bound, verdict=verdict,
                seconds=round(time.perf_counter() - t0, 2))


def _check_topk(p: dict, dtype: torch.dtype) -> dict:
    """Top-k ids and log-probs: the log-probs against float64 at the returned ids and the
    float64 top values (ties may swap ids)."""
    import dft_kernels as dk
    t0 = time.perf_counter()
    k = p["index"].shape[1]
    h, w = p["ht"].to(dtype), p["wt"].to(dtype)
    try:
        got = dk.teacher_topk(h, w, k, impl="triton")
    except Exception as exc:  # noqa: BLE001
        return dict(kernel="teacher_topk", ok=False, verdict=f"FAIL {type(exc).__name__}: {str(exc).strip()[:200]}",
                    seconds=round(time.perf_counter() - t0, 2))
    lsm = torch.log_softmax(h.double() @ w.double().T, -1)
    top = lsm.topk(k, dim=-1).values
    at_ids = lsm.gather(1, got.index.long().clamp(min=0))
    same = dk.teacher_topk(h, w, k, impl="torch")
    err = max((got.logprobs.double() - top).abs().max().item(), (got.logprobs.double() - at_ids).abs().max().item())
    base = (same.logprobs.double() - top).abs().max().item()
    bound = max(MULTIPLE * base, FLOOR[dtype] * max(top.abs().max().item(), 1.0))
    ok = err <= bound and bool((got.index >= 0).all())
    verdict = (f"ok: log-prob error {err:.1e} (PyTorch path {base:.1e})" if ok else
               f"FAIL: log-prob error {err:.1e} > {bound:.1e} (PyTorch path {base:.1e})")
    return dict(kernel="teacher_topk", ok=ok, error=err, torch_error=base, bound=bound, verdict=verdict,
                seconds=round(time.perf_counter() - t0, 2))


KERNELS = ("lse_gather", "linear_lse_gather", "fast", "teacher_topk", "two_head")


# --------------------------------------------------------------------------- timings


@contextlib.contextmanager
def _backward_gemm(value: str | None):
    old = os.environ.get("DFT_KERNELS_BACKWARD_GEMM")
    if value is not None:
        os.environ["DFT_KERNELS_BACKWARD_GEMM"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DFT_KERNELS_BACKWARD_GEMM", None)
        else:
            os.environ["DFT_KERNELS_BACKWARD_GEMM"] = old


#: option -> (impl, strategy, backward_gemm) of fused_linear_dft_loss
OPTIONS = {"naive": ("reference", "lean", None), "torch": ("torch", "lean", None),
           "lean": ("triton", "lean", "triton"), "lean+cublas_bwd": ("triton", "lean", "torch"),
           "fast": ("triton", "fast", None)}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_options(p: dict, dtype: torch.dtype, reps: int) -> dict:
    """Forward + backward seconds (median of ``reps`` after a warm-up) and peak extra
    memory of the fused loss per option of :data:`OPTIONS` at the problem's shape."""
    import dft_kernels as dk
    device = p["h"].device
    targets = dict(target_index=p["index"], target_logprobs=p["logprobs"], labels=p["labels"])
    out = {}
    for option, (impl, strategy, gemm) in OPTIONS.items():
        h, w = _leaves(p, dtype)
        try:
            with _backward_gemm(gemm):
                times = []
                for i in range(reps + 1):
                    h.grad = w.grad = None
                    if device.type == "cuda":
                        _sync(device)
                        torch.cuda.reset_peak_memory_stats(device)
                        base = torch.cuda.memory_allocated(device)
                    t0 = time.perf_counter()
                    dk.fused_linear_dft_loss(h, w, **targets, impl=impl, strategy=strategy).backward()
                    _sync(device)
                    if i:
                        times.append(time.perf_counter() - t0)
                peak = (torch.cuda.max_memory_allocated(device) - base) if device.type == "cuda" else None
            out[option] = dict(seconds=sorted(times)[len(times) // 2], peak_bytes=peak)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory for naive at a large head
            out[option] = dict(seconds=None, peak_bytes=None, error=f"{type(exc).__name__}: {str(exc)[:120]}")
        finally:
            del h, w
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return out


def fastest_choices(timings: dict) -> dict:
    """The choices ``auto`` would read from the cache: impl, strategy, backward_gemm."""
    t = {k: v["seconds"] for k, v in timings.items() if v.get("seconds") is not None}
    choices = {}
    triton_best = min((t[k] for k in ("lean", "fast", "lean+cublas_bwd") if k in t), default=None)
    if triton_best is not None and "torch" in t:
        choices["impl"] = "triton" if triton_best <= t["torch"] else "torch"
    if "lean" in t and "fast" in t:
        choices["strategy"] = "lean" if t["lean"] < t["fast"] else "fast"
    if "lean" in t and "lean+cublas_bwd" in t:
        choices["backward_gemm"] = "triton" if t["lean"] <= t["lean+cublas_bwd"] else "torch"
    return choices
