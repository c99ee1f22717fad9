"""Failures a GPU would show, provoked on the CPU (docs/design.md sec. 14).

- rows that do not count contribute exactly 0 whatever their logits, also when they share a
  tile with counted rows at a GPU architecture's tile config (no ``0 * exp(overflow)``);
- offsets past 2**31 elements: views whose row stride puts a tile beyond 2**31 inside a
  large ``torch.empty`` buffer (untouched pages cost no memory);
- unwritten reads: ``torch.empty`` / ``empty_like`` return NaN-filled buffers during each
  call, and the inputs sit inside NaN padding with odd strides;
- every divergence x beta in {0, 0.3, 1} x impl x strategy, forward and backward;
- repeated ids in a row: one bucket with the summed mass, the same in the reference and
  both paths;
- grid axes 1 and 2 never grow with N, V or K (every launch at N 1M, V 262144).

bf16 / fp16 at realistic logit scales: tests/test_bf16_logits.py.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

import dft_kernels as dk
from dft_kernels import reference
from dft_kernels.ops import PrimitiveArgs, TwoHeadArgs
from dft_kernels.ops.linear import triton as fused
from dft_kernels.ops.two_head.triton import TwoHeadDivergenceTriton

IMPLS = ["torch", "triton"]


def _close(got, ref, tol, what):
    scale = max(ref.abs().max().item(), 1e-30)
    err = (got.double() - ref.double()).abs().max().item() / scale
    assert err <= tol, f"{what}: max error {err:.3g} (relative to the largest entry) > {tol}"


# --------------------------------------------------------------------------- ignored rows


def _ignored_problem(N, V, D, M, big, seed=0):
    """Counted rows of ordinary logits, and rows without an id whose logits reach ``big``
    (an all-ones direction in w times a large hidden entry); rows 0..N-4 count."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * (2.0 / D ** 0.5)
    w[:, 0] = 1.0
    b = torch.randn(V, generator=g, dtype=torch.float64)
    index = torch.randint(0, V, (N, M), generator=g)
    index[-3:] = -1
    h[-3:, 0] = big
    return h, w, b, index, g


@pytest.mark.parametrize("capability, scales, softcap, tail", [
    pytest.param((8, 0), (1.0,), None, 0, id="sm80-tau1"),
    pytest.param((9, 0), (1.0, 1 / 0.05), None, 2, id="sm90-tau0.05-tail"),
    pytest.param((9, 0), (1 / 20.0,), 30.0, 2, id="sm90-tau20-softcap"),
])
def test_fused_ignored_rows_beside_counted_rows_at_gpu_tiles(capability, scales, softcap, tail):
    """Three ignored rows with logits 1e4 share a row tile with counted ones (N 11 < BLOCK_N):
    every gradient finite and equal to the float64 reference, the ignored rows' exactly 0,
    with upstream gradient arriving for them too."""
    N, V, D, M = 11, 150, 24, 3
    h64, w64, b64, index, g = _ignored_problem(N, V, D, M, big=1e4)
    config = fused.fused_config(capability, torch.float32, M)
    assert config.fwd.BLOCK_N >= 64 and config.dz.BLOCK_N > N
    T = len(scales) + (1 if tail else 0)
    g_lse = torch.randn(N, T, generator=g, dtype=torch.float64)
    g_gat = torch.randn(N, M, generator=g, dtype=torch.float64)
    leaves = [t.float().requires_grad_(True) for t in (h64, w64, b64)]
    lse, gat = fused.LinearLSEGatherTriton.apply(*leaves, index, PrimitiveArgs(scales, softcap, tail, config=config))
    torch.autograd.backward((lse, gat), (g_lse.float(), g_gat.float()))
    refs = [t.detach().double().requires_grad_(True) for t in leaves]
    z = refs[0][:-3] @ refs[1].T + refs[2]
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    cols = [torch.logsumexp(z * s, -1) for s in scales]
    if tail:
        slot = torch.zeros_like(z, dtype=torch.bool).scatter_(1, index[:-3, :tail], True)
        cols.append(torch.logsumexp((z * scales[-1]).masked_fill(slot, -torch.inf), -1))
    ref = (torch.stack(cols, -1) * g_lse[:-3]).sum() + (z.gather(1, index[:-3]) * g_gat[:-3]).sum()
    ref.backward()
    for name, got, want in zip(("dh", "dw", "db"), leaves, refs):
        assert torch.isfinite(got.grad).all(), f"{name} holds NaN / inf"
        _close(got.grad, want.grad, 2e-4, name)
    assert torch.all(leaves[0].grad[-3:] == 0) and torch.all(lse[-3:] == 0) and torch.all(gat[-3:] == 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("strategy", ["lean", "fast"])
def test_loss_ignored_rows_with_huge_logits(impl, strategy):
    """The public loss: rows with ignored labels and no targets, logits 1e4, at tau 0.3 and
    a softcap; the loss and gradients equal the reference's, all finite."""
    N, V, D, K = 9, 70, 16, 4
    h64, w64, b64, index, _ = _ignored_problem(N, V, D, K, big=1e4)
    lp = torch.log_softmax(torch.randn(N, K, dtype=torch.float64), -1) - 0.3
    labels = torch.randint(0, V, (N,))
    labels[-3:] = -100
    kw = dict(lam=0.2, temperature=0.3, divergence="jsd", beta=0.3)
    out = []
    for im in ("reference", impl):
        dt = torch.float64 if im == "reference" else torch.float32
        leaves = [t.detach().to(dt).clone().requires_grad_(True) for t in (h64, w64, b64)]
        extra = {} if im == "reference" else dict(strategy=strategy)
        loss = dk.fused_linear_dft_loss(leaves[0], leaves[1], index, lp.to(dt), labels, bias=leaves[2], impl=im,
                                        **kw, **extra)
        (loss * 1.7).backward()
        out.append((loss, [t.grad for t in leaves]))
    assert abs(out[1][0].item() - out[0][0].item()) <= 1e-4 * max(1.0, abs(out[0][0].item()))
    for name, got, want in zip(("dh", "dw", "db"), out[1][1], out[0][1]):
        assert torch.isfinite(got).all(), f"{name} holds NaN / inf"
        _close(got, want, 2e-4, name)


@pytest.mark.parametrize("impl", IMPLS)
def test_logits_path_rows_without_gradient_huge_logits(impl):
    """The logits path: counted rows whose upstream gradient is 0 (reduction 'none' with a
    zero upstream) and ignored rows, logits 1e4 at tau 0.05: dlogits exactly 0 there."""
    N, V, K = 7, 90, 3
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, V, generator=g) * 3
    x[4:] += 1e4 * torch.rand(3, V, generator=g)
    index = torch.randint(0, V, (N, K), generator=g)
    index[5:] = -1
    lp = torch.log_softmax(torch.randn(N, K, generator=g), -1)
    leaf = x.clone().requires_grad_(True)
    loss = dk.dft_loss(leaf, index, lp, temperature=0.05, reduction="none", impl=impl, lam=0.0)
    up = torch.ones(N)
    up[4] = 0.0
    loss.backward(up)
    assert torch.isfinite(leaf.grad).all()
    assert torch.all(leaf.grad[4:] == 0)


def test_two_head_rows_without_gradient_huge_logits():
    """The two-head kernel: a whole row block without upstream gradient (its tiles skip the
    matmul and hold the bias alone) whose lse is -1e4, next to live rows: finite gradients."""
    N, V, D = 40, 90, 16
    g = torch.Generator().manual_seed(2)
    h = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g) / 4
    w[:, 0] = 1.0
    h[16:, 0] = -1e4             # rows 16.. (whole 16-row blocks under the interpreter): lse ~ -1e4
    ht, wt = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g) / 4
    for kind, beta in (("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)):
        hl, wl = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        div = TwoHeadDivergenceTriton.apply(hl, wl, None, ht, wt, None, TwoHeadArgs(None, None, 1.0, kind, beta))
        up = torch.zeros(N)
        up[:16] = 1.0
        div.backward(up)
        assert torch.isfinite(hl.grad).all() and torch.isfinite(wl.grad).all(), kind
        assert torch.all(hl.grad[16:] == 0), kind


# --------------------------------------------------------------------------- offsets past 2**31


def _far_rows(rows: int, cols: int, stride: int, fill: torch.Tensor) -> torch.Tensor:
    """A [rows, cols] fp32 view with row stride ``stride`` into an untouched ``torch.empty``
    buffer (only the rows' own pages are written), holding ``fill``."""
    buf = torch.empty(stride * (rows - 1) + cols, dtype=torch.float32)
    view = buf.as_strided((rows, cols), (stride, 1))
    view.copy_(fill)
    return view


STRIDE = (1 << 20) + 3           # row 2048 of a view starts past 2**31 elements
FAR_STRIDE = (1 << 28) + 3       # row 8 of a view starts past 2**31 elements


@pytest.mark.parametrize("impl", IMPLS)
def test_teacher_topk_weight_rows_past_2_31(impl):
    """teacher_topk with a weight view whose rows 2048.. start past 2**31 elements: the
    same top-k and log-probs as on a compact copy (an i32 ``col_start * stride`` wraps)."""
    N, D, V, k = 5, 8, 2090, 4
    g = torch.Generator().manual_seed(3)
    w = torch.randn(V, D, generator=g)
    w[2060] *= 4                  # a clear winner past the boundary
    h = torch.randn(N, D, generator=g)
    h[:, :] += w[2060] / 2
    far = _far_rows(V, D, STRIDE, w)
    got = dk.teacher_topk(h, far, k, impl=impl)
    want = dk.teacher_topk(h.double(), w.double(), k, impl="torch")
    assert torch.equal(got.index.long(), want.index.long())
    torch.testing.assert_close(got.logprobs.double(), want.logprobs.double(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_loss_weight_rows_past_2_31(impl):
    """The fused loss and its gradients with the lm_head weight a view past 2**31 elements,
    targets and labels on vocab rows beyond the boundary."""
    N, D, V, K = 6, 8, 2080, 3
    g = torch.Generator().manual_seed(4)
    w = torch.randn(V, D, generator=g)
    h = torch.randn(N, D, generator=g)
    index = torch.randint(2040, V, (N, K), generator=g)
    lp = torch.log_softmax(torch.randn(N, K, generator=g), -1) - 0.5
    labels = torch.randint(2050, V, (N,), generator=g)
    far = _far_rows(V, D, STRIDE, w).requires_grad_(True)
    hl = h.clone().requires_grad_(True)
    loss = dk.fused_linear_dft_loss(hl, far, index, lp, labels, impl=impl, strategy="lean")
    loss.backward()
    wr, hr = w.double().requires_grad_(True), h.double().requires_grad_(True)
    ref = dk.reference.fused_linear_dft_loss(hr, wr, index, lp.double(), labels)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-4
    _close(hl.grad, hr.grad, 1e-4, "dh")
    _close(far.grad, wr.grad, 1e-4, "dw")


@pytest.mark.parametrize("impl", IMPLS)
def test_logits_rows_past_2_31(impl):
    """The logits path on a logits view whose rows 8.. start past 2**31 elements, beside
    ignored rows; loss and dlogits of the counted rows."""
    N, V, K = 10, 24, 3
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N, V, generator=g) * 2
    index = torch.full((N, K), -1, dtype=torch.long)
    live = torch.tensor([0, 1, 8, 9])
    index[live] = torch.randint(0, V, (4, K), generator=g)
    lp = torch.log_softmax(torch.randn(N, K, generator=g), -1) - 0.2
    far = _far_rows(N, V, FAR_STRIDE, x).requires_grad_(True)
    loss = dk.dft_loss(far, index, lp, impl=impl, lam=0.0, reduction="sum")
    loss.backward()
    xr = x[live].double().requires_grad_(True)
    ref = dk.reference.dft_loss(xr, index[live], lp[live].double(), lam=0.0, reduction="sum")
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-4
    _close(far.grad[live], xr.grad, 1e-5, "dlogits")


def test_two_head_teacher_weight_rows_past_2_31():
    """The two-head kernel with the teacher's weight a view past 2**31 elements."""
    N, D, V = 5, 8, 2070
    g = torch.Generator().manual_seed(6)
    h, w = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g)
    ht, wt = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g)
    far = _far_rows(V, D, STRIDE, wt)
    div = TwoHeadDivergenceTriton.apply(h, w, None, ht, far, None, TwoHeadArgs(None, None, 1.0, "forward_kl", 0.5))
    lq = torch.log_softmax(h.double() @ w.double().T, -1)
    lp = torch.log_softmax(ht.double() @ wt.double().T, -1)
    torch.testing.assert_close(div.double(), (lp.exp() * (lp - lq)).sum(-1), atol=2e-5, rtol=2e-5)


# --------------------------------------------------------------------------- unwritten reads


@contextlib.contextmanager
def garbage_empty(monkeypatch):
    """``torch.empty`` / ``empty_like`` fill their buffers with NaN (floats) or -1234567
    (integers) during the block: a result that reads an element nobody wrote shows it."""
    real_empty, real_like = torch.empty, torch.empty_like

    def poison(t):
        if t.device.type != "meta" and t.numel():
            t.fill_(float("nan") if t.is_floating_point() else -1234567)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_like(*a, **k)))
    try:
        yield
    finally:
        monkeypatch.setattr(torch, "empty", real_empty)
        monkeypatch.setattr(torch, "empty_like", real_like)


def _padded(t: torch.Tensor, pad_value) -> torch.Tensor:
    """``t`` [R, C] placed inside a larger buffer full of ``pad_value`` with an odd row stride."""
    R, C = t.shape
    buf = torch.full((R + 3, C + 5), pad_value, dtype=t.dtype)
    view = buf[1:R + 1, 2:C + 2]
    view.copy_(t)
    return view


def _padded_problem(N=13, V=61, D=12, K=4, seed=7):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) / 2
    b = torch.randn(V, generator=g, dtype=torch.float64)
    index = torch.randint(0, V, (N, K), generator=g)
    index[2] = -1
    index[3, 1] = index[3, 0]
    lp = torch.log_softmax(torch.randn(N, K, generator=g, dtype=torch.float64), -1) - 0.4
    labels = torch.randint(0, V, (N,), generator=g)
    labels[2] = labels[6] = -100
    return h, w, b, index, lp, labels


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("strategy", ["lean", "fast"])
def test_fused_loss_with_garbage_buffers(impl, strategy, monkeypatch):
    """fused_linear_dft_loss with NaN-filled ``torch.empty`` and NaN / garbage padding
    around odd-strided inputs: loss and every gradient equal the clean reference's."""
    h, w, b, index, lp, labels = _padded_problem()
    hr, wr, br = (t.clone().requires_grad_(True) for t in (h, w, b))
    ref = dk.reference.fused_linear_dft_loss(hr, wr, index, lp, labels, bias=br, tail="bucket",
                                             divergence="reverse_kl", temperature=0.7)
    ref.backward()
    hp, wp = _padded(h.float(), float("nan")), _padded(w.float(), float("nan"))
    hp.requires_grad_(True)
    wp.requires_grad_(True)
    bl = b.float().requires_grad_(True)
    ip, lpp = _padded(index, 987654), _padded(lp.float(), float("nan"))
    with garbage_empty(monkeypatch):
        loss = dk.fused_linear_dft_loss(hp, wp, ip, lpp, labels, bias=bl, impl=impl, strategy=strategy,
                                        divergence="reverse_kl", temperature=0.7)
        loss.backward()
    assert abs(loss.item() - ref.item()) < 1e-4
    for name, got, want in (("dh", hp.grad, hr.grad), ("dw", wp.grad, wr.grad), ("db", bl.grad, br.grad)):
        assert torch.isfinite(got).all(), name
        _close(got, want, 1e-4, name)


@pytest.mark.parametrize("impl", IMPLS)
def test_logits_loss_with_garbage_buffers(impl, monkeypatch):
    """dft_loss on padded logits with NaN-filled ``torch.empty``: every dlogits entry written."""
    h, w, b, index, lp, labels = _padded_problem(seed=8)
    x = (h @ w.T + b)
    xr = x.clone().requires_grad_(True)
    ref = dk.reference.dft_loss(xr, index, lp, labels, divergence="jsd", beta=0.3, softcap=5.0)
    ref.backward()
    xp = _padded(x.float(), float("nan")).requires_grad_(True)
    with garbage_empty(monkeypatch):
        loss = dk.dft_loss(xp, _padded(index, -987654), _padded(lp.float(), float("nan")), labels, impl=impl,
                           divergence="jsd", beta=0.3, softcap=5.0)
        loss.backward()
    assert abs(loss.item() - ref.item()) < 1e-4
    assert torch.isfinite(xp.grad).all()
    _close(xp.grad, xr.grad, 1e-4, "dlogits")


@pytest.mark.parametrize("impl", IMPLS)
def test_teacher_and_distill_with_garbage_buffers(impl, monkeypatch):
    """teacher_topk and fused_linear_distill_loss (both strategies) with NaN-filled
    ``torch.empty`` and padded inputs."""
    h, w, b, _, _, labels = _padded_problem(seed=9)
    ht = torch.randn(h.shape[0], 10, dtype=torch.float64)
    wt = torch.randn(w.shape[0], 10, dtype=torch.float64) / 2
    want = dk.teacher_topk(ht, wt, 5, impl="torch")
    refs = {}
    for strategy in ("lean", "fast"):
        hr = h.clone().requires_grad_(True)
        ref = dk.fused_linear_distill_loss(hr, w, ht, wt, labels, divergence="jsd", beta=0.3, lam=0.1,
                                           impl="reference")
        ref.backward()
        refs[strategy] = (ref, hr.grad)
    with garbage_empty(monkeypatch):
        got = dk.teacher_topk(_padded(ht.float(), float("nan")), _padded(wt.float(), float("nan")), 5, impl=impl)
        outs = {}
        for strategy in ("lean", "fast"):
            hp = _padded(h.float(), float("nan")).requires_grad_(True)
            loss = dk.fused_linear_distill_loss(hp, _padded(w.float(), float("nan")), _padded(ht.float(), 0.0),
                                                _padded(wt.float(), float("nan")), labels, divergence="jsd",
                                                beta=0.3, lam=0.1, impl=impl, strategy=strategy)
            loss.backward()
            outs[strategy] = (loss, hp.grad)
    assert torch.equal(got.index.long(), want.index.long())
    torch.testing.assert_close(got.logprobs.double(), want.logprobs.double(), atol=1e-5, rtol=0)
    for strategy, (loss, grad) in outs.items():
        assert abs(loss.item() - refs[strategy][0].item()) < 1e-4, strategy
        _close(grad, refs[strategy][1], 1e-4, f"dh {strategy}")


# --------------------------------------------------------------------------- divergence x beta


DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 1.0)]


def _run(fn, leaves, upstream=1.3):
    loss = fn(*leaves)
    (loss * upstream).backward()
    return loss.detach().double(), [t.grad.double() for t in leaves]


@pytest.mark.parametrize("impl", IMPLS)
def test_every_divergence_and_beta_sparse_losses(impl):
    """dft_loss and fused_linear_dft_loss (lean and fast): every divergence, JSD at beta 0,
    0.3 and 1 (forward / reverse KL at the ends), loss and gradients vs float64."""
    h, w, b, index, lp, labels = _padded_problem(N=9, V=41, D=8, K=3, seed=10)
    x = h @ w.T + b
    for divergence, beta in DIVERGENCES:
        kw = dict(divergence=divergence, beta=beta, temperature=1.5, lam=0.2)
        ref_x = _run(lambda t: dk.reference.dft_loss(t, index, lp, labels, **kw), [x.clone().requires_grad_(True)])
        got_x = _run(lambda t: dk.dft_loss(t, index, lp.float(), labels, impl=impl, **kw),
                     [x.float().requires_grad_(True)])
        what = f"dft_loss {divergence} beta {beta}"
        assert abs(got_x[0].item() - ref_x[0].item()) < 1e-4, what
        _close(got_x[1][0], ref_x[1][0], 1e-4, what)
        ref = _run(lambda a, c: dk.reference.fused_linear_dft_loss(a, c, index, lp, labels, bias=b, **kw),
                   [h.clone().requires_grad_(True), w.clone().requires_grad_(True)])
        for strategy in ("lean", "fast"):
            got = _run(lambda a, c: dk.fused_linear_dft_loss(a, c, index, lp.float(), labels, bias=b.float(),
                                                             impl=impl, strategy=strategy, **kw),
                       [h.float().requires_grad_(True), w.float().requires_grad_(True)])
            what = f"fused {strategy} {divergence} beta {beta}"
            assert abs(got[0].item() - ref[0].item()) < 1e-4, what
            for name, g_got, g_ref in zip(("dh", "dw"), got[1], ref[1]):
                _close(g_got, g_ref, 1e-4, f"{what} {name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_every_divergence_and_beta_distill_loss(impl):
    """fused_linear_distill_loss (lean and fast): every divergence, JSD at beta 0, 0.3 and 1,
    loss and the student's gradients vs the float64 reference (beta 0 / 1 used to raise in
    the Triton backward)."""
    N, D, V = 9, 8, 43
    g = torch.Generator().manual_seed(11)
    h, w = torch.randn(N, D, generator=g, dtype=torch.float64), torch.randn(V, D, generator=g, dtype=torch.float64)
    ht, wt = torch.randn(N, 6, generator=g, dtype=torch.float64), torch.randn(V, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[3] = -100
    for divergence, beta in DIVERGENCES:
        kw = dict(divergence=divergence, beta=beta, temperature=2.0, lam=0.1)
        ref = _run(lambda a, c: dk.fused_linear_distill_loss(a, c, ht, wt, labels, impl="reference", **kw),
                   [h.clone().requires_grad_(True), w.clone().requires_grad_(True)])
        for strategy in ("lean", "fast"):
            got = _run(lambda a, c: dk.fused_linear_distill_loss(a, c, ht.float(), wt.float(), labels, impl=impl,
                                                                 strategy=strategy, **kw),
                       [h.float().requires_grad_(True), w.float().requires_grad_(True)])
            what = f"distill {strategy} {divergence} beta {beta}"
            assert abs(got[0].item() - ref[0].item()) < 1e-4, what
            for name, g_got, g_ref in zip(("dh", "dw"), got[1], ref[1]):
                _close(g_got, g_ref, 1e-4, f"{what} {name}")


# --------------------------------------------------------------------------- repeated ids


@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_repeated_ids_are_one_bucket(impl, divergence):
    """A row that repeats an id equals the row with one slot holding the summed mass
    (docs/design.md sec. 2), on every path; a -inf slot equals an empty one."""
    N, V, D, K = 6, 30, 8, 4
    g = torch.Generator().manual_seed(12)
    h, w = torch.randn(N, D, generator=g, dtype=torch.float64), torch.randn(V, D, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)])
    lp = torch.log_softmax(torch.randn(N, K, generator=g, dtype=torch.float64), -1) - 0.7
    dup_ids, dup_lp = ids.clone(), lp.clone()
    merged_ids, merged_lp = ids.clone(), lp.clone()
    # row 0: slot 2 repeats slot 0's id; merged: slot 0 holds both masses, slot 2 empty
    dup_ids[0, 2] = ids[0, 0]
    merged_lp[0, 0] = torch.logaddexp(lp[0, 0], lp[0, 2])
    merged_ids[0, 2] = -1
    # row 1: three slots of one id
    dup_ids[1, 1:] = ids[1, 0]
    merged_lp[1, 0] = torch.logsumexp(lp[1], 0)
    merged_ids[1, 1:] = -1
    # row 2: a -inf slot is an empty slot
    dup_lp[2, 3] = -torch.inf
    merged_ids[2, 3] = -1
    labels = torch.randint(0, V, (N,), generator=g)
    dt = torch.float64 if impl != "triton" else torch.float32
    out = []
    for i, l in ((dup_ids, dup_lp), (merged_ids, merged_lp)):
        hl = h.to(dt).requires_grad_(True)
        loss = dk.fused_linear_dft_loss(hl, w.to(dt), i, l.to(dt), labels, divergence=divergence, impl=impl)
        loss.backward()
        out.append((loss.item(), hl.grad.double()))
    tol = 1e-12 if dt == torch.float64 else 1e-5
    assert abs(out[0][0] - out[1][0]) < tol * max(1.0, abs(out[1][0]))
    _close(out[0][1], out[1][1], max(tol, 1e-6) * 10, "dh")


def test_merge_duplicate_slots_keeps_single_slots_bit_for_bit():
    from dft_kernels.ops import merge_duplicate_slots
    lp = torch.tensor([[-0.5, -1.25, -3.0, -2.0], [-0.1, -0.2, -0.3, -0.4]])
    idx = torch.tensor([[7, 3, 7, -1], [1, 2, 3, 4]], dtype=torch.int32)
    mi, ml = merge_duplicate_slots(idx, lp, 10)
    assert mi.dtype == torch.int32
    assert mi.tolist() == [[3, 7, -1, -1], [1, 2, 3, 4]]
    assert ml[0, 0].item() == -1.25 and ml[1].tolist() == lp[1].tolist()
    assert math.isclose(ml[0, 1].item(), math.log(math.exp(-0.5) + math.exp(-3.0)), rel_tol=1e-6)
    assert ml[0, 2:].eq(-torch.inf).all()


# --------------------------------------------------------------------------- grid limits


@contextlib.contextmanager
def recorded_grids():
    """Within the block kernel launches (compiled or interpreted) are recorded as
    ``(kernel name, grid)``, not run: launchers can be driven on ``meta`` tensors."""
    from benchmarks.long_context import launches_skipped
    grids: list[tuple[str, tuple]] = []

    def record(kernel, grid, kwargs):
        g = grid(kwargs) if callable(grid) else grid
        grids.append((kernel.__name__, tuple(g)))

    with launches_skipped(record):
        yield grids


def test_every_launch_grid_is_one_dimensional_at_1m_tokens(monkeypatch):
    """Every kernel launch at N 1,048,576, V 262144 (the GPU configs, ``meta`` tensors, no
    compute) uses grid axis 0 only, below 2**31 blocks: CUDA caps axes 1 and 2 at 65535.
    The backward's buffers are enlarged 16x (fewer, larger launches: the largest grids)."""
    from dft_kernels.ops.linear import backward as products
    monkeypatch.setattr(products, "SLAB_BYTES", products.SLAB_BYTES * 16)
    monkeypatch.setattr(products, "ACC_BYTES", products.ACC_BYTES * 16)
    from dft_kernels.tools import compile_check as cc
    from dft_kernels.ops._triton_common import compile_target

    shape = cc.HeadShape(N=1 << 20, D=4096, V=262144, K=32)
    variant = cc.Variant(two_scales=True, softcap=True, tail=True, bias=True)
    with recorded_grids() as grids:
        for capability in ((8, 0), (9, 0)):
            with compile_target(capability):
                for driver in cc.DRIVERS.values():
                    driver(shape, variant, torch.bfloat16)
    names = {name for name, _ in grids}
    assert {"_lse_tile_kernel", "_dz_tile_kernel", "_teacher_topk_kernel", "_two_head_dz_kernel",
            "_lse_gather_fwd_kernel"} <= names
    for name, grid in grids:
        assert len(grid) == 1 or all(a < 65536 for a in grid[1:]), (name, grid)
        assert 0 < grid[0] < 2 ** 31, (name, grid)
