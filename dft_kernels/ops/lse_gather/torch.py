"""The logits path's primitive (docs/design.md sec. 6) in chunked PyTorch: the CPU path and
the fallback of the Triton kernels (``lse_gather/triton.py``). Peak extra memory is
O(chunk_rows x V) fp32, never O(N x V) beyond the gradient being returned."""
from __future__ import annotations

import torch

from ...validation import compute_dtype
from .._common import PrimitiveArgs, lse_columns, row_view
from .._torch_common import (apply_softcap, active_rows, chunk_rows, logits_grad, lse_and_gather, row_chunks)


def _rows(base: torch.Tensor, seq_len: int, r) -> torch.Tensor:
    """Rows ``r`` (a slice or int64 row numbers) of a logits tensor described by
    ``row_view`` as a [len(r), V] tensor."""
    if base.dim() == 2:
        return base[r]
    if isinstance(r, slice):
        r = torch.arange(r.start, r.stop, device=base.device)
    return base[r // seq_len, r % seq_len]


class LSEGatherTorch(torch.autograd.Function):
    """Logits path: ``x`` [..., V] (any float dtype, any row strides). Rows whose
    index holds no id in [0, V) are skipped: lse 0, gathered 0, gradient 0."""

    @staticmethod
    def forward(ctx, x, index, args: PrimitiveArgs):
        scales, softcap, chunk_elems, tail_slots = args.scales, args.softcap, args.chunk_elems, args.tail_slots
        base, seq_len, sb, _ = row_view(x)
        N, M = index.shape
        V = x.shape[-1]
        step = chunk_rows(V, chunk_elems)
        cdt = compute_dtype(x.dtype)
        rows = active_rows(index, V)
        lse = torch.zeros((N, lse_columns(scales, tail_slots)), dtype=cdt, device=x.device)
        gathered = torch.zeros((N, M), dtype=cdt, device=x.device)
        for r in row_chunks(N, step, rows):
            z, _ = apply_softcap(_rows(base, seq_len, r).to(cdt), softcap)
            lse[r], gathered[r] = lse_and_gather(z, index[r], scales, tail_slots)
        ctx.save_for_backward(x, index, lse, rows)
        ctx.args = args
        return lse, gathered

    @staticmethod
    def backward(ctx, g_lse, g_gathered):
        x, index, lse, rows = ctx.saved_tensors
        base, seq_len, sb, _ = row_view(x)
        N = index.shape[0]
        V = x.shape[-1]
        dx = (torch.empty if rows is None else torch.zeros)(x.shape, dtype=x.dtype, device=x.device)
        dx2 = dx.view(-1, V)
        a = ctx.args
        step = chunk_rows(V, a.chunk_elems)
        cdt = compute_dtype(x.dtype)
        g_lse = g_lse.to(cdt)
        g_gathered = g_gathered.to(cdt)
        for r in row_chunks(N, step, rows):
            z, t = apply_softcap(_rows(base, seq_len, r).to(cdt), a.softcap)
            dz = logits_grad(z, t, index[r], a.scales, lse[r], g_lse[r], g_gathered[r], a.tail_slots,
                             overwrite_z=z.untyped_storage().data_ptr() != x.untyped_storage().data_ptr())
            dx2[r] = dz.to(dx2.dtype)
        return dx, None, None
