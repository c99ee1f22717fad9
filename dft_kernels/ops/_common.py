"""Small helpers shared by the op files (no kernels, no loss math)."""
from __future__ import annotations

import torch


def row_view(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """Describe the rows of ``x`` [..., V] without copying when possible.

    Returns ``(base, T, stride_b, stride_t)`` such that row ``r`` starts at
    ``base + (r // T) * stride_b + (r % T) * stride_t`` (unit stride along V).
    2-D tensors and 3-D tensors sliced along the sequence (``logits[:, :-1]``)
    are read in place; anything else is made contiguous first.
    """
    if x.stride(-1) != 1:
        x = x.contiguous()
    V = x.shape[-1]
    if x.dim() == 2:
        return x, max(x.shape[0], 1), 0, x.stride(0)
    try:
        x2 = x.view(-1, V)
        return x2, max(x2.shape[0], 1), 0, x2.stride(0)
    except RuntimeError:
        pass
    if x.dim() == 3:
        return x, max(x.shape[1], 1), x.stride(0), x.stride(1)
    x2 = x.reshape(-1, V)
    return x2, max(x2.shape[0], 1), 0, x2.stride(0)


def dedup_sparse_grad(index: torch.Tensor, g: torch.Tensor, V: int, n_slots: int = 0):
    """Merge gradient entries that hit the same column of a row.

    ``index`` [N, M] (``-1`` or out-of-range ids are dropped), ``g`` [N, M] fp32.
    Returns ``(uidx, ug, uslot)``: each id appears at most once per row (others are
    -1, with gradient 0), ``ug`` holds the summed gradient and ``uslot`` (int8) whether
    the id is among the first ``n_slots`` columns of its row. No host sync.
    """
    index = index.long()
    valid = (index >= 0) & (index < V)
    key = torch.where(valid, index, torch.full_like(index, V))
    sk, perm = key.sort(dim=1)
    gs = torch.where(valid, g, torch.zeros_like(g)).gather(1, perm)
    first = torch.ones_like(sk, dtype=torch.bool)
    first[:, 1:] = sk[:, 1:] != sk[:, :-1]
    seg = first.long().cumsum(1) - 1
    tot = torch.zeros_like(gs).scatter_add_(1, seg, gs)
    keep = first & (sk < V)
    uidx = torch.where(keep, sk, torch.full_like(sk, -1)).contiguous()
    ug = torch.where(keep, tot.gather(1, seg), torch.zeros_like(gs)).contiguous()
    is_slot = (torch.arange(index.shape[1], device=index.device) < n_slots).expand_as(index) & valid
    slot_hits = torch.zeros_like(gs).scatter_add_(1, seg, is_slot.gather(1, perm).to(gs.dtype))
    uslot = (keep & (slot_hits.gather(1, seg) > 0)).to(torch.int8).contiguous()
    return uidx, ug, uslot


#: Sentinel id for empty slots in a sorted slot list (larger than any vocab end).
SLOT_SENTINEL = 1 << 62


def sorted_slots(index: torch.Tensor, V: int, n_slots: int) -> torch.Tensor:
    """The first ``n_slots`` ids of each row, valid ones ascending, empty ones as
    ``SLOT_SENTINEL`` at the end ([N, n_slots] int64): kernels walk this list
    tile by tile to mask the teacher's slots out of the tail log-sum-exp."""
    slots = index[:, :n_slots].long()
    ok = (slots >= 0) & (slots < V)
    return torch.where(ok, slots, torch.full_like(slots, SLOT_SENTINEL)).sort(dim=1).values.contiguous()
