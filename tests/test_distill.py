"""dk.fused_linear_distill_loss (docs/design.md sec. 11) against a float64 reference on
materialised logits, TRL 1.16's _chunked_divergence_loss and Liger's fused linear JSD."""
import math

import pytest
import torch

import dft_kernels as dk
from dft_kernels.options import effective_divergence

N, DS, DT, V = 13, 16, 24, 53
TAU = 1.7


def _inputs(dtype, seed=5):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, DS, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, DS, generator=g) * 0.5).to(dtype).requires_grad_()
    b = torch.randn(V, generator=g).to(dtype).requires_grad_()
    ht, wt, bt = torch.randn(N, DT, generator=g), torch.randn(V, DT, generator=g) * 0.5, torch.randn(V, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[2, 5]] = -100
    return h, w, b, ht.to(dtype), wt.to(dtype), bt.to(dtype), labels


def _float64_reference(h, w, b, ht, wt, bt, labels, kind, beta, cap, cap_t, scale, lam):
    """Independent naive reference: full logits, log_softmax, the divergence of sec. 3."""
    def logp(h, w, b, c, s, tau):
        z = (h.double() @ w.double().T + b.double()) * s
        z = c * torch.tanh(z / c) if c else z
        return (z / tau).log_softmax(-1)
    lq, lp = logp(h, w, b, cap, scale, TAU), logp(ht, wt, bt, cap_t, 1.0, TAU)
    p, q = lp.exp(), lq.exp()
    if kind == "forward_kl":
        d = (p * (lp - lq)).sum(-1)
    elif kind == "reverse_kl":
        d = (q * (lq - lp)).sum(-1)
    else:
        m = beta * p + (1 - beta) * q
        d = beta * (p * (lp - m.log())).sum(-1) + (1 - beta) * (q * (lq - m.log())).sum(-1)
    ok = labels != -100
    acc = -logp(h, w, b, cap, scale, 1.0).gather(1, labels.clamp(min=0)[:, None])[:, 0]
    per = torch.where(ok, d * TAU ** 2 + lam * acc, torch.zeros_like(d))
    return per.sum() / ok.sum()


DIVS = [pytest.param("forward_kl", 0.5, id="fkl"), pytest.param("reverse_kl", 0.5, id="rkl"),
        pytest.param("jsd", 0.3, id="jsd0.3"), pytest.param("jsd", 1.0, id="jsd-beta1")]


@pytest.mark.parametrize("strategy", [pytest.param("lean", id="lean"), pytest.param("fast", id="fast")])
@pytest.mark.parametrize("kind,beta", DIVS)
def test_matches_float64_reference(kind, beta, strategy):
    ref_in = _inputs(torch.float64)
    got_in = _inputs(torch.float32)
    kw = dict(divergence=kind, beta=beta, temperature=TAU, softcap=4.0, teacher_softcap=5.0, logit_scale=1.2, lam=0.3)
    ref = _float64_reference(*ref_in, effective_divergence(kind, beta), beta, 4.0, 5.0, 1.2, 0.3)
    (ref * 1.3).backward()
    h, w, b, ht, wt, bt, labels = got_in
    loss = dk.fused_linear_distill_loss(h, w, ht, wt, labels, bias=b, teacher_bias=bt, impl="torch", strategy=strategy,
                                        **kw)
    (loss * 1.3).backward()           # upstream gradient != 1
    assert abs(loss.item() - ref.item()) < 1e-5 * max(1.0, abs(ref.item()))
    for got, want in ((h, ref_in[0]), (w, ref_in[1]), (b, ref_in[2])):
        assert torch.allclose(got.grad.double(), want.grad, atol=2e-6, rtol=1e-4)
    assert h.grad[[2, 5]].abs().max() == 0          # ignored rows: no gradient


def test_float64_gradcheck_lean():
    h, w, b, ht, wt, bt, labels = _inputs(torch.float64)
    f = lambda h, w, b: dk.fused_linear_distill_loss(h, w, ht, wt, labels, bias=b, teacher_bias=bt, divergence="jsd",  # noqa: E731
                                                     beta=0.4, temperature=TAU, softcap=4.0, impl="torch",
                                                     strategy="lean", reduction="sum")
    assert torch.autograd.gradcheck(f, (h, w, b), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind,beta", DIVS)
def test_matches_trl_chunked_divergence(kind, beta):
    from trl.trainer.distillation_trainer import _chunked_divergence_loss
    trl_beta = {"forward_kl": 0.0, "reverse_kl": 1.0}.get(kind, beta)
    h, w, b, ht, wt, bt, labels = _inputs(torch.float32)
    ours = dk.fused_linear_distill_loss(h, w, ht, wt, labels, bias=b, teacher_bias=bt, divergence=kind, beta=beta,
                                        temperature=TAU, softcap=4.0, teacher_softcap=5.0, logit_scale=1.2,
                                        impl="torch")
    ours.backward()
    grads = [t.grad.clone() for t in (h, w, b)]
    h2, w2, b2 = (t.detach().clone().requires_grad_() for t in (h, w, b))
    theirs, _, _ = _chunked_divergence_loss(h2[None], ht[None], w2, wt, (labels != -100)[None], trl_beta,
                                            student_lm_head_bias=b2, teacher_lm_head_bias=bt, student_logit_scale=1.2,
                                            student_final_logit_softcapping=4.0,
                                            teacher_final_logit_softcapping=5.0, temperature=TAU)
    (theirs * TAU ** 2).backward()          # ours = TRL's * tau**2
    assert math.isclose(ours.item(), theirs.item() * TAU ** 2, rel_tol=1e-5, abs_tol=1e-6)
    for g, t in zip(grads, (h2, w2, b2)):
        assert torch.allclose(g, t.grad, atol=1e-6, rtol=1e-4)


def test_matches_liger_fused_linear_jsd():
    liger = pytest.importorskip("liger_kernel.transformers.fused_linear_jsd")
    h, w, _, ht, wt, _, labels = _inputs(torch.float32)
    ours = dk.fused_linear_distill_loss(h, w, ht, wt, labels, divergence="jsd", beta=0.3, temperature=TAU,
                                        impl="torch")
    ours.backward()
    h2, w2 = (t.detach().clone().requires_grad_() for t in (h, w))
    theirs = liger.LigerFusedLinearJSD(jsd_beta=0.3, temperature=TAU)(h2, w2, ht, wt, labels)
    (theirs * TAU ** 2).backward()
    assert math.isclose(ours.item(), theirs.item() * TAU ** 2, rel_tol=1e-4)
    assert torch.allclose(h.grad, h2.grad, atol=1e-5, rtol=1e-3)
    assert torch.allclose(w.grad, w2.grad, atol=1e-5, rtol=1e-3)


def test_reductions_and_nothing_counted():
    h, w, b, ht, wt, bt, labels = _inputs(torch.float32)
    none = dk.fused_linear_distill_loss(h, w, ht, wt, labels, reduction="none", impl="torch")
    total = dk.fused_linear_distill_loss(h, w, ht, wt, labels, reduction="sum", impl="torch")
    assert none.shape == (N,) and none[2] == 0 and torch.allclose(none.sum(), total)
    nib = dk.fused_linear_distill_loss(h, w, ht, wt, labels, num_items_in_batch=40, impl="torch")
    assert torch.allclose(nib, total / 40)
    empty = dk.fused_linear_distill_loss(h, w, ht, wt, torch.full((N,), -100), impl="torch")
    empty.backward()
    assert empty.item() == 0 and h.grad.abs().max() == 0


def test_bad_input_is_named():
    h, w, b, ht, wt, bt, labels = _inputs(torch.float32)
    with pytest.raises(ValueError, match="vocab"):
        dk.fused_linear_distill_loss(h, w, ht, wt[:-1], labels)
    with pytest.raises(ValueError, match="teacher_hidden requires grad"):
        dk.fused_linear_distill_loss(h, w, ht.requires_grad_(), wt, labels)
    with pytest.raises(ValueError, match="leading dims"):
        dk.fused_linear_distill_loss(h, w, ht[:-1].detach(), wt, labels)
    with pytest.raises(ValueError, match="divergence"):
        dk.fused_linear_distill_loss(h, w, ht.detach(), wt, labels, divergence="kl")


def test_auto_takes_the_triton_kernel_where_triton_is_picked(monkeypatch):
    """"auto" on CUDA resolves to Triton: the lean strategy runs the two-head kernel
    (ops/two_head/triton.py; the interpreter here), float64 inputs the chunked PyTorch path."""
    from dft_kernels import distill
    from dft_kernels.ops.two_head import triton as two_head_triton
    h, w, b, ht, wt, bt, labels = _inputs(torch.float32)
    expected = dk.fused_linear_distill_loss(h, w, ht, wt, labels, impl="torch", strategy="lean")
    calls = []
    monkeypatch.setattr(two_head_triton, "two_head_forward",
                        lambda *a, _f=two_head_triton.two_head_forward: calls.append(1) or _f(*a))
    monkeypatch.setattr(distill, "resolve_impl", lambda impl, device: "triton" if impl == "auto" else impl)
    got = dk.fused_linear_distill_loss(h, w, ht, wt, labels, impl="auto", strategy="lean")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert calls == [1]
    h64, w64, ht64, wt64 = (t.double() for t in (h, w, ht, wt))
    got64 = dk.fused_linear_distill_loss(h64, w64, ht64, wt64, labels, impl="auto", strategy="lean")
    assert calls == [1] and got64.dtype == torch.float64
