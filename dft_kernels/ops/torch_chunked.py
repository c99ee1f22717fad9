"""The primitive of docs/design.md sec. 6 in chunked PyTorch (CPU and any non-CUDA device).

Same contract as the Triton ops: per-row fp32 log-sum-exp at one or two scales
(1/temperature) -- plus, with ``tail_slots``, the log-sum-exp at the last scale over
the vocab outside the first ``tail_slots`` ids (the student's tail, exact instead of
``1 - Q``) -- and the (softcapped) logits gathered at M ids, with backward
passes that recompute each chunk of logits. Peak extra memory is
O(chunk_rows x V) fp32, never O(N x V) beyond the gradient being returned.
"""
from __future__ import annotations

import torch

from ._common import row_view

#: fp32 elements per chunk temporary (16 MiB); rows per chunk = this // V.
DEFAULT_CHUNK_ELEMS = 1 << 22


def chunk_rows(V: int, chunk_elems: int | None = None) -> int:
    return max(1, (chunk_elems or DEFAULT_CHUNK_ELEMS) // max(V, 1))


def _rows(base: torch.Tensor, seq_len: int, sb: int, i: int, j: int) -> torch.Tensor:
    """Rows i:j of a logits tensor described by ``row_view`` as a [j-i, V] tensor."""
    if base.dim() == 2:
        return base[i:j]
    r = torch.arange(i, j, device=base.device)
    return base[r // seq_len, r % seq_len]


def _softcap(z: torch.Tensor, softcap: float | None):
    if softcap is None:
        return z, None
    t = torch.tanh(z / softcap)
    return t * softcap, t


def _cdtype(t: torch.Tensor) -> torch.dtype:
    """Compute dtype: float64 stays float64 (gradcheck), everything else is fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _rest_logits(z: torch.Tensor, idx: torch.Tensor, tail_slots: int, s: float) -> torch.Tensor:
    """``z * s`` with the first ``tail_slots`` ids of each row set to -inf (the vocab
    outside the teacher's slots, whose log-sum-exp gives the student tail exactly).
    One extra column absorbs the empty / out-of-range slots; it is -inf too."""
    V = z.shape[-1]
    slots = idx[:, :tail_slots].long()
    ok = (slots >= 0) & (slots < V)
    zr = torch.nn.functional.pad(z * s if s != 1.0 else z, (0, 1), value=-torch.inf)
    zr.scatter_(1, torch.where(ok, slots, torch.full_like(slots, V)), -torch.inf)
    return zr


def _lse_and_gather(z: torch.Tensor, idx: torch.Tensor, scales, tail_slots: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    V = z.shape[-1]
    cols = [torch.logsumexp(z * s if s != 1.0 else z, dim=-1) for s in scales]
    if tail_slots:
        cols.append(torch.logsumexp(_rest_logits(z, idx, tail_slots, scales[-1]), dim=-1))
    lse = torch.stack(cols, dim=1)
    ok = (idx >= 0) & (idx < V)
    g = z.gather(1, idx.clamp(0, V - 1).long()).masked_fill_(~ok, 0.0)
    return lse, g


def _dz(z: torch.Tensor, t, idx, scales, lse, g_lse, g_gathered, tail_slots: int = 0) -> torch.Tensor:
    """fp32 gradient w.r.t. the raw logits of one chunk."""
    V = z.shape[-1]
    dz = None
    for k, s in enumerate(scales):
        p = torch.softmax(z * s if s != 1.0 else z, dim=-1)
        p.mul_((g_lse[:, k] * s).unsqueeze(1))
        dz = p if dz is None else dz.add_(p)
    if tail_slots:
        s = scales[-1]
        lr = lse[:, len(scales)].unsqueeze(1)
        p = (_rest_logits(z, idx, tail_slots, s) - torch.where(torch.isinf(lr), torch.zeros_like(lr), lr)).exp_()
        dz.add_(p[:, :V].mul_((g_lse[:, len(scales)] * s).unsqueeze(1)))
    ok = (idx >= 0) & (idx < V)
    dz.scatter_add_(1, idx.clamp(0, V - 1).long(), torch.where(ok, g_gathered, torch.zeros_like(g_gathered)))
    if t is not None:
        dz.mul_(1.0 - t * t)
    return dz


class LSEGatherTorch(torch.autograd.Function):
    """Logits path: ``x`` [..., V] (any float dtype, any row strides)."""

    @staticmethod
    def forward(ctx, x, index, scales, softcap, chunk_elems=None, tail_slots=0):
        base, seq_len, sb, _ = row_view(x)
        N, M = index.shape
        V = x.shape[-1]
        step = chunk_rows(V, chunk_elems)
        cdt = _cdtype(x)
        lse = torch.empty((N, len(scales) + (1 if tail_slots else 0)), dtype=cdt, device=x.device)
        gathered = torch.empty((N, M), dtype=cdt, device=x.device)
        for i in range(0, N, step):
            j = min(i + step, N)
            z, _ = _softcap(_rows(base, seq_len, sb, i, j).to(cdt), softcap)
            lse[i:j], gathered[i:j] = _lse_and_gather(z, index[i:j], scales, tail_slots)
        ctx.save_for_backward(x, index, lse)
        ctx.scales, ctx.softcap, ctx.chunk_elems, ctx.tail_slots = scales, softcap, chunk_elems, tail_slots
        return lse, gathered

    @staticmethod
    def backward(ctx, g_lse, g_gathered):
        x, index, lse = ctx.saved_tensors
        base, seq_len, sb, _ = row_view(x)
        N = index.shape[0]
        V = x.shape[-1]
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        dx2 = dx.view(-1, V)
        step = chunk_rows(V, ctx.chunk_elems)
        cdt = _cdtype(x)
        g_lse = g_lse.to(cdt)
        g_gathered = g_gathered.to(cdt)
        for i in range(0, N, step):
            j = min(i + step, N)
            z, t = _softcap(_rows(base, seq_len, sb, i, j).to(cdt), ctx.softcap)
            dx2[i:j] = _dz(z, t, index[i:j], ctx.scales, lse[i:j], g_lse[i:j], g_gathered[i:j], ctx.tail_slots)
        return dx, None, None, None, None, None


class LinearLSEGatherTorch(torch.autograd.Function):
    """Fused path: logits ``h @ W.T (+ b)`` recomputed chunk by chunk, never stored.

    Gradients are returned only for inputs that require them; dW / db accumulate
    in fp32 across chunks when ``accum_fp32`` (cast to the weight dtype at the end).
    """

    @staticmethod
    def forward(ctx, h, w, b, index, scales, softcap, chunk_elems=None, accum_fp32=True, tail_slots=0):
        N, M = index.shape
        V = w.shape[0]
        step = chunk_rows(V, chunk_elems)
        cdt = _cdtype(h)
        lse = torch.empty((N, len(scales) + (1 if tail_slots else 0)), dtype=cdt, device=h.device)
        gathered = torch.empty((N, M), dtype=cdt, device=h.device)
        for i in range(0, N, step):
            j = min(i + step, N)
            logits = torch.nn.functional.linear(h[i:j], w, b)
            z, _ = _softcap(logits.to(cdt), softcap)
            del logits
            lse[i:j], gathered[i:j] = _lse_and_gather(z, index[i:j], scales, tail_slots)
        ctx.save_for_backward(h, w, b, index, lse)
        ctx.scales, ctx.softcap, ctx.chunk_elems, ctx.accum_fp32 = scales, softcap, chunk_elems, accum_fp32
        ctx.tail_slots = tail_slots
        return lse, gathered

    @staticmethod
    def backward(ctx, g_lse, g_gathered):
        h, w, b, index, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        N = index.shape[0]
        V = w.shape[0]
        step = chunk_rows(V, ctx.chunk_elems)
        cdt = _cdtype(h)
        acc_dtype = cdt if ctx.accum_fp32 else w.dtype
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros(w.shape, dtype=acc_dtype, device=w.device) if need_w else None
        db = torch.zeros((V,), dtype=cdt, device=w.device) if (need_b and b is not None) else None
        g_lse = g_lse.to(cdt)
        g_gathered = g_gathered.to(cdt)
        for i in range(0, N, step):
            j = min(i + step, N)
            logits = torch.nn.functional.linear(h[i:j], w, b)
            z, t = _softcap(logits.to(cdt), ctx.softcap)
            del logits
            dz = _dz(z, t, index[i:j], ctx.scales, lse[i:j], g_lse[i:j], g_gathered[i:j], ctx.tail_slots)
            del z, t
            if db is not None:
                db += dz.sum(0)
            dzc = dz if dz.dtype == h.dtype else dz.to(h.dtype)
            if dh is not None:
                torch.mm(dzc, w, out=dh[i:j]) if dh.is_contiguous() else dh[i:j].copy_(dzc @ w)
            if dw is not None:  # accumulate in place: no [V, D] temporary per chunk
                if dw.dtype == h.dtype:
                    dw.addmm_(dzc.t(), h[i:j])
                else:
                    dw.addmm_(dz.t(), h[i:j].to(dw.dtype))
            del dz, dzc
        if dw is not None and dw.dtype != w.dtype:
            dw = dw.to(w.dtype)
        if db is not None:
            db = db.to(b.dtype)
        return dh, dw, db, None, None, None, None, None, None
