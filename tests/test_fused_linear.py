"""fused_linear_dft_loss (hidden @ lm_head path): Triton (interpreter on CPU) and
chunked torch against the float64 reference, with the error budget of a same-dtype
PyTorch run (docs/design.md sec. 9)."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import dft_kernels as dk
from dft_kernels import reference
from dft_kernels.ops.linear import triton as fused
from dft_kernels.ops.linear import backward as products

# --------------------------------------------------------------------------- problems


def make_fused_problem(N=37, D=123, V=507, K=5, *, seed=0, bias=True, lead=None, scale=3.0,
                       empty_slots=True, ignored=True, labels=True):
    """hidden [N, D], weight [V, D], bias [V] (float64; logits ~ N(0, scale^2)), and a
    teacher's top-K (log-probs of a real softmax) plus labels, with some empty slots
    (-1), a zero-mass slot, a row without slots, ignored labels and labels that equal
    a teacher id (the same id twice in one row of the kernel's index)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) * (scale / D ** 0.5)
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.5 if bias else None
    lab = torch.randint(0, V, (N,), generator=g)
    idx = lp = None
    if K > 0:
        teacher = torch.randn(N, V, generator=g, dtype=torch.float64) * scale
        lp, idx = torch.log_softmax(teacher, dim=-1).topk(K, dim=-1)
        lab[::3] = idx[::3, 0]
        if empty_slots and N > 3:
            idx[1, -1] = -1
            lp[1, -1] = 0.0
            idx[2, :] = -1
            if K > 2:
                lp[3, 1] = -torch.inf
    if ignored and N > 5:
        lab[4] = -100
        lab[5] = -100
    if lead is not None:
        hidden = hidden.reshape(*lead, D)
        lab = lab.reshape(*lead)
        if K > 0:
            idx, lp = idx.reshape(*lead, K), lp.reshape(*lead, K)
    return hidden, weight, b, idx, lp, (lab if labels else None)


def run(fn, hidden, weight, bias, idx, lp, labels, *, dtype, upstream=1.7, requires=(True, True, True),
        **kw):
    """Loss and (dhidden, dweight, dbias) in float64 from fresh leaf copies cast to ``dtype``."""
    h = hidden.detach().to(dtype).requires_grad_(requires[0])
    w = weight.detach().to(dtype).requires_grad_(requires[1])
    b = bias.detach().to(dtype).requires_grad_(requires[2]) if bias is not None else None
    lpd = lp.to(dtype) if lp is not None else None
    loss = fn(h, w, idx, lpd, labels, bias=b, **kw)
    loss = loss.loss if hasattr(loss, "loss") else loss
    up = upstream if torch.is_tensor(upstream) else torch.full_like(loss, upstream)
    loss.backward(up.to(loss.dtype))
    grads = tuple(None if t is None or t.grad is None else t.grad.double() for t in (h, w, b))
    return (loss.detach().double(),) + grads


def check(impl, opts, problem, *, dtype=torch.float32, factor=4.0, atol=1e-6, upstream=1.7,
          requires=(True, True, True), **kw):
    """Kernel error <= factor * (same-dtype reference error) + atol, for the loss and every grad."""
    common = dict(upstream=upstream, requires=requires, **opts)
    exact = run(reference.fused_linear_dft_loss, *problem, dtype=torch.float64, **common)
    same = run(reference.fused_linear_dft_loss, *problem, dtype=dtype, **common)
    got = run(dk.fused_linear_dft_loss, *problem, dtype=dtype, impl=impl, **common, **kw)
    for name, e, s, k in zip(("loss", "dhidden", "dweight", "dbias"), exact, same, got, strict=True):
        if e is None:
            assert k is None, f"{name}: expected no gradient"
            continue
        assert torch.isfinite(k).all(), name
        err = (k - e).abs().max().item()
        budget = (s - e).abs().max().item()
        tol = factor * budget + atol * max(1.0, e.abs().max().item())
        assert err <= tol, f"{name}: error {err:.3g} > {tol:.3g} (same-dtype reference error {budget:.3g})"
    return got


VALID = [
    ("forward_kl", 0.5, "bucket"), ("forward_kl", 0.5, "renorm"), ("forward_kl", 0.5, "raw"),
    ("reverse_kl", 0.5, "bucket"), ("jsd", 0.5, "bucket"), ("jsd", 0.25, "renorm"),
    ("jsd", 0.0, "bucket"), ("jsd", 1.0, "bucket"),
]

# --------------------------------------------------------------------------- torch path (larger)

TORCH_GRID = [
    pytest.param(dict(divergence=d, beta=b, tail=t, accuracy=a, temperature=tau, softcap=c),
                 id=f"{d}-b{b}-{t}-{a}-tau{tau}-cap{c}")
    for (d, b, t), (a, tau, c) in itertools.product(VALID, [("ce", 1.0, None), ("dft", 2.0, 30.0)])
]


@pytest.mark.parametrize("opts", TORCH_GRID)
def test_torch_path_matches_reference(opts):
    problem = make_fused_problem(N=256, D=64, V=4000, K=8, seed=1)
    check("torch", opts, problem)


# --------------------------------------------------------------------------- triton path (interpreter)

TRITON_GRID = [
    pytest.param(dict(), 5, True, id="fkl-bucket-ce-K5-bias"),
    pytest.param(dict(divergence="reverse_kl", accuracy="dft", temperature=2.0, softcap=5.0), 5, False,
                 id="rkl-bucket-dft-tau2-cap-K5"),
    pytest.param(dict(divergence="jsd", beta=0.3, tail="renorm", temperature=2.0, lam=0.5), 5, True,
                 id="jsd-renorm-ce-tau2-K5-bias"),
    pytest.param(dict(tail="raw", softcap=4.0, reduction="sum"), 1, True, id="fkl-raw-cap-K1-sum"),
    pytest.param(dict(softcap=4.0), 0, True, id="ce-cap-K0-bias"),
    pytest.param(dict(accuracy="dft", reduction="none"), 0, False, id="dft-K0-none"),
]


@pytest.mark.parametrize("opts,K,bias", TRITON_GRID)
def test_triton_path_matches_reference(opts, K, bias):
    problem = make_fused_problem(K=K, bias=bias, labels=K != 1)
    check("triton", opts, problem)


def test_triton_k_equals_v():
    """Every vocab id is a teacher slot (the slot list is a permutation of the vocab)."""
    N, D, V = 9, 20, 40
    hidden, weight, bias, _, _, labels = make_fused_problem(N, D, V, K=0, seed=3)
    g = torch.Generator().manual_seed(4)
    lp = torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * 2, dim=-1)
    perm = torch.stack([torch.randperm(V, generator=g) for _ in range(N)])
    problem = (hidden, weight, bias, perm, lp.gather(1, perm), labels)
    check("triton", dict(divergence="reverse_kl"), problem)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_tail_bucket_when_student_mass_is_almost_all_on_slots(impl):
    """Q within 1e-6 of 1: the kernel's log-sum-exp outside the slots keeps the tail
    bucket finite and accurate (1 - Q would cancel in fp32)."""
    N, D, V, K = 6, 8, 300, 10
    g = torch.Generator().manual_seed(17)
    ids = torch.randperm(V, generator=g)[:K]
    idx = torch.stack([ids[torch.randperm(K, generator=g)] for _ in range(N)])
    weight = torch.zeros(V, D, dtype=torch.float64)
    weight[ids] = torch.randn(K, D, generator=g, dtype=torch.float64) * 0.5
    bias = torch.full((V,), -20.5, dtype=torch.float64)   # ~2e-8 of the mass off the slots
    bias[ids] = 0.0
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64)
    q = torch.softmax(F.linear(hidden, weight, bias), -1)
    assert (1 - q.gather(1, idx).sum(-1)).max() < 1e-6
    lp = torch.log_softmax(torch.randn(N, K, generator=g, dtype=torch.float64), -1) + torch.log(
        torch.tensor(0.999, dtype=torch.float64))
    for div in ["forward_kl", "reverse_kl", "jsd"]:
        ref = reference.fused_linear_dft_loss(hidden, weight, idx, lp, None, bias=bias, divergence=div)
        loss, dh, dw, db = run(dk.fused_linear_dft_loss, hidden, weight, bias, idx, lp, None,
                               dtype=torch.float32, upstream=1.0, divergence=div, impl=impl)
        assert all(torch.isfinite(t).all() for t in (loss, dh, dw, db))
        assert abs(loss.item() - ref.item()) < 1e-4 * max(1, abs(ref.item())), (div, loss.item(), ref.item())


def test_triton_random_upstream_per_position():
    """reduction='none' with a different upstream gradient per position (some 0)."""
    problem = make_fused_problem(N=21, K=3, seed=5)
    up = torch.linspace(-1.0, 2.0, 21, dtype=torch.float64)
    up[7:10] = 0.0
    check("triton", dict(reduction="none", temperature=1.5), problem, upstream=up)


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")])
def test_triton_low_precision(dtype):
    """bf16 / fp16 inputs: logits accumulate in fp32 inside the kernel, so the error
    stays within a small multiple of the same-dtype PyTorch run's error."""
    check("triton", dict(temperature=2.0), make_fused_problem(K=5, seed=6), dtype=dtype)


def test_triton_low_precision_without_fp32_accumulation():
    check("triton", dict(), make_fused_problem(K=5, seed=7), dtype=torch.bfloat16, accum_fp32=False)


def _small_buffers(monkeypatch, *, slab_cols, acc_rows, D, elt):
    """Force several vocab slabs and row chunks on a small problem."""
    monkeypatch.setattr(products, "ALIGN", 32)
    monkeypatch.setattr(products, "SLAB_BYTES", slab_cols * acc_rows * elt)
    monkeypatch.setattr(products, "ACC_BYTES", acc_rows * D * 4)


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float32, id="fp32")])
def test_triton_many_slabs_and_row_chunks(monkeypatch, dtype):
    """N > V with bf16 and accum_fp32: rows are chunked and dW accumulates in fp32 across
    chunks; fp32: slabs and chunks accumulate in the gradients themselves."""
    N, D, V = 90, 24, 75
    problem = make_fused_problem(N, D, V, K=4, seed=8)
    _small_buffers(monkeypatch, slab_cols=32, acc_rows=32, D=D, elt=torch.finfo(dtype).bits // 8)
    n_chunk, n_slab = products._chunking(N, V, D, torch.finfo(dtype).bits // 8, dtype != torch.float32,
                                      dtype != torch.float32)
    assert n_chunk < N and n_slab < V
    check("triton", dict(softcap=6.0, temperature=2.0, divergence="jsd"), problem, dtype=dtype)


def test_triton_deterministic_is_bitwise_reproducible(monkeypatch):
    N, D, V = 70, 24, 60
    problem = make_fused_problem(N, D, V, K=4, seed=9)
    _small_buffers(monkeypatch, slab_cols=32, acc_rows=32, D=D, elt=2)
    assert products._chunking(N, V, D, 2, True, True) == (32, 32)   # 3 row chunks x 2 slabs
    a = run(dk.fused_linear_dft_loss, *problem, dtype=torch.bfloat16, impl="triton")
    b = run(dk.fused_linear_dft_loss, *problem, dtype=torch.bfloat16, impl="triton")
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


class _Spy:
    """Wraps a Triton kernel; records one positional argument of every launch."""

    def __init__(self, kernel, arg):
        self.kernel, self.arg, self.seen = kernel, arg, []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.seen.append(args[self.arg].clone())
            return self.kernel[grid](*args, **kw)
        return launch


def test_triton_every_position_ignored(monkeypatch):
    """Zero loss, zero gradients; the backward sees no active row, so no dz tile and no
    dW token block does matmul work."""
    hidden, weight, bias, idx, lp, labels = make_fused_problem(N=20, K=3, seed=10)
    labels = torch.full_like(labels, -100)
    dz_spy = _Spy(fused._dz_tile_kernel, 11)    # row activity flags
    dw_spy = _Spy(products._dw_gemm_kernel, 8)     # token blocks up to the last active one
    monkeypatch.setattr(fused, "_dz_tile_kernel", dz_spy)
    monkeypatch.setattr(products, "_dw_gemm_kernel", dw_spy)
    loss, dh, dw, db = run(dk.fused_linear_dft_loss, hidden, weight, bias, idx, lp, labels,
                           dtype=torch.float32, impl="triton", strategy="lean")
    assert loss.item() == 0.0
    for g in (dh, dw, db):
        assert torch.count_nonzero(g) == 0
    assert dz_spy.seen and all(int(a.sum()) == 0 for a in dz_spy.seen)
    assert dw_spy.seen and all(int(c.item()) == 0 for c in dw_spy.seen)


def test_triton_ignored_rows_are_skipped(monkeypatch):
    """Only the rows with a gradient are active; the result is still exact."""
    problem = make_fused_problem(N=40, K=3, seed=16)
    labels = problem[5].clone()
    labels[8:40] = -100
    idx = problem[3].clone()
    idx[8:40] = -1
    problem = problem[:3] + (idx, problem[4], labels)
    dz_spy = _Spy(fused._dz_tile_kernel, 11)
    monkeypatch.setattr(fused, "_dz_tile_kernel", dz_spy)
    check("triton", dict(), problem, strategy="lean")
    # rows 0-7 remain, less rows 4 and 5 (ignored labels); row 2 has no slot but counts by its label
    assert all(int(a.sum()) == 6 for a in dz_spy.seen)


def test_triton_interleaved_ignored_rows_form_whole_skipped_tiles(monkeypatch):
    """Every other row ignored: the rows are reordered active-first, so the forward
    tiles see the activity flags sorted (ones, then zeros) and the tiles of ignored
    rows run no D loop; the result is still exact and in the caller's order."""
    problem = make_fused_problem(N=45, K=3, seed=17, ignored=False)
    labels, idx = problem[5].clone(), problem[3].clone()
    labels[1::2] = -100
    idx[1::2] = -1
    problem = problem[:3] + (idx, problem[4], labels)
    fwd_spy = _Spy(fused._lse_tile_kernel, 10)     # row activity flags (active-first order)
    dz_spy = _Spy(fused._dz_tile_kernel, 11)
    monkeypatch.setattr(fused, "_lse_tile_kernel", fwd_spy)
    monkeypatch.setattr(fused, "_dz_tile_kernel", dz_spy)
    check("triton", dict(), problem, strategy="lean")
    n_active = 23
    expected = torch.cat([torch.ones(n_active), torch.zeros(45 - n_active)]).to(torch.int32)
    assert fwd_spy.seen and all(torch.equal(a, expected) for a in fwd_spy.seen)
    assert dz_spy.seen and all(int(a[n_active:].sum()) == 0 and int(a.sum()) == n_active for a in dz_spy.seen)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_frozen_weight_allocates_no_weight_grad(monkeypatch, impl):
    """weight.requires_grad=False: weight.grad stays None and no dW is computed."""
    if impl == "triton":
        class NoCall:
            def __getitem__(self, grid):
                raise AssertionError("dW kernel launched for a frozen weight")
        monkeypatch.setattr(products, "_dw_gemm_kernel", NoCall())
    problem = make_fused_problem(N=19, K=3, seed=11)
    got = check(impl, dict(), problem, requires=(True, False, False))
    assert got[2] is None and got[3] is None and got[1] is not None


def test_triton_frozen_hidden_bias_only():
    """Only the bias needs a gradient (no dz slab, no GEMM)."""
    problem = make_fused_problem(N=19, K=3, seed=12)
    got = check("triton", dict(), problem, requires=(False, False, True))
    assert got[1] is None and got[2] is None and got[3] is not None


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_leading_dims_and_non_contiguous_hidden(impl):
    """hidden [B, T, D], sliced along the sequence (non-contiguous), targets [B, T, K]."""
    B, T, D, V, K = 3, 8, 48, 300, 4
    hidden, weight, bias, idx, lp, labels = make_fused_problem(B * (T + 1), D, V, K=K, seed=13,
                                                               lead=(B, T + 1))
    problem = (hidden[:, :-1], weight, bias, idx[:, :-1], lp[:, :-1], labels[:, :-1])
    assert not problem[0].is_contiguous()
    check(impl, dict(temperature=2.0), problem)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_k0_is_cross_entropy(impl):
    """target_index=None, lam=1: plain (fused linear) cross-entropy on the labels."""
    hidden, weight, bias, _, _, labels = make_fused_problem(N=33, D=64, V=300, K=0, seed=14)
    h, w, b = hidden.float(), weight.float(), bias.float()
    ours = dk.fused_linear_dft_loss(h, w, None, None, labels, bias=b, lam=1.0, impl=impl)
    expect = F.cross_entropy(F.linear(h, w, b), labels, ignore_index=-100)
    torch.testing.assert_close(ours, expect, rtol=1e-5, atol=1e-6)
    if hasattr(F, "linear_cross_entropy"):
        lce = F.linear_cross_entropy(h, w, labels, linear_bias=b, ignore_index=-100)
        torch.testing.assert_close(ours, lce, rtol=1e-5, atol=1e-6)
    # gradients too, against autograd through the materialised logits
    got = run(dk.fused_linear_dft_loss, hidden, weight, bias, None, None, labels, dtype=torch.float32,
              lam=1.0, impl=impl)
    expect = run(lambda h, w, _idx, _lp, y, bias: F.cross_entropy(F.linear(h, w, bias), y), hidden, weight,
                 bias, None, None, labels, dtype=torch.float32)
    for x, y in zip(got, expect, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_module_wrapper_triton():
    hidden, weight, bias, idx, lp, labels = make_fused_problem(N=17, K=3, seed=15)
    mod = dk.FusedLinearDFTLoss(impl="triton", temperature=2.0)
    got = mod(hidden.float(), weight.float(), idx, lp.float(), labels, bias=bias.float())
    expect = reference.fused_linear_dft_loss(hidden, weight, idx, lp, labels, bias=bias, temperature=2.0)
    torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- bad input


def _bad_input_cases():
    h = torch.randn(4, 8)
    w = torch.randn(10, 8)
    return [
        pytest.param(dict(hidden=torch.randn(4, 7), weight=w), ValueError, "hidden", id="D-mismatch"),
        pytest.param(dict(hidden=h, weight=torch.randn(10, 8, 1)), ValueError, "weight", id="weight-not-2d"),
        pytest.param(dict(hidden=h.double(), weight=w), TypeError, "hidden", id="dtype-mismatch"),
        pytest.param(dict(hidden=h, weight=w, bias=torch.randn(9)), ValueError, "bias", id="bias-shape"),
        pytest.param(dict(hidden=h.long(), weight=w), TypeError, "hidden", id="hidden-not-float"),
    ]


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("args,exc,name", _bad_input_cases())
def test_bad_input_names_the_argument(impl, args, exc, name):
    labels = torch.zeros(4, dtype=torch.long)
    with pytest.raises(exc, match=name):
        dk.fused_linear_dft_loss(args["hidden"], args["weight"], None, None, labels, bias=args.get("bias"),
                                 impl=impl)


def test_triton_op_rejects_float64():
    h = torch.randn(3, 8, dtype=torch.float64)
    w = torch.randn(5, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="impl='torch'"):
        dk.fused_linear_dft_loss(h, w, None, None, torch.zeros(3, dtype=torch.long), impl="triton")
