"""Strategies "lean" and "fast" of the fused path (docs/design.md sec. 10): both against
the float64 reference over the option grid on both paths, lean vs fast within fp32
rounding, a property-based sweep, the automatic choice, rows that do not count, errors,
and the memory model."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dft_kernels as dk
from dft_kernels import losses, memory
from dft_kernels.options import STRATEGY_DEFAULTS
from tests.test_fused_linear import check, make_fused_problem, run

STRATEGIES = ["lean", "fast"]

# --------------------------------------------------------------------------- the option grid

GRID = [
    pytest.param(dict(), id="fkl-bucket-ce"),
    pytest.param(dict(divergence="reverse_kl", accuracy="dft", temperature=2.0, softcap=5.0), id="rkl-dft-tau2-cap"),
    pytest.param(dict(divergence="jsd", beta=0.3, tail="renorm", lam=0.5), id="jsd-renorm"),
    pytest.param(dict(tail="raw", reduction="sum", temperature=0.7), id="fkl-raw-sum-tau07"),
    pytest.param(dict(num_items_in_batch=50), id="num-items-int"),
    pytest.param(dict(num_items_in_batch=torch.tensor(7)), id="num-items-tensor"),
    pytest.param(dict(reduction="none", softcap=3.0), id="none-runs-lean"),
    pytest.param(dict(return_components=True, divergence="jsd"), id="components"),
]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("opts", GRID)
def test_torch_path_strategies_match_reference(opts, strategy):
    # chunk_elems = 16 rows of V: several chunks, the last one partial
    problem = make_fused_problem(N=70, D=24, V=311, K=6, seed=2)
    check("torch", opts, problem, strategy=strategy, chunk_elems=16 * 311)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("opts,K", [
    pytest.param(dict(softcap=4.0), 0, id="ce-K0-cap"),
    pytest.param(dict(accuracy="dft", num_items_in_batch=40), 0, id="dft-K0-num-items"),
    pytest.param(dict(tail="raw", lam=0.0, temperature=0.7), 6, id="fkl-raw-tau07-no-acc"),
])
def test_torch_path_one_scale_without_tail(opts, K, strategy):
    """One lse scale and no tail: the fast strategy's in-place route."""
    problem = make_fused_problem(N=45, D=24, V=203, K=K, seed=3)
    check("torch", opts, problem, strategy=strategy, chunk_elems=16 * 203)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("opts,K,bias", [
    pytest.param(dict(), 4, True, id="fkl-bucket-K4-bias"),
    pytest.param(dict(divergence="jsd", beta=0.4, temperature=2.0, softcap=4.0, accuracy="dft"), 3, False,
                 id="jsd-tau2-cap-dft-K3"),
    pytest.param(dict(reduction="sum"), 0, True, id="ce-K0-sum"),
])
def test_triton_path_strategies_match_reference(opts, K, bias, strategy):
    problem = make_fused_problem(N=19, D=20, V=77, K=K, bias=bias, seed=5)
    check("triton", opts, problem, strategy=strategy, chunk_elems=8 * 77)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_frozen_head(strategy, impl):
    """LoRA-style: the lm_head and its bias need no gradient, only the hidden states."""
    problem = make_fused_problem(N=23, D=16, V=91, K=4, seed=6)
    _, dh, dw, db = check(impl, dict(), problem, strategy=strategy, requires=(True, False, False),
                          chunk_elems=10 * 91)
    assert dh is not None and dw is None and db is None


def test_bf16_strategies_match_reference():
    problem = make_fused_problem(N=40, D=32, V=257, K=5, seed=7)
    for strategy in STRATEGIES:
        check("torch", dict(temperature=2.0), problem, dtype=torch.bfloat16, strategy=strategy,
              chunk_elems=16 * 257, factor=4.0, atol=1e-3)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_lean_and_fast_agree_within_fp32_rounding(impl):
    problem = make_fused_problem(N=33, D=40, V=129, K=5, seed=8)
    kw = dict(dtype=torch.float32, impl=impl, chunk_elems=12 * 129, upstream=-0.6, divergence="jsd")
    lean = run(dk.fused_linear_dft_loss, *problem, strategy="lean", **kw)
    fast = run(dk.fused_linear_dft_loss, *problem, strategy="fast", **kw)
    for name, a, b in zip(("loss", "dh", "dw", "db"), lean, fast, strict=True):
        scale = a.abs().max().item()
        assert (a - b).abs().max().item() <= 3e-6 * max(scale, 1.0), name


# --------------------------------------------------------------------------- property-based

OPTION_SETS = [dict(), dict(divergence="reverse_kl", temperature=1.5), dict(divergence="jsd", beta=0.7),
               dict(tail="raw", reduction="sum"), dict(softcap=3.0, accuracy="dft"), dict(tail="renorm", lam=0.0)]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(N=st.integers(1, 12), D=st.integers(1, 9), V=st.integers(2, 40), K=st.integers(0, 5),
       opts=st.sampled_from(OPTION_SETS), dtype=st.sampled_from([torch.float32, torch.float64]),
       strategy=st.sampled_from(STRATEGIES), impl=st.sampled_from(["torch", "triton"]),
       chunk=st.integers(1, 5), seed=st.integers(0, 2 ** 16))
def test_property_strategies_paths_and_reference(N, D, V, K, opts, dtype, strategy, impl, chunk, seed):
    K = min(K, V)
    if impl == "triton" and dtype == torch.float64:
        dtype = torch.float32      # the Triton kernels take fp32 / bf16 / fp16
    if K == 0 and opts.get("lam") == 0.0:
        opts = dict(opts, lam=0.2)
    problem = make_fused_problem(N=N, D=D, V=V, K=K, seed=seed)
    # float64 inputs compute in float64: the kernels must then match the reference closely
    check(impl, opts, problem, dtype=dtype, strategy=strategy, chunk_elems=chunk * V, atol=1e-5)


# --------------------------------------------------------------------------- choice and errors


def _spy_fast(monkeypatch):
    calls = []
    real = losses.ops.linear_fast_loss_apply

    def spy(*a, **kw):
        calls.append(kw["chunk_rows"])
        return real(*a, **kw)
    monkeypatch.setattr(losses.ops, "linear_fast_loss_apply", spy)
    return calls


@pytest.mark.parametrize("strategy,budget,reduction,grad,expect_fast", [
    pytest.param("auto", 1 << 30, "mean", True, True, id="auto-fits"),
    pytest.param("auto", 1000, "mean", True, False, id="auto-over-budget"),
    pytest.param("lean", 1 << 30, "sum", True, False, id="lean"),
    pytest.param("fast", 0, "sum", True, True, id="fast-ignores-budget"),
    pytest.param("fast", 1 << 30, "none", True, False, id="fast-none-runs-lean"),
    pytest.param("fast", 1 << 30, "mean", False, False, id="fast-no-grad-runs-lean"),
])
def test_strategy_choice(monkeypatch, strategy, budget, reduction, grad, expect_fast):
    calls = _spy_fast(monkeypatch)
    hidden, weight, bias, idx, lp, labels = make_fused_problem(N=12, D=8, V=50, K=3, seed=9)
    with torch.set_grad_enabled(grad):
        out = dk.fused_linear_dft_loss(hidden.requires_grad_(), weight, idx, lp, labels, impl="torch",
                                       strategy=strategy, memory_budget=budget, reduction=reduction)
    assert bool(calls) == expect_fast
    assert torch.isfinite(out).all()


def test_auto_uses_the_memory_model(monkeypatch):
    """The budget at which auto switches is the model's fast figure."""
    N, D, V, K = 12, 8, 50, 3
    hidden, weight, _, idx, lp, labels = make_fused_problem(N=N, D=D, V=V, K=K, seed=9)
    need = memory.loss_extra_bytes("fast", n_rows=N, hidden=D, vocab=V, k=K, dtype_bytes=8,
                                   head_trains=False, chunk_rows=memory.chunk_rows_for("fast", V, N))
    for budget, expect in ((need, True), (need - 1, False)):
        calls = _spy_fast(monkeypatch)
        dk.fused_linear_dft_loss(hidden.requires_grad_(), weight, idx, lp, labels, impl="torch",
                                 memory_budget=budget)
        assert bool(calls) == expect


def test_fast_double_backward_raises():
    hidden, weight, _, idx, lp, labels = make_fused_problem(N=9, D=6, V=30, K=2, seed=11)
    h = hidden.clone().requires_grad_()
    loss = dk.fused_linear_dft_loss(h, weight, idx, lp, labels, impl="torch", strategy="fast")
    with pytest.raises(RuntimeError, match="double backward.*strategy='lean'"):
        torch.autograd.grad(loss, h, create_graph=True)


def test_fast_second_backward_raises():
    hidden, weight, _, idx, lp, labels = make_fused_problem(N=9, D=6, V=30, K=2, seed=11)
    h = hidden.clone().requires_grad_()
    loss = dk.fused_linear_dft_loss(h, weight, idx, lp, labels, impl="torch", strategy="fast")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="strategy='lean'"):
        loss.backward()


@pytest.mark.parametrize("kw,exc,match", [
    pytest.param(dict(strategy="quick"), ValueError, "strategy='quick'", id="bad-strategy"),
    pytest.param(dict(memory_budget="1GB"), TypeError, "memory_budget", id="budget-not-a-number"),
    pytest.param(dict(memory_budget=-1), ValueError, "memory_budget", id="negative-budget"),
])
def test_bad_strategy_keywords(kw, exc, match):
    hidden, weight, _, idx, lp, labels = make_fused_problem(N=4, D=3, V=10, K=2, seed=1)
    with pytest.raises(exc, match=match):
        dk.fused_linear_dft_loss(hidden, weight, idx, lp, labels, impl="torch", **kw)
    with pytest.raises(exc, match=match):
        dk.FusedLinearDFTLoss(**kw)


def test_strategy_keywords_in_modules_and_config():
    from dft_kernels.hf.config import DFTConfig
    import inspect
    sig = inspect.signature(dk.fused_linear_dft_loss).parameters
    assert {k: sig[k].default for k in STRATEGY_DEFAULTS} == STRATEGY_DEFAULTS
    fields = {f.name: f.default for f in dataclasses.fields(DFTConfig)}
    assert {k: fields[k] for k in STRATEGY_DEFAULTS} == STRATEGY_DEFAULTS
    assert DFTConfig(strategy="lean").loss_kwargs()["strategy"] == "lean"
    mod = dk.FusedLinearDFTLoss(strategy="fast", memory_budget=123)
    assert mod.kwargs["strategy"] == "fast" and mod.kwargs["memory_budget"] == 123


# --------------------------------------------------------------------------- rows that do not count


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_rows_that_do_not_count_are_never_projected(strategy):
    """NaN hidden states on rows that do not count: had they been projected, NaN would
    reach dW; the result equals the reference on the counted rows alone."""
    hidden, weight, bias, idx, lp, labels = make_fused_problem(N=30, D=12, V=97, K=4, seed=12)
    skip = torch.zeros(30, dtype=torch.bool)
    skip[[0, 4, 5, 9, 17, 29]] = True
    labels = labels.masked_fill(skip, -100)
    poisoned = hidden.masked_fill(skip.unsqueeze(1), float("nan"))
    loss, dh, dw, db = run(dk.fused_linear_dft_loss, poisoned, weight, bias, idx, lp, labels,
                           dtype=torch.float64, impl="torch", strategy=strategy, chunk_elems=7 * 97)
    keep = ~skip
    ref = run(dk.reference.fused_linear_dft_loss, hidden[keep], weight, bias, idx[keep], lp[keep], labels[keep],
              dtype=torch.float64)
    assert torch.isfinite(dw).all() and torch.isfinite(db).all()
    assert torch.count_nonzero(dh[skip]) == 0
    torch.testing.assert_close(loss, ref[0])
    torch.testing.assert_close(dh[keep], ref[1])
    torch.testing.assert_close(dw, ref[2])
    torch.testing.assert_close(db, ref[3])


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_ops_skip_rows_without_ids(impl):
    """The ops' contract: a row whose index holds no id in [0, V) gives lse 0, gathered 0
    and zero gradients (whatever upstream gradient arrives for it), on the fused and on
    the logits path; the other rows equal the float64 reference."""
    from dft_kernels import ops
    g = torch.Generator().manual_seed(13)
    dtype = torch.float64 if impl == "torch" else torch.float32
    h = torch.randn(6, 5, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(11, 5, generator=g, dtype=dtype, requires_grad=True)
    index = torch.tensor([[1, 2], [-1, -1], [3, -1], [11, -1], [0, 10], [-1, 99]])
    dead = torch.tensor([False, True, False, True, False, True])
    up = torch.rand(6, 2, generator=g) + 0.5            # != 1, and non-zero on the dead rows too
    logits = (h @ w.T).detach().requires_grad_(True)
    ref = (h.detach().double() @ w.detach().double().T)
    for lse, gathered, x, z in (
            ops.linear_lse_gather_apply(h, w, None, index, (1.0,), None, impl, tail_slots=0) + (h, ref),
            ops.lse_gather_apply(logits, index, (1.0,), None, impl) + (logits, ref)):
        assert torch.count_nonzero(lse[dead]) == 0 and torch.count_nonzero(gathered[dead]) == 0
        torch.testing.assert_close(lse[~dead, 0].double(), torch.logsumexp(z[~dead], 1), rtol=1e-5, atol=1e-5)
        (dx,) = torch.autograd.grad((lse[:, 0] * up[:, 0]).sum() + (gathered * up).sum(), x)
        assert torch.count_nonzero(dx[dead]) == 0 and torch.count_nonzero(dx[~dead]) > 0


# --------------------------------------------------------------------------- memory model


def test_memory_model_orders_the_strategies():
    kw = dict(n_rows=2048, hidden=512, vocab=32000, k=32, dtype_bytes=4)
    naive, lean, fast = (memory.loss_extra_bytes(s, **kw) for s in ("naive", "lean", "fast"))
    assert lean < fast < naive
    frozen = memory.loss_extra_bytes("fast", head_trains=False, **kw)
    assert fast - frozen == 32000 * 512 * 4        # dW held from forward to backward
    assert memory.loss_extra_bytes("fast", chunk_rows=2 * memory.chunk_rows_for("fast", 32000), **kw) > fast


@pytest.mark.parametrize("kw,match", [
    pytest.param(dict(strategy="auto"), "strategy", id="strategy"),
    pytest.param(dict(n_rows=-1), "n_rows", id="n_rows"),
    pytest.param(dict(dtype_bytes=3), "dtype_bytes", id="dtype_bytes"),
])
def test_memory_model_bad_input(kw, match):
    args = dict(strategy="fast", n_rows=8, hidden=4, vocab=16, k=2, dtype_bytes=4)
    args.update(kw)
    strategy = args.pop("strategy")
    with pytest.raises(ValueError, match=match):
        memory.loss_extra_bytes(strategy, **args)
