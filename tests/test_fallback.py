"""The safe fallback of impl="auto" (docs/design.md sec. 16): a Triton failure on the first
call of an op on a device -- compile error, unsupported architecture, missing ptxas,
OutOfResources, too old a Triton -- warns once (device, Triton version, kernel, cause)
and the op continues on the chunked PyTorch path; impl="triton" raises.

On the CPU "auto" picks Triton through DFT_KERNELS_IMPL=triton (the interpreter runs
the kernels); failures are injected at the kernel launch."""
from __future__ import annotations

import warnings

import pytest
import torch

import dft_kernels as dk
from dft_kernels.ops import fallback
from dft_kernels.ops.linear.config import triton_unsupported

triton = pytest.importorskip("triton")
from triton.compiler.errors import CompilationError  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402


def _runner_class():
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    return InterpretedFunction if torch.device("cpu").type == "cpu" and not torch.cuda.is_available() else JITFunction


@pytest.fixture(autouse=True)
def auto_picks_triton(monkeypatch):
    monkeypatch.setenv("DFT_KERNELS_IMPL", "triton")
    fallback.reset()
    yield
    fallback.reset()


def _problem(seed=0, N=11, D=24, V=67, K=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=dtype)
    w = torch.randn(V, D, generator=g, dtype=dtype) * 0.3
    lp, idx = torch.log_softmax(torch.randn(N, V, generator=g) * 2, -1).topk(K, dim=-1)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[2] = -100
    return h, w, dict(target_index=idx, target_logprobs=lp, labels=labels)


def _loss_and_grads(impl, strategy="lean"):
    h, w, targets = _problem()
    h.requires_grad_(True)
    w.requires_grad_(True)
    loss = dk.fused_linear_dft_loss(h, w, **targets, impl=impl, strategy=strategy)
    loss.backward()
    return loss.detach(), h.grad, w.grad


class _Inject:
    """Makes the launch of the kernels named in ``only`` (None: every kernel) raise ``exc``."""

    def __init__(self, monkeypatch, exc, only=None):
        self.calls, self.exc, self.only = [], exc, only
        cls = _runner_class()
        original = cls.run
        inject = self

        def run(self, *args, **kwargs):
            name = self.fn.__name__
            inject.calls.append(name)
            if inject.only is None or name in inject.only:
                raise inject.exc
            return original(self, *args, **kwargs)
        monkeypatch.setattr(cls, "run", run)


def _compile_error(message):
    exc = CompilationError.__new__(CompilationError)
    Exception.__init__(exc, message)
    exc.message = message
    return exc


FAILURES = [
    pytest.param(_compile_error("at 12:8: unsupported tensor-core layout"), "CompilationError: at 12:8",
                 id="compile-error"),
    pytest.param(RuntimeError("No kernel image is available for execution on the device (sm_61)"), "sm_61",
                 id="unsupported-arch"),
    pytest.param(FileNotFoundError("[Errno 2] No such file or directory: 'ptxas'"), "ptxas", id="missing-ptxas"),
    pytest.param(OutOfResources(232448, 101376, "shared memory"), "out of resource: shared memory",
                 id="out-of-resources"),
]


@pytest.mark.parametrize("exc, cause", FAILURES)
def test_auto_falls_back_once_on_a_forward_failure(monkeypatch, exc, cause):
    want = _loss_and_grads("torch")
    inject = _Inject(monkeypatch, exc)
    with pytest.warns(fallback.TritonFallbackWarning) as rec:
        got = _loss_and_grads("auto")
    msg = str(rec[0].message)
    assert len(rec) == 1
    for part in ("_lse_tile_kernel", "cpu", f"Triton {triton.__version__}", cause, "chunked PyTorch path"):
        assert part in msg, (part, msg)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    # the rest of the process: the same op goes straight to PyTorch, silently
    n = len(inject.calls)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = _loss_and_grads("auto")
    assert len(inject.calls) == n
    torch.testing.assert_close(again[0], want[0])


def test_triton_raises(monkeypatch):
    _Inject(monkeypatch, OutOfResources(232448, 101376, "shared memory"))
    with pytest.raises(OutOfResources):
        _loss_and_grads("triton")


def test_backward_kernel_failure_recomputes_on_pytorch(monkeypatch):
    """The forward compiles, a backward kernel does not: the gradients come from the
    PyTorch path (recomputed from the same inputs), and the op stays on it."""
    want = _loss_and_grads("torch")
    inject = _Inject(monkeypatch, RuntimeError("ptxas fatal: Unresolved extern function"), only={"_dz_tile_kernel"})
    with pytest.warns(fallback.TritonFallbackWarning, match="_dz_tile_kernel") as rec:
        got = _loss_and_grads("auto")
    assert len(rec) == 1 and "_lse_tile_kernel" in inject.calls
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert fallback._STATE[("linear_lse_gather", "cpu", "float32")] == "failed"


def test_too_old_triton_falls_back_without_compiling(monkeypatch):
    inject = _Inject(monkeypatch, AssertionError("must not launch"))
    monkeypatch.setattr(fallback, "_triton_version", lambda: "3.1.0")
    with pytest.warns(fallback.TritonFallbackWarning, match="Triton 3.1.0 is older than the supported 3.2"):
        got = _loss_and_grads("auto")
    assert inject.calls == []
    torch.testing.assert_close(got[0], _loss_and_grads("torch")[0])


def test_success_is_remembered_after_the_first_backward():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _loss_and_grads("auto")
    assert fallback._STATE[("linear_lse_gather", "cpu", "float32")] == "ok"
    want = _loss_and_grads("torch")
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)


def test_teacher_topk_and_two_head_fall_back(monkeypatch):
    h, w, _ = _problem()
    want = dk.teacher_topk(h, w, 4, impl="torch")
    _Inject(monkeypatch, OutOfResources(1 << 20, 1 << 16, "shared memory"))
    with pytest.warns(fallback.TritonFallbackWarning, match="_teacher_topk_kernel"):
        got = dk.teacher_topk(h, w, 4, impl="auto")
    torch.testing.assert_close(got.logprobs, want.logprobs)
    ht, wt, _ = _problem(seed=1)
    ref = dk.fused_linear_distill_loss(h, w, ht, wt, impl="torch", strategy="lean")
    with pytest.warns(fallback.TritonFallbackWarning, match="two_head"):
        out = dk.fused_linear_distill_loss(h, w, ht, wt, impl="auto", strategy="lean")
    torch.testing.assert_close(out, ref)


def test_logits_path_falls_back(monkeypatch):
    h, w, targets = _problem()
    x = (h @ w.T).requires_grad_(True)
    want = dk.dft_loss(x, **targets, impl="torch")
    _Inject(monkeypatch, RuntimeError("CUDA error: no kernel image is available"))
    with pytest.warns(fallback.TritonFallbackWarning, match="_lse_gather_fwd_kernel"):
        got = dk.dft_loss(x, **targets, impl="auto")
    torch.testing.assert_close(got, want)


def test_turing_16bit_runs_the_chunked_path():
    """sm_75: no tensor-core tl.dot in Triton (and no bf16 tensor cores at all): auto runs
    bf16 / fp16 on the chunked PyTorch path, fp32 on Triton."""
    assert "sm_75" in triton_unsupported((7, 5), torch.bfloat16)
    assert "sm_75" in triton_unsupported((7, 5), torch.float16)
    assert triton_unsupported((7, 5), torch.float32) is None
    for cap in ((8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)):
        assert triton_unsupported(cap, torch.bfloat16) is None, cap


def test_resolve_impl_tags_auto_and_reads_the_doctor_cache(monkeypatch):
    from dft_kernels import losses
    from dft_kernels.doctor import cache
    assert fallback.is_auto(losses.resolve_impl("auto", torch.device("cpu")))
    assert not fallback.is_auto(losses.resolve_impl("triton", torch.device("cpu")))
    monkeypatch.delenv("DFT_KERNELS_IMPL")
    monkeypatch.setattr(losses.ops, "HAS_TRITON", True)
    cuda = torch.device("cuda")
    monkeypatch.setattr(cache, "cached_choice", lambda name, device=None: None)
    assert fallback.is_auto(losses.resolve_impl("auto", cuda))
    monkeypatch.setattr(cache, "cached_choice", lambda name, device=None: "torch" if name == "impl" else None)
    assert losses.resolve_impl("auto", cuda) == "torch"
    assert losses.resolve_impl("auto", torch.device("cpu")) == "torch"


def test_broken_triton_import_falls_back(monkeypatch):
    def broken(device, dtype, op=None):
        raise ImportError("libcuda.so.1: cannot open shared object file")
    monkeypatch.setattr(fallback, "preflight", broken)
    with pytest.warns(fallback.TritonFallbackWarning, match="ImportError: libcuda.so.1"):
        got = _loss_and_grads("auto")
    torch.testing.assert_close(got[0], _loss_and_grads("torch")[0])
