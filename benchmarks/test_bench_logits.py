"""Logits path: loss + backward w.r.t. the given logits [N, V]."""
import pytest

from benchmarks._bench import CUDA, run_benchmark
from benchmarks.common import HEADS

HEAD = "llama3-8b" if CUDA else "d512-v32k"
N = 4096 if CUDA else 1024
METHODS = ["reference", "ours-logits"] + (["ours-logits:torch"] if CUDA else [])


@pytest.mark.parametrize("K", [pytest.param(k, id=f"K{k}") for k in (0, 32)])
@pytest.mark.parametrize("spec", [pytest.param(m, id=m) for m in METHODS])
def test_logits_path(benchmark, peers, spec, K):
    D, V = HEADS[HEAD]
    benchmark.group = f"logits {HEAD} N={N} K={K}"
    run_benchmark(benchmark, peers, path="logits", head=HEAD, D=D, V=V, N=N, K=K, spec=spec)
