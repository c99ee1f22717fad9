"""dft_loss (logits path): kernels vs the float64 reference over the option grid."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import dft_kernels as dk
from dft_kernels import reference
from dft_kernels.ops.lse_gather import triton as triton_lse_gather

from ._problems import loss_and_grad, make_problem

VALID = [
    ("forward_kl", 0.5, "bucket"), ("forward_kl", 0.5, "renorm"), ("forward_kl", 0.5, "raw"),
    ("reverse_kl", 0.5, "bucket"), ("jsd", 0.5, "bucket"), ("jsd", 0.25, "renorm"),
    ("jsd", 0.0, "bucket"), ("jsd", 1.0, "bucket"), ("jsd", 0.0, "raw"),
]
GRID = [
    pytest.param(dict(divergence=d, beta=b, tail=t, accuracy=a, temperature=tau, softcap=c, lam=lam),
                 id=f"{d}-b{b}-{t}-{a}-tau{tau}-cap{c}-lam{lam}")
    for (d, b, t), a, tau, c, lam in itertools.product(VALID, ["ce", "dft"], [1.0, 2.0], [None, 4.0], [0.2])
]


def _check(impl, opts, *, N=24, V=700, K=8, dtype=torch.float32, upstream=1.7, seed=0, factor=4.0,
           atol=1e-6, **prob):
    logits, idx, lp, labels = make_problem(N, V, K, seed=seed, **prob)
    l64, g64 = loss_and_grad(reference.dft_loss, logits, idx, lp, labels, upstream=upstream, **opts)
    # same-dtype PyTorch run: the error budget of this dtype
    lr, gr = loss_and_grad(reference.dft_loss, logits.to(dtype), idx, lp.to(dtype), labels,
                           upstream=upstream, **opts)
    lk, gk = loss_and_grad(dk.dft_loss, logits.to(dtype), idx, lp.to(dtype), labels, upstream=upstream,
                           impl=impl, **opts)
    assert torch.isfinite(lk).all() and torch.isfinite(gk).all()
    loss_err, loss_ref_err = (lk - l64).abs().max().item(), (lr - l64).abs().max().item()
    grad_err, grad_ref_err = (gk - g64).abs().max().item(), (gr - g64).abs().max().item()
    assert loss_err <= factor * loss_ref_err + atol * max(1.0, l64.abs().max().item()), (loss_err, loss_ref_err)
    assert grad_err <= factor * grad_ref_err + atol, (grad_err, grad_ref_err)
    return lk, gk


@pytest.mark.parametrize("opts", GRID)
def test_torch_path_matches_reference(opts):
    _check("torch", opts, N=48, V=2000, K=16)


TRITON_GRID = [p for i, p in enumerate(GRID) if i % 5 == 0]


@pytest.mark.parametrize("opts", TRITON_GRID)
def test_triton_path_matches_reference(opts):
    _check("triton", opts, N=12, V=700, K=5)


def test_triton_many_vocab_tiles(monkeypatch):
    """V not a multiple of the tile, many tiles, two temperatures and softcap in one pass."""
    monkeypatch.setattr(triton_lse_gather, "MAX_BLOCK_V", 128)
    _check("triton", dict(temperature=1.5, softcap=6.0, divergence="jsd", beta=0.3), N=10, V=1001, K=7)
    _check("triton", dict(lam=0.0), N=10, V=1001, K=7, ignored=False)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_torch_path_small_chunks_and_k1(impl):
    _check(impl, dict(), N=9, V=301, K=1, empty_slots=False)


def test_torch_path_many_chunks():
    logits, idx, lp, labels = make_problem(40, 500, 6)
    a = loss_and_grad(dk.dft_loss, logits.float(), idx, lp.float(), labels, impl="torch", chunk_elems=1000)
    b = loss_and_grad(dk.dft_loss, logits.float(), idx, lp.float(), labels, impl="torch")
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-7)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_k_equals_v_is_dense_kl(impl, divergence):
    N, V = 6, 97
    g = torch.Generator().manual_seed(3)
    z = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    t = torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * 2, -1)
    idx = torch.arange(V).repeat(N, 1)
    x = z.float().requires_grad_()
    loss = dk.dft_loss(x, idx, t.float(), None, divergence=divergence, impl=impl)
    loss.backward()
    zz = z.clone().requires_grad_()
    lq = torch.log_softmax(zz, -1)
    if divergence == "forward_kl":
        dense = F.kl_div(lq, t, log_target=True, reduction="batchmean")
    else:
        dense = F.kl_div(t, lq, log_target=True, reduction="batchmean")
    dense.backward()
    assert abs(loss.item() - dense.item()) < 2e-5
    torch.testing.assert_close(x.grad.double(), zz.grad, rtol=1e-4, atol=1e-6)


def test_gradcheck_float64_torch_path():
    logits, idx, lp, labels = make_problem(7, 40, 4, scale=1.0)
    for opts in [dict(), dict(divergence="reverse_kl", temperature=1.7), dict(divergence="jsd", beta=0.3,  # "dft" is stop-gradient: no gradcheck
                 softcap=3.0), dict(tail="renorm"), dict(tail="raw", reduction="sum")]:
        x = logits.clone().requires_grad_()
        assert torch.autograd.gradcheck(
            lambda x: dk.dft_loss(x, idx, lp, labels, impl="torch", **opts), (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_tail_bucket_when_student_mass_is_almost_all_on_slots(impl):
    """Q within 1e-6 of 1: the tail stays finite and accurate."""
    N, V, K = 4, 300, 10
    idx = torch.stack([torch.randperm(V, generator=torch.Generator().manual_seed(i))[:K] for i in range(N)])
    z = torch.full((N, V), -20.5, dtype=torch.float64)   # ~2e-8 of the mass off the slots
    z.scatter_(1, idx, torch.randn(N, K, dtype=torch.float64))
    q = torch.softmax(z, -1)
    assert (1 - q.gather(1, idx).sum(-1)).max() < 1e-6
    lp = torch.log_softmax(torch.randn(N, K, dtype=torch.float64), -1) + torch.log(torch.tensor(0.999))
    for div in ["forward_kl", "reverse_kl", "jsd"]:
        ref = reference.dft_loss(z, idx, lp, None, divergence=div)
        x = z.float().requires_grad_()
        out = dk.dft_loss(x, idx, lp.float(), None, divergence=div, impl=impl)
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(x.grad).all()
        assert abs(out.item() - ref.item()) < 1e-4 * max(1, abs(ref.item())), (div, out.item(), ref.item())


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_logits(impl, dtype):
    lk, gk = _check(impl, dict(temperature=2.0, divergence="jsd"), N=10, V=500, K=6, dtype=dtype,
                    scale=2.0, factor=2.0, atol=1e-3)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_every_position_ignored_gives_zero_loss_and_zero_grad(impl):
    logits, idx, lp, labels = make_problem(8, 200, 4, empty_slots=False)
    labels[:] = -100
    for red in ["mean", "sum", "none"]:
        x = logits.float().requires_grad_()
        loss = dk.dft_loss(x, idx, lp.float(), labels, impl=impl, reduction=red)
        loss.sum().backward()
        assert torch.all(loss == 0) and torch.all(x.grad == 0) and torch.isfinite(x.grad).all()
    # no labels, every slot empty: nothing counts either
    idx[:] = -1
    x = logits.float().requires_grad_()
    loss = dk.dft_loss(x, idx, lp.float(), None, impl=impl)
    loss.backward()
    assert loss.item() == 0 and torch.all(x.grad == 0)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_leading_dims_and_non_contiguous(impl):
    B, T, V, K = 2, 7, 300, 4
    logits, idx, lp, labels = make_problem(B * (T + 1), V, K, lead=(B, T + 1))
    sl = logits.float()[:, :-1]          # non-contiguous [B, T, V] view, read in place
    assert not sl.is_contiguous()
    args = (idx[:, :-1], lp[:, :-1].float(), labels[:, :-1])
    l1, g1 = loss_and_grad(dk.dft_loss, sl, *args, impl=impl, upstream=0.3)
    l2, g2 = loss_and_grad(reference.dft_loss, sl.double().contiguous(), args[0], args[1].double(), args[2],
                           upstream=0.3)
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-7)
    # unit stride missing along V: a transposed tensor
    xt = logits.reshape(-1, V).float().t().contiguous().t()
    assert xt.stride(-1) != 1
    l3, _ = loss_and_grad(dk.dft_loss, xt, idx.reshape(-1, K), lp.reshape(-1, K).float(), labels.reshape(-1),
                          impl=impl)
    l4 = reference.dft_loss(logits.reshape(-1, V), idx.reshape(-1, K), lp.reshape(-1, K), labels.reshape(-1))
    assert abs(l3.item() - l4.item()) < 1e-5
    # reduction="none" keeps the leading dims
    out = dk.dft_loss(sl, *args, impl=impl, reduction="none")
    assert out.shape == (B, T)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_reductions_and_num_items_in_batch(impl):
    logits, idx, lp, labels = make_problem(16, 300, 4)
    x = logits.float()
    none = dk.dft_loss(x, idx, lp.float(), labels, impl=impl, reduction="none")
    s = dk.dft_loss(x, idx, lp.float(), labels, impl=impl, reduction="sum")
    m = dk.dft_loss(x, idx, lp.float(), labels, impl=impl)
    n = (labels != -100).sum()
    torch.testing.assert_close(none.sum(), s)
    torch.testing.assert_close(m, s / n)
    m2 = dk.dft_loss(x, idx, lp.float(), labels, impl=impl, num_items_in_batch=40)
    m3 = dk.dft_loss(x, idx, lp.float(), labels, impl=impl, num_items_in_batch=torch.tensor(40))
    torch.testing.assert_close(m2, s / 40)
    torch.testing.assert_close(m3, s / 40)
    assert torch.all(none[labels == -100] == 0)


def test_return_components():
    logits, idx, lp, labels = make_problem(16, 300, 4)
    out = dk.dft_loss(logits.float(), idx, lp.float(), labels, impl="torch", lam=0.3, return_components=True)
    ref = reference.dft_loss(logits, idx, lp, labels, lam=0.3, return_components=True)
    assert isinstance(out, dk.DFTLossOutput)
    torch.testing.assert_close(out.loss, out.divergence + 0.3 * out.accuracy)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)
    assert out.n_tokens.item() == (labels != -100).sum().item()
    assert 0 < out.teacher_mass.item() <= 1 and 0 < out.student_mass.item() <= 1
    assert not out.divergence.requires_grad


def test_pure_accuracy_loss_is_cross_entropy():
    logits, _, _, labels = make_problem(20, 300, 4)
    for impl in ["torch", "triton", "reference"]:
        loss = dk.dft_loss(logits.float(), None, None, labels, lam=1.0, impl=impl)
        ce = F.cross_entropy(logits, labels, ignore_index=-100)
        assert abs(loss.item() - ce.item()) < 1e-5


def test_dft_accuracy_term_weights_by_stopgrad_probability():
    logits, _, _, labels = make_problem(20, 300, 4, ignored=False)
    x = logits.clone().requires_grad_()
    loss = dk.dft_loss(x, None, None, labels, lam=1.0, accuracy="dft", impl="torch", reduction="sum")
    loss.backward()
    lq = torch.log_softmax(logits, -1).gather(1, labels[:, None]).squeeze(1)
    torch.testing.assert_close(loss, -(lq.exp() * lq).sum())
    # gradient = sg(q_y) * dCE/dz
    ce_grad = torch.softmax(logits, -1) - F.one_hot(labels, 300)
    torch.testing.assert_close(x.grad, lq.exp()[:, None] * ce_grad)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_out_of_range_ids_never_read_and_count_as_empty(impl, monkeypatch):
    """The always-on checks refuse such ids (docs/design.md sec. 7); switched off (benchmarks
    only), the kernels still never read them and treat them as empty slots."""
    from dft_kernels import validation
    logits, idx, lp, labels = make_problem(8, 200, 4, empty_slots=False)
    bad = idx.clone()
    bad[0, 1] = 10_000_000
    bad[3, 0] = -7
    clean = bad.clone()
    clean[0, 1] = -1
    clean[3, 0] = -1
    with pytest.raises(ValueError, match="vocab size 200"):
        dk.dft_loss(logits.float(), bad, lp.float(), labels, impl=impl)
    monkeypatch.setattr(validation, "_ALWAYS_ON", False)
    a = dk.dft_loss(logits.float(), bad, lp.float(), labels, impl=impl)
    b = reference.dft_loss(logits, clean, lp, labels)
    assert abs(a.item() - b.item()) < 1e-5


def test_module_wrapper_and_env_override(monkeypatch):
    logits, idx, lp, labels = make_problem(8, 200, 4)
    mod = dk.DFTLoss(lam=0.1, divergence="jsd", beta=0.2, temperature=1.3)
    a = mod(logits.float(), idx, lp.float(), labels)
    b = reference.dft_loss(logits, idx, lp, labels, lam=0.1, divergence="jsd", beta=0.2, temperature=1.3)
    assert abs(a.item() - b.item()) < 1e-5
    assert "jsd" in repr(mod)
    monkeypatch.setenv("DFT_KERNELS_IMPL", "reference")
    c = dk.dft_loss(logits, idx, lp, labels)            # float64 through the reference
    assert c.dtype == torch.float64
    monkeypatch.setenv("DFT_KERNELS_IMPL", "cuda-please")
    with pytest.raises(ValueError, match="DFT_KERNELS_IMPL"):
        dk.dft_loss(logits, idx, lp, labels)
    with pytest.raises(TypeError, match="unknown keyword"):
        dk.DFTLoss(lamda=0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_on_cuda():
    logits, idx, lp, labels = make_problem(64, 5000, 16)
    x = logits.float().cuda().requires_grad_()
    args = (idx.cuda(), lp.float().cuda(), labels.cuda())
    dk.dft_loss(x, *args, impl="triton").backward()   # compile outside the check
    torch.cuda.set_sync_debug_mode("error")
    try:
        dk.dft_loss(x, *args, impl="triton", temperature=2.0).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
