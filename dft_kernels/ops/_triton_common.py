"""Triton helpers used by more than one op file (no loss knowledge)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

#: Compute capability the launchers assume for ``meta`` tensors (set only by
#: :func:`compile_target`, for the ahead-of-time compile check, docs/design.md sec. 13).
_META_CAPABILITY: tuple[int, int] | None = None


def target_capability(device: torch.device) -> tuple[int, int] | None:
    """The compute capability kernels launched on ``device`` are built for.

    Args:
        device: the tensors' device.
    Returns:
        ``(major, minor)`` on a CUDA device, the capability set by :func:`compile_target`
        for ``meta`` tensors, None for the Triton interpreter on the CPU.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)
    if device.type == "meta":
        return _META_CAPABILITY
    return None


@contextlib.contextmanager
def compile_target(capability: tuple[int, int]) -> Iterator[None]:
    """Within the block, launchers given ``meta`` tensors choose the GPU configuration of
    ``capability`` (the launches themselves are recorded by the compile check, not run)."""
    global _META_CAPABILITY
    previous, _META_CAPABILITY = _META_CAPABILITY, tuple(capability)
    try:
        yield
    finally:
        _META_CAPABILITY = previous


@triton.jit
def _tanh(x):
    """tanh in fp32 from one exp (numerically safe for large |x|)."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _no_term_lse(lse, g):
    """The lse a backward kernel divides by: +inf where the row's upstream gradient ``g``
    is 0 or the lse is -inf (an empty sum), so that ``g * exp(z - lse)`` is exactly 0
    there whatever the logits ``z`` (no ``0 * inf``)."""
    return tl.where((g == 0) | (lse == float("-inf")), float("inf"), lse)


@triton.jit
def _online_lse(m, s, x):
    """One step of a running log-sum-exp ``m + log(s)`` over the values ``x`` (a 1-D
    block; ``-inf`` entries are ignored). Returns the updated ``(m, s)``."""
    new_m = tl.maximum(m, tl.max(x, axis=0))
    safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)
    s = s * tl.exp(m - safe_m) + tl.sum(tl.exp(x - safe_m), axis=0)
    return new_m, s


@triton.jit
def _tile_ids(pid, n_a, n_b, GROUP: tl.constexpr):
    """Grouped program order: GROUP consecutive blocks along ``a`` sweep ``b`` together."""
    per_group = GROUP * n_b
    group = pid // per_group
    first = group * GROUP
    size = tl.minimum(n_a - first, GROUP)
    local = pid % per_group
    return first + local % size, local // size


@triton.jit
def _tile_coords(n_rows, n_cols, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, GROUP: tl.constexpr):
    """This program's tile of an [n_rows, n_cols] grid in grouped order: ``(pid_v, rows0,
    cols0, rows, cols, rmask, cmask)`` (its vocab-tile number, first row and column, the
    row and column ids, and which of them exist)."""
    pid_n, pid_v = _tile_ids(tl.program_id(0).to(tl.int64), tl.cdiv(n_rows, BLOCK_N), tl.cdiv(n_cols, BLOCK_V),
                             GROUP)
    rows0 = pid_n * BLOCK_N
    cols0 = pid_v * BLOCK_V
    rows = rows0 + tl.arange(0, BLOCK_N)
    cols = cols0 + tl.arange(0, BLOCK_V)
    return pid_v, rows0, cols0, rows, cols, rows < n_rows, cols < n_cols


# INTERP_BF16 is set only for bf16 inputs under the CPU interpreter, whose bf16 tl.dot
# multiplies raw bits and whose fp32 -> bf16 cast truncates; GPUs need neither fix.


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr, INTERP_BF16: tl.constexpr):
    """acc + a @ b, fp32 accumulation. IEEE: exact fp32 products for fp32 operands
    (no TF32); otherwise Triton's default precision."""
    if INTERP_BF16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERP_BF16: tl.constexpr):
    """fp32 -> storage dtype, rounding to nearest even."""
    if INTERP_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
