"""PyTorch helpers shared by the op folders' chunked paths (``*/torch.py``): the primitive of
docs/design.md sec. 6 on one chunk of logits, its gradient, and logits formed in fp32.

Same contract as the Triton ops: per-row fp32 log-sum-exp at one or two scales
(1/temperature) -- plus, with ``tail_slots``, the log-sum-exp at the last scale over
the vocab outside the first ``tail_slots`` ids (the student's tail, exact instead of
``1 - Q``) -- and the (softcapped) logits gathered at M ids, with backward
passes that recompute each chunk of logits. Peak extra memory is
O(chunk_rows x V) fp32, never O(N x V) beyond the gradient being returned.

The fused path's logits are formed in fp32 from 16-bit operands (:func:`linear_fp32`),
never rounded to 16 bits before the fp32 softmax.
"""
from __future__ import annotations

import torch

from ..memory import UPCAST_SLAB_ELEMS, chunk_rows_for
from ..validation import compute_dtype
from ._common import row_activity

def chunk_rows(V: int, chunk_elems: int | None = None) -> int:
    """Rows per chunk of the lean strategy (``memory.LEAN_CHUNK_ELEMS // V`` by default)."""
    return chunk_rows_for("lean", V, None, chunk_elems)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """``a @ b`` of 16-bit operands as one fp32 result (fp32 accumulation, no 16-bit
    rounding) where torch has that kernel (``torch.mm(..., out_dtype=)``: CUDA, recent
    torch); else None."""
    if not a.is_cuda:
        return None
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except torch.cuda.OutOfMemoryError:
        raise
    except (TypeError, RuntimeError, NotImplementedError):     # no such overload or kernel
        return None


def linear_fp32(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Logits ``h @ w.T (+ b)`` in the compute dtype (docs/design.md, "Compute dtype").

    16-bit operands give fp32 logits that were never rounded to 16 bits: an fp32-output
    matmul where torch has one (CUDA), else the chunk's rows and one ``UPCAST_SLAB_ELEMS``
    slab of ``w`` at a time are upcast (the CPU): ``(rows + slab) x D`` fp32 transients,
    never a whole fp32 copy of ``w``.

    Args:
        h: [C, D]; w: [Vc, D] (same dtype); b: [Vc] or None.
    Returns:
        [C, Vc] fp32 (float64 for float64 inputs): a new tensor the caller may overwrite.
    """
    cdt = compute_dtype(h.dtype)
    if h.dtype == cdt and w.dtype == cdt:
        return torch.nn.functional.linear(h, w, b)
    z = _mm_fp32(h, w.t()) if cdt == torch.float32 and h.dtype == w.dtype else None
    if z is None:
        z = torch.empty((h.shape[0], w.shape[0]), dtype=cdt, device=h.device)
        hc = h.to(cdt)
        step = max(1, UPCAST_SLAB_ELEMS // max(w.shape[1], 1))
        for c0 in range(0, w.shape[0], step):
            torch.mm(hc, w[c0:c0 + step].to(cdt).t(), out=z[:, c0:c0 + step])
    if b is not None:
        z += b          # an fp32 add of the 16-bit bias: exact operands, one rounding
    return z


def chunk_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, u: torch.Tensor | None = None,
                lora_b: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`linear_fp32` of the chunk's rows, plus the low-rank segment ``u @ lora_b.T``
    when given (docs/design.md sec. 17): [C, Vc] in the compute dtype."""
    z = linear_fp32(h, w, b)
    if u is not None:
        z.addmm_(u.to(z.dtype), lora_b.to(z.dtype).t())
    return z


def active_rows(index: torch.Tensor, V: int) -> torch.Tensor | None:
    """Rows whose ``index`` row holds an id in [0, V) (docs/design.md sec. 10: the
    others do not count and are never projected).

    Args:
        index: [N, M] ids. V: the vocab size.
    Returns:
        int64 [A] row numbers, ascending, or None when every row is active (a host sync:
        the torch path's one).
    """
    ok = row_activity(index, V).bool()
    n_active = int(ok.sum())
    if n_active == index.shape[0]:
        return None
    return ok.nonzero().squeeze(1)


def row_chunks(n_rows: int, step: int, rows: torch.Tensor | None):
    """Chunks of at most ``step`` rows: slices of ``range(n_rows)`` when ``rows`` is
    None, else int64 sub-tensors of ``rows``."""
    if rows is None:
        for i in range(0, n_rows, step):
            yield slice(i, min(i + step, n_rows))
    else:
        for i in range(0, rows.numel(), step):
            yield rows[i:i + step]


def apply_softcap(z: torch.Tensor, softcap: float | None):
    if softcap is None:
        return z, None
    t = torch.tanh(z / softcap)
    return t * softcap, t



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


def lse_and_gather(z: torch.Tensor, idx: torch.Tensor, scales, tail_slots: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The primitive on one chunk: lse [C, T] and the logits gathered at idx [C, M]
    (0 where an id is out of [0, V)); z [C, V] in the compute dtype."""
    V = z.shape[-1]
    cols = [torch.logsumexp(z * s if s != 1.0 else z, dim=-1) for s in scales]
    if tail_slots:
        cols.append(torch.logsumexp(_rest_logits(z, idx, tail_slots, scales[-1]), dim=-1))
    lse = torch.stack(cols, dim=1)
    ok = (idx >= 0) & (idx < V)
    g = z.gather(1, idx.clamp(0, V - 1).long()).masked_fill_(~ok, 0.0)
    return lse, g


def logits_grad(z: torch.Tensor, t, idx, scales, lse, g_lse, g_gathered, tail_slots: int = 0, *,
                overwrite_z: bool = False) -> torch.Tensor:
    """Gradient w.r.t. the raw logits of one chunk (docs/design.md sec. 6), in z's dtype.

    Args:
        z: [C, V] (softcapped) logits in the compute dtype; t: tanh(z_raw / c) or None.
        idx: [C, M] ids; scales: the lse scales; lse: [C, T] from :func:`lse_and_gather`.
        g_lse: [C, T] and g_gathered: [C, M] upstream gradients.
        tail_slots: as in ``lse_and_gather``.
        overwrite_z: z is not needed afterwards: with one scale and no tail the softmax
            is formed in z's storage, in one pass (``exp(z * s - lse)``), no new [C, V].
    Returns:
        dz [C, V].
    """
    V = z.shape[-1]
    dz = None
    if overwrite_z and len(scales) == 1 and not tail_slots:
        s = scales[0]
        dz = (z.mul_(s) if s != 1.0 else z).sub_(lse[:, :1]).exp_().mul_((g_lse[:, :1] * s))
        scales = ()
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


def accumulate_chunk_grads(dz: torch.Tensor, r, h: torch.Tensor, w: torch.Tensor, dh, dw, db) -> None:
    """Add one chunk's logits gradient to dH / dW / db (each None when not wanted).

    Args:
        dz: [C, V] gradient of the chunk's logits (compute dtype); r: the chunk's rows
            (a slice or int64 row numbers); h: [N, D]; w: [V, D].
        dh: [N, D] written at rows r; dw: [V, D] accumulator (fp32 or w's dtype),
            updated in place (no [V, D] temporary); db: [V] fp32 accumulator.
    """
    if db is not None:
        db += dz.sum(0)
    dzc = dz if dz.dtype == h.dtype else dz.to(h.dtype)
    if dh is not None:
        if isinstance(r, slice) and dh.is_contiguous():
            torch.mm(dzc, w, out=dh[r])
        else:
            dh[r] = dzc @ w
    if dw is not None:
        hr = h[r]
        if dw.dtype == h.dtype:
            dw.addmm_(dzc.t(), hr)
        else:
            dw.addmm_(dz.t(), hr.to(dw.dtype))


def head_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, softcap: float | None, inv_temp: float,
                c0: int = 0, c1: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``softcap(h @ w[c0:c1].T + b[c0:c1]) * inv_temp`` in the compute dtype, and the
    softcap's ``tanh`` (None without a softcap) for the chain rule. The product is formed
    in fp32 from 16-bit operands (:func:`linear_fp32`), never rounded to 16 bits."""
    c1 = w.shape[0] if c1 is None else c1
    z = linear_fp32(h, w[c0:c1], None if b is None else b[c0:c1])
    th = None
    if softcap is not None:
        th = torch.tanh(z / softcap)
        z = th * softcap
    return z * inv_temp, th
