"""The fused linear path's primitive (docs/design.md sec. 6) in chunked PyTorch, strategy
"lean": the CPU path and the fallback of the Triton kernels (``linear/triton.py``).
Logits are recomputed chunk by chunk in fp32 (``_torch_common.linear_fp32``), never stored."""
from __future__ import annotations

import torch

from ...validation import compute_dtype
from .._common import PrimitiveArgs, lse_columns
from .._torch_common import (apply_softcap, accumulate_chunk_grads, active_rows, chunk_logits, chunk_rows, logits_grad,
                             lse_and_gather, row_chunks)


class LinearLSEGatherTorch(torch.autograd.Function):
    """Fused path (strategy "lean"): logits ``h @ W.T (+ b) (+ u @ B.T)`` recomputed chunk
    by chunk, never stored. Rows whose index holds no id in [0, V) are never projected.

    Gradients are returned only for inputs that require them; dW / db (and dB of the
    low-rank segment ``u`` [N, r], ``lora_b`` [V, r]) accumulate in fp32 across chunks
    when ``accum_fp32`` (cast to the weight dtype at the end).
    """

    @staticmethod
    def forward(ctx, h, w, b, index, args: PrimitiveArgs, u=None, lora_b=None):
        scales, softcap, tail_slots = args.scales, args.softcap, args.tail_slots
        N, M = index.shape
        V = w.shape[0]
        step = chunk_rows(V, args.chunk_elems)
        cdt = compute_dtype(h.dtype)
        rows = active_rows(index, V)
        lse = torch.zeros((N, lse_columns(scales, tail_slots)), dtype=cdt, device=h.device)
        gathered = torch.zeros((N, M), dtype=cdt, device=h.device)
        for r in row_chunks(N, step, rows):
            z, _ = apply_softcap(chunk_logits(h[r], w, b, None if u is None else u[r], lora_b), softcap)
            lse[r], gathered[r] = lse_and_gather(z, index[r], scales, tail_slots)
        ctx.save_for_backward(h, w, b, index, lse, rows, u, lora_b)
        ctx.args = args
        return lse, gathered

    @staticmethod
    def backward(ctx, g_lse, g_gathered):
        h, w, b, index, lse, rows, u, lora_b = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_u, need_lb = (ctx.needs_input_grad + (False, False))[5:7]
        a = ctx.args
        N = index.shape[0]
        V = w.shape[0]
        step = chunk_rows(V, a.chunk_elems)
        cdt = compute_dtype(h.dtype)
        acc_dtype = cdt if a.accum_fp32 else w.dtype

        def zeros_or_empty(t, need):
            return None if not need else (torch.empty_like(t) if rows is None else torch.zeros_like(t))
        dh, du = zeros_or_empty(h, need_h), zeros_or_empty(u, need_u)
        dw = torch.zeros(w.shape, dtype=acc_dtype, device=w.device) if need_w else None
        dlb = torch.zeros(lora_b.shape, dtype=acc_dtype, device=w.device) if need_lb else None
        db = torch.zeros((V,), dtype=cdt, device=w.device) if (need_b and b is not None) else None
        g_lse = g_lse.to(cdt)
        g_gathered = g_gathered.to(cdt)
        for r in row_chunks(N, step, rows):
            z, t = apply_softcap(chunk_logits(h[r], w, b, None if u is None else u[r], lora_b), a.softcap)
            dz = logits_grad(z, t, index[r], a.scales, lse[r], g_lse[r], g_gathered[r], a.tail_slots,
                             overwrite_z=True)
            del z, t
            accumulate_chunk_grads(dz, r, h, w, dh, dw, db)
            if u is not None:
                accumulate_chunk_grads(dz, r, u, lora_b, du, dlb, None)
            del dz
        dw, dlb = (g if g is None or g.dtype == w.dtype else g.to(w.dtype) for g in (dw, dlb))
        if db is not None:
            db = db.to(b.dtype)
        return dh, dw, db, None, None, du, dlb
