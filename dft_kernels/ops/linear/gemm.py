"""The two backward products of the fused path on a dz slab, in Triton:
``dW[slab] (+)= dz.T @ h[chunk]`` and ``dH[chunk] (+)= dz @ w[slab]`` (docs/fused_path.md)."""
from __future__ import annotations

import triton
import triton.language as tl

from .._triton_common import _cast, _dot, _tile_ids

@triton.jit
def _dw_gemm_kernel(
    DZ, stride_zn, H, stride_hn, stride_hd, OUT, stride_ov, stride_od,
    COUNT, n_rows, n_cols, D,
    ACCUMULATE: tl.constexpr, IEEE: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """OUT[c, d] (+)= sum over the chunk's first ``COUNT`` token blocks of dz[tok, c] * h[tok, d]
    (H points at the chunk's first row, OUT at the slab's first row).

    ``COUNT`` (read on the device) is the number of BLOCK_K-row token blocks up to the
    last one holding an active row; blocks after it have dz = 0 and are skipped. The
    token offset is the loop counter times BLOCK_K, not an index loaded in the loop: a
    loaded offset makes Triton's pipeliner keep fewer operand buffers (docs/design.md
    sec. 13)."""
    n_mb = tl.cdiv(n_cols, BLOCK_M)
    n_db = tl.cdiv(D, BLOCK_N)
    pid_m, pid_d = _tile_ids(tl.program_id(0).to(tl.int64), n_mb, n_db, GROUP)
    c0 = pid_m * BLOCK_M
    d0 = pid_d * BLOCK_N
    lc = tl.arange(0, BLOCK_M)
    ld = tl.arange(0, BLOCK_N)
    lk = tl.arange(0, BLOCK_K)
    cmask = lc < n_cols - c0
    dmask = ld < D - d0
    a_offs = lk[None, :] * stride_zn + lc[:, None]                      # dz.T tile [BLOCK_M, BLOCK_K]
    b_offs = lk[:, None] * stride_hn + ld[None, :] * stride_hd          # h tile [BLOCK_K, BLOCK_N]
    a_base = DZ + c0
    b_base = H + d0 * stride_hd
    n_blocks = tl.load(COUNT)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, n_blocks):
        kmask = lk < n_rows - i * BLOCK_K
        a = tl.load(a_base + a_offs, mask=cmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_base + b_offs, mask=kmask[:, None] & dmask[None, :], other=0.0)
        acc = _dot(a, b, acc, IEEE, INTERP_BF16)
        a_base += BLOCK_K * stride_zn
        b_base += BLOCK_K * stride_hn
    out_ptrs = OUT + c0 * stride_ov + d0 * stride_od + lc[:, None] * stride_ov + ld[None, :] * stride_od
    omask = cmask[:, None] & dmask[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=omask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, _cast(acc, OUT.dtype.element_ty, INTERP_BF16), mask=omask)


@triton.jit
def _dh_gemm_kernel(
    DZ, stride_zn, W, stride_wv, stride_wd, OUT, stride_on, stride_od, ACT,
    row0, n_rows, n_cols, D,
    ACCUMULATE: tl.constexpr, IEEE: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """OUT[r, d] (+)= sum_c dz[r, c] * w[c, d] over the slab's columns (W points at its
    first row); tiles whose rows are all inactive skip the matmul."""
    n_mb = tl.cdiv(n_rows, BLOCK_M)
    n_db = tl.cdiv(D, BLOCK_N)
    pid_m, pid_d = _tile_ids(tl.program_id(0).to(tl.int64), n_mb, n_db, GROUP)
    r0 = pid_m * BLOCK_M
    d0 = pid_d * BLOCK_N
    lr = tl.arange(0, BLOCK_M)
    ld = tl.arange(0, BLOCK_N)
    lk = tl.arange(0, BLOCK_K)
    rmask = lr < n_rows - r0
    dmask = ld < D - d0
    out_ptrs = OUT + r0 * stride_on + d0 * stride_od + lr[:, None] * stride_on + ld[None, :] * stride_od
    omask = rmask[:, None] & dmask[None, :]
    # rows without upstream gradient have dz = 0: skip the reduction (no branch, see
    # _dz_tile_kernel); the tile then stores zeros or re-stores what it accumulated
    active = tl.max(tl.load(ACT + row0 + r0 + lr, mask=rmask, other=0), axis=0)
    n_k = tl.where(active > 0, n_cols, 0)
    a_base = DZ + r0 * stride_zn
    b_base = W + d0 * stride_wd
    a_offs = lr[:, None] * stride_zn + lk[None, :]
    b_offs = lk[:, None] * stride_wv + ld[None, :] * stride_wd
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, n_k, BLOCK_K):
        kmask = lk < n_cols - k0
        a = tl.load(a_base + a_offs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_base + b_offs, mask=kmask[:, None] & dmask[None, :], other=0.0)
        acc = _dot(a, b, acc, IEEE, INTERP_BF16)
        a_base += BLOCK_K
        b_base += BLOCK_K * stride_wv
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=omask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, _cast(acc, OUT.dtype.element_ty, INTERP_BF16), mask=omask)
