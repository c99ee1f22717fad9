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
def _softcap(z, softcap):
    """``softcap * tanh(z / softcap)`` (Gemma-style final-logit softcapping), fp32."""
    return softcap * _tanh(z / softcap)


@triton.jit
def _softcap_grad(dz, capped, softcap):
    """``dz`` times the softcap's derivative, from the capped logits ``capped`` (``tanh`` is
    recomputed as ``capped / softcap`` rather than kept live: ``dz * (1 - t**2)``)."""
    t = capped / softcap
    return dz * (1.0 - t * t)


@triton.jit
def _bias_softcap(z, BIAS, cols, cmask, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """A logits tile's epilogue: ``+ bias[cols]`` then the softcap (each when present)."""
    if HAS_BIAS:
        z += tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        z = _softcap(z, softcap)
    return z


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


@triton.jit
def _slab_tile(row0, n_rows, col0, n_cols, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, GROUP: tl.constexpr):
    """This program's tile of a backward slab, rows [row0, row0 + n_rows) x columns
    [col0, col0 + n_cols), in grouped order: ``(pid_n, pid_v, lrows, lcols, rmask, cmask,
    rows0, cols0, rows, cols)`` (tile numbers, slab-local and global row / column ids,
    which exist, and the tile's first global row and column)."""
    pid_n, pid_v = _tile_ids(tl.program_id(0).to(tl.int64), tl.cdiv(n_rows, BLOCK_N), tl.cdiv(n_cols, BLOCK_V),
                             GROUP)
    lrows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    lcols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    return (pid_n, pid_v, lrows, lcols, lrows < n_rows, lcols < n_cols, row0 + pid_n * BLOCK_N,
            col0 + pid_v * BLOCK_V, row0 + lrows, col0 + lcols)


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


@triton.jit
def logits_tile(H, stride_hn, stride_hd, W, stride_wv, stride_wd, row_start, rmask, col_start, cmask, D,
                 IEEE: tl.constexpr, INTERP_BF16: tl.constexpr, EVEN_D: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_V] tile of h[row_start:] @ w[col_start:].T over D in BLOCK_D
    steps (``rmask`` / ``cmask``: which of its rows / columns exist).

    The int64 tile origin lives in two scalar pointers (``row_start`` / ``col_start`` are
    widened here, whatever the caller passes: a 32-bit loop counter times a stride wraps
    once V * D or N * D passes 2**31); in-tile offsets are int32 and loop-invariant, which
    keeps the register budget for the accumulator and epilogue (launchers keep
    ``BLOCK * stride`` below 2**31: ``_common.tile_operand``)."""
    h_base = H + tl.cast(row_start, tl.int64) * stride_hn
    w_base = W + tl.cast(col_start, tl.int64) * stride_wv
    offs_d = tl.arange(0, BLOCK_D)
    h_offs = tl.arange(0, BLOCK_N)[:, None] * stride_hn + offs_d[None, :] * stride_hd
    w_offs = tl.arange(0, BLOCK_V)[None, :] * stride_wv + offs_d[:, None] * stride_wd
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        if EVEN_D:
            hb = tl.load(h_base + h_offs, mask=rmask[:, None], other=0.0)
            wb = tl.load(w_base + w_offs, mask=cmask[None, :], other=0.0)
        else:
            dmask = offs_d < D - d0
            hb = tl.load(h_base + h_offs, mask=rmask[:, None] & dmask[None, :], other=0.0)
            wb = tl.load(w_base + w_offs, mask=dmask[:, None] & cmask[None, :], other=0.0)
        acc = _dot(hb, wb, acc, IEEE, INTERP_BF16)
        h_base += BLOCK_D * stride_hd
        w_base += BLOCK_D * stride_wd
    return acc


def exact_fp32_dots(h: torch.Tensor) -> bool:
    """Exact fp32 dot products: fp32 inputs unless torch allows TF32 matmuls (the same
    choice torch makes for ``h @ w.T``), and the interpreter's bf16 workaround."""
    if is_interp_bf16(h):
        return True
    return h.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


def is_interp_bf16(h: torch.Tensor) -> bool:
    return target_capability(h.device) is None and h.dtype == torch.bfloat16
