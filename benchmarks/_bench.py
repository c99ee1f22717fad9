"""Helpers shared by the pytest-benchmark suites (``benchmarks/test_bench_*.py``)."""
from __future__ import annotations

import os

import pytest
import torch

from .common import Case, build, make_inputs, method_status, parse_method

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = "bf16" if CUDA else "fp32"
ROUNDS = 10 if CUDA else 3


def run_benchmark(benchmark, peers: dict, *, path: str, head: str, D: int, V: int, N: int, K: int, spec: str):
    """Time one forward + backward of a method; a missing peer is a skip that names the reason."""
    base, impl = parse_method(spec)
    status = method_status(base, peers)
    if status:
        pytest.skip(status)
    if base == "compile-chunked" and not CUDA and os.environ.get("DFT_BENCH_COMPILE") != "1":
        pytest.skip("torch.compile on CPU takes minutes: set DFT_BENCH_COMPILE=1 to include it")
    case = Case(path=path, head=head, D=D, V=V, N=N, K=K, dtype=DTYPE, device=DEVICE, method=base, impl=impl)
    inputs = make_inputs(case)
    f, grads, resolved, note = build(case, inputs)

    def step():
        for g in grads:
            g.grad = None
        loss = f()
        loss.backward()
        if CUDA:
            torch.cuda.synchronize()
        return loss

    loss = step()  # also the first warm-up (compilation, autotuning)
    benchmark.extra_info.update(path=path, head=head, D=D, V=V, N=N, K=K, dtype=DTYPE, device=DEVICE,
                                method=case.label, impl=resolved, loss=float(loss.detach().float()), note=note)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
        for g in grads:
            g.grad = None
        step()
        benchmark.extra_info["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base_mem
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
