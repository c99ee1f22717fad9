"""A teacher's top-k from hidden states in chunked PyTorch (docs/design.md sec. 11): the CPU
path and the fallback of the Triton kernel (``teacher_topk/triton.py``).

:func:`chunked_topk`: the top-k ids and full-vocab log-probs, one [rows, chunk_vocab]
logits tile at a time (running top-k and log-sum-exp); no [N, V] tensor.
"""
from __future__ import annotations

import torch

from .._torch_common import head_logits

#: Largest k the Triton top-k kernel keeps in registers; larger k runs :func:`chunked_topk`
#: (a [64, k] buffer of values and ids per program: at k = 256 it spills hundreds of bytes
#: on sm_80 and sm_90a, see ``python -m dft_kernels.tools.compile_check --op teacher_topk``).
MAX_TRITON_K = 64


def sort_slots(index: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order each row's slots by value descending, ties by ascending id ([N, k] each)."""
    by_id = index.argsort(dim=1, stable=True)
    index, values = index.gather(1, by_id), values.gather(1, by_id)
    by_value = values.argsort(dim=1, descending=True, stable=True)
    return index.gather(1, by_value), values.gather(1, by_value)


def _tile_topk(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``z.topk(k)`` with ties at the k-th value resolved to the lower ids (``torch.topk``
    leaves that open): rows with such a tie take a stable sort instead."""
    vals, ids = z.topk(k, dim=-1)
    kth = vals[:, -1:]
    torn = (z == kth).sum(-1) > (vals == kth).sum(-1)
    if bool(torn.any()):
        rows = torn.nonzero().squeeze(1)
        sv, si = z[rows].sort(dim=-1, descending=True, stable=True)
        vals[rows], ids[rows] = sv[:, :k], si[:, :k]
    return vals, ids


def chunked_topk(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, k: int, inv_temp: float,
                 softcap: float | None, *, chunk_vocab: int = 8192, chunk_rows: int = 4096
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of ``log_softmax`` over the full vocab from hidden states.

    Args:
        h: [N, D] hidden states (logit scale folded in); w: [V, D]; b: [V] or None.
        k: slots per row, 1 <= k <= V; inv_temp: 1 / temperature; softcap: or None.
        chunk_vocab, chunk_rows: tile size of the [rows, vocab] logits.
    Returns:
        ``index`` [N, k] int32, ``logprobs`` [N, k] fp32 (value descending, ties by
        ascending id) and ``lse`` [N] fp32.
    """
    N, V = h.shape[0], w.shape[0]
    index = torch.empty((N, k), dtype=torch.int32, device=h.device)
    logprobs = torch.empty((N, k), dtype=torch.float32, device=h.device)
    lse_out = torch.empty((N,), dtype=torch.float32, device=h.device)
    for r0 in range(0, N, chunk_rows):
        hr = h[r0:r0 + chunk_rows]
        rows = hr.shape[0]
        best_v = torch.empty(rows, 0, dtype=torch.float32, device=h.device)
        best_i = torch.empty(rows, 0, dtype=torch.int64, device=h.device)
        lse = torch.full((rows,), -torch.inf, dtype=torch.float32, device=h.device)
        for c0 in range(0, V, chunk_vocab):
            c1 = min(V, c0 + chunk_vocab)
            z, _ = head_logits(hr, w, b, softcap, inv_temp, c0, c1)
            z = z.float()
            lse = torch.logaddexp(lse, torch.logsumexp(z, dim=-1))
            vals, ids = _tile_topk(z, min(k, c1 - c0))
            best_i, best_v = sort_slots(torch.cat([best_i, ids + c0], 1), torch.cat([best_v, vals], 1))
            best_i, best_v = best_i[:, :k], best_v[:, :k]
        index[r0:r0 + rows] = best_i.to(torch.int32)
        logprobs[r0:r0 + rows] = best_v - lse.unsqueeze(-1)
        lse_out[r0:r0 + rows] = lse
    return index, logprobs, lse_out
