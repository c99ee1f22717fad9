"""impl="auto"'s first-call numerical check (ops/self_check.py, docs/design.md sec. 16): a
kernel that runs without an error but gives wrong numbers (a miscompile) sends the op to the
chunked PyTorch path with one warning. Wrong numbers are injected into the Triton path's
forward or backward; the kernels run under the interpreter (the check forced on)."""
from __future__ import annotations

import warnings

import pytest
import torch

import dft_kernels as dk
from dft_kernels.ops import fallback, self_check

from .test_fallback import _loss_and_grads as _fused
from .test_fallback import _problem

pytest.importorskip("triton")


@pytest.fixture(autouse=True)
def auto_picks_triton_and_checks(monkeypatch):
    monkeypatch.setenv("DFT_KERNELS_IMPL", "triton")
    monkeypatch.setenv("DFT_KERNELS_SELF_CHECK", "1")
    fallback.reset()
    yield
    fallback.reset()


def _count_checks(monkeypatch) -> list:
    ran = []
    real = self_check.compare_paths

    def spy(*a, **k):
        ran.append(a[-1] if len(a) > 4 else k.get("out_names"))
        return real(*a, **k)
    monkeypatch.setattr(self_check, "compare_paths", spy)
    return ran


def _close(got, want):
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", ["lean", "fast"])
def test_the_check_passes_on_correct_kernels(monkeypatch, strategy):
    """Correct kernels: the check runs once per op, nothing warns, Triton serves the op."""
    ran = _count_checks(monkeypatch)
    h, w, targets = _problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error", fallback.TritonFallbackWarning)
        if strategy == "lean":        # calls without grad first: the check (forward and backward) runs once
            with torch.no_grad():
                dk.fused_linear_dft_loss(h, w, **targets, impl="auto")
                dk.fused_linear_dft_loss(h, w, **targets, impl="auto")
        got = _fused("auto", strategy)
        _fused("auto", strategy)                     # the second call runs no check
    assert len(ran) == 1
    op = "linear_lse_gather" if strategy == "lean" else "linear_fast_loss"
    assert fallback._STATE[(op, "cpu", "float32")] == "ok"
    _close(got, _fused("torch", strategy))


def test_the_check_passes_on_the_other_ops(monkeypatch):
    ran = _count_checks(monkeypatch)
    h, w, targets = _problem()
    ht, wt, _ = _problem(seed=1, D=16)
    x = (h @ w.T).requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fallback.TritonFallbackWarning)
        dk.dft_loss(x, **targets, impl="auto").backward()
        top = dk.teacher_topk(h, w, 4, impl="auto")
        dist = dk.fused_linear_distill_loss(h.requires_grad_(True), w, ht, wt, impl="auto", strategy="lean")
    assert len(ran) == 3
    torch.testing.assert_close(top.logprobs, dk.teacher_topk(h.detach(), w, 4, impl="torch").logprobs)
    torch.testing.assert_close(dist, dk.fused_linear_distill_loss(h, w, ht, wt, impl="torch", strategy="lean"))


def test_a_wrong_forward_falls_back(monkeypatch):
    """A forward that is off by 0.25 in the lse (no error raised) is caught before the
    user's data ever goes through it; the loss and gradients are the PyTorch path's."""
    from dft_kernels.ops.linear import triton as fused
    right = fused.LinearLSEGatherTriton

    class Wrong(right):
        @staticmethod
        def forward(ctx, *a):
            lse, gathered = right.forward(ctx, *a)
            return lse + 0.25, gathered
    monkeypatch.setattr(fused, "LinearLSEGatherTriton", Wrong)
    with pytest.warns(fallback.TritonFallbackWarning, match="wrong numbers.*lse differs"):
        got = _fused("auto")
    assert fallback._STATE[("linear_lse_gather", "cpu", "float32")] == "failed"
    _close(got, _fused("torch"))


def test_a_wrong_backward_falls_back(monkeypatch):
    """A backward kernel whose dH is 1.5x too large: the forward agrees, the gradient does not."""
    from dft_kernels.ops.linear import triton as fused
    real = fused.linear_lse_gather_backward

    def wrong(*a, **k):
        dh, dw, db = real(*a, **k)[:3]
        return (dh * 1.5 if dh is not None else None, dw, db, *real(*a, **k)[3:])
    monkeypatch.setattr(fused, "linear_lse_gather_backward", wrong)
    with pytest.warns(fallback.TritonFallbackWarning, match="wrong numbers.*gradient 0 differs"):
        got = _fused("auto")
    _close(got, _fused("torch"))


def test_a_wrong_backward_is_caught_under_inference_mode(monkeypatch):
    """An evaluation under ``torch.inference_mode()`` still checks the backward kernels
    (the op's state is per process: a later training step would use them)."""
    from dft_kernels.ops.linear import triton as fused
    real = fused.linear_lse_gather_backward
    monkeypatch.setattr(fused, "linear_lse_gather_backward",
                        lambda *a, **k: (lambda r: (r[0] * 1.5, *r[1:]))(real(*a, **k)))
    h, w, targets = _problem()
    with torch.inference_mode(), pytest.warns(fallback.TritonFallbackWarning, match="gradient 0 differs"):
        dk.fused_linear_dft_loss(h, w, **targets, impl="auto")


def test_wrong_teacher_topk_falls_back(monkeypatch):
    from dft_kernels.ops.teacher_topk import triton as topk
    real = topk.teacher_topk_forward
    monkeypatch.setattr(topk, "teacher_topk_forward", lambda *a: (lambda r: (r[0], r[1] - 0.5, r[2]))(real(*a)))
    h, w, _ = _problem()
    with pytest.warns(fallback.TritonFallbackWarning, match="logprobs differs"):
        got = dk.teacher_topk(h, w, 4, impl="auto")
    torch.testing.assert_close(got.logprobs, dk.teacher_topk(h, w, 4, impl="torch").logprobs)


def test_enabled_on_cuda_by_default_and_by_the_switch(monkeypatch):
    monkeypatch.delenv("DFT_KERNELS_SELF_CHECK")
    assert self_check.enabled(torch.device("cuda")) and not self_check.enabled(torch.device("cpu"))
    monkeypatch.setenv("DFT_KERNELS_SELF_CHECK", "0")
    assert not self_check.enabled(torch.device("cuda"))
    monkeypatch.setenv("DFT_KERNELS_SELF_CHECK", "1")
    assert self_check.enabled(torch.device("cpu"))


def test_compare_reports_the_first_disagreement():
    a, b = torch.ones(3), torch.ones(3)
    assert self_check._compare([a], [b], torch.float32, ["x"]) is None
    assert "x differs" in self_check._compare([a * 1.02], [b], torch.float32, ["x"])
    assert self_check._compare([a * 1.02], [b], torch.bfloat16, ["x"]) is None     # within 16-bit tolerance
    assert "not finite" in self_check._compare([torch.tensor([float("nan")])], [torch.ones(1)], torch.float32, ["y"])


def test_the_problem_keeps_the_call_s_slot_count():
    """More slots than the check's vocab: the index keeps the call's width (-1 past the vocab)."""
    idx = self_check.problem_index(300, 3001, "cpu")
    assert idx.shape == (self_check.INTERPRETER_ROWS, 300)
    assert (idx[:, 141:] == -1).all() and (idx[1, :141] >= 0).all() and (idx[0] == -1).all()
    assert self_check.logits_problem(3001, torch.float32, "cpu").shape[1] == 141
    assert self_check.logits_problem(4096, torch.float32, "cpu").shape[1] == 144
