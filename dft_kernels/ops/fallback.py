"""The safe fallback of ``impl="auto"`` (docs/design.md sec. 16).

When "auto" picks Triton, the first call of each op on a device (per input dtype) is
guarded: a failure -- a compile error, an architecture Triton or its ptxas cannot
target, a missing ptxas, ``OutOfResources``, too old a Triton, a dtype the
architecture serves on the chunked path (``linear.config.triton_unsupported``) --
warns once, naming the device, the Triton version, the kernel and the cause, and the
op runs on the chunked PyTorch path for the rest of the process. A differentiable op
stays guarded until its first backward has run too (a backward kernel fails in the
backward; the gradients are then recomputed on the PyTorch path from the same
inputs). After that first success calls go straight to Triton. ``impl="triton"``
never falls back: it raises.
"""
from __future__ import annotations

import traceback
import warnings
from collections.abc import Callable, Sequence

import torch

#: The oldest Triton release the kernels are compiled and tested with (pyproject, README).
MIN_TRITON = (3, 2)


class AutoImpl(str):
    """``"triton"`` as chosen by ``impl="auto"``: compares equal to "triton" everywhere,
    but the ops may fall back to "torch" (see the module docstring)."""


#: What ``resolve_impl("auto", ...)`` returns when it picks Triton.
AUTO_TRITON = AutoImpl("triton")


class TritonFallbackWarning(RuntimeWarning):
    """A Triton kernel failed on its first call; "auto" continues on the PyTorch path."""


#: (op, device, dtype) -> "ok" (Triton proven, forward and backward) | "failed"
_STATE: dict[tuple[str, str, str], str] = {}
#: (op, device, dtype) whose numerical check passed (it runs once, forward and backward)
_CHECKED: set[tuple[str, str, str]] = set()


def reset() -> None:
    """Forget every first-call outcome (tests)."""
    _STATE.clear()
    _CHECKED.clear()


def is_auto(impl) -> bool:
    """Whether ``impl`` is the Triton choice of ``impl="auto"``."""
    return isinstance(impl, AutoImpl)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(idx)
        return f"{torch.cuda.get_device_name(idx)} (cuda:{idx}, sm_{cap[0]}{cap[1]})"
    return f"{device.type} (Triton interpreter)"


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except Exception as exc:  # noqa: BLE001 - a broken install is a cause like any other
        return f"unimportable ({type(exc).__name__})"


def preflight(device: torch.device, dtype: torch.dtype, op: str | None = None) -> str | None:
    """Why Triton cannot serve ``dtype`` on ``device`` (for ``op``, None: every op) before
    anything is compiled (None: try it): too old a Triton, a dtype the architecture runs on
    the chunked path, or a (Triton release, architecture, dtype, op) cell the release cannot
    compile (``linear.config.TRITON_UNSUPPORTED``: e.g. Triton < 3.3 on Blackwell)."""
    version = _triton_version()
    nums = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if len(nums) < 2 or nums < MIN_TRITON:
        return f"Triton {version} is older than the supported {'.'.join(map(str, MIN_TRITON))}"
    if device.type != "cuda":
        return None
    from .linear.config import triton_unsupported
    return triton_unsupported(torch.cuda.get_device_capability(device), dtype, op, version)


def _kernel_name(exc: BaseException, op: str) -> str:
    """The @triton.jit kernel being launched when ``exc`` was raised (else the op)."""
    name = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        fn = getattr(frame.f_locals.get("self"), "fn", None)
        if callable(fn) and getattr(fn, "__name__", "").startswith("_") and "kernel" in fn.__name__:
            name = fn.__name__
    return name or op


def _cause(exc: BaseException) -> str:
    try:
        text = str(exc).strip().splitlines()
    except Exception:  # noqa: BLE001 - an exception that cannot print itself
        text = [repr(exc.args)[:300]]
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def _fail(key: tuple[str, str, str], device: torch.device, kernel: str, cause: str) -> None:
    _STATE[key] = "failed"
    warnings.warn(
        f"dft_kernels: Triton kernel {kernel} ({key[0]}, {key[2]}) failed on its first call on "
        f"{_device_name(device)} with Triton {_triton_version()}: {cause}. impl='auto' continues on the chunked "
        "PyTorch path for the rest of this process (impl='triton' raises; `dft-kernels doctor` checks every "
        "kernel on this device).", TritonFallbackWarning, stacklevel=4)


def _is_memory_error(exc: BaseException) -> bool:
    # out of device memory is not a Triton failure: the PyTorch path would not fit either
    return isinstance(exc, torch.OutOfMemoryError)


def guarded(op: str, impl, device: torch.device, dtype: torch.dtype, run_triton: Callable[..., Sequence],
            run_torch: Callable[..., Sequence], inputs: Sequence, *, differentiable: bool = True,
            check: Callable[[], str | None] | None = None):
    """``run_triton(*inputs)``, with the first-call fallback of ``impl="auto"``.

    Args:
        op: the op's name (warnings, state key); impl: the resolved impl (an
            :class:`AutoImpl` enables the fallback, anything else calls ``run_triton``).
        device, dtype: the inputs' device and dtype (state key).
        run_triton, run_torch: the op on each path, called with ``inputs`` and returning a
            tuple of tensors (or one tensor).
        inputs: the tensors (or None) the op differentiates with respect to, first to
            last; closures hold the rest.
        differentiable: whether the outputs carry gradients (False: no backward guard).
        check: the first call's numerical check (``ops/self_check.py``): runs both paths on
            a small problem shaped like the call, returns why they disagree or None.
    """
    if not is_auto(impl):
        return run_triton(*inputs)
    key = (op, str(device), str(dtype).removeprefix("torch."))
    state = _STATE.get(key)
    if state == "ok":
        return run_triton(*inputs)
    if state == "failed":
        return run_torch(*inputs)
    try:
        reason = preflight(device, dtype, op)
    except Exception as exc:  # noqa: BLE001 - e.g. a triton that does not import
        reason = _cause(exc)
    if reason is None and check is not None and key not in _CHECKED:
        reason = _wrong_numbers(op, device, check)
        if reason is None:
            _CHECKED.add(key)
    if reason is not None:
        _fail(key, device, op, reason)
        return run_torch(*inputs)
    needs_grad = differentiable and torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)
    if needs_grad:
        return _first_call_with_backward(key, device, run_triton, run_torch, inputs)
    try:
        out = run_triton(*inputs)
    except Exception as exc:  # noqa: BLE001 - every Triton failure falls back once
        if _is_memory_error(exc):
            raise
        _fail(key, device, _kernel_name(exc, op), _cause(exc))
        return run_torch(*inputs)
    if not differentiable:
        _STATE[key] = "ok"
    return out


def _wrong_numbers(op: str, device: torch.device, check: Callable[[], str | None]) -> str | None:
    """Why the op's kernels cannot serve the device: a failure or a disagreement with the
    PyTorch path on the check's small problem (None: they agree, or the check is off)."""
    from .self_check import enabled
    if not enabled(device):
        return None
    try:
        with torch.inference_mode(False):       # the check's backward runs inside inference_mode too
            why = check()
    except Exception as exc:  # noqa: BLE001 - a kernel that fails on the check fails the call too
        if _is_memory_error(exc):
            raise
        return f"{_kernel_name(exc, op)}: {_cause(exc)}"
    return None if why is None else f"wrong numbers on a small problem shaped like the call: {why}"


def _first_call_with_backward(key, device, run_triton, run_torch, inputs):
    single = []
    state = dict(key=key, device=device, run_triton=run_triton, run_torch=run_torch, single=single)
    try:
        outs = _GuardBackward.apply(state, *inputs)
    except Exception as exc:  # noqa: BLE001
        if _is_memory_error(exc):
            raise
        _fail(key, device, _kernel_name(exc, key[0]), _cause(exc))
        return run_torch(*inputs)
    return outs[0] if single else outs


def _as_tuple(out, single: list) -> tuple:
    if isinstance(out, torch.Tensor):
        single.append(True)
        return (out,)
    return tuple(out)


class _GuardBackward(torch.autograd.Function):
    """The first differentiable call: Triton's forward (its graph kept inside), and a
    backward that runs Triton's backward or, if that fails, recomputes on the PyTorch path."""

    @staticmethod
    def forward(ctx, state, *inputs):
        leaves = [t.detach().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t for t in inputs]
        with torch.enable_grad():
            outs = _as_tuple(state["run_triton"](*leaves), state["single"])
        ctx.state, ctx.leaves, ctx.outs = state, leaves, outs
        return tuple(o.detach() for o in outs)

    @staticmethod
    def backward(ctx, *grads):
        state, leaves = ctx.state, ctx.leaves
        wrt = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]

        def grads_of(outs):
            pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
            got = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
            return iter(got)

        try:
            got = grads_of(ctx.outs)
            _STATE[state["key"]] = "ok"
        except Exception as exc:  # noqa: BLE001 - a backward kernel failed: recompute on PyTorch
            if _is_memory_error(exc):
                raise
            _fail(state["key"], state["device"], _kernel_name(exc, state["key"][0]), _cause(exc))
            with torch.enable_grad():
                got = grads_of(_as_tuple(state["run_torch"](*leaves), []))
        ctx.outs = None
        out = [next(got) if isinstance(t, torch.Tensor) and t.requires_grad else None for t in leaves]
        return (None, *out)
