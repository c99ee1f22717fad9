"""A LoRA'd lm_head inside the fused losses (docs/design.md sec. 17): loss and every
gradient (h, W, b, A, B) against a float64 reference that materialises ``W + s * B @ A``,
on both paths and strategies, frozen or trained W, with ignored rows and upstream != 1."""
from __future__ import annotations

import pytest
import torch

import dft_kernels as dk
from dft_kernels import reference

from .test_fused_linear import make_fused_problem


def _lora(D, V, r=4, *, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(r, D, generator=g, dtype=torch.float64) / D ** 0.5
    b = torch.randn(V, r, generator=g, dtype=torch.float64) * 0.7
    return a.to(dtype), b.to(dtype)


def _run(fn, tensors, trained, upstream, **kw):
    leaves = {k: (None if t is None else t.detach().clone().requires_grad_(k in trained))
              for k, t in tensors.items()}
    loss = fn(leaves, **kw)
    if loss.dim() == 0:
        loss.backward(torch.tensor(upstream, dtype=loss.dtype))
    else:
        loss.backward(torch.full_like(loss, upstream))
    return loss.detach().double(), {k: leaves[k].grad.double() for k in trained}


def _fused(t, **kw):
    return dk.fused_linear_dft_loss(t["hidden"], t["weight"], t["idx"], t["lp"], t["labels"], bias=t["bias"],
                                    lora_A=t["A"], lora_B=t["B"], **kw)


def _merged_reference(t, *, lora_scaling, **kw):
    # the reference materialises the merged weight W + s * B @ A
    w = t["weight"] + lora_scaling * t["B"] @ t["A"]
    return reference.fused_linear_dft_loss(t["hidden"], w, t["idx"], t["lp"], t["labels"], bias=t["bias"], **kw)


CASES = [  # impl, strategy, trained tensors
    ("torch", "lean", ("hidden", "weight", "bias", "A", "B")),
    ("torch", "fast", ("hidden", "weight", "bias", "A", "B")),
    ("torch", "lean", ("A", "B")),                   # a style head: base frozen, no dH
    ("torch", "fast", ("hidden", "A", "B")),
    ("triton", "lean", ("hidden", "weight", "bias", "A", "B")),
    ("triton", "lean", ("hidden", "A", "B")),        # frozen W: dW only for B's columns
    ("triton", "fast", ("hidden", "B")),
]


@pytest.mark.parametrize("impl,strategy,trained", CASES, ids=lambda c: c if isinstance(c, str) else "+".join(c))
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_lora_head_matches_merged_reference(impl, strategy, trained, divergence):
    hidden, weight, bias, idx, lp, labels = make_fused_problem(N=29, D=37, V=301, K=5, seed=3)
    A, B = _lora(37, 301)
    t = dict(hidden=hidden, weight=weight, bias=bias, idx=idx, lp=lp, labels=labels, A=A, B=B)
    kw = dict(divergence=divergence, lam=0.3, temperature=1.5, tail="bucket")
    dtype = torch.float32
    t32 = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() and k != "lp" else v)
           for k, v in t.items()}
    t32["lp"] = lp.float()
    loss, grads = _run(_fused, t32, trained, 0.7, impl=impl, strategy=strategy, lora_scaling=2.0, **kw)
    ref_t = dict(t)
    ref_loss, ref_grads = _run(lambda x, **k: _merged_reference(x, **k), ref_t, trained, 0.7, lora_scaling=2.0,
                               **kw)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-5, atol=2e-6)
    for k in trained:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=2e-6, msg=lambda m: f"d{k}: {m}")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_lora_head_reduction_none_and_dropout(impl):
    """Per-row losses (ignored rows 0) and the adapter's dropout applied to h once."""
    hidden, weight, bias, idx, lp, labels = make_fused_problem(N=19, D=24, V=133, K=4, seed=5)
    A, B = _lora(24, 133, r=3)
    mask = (torch.rand(19, 24, generator=torch.Generator().manual_seed(0)) > 0.3).double() / 0.7

    def dropout(x):
        return x * mask.to(x.dtype)
    dt = torch.float64 if impl == "torch" else torch.float32      # the kernels' dtypes
    out = dk.fused_linear_dft_loss(hidden.to(dt), weight.to(dt), idx, lp.to(dt), labels, bias=bias.to(dt),
                                   lora_A=A.to(dt), lora_B=B.to(dt), lora_scaling=0.5, lora_dropout=dropout,
                                   reduction="none", impl=impl)
    u = 0.5 * (hidden * mask) @ A.T
    ref = reference.fused_linear_dft_loss(torch.cat([hidden, u], 1), torch.cat([weight, B], 1), idx, lp, labels,
                                          bias=bias, reduction="none")
    tol = dict(rtol=1e-9, atol=1e-11) if dt == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(out.double(), ref, **tol)
    assert (labels == -100).any() and (out[labels == -100] == 0).all()


def test_lora_args_checked():
    hidden, weight, bias, idx, lp, labels = make_fused_problem(N=5, D=8, V=31, K=2)
    A, B = _lora(8, 31, r=2)
    with pytest.raises(ValueError, match="lora_A and lora_B come together"):
        dk.fused_linear_dft_loss(hidden, weight, idx, lp, labels, lora_A=A)
    with pytest.raises(ValueError, match=r"lora_B has shape \(30, 2\)"):
        dk.fused_linear_dft_loss(hidden, weight, idx, lp, labels, lora_A=A, lora_B=B[:30])
    with pytest.raises(ValueError, match=r"lora_A has shape \(2, 7\)"):
        dk.fused_linear_dft_loss(hidden, weight, idx, lp, labels, lora_A=A[:, :7], lora_B=B)
    with pytest.raises(TypeError, match="lora_B .* must have the lm_head weight's dtype"):
        dk.fused_linear_dft_loss(hidden, weight, idx, lp, labels, lora_A=A, lora_B=B.float())
    with pytest.raises(ValueError, match="lora_scaling"):
        dk.fused_linear_dft_loss(hidden, weight, idx, lp, labels, lora_A=A, lora_B=B, lora_scaling=float("nan"))


# --------------------------------------------------------------------------- distillation and teacher top-k

def _distill_inputs(seed=7, N=13, DS=16, DT=24, V=53, r=3):
    g = torch.Generator().manual_seed(seed)
    t = dict(h=torch.randn(N, DS, generator=g), w=torch.randn(V, DS, generator=g) * 0.5,
             b=torch.randn(V, generator=g), ht=torch.randn(N, DT, generator=g),
             wt=torch.randn(V, DT, generator=g) * 0.5, A=torch.randn(r, DS, generator=g) * 0.3,
             B=torch.randn(V, r, generator=g) * 0.5, At=torch.randn(r, DT, generator=g) * 0.3,
             Bt=torch.randn(V, r, generator=g) * 0.5)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[2, 5]] = -100
    return {k: v.double() for k, v in t.items()}, labels


@pytest.mark.parametrize("impl,strategy", [("torch", "lean"), ("torch", "fast"), ("triton", "lean")])
@pytest.mark.parametrize("trained", [("h", "w", "b", "A", "B"), ("A", "B")], ids=["all", "style-head"])
def test_distill_with_lora_heads_matches_merged(impl, strategy, trained):
    """Student and teacher each with a low-rank head correction: equal to the plain loss on
    the merged weights ``W + s * B @ A`` (loss and the gradients of h, W, b, A, B)."""
    t, labels = _distill_inputs()
    kw = dict(divergence="jsd", beta=0.3, temperature=1.7, softcap=4.0, logit_scale=1.2, lam=0.3)

    def merged(x):
        w = x["w"] + 0.5 * x["B"] @ x["A"]
        wt = x["wt"] + 2.0 * x["Bt"] @ x["At"]
        return dk.fused_linear_distill_loss(x["h"], w, x["ht"], wt, labels, bias=x["b"], impl="torch",
                                            strategy="lean", **kw)

    def ours(x):
        return dk.fused_linear_distill_loss(x["h"], x["w"], x["ht"], x["wt"], labels, bias=x["b"], impl=impl,
                                            strategy=strategy, lora_A=x["A"], lora_B=x["B"], lora_scaling=0.5,
                                            teacher_lora_A=x["At"], teacher_lora_B=x["Bt"],
                                            teacher_lora_scaling=2.0, **kw)
    ref_loss, ref_grads = _run(merged, t, trained, 1.3)
    t32 = {k: v.float() for k, v in t.items()}
    loss, grads = _run(ours, t32, trained, 1.3)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-5, atol=2e-6)
    for k in trained:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=2e-6, msg=lambda m: f"d{k}: {m}")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_teacher_topk_with_lora_head(impl):
    t, _ = _distill_inputs(seed=9, V=301, DT=40)
    got = dk.teacher_topk(t["ht"].float(), t["wt"].float(), 7, temperature=1.3, logit_scale=0.8,
                          lora_A=t["At"].float(), lora_B=t["Bt"].float(), lora_scaling=1.5, impl=impl)
    z = 0.8 * (t["ht"] @ (t["wt"] + 1.5 * t["Bt"] @ t["At"]).T) / 1.3
    lp, idx = z.log_softmax(-1).topk(7, dim=-1)
    assert torch.equal(got.index.long(), idx)
    torch.testing.assert_close(got.logprobs.double(), lp, rtol=1e-5, atol=1e-5)


def test_module_takes_the_lora_head():
    """FusedLinearDFTLoss forwards the adapter: the same loss as the function."""
    hidden, weight, bias, idx, lp, labels = make_fused_problem(N=11, D=12, V=41, K=3, seed=2)
    A, B = _lora(12, 41, r=2)
    want = dk.fused_linear_dft_loss(hidden, weight, idx, lp, labels, bias=bias, lora_A=A, lora_B=B, lora_scaling=0.7,
                                    lam=0.3, impl="torch")
    got = dk.FusedLinearDFTLoss(lam=0.3, impl="torch")(hidden, weight, idx, lp, labels, bias=bias, lora_A=A, lora_B=B,
                                                        lora_scaling=0.7)
    plain = dk.FusedLinearDFTLoss(lam=0.3, impl="torch")(hidden, weight, idx, lp, labels, bias=bias)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(got, plain)
