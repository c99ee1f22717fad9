"""Each op folder's ``naive.py`` against the op on both paths, small odd shapes, float64
(torch) / float32 (Triton under the interpreter): forward values and, for the
differentiable ops, the gradients by autograd through the naive reference."""
from __future__ import annotations

import pytest
import torch

from dft_kernels import ops
from dft_kernels.ops.linear import naive as linear_naive
from dft_kernels.ops.lse_gather import naive as lse_naive
from dft_kernels.ops.teacher_topk import naive as topk_naive
from dft_kernels.ops.two_head import naive as two_head_naive

N, D, V, M = 21, 19, 157, 5


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.6
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.3
    index = torch.randint(0, V, (N, M), generator=g)
    index[2] = -1                 # a row that does not count
    index[4, 1] = -1              # an empty slot
    index[5, 3] = V + 3           # out of range
    return h, w, b, index


def _tol(impl):
    return dict(rtol=1e-9, atol=1e-9) if impl == "torch" else dict(rtol=2e-5, atol=2e-5)


def _dtype(impl):
    return torch.float64 if impl == "torch" else torch.float32


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("scales,softcap,tail", [((1.0,), None, 0), ((0.7, 1.0), 5.0, 3)], ids=["plain", "two+tail"])
def test_lse_gather_and_linear_match_naive(impl, scales, softcap, tail):
    h, w, b, index = _problem()
    g = torch.Generator().manual_seed(1)
    u, lb = torch.randn(N, 3, generator=g, dtype=torch.float64), torch.randn(V, 3, generator=g, dtype=torch.float64)
    dt = _dtype(impl)
    cases = {
        "lse_gather": (lambda x: ops.lse_gather_apply(x[0] @ x[1].T + x[2], index, scales, softcap, impl,
                                                      tail_slots=tail),
                       lambda x: lse_naive.lse_gather(x[0] @ x[1].T + x[2], index, scales, softcap, tail)),
        "linear+lora": (lambda x: ops.linear_lse_gather_apply(x[0], x[1], x[2], index, scales, softcap, impl,
                                                              tail_slots=tail, lora=(x[3], x[4])),
                        lambda x: linear_naive.linear_lse_gather(x[0], x[1], x[2], index, scales, softcap, tail,
                                                                 lora=(x[3], x[4]))),
    }
    gl = torch.randn(N, len(scales) + (tail > 0), generator=g, dtype=torch.float64)
    gg = torch.randn(N, M, generator=g, dtype=torch.float64)
    for name, (ours, naive) in cases.items():
        x64 = [t.clone().requires_grad_() for t in (h, w, b, u, lb)]
        x = [t.detach().to(dt).requires_grad_() for t in (h, w, b, u, lb)]
        lse, gat = ours(x)
        ref_lse, ref_gat = naive(x64)
        torch.testing.assert_close(lse.double(), ref_lse, **_tol(impl), msg=lambda m: f"{name} lse: {m}")
        torch.testing.assert_close(gat.double(), ref_gat, **_tol(impl), msg=lambda m: f"{name} gathered: {m}")
        (lse.double() * gl).sum().add((gat.double() * gg).sum()).backward()
        (ref_lse * gl).sum().add((ref_gat * gg).sum()).backward()
        for i, (got, want) in enumerate(zip(x, x64)):
            if got.grad is not None or name == "linear+lora":
                torch.testing.assert_close(got.grad.double(), want.grad, **_tol(impl),
                                           msg=lambda m: f"{name} grad {i}: {m}")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_teacher_topk_matches_naive(impl):
    h, w, b, _ = _problem(3)
    dt = _dtype(impl)
    idx, lp, lse = ops.teacher_topk_apply(h.to(dt), w.to(dt), b.to(dt), 6, 0.8, 4.0, impl)
    ridx, rlp, rlse = topk_naive.teacher_topk(h, w, b, 6, 0.8, 4.0)
    assert torch.equal(idx.long(), ridx)
    # fp32 outputs on both paths (targets are stored in fp32)
    torch.testing.assert_close(lp.double(), rlp, **_tol("triton"))
    torch.testing.assert_close(lse.double(), rlse, **_tol("triton"))


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_two_head_matches_naive(impl, kind, beta):
    h, w, b, _ = _problem(4)
    g = torch.Generator().manual_seed(5)
    ht, wt = torch.randn(N, 11, generator=g, dtype=torch.float64), torch.randn(V, 11, generator=g, dtype=torch.float64)
    dt = _dtype(impl)
    x = [t.detach().to(dt).requires_grad_() for t in (h, w, b)]
    x64 = [t.clone().requires_grad_() for t in (h, w, b)]
    div = ops.two_head_divergence_apply((*x, 3.0), (ht.to(dt), wt.to(dt), None, None), 0.9, kind, beta, impl=impl)
    ref = two_head_naive.two_head_divergence((*x64, 3.0), (ht, wt, None, None), 0.9, kind, beta)
    torch.testing.assert_close(div.double(), ref, **_tol(impl))
    gd = torch.randn(N, generator=g, dtype=torch.float64)
    (div.double() * gd).sum().backward()
    (ref * gd).sum().backward()
    for got, want in zip(x, x64):
        torch.testing.assert_close(got.grad.double(), want.grad, **_tol(impl))
