"""The dense two-head divergence kernel (ops/two_head/triton.py) under the interpreter:
the divergence and every student gradient against the float64 chunked PyTorch lean path,
at small odd shapes (student and teacher hidden sizes differ), for the three kinds."""
from __future__ import annotations

import pytest
import torch

import dft_kernels as dk
from dft_kernels.ops import TwoHeadArgs
from dft_kernels.ops.linear import backward as products
from dft_kernels.ops.two_head import triton as th
from dft_kernels.ops.two_head.torch import TwoHeadDivergenceLean

N, D, DT, V = 37, 24, 40, 300
TAU = 1.7


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(N, D, generator=g), torch.randn(V, D, generator=g) * (2.0 / D ** 0.5),
               torch.randn(V, generator=g) * 0.5)
    teacher = (torch.randn(N, DT, generator=g), torch.randn(V, DT, generator=g) * (2.0 / DT ** 0.5),
               torch.randn(V, generator=g) * 0.5)
    g_div = torch.rand(N, generator=g, dtype=torch.float64) * 2.0 - 0.5   # mixed signs, != 1
    g_div[4] = 0.0                                                        # a row without upstream gradient
    return student, teacher, g_div


def _run(fn, student, teacher, g_div, kind, cap, cap_t, beta=0.3):
    leaves = [t.clone().requires_grad_(True) for t in student]
    div = fn(*leaves, *teacher, TwoHeadArgs(cap, cap_t, 1.0 / TAU, kind, beta))
    (div * g_div.to(div.dtype)).sum().backward()
    return div, [t.grad for t in leaves]


CASES = [pytest.param("forward_kl", torch.float32, id="fkl-fp32"),
         pytest.param("reverse_kl", torch.float32, id="rkl-fp32"),
         pytest.param("jsd", torch.float32, id="jsd-fp32"),
         pytest.param("forward_kl", torch.bfloat16, id="fkl-bf16"),
         pytest.param("jsd", torch.bfloat16, id="jsd-bf16")]


@pytest.mark.parametrize("kind, dtype", CASES)
def test_matches_float64_lean_path(kind, dtype):
    """Loss and dh, dw, db against the float64 lean path on the same rounded inputs; a
    softcap on the student's head only; teacher tensors get no gradient."""
    student, teacher, g_div = _problem()
    student = [t.to(dtype) for t in student]
    teacher = [t.to(dtype) for t in teacher]
    div, grads = _run(th.TwoHeadDivergenceTriton.apply, student, teacher, g_div, kind, 6.0, None)
    ref, ref_grads = _run(TwoHeadDivergenceLean.apply, [t.double() for t in student],
                          [t.double() for t in teacher], g_div, kind, 6.0, None)
    assert div.dtype == torch.float32 and div.shape == (N,)
    assert all(not t.requires_grad and t.grad is None for t in teacher)
    torch.testing.assert_close(div.double(), ref, rtol=1e-5, atol=1e-6)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for name, got, want in zip(("dh", "dw", "db"), grads, ref_grads):
        assert got.dtype == dtype
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double() / scale, want / scale, **tol, msg=name)
    assert torch.all(grads[0][4] == 0)        # zero upstream gradient: zero dh row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_teacher_softcap_several_slabs_and_chunks(monkeypatch, dtype):
    """Reverse KL with the teacher's softcap, the backward split into several vocab slabs
    (and, fp32, row chunks; bf16: the fp32 dH accumulator) by small buffer budgets."""
    monkeypatch.setattr(products, "ALIGN", 16)
    monkeypatch.setattr(products, "SLAB_BYTES", 48 * 32 * 2)
    monkeypatch.setattr(products, "ACC_BYTES", 16 * D * 4)
    low = dtype != torch.float32
    n_chunk, n_slab = products._chunking(N, V, D, 2 if low else 4, low, low)
    assert n_slab < V and (low or n_chunk < N)
    student, teacher, g_div = _problem(1)
    student = [t.to(dtype) for t in student]
    teacher = [t.to(dtype) for t in teacher]
    div, grads = _run(th.TwoHeadDivergenceTriton.apply, student, teacher, g_div, "reverse_kl", None, 5.0)
    ref, ref_grads = _run(TwoHeadDivergenceLean.apply, [t.double() for t in student],
                          [t.double() for t in teacher], g_div, "reverse_kl", None, 5.0)
    torch.testing.assert_close(div.double(), ref, rtol=1e-5, atol=1e-6)
    for name, got, want in zip(("dh", "dw", "db"), grads, ref_grads):
        scale = want.abs().max().item()
        tol = 2e-2 if low else 1e-4
        torch.testing.assert_close(got.double() / scale, want / scale, rtol=tol, atol=tol, msg=name)


def test_gpu_config_under_interpreter(monkeypatch):
    """The GPU branch of ``two_head_config`` (64 x 128 tiles, 128-wide products) executes,
    JSD with both softcaps, fp32."""
    gpu = th.two_head_config((9, 0), torch.float32)
    assert gpu.fwd.BLOCK_N >= 64 and gpu.gemm.BLOCK_M >= 64
    used = []
    monkeypatch.setattr(th, "two_head_config", lambda capability, dtype: used.append(capability) or gpu)
    student, teacher, g_div = _problem(2)
    div, grads = _run(th.TwoHeadDivergenceTriton.apply, student, teacher, g_div, "jsd", 4.0, 7.0, beta=0.6)
    ref, ref_grads = _run(TwoHeadDivergenceLean.apply, [t.double() for t in student],
                          [t.double() for t in teacher], g_div, "jsd", 4.0, 7.0, beta=0.6)
    assert used == [None, None]               # forward and backward launchers
    torch.testing.assert_close(div.double(), ref, rtol=1e-5, atol=1e-6)
    for name, got, want in zip(("dh", "dw", "db"), grads, ref_grads):
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double() / scale, want / scale, rtol=1e-4, atol=1e-5, msg=name)


def test_public_loss_triton_matches_torch():
    """``fused_linear_distill_loss(impl="triton", strategy="lean")`` equals impl="torch"
    (labels with an ignored row, biases on both heads, softcap on one, temperature)."""
    (h, w, b), (ht, wt, bt), _ = _problem(3)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(3))
    labels[[1, 9]] = -100
    out = {}
    for impl in ("triton", "torch"):
        leaves = [t.clone().requires_grad_(True) for t in (h, w, b)]
        loss = dk.fused_linear_distill_loss(leaves[0], leaves[1], ht, wt, labels, bias=leaves[2], teacher_bias=bt,
                                            divergence="jsd", beta=0.3, temperature=TAU, teacher_softcap=8.0,
                                            impl=impl, strategy="lean")
        loss.backward()
        out[impl] = (loss.detach(), [t.grad for t in leaves])
    torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-5, atol=1e-6)
    for got, want in zip(out["triton"][1], out["torch"][1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert torch.all(out["triton"][1][0][[1, 9]] == 0)


def test_rejects_unsupported_dtype():
    student, teacher, _ = _problem()
    with pytest.raises(TypeError, match="float32, bfloat16 and float16"):
        th.TwoHeadDivergenceTriton.apply(*[t.double() for t in student], *[t.double() for t in teacher],
                                         TwoHeadArgs(None, None, 1.0, "forward_kl", 0.5))
