"""Fused path: loss + backward w.r.t. hidden [N, D] and the lm_head weight [V, D]."""
import pytest

from benchmarks._bench import CUDA, run_benchmark
from benchmarks.common import FUSED_METHODS, HEADS, applies

HEAD = "llama3-8b" if CUDA else "d512-v32k"
N = 4096 if CUDA else 1024
CASES = [pytest.param(m, k, id=f"{m}-K{k}") for k in (0, 32) for m in FUSED_METHODS if applies(m, "fused", k)]
if CUDA:
    CASES.append(pytest.param("ours-fused:torch", 32, id="ours-fused:torch-K32"))


@pytest.mark.parametrize("spec,K", CASES)
def test_fused_path(benchmark, peers, spec, K):
    D, V = HEADS[HEAD]
    benchmark.group = f"fused {HEAD} N={N} K={K}"
    run_benchmark(benchmark, peers, path="fused", head=HEAD, D=D, V=V, N=N, K=K, spec=spec)
