"""Fused linear path in Triton: the primitive of DESIGN.md sec. 6 for logits
``z = h @ w.T (+ b)`` that are never materialised as an [N, V] tensor.

    z = softcap * tanh(z / softcap)           (optional)
    lse[:, t]  = logsumexp(z * scales[t])     t < T (T = 1 or 2), fp32
    gathered   = z[row, index[row, m]]        fp32, 0 where the id is -1 or out of range

Forward
-------
* ``_lse_tile_kernel``: one program per (BLOCK_N x BLOCK_V) logits tile (grouped
  program order so that tiles in flight share rows of ``h`` and of ``w`` in L2),
  ``tl.dot`` over D in BLOCK_D steps, fp32 accumulator; bias, softcap, then the
  tile's partial log-sum-exp per row and scale is written to ``part[N, T, nV]``
  (nV = cdiv(V, BLOCK_V)). A ``logsumexp`` over the last dim merges the tiles.
* ``_indexed_dot_kernel``: one program per row, ``gathered[m] = dot(h[row],
  w[index[m]]) (+ b)``, softcapped; O(N*M*D) work, no [N, M, D] gather.

Backward
--------
``dz_j = sum_t g_lse[t] * s_t * softmax(z * s_t)_j + sum_m g_gathered[m] [index_m = j]``
times the softcap chain factor ``1 - tanh^2``. The token range is cut into row
chunks of ``Nc`` rows and the vocabulary into slabs of ``Vs`` columns; per
(chunk, slab), all launches on one stream:

1. ``_dz_tile_kernel`` recomputes each (BLOCK_N x BLOCK_V) logits tile with ``tl.dot``,
   forms ``dz`` in registers (fp32) and stores it, in the input dtype, into a
   reusable ``[Nc, Vs]`` slab buffer; with a bias it also writes the tile's fp32
   column sums (``db`` partials, reduced in a fixed order).
2. ``_sparse_fix_kernel`` overwrites the slab at the (deduplicated) ids of each
   row with the exact fp32 value ``dense(z_id) + sum of g_gathered at that id``,
   chain factor included, computed on [N, M] tensors from the saved ``gathered``
   and ``lse``. Duplicate ids in a row are summed first, so every slot is written
   once: no atomics, no race.
3. ``_dw_gemm_kernel``: ``dW[slab] (+)= dz_slab.T @ h[chunk]``, one program per
   (BLOCK_M x BLOCK_N) tile of ``dW[slab]``, the reduction over tokens in
   registers (fp32), looping only over the token blocks that carry gradient.
4. ``_dh_gemm_kernel``: ``dH[chunk] (+)= dz_slab @ w[slab]``, one program per tile of
   ``dH[chunk]``, reducing over the slab in registers (fp32); tiles whose rows
   carry no gradient write zeros (first slab) or nothing.

Accumulation across slabs (dH) and across chunks (dW) is a load-add-store done
by the single program that owns the output tile, in launch order, so the
backward is bitwise deterministic in both modes (``deterministic`` is accepted
for API symmetry; there are no atomics anywhere). With ``accum_fp32`` and
bf16/fp16 inputs that accumulation runs in fp32 buffers (see below); inside a
tile it is always fp32.

Ignored rows (no host sync): a row whose upstream grads (``g_lse`` and
``g_gathered``) are all 0 is inactive. Tiles of ``_dz_tile_kernel`` whose rows are
all inactive store zeros and skip the matmul; ``_dh_gemm_kernel`` tiles of
inactive rows skip their matmul; ``_dw_gemm_kernel`` loops over a device-side list
of the active BLOCK_K token blocks (inactive blocks first sorted to the end, the
count read inside the kernel). So ignored rows cost the forward matmul only
(1 of the 4 ``N*V*D`` matmuls), at block granularity. The forward cannot skip
them: it does not know which rows the loss will ignore.

Memory model (bytes beyond the inputs, the outputs and the gradients)
---------------------------------------------------------------------
e = element size of the input dtype, T = len(scales), M = index columns,
BV = forward BLOCK_V (256 on GPU), Nc = rows per backward chunk, Vs = slab
columns, nb = cdiv(Nc, 128):

    forward:   N*T*cdiv(V, BV)*4                         (tile partial lse, transient)
    saved:     N*(T + M)*4                                (lse, gathered; gathered is an output)
    backward:  Nc*Vs*e                                    (dz slab)
             + Nc*D*4       if bf16/fp16, accum_fp32, dH needed    (fp32 dH accumulator)
             + V*D*4        if bf16/fp16, accum_fp32, dW needed and N > Nc  (fp32 dW accumulator)
             + nb*Vs*4 + V*4            if db is needed
             + ~40*N*M                  (sparse ids / values on [N, M], int64 + fp64 sort temps)

``Vs`` is chosen so that ``Nc*Vs*e <= SLAB_BYTES`` (64 MiB); ``Nc = N`` unless
``N*D*4 > ACC_BYTES`` (128 MiB) and ``N > V`` (more rows than vocabulary: then the
V*D*4 dW accumulator is the smaller one). For an 8B model (N = 8192, D = 4096,
V = 128256, bf16, M <= 101): Vs = 4096, slab 64 MiB + dH accumulator 128 MiB +
partial lse 32 MiB (forward only) + ~33 MiB sparse temporaries: ~230 MiB peak.
With ``accum_fp32=False`` (or fp32 inputs) the dH accumulator is the gradient
itself (one rounding per slab in bf16): ~100 MiB.

For comparison, ``torch_chunked.LinearLSEGatherTorch`` with C = chunk_elems // V
rows per chunk: forward ``C*V*(e + ~12)``; backward ``C*V*(2e + ~16)`` (logits,
fp32 z, tanh, softmax, dz, low-precision dz) + ``V*D*e`` (the per-chunk
``dz.T @ h`` product before it is added) + ``V*D*4`` if bf16/fp16 with accum_fp32
and dW needed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Byte budget of the backward dz slab buffer ([Nc, Vs] in the input dtype).
SLAB_BYTES = 64 << 20
#: Byte budget of the fp32 dH accumulator ([Nc, D]) before rows are chunked.
ACC_BYTES = 128 << 20
#: Slab widths and chunk heights are multiples of this (a multiple of every block size).
ALIGN = 256


# --------------------------------------------------------------------------- kernels


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


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
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b in fp32. UPCAST (set on the CPU interpreter only, whose bf16 tl.dot
    is wrong) multiplies fp32 copies instead."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _logits_tile(H, stride_hn, stride_hd, W, stride_wv, stride_wd, rows, rmask, cols, cmask, D,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr, EVEN_D: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_V] tile of h[rows] @ w[cols].T, reduced over D in BLOCK_D steps."""
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    h_ptrs = H + rows[:, None] * stride_hn + offs_d[None, :] * stride_hd
    w_ptrs = W + cols[None, :] * stride_wv + offs_d[:, None] * stride_wd
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        if EVEN_D:
            hb = tl.load(h_ptrs, mask=rmask[:, None], other=0.0)
            wb = tl.load(w_ptrs, mask=cmask[None, :], other=0.0)
        else:
            dmask = offs_d < D - d0
            hb = tl.load(h_ptrs, mask=rmask[:, None] & dmask[None, :], other=0.0)
            wb = tl.load(w_ptrs, mask=dmask[:, None] & cmask[None, :], other=0.0)
        acc = _dot(hb, wb, acc, PRECISION, UPCAST)
        h_ptrs += BLOCK_D * stride_hd
        w_ptrs += BLOCK_D * stride_wd
    return acc


@triton.jit
def _lse_tile_kernel(
    H, stride_hn, stride_hd, W, stride_wv, stride_wd, Bias,
    PART, stride_pn, stride_pt,
    N, V, D, scale_a, scale_b, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, TWO_SCALES: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
):
    n_nb = tl.cdiv(N, BLOCK_N)
    n_vb = tl.cdiv(V, BLOCK_V)
    pid_n, pid_v = _tile_ids(tl.program_id(0).to(tl.int64), n_nb, n_vb, GROUP)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    rmask = rows < N
    cmask = cols < V
    z = _logits_tile(H, stride_hn, stride_hd, W, stride_wv, stride_wd, rows, rmask, cols, cmask, D,
                     PRECISION, UPCAST, EVEN_D, BLOCK_N, BLOCK_V, BLOCK_D)
    if HAS_BIAS:
        z += tl.load(Bias + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        z = softcap * _tanh(z / softcap)
    out = PART + rows * stride_pn + pid_v
    # every tile holds at least one valid column, so the row max is finite
    za = tl.where(cmask[None, :], z * scale_a, float("-inf"))
    m_a = tl.max(za, axis=1)
    lse_a = m_a + tl.log(tl.sum(tl.exp(za - m_a[:, None]), axis=1))
    tl.store(out, lse_a, mask=rmask)
    if TWO_SCALES:
        zb = tl.where(cmask[None, :], z * scale_b, float("-inf"))
        m_b = tl.max(zb, axis=1)
        lse_b = m_b + tl.log(tl.sum(tl.exp(zb - m_b[:, None]), axis=1))
        tl.store(out + stride_pt, lse_b, mask=rmask)


@triton.jit
def _indexed_dot_kernel(
    H, stride_hn, stride_hd, W, stride_wv, stride_wd, Bias,
    IDX, stride_in, OUT, stride_on,
    V, D, M, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    h_row = H + row * stride_hn
    for m0 in range(0, M, BLOCK_M):
        mo = m0 + offs_m
        mmask = mo < M
        idx = tl.load(IDX + row * stride_in + mo, mask=mmask, other=-1).to(tl.int64)
        ok = mmask & (idx >= 0) & (idx < V)
        safe = tl.where(ok, idx, 0)
        acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            do = d0 + offs_d
            dmask = do < D
            hv = tl.load(h_row + do * stride_hd, mask=dmask, other=0.0).to(tl.float32)
            wv = tl.load(W + safe[:, None] * stride_wv + do[None, :] * stride_wd,
                         mask=ok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(wv * hv[None, :], axis=1)
        if HAS_BIAS:
            acc += tl.load(Bias + safe, mask=ok, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            acc = softcap * _tanh(acc / softcap)
        tl.store(OUT + row * stride_on + mo, tl.where(ok, acc, 0.0), mask=mmask)


@triton.jit
def _dz_tile_kernel(
    H, stride_hn, stride_hd, W, stride_wv, stride_wd, Bias,
    LSE, stride_ln, GLSE, stride_gn, ACT,
    DZ, stride_zn, DBP, stride_bp,
    row0, n_rows, col0, n_cols, D, scale_a, scale_b, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, TWO_SCALES: tl.constexpr,
    STORE_DZ: tl.constexpr, STORE_DB: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
):
    """dz for rows [row0, row0 + n_rows) x columns [col0, col0 + n_cols), stored at
    slab coordinates (row - row0, col - col0)."""
    n_nb = tl.cdiv(n_rows, BLOCK_N)
    n_vb = tl.cdiv(n_cols, BLOCK_V)
    pid_n, pid_v = _tile_ids(tl.program_id(0).to(tl.int64), n_nb, n_vb, GROUP)
    lrows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    lcols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    rmask = lrows < n_rows
    cmask = lcols < n_cols
    rows = row0 + lrows
    cols = col0 + lcols
    dz_ptrs = DZ + lrows[:, None] * stride_zn + lcols[None, :]
    tmask = rmask[:, None] & cmask[None, :]

    active = tl.max(tl.load(ACT + rows, mask=rmask, other=0), axis=0)
    if active == 0:
        # no upstream gradient in these rows: zeros, no matmul
        if STORE_DZ:
            tl.store(dz_ptrs, tl.zeros((BLOCK_N, BLOCK_V), dtype=DZ.dtype.element_ty), mask=tmask)
        if STORE_DB:
            tl.store(DBP + pid_n * stride_bp + lcols, tl.zeros((BLOCK_V,), dtype=tl.float32), mask=cmask)
        return

    z = _logits_tile(H, stride_hn, stride_hd, W, stride_wv, stride_wd, rows, rmask, cols, cmask, D,
                     PRECISION, UPCAST, EVEN_D, BLOCK_N, BLOCK_V, BLOCK_D)
    if HAS_BIAS:
        z += tl.load(Bias + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        t = _tanh(z / softcap)
        z = softcap * t
    lse_a = tl.load(LSE + rows * stride_ln, mask=rmask, other=0.0)
    g_a = tl.load(GLSE + rows * stride_gn, mask=rmask, other=0.0) * scale_a
    dz = g_a[:, None] * tl.exp(z * scale_a - lse_a[:, None])
    if TWO_SCALES:
        lse_b = tl.load(LSE + rows * stride_ln + 1, mask=rmask, other=0.0)
        g_b = tl.load(GLSE + rows * stride_gn + 1, mask=rmask, other=0.0) * scale_b
        dz += g_b[:, None] * tl.exp(z * scale_b - lse_b[:, None])
    if HAS_SOFTCAP:
        dz = dz * (1.0 - t * t)
    dz = tl.where(tmask, dz, 0.0)
    if STORE_DB:
        tl.store(DBP + pid_n * stride_bp + lcols, tl.sum(dz, axis=0), mask=cmask)
    if STORE_DZ:
        tl.store(dz_ptrs, dz.to(DZ.dtype.element_ty), mask=tmask)


@triton.jit
def _sparse_fix_kernel(
    UIDX, stride_un, VAL, stride_vn, DZ, stride_zn,
    row0, col0, n_cols, M,
    BLOCK_M: tl.constexpr,
):
    """Overwrite dz at each row's (unique) ids that fall in the slab with the exact value."""
    lrow = tl.program_id(0).to(tl.int64)
    row = row0 + lrow
    offs = tl.arange(0, BLOCK_M)
    for m0 in range(0, M, BLOCK_M):
        mo = m0 + offs
        mmask = mo < M
        idx = tl.load(UIDX + row * stride_un + mo, mask=mmask, other=-1).to(tl.int64)
        c = idx - col0
        ok = mmask & (idx >= 0) & (c >= 0) & (c < n_cols)
        v = tl.load(VAL + row * stride_vn + mo, mask=ok, other=0.0)
        tl.store(DZ + lrow * stride_zn + tl.where(ok, c, 0), v.to(DZ.dtype.element_ty), mask=ok)


@triton.jit
def _dw_gemm_kernel(
    DZ, stride_zn, H, stride_hn, stride_hd, OUT, stride_ov, stride_od,
    BLKS, COUNT, row0, n_rows, n_cols, D,
    ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """OUT[c, d] (+)= sum over active token blocks of dz[tok, c] * h[row0 + tok, d]."""
    n_mb = tl.cdiv(n_cols, BLOCK_M)
    n_db = tl.cdiv(D, BLOCK_N)
    pid_m, pid_d = _tile_ids(tl.program_id(0).to(tl.int64), n_mb, n_db, GROUP)
    offs_c = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    cmask = offs_c < n_cols
    dmask = offs_d < D
    n_active = tl.load(COUNT)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, n_active):
        blk = tl.load(BLKS + i).to(tl.int64)
        tok = blk * BLOCK_K + offs_k
        kmask = tok < n_rows
        a = tl.load(DZ + tok[None, :] * stride_zn + offs_c[:, None],
                    mask=cmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(H + (row0 + tok)[:, None] * stride_hn + offs_d[None, :] * stride_hd,
                    mask=kmask[:, None] & dmask[None, :], other=0.0)
        acc = _dot(a, b, acc, PRECISION, UPCAST)
    out_ptrs = OUT + offs_c[:, None] * stride_ov + offs_d[None, :] * stride_od
    omask = cmask[:, None] & dmask[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=omask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=omask)


@triton.jit
def _dh_gemm_kernel(
    DZ, stride_zn, W, stride_wv, stride_wd, OUT, stride_on, stride_od, ACT,
    row0, n_rows, n_cols, D,
    ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """OUT[r, d] (+)= sum_c dz[r, c] * w[c, d] for the slab's columns (W points at its first row)."""
    n_mb = tl.cdiv(n_rows, BLOCK_M)
    n_db = tl.cdiv(D, BLOCK_N)
    pid_m, pid_d = _tile_ids(tl.program_id(0).to(tl.int64), n_mb, n_db, GROUP)
    lrows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rmask = lrows < n_rows
    dmask = offs_d < D
    out_ptrs = OUT + lrows[:, None] * stride_on + offs_d[None, :] * stride_od
    omask = rmask[:, None] & dmask[None, :]
    active = tl.max(tl.load(ACT + row0 + lrows, mask=rmask, other=0), axis=0)
    if active == 0:
        if not ACCUMULATE:
            tl.store(out_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=OUT.dtype.element_ty), mask=omask)
        return
    a_ptrs = DZ + lrows[:, None] * stride_zn + offs_k[None, :]
    b_ptrs = W + offs_k[:, None] * stride_wv + offs_d[None, :] * stride_wd
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, n_cols, BLOCK_K):
        kmask = offs_k < n_cols - k0
        a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & dmask[None, :], other=0.0)
        acc = _dot(a, b, acc, PRECISION, UPCAST)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_wv
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=omask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=omask)


# --------------------------------------------------------------------------- launchers


def _config(device: torch.device, dtype: torch.dtype, M: int) -> dict:
    """Block sizes, warps and stages of every kernel: the one place they are chosen.

    The CPU branch serves the Triton interpreter (tests): small tiles, few programs."""
    if device.type != "cuda":
        return dict(
            fwd=dict(BLOCK_N=16, BLOCK_V=128, BLOCK_D=64, GROUP=2, num_warps=4, num_stages=1),
            dz=dict(BLOCK_N=16, BLOCK_V=128, BLOCK_D=64, GROUP=2, num_warps=4, num_stages=1),
            gemm=dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP=2, num_warps=4, num_stages=1),
            gather=dict(BLOCK_M=min(triton.next_power_of_2(max(M, 1)), 16), BLOCK_D=64, num_warps=4),
            fix=dict(BLOCK_M=min(triton.next_power_of_2(max(M, 1)), 64), num_warps=1),
        )
    wide = dtype == torch.float32
    bd = 32 if wide else 64
    return dict(
        # light epilogue (max / exp / sum): a wide tile for arithmetic intensity
        fwd=dict(BLOCK_N=128, BLOCK_V=128 if wide else 256, BLOCK_D=bd, GROUP=8, num_warps=8,
                 num_stages=3),
        # heavier epilogue (tanh, one exp per scale, a tile store): square tile
        dz=dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=bd, GROUP=8, num_warps=8, num_stages=3),
        gemm=dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=bd, GROUP=8, num_warps=8, num_stages=3),
        gather=dict(BLOCK_M=min(triton.next_power_of_2(max(M, 1)), 16), BLOCK_D=256, num_warps=4),
        fix=dict(BLOCK_M=min(triton.next_power_of_2(max(M, 1)), 256), num_warps=4),
    )


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's matmul setting (TF32 only where torch would use it)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # Triton's default; 16-bit inputs ignore it


def _upcast(h: torch.Tensor) -> bool:
    return h.device.type != "cuda" and h.dtype == torch.bfloat16


def _scales(scales: tuple[float, ...]) -> tuple[float, float, bool]:
    if len(scales) == 1:
        return float(scales[0]), 1.0, False
    if len(scales) == 2:
        return float(scales[0]), float(scales[1]), True
    raise ValueError(f"scales must hold 1 or 2 values, got {len(scales)}")


def _check(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, index: torch.Tensor) -> None:
    if h.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"impl='triton' supports float32, bfloat16 and float16 inputs, got {h.dtype}; "
                        "use impl='torch' for other dtypes")
    if w.dtype != h.dtype or (b is not None and b.dtype != h.dtype):
        raise TypeError("h, w and b must share one dtype")
    if h.dim() != 2 or w.dim() != 2 or h.shape[1] != w.shape[1]:
        raise ValueError(f"expected h [N, D] and w [V, D], got {tuple(h.shape)} and {tuple(w.shape)}")
    if index.dim() != 2 or index.shape[0] != h.shape[0]:
        raise ValueError(f"index must be [N, M] with N = {h.shape[0]}, got {tuple(index.shape)}")


def linear_lse_gather_forward(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, index: torch.Tensor,
                              scales: tuple[float, ...], softcap: float | None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``lse`` [N, T] fp32 and ``gathered`` [N, M] fp32 for logits ``h @ w.T + b``."""
    _check(h, w, b, index)
    N, D = h.shape
    V = w.shape[0]
    M = index.shape[1]
    sa, sb, two = _scales(scales)
    T = 2 if two else 1
    dev = h.device
    lse = torch.empty((N, T), dtype=torch.float32, device=dev)
    gathered = torch.empty((N, M), dtype=torch.float32, device=dev)
    if N == 0:
        return lse, gathered
    cfg = _config(dev, h.dtype, M)
    upcast = _upcast(h)
    prec = "ieee" if upcast else _precision(h.dtype)
    bias = b if b is not None else w
    cap = float(softcap) if softcap is not None else 1.0

    f = cfg["fwd"]
    n_vb = triton.cdiv(V, f["BLOCK_V"])
    part = torch.empty((N, T, n_vb), dtype=torch.float32, device=dev)
    grid = (triton.cdiv(N, f["BLOCK_N"]) * n_vb,)
    _lse_tile_kernel[grid](
        h, h.stride(0), h.stride(1), w, w.stride(0), w.stride(1), bias,
        part, part.stride(0), part.stride(1),
        N, V, D, sa, sb, cap,
        HAS_BIAS=b is not None, HAS_SOFTCAP=softcap is not None, TWO_SCALES=two,
        PRECISION=prec, UPCAST=upcast, EVEN_D=D % f["BLOCK_D"] == 0,
        BLOCK_N=f["BLOCK_N"], BLOCK_V=f["BLOCK_V"], BLOCK_D=f["BLOCK_D"], GROUP=f["GROUP"],
        num_warps=f["num_warps"], num_stages=f["num_stages"],
    )
    torch.logsumexp(part, dim=-1, out=lse)
    del part

    if M > 0:
        g = cfg["gather"]
        _indexed_dot_kernel[(N,)](
            h, h.stride(0), h.stride(1), w, w.stride(0), w.stride(1), bias,
            index, index.stride(0), gathered, gathered.stride(0),
            V, D, M, cap,
            HAS_BIAS=b is not None, HAS_SOFTCAP=softcap is not None,
            BLOCK_M=g["BLOCK_M"], BLOCK_D=g["BLOCK_D"], num_warps=g["num_warps"],
        )
    return lse, gathered


def _segment_totals(sk: torch.Tensor, vals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Along the last dim of sorted keys ``sk``: the sum of ``vals`` over each run of equal
    keys, valid at the run's last element (returned as the mask ``last``).

    A float64 prefix sum minus the prefix before the run start: deterministic (no
    scatter_add), no host sync."""
    n = sk.shape[-1]
    first = torch.ones_like(sk, dtype=torch.bool)
    first[..., 1:] = sk[..., 1:] != sk[..., :-1]
    last = torch.ones_like(sk, dtype=torch.bool)
    last[..., :-1] = sk[..., 1:] != sk[..., :-1]
    v = vals.double()
    cs = v.cumsum(-1)
    pos = torch.arange(n, device=sk.device).expand_as(sk)
    start = torch.where(first, pos, torch.zeros_like(pos)).cummax(-1).values
    tot = cs - (cs - v).gather(-1, start)
    return tot.float(), last


def _sparse_values(index: torch.Tensor, g_gathered: torch.Tensor, gathered: torch.Tensor, lse: torch.Tensor,
                   g_lse: torch.Tensor, scales: tuple[float, ...], softcap: float | None, V: int):
    """Per row, the unique valid ids and the exact fp32 dz at them (no host sync).

    Returns ``uidx`` [N, M] int32 (each id at most once per row, -1 elsewhere),
    ``val`` [N, M] fp32 = (dense part + summed g_gathered) * chain, and ``gsp`` [N, M]
    fp32 = summed g_gathered * chain (the sparse part alone, for db)."""
    idx = index.long()
    valid = (idx >= 0) & (idx < V)
    key = torch.where(valid, idx, torch.full_like(idx, V))
    sk, perm = torch.sort(key, dim=1, stable=True)
    gs = torch.where(valid, g_gathered, torch.zeros_like(g_gathered)).gather(1, perm)
    zs = gathered.gather(1, perm)
    tot, last = _segment_totals(sk, gs)
    keep = last & (sk < V)
    dense = torch.zeros_like(zs)
    for k, s in enumerate(scales):
        dense += (g_lse[:, k:k + 1] * s) * torch.exp(zs * s - lse[:, k:k + 1])
    if softcap is not None:
        tz = zs / softcap
        chain = 1.0 - tz * tz
    else:
        chain = torch.ones_like(zs)
    zero = torch.zeros_like(zs)
    val = torch.where(keep, (dense + tot) * chain, zero).contiguous()
    gsp = torch.where(keep, tot * chain, zero)
    uidx = torch.where(keep, sk, torch.full_like(sk, -1)).to(torch.int32).contiguous()
    return uidx, val, gsp


def _sum_by_id(ids: torch.Tensor, vals: torch.Tensor, V: int) -> torch.Tensor:
    """``out[v] = sum(vals[ids == v])`` over all rows (ids outside [0, V) dropped),
    deterministic: stable sort, run totals, one write per distinct id."""
    ids = ids.reshape(-1).long()
    key = torch.where((ids >= 0) & (ids < V), ids, torch.full_like(ids, V))
    sk, perm = torch.sort(key, stable=True)
    tot, last = _segment_totals(sk, vals.reshape(-1).gather(0, perm))
    out = torch.zeros(V + 1, dtype=torch.float32, device=vals.device)
    out.scatter_(0, torch.where(last, sk, torch.full_like(sk, V)), torch.where(last, tot, torch.zeros_like(tot)))
    return out[:V]


def _chunking(N: int, V: int, D: int, elt: int, sep_h: bool, sep_w: bool) -> tuple[int, int]:
    """Rows per backward chunk and columns per slab (see the memory model above)."""
    if sep_h:
        budget_rows = ACC_BYTES // (4 * D)
    else:
        budget_rows = SLAB_BYTES // (elt * 4 * ALIGN)
    budget_rows = max(ALIGN, budget_rows // ALIGN * ALIGN)
    if N <= budget_rows or (sep_w and N <= V):
        n_chunk = N
    else:
        n_chunk = budget_rows
    v_round = triton.cdiv(V, ALIGN) * ALIGN
    n_slab = SLAB_BYTES // (elt * max(n_chunk, 1)) // ALIGN * ALIGN
    n_slab = min(max(n_slab, ALIGN), v_round)
    return n_chunk, n_slab


def linear_lse_gather_backward(h, w, b, index, scales, softcap, lse, gathered, g_lse, g_gathered,
                               need_h: bool, need_w: bool, need_b: bool, accum_fp32: bool):
    """Gradients (dh, dw, db) of ``lse`` / ``gathered``; None where not needed."""
    N, D = h.shape
    V = w.shape[0]
    M = index.shape[1]
    dev = h.device
    need_b = need_b and b is not None
    dh = dw = db = None
    if not (need_h or need_w or need_b):
        return dh, dw, db
    sa, sb, two = _scales(scales)
    cfg = _config(dev, h.dtype, M)
    upcast = _upcast(h)
    prec = "ieee" if upcast else _precision(h.dtype)
    bias = b if b is not None else w
    cap = float(softcap) if softcap is not None else 1.0

    g_lse = g_lse.float().contiguous()
    g_gathered = g_gathered.float()
    active = g_lse.ne(0).any(1)
    if M > 0:
        active = active | g_gathered.ne(0).any(1)
    active = active.to(torch.int32).contiguous()

    if need_h:
        dh = torch.empty((N, D), dtype=h.dtype, device=dev)
    if need_w:
        dw = torch.empty((V, D), dtype=w.dtype, device=dev)
    if need_b:
        db32 = torch.zeros(V, dtype=torch.float32, device=dev)
    if N == 0:
        if need_w:
            dw.zero_()
        return dh, dw, (db32.to(b.dtype) if need_b else None)

    if M > 0:
        uidx, val, gsp = _sparse_values(index, g_gathered, gathered, lse, g_lse, scales, softcap, V)

    low = h.dtype != torch.float32
    sep_h = need_h and accum_fp32 and low
    n_chunk, n_slab = _chunking(N, V, D, h.element_size(), sep_h, need_w and accum_fp32 and low)
    n_chunks = triton.cdiv(N, n_chunk)
    dw_acc = None
    if need_w:
        dw_acc = torch.empty((V, D), dtype=torch.float32, device=dev) if (accum_fp32 and low and n_chunks > 1) \
            else dw
    dh_acc = torch.empty((n_chunk, D), dtype=torch.float32, device=dev) if sep_h else None
    store_dz = need_h or need_w
    zc, gm, fx = cfg["dz"], cfg["gemm"], cfg["fix"]
    dz = torch.empty((n_chunk, n_slab), dtype=h.dtype, device=dev) if store_dz else g_lse
    dbp = torch.empty((triton.cdiv(n_chunk, zc["BLOCK_N"]), n_slab), dtype=torch.float32, device=dev) \
        if need_b else g_lse
    bk = gm["BLOCK_K"]

    for c, r0 in enumerate(range(0, N, n_chunk)):
        n_rows = min(n_chunk, N - r0)
        if need_w:
            # active token blocks of this chunk first (stable order), count on device
            nb = triton.cdiv(n_rows, bk)
            pad = torch.zeros(nb * bk, dtype=torch.int32, device=dev)
            pad[:n_rows] = active[r0:r0 + n_rows]
            blk_on = pad.view(nb, bk).amax(1)
            blks = torch.sort(1 - blk_on, stable=True).indices.to(torch.int32)
            count = blk_on.sum(dtype=torch.int32).reshape(1)
        out_h = (dh_acc if sep_h else dh[r0:]) if need_h else None
        for s, v0 in enumerate(range(0, V, n_slab)):
            n_cols = min(n_slab, V - v0)
            grid = (triton.cdiv(n_rows, zc["BLOCK_N"]) * triton.cdiv(n_cols, zc["BLOCK_V"]),)
            _dz_tile_kernel[grid](
                h, h.stride(0), h.stride(1), w, w.stride(0), w.stride(1), bias,
                lse, lse.stride(0), g_lse, g_lse.stride(0), active,
                dz, dz.stride(0), dbp, dbp.stride(0),
                r0, n_rows, v0, n_cols, D, sa, sb, cap,
                HAS_BIAS=b is not None, HAS_SOFTCAP=softcap is not None, TWO_SCALES=two,
                STORE_DZ=store_dz, STORE_DB=need_b,
                PRECISION=prec, UPCAST=upcast, EVEN_D=D % zc["BLOCK_D"] == 0,
                BLOCK_N=zc["BLOCK_N"], BLOCK_V=zc["BLOCK_V"], BLOCK_D=zc["BLOCK_D"], GROUP=zc["GROUP"],
                num_warps=zc["num_warps"], num_stages=zc["num_stages"],
            )
            if need_b:
                db32[v0:v0 + n_cols] += dbp[:triton.cdiv(n_rows, zc["BLOCK_N"]), :n_cols].sum(0)
            if not store_dz:
                continue
            if M > 0:
                _sparse_fix_kernel[(n_rows,)](
                    uidx, uidx.stride(0), val, val.stride(0), dz, dz.stride(0),
                    r0, v0, n_cols, M, BLOCK_M=fx["BLOCK_M"], num_warps=fx["num_warps"],
                )
            if need_w:
                out_w = dw_acc[v0:]
                grid = (triton.cdiv(n_cols, gm["BLOCK_M"]) * triton.cdiv(D, gm["BLOCK_N"]),)
                _dw_gemm_kernel[grid](
                    dz, dz.stride(0), h, h.stride(0), h.stride(1), out_w, out_w.stride(0), out_w.stride(1),
                    blks, count, r0, n_rows, n_cols, D,
                    ACCUMULATE=c > 0, PRECISION=prec, UPCAST=upcast,
                    BLOCK_M=gm["BLOCK_M"], BLOCK_N=gm["BLOCK_N"], BLOCK_K=bk, GROUP=gm["GROUP"],
                    num_warps=gm["num_warps"], num_stages=gm["num_stages"],
                )
            if need_h:
                w_slab = w[v0:]
                grid = (triton.cdiv(n_rows, gm["BLOCK_M"]) * triton.cdiv(D, gm["BLOCK_N"]),)
                _dh_gemm_kernel[grid](
                    dz, dz.stride(0), w_slab, w_slab.stride(0), w_slab.stride(1),
                    out_h, out_h.stride(0), out_h.stride(1), active,
                    r0, n_rows, n_cols, D,
                    ACCUMULATE=s > 0, PRECISION=prec, UPCAST=upcast,
                    BLOCK_M=gm["BLOCK_M"], BLOCK_N=gm["BLOCK_N"], BLOCK_K=bk, GROUP=gm["GROUP"],
                    num_warps=gm["num_warps"], num_stages=gm["num_stages"],
                )
        if sep_h:
            dh[r0:r0 + n_rows].copy_(dh_acc[:n_rows])
    if need_w and dw_acc is not dw:
        dw.copy_(dw_acc)
    if need_b:
        if M > 0:
            db32 += _sum_by_id(uidx, gsp, V)
        db = db32.to(b.dtype)
    return dh, dw, db


class LinearLSEGatherTriton(torch.autograd.Function):
    """``(h [N, D], w [V, D], b [V] | None, index [N, M]) -> (lse [N, T], gathered [N, M])``.

    Gradients only for the inputs that need them (a frozen ``w`` allocates no dW)."""

    @staticmethod
    def forward(ctx, h, w, b, index, scales, softcap, deterministic=False, accum_fp32=True):
        index = index.contiguous()
        lse, gathered = linear_lse_gather_forward(h, w, b, index, scales, softcap)
        ctx.save_for_backward(h, w, b, index, lse, gathered)
        ctx.scales, ctx.softcap, ctx.accum_fp32 = tuple(scales), softcap, accum_fp32
        return lse, gathered

    @staticmethod
    def backward(ctx, g_lse, g_gathered):
        h, w, b, index, lse, gathered = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dh, dw, db = linear_lse_gather_backward(
            h, w, b, index, ctx.scales, ctx.softcap, lse, gathered, g_lse, g_gathered,
            need_h, need_w, need_b, ctx.accum_fp32)
        return dh, dw, db, None, None, None, None, None
