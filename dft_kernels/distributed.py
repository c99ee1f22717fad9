"""Vocab-parallel fused DFT loss: the lm_head split by vocab rows across a process group.

Each rank holds the rows ``[start, stop)`` of the lm_head and computes the primitive
of docs/design.md sec. 6 on its shard only: its piece of each log-sum-exp and the logits at
the teacher ids and labels that fall in its shard (ids remapped to the shard, others
masked to -1). The pieces are combined with two all-reduces, as Megatron's
vocab-parallel cross-entropy does: the maximum, then one packed sum of
``exp(lse_local - max)`` and of the gathered logits (only the owner of an id
contributes a non-zero). The loss math above the primitive is unchanged, so loss and
gradients equal the single-process result. A rank computes only its ``V / world``
columns of the logits (chunk by chunk, as the local op always does) and the full
weight is never gathered.

Backward: a rank's lse piece gets ``g * exp(lse_local - lse)``, a gathered logit's
gradient goes to its owner -- both local -- and the partial ``dH`` of every shard is
summed across the group (Megatron's "copy to tensor-parallel region": identity
forward, all-reduce backward).

Two layouts of the hidden rows (``VocabParallel.rows``):

- ``"replicated"`` (tensor parallel, Megatron): every rank of the group passes the same
  hidden states and targets and gets the same loss. Cost per call: the two all-reduces
  of ``[N, T + M]`` floats forward, one all-reduce of ``dH`` ``[N, D]`` backward.
- ``"sharded"`` (data parallel, FSDP2): every rank passes its own rows (counts may
  differ). Row counts, hidden states and ids are all-gathered across the group (one
  tiny gather of the counts first: a host sync), each rank computes its vocab shard for
  all rows, ``dH`` is reduce-scattered back and the gathered rows' upstream gradients
  all-gathered. Each rank gets the loss of its own rows; the weight / bias gradient of
  its shard is averaged over the group (divided by its size), the data-parallel
  convention of DDP and FSDP2. This lets an FSDP2-sharded lm_head be used as it is
  stored: the ``V x D`` weight is never all-gathered, the ``N x D`` hidden states are
  (and kept for backward, ``world`` times this rank's).

A DTensor weight (FSDP2's ``fully_shard`` or tensor parallel's ``ColwiseParallel``,
placement ``Shard(0)``) is read through ``weight.to_local()``; build the matching
:class:`VocabParallel` with :meth:`VocabParallel.from_dtensor`. The pieces are combined
in float64 for float64 inputs, else in fp32.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from . import ops
from .validation import compute_dtype

__all__ = ["VocabParallel", "vocab_parallel_lse_gather"]

ROWS = ("replicated", "sharded")


def _dtensor_types():
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # torch built without distributed
        return None, None
    return DTensor, Shard


def _is_dtensor(x) -> bool:
    DTensor, _ = _dtensor_types()
    return DTensor is not None and isinstance(x, DTensor)


def _as_int(value, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got a bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


def _require_initialized() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("VocabParallel needs an initialised default process group: call "
                           "torch.distributed.init_process_group(...) first (e.g. under torchrun)")


# --------------------------------------------------------------------------- the shard description


@dataclass(frozen=True)
class VocabParallel:
    """This rank's vocab shard ``[start, stop)`` of an lm_head split across ``group``.

    ``group``: the process group the vocab is split across (``None`` = the default group).
    ``vocab_size``: the global V. When ``None`` it is found by one ``all_gather_object``
    of every rank's ``(start, stop)`` at construction (a collective: construct on all
    ranks of the group together), which also checks that the shards tile ``[0, V)``;
    when given, nothing is communicated and only ``0 <= start <= stop <= vocab_size``
    is checked. ``rows``: ``"replicated"`` (every rank passes the same hidden rows,
    tensor parallel) or ``"sharded"`` (every rank passes its own rows, data parallel /
    FSDP2); see the module docstring.

    Build the usual splits with :meth:`even` (Megatron's) or :meth:`from_dtensor`
    (a DTensor lm_head's own split). Shards may be empty (``start == stop``).
    """

    group: Any
    start: int
    stop: int
    vocab_size: int | None = None
    rows: str = "replicated"

    def __post_init__(self):
        _require_initialized()
        start = _as_int(self.start, "start")
        stop = _as_int(self.stop, "stop")
        error = None
        if self.rows not in ROWS:
            error = (ValueError, f"rows={self.rows!r} is not one of {ROWS}: 'replicated' when every rank passes "
                     "the same hidden rows (tensor parallel), 'sharded' when each rank passes its own "
                     "(data parallel, FSDP2)")
        elif not 0 <= start <= stop:
            error = (ValueError, f"the vocab shard [start, stop) = [{start}, {stop}) must have 0 <= start <= stop")
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "stop", stop)
        if self.vocab_size is None:
            # gather before raising, so that a bad shard on one rank raises on every rank
            shards = [None] * self.world_size
            dist.all_gather_object(shards, (start, stop, self.rows, error), group=self.group)
            for r, (_, _, _, err) in enumerate(shards):
                if err is not None:
                    raise err[0](err[1] if r == self.rank else f"group rank {r}: {err[1]}")
            if len({x[2] for x in shards}) > 1:
                raise ValueError(f"rows differs across the group ({[x[2] for x in shards]} by group rank): "
                                 "every rank must pass the same rows=")
            object.__setattr__(self, "vocab_size", self._check_tiling([x[:2] for x in shards]))
            return
        if error is not None:
            raise error[0](error[1])
        V = _as_int(self.vocab_size, "vocab_size")
        if not V > 0 or stop > V:
            raise ValueError(f"vocab_size={V} must be > 0 and hold this rank's shard [{start}, {stop})")
        object.__setattr__(self, "vocab_size", V)

    @staticmethod
    def _check_tiling(shards) -> int:
        """The global V when the non-empty shards tile [0, V) exactly, else ValueError."""
        end = 0
        for s, e in sorted(x for x in shards if x[0] != x[1]):
            if s != end:
                what = "overlap" if s < end else "leave a gap"
                raise ValueError(f"the ranks' vocab shards {[tuple(x) for x in shards]} (by group rank) {what} "
                                 f"at id {min(s, end)}: the shards [start, stop) must tile [0, V) exactly "
                                 "(use VocabParallel.even(group, vocab_size) for the usual split)")
            end = e
        if end == 0:
            raise ValueError("every rank's vocab shard is empty: the shards must tile [0, V) with V > 0")
        return end

    # -------------------------------------------------------------- constructors

    @classmethod
    def even(cls, group, vocab_size: int, *, rows: str = "replicated") -> "VocabParallel":
        """Megatron's split: group rank ``r`` of ``W`` gets ``V // W`` consecutive rows; when
        ``V % W != 0`` the first ``V % W`` ranks get one row more (Megatron itself pads the
        vocab instead). No communication."""
        _require_initialized()
        V = _as_int(vocab_size, "vocab_size")
        if V <= 0:
            raise ValueError(f"vocab_size={V} must be > 0")
        W, r = dist.get_world_size(group), dist.get_rank(group)
        if r < 0:
            raise ValueError("this process is not a member of group: build VocabParallel on the ranks of the "
                             "group the vocab is split across")
        base, rem = divmod(V, W)
        start = r * base + min(r, rem)
        return cls(group, start, start + base + (1 if r < rem else 0), vocab_size=V, rows=rows)

    @classmethod
    def from_dtensor(cls, weight, *, rows: str) -> "VocabParallel":
        """The shard of a DTensor lm_head ``weight`` ``[V, D]`` placed ``Shard(0)`` on one
        mesh dimension (``Replicate()`` on any other): FSDP2's ``fully_shard`` or tensor
        parallel's ``ColwiseParallel``. ``rows`` is required because the two cannot be told
        apart from the weight: ``"sharded"`` for FSDP2 (each rank has its own batch),
        ``"replicated"`` for tensor parallel (the group shares the batch). No communication.
        """
        DTensor, Shard = _dtensor_types()
        if DTensor is None or not isinstance(weight, DTensor):
            raise TypeError(f"from_dtensor needs a DTensor weight, got {type(weight).__name__}; for a plain "
                            "tensor holding this rank's rows use VocabParallel(group, start, stop) or "
                            "VocabParallel.even(group, vocab_size)")
        shard_dims = [i for i, p in enumerate(weight.placements) if type(p) is Shard and p.dim == 0]
        others_ok = all(p.is_replicate() for i, p in enumerate(weight.placements) if i not in shard_dims)
        if weight.dim() != 2 or len(shard_dims) != 1 or not others_ok:
            raise ValueError(f"weight is a DTensor of shape {tuple(weight.shape)} with placements "
                             f"{tuple(weight.placements)}; VocabParallel needs a 2-D [V, D] weight placed "
                             "Shard(0) on exactly one mesh dimension (Replicate() on the others). Redistribute "
                             "it (weight.redistribute(mesh, [Shard(0)])) or pass weight.full_tensor() without "
                             "vocab_parallel")
        d = shard_dims[0]
        mesh = weight.device_mesh
        W, r, V = mesh.size(d), mesh.get_local_rank(d), weight.shape[0]
        chunk = -(-V // W)  # DTensor's Shard: torch.chunk sizes, trailing shards may be short or empty
        start = min(r * chunk, V)
        stop = min(start + chunk, V)
        local = weight.to_local().shape[0]
        if local != stop - start:
            raise ValueError(f"weight's local shard has {local} rows but Shard(0) of V={V} over {W} ranks gives "
                             f"rank {r} the rows [{start}, {stop}); build VocabParallel(group, start, stop) "
                             "by hand for this layout")
        return cls(mesh.get_group(d), start, stop, vocab_size=V, rows=rows)

    # -------------------------------------------------------------- accessors

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def check_weight(self, weight) -> None:
        """ValueError unless ``weight`` holds exactly this rank's shard: ``stop - start`` rows
        (a plain tensor), or a ``Shard(0)`` DTensor of ``vocab_size`` rows whose local part
        has ``stop - start`` rows."""
        n = self.stop - self.start
        if _is_dtensor(weight):
            local = weight.to_local()
            if weight.shape[0] != self.vocab_size or local.shape[0] != n:
                raise ValueError(f"weight is a DTensor of {weight.shape[0]} rows (local {local.shape[0]}) but "
                                 f"this rank's vocab shard is [{self.start}, {self.stop}) of V={self.vocab_size}: "
                                 "build the VocabParallel with VocabParallel.from_dtensor(weight, rows=...)")
            return
        rows = weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() >= 1 else None
        if rows != n:
            raise ValueError(f"weight has {rows} rows but this rank's vocab shard [{self.start}, {self.stop}) "
                             f"has {n}: pass this rank's rows of the lm_head (full_weight[{self.start}:{self.stop}]"
                             "), not the full weight")


# --------------------------------------------------------------------------- autograd pieces


class _CopyToGroup(torch.autograd.Function):
    """Identity forward; all-reduce (sum) of the gradient backward: the input is replicated
    across the group and every rank's shard contributes part of its gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        return g, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; gradient times ``scale`` backward."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


# newer torch renamed the flat collectives (the old names warn); older torch has only those
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _padded_all_gather(x: torch.Tensor, group, sizes: list[int]) -> torch.Tensor:
    """Rows of ``x`` from every rank, concatenated in group-rank order (row counts ``sizes``)."""
    W, n_max = len(sizes), max(sizes)
    x = x.contiguous()
    if x.shape[0] < n_max:
        x = torch.cat([x, x.new_zeros((n_max - x.shape[0],) + tuple(x.shape[1:]))])
    out = x.new_empty((W * n_max,) + tuple(x.shape[1:]))
    _all_gather_flat(out, x, group=group)
    if all(s == n_max for s in sizes):
        return out
    return torch.cat([out[i * n_max:i * n_max + s] for i, s in enumerate(sizes)])


class _GatherRows(torch.autograd.Function):
    """All-gather rows forward; reduce-scatter (sum over ranks, own rows) backward."""

    @staticmethod
    def forward(ctx, x, group, sizes):
        ctx.group, ctx.sizes = group, sizes
        return _padded_all_gather(x, group, sizes)

    @staticmethod
    def backward(ctx, g):
        sizes, group = ctx.sizes, ctx.group
        r, n_max = dist.get_rank(group), max(sizes)
        g = g.contiguous()
        if any(s != n_max for s in sizes):
            parts, o = [], 0
            for s in sizes:
                part = g[o:o + s]
                o += s
                if s < n_max:
                    part = torch.cat([part, part.new_zeros((n_max - s,) + tuple(g.shape[1:]))])
                parts.append(part)
            g = torch.cat(parts)
        out = g.new_empty((n_max,) + tuple(g.shape[1:]))
        _reduce_scatter_flat(out, g, op=dist.ReduceOp.SUM, group=group)
        return out[:sizes[r]], None, None


class _OwnRows(torch.autograd.Function):
    """This rank's rows of (lse, gathered), which are identical on every rank, forward;
    all-gather of every rank's gradients backward (each rank's loss uses its own rows)."""

    @staticmethod
    def forward(ctx, lse, gathered, group, sizes):
        ctx.group, ctx.sizes, ctx.T = group, sizes, lse.shape[1]
        r = dist.get_rank(group)
        o = sum(sizes[:r])
        return lse[o:o + sizes[r]].clone(), gathered[o:o + sizes[r]].clone()

    @staticmethod
    def backward(ctx, g_lse, g_gathered):
        g = torch.cat([g_lse, g_gathered.to(g_lse.dtype)], dim=1)
        g = _padded_all_gather(g, ctx.group, ctx.sizes)
        return g[:, :ctx.T].contiguous(), g[:, ctx.T:].contiguous(), None, None


class _CombineShards(torch.autograd.Function):
    """Global (lse, gathered) from every rank's pieces: all-reduce max, then one packed
    all-reduce sum of ``exp(lse_local - max)`` and of the gathered logits (non-owners
    contribute 0). Backward is local: ``g_lse * exp(lse_local - lse)``, and the gathered
    gradient to the owner of each id."""

    @staticmethod
    def forward(ctx, lse_loc, g_loc, mine, group):
        N, T = lse_loc.shape
        m = lse_loc.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        buf = torch.cat([torch.exp(lse_loc - m).reshape(-1), g_loc.reshape(-1)])
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        lse = m + torch.log(buf[:N * T].view(N, T))
        gathered = buf[N * T:].view(g_loc.shape)
        ctx.save_for_backward(lse_loc, lse, mine)
        return lse, gathered

    @staticmethod
    def backward(ctx, g_lse, g_gathered):
        lse_loc, lse, mine = ctx.saved_tensors
        share = torch.exp(lse_loc - lse)
        share = torch.where(torch.isfinite(lse_loc) & torch.isfinite(lse), share, torch.zeros_like(share))
        return g_lse * share, torch.where(mine, g_gathered, torch.zeros_like(g_gathered)), None, None


class _EmptyShard(torch.autograd.Function):
    """The primitive on a shard with no vocab rows: lse -inf, gathered 0, zero gradients
    (so DDP / FSDP still see a gradient for every input)."""

    @staticmethod
    def forward(ctx, h, w, b, N, M, C, dtype):
        ctx.save_for_backward(h, w, b)
        return (torch.full((N, C), -torch.inf, dtype=dtype, device=h.device),
                torch.zeros((N, M), dtype=dtype, device=h.device))

    @staticmethod
    def backward(ctx, g_lse, g_gathered):
        h, w, b = ctx.saved_tensors
        return (torch.zeros_like(h), torch.zeros_like(w), None if b is None else torch.zeros_like(b),
                None, None, None, None)


def _localize(index: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global ids -> ids into this shard (-1 where the id is not in [start, stop)), plus
    one last column: the ops skip rows without an id of their own (docs/design.md sec. 10),
    but a row whose ids all live on other shards still needs this shard's log-sum-exp,
    so such a row gets local id 0 there (its gathered value is dropped again)."""
    mine = (index >= start) & (index < stop)
    local = torch.where(mine, index - start, torch.full_like(index, -1))
    elsewhere = (index >= 0).any(1, keepdim=True) & ~mine.any(1, keepdim=True)
    keep_alive = torch.where(elsewhere, torch.zeros_like(local[:, :1]), torch.full_like(local[:, :1], -1))
    return torch.cat([local, keep_alive], dim=1).contiguous(), mine


def _skipped_rows_as_ops(lse: torch.Tensor, gathered: torch.Tensor, index: torch.Tensor, vocab_size: int):
    """Rows without a valid id anywhere are skipped by every shard's op; report them as the
    single-device ops do (lse 0), not as the combination of the shards' placeholders."""
    active = ((index >= 0) & (index < vocab_size)).any(1, keepdim=True)
    return torch.where(active, lse, torch.zeros_like(lse)), gathered


def _local_primitive(h, w, b, index, scales, softcap, impl, tail_slots, **kw):
    """This shard's pieces in the compute dtype; every rank returns the same shapes."""
    cdt = compute_dtype(h.dtype)
    if w.shape[0] == 0:
        return _EmptyShard.apply(h, w, b, index.shape[0], index.shape[1] - 1,
                                 ops.lse_columns(scales, tail_slots), cdt)
    lse, gathered = ops.linear_lse_gather_apply(h, w, b, index, scales, softcap, impl, tail_slots=tail_slots, **kw)
    return lse.to(cdt), gathered[:, :-1].to(cdt)    # drop _localize's keep-alive column


# --------------------------------------------------------------------------- entry point


def vocab_parallel_lse_gather(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              index: torch.Tensor, scales: tuple[float, ...], softcap: float | None, impl: str,
                              vocab_parallel: VocabParallel, *, chunk_elems: int | None = None,
                              accum_fp32: bool = True, tail_slots: int = 0):
    """The primitive of docs/design.md sec. 6 for a vocab-sharded lm_head.

    ``h`` [N, D] (this rank's rows), ``weight`` / ``bias`` this rank's ``[stop - start, D]`` /
    ``[stop - start]`` rows (or ``Shard(0)`` DTensors), ``index`` [N, M] global ids (-1 =
    skip). Returns ``lse`` [N, len(scales) (+1)] and ``gathered`` [N, M] over the whole
    vocab -- what :func:`dft_kernels.ops.linear_lse_gather_apply` returns on the full weight,
    including, with ``tail_slots > 0``, the log-sum-exp outside the first ``tail_slots`` ids
    (a log-sum-exp over the vocab like the others, so combined across shards the same way).
    A collective: every rank of the group must call it with the same options.
    """
    vp = vocab_parallel
    if not isinstance(vp, VocabParallel):
        raise TypeError(f"vocab_parallel must be a dft_kernels.distributed.VocabParallel, got {type(vp).__name__}")
    if _is_dtensor(h):
        raise TypeError("hidden is a DTensor; pass this rank's hidden states as a plain tensor "
                        "(hidden.to_local(), or hidden.full_tensor() if it is sharded)")
    vp.check_weight(weight)
    w = weight.to_local() if _is_dtensor(weight) else weight
    b = bias.to_local() if _is_dtensor(bias) else bias
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"bias has shape {tuple(b.shape)} but this rank's vocab shard [{vp.start}, {vp.stop}) "
                         f"needs ({w.shape[0]},): pass the same rows of the bias as of the weight")
    group = vp.group
    kw = dict(chunk_elems=chunk_elems, accum_fp32=accum_fp32)
    if vp.rows == "replicated":
        local_index, mine = _localize(index, vp.start, vp.stop)
        lse_loc, g_loc = _local_primitive(_CopyToGroup.apply(h, group), w, b, local_index, scales, softcap,
                                          impl, tail_slots, **kw)
        return _skipped_rows_as_ops(*_CombineShards.apply(lse_loc, g_loc, mine, group), index, vp.vocab_size)

    # rows == "sharded": gather every rank's rows, compute this shard for all, keep ours
    N, M = index.shape
    meta = torch.tensor([N, M, len(scales), tail_slots], dtype=torch.int64, device=h.device)
    metas = meta.new_empty((vp.world_size * 4,))
    _all_gather_flat(metas, meta, group=group)
    metas = metas.view(-1, 4).tolist()   # the row counts (a host sync, as any uneven gather needs)
    for r, (_, m, t, k) in enumerate(metas):
        if (m, t, k) != (M, len(scales), tail_slots):
            raise ValueError(f"rows='sharded' needs the same target width and loss options on every rank, but "
                             f"group rank {r} gathers {m} columns (K teacher slots + label) at {t} temperatures "
                             f"({k} slots), this rank {M} at {len(scales)} ({tail_slots}): pad target_index with -1 "
                             "to one K on every rank (SparseTargets.pad) and pass the same loss options")
    sizes = [int(x[0]) for x in metas]
    h_all = _GatherRows.apply(h.contiguous(), group, sizes)
    index_all = _padded_all_gather(index, group, sizes)
    local_index, mine = _localize(index_all, vp.start, vp.stop)
    scale = 1.0 / vp.world_size
    w = _ScaleGrad.apply(w, scale) if w.requires_grad else w
    if b is not None and b.requires_grad:
        b = _ScaleGrad.apply(b, scale)
    lse_loc, g_loc = _local_primitive(h_all, w, b, local_index, scales, softcap, impl, tail_slots, **kw)
    lse_all, g_all = _CombineShards.apply(lse_loc, g_loc, mine, group)
    return _skipped_rows_as_ops(*_OwnRows.apply(lse_all, g_all, group, sizes), index, vp.vocab_size)
