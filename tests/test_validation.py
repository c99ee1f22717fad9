"""Bad input raises ValueError / TypeError naming the argument and the fix."""
from __future__ import annotations

import pytest
import torch

import dft_kernels as dk

from ._problems import make_problem


@pytest.fixture
def prob():
    logits, idx, lp, labels = make_problem(6, 50, 3, empty_slots=False)
    return logits.float(), idx, lp.float(), labels


SHAPE_CASES = [
    pytest.param(lambda l, i, p, y: (l, i[:, :2], p, y), ValueError, "same shape", id="index-vs-logprobs-K"),
    pytest.param(lambda l, i, p, y: (l, i[:4], p[:4], y), ValueError, "target_index has shape", id="index-rows"),
    pytest.param(lambda l, i, p, y: (l, i, p, y[:5]), ValueError, "labels has shape", id="labels-rows"),
    pytest.param(lambda l, i, p, y: (l, i.float(), p, y), TypeError, "target_index must be an integer", id="float-index"),
    pytest.param(lambda l, i, p, y: (l, i, p.long(), y), TypeError, "target_logprobs must be a floating", id="int-logprobs"),
    pytest.param(lambda l, i, p, y: (l, i, p, y.float()), TypeError, "labels must be an integer", id="float-labels"),
    pytest.param(lambda l, i, p, y: (l, i, None, y), ValueError, "pass both or neither", id="index-without-logprobs"),
    pytest.param(lambda l, i, p, y: (l.long(), i, p, y), TypeError, "logits must be a floating", id="int-logits"),
]


@pytest.mark.parametrize("make,exc,match", SHAPE_CASES)
def test_shape_and_dtype_errors(prob, make, exc, match):
    with pytest.raises(exc, match=match):
        dk.dft_loss(*make(*prob), impl="torch")


OPTION_CASES = [
    pytest.param(dict(divergence="kl"), "divergence='kl'", id="divergence"),
    pytest.param(dict(tail="drop"), "tail='drop'", id="tail"),
    pytest.param(dict(accuracy="nll"), "accuracy='nll'", id="accuracy"),
    pytest.param(dict(reduction="avg"), "reduction='avg'", id="reduction"),
    pytest.param(dict(impl="cuda"), "impl='cuda'", id="impl"),
    pytest.param(dict(divergence="reverse_kl", tail="renorm"), "reverse KL is undefined with tail='renorm'",
                 id="reverse-renorm"),
    pytest.param(dict(divergence="jsd", beta=1.0, tail="renorm"), "reverse KL is undefined", id="jsd1-renorm"),
    pytest.param(dict(divergence="reverse_kl", tail="raw"), "tail='raw' is defined for forward KL only",
                 id="reverse-raw"),
    pytest.param(dict(divergence="jsd", tail="raw"), "tail='raw'", id="jsd-raw"),
    pytest.param(dict(temperature=0.0), "temperature=0.0", id="temperature-zero"),
    pytest.param(dict(temperature=-1.0), "temperature", id="temperature-negative"),
    pytest.param(dict(lam=-0.1), "lam=-0.1", id="lam"),
    pytest.param(dict(beta=1.5, divergence="jsd"), "beta=1.5", id="beta-high"),
    pytest.param(dict(beta=-0.1, divergence="jsd"), "beta=-0.1", id="beta-low"),
    pytest.param(dict(softcap=0.0), "softcap", id="softcap"),
]


@pytest.mark.parametrize("opts,match", OPTION_CASES)
def test_option_errors(prob, opts, match):
    with pytest.raises(ValueError, match=match):
        dk.dft_loss(*prob, **opts)
    with pytest.raises(ValueError, match=match):
        dk.DFTLoss(**opts)


DATA_CASES = [
    pytest.param(lambda i, p: (i.index_fill(1, torch.tensor([0]), 50), p), "vocab size 50", id="id>=V"),
    pytest.param(lambda i, p: (i.index_fill(1, torch.tensor([0]), -2), p), "id -2 < -1", id="id<-1"),
    pytest.param(lambda i, p: (i, p.index_fill(1, torch.tensor([1]), float("nan"))), "NaN", id="nan"),
    pytest.param(lambda i, p: (i, p.index_fill(1, torch.tensor([1]), 0.5)), "logits instead of log-probs",
                 id="positive"),
    pytest.param(lambda i, p: (i, torch.full_like(p, -0.5)), "sum to .* > 1 \\+ 1e-3", id="mass>1"),
]


@pytest.mark.parametrize("make,match", DATA_CASES)
def test_data_errors_with_validate(prob, make, match):
    logits, idx, lp, labels = prob
    bad_idx, bad_lp = make(idx, lp)
    with pytest.raises(ValueError, match=match):
        dk.dft_loss(logits, bad_idx, bad_lp, labels, validate=True)
    with pytest.raises(ValueError, match=match):
        dk.SparseTargets(bad_idx, bad_lp).validate(vocab_size=50)


def test_without_validate_bad_ids_raise_and_never_read_out_of_bounds(prob, monkeypatch):
    """Bad ids raise without validate=True too (the always-on checks, docs/design.md sec. 7;
    this test asserted a finite loss before they existed); with the checks switched off
    (benchmarks only) they still never read out of bounds."""
    from dft_kernels import validation
    logits, idx, lp, labels = prob
    idx = idx.clone()
    idx[0, 0] = 10**9
    idx[1, 0] = -5
    with pytest.raises(ValueError, match="vocab size 50"):
        dk.dft_loss(logits, idx, lp, labels, impl="torch")
    monkeypatch.setattr(validation, "_ALWAYS_ON", False)
    loss = dk.dft_loss(logits, idx, lp, labels, impl="torch")
    assert torch.isfinite(loss)


@pytest.mark.parametrize("make,match", DATA_CASES)
def test_data_errors_without_validate(prob, make, match):
    """The same cases as validate=True, by the always-on checks (before: silently dropped or passed)."""
    logits, idx, lp, labels = prob
    bad_idx, bad_lp = make(idx, lp)
    for impl in ("torch", "reference"):
        with pytest.raises(ValueError, match=match):
            dk.dft_loss(logits, bad_idx, bad_lp, labels, impl=impl)


def test_validate_accepts_good_targets(prob):
    logits, idx, lp, labels = prob
    loss = dk.dft_loss(logits, idx, lp, labels, validate=True)
    assert torch.isfinite(loss)


def test_triton_on_cpu_without_interpreter_says_what_to_do(prob, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1|impl='torch'"):
        dk.dft_loss(*prob, impl="triton")


def test_fused_input_errors():
    h = torch.randn(5, 8)
    w = torch.randn(30, 8)
    with pytest.raises(ValueError, match="hidden has hidden size 7"):
        dk.fused_linear_dft_loss(torch.randn(5, 7), w, labels=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="weight must be 2-D"):
        dk.fused_linear_dft_loss(h, w[None], labels=torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="same dtype"):
        dk.fused_linear_dft_loss(h.double(), w, labels=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="bias must be a tensor of shape"):
        dk.fused_linear_dft_loss(h, w, labels=torch.zeros(5, dtype=torch.long), bias=torch.zeros(29))
