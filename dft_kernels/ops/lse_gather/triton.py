"""Logits path in Triton: per-row log-sum-exp (one or two temperatures) and the
logits gathered at M column ids, in one pass over vocab tiles; the backward pass
recomputes the softmax tile by tile and writes dlogits directly.

Primitive (docs/design.md sec. 6), for logits ``x`` of shape [N, V]:

    z = softcap * tanh(x / softcap)          (or z = x)
    lse[:, t]  = logsumexp(z * scales[t])   t < T (T = 1 or 2), fp32
    lse[:, T]  = logsumexp over j not in index[:, :tail_slots] of z_j * scales[-1]
                 (only when tail_slots > 0: the student's tail mass, computed exactly
                 rather than as 1 - Q; the sorted slot ids are walked tile by tile)
    gathered   = z[row, index[row, m]]       fp32, 0 where index is -1 or out of range

Backward: dz_j = sum_t g_lse[t] * scales[t] * softmax(z * scales[t])_j
                 (+ g_lse[T] * scales[-1] * softmax over the rest, 0 on slots)
                 + sum_m g_gathered[m] * [index_m == j],   dx = dz * dz/dx (softcap).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._common import PrimitiveArgs, lse_columns, merge_sparse_grad, row_view, sorted_slots, split_scales
from .._triton_common import _no_term_lse, _online_lse, _softcap, _tanh, target_capability


@triton.jit
def _row_offset(row, seq_len, stride_b, stride_t):
    return (row // seq_len) * stride_b + (row % seq_len) * stride_t


@triton.jit
def _slot_hits(slot_row, p, tail_slots, c, end, sentinel, BLOCK_V: tl.constexpr):
    """Mark the columns ``c`` of this tile that are teacher slots. ``slot_row`` is the
    row's ascending slot list and ``p`` the first entry not consumed yet; ids below
    ``end`` belong to this tile (on average K * BLOCK_V / V of them)."""
    hits = tl.zeros([BLOCK_V], dtype=tl.int32)
    nxt = tl.load(slot_row + p, mask=p < tail_slots, other=sentinel)
    while nxt < end:
        hits += (c == nxt).to(tl.int32)
        p += 1
        nxt = tl.load(slot_row + p, mask=p < tail_slots, other=sentinel)
    return hits, p


@triton.jit
def _row_counts(idx_row, V, M, BLOCK_M: tl.constexpr):
    """Whether the row's index holds an id in [0, V): a row without one does not count
    (lse 0, gathered 0, zero gradient) and its logits are not read."""
    offs = tl.arange(0, BLOCK_M)
    n_ok = tl.zeros([], dtype=tl.int32)
    for ms in range(0, M, BLOCK_M):
        mo = ms + offs
        idx = tl.load(idx_row + mo, mask=mo < M, other=-1)
        n_ok += tl.sum(((idx >= 0) & (idx < V)).to(tl.int32), axis=0)
    return n_ok > 0


@triton.jit
def _lse_gather_fwd_kernel(
    X, stride_xb, stride_xt, seq_len,
    IDX, stride_in,
    LSE, stride_ln,
    GATH, stride_gn,
    SLOT, stride_sn, tail_slots,
    V, M, scale_a, scale_b, softcap,
    TWO_SCALES: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TAIL: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_M: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + _row_offset(row, seq_len, stride_xb, stride_xt)
    slot_row = SLOT + row * stride_sn
    cols = tl.arange(0, BLOCK_V)
    scale_t = scale_b if TWO_SCALES else scale_a

    m_t = tl.zeros([], dtype=tl.float32) - float("inf")
    s_t = tl.zeros([], dtype=tl.float32)
    p = tl.zeros([], dtype=tl.int32)
    m_a = tl.zeros([], dtype=tl.float32) - float("inf")
    s_a = tl.zeros([], dtype=tl.float32)
    m_b = tl.zeros([], dtype=tl.float32) - float("inf")
    s_b = tl.zeros([], dtype=tl.float32)
    counts = _row_counts(IDX + row * stride_in, V, M, BLOCK_M)
    for start in range(0, tl.where(counts, V, 0), BLOCK_V):
        c = start + cols
        mask = c < V
        z = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = _softcap(z, softcap)
        m_a, s_a = _online_lse(m_a, s_a, tl.where(mask, z * scale_a, float("-inf")))
        if TWO_SCALES:
            m_b, s_b = _online_lse(m_b, s_b, tl.where(mask, z * scale_b, float("-inf")))
        if HAS_TAIL:
            hits, p = _slot_hits(slot_row, p, tail_slots, c, start + BLOCK_V, V + BLOCK_V, BLOCK_V)
            m_t, s_t = _online_lse(m_t, s_t, tl.where(mask & (hits == 0), z * scale_t, float("-inf")))
    tl.store(LSE + row * stride_ln, tl.where(counts, m_a + tl.log(s_a), 0.0))
    if TWO_SCALES:
        tl.store(LSE + row * stride_ln + 1, tl.where(counts, m_b + tl.log(s_b), 0.0))
    if HAS_TAIL:
        tl.store(LSE + row * stride_ln + (2 if TWO_SCALES else 1), tl.where(counts, m_t + tl.log(s_t), 0.0))

    offs = tl.arange(0, BLOCK_M)
    for ms in range(0, M, BLOCK_M):
        mo = ms + offs
        mmask = mo < M
        idx = tl.load(IDX + row * stride_in + mo, mask=mmask, other=-1).to(tl.int64)
        ok = mmask & (idx >= 0) & (idx < V)
        zg = tl.load(x_row + tl.where(ok, idx, 0), mask=ok, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            zg = _softcap(zg, softcap)
        tl.store(GATH + row * stride_gn + mo, tl.where(ok, zg, 0.0), mask=mmask)


@triton.jit
def _lse_gather_bwd_kernel(
    X, stride_xb, stride_xt, seq_len,
    DX, stride_dn,
    LSE, stride_ln, GLSE, stride_gln,
    IDX, stride_in, GG, stride_ggn, IS_SLOT, stride_isn,
    SLOT, stride_sn, tail_slots,
    V, M, scale_a, scale_b, softcap,
    TWO_SCALES: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TAIL: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_M: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + _row_offset(row, seq_len, stride_xb, stride_xt)
    dx_row = DX + row * stride_dn
    slot_row = SLOT + row * stride_sn
    cols = tl.arange(0, BLOCK_V)
    scale_t = scale_b if TWO_SCALES else scale_a
    p = tl.zeros([], dtype=tl.int32)
    lse_r = tl.zeros([], dtype=tl.float32)
    g_r = tl.zeros([], dtype=tl.float32)
    if HAS_TAIL:
        lse_r = tl.load(LSE + row * stride_ln + (2 if TWO_SCALES else 1))
        g_r = tl.load(GLSE + row * stride_gln + (2 if TWO_SCALES else 1)) * scale_t

    lse_a = tl.load(LSE + row * stride_ln)
    g_a = tl.load(GLSE + row * stride_gln) * scale_a
    lse_b = lse_a
    g_b = g_a * 0.0
    if TWO_SCALES:
        lse_b = tl.load(LSE + row * stride_ln + 1)
        g_b = tl.load(GLSE + row * stride_gln + 1) * scale_b
    # a row that does not count: zero gradient, its logits not read (its lse is 0)
    counts = _row_counts(IDX + row * stride_in, V, M, BLOCK_M)
    g_a = tl.where(counts, g_a, 0.0)
    g_b = tl.where(counts, g_b, 0.0)
    g_r = tl.where(counts, g_r, 0.0)
    # a term without upstream gradient (or an empty tail) contributes exactly 0
    lse_a = _no_term_lse(lse_a, g_a)
    lse_b = _no_term_lse(lse_b, g_b)
    lse_r = _no_term_lse(lse_r, g_r)

    # dense part: the softmax term, recomputed tile by tile
    v_read = tl.where(counts, V, 0)
    for start in range(0, V, BLOCK_V):
        c = start + cols
        mask = c < V
        x = tl.load(x_row + c, mask=c < v_read, other=0.0).to(tl.float32)
        z = x
        if HAS_SOFTCAP:
            t = _tanh(x / softcap)
            z = softcap * t
        dz = g_a * tl.exp(z * scale_a - lse_a)
        if TWO_SCALES:
            dz += g_b * tl.exp(z * scale_b - lse_b)
        if HAS_TAIL:
            hits, p = _slot_hits(slot_row, p, tail_slots, c, start + BLOCK_V, V + BLOCK_V, BLOCK_V)
            dz += tl.where(hits == 0, g_r * tl.exp(z * scale_t - lse_r), 0.0)
        if HAS_SOFTCAP:
            dz = dz * (1.0 - t * t)
        tl.store(dx_row + c, dz.to(DX.dtype.element_ty), mask=mask)

    # every dense store of this program must land before the sparse fix-up below
    tl.debug_barrier()

    # sparse part: ids are unique per row (deduplicated by the launcher), so the
    # full fp32 value at each id is recomputed and stored once
    offs = tl.arange(0, BLOCK_M)
    for ms in range(0, M, BLOCK_M):
        mo = ms + offs
        mmask = mo < M
        idx = tl.load(IDX + row * stride_in + mo, mask=mmask, other=-1).to(tl.int64)
        ok = mmask & (idx >= 0) & (idx < V)
        safe = tl.where(ok, idx, 0)
        gg = tl.load(GG + row * stride_ggn + mo, mask=ok, other=0.0).to(tl.float32)
        x = tl.load(x_row + safe, mask=ok, other=0.0).to(tl.float32)
        z = x
        if HAS_SOFTCAP:
            t = _tanh(x / softcap)
            z = softcap * t
        dz = g_a * tl.exp(z * scale_a - lse_a) + gg
        if TWO_SCALES:
            dz += g_b * tl.exp(z * scale_b - lse_b)
        if HAS_TAIL:
            us = tl.load(IS_SLOT + row * stride_isn + mo, mask=ok, other=1)
            dz += tl.where(us == 0, g_r * tl.exp(z * scale_t - lse_r), 0.0)
        if HAS_SOFTCAP:
            dz = dz * (1.0 - t * t)
        tl.store(dx_row + safe, dz.to(DX.dtype.element_ty), mask=ok)


#: Upper bound of the vocab tile (tests lower it to exercise many tiles at small V).
MAX_BLOCK_V = 8192


@dataclass(frozen=True)
class LogitsConfig:
    """Launch parameters of the logits path (one program per row)."""
    BLOCK_V: int
    BLOCK_M: int
    fwd_warps: int
    bwd_warps: int
    #: the backward's vocab tile (at most 2048: see :func:`lse_gather_config`)
    BWD_BLOCK_V: int


def lse_gather_config(capability: tuple[int, int] | None, dtype: torch.dtype, V: int, M: int) -> LogitsConfig:
    """Block sizes and warps of both kernels: the one place they are chosen.

    Args:
        capability: the GPU's compute capability, e.g. (8, 0) or (9, 0); None for the
            Triton interpreter on the CPU.
        dtype: the logits' dtype; V: vocab size; M: gathered columns per row.
    Returns:
        The :class:`LogitsConfig`.

    The backward keeps about four [BLOCK_V] fp32 vectors live (x, z, dz, one exponent);
    at 16 warps a thread may hold at most 128 registers and the 8192-wide tile spills
    on sm_90a, so it runs at 8 warps; at 8192 wide it used 254-255 registers, and the
    check that skips rows without an id pushed it over (8-28 spill bytes); 4096 wide
    still spilled 8 bytes in six variants (ptxas aiming at 128 registers), so its tile
    is at most 2048 wide: at most 81 registers, several programs per SM to hide the
    memory latency. The forward holds fewer values and keeps 16 warps and the
    8192-wide tile for the memory bandwidth."""
    del capability, dtype   # the same on every architecture and dtype (docs/design.md sec. 13)
    block_v = min(triton.next_power_of_2(V), MAX_BLOCK_V)
    block_m = min(triton.next_power_of_2(max(M, 1)), 256)
    fwd_warps = 16 if block_v >= 8192 else (8 if block_v >= 2048 else 4)
    return LogitsConfig(BLOCK_V=block_v, BLOCK_M=block_m, fwd_warps=fwd_warps, bwd_warps=min(fwd_warps, 8),
                        BWD_BLOCK_V=min(block_v, 2048))


def lse_gather_forward(x: torch.Tensor, index: torch.Tensor, scales: tuple[float, ...],
                       softcap: float | None, tail_slots: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. ``x`` is [..., V]; its rows are read in place."""
    xv, seq_len, sb, st = row_view(x)
    V = x.shape[-1]
    N = index.shape[0]
    M = index.shape[1]
    sa, sbb, two = split_scales(scales)
    lse = torch.empty((N, lse_columns(scales, tail_slots)), dtype=torch.float32, device=x.device)
    gathered = torch.empty((N, M), dtype=torch.float32, device=x.device)
    if N == 0:
        return lse, gathered
    slots = sorted_slots(index, V, max(tail_slots, 1))
    cfg = lse_gather_config(target_capability(x.device), x.dtype, V, M)
    _lse_gather_fwd_kernel[(N,)](
        xv, sb, st, seq_len, index, index.stride(0), lse, lse.stride(0), gathered, gathered.stride(0),
        slots, slots.stride(0), tail_slots,
        V, M, sa, sbb, float(softcap or 1.0),
        TWO_SCALES=two, HAS_SOFTCAP=softcap is not None, HAS_TAIL=tail_slots > 0,
        BLOCK_V=cfg.BLOCK_V, BLOCK_M=cfg.BLOCK_M, num_warps=cfg.fwd_warps,
    )
    return lse, gathered


def lse_gather_backward(x: torch.Tensor, index: torch.Tensor, scales: tuple[float, ...],
                        softcap: float | None, lse: torch.Tensor, g_lse: torch.Tensor,
                        g_gathered: torch.Tensor, tail_slots: int = 0) -> torch.Tensor:
    """Launch the backward kernel; returns dlogits with the shape and dtype of ``x``."""
    xv, seq_len, sb, st = row_view(x)
    V = x.shape[-1]
    N, M = index.shape
    sa, sbb, two = split_scales(scales)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if N == 0:
        return dx
    uidx, ug, is_slot = merge_sparse_grad(index, g_gathered.float(), V, tail_slots)
    slots = sorted_slots(index, V, max(tail_slots, 1))
    g_lse = g_lse.float().contiguous()
    cfg = lse_gather_config(target_capability(x.device), x.dtype, V, M)
    _lse_gather_bwd_kernel[(N,)](
        xv, sb, st, seq_len, dx, V, lse, lse.stride(0), g_lse, g_lse.stride(0),
        uidx, uidx.stride(0), ug, ug.stride(0), is_slot, is_slot.stride(0),
        slots, slots.stride(0), tail_slots,
        V, M, sa, sbb, float(softcap or 1.0),
        TWO_SCALES=two, HAS_SOFTCAP=softcap is not None, HAS_TAIL=tail_slots > 0,
        BLOCK_V=cfg.BWD_BLOCK_V, BLOCK_M=cfg.BLOCK_M, num_warps=cfg.bwd_warps,
    )
    return dx


class LSEGatherTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, index, args: PrimitiveArgs):
        scales, softcap, tail_slots = args.scales, args.softcap, args.tail_slots
        lse, gathered = lse_gather_forward(x, index, scales, softcap, tail_slots)
        ctx.save_for_backward(x, index, lse)
        ctx.args = args
        return lse, gathered

    @staticmethod
    def backward(ctx, g_lse, g_gathered):
        x, index, lse = ctx.saved_tensors
        a = ctx.args
        dx = lse_gather_backward(x, index, a.scales, a.softcap, lse, g_lse, g_gathered, a.tail_slots)
        return dx, None, None
