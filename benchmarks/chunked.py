"""A small chunked PyTorch DFT loss, compiled with ``torch.compile``: the
"what would a user write with the compiler" baseline of the fused path.

Per chunk of rows it computes ``logits = h @ W.T`` in fp32, the log-sum-exp, the
logits at the label and at the teacher's ids, and the same per-row loss as
``dft_kernels`` with its defaults (forward KL on the K teacher slots plus the
tail bucket, ``+ lam * CE``). The chunk function is compiled once and wrapped in
``torch.utils.checkpoint`` so backward recomputes each chunk's logits instead of
keeping all of them. The tail uses ``1 - Q`` directly (the library uses a
log-space form), which agrees to fp32 rounding on ordinary data.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from dft_kernels.memory import LEAN_CHUNK_ELEMS as CHUNK_ELEMS  # fp32 logits per chunk, as the library's lean

IGNORE_INDEX = -100


def chunk_loss(h, w, idx, lp, lab, lam: float):
    """Sum over the chunk's rows of ``div + lam * ce`` (rows with an ignored label give 0)."""
    z = torch.nn.functional.linear(h, w).float()
    lse = torch.logsumexp(z, dim=-1)
    ok_lab = lab != IGNORE_INDEX
    zy = z.gather(1, torch.where(ok_lab, lab, torch.zeros_like(lab)).unsqueeze(1)).squeeze(1)
    zero = torch.zeros_like(lse)
    row = torch.where(ok_lab, lse - zy, zero) * lam
    if idx is not None:
        ok = idx >= 0
        lq = z.gather(1, idx.clamp(min=0)) - lse.unsqueeze(1)
        lp = lp.float()
        p = torch.where(ok, lp.exp(), torch.zeros_like(lp))
        q = torch.where(ok, lq.exp(), torch.zeros_like(lq))
        P, Q = p.sum(1), q.sum(1)
        slots = torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(1)
        tiny = torch.finfo(torch.float32).tiny
        p_tail = (1.0 - P).clamp(min=0.0)
        tail = p_tail * (torch.log((1.0 - P).clamp(min=tiny)) - torch.log((1.0 - Q).clamp(min=tiny)))
        div = slots + torch.where(p_tail > 0, tail, zero)
        row = row + torch.where(ok_lab & ok.any(1), div, zero)
    return row.sum()


class CompiledChunkedDFT:
    """``CompiledChunkedDFT(lam=..., V=...)(h, w, idx, lp, labels)`` -> mean loss."""

    def __init__(self, *, lam: float, V: int, chunk_elems: int = CHUNK_ELEMS):
        self.lam = float(lam)
        self.rows = max(1, chunk_elems // V)
        self.fn = torch.compile(chunk_loss, dynamic=False)

    def __call__(self, h, w, idx, lp, labels):
        N = h.shape[0]
        total = None
        for i in range(0, N, self.rows):
            j = min(i + self.rows, N)
            part = checkpoint(self.fn, h[i:j], w, None if idx is None else idx[i:j],
                              None if lp is None else lp[i:j], labels[i:j], self.lam, use_reentrant=False)
            total = part if total is None else total + part
        n = (labels != IGNORE_INDEX).sum().clamp(min=1)
        return total / n
