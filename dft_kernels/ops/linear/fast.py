"""Strategy "fast" of the fused path (docs/design.md sec. 10): each chunk of logits once.

Rows go in chunks of C. For each chunk the logits ``h[r] @ W.T (+ b)`` [C, V] are formed
once, in fp32 from 16-bit operands (``_torch_common.linear_fp32``: never rounded to 16
bits); the primitive of docs/design.md sec. 6 (lse, gathered) runs on them -- the Triton
logits-path kernels (``ops/lse_gather/triton.py``) for ``impl="triton"``, chunked PyTorch
otherwise; the caller's per-row loss turns the chunk's small [C, T] / [C, M] tensors into
a scalar and autograd on those small tensors gives the upstream gradients; the logits
gradient follows, and dH, dW, db are formed right there. The backward only scales them by
the incoming scalar gradient: matmul work 6*N*D*V (4*N*D*V with a frozen head) instead of
the lean strategy's 8*N*D*V, at the memory of one [C, V] chunk plus dW held from the
forward to the backward.

The op knows nothing of losses: the loss is a callable. Calling it::

    def chunk_loss(lse, gathered, rows):
        # lse [C, T], gathered [C, M] (differentiable leaves), rows: the chunk's row
        # numbers (a slice or int64 tensor into the full [N] rows);
        # return this chunk's scalar share of the loss, e.g. sum(l_t) / n_counted
        ...
    args = PrimitiveArgs(scales, softcap, tail_slots, accum_fp32, chunk_rows=chunk_rows)
    loss, lse, gathered = FastLinearLoss.apply(h, w, b, index, args, chunk_loss, "torch")

``loss`` is the sum of the chunks' shares (differentiable w.r.t. h, w, b); ``lse`` and
``gathered`` [N, ...] are returned detached for logging. Rows whose index holds no id in
[0, V) are never projected (lse 0, gathered 0, gradient 0) and never passed to the loss.
"""
from __future__ import annotations

import torch

from ...validation import compute_dtype
from .._common import DOUBLE_BACKWARD_ERROR, PrimitiveArgs, lse_columns

from .._torch_common import (apply_softcap, accumulate_chunk_grads, active_rows, chunk_logits, lse_and_gather,
                            logits_grad, row_chunks)



def _upstream(chunk_loss, lse: torch.Tensor, gathered: torch.Tensor, r):
    """(loss share, d share / d lse, d share / d gathered) by autograd on the small tensors."""
    lse_leaf = lse.detach().requires_grad_(True)
    gathered_leaf = gathered.detach().requires_grad_(True)
    with torch.enable_grad():
        share = chunk_loss(lse_leaf, gathered_leaf, r)
    if not share.requires_grad:
        return share.detach(), torch.zeros_like(lse), torch.zeros_like(gathered)
    g_lse, g_gathered = torch.autograd.grad(share, (lse_leaf, gathered_leaf), allow_unused=True)
    g_lse = torch.zeros_like(lse) if g_lse is None else g_lse
    g_gathered = torch.zeros_like(gathered) if g_gathered is None else g_gathered
    return share.detach(), g_lse, g_gathered


def _chunk_torch(logits, idx, scales, softcap, tail_slots, chunk_loss, r, cdt):
    """One chunk in PyTorch: the softmax is formed in the logits' own storage."""
    z, t = apply_softcap(logits, softcap)
    if len(scales) == 1 and not tail_slots:
        return _chunk_torch_one_scale(z, t, idx, scales[0], chunk_loss, r)
    lse, gathered = lse_and_gather(z, idx, scales, tail_slots)
    share, g_lse, g_gathered = _upstream(chunk_loss, lse, gathered, r)
    dz = logits_grad(z, t, idx, scales, lse, g_lse, g_gathered, tail_slots, overwrite_z=True)
    return share, lse, gathered, dz


def _chunk_torch_one_scale(z, t, idx, scale: float, chunk_loss, r):
    """One scale, no tail (e.g. plain cross-entropy): five passes over the chunk, all in
    z's storage -- row max, ``exp(s*z - max)`` in place, its row sum, then the scaled
    softmax times the upstream gradient, in place again."""
    V = z.shape[-1]
    ok = (idx >= 0) & (idx < V)
    gathered = z.gather(1, idx.clamp(0, V - 1).long()).masked_fill_(~ok, 0.0)
    zs = z.mul_(scale) if scale != 1.0 else z
    row_max = zs.amax(1, keepdim=True)
    e = zs.sub_(row_max).exp_()
    row_sum = e.sum(1, keepdim=True)
    lse = row_max + row_sum.log()
    share, g_lse, g_gathered = _upstream(chunk_loss, lse, gathered, r)
    dz = e.mul_(g_lse * scale / row_sum)
    dz.scatter_add_(1, idx.clamp(0, V - 1).long(), torch.where(ok, g_gathered, torch.zeros_like(g_gathered)))
    if t is not None:
        dz.mul_(1.0 - t * t)
    return share, lse, gathered, dz


def _chunk_triton(logits, idx, scales, softcap, tail_slots, chunk_loss, r, cdt):
    """One chunk through the Triton logits-path op and its backward."""
    from ..lse_gather.triton import LSEGatherTriton
    x = logits.detach().requires_grad_(True)
    with torch.enable_grad():
        lse, gathered = LSEGatherTriton.apply(x, idx, PrimitiveArgs(tuple(scales), softcap, tail_slots))
    share, g_lse, g_gathered = _upstream(chunk_loss, lse, gathered, r)
    (dz,) = torch.autograd.grad((lse, gathered), x, (g_lse, g_gathered))
    return share, lse.detach(), gathered.detach(), dz.to(cdt)


class FastLinearLoss(torch.autograd.Function):
    """Scalar loss of a fused linear head with its gradients formed in the forward.

    ``forward(h [N, D], w [V, D], b [V] | None, index [N, M], args, chunk_loss, impl, u, lora_b)``
    -> ``(loss [], lse [N, T], gathered [N, M])`` (``args``: a :class:`PrimitiveArgs` with
    ``chunk_rows``; ``u`` [N, r] / ``lora_b`` [V, r]: a low-rank segment or None); only
    ``loss`` is differentiable. See the module docstring for ``chunk_loss``.
    """

    @staticmethod
    def forward(ctx, h, w, b, index, args: PrimitiveArgs, chunk_loss, impl, u=None, lora_b=None):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_u, need_lb = (ctx.needs_input_grad + (False, False))[7:9]
        scales, softcap, tail_slots, accum_fp32 = args.scales, args.softcap, args.tail_slots, args.accum_fp32
        if impl == "triton":
            from .triton import _check
            _check(h, w, b, index)
        N, M = index.shape
        V = w.shape[0]
        cdt = compute_dtype(h.dtype)
        rows = active_rows(index, V)
        lse = torch.zeros((N, lse_columns(scales, tail_slots)), dtype=cdt, device=h.device)
        gathered = torch.zeros((N, M), dtype=cdt, device=h.device)
        dh = torch.zeros_like(h) if need_h else None
        dw = torch.zeros(w.shape, dtype=cdt if accum_fp32 else w.dtype, device=w.device) if need_w else None
        db = torch.zeros((V,), dtype=cdt, device=w.device) if (need_b and b is not None) else None
        du = torch.zeros_like(u) if need_u else None
        dlb = torch.zeros(lora_b.shape, dtype=cdt if accum_fp32 else w.dtype, device=w.device) if need_lb else None
        loss = torch.zeros((), dtype=cdt, device=h.device)
        run_chunk = _chunk_triton if impl == "triton" else _chunk_torch
        for r in row_chunks(N, max(1, int(args.chunk_rows)), rows):
            # fp32 from 16-bit operands, never rounded to 16 bits
            logits = chunk_logits(h[r], w, b, None if u is None else u[r], lora_b)
            share, lse[r], gathered[r], dz = run_chunk(logits, index[r], scales, softcap, tail_slots, chunk_loss,
                                                       r, cdt)
            del logits
            loss += share
            accumulate_chunk_grads(dz, r, h, w, dh, dw, db)
            if u is not None:
                accumulate_chunk_grads(dz, r, u, lora_b, du, dlb, None)
            del dz
        ctx.grads = (dh, dw, db, du, dlb)
        ctx.dtypes = (h.dtype, w.dtype, None if b is None else b.dtype, None if u is None else u.dtype,
                      None if lora_b is None else lora_b.dtype)
        ctx.mark_non_differentiable(lse, gathered)
        return loss, lse, gathered

    @staticmethod
    def backward(ctx, g_loss, _g_lse, _g_gathered):
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD_ERROR)
        if ctx.grads is None:
            raise RuntimeError("strategy='fast' hands its gradients out once; a second backward through the "
                               "same graph (retain_graph=True) needs strategy='lean'")
        grads, ctx.grads = ctx.grads, None
        out = []
        for g, dtype in zip(grads, ctx.dtypes):
            if g is None:
                out.append(None)
                continue
            g = g.mul_(g_loss.to(g.dtype))   # the held gradient is ours: scaled in place, no copy
            out.append(g if g.dtype == dtype else g.to(dtype))
        dh, dw, db, du, dlb = out
        return dh, dw, db, None, None, None, None, du, dlb
