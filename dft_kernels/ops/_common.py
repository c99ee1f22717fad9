"""Small helpers shared by the op files (no kernels, no loss math)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ..memory import PARTIAL_BYTES
from ..validation import compute_dtype


#: The error of a second backward through a graph of the fast strategy (docs/design.md sec. 10).
DOUBLE_BACKWARD_ERROR = ("strategy='fast' forms the gradients in the forward and cannot differentiate them "
                         "again (create_graph=True / double backward); use strategy='lean'")


@dataclass(frozen=True)
class PrimitiveArgs:
    """The options of the primitive's autograd Functions (docs/design.md sec. 6), one frozen
    object instead of positional arguments.

    Attributes:
        scales: one or two scales (1 / temperature) of the log-sum-exp.
        softcap: ``c`` of ``c * tanh(z / c)``, or None.
        tail_slots: with ``> 0``, the tail's lse column over the vocab outside each row's
            first ``tail_slots`` ids.
        accum_fp32: accumulate dW (and dH) in fp32 for 16-bit inputs (fused path).
        chunk_elems: elements per chunk of the chunked PyTorch paths (None: their default).
        chunk_rows: rows per chunk of the fast strategy.
        config: a launch config forcing the Triton kernels' (e.g. a GPU's under the
            interpreter); None: the device's.
    """
    scales: tuple[float, ...]
    softcap: float | None = None
    tail_slots: int = 0
    accum_fp32: bool = True
    chunk_elems: int | None = None
    chunk_rows: int = 0
    config: Any = None


@dataclass(frozen=True)
class TwoHeadArgs:
    """The options of the two-head divergence's autograd Functions: each head's softcap
    (``cap`` the student's, ``cap_t`` the teacher's, None for none), ``inv_temp`` = 1 /
    temperature, ``kind`` ("forward_kl" | "reverse_kl" | "jsd") and the JSD ``beta``."""
    cap: float | None
    cap_t: float | None
    inv_temp: float
    kind: str
    beta: float


def lse_columns(scales: tuple[float, ...], tail_slots: int) -> int:
    """Columns of the primitive's ``lse`` (docs/design.md sec. 6): one per scale, then the
    tail's when ``tail_slots > 0``."""
    return len(scales) + (1 if tail_slots else 0)


def split_scales(scales: tuple[float, ...]) -> tuple[float, float, bool]:
    """The kernels' view of one or two log-sum-exp scales: ``(scale_a, scale_b, two)``."""
    if len(scales) == 1:
        return float(scales[0]), 1.0, False
    if len(scales) == 2:
        return float(scales[0]), float(scales[1]), True
    raise ValueError(f"scales must hold 1 or 2 values, got {len(scales)}")


def row_view(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """Describe the rows of ``x`` [..., V] without copying when possible.

    Returns ``(base, seq_len, stride_b, stride_t)`` such that row ``r`` starts at
    ``base + (r // seq_len) * stride_b + (r % seq_len) * stride_t`` (unit stride along V).
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


class MergedIds(NamedTuple):
    """What :func:`merge_duplicate_ids` returns, in each row's sorted order.

    ``ids`` [N, M] int64: each valid id once per row (at the last entry of its run),
    -1 elsewhere; ``sums`` [N, M, ...] the values summed over the run (0 elsewhere);
    ``perm`` [N, M]: entry j of a row came from column ``perm[j]`` of the input, so
    ``other.gather(1, perm)`` lines any other per-entry tensor up with ``ids``."""

    ids: torch.Tensor
    sums: torch.Tensor
    perm: torch.Tensor


def merge_duplicate_ids(index: torch.Tensor, values: torch.Tensor, V: int) -> MergedIds:
    """Merge entries of a row that hold the same id, summing their values.

    Args:
        index: [N, M] integer ids; ids outside [0, V) (e.g. -1, empty) are dropped.
        values: [N, M] or [N, M, C] floats (C value columns summed together).
        V: the vocab size.
    Returns:
        :class:`MergedIds` (ids, sums, perm). Deterministic -- a stable sort and a float64
        prefix sum minus the prefix before each run, no scatter_add -- and no host sync.
        Sums are float64 for float64 values, float32 otherwise.
    """
    idx = index.long()
    valid = (idx >= 0) & (idx < V)
    key = torch.where(valid, idx, torch.full_like(idx, V))
    sk, perm = torch.sort(key, dim=1, stable=True)
    extra = values.dim() - 2
    vexp = lambda t: t.reshape(t.shape + (1,) * extra).expand(t.shape + values.shape[2:])  # noqa: E731
    v = torch.where(vexp(valid), values, torch.zeros_like(values)).gather(1, vexp(perm)).double()
    first = torch.ones_like(sk, dtype=torch.bool)
    first[:, 1:] = sk[:, 1:] != sk[:, :-1]
    last = torch.ones_like(sk, dtype=torch.bool)
    last[:, :-1] = sk[:, 1:] != sk[:, :-1]
    keep = last & (sk < V)
    pos = torch.arange(sk.shape[1], device=sk.device).expand_as(sk)
    start = torch.where(first, pos, torch.zeros_like(pos)).cummax(1).values
    cs = v.cumsum(1)
    tot = cs - (cs - v).gather(1, vexp(start))
    out_dtype = compute_dtype(values.dtype)
    sums = torch.where(vexp(keep), tot, torch.zeros_like(tot)).to(out_dtype)
    return MergedIds(torch.where(keep, sk, torch.full_like(sk, -1)), sums, perm)


def merge_duplicate_slots(index: torch.Tensor, logprobs: torch.Tensor, V: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets with every id at most once per row (docs/design.md sec. 2): the slots of a
    row that repeat an id become one slot holding their summed mass, as blending merges
    them; an id outside [0, V) or a -inf log-prob is an empty slot.

    Args:
        index: [N, K] integer ids; logprobs: [N, K] float log-probs.
        V: the vocab size.
    Returns:
        ``(index, logprobs)`` [N, K] each (dtypes kept), the row's slots in ascending id
        order, empty slots (-1, -inf) last. A slot that was not repeated keeps its
        log-prob bit for bit. No host sync.
    """
    valid = (index >= 0) & (index < V) & (logprobs > -torch.inf)
    ids = torch.where(valid, index.long(), torch.full_like(index, -1, dtype=torch.long))
    mass = torch.where(valid, logprobs.double().exp(), torch.zeros_like(logprobs, dtype=torch.float64))
    merged = merge_duplicate_ids(ids, torch.stack([mass, valid.double()], dim=-1).double(), V)
    keep = merged.ids >= 0
    single = merged.sums[..., 1] == 1
    own = logprobs.gather(1, merged.perm)
    summed = merged.sums[..., 0].log().to(logprobs.dtype)
    lp = torch.where(keep, torch.where(single, own, summed), torch.full_like(own, -torch.inf))
    # empty slots last, the ids ascending (the sort key puts -1 after every id)
    key = torch.where(keep, merged.ids, torch.full_like(merged.ids, V))
    key, order = key.sort(dim=1, stable=True)
    out_ids = torch.where(key < V, key, torch.full_like(key, -1)).to(index.dtype)
    return out_ids, lp.gather(1, order)


def merge_sparse_grad(index: torch.Tensor, g: torch.Tensor, V: int, tail_slots: int = 0):
    """Gradient entries that hit the same column of a row, merged.

    Args:
        index: [N, M] ids (``-1`` or out-of-range ids are dropped).
        g: [N, M] fp32 gradient per entry.
        V: the vocab size.
        tail_slots: the first ``tail_slots`` columns are teacher slots (outside the tail).
    Returns:
        ``(ids, g_sum, is_slot)`` [N, M] each: every id at most once per row (others -1,
        gradient 0), the summed gradient, and (int8) whether the id is among the row's
        first ``tail_slots`` columns.
    """
    is_slot = (torch.arange(index.shape[1], device=index.device) < tail_slots).expand_as(index)
    merged = merge_duplicate_ids(index, torch.stack([g.float(), is_slot.float()], dim=-1), V)
    ok = merged.ids >= 0
    return (merged.ids.contiguous(), merged.sums[..., 0].contiguous(),
            (ok & (merged.sums[..., 1] > 0)).to(torch.int8).contiguous())


#: Sentinel id for empty slots in a sorted slot list (larger than any vocab end).
SLOT_SENTINEL = 1 << 62


def sorted_slots(index: torch.Tensor, V: int, tail_slots: int) -> torch.Tensor:
    """The first ``tail_slots`` ids of each row, valid ones ascending, empty ones as
    ``SLOT_SENTINEL`` at the end ([N, tail_slots] int64): kernels walk this list
    tile by tile to mask the teacher's slots out of the tail log-sum-exp."""
    slots = index[:, :tail_slots].long()
    ok = (slots >= 0) & (slots < V)
    return torch.where(ok, slots, torch.full_like(slots, SLOT_SENTINEL)).sort(dim=1).values.contiguous()


#: The largest block of rows any launch config uses: in-tile offsets (``BLOCK * stride``)
#: of a Triton kernel are int32, so a row stride at or above 2**31 / MAX_TILE_ROWS is copied.
MAX_TILE_ROWS = 256


def partial_rows(n_rows: int, cols: int, block_rows: int) -> int:
    """Rows per launch so that ``rows * cols`` fp32 partials (e.g. one log-sum-exp per row
    and vocab tile) fit ``memory.PARTIAL_BYTES``: the buffer does not grow with N (long
    context). A multiple of ``block_rows`` (at least one block), at most ``n_rows`` (>= 1)."""
    rows = PARTIAL_BYTES // (4 * max(cols, 1)) // block_rows * block_rows
    return max(1, min(max(rows, block_rows), n_rows))


def tile_operand(x: torch.Tensor) -> torch.Tensor:
    """``x`` [R, C] as a Triton tile kernel reads it: unchanged when its last dim is unit
    stride and a tile of rows stays within int32 offsets (``MAX_TILE_ROWS * stride(0)
    < 2**31``; the tile's origin itself is int64 in the kernels), else a contiguous copy."""
    if x.dim() == 2 and x.stride(1) == 1 and x.stride(0) * MAX_TILE_ROWS < 2 ** 31:
        return x
    return x.contiguous()


def row_activity(index: torch.Tensor, V: int) -> torch.Tensor:
    """int32 [N]: 1 where the row's ``index`` holds an id in [0, V) (the row counts), else 0."""
    return ((index >= 0) & (index < V)).any(1).to(torch.int32)


def active_first(index: torch.Tensor, V: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A stable row order with the rows that count first, and their activity in that
    order, computed on the device (no host sync).

    Returns ``order`` int64 [N] (row ``i`` of the reordered problem is row ``order[i]``)
    and ``active`` int32 [N] (ones, then zeros)."""
    act = row_activity(index, V)
    order = torch.argsort(1 - act, stable=True)
    return order, act.index_select(0, order).contiguous()


def block_rows(x: torch.Tensor, order: torch.Tensor | None, r0: int, n: int) -> torch.Tensor:
    """Rows ``r0 : r0 + n`` of the problem: of ``x`` itself (a view), or, with a row
    ``order``, rows ``order[r0 : r0 + n]`` of ``x`` gathered into a new [n, ...] tensor."""
    if order is None:
        return x[r0:r0 + n]
    return x.index_select(0, order[r0:r0 + n])


def unpermute(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` (computed in ``order``) back in the caller's order."""
    return torch.empty_like(x).index_copy_(0, order, x)
