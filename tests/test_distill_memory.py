"""The dense distillation loss's memory model (``memory.two_head_extra_bytes`` through
``memory.loss_extra_bytes(..., teacher_hidden=...)``) against measured peaks, and
``fused_linear_distill_loss`` choosing its strategy with ``losses.choose_strategy``."""
from __future__ import annotations

import pytest
import torch

import dft_kernels as dk
from benchmarks.distill_memory import measure_cpu, measure_triton_lean
from dft_kernels import memory


@pytest.mark.parametrize("strategy,divergence", [("naive", "forward_kl"), ("naive", "jsd"), ("lean", "forward_kl"),
                                                 ("lean", "reverse_kl"), ("lean", "jsd"), ("fast", "forward_kl"),
                                                 ("fast", "jsd")])
def test_cpu_peak_matches_the_model(strategy, divergence):
    """One forward + backward on the CPU inside ``LivePeak`` (1/8 of the rows ignored; lean
    over several row tiles, fast over two row chunks): within 20% of the model."""
    n = 1024 if strategy == "naive" else 4096
    r = measure_cpu(strategy, divergence, n, 64, 96, 3001)
    assert (r["grad_fn"] == "AddBackward0") == (strategy == "fast")     # the fast strategy ran (its loss + 0)
    print(f"{strategy} {divergence}: measured {r['measured'] / 2 ** 20:.2f} MiB, model {r['model'] / 2 ** 20:.2f}")
    assert 0.8 <= r["measured"] / r["model"] <= 1.2, r


def test_cpu_peak_bf16_frozen_head():
    r = measure_cpu("fast", "jsd", 4096, 64, 96, 3001, torch.bfloat16, head_trains=False)
    assert 0.8 <= r["measured"] / r["model"] <= 1.2, r


@pytest.mark.parametrize("n_rows", [4096, 262144])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("head_trains", [True, False], ids=["head-trains", "head-frozen"])
def test_triton_lean_peak_matches_the_model(n_rows, dtype, head_trains):
    """The Triton two-head op on ``meta`` tensors with the sm_90 config at Llama-3 sizes
    (a 70B-like teacher, D 4096, Dt 8192, V 128256): within 20% of the model, and nothing
    that grows with N * V."""
    r = measure_triton_lean("jsd", n_rows, 4096, 8192, 128256, dtype, head_trains)
    assert 0.8 <= r["measured"] / r["model"] <= 1.2, r
    assert r["measured"] < n_rows * 128256


def test_model_orders_and_checks():
    kw = dict(n_rows=8192, hidden=4096, vocab=128256, k=0, dtype_bytes=2, teacher_hidden=8192)
    naive, lean, fast = (memory.loss_extra_bytes(s, **kw) for s in ("naive", "lean", "fast"))
    assert lean < fast < naive
    assert memory.loss_extra_bytes("fast", divergence="jsd", **kw) > fast
    with pytest.raises(ValueError, match="teacher_hidden"):
        memory.loss_extra_bytes("lean", **dict(kw, teacher_hidden=0))
    with pytest.raises(ValueError, match="divergence"):
        memory.loss_extra_bytes("lean", divergence="kl", **kw)


def _ran_fast(monkeypatch, memory_budget, divergence="forward_kl"):
    seen = []
    real = dk.ops.two_head_divergence_apply

    def spy(*a, row_weight=None, **k):
        seen.append(row_weight is not None)
        return real(*a, row_weight=row_weight, **k)
    monkeypatch.setattr(dk.ops, "two_head_divergence_apply", spy)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 16, generator=g, requires_grad=True)
    w = torch.randn(301, 16, generator=g, requires_grad=True)
    ht, wt = torch.randn(64, 24, generator=g), torch.randn(301, 24, generator=g)
    loss = dk.fused_linear_distill_loss(h, w, ht, wt, divergence=divergence, impl="torch",
                                        memory_budget=memory_budget)
    loss.backward()
    return seen == [True]


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_auto_chooses_with_the_model(monkeypatch, divergence):
    """``strategy="auto"`` runs fast exactly when the model's fast bytes fit the budget."""
    fast = memory.loss_extra_bytes("fast", n_rows=64, hidden=16, vocab=301, k=0, dtype_bytes=4, upcast=True,
                                   teacher_hidden=24, divergence=divergence)
    assert _ran_fast(monkeypatch, fast, divergence)
    assert not _ran_fast(monkeypatch, fast - 1, divergence)


def test_plan_reports_the_dense_loss(capsys):
    """``dft-kernels plan --teacher``: the teacher's weights join the weights and the loss path
    is the two-head model; a teacher with another vocab is refused (exit 2, one line)."""
    import json

    from dft_kernels.cli import main
    from dft_kernels.workflow.plan import NAMED_CONFIGS, memory_plan
    assert main(["plan", "--model", "llama-3-8b", "--teacher", "llama-3-8b", "--tokens", "4096", "--divergence", "jsd",
                 "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    alone = memory_plan(dict(NAMED_CONFIGS["llama-3-8b"]), tokens=4096)
    assert p["bytes"]["weights"] == 2 * alone["bytes"]["weights"]
    assert p["bytes"]["optimizer"] == alone["bytes"]["optimizer"]
    for s in ("naive", "lean", "fast"):
        assert p["loss_path"][s] == memory.loss_extra_bytes(s, n_rows=4096, hidden=4096, vocab=128256, k=0,
                                                            dtype_bytes=2, kernels="triton", teacher_hidden=4096,
                                                            divergence="jsd")
    assert main(["plan", "--model", "llama-3-8b", "--teacher", "gemma-2-2b", "--tokens", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--teacher's vocab size 256000" in err[0]
