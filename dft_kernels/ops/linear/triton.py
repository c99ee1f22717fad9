"""Fused linear path in Triton: the primitive of docs/design.md sec. 6 for logits
``z = h @ w.T (+ b)`` that are never materialised as an [N, V] tensor.

Forward: ``_lse_tile_kernel`` (grouped logits tiles, per-tile log-sum-exp partials,
the tail column with the row's teacher slots masked) and ``_indexed_dot_kernel``
(the logits at the gathered ids). Backward, per (row chunk, vocab slab):
``_dz_tile_kernel`` recomputes each tile and writes dz into a reused slab,
``_sparse_fix_kernel`` writes the exact values at the (merged) ids, then the two
products ``dW[slab] += dz.T @ h`` and ``dH += dz @ W[slab]`` (ops/linear/gemm.py). No
atomics: the gradients are bitwise reproducible. The design, the ignored-row
handling and the memory model: docs/fused_path.md.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import (PrimitiveArgs, lse_columns, active_first, block_rows, merge_duplicate_ids, partial_rows, row_activity, sorted_slots,
                      split_scales, tile_operand, unpermute)
from .config import FusedConfig, fused_config
from ...memory import GATHER_BYTES
from .backward import check_backward_gemm, slab_backward
from .._triton_common import (_bias_softcap, _cast, exact_fp32_dots, is_interp_bf16, logits_tile, _no_term_lse,
                              _slab_tile, _softcap, _softcap_grad, target_capability, _tile_coords)

# --------------------------------------------------------------------------- kernels


@triton.jit
def _mask_slots(x, fill, SLOT, stride_sn, tail_slots, n_iter, rows, rmask, cols, col0, col_end,
                BLOCK_N: tl.constexpr):
    """``x`` [BLOCK_N, BLOCK_V] with ``fill`` where column ``cols`` is one of the row's
    teacher slots.

    Each row's slots are sorted ascending (empty = a huge sentinel). A vectorised
    binary search (``n_iter`` = bit length of tail_slots steps) finds the first slot
    >= col0, then a walk consumes the slots below ``col_end``: on average
    K * BLOCK_V / V per row, so the loop usually runs 0-2 times. ``x`` itself is the
    loop-carried tile, so no extra [BLOCK_N, BLOCK_V] mask is kept in registers."""
    base = SLOT + rows * stride_sn
    lo = tl.zeros((BLOCK_N,), dtype=tl.int32)
    hi = tl.zeros((BLOCK_N,), dtype=tl.int32) + tail_slots
    for _ in range(0, n_iter):
        open_ = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(base + mid, mask=rmask & open_, other=0)
        below = open_ & (v < col0)
        lo = tl.where(below, mid + 1, lo)
        hi = tl.where(open_ & (v >= col0), mid, hi)
    p = lo
    nxt = tl.load(base + p, mask=rmask & (p < tail_slots), other=col_end)
    while tl.max((nxt < col_end).to(tl.int32), axis=0) > 0:
        inside = nxt < col_end
        x = tl.where((cols[None, :] == nxt[:, None]) & inside[:, None], fill, x)
        p = tl.where(inside, p + 1, p)
        nxt = tl.load(base + p, mask=rmask & (p < tail_slots), other=col_end)
    return x


@triton.jit
def _lse_tile_kernel(
    H, stride_hn, stride_hd, W, stride_wv, stride_wd, Bias,
    PART, stride_pn, stride_pt, ACT,
    SLOT, stride_sn, tail_slots, n_iter,
    N, V, D, scale_a, scale_b, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, TWO_SCALES: tl.constexpr, HAS_TAIL: tl.constexpr,
    IEEE: tl.constexpr, INTERP_BF16: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
):
    pid_v, rows0, cols0, rows, cols, rmask, cmask = _tile_coords(N, V, BLOCK_N, BLOCK_V, GROUP)
    # a block of rows that do not count: the D loop runs zero times (their partials are
    # finite, the launcher overwrites their lse with 0)
    active = tl.max(tl.load(ACT + rows, mask=rmask, other=0), axis=0)
    n_d = tl.where(active > 0, D, 0)
    z = logits_tile(H, stride_hn, stride_hd, W, stride_wv, stride_wd, rows0, rmask, cols0, cmask, n_d,
                     IEEE, INTERP_BF16, EVEN_D, BLOCK_N, BLOCK_V, BLOCK_D)
    z = _bias_softcap(z, Bias, cols, cmask, softcap, HAS_BIAS, HAS_SOFTCAP)
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
    if HAS_TAIL:
        # the same at scales[-1] over the columns that are not teacher slots; a tile
        # made only of slots gives -inf
        scale_r = scale_b if TWO_SCALES else scale_a
        zr = tl.where(cmask[None, :], z * scale_r, float("-inf"))
        zr = _mask_slots(zr, float("-inf"), SLOT, stride_sn, tail_slots, n_iter, rows, rmask, cols,
                         pid_v * BLOCK_V, pid_v * BLOCK_V + BLOCK_V, BLOCK_N)
        m_r = tl.max(zr, axis=1)
        m_r = tl.where(m_r == float("-inf"), 0.0, m_r)
        s_r = tl.sum(tl.exp(zr - m_r[:, None]), axis=1)
        lse_r = tl.where(s_r > 0, m_r + tl.log(tl.maximum(s_r, 1e-30)), float("-inf"))
        tl.store(out + (2 if TWO_SCALES else 1) * stride_pt, lse_r, mask=rmask)


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
            acc = _softcap(acc, softcap)
        tl.store(OUT + row * stride_on + mo, tl.where(ok, acc, 0.0), mask=mmask)


@triton.jit
def _dz_tile_kernel(
    H, stride_hn, stride_hd, W, stride_wv, stride_wd, Bias,
    LSE, stride_ln, GLSE, stride_gn, ACT,
    DZ, stride_zn, DBP, stride_bp,
    SLOT, stride_sn, tail_slots, n_iter,
    row0, n_rows, col0, n_cols, D, scale_a, scale_b, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, TWO_SCALES: tl.constexpr, HAS_TAIL: tl.constexpr,
    STORE_DZ: tl.constexpr, STORE_DB: tl.constexpr,
    IEEE: tl.constexpr, INTERP_BF16: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
):
    """dz for rows [row0, row0 + n_rows) x columns [col0, col0 + n_cols), stored at
    slab coordinates (row - row0, col - col0)."""
    pid_n, pid_v, lrows, lcols, rmask, cmask, rows0, cols0, rows, cols = _slab_tile(row0, n_rows, col0, n_cols,
                                                                                   BLOCK_N, BLOCK_V, GROUP)
    dz_ptrs = (DZ + pid_n * BLOCK_N * stride_zn + pid_v * BLOCK_V
               + tl.arange(0, BLOCK_N)[:, None] * stride_zn + tl.arange(0, BLOCK_V)[None, :])
    tmask = rmask[:, None] & cmask[None, :]

    # rows without upstream gradient: the D loop runs zero times and, every g being 0,
    # the epilogue stores zeros (a branch here would cost registers: the epilogue spills)
    active = tl.max(tl.load(ACT + rows, mask=rmask, other=0), axis=0)
    n_d = tl.where(active > 0, D, 0)
    z = logits_tile(H, stride_hn, stride_hd, W, stride_wv, stride_wd, rows0, rmask, cols0, cmask, n_d,
                     IEEE, INTERP_BF16, EVEN_D, BLOCK_N, BLOCK_V, BLOCK_D)
    z = _bias_softcap(z, Bias, cols, cmask, softcap, HAS_BIAS, HAS_SOFTCAP)
    # a row without upstream gradient for a term (e.g. a row that does not count, whose
    # lse is 0 while its logits are real) takes lse = +inf there: exp(z - inf) = 0 exactly,
    # never 0 * exp(overflow) = 0 * inf = NaN
    g_a = tl.load(GLSE + rows * stride_gn, mask=rmask, other=0.0) * scale_a
    lse_a = _no_term_lse(tl.load(LSE + rows * stride_ln, mask=rmask, other=0.0), g_a)
    dz = g_a[:, None] * tl.exp(z * scale_a - lse_a[:, None])
    if TWO_SCALES:
        g_b = tl.load(GLSE + rows * stride_gn + 1, mask=rmask, other=0.0) * scale_b
        lse_b = _no_term_lse(tl.load(LSE + rows * stride_ln + 1, mask=rmask, other=0.0), g_b)
        dz += g_b[:, None] * tl.exp(z * scale_b - lse_b[:, None])
    if HAS_TAIL:
        scale_r = scale_b if TWO_SCALES else scale_a
        rc = 2 if TWO_SCALES else 1
        g_r = tl.load(GLSE + rows * stride_gn + rc, mask=rmask, other=0.0) * scale_r
        # an empty tail (-inf: every column is a slot) has no term either
        lse_r = _no_term_lse(tl.load(LSE + rows * stride_ln + rc, mask=rmask, other=0.0), g_r)
        er = g_r[:, None] * tl.exp(z * scale_r - lse_r[:, None])
        er = _mask_slots(er, 0.0, SLOT, stride_sn, tail_slots, n_iter, rows, rmask, cols,
                         col0 + pid_v * BLOCK_V, col0 + pid_v * BLOCK_V + BLOCK_V, BLOCK_N)
        dz += er
    if HAS_SOFTCAP:
        dz = _softcap_grad(dz, z, softcap)
    dz = tl.where(tmask, dz, 0.0)
    if STORE_DB:
        tl.store(DBP + pid_n * stride_bp + lcols, tl.sum(dz, axis=0), mask=cmask)
    if STORE_DZ:
        tl.store(dz_ptrs, _cast(dz, DZ.dtype.element_ty, INTERP_BF16), mask=tmask)


@triton.jit
def _sparse_fix_kernel(
    UIDX, stride_isn, VAL, stride_vn, DZ, stride_zn,
    row0, col0, n_cols, M,
    INTERP_BF16: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Overwrite dz at each row's (unique) ids that fall in the slab with the exact value."""
    lrow = tl.program_id(0).to(tl.int64)
    row = row0 + lrow
    offs = tl.arange(0, BLOCK_M)
    for m0 in range(0, M, BLOCK_M):
        mo = m0 + offs
        mmask = mo < M
        idx = tl.load(UIDX + row * stride_isn + mo, mask=mmask, other=-1).to(tl.int64)
        c = idx - col0
        ok = mmask & (idx >= 0) & (c >= 0) & (c < n_cols)
        v = tl.load(VAL + row * stride_vn + mo, mask=ok, other=0.0)
        tl.store(DZ + lrow * stride_zn + tl.where(ok, c, 0), _cast(v, DZ.dtype.element_ty, INTERP_BF16), mask=ok)


# --------------------------------------------------------------------------- launchers


def _slot_list(index: torch.Tensor, V: int, tail_slots: int) -> torch.Tensor:
    """Each row's first ``tail_slots`` ids sorted (a 1 x 1 placeholder when there are none)."""
    if tail_slots:
        return sorted_slots(index, V, tail_slots)
    return torch.zeros((1, 1), dtype=torch.int64, device=index.device)


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
                              scales: tuple[float, ...], softcap: float | None, tail_slots: int = 0,
                              config: FusedConfig | None = None, active: torch.Tensor | None = None,
                              order: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``lse`` [N, T (+1)] fp32 and ``gathered`` [N, M] fp32 for logits ``h @ w.T + b``.

    With ``tail_slots > 0`` the extra last lse column is the log-sum-exp at ``scales[-1]``
    over the vocab outside the first ``tail_slots`` ids of each row (-inf if empty).
    Rows whose ``index`` holds no id in [0, V) do not count: lse 0, gathered 0, and a
    block of ``BLOCK_N`` such rows does no matmul work (the autograd function orders
    the rows active-first so that they form whole blocks).
    ``config``: the launch config (None: ``fused_config`` for the device).
    ``active``: int32 [N] row activity (None: :func:`row_activity` of ``index``).
    ``order``: int64 [N] or None: row i of the problem (of ``index``, ``active`` and the
    outputs) is row ``order[i]`` of ``h``, gathered one bounded block of rows at a time
    (no [N, D] copy)."""
    _check(h, w, b, index)
    N, D = h.shape
    V = w.shape[0]
    if active is None:
        active = row_activity(index, V)
    M = index.shape[1]
    sa, sb, two = split_scales(scales)
    n_lse = lse_columns(scales, tail_slots)
    dev = h.device
    lse = torch.empty((N, n_lse), dtype=torch.float32, device=dev)
    gathered = torch.empty((N, M), dtype=torch.float32, device=dev)
    if N == 0:
        return lse, gathered
    cfg = config or fused_config(target_capability(dev), h.dtype, M)
    interp_bf16 = is_interp_bf16(h)
    ieee = exact_fp32_dots(h)
    bias = b if b is not None else w
    cap = float(softcap) if softcap is not None else 1.0

    f, g = cfg.fwd, cfg.gather
    n_vb = triton.cdiv(V, f.BLOCK_V)
    # a bounded block of rows at a time: per-tile partials and the block's rows of h (in
    # ``order``), so that no buffer grows with N
    n_block = partial_rows(N, n_lse * n_vb, f.BLOCK_N)
    if order is not None:
        n_block = min(n_block, max(f.BLOCK_N, GATHER_BYTES // (D * h.element_size()) // f.BLOCK_N * f.BLOCK_N))
    part = torch.empty((n_block, n_lse, n_vb), dtype=torch.float32, device=dev)
    slots = _slot_list(index, V, tail_slots)
    for r0 in range(0, N, n_block):
        n = min(n_block, N - r0)
        hb = block_rows(h, order, r0, n)
        rows_slots = slots[r0:] if tail_slots else slots
        _lse_tile_kernel[(triton.cdiv(n, f.BLOCK_N) * n_vb,)](
            hb, hb.stride(0), hb.stride(1), w, w.stride(0), w.stride(1), bias,
            part, part.stride(0), part.stride(1), active[r0:],
            rows_slots, rows_slots.stride(0), tail_slots, int(tail_slots).bit_length(),
            n, V, D, sa, sb, cap,
            HAS_BIAS=b is not None, HAS_SOFTCAP=softcap is not None, TWO_SCALES=two, HAS_TAIL=tail_slots > 0,
            IEEE=ieee, INTERP_BF16=interp_bf16, EVEN_D=D % f.BLOCK_D == 0,
            BLOCK_N=f.BLOCK_N, BLOCK_V=f.BLOCK_V, BLOCK_D=f.BLOCK_D, GROUP=f.GROUP,
            **f.launch_options(),
        )
        torch.logsumexp(part[:n], dim=-1, out=lse[r0:r0 + n])
        if M > 0:
            rows_index, rows_out = index[r0:], gathered[r0:]
            _indexed_dot_kernel[(n,)](
                hb, hb.stride(0), hb.stride(1), w, w.stride(0), w.stride(1), bias,
                rows_index, rows_index.stride(0), rows_out, rows_out.stride(0),
                V, D, M, cap,
                HAS_BIAS=b is not None, HAS_SOFTCAP=softcap is not None,
                BLOCK_M=g.BLOCK_M, BLOCK_D=g.BLOCK_D, num_warps=g.num_warps,
            )
        del hb
    del part
    lse.masked_fill_(active[:, None] == 0, 0.0)
    return lse, gathered


def _sparse_values(index: torch.Tensor, g_gathered: torch.Tensor, gathered: torch.Tensor, lse: torch.Tensor,
                   g_lse: torch.Tensor, scales: tuple[float, ...], softcap: float | None, V: int,
                   tail_slots: int = 0):
    """Per row, the unique valid ids and the exact fp32 dz at them (no host sync).

    Returns ``uidx`` [N, M] int32 (each id at most once per row, -1 elsewhere),
    ``val`` [N, M] fp32 = (dense part + summed g_gathered) * chain, and ``gsp`` [N, M]
    fp32 = summed g_gathered * chain (the sparse part alone, for db)."""
    M = index.shape[1]
    is_slot = (torch.arange(M, device=index.device) < tail_slots).expand_as(index).to(torch.float32)
    merged = merge_duplicate_ids(index, torch.stack([g_gathered.float(), is_slot], dim=-1), V)
    keep = merged.ids >= 0
    tot = merged.sums[..., 0]
    zs = gathered.gather(1, merged.perm)
    dense = torch.zeros_like(zs)
    for k, s in enumerate(scales):
        g_k = g_lse[:, k:k + 1]
        lse_k = torch.where(g_k == 0, torch.full_like(g_k, torch.inf), lse[:, k:k + 1])   # no term: exp -> 0
        dense += (g_k * s) * torch.exp(zs * s - lse_k)
    if tail_slots:
        # the tail term (log-sum-exp outside the slots) reaches the ids that are not slots
        in_slots = merged.sums[..., 1] > 0
        s, k = scales[-1], len(scales)
        lr = lse[:, k:k + 1]
        g_r = g_lse[:, k:k + 1]
        lr = torch.where(torch.isinf(lr) | (g_r == 0), torch.full_like(lr, torch.inf), lr)   # no term: exp -> 0
        tail = (g_r * s) * torch.exp(zs * s - lr)
        dense += torch.where(in_slots, torch.zeros_like(tail), tail)
    if softcap is not None:
        tz = zs / softcap
        chain = 1.0 - tz * tz
    else:
        chain = torch.ones_like(zs)
    zero = torch.zeros_like(zs)
    val = torch.where(keep, (dense + tot) * chain, zero).contiguous()
    gsp = torch.where(keep, tot * chain, zero)
    uidx = merged.ids.to(torch.int32).contiguous()
    return uidx, val, gsp


def _sum_by_id(ids: torch.Tensor, vals: torch.Tensor, V: int) -> torch.Tensor:
    """``out[v] = sum(vals[ids == v])`` over all rows (ids outside [0, V) dropped),
    deterministic: one write per distinct id."""
    merged = merge_duplicate_ids(ids.reshape(1, -1), vals.reshape(1, -1), V)
    out = torch.zeros(V + 1, dtype=torch.float32, device=vals.device)
    keep = merged.ids[0] >= 0
    out.scatter_(0, torch.where(keep, merged.ids[0], torch.full_like(merged.ids[0], V)), merged.sums[0])
    return out[:V]


def linear_lse_gather_backward(h, w, b, index, scales, softcap, lse, gathered, g_lse, g_gathered,
                               need_h: bool, need_w: bool, need_b: bool, accum_fp32: bool, tail_slots: int = 0,
                               config: FusedConfig | None = None, active: torch.Tensor | None = None,
                               order: torch.Tensor | None = None, dw_from: int = 0):
    """Gradients (dh, dw, db) of ``lse`` / ``gathered``; None where not needed (``dw``: the
    columns ``dw_from:`` of w only, see ``slab_backward``).
    ``config``: the launch config (None: ``fused_config`` for the device); ``active``,
    ``order``: as in :func:`linear_lse_gather_forward` (``index``, ``lse``, ... and the
    upstream gradients in the problem's row order; ``dh`` comes back in ``h``'s). Rows that
    do not count get zero gradient and, with no upstream gradient either, a block of them
    does no matmul work."""
    N, D = h.shape
    V = w.shape[0]
    M = index.shape[1]
    dev = h.device
    need_b = need_b and b is not None
    if not (need_h or need_w or need_b):
        return None, None, None
    sa, sb, two = split_scales(scales)
    cfg = config or fused_config(target_capability(dev), h.dtype, M)
    products = check_backward_gemm(cfg.backward_gemm)
    interp_bf16 = is_interp_bf16(h)
    ieee = exact_fp32_dots(h)
    bias = b if b is not None else w
    cap = float(softcap) if softcap is not None else 1.0

    # rows that do not count get no gradient, whatever arrives for them
    counts = (row_activity(index, V) if active is None else active)[:, None] > 0
    g_lse = torch.where(counts, g_lse.float(), 0.0).contiguous()
    g_gathered = torch.where(counts, g_gathered.float(), 0.0)
    active = g_lse.ne(0).any(1)
    if M > 0:
        active = active | g_gathered.ne(0).any(1)
    active = active.to(torch.int32).contiguous()

    sparse = M > 0 and N > 0
    if sparse:
        uidx, val, gsp = _sparse_values(index, g_gathered, gathered, lse, g_lse, scales, softcap, V, tail_slots)
    slots = _slot_list(index, V, tail_slots)
    store_dz = need_h or need_w
    zc, fx = cfg.dz, cfg.fix

    def fill_slab(dz, dbp, r0, n_rows, v0, n_cols, h_rows):
        # the chunk's rows: h_rows holds them from its row 0, the per-row tensors from row r0
        grid = (triton.cdiv(n_rows, zc.BLOCK_N) * triton.cdiv(n_cols, zc.BLOCK_V),)
        lse_r, g_r, act_r = lse[r0:], g_lse[r0:], active[r0:]
        slots_r = slots[r0:] if tail_slots else slots
        _dz_tile_kernel[grid](
            h_rows, h_rows.stride(0), h_rows.stride(1), w, w.stride(0), w.stride(1), bias,
            lse_r, lse_r.stride(0), g_r, g_r.stride(0), act_r,
            dz, dz.stride(0), dbp, dbp.stride(0),
            slots_r, slots_r.stride(0), tail_slots, int(tail_slots).bit_length(),
            0, n_rows, v0, n_cols, D, sa, sb, cap,
            HAS_BIAS=b is not None, HAS_SOFTCAP=softcap is not None, TWO_SCALES=two, HAS_TAIL=tail_slots > 0,
            STORE_DZ=store_dz, STORE_DB=need_b,
            IEEE=ieee, INTERP_BF16=interp_bf16, EVEN_D=D % zc.BLOCK_D == 0,
            BLOCK_N=zc.BLOCK_N, BLOCK_V=zc.BLOCK_V, BLOCK_D=zc.BLOCK_D, GROUP=zc.GROUP,
            **zc.launch_options(),
        )
        if store_dz and sparse:
            _sparse_fix_kernel[(n_rows,)](
                uidx, uidx.stride(0), val, val.stride(0), dz, dz.stride(0),
                r0, v0, n_cols, M, INTERP_BF16=interp_bf16, BLOCK_M=fx.BLOCK_M, num_warps=fx.num_warps,
            )

    dh, dw, db32 = slab_backward(h, w, need_h, need_w, need_b, accum_fp32, active, zc, cfg.gemm, products,
                                 ieee, interp_bf16, fill_slab, order=order, dw_from=dw_from)
    db = None
    if need_b:
        if sparse:
            db32 += _sum_by_id(uidx, gsp, V)
        db = db32.to(b.dtype)
    return dh, dw, db


class LinearLSEGatherTriton(torch.autograd.Function):
    """``(h [N, D], w [V, D], b [V] | None, index [N, M]) -> (lse [N, T (+1)], gathered [N, M])``.

    Gradients only for the inputs that need them (a frozen ``w`` allocates no dW); the
    backward has no atomics and is bitwise reproducible. ``args`` (a :class:`PrimitiveArgs`):
    scales, softcap, tail_slots, accum_fp32 and ``config`` (a :class:`FusedConfig`, None:
    ``fused_config`` for the device), which forces a launch config, e.g. a GPU
    architecture's under the interpreter or ``backward_gemm="torch"``.
    ``u`` [N, r] / ``lora_b`` [V, r]: a low-rank segment of the contraction (logits
    ``[h | u] @ [w | lora_b].T``, docs/design.md sec. 17; the joined operands are
    transient copies, rebuilt in the backward, and a frozen ``w`` gets no dW columns).
    Rows whose index holds no id in [0, V) do not count: the rows are reordered
    active-first on the device (no host sync) so that those rows form whole tiles the
    kernels skip, and the outputs come back in the caller's order."""

    @staticmethod
    def forward(ctx, h, w, b, index, args: PrimitiveArgs, u=None, lora_b=None):
        tail_slots = min(int(args.tail_slots or 0), index.shape[1])
        # rows that count first, so that the rows that do not form whole tiles the
        # kernels skip (device-side: no host sync); h stays where it is: the kernels get
        # its rows in that order one bounded block at a time
        order, active = active_first(index, w.shape[0])
        index = index.index_select(0, order).contiguous()
        h2, w2 = _joined(h, w, u, lora_b)
        lse, gathered = linear_lse_gather_forward(h2, w2, b, index, args.scales, args.softcap, tail_slots,
                                                  args.config, active, order)
        del h2, w2
        ctx.save_for_backward(h, w, b, index, lse, gathered, order, active, u, lora_b)
        ctx.args, ctx.tail_slots = args, tail_slots
        return unpermute(lse, order), unpermute(gathered, order)

    @staticmethod
    def backward(ctx, g_lse, g_gathered):
        h, w, b, index, lse, gathered, order, active, u, lora_b = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_u, need_lb = (ctx.needs_input_grad + (False, False))[5:7]
        a = ctx.args
        D = h.shape[1]
        h2, w2 = _joined(h, w, u, lora_b)
        dh, dw, db = linear_lse_gather_backward(
            h2, w2, b, index, a.scales, a.softcap, lse, gathered,
            g_lse.index_select(0, order), g_gathered.index_select(0, order),
            need_h or need_u, need_w or need_lb, need_b, a.accum_fp32, ctx.tail_slots, a.config, active, order,
            dw_from=0 if need_w else D)
        if u is None:
            return dh, dw, db, None, None, None, None
        du = dh[:, D:] if need_u else None
        dlb = (dw[:, D:] if need_w else dw) if need_lb else None
        return dh[:, :D] if need_h else None, dw[:, :D] if need_w else None, db, None, None, du, dlb


def _joined(h, w, u, lora_b):
    """``(h, w)`` as the kernels read them: ``([h | u], [w | lora_b])`` with a low-rank
    segment, and ``w`` through ``tile_operand``."""
    if u is None:
        return h, tile_operand(w)
    return torch.cat([h, u], 1), torch.cat([w, lora_b], 1)
