"""Blend several teachers' sparse targets into one mixture per position."""
from __future__ import annotations

import math
from typing import Any

import torch

from ..ops._common import SLOT_SENTINEL, merge_duplicate_ids
from ..validation import compute_dtype
from .container import SparseTargets, _check_k

# --------------------------------------------------------------------------- blend


def blend(targets, weights=None, k=None) -> SparseTargets:
    """Per-position mixture ``sum_i w_i p_i`` of several teachers' sparse distributions.

    ``targets``: SparseTargets with the same leading shape (K may differ) on one
    device; ``weights``: positive, summing to 1 (default: uniform). Each teacher's
    slots are concatenated, duplicate ids summed (log-space, vectorised: sort by id,
    segment log-sum-exp), and the ``k`` (default: the largest input K) ids of largest
    blended mass kept, sorted by mass; fewer distinct ids leave empty slots. Tails
    mix implicitly: the blended tail 1 - P = sum_i w_i (1 - P_i) + the dropped mass.
    The log-probs come back in the widest input dtype."""
    if isinstance(targets, SparseTargets) or not isinstance(targets, (list, tuple)) or not targets:
        raise TypeError("targets must be a non-empty list of SparseTargets")
    for i, t in enumerate(targets):
        if not isinstance(t, SparseTargets):
            raise TypeError(f"targets[{i}] is {type(t).__name__}, not SparseTargets")
    n = len(targets)
    if weights is None:
        weights = [1.0 / n] * n
    try:
        w = [float(x) for x in weights]
    except (TypeError, ValueError):
        raise TypeError(f"weights must be a sequence of {n} numbers") from None
    if len(w) != n:
        raise ValueError(f"weights has {len(w)} entries for {n} targets")
    if not all(math.isfinite(x) and x > 0 for x in w):
        raise ValueError(f"weights {w} must all be > 0 (drop a teacher instead of giving it weight 0)")
    if abs(sum(w) - 1.0) > 1e-6:
        raise ValueError(f"weights {w} sum to {sum(w):.8g}, not 1 (+-1e-6); normalise them: w / sum(w)")
    lead = targets[0].index.shape[:-1]
    for i, t in enumerate(targets):
        if t.index.shape[:-1] != lead:
            raise ValueError(f"targets[{i}] has leading shape {tuple(t.index.shape[:-1])}, targets[0] has "
                             f"{tuple(lead)}: all targets must cover the same positions")
        if t.device != targets[0].device:
            raise ValueError(f"targets[{i}] is on {t.device}, targets[0] on {targets[0].device}; "
                             "move them to one device with .to(device)")
    kout = max(t.k for t in targets) if k is None else _check_k(k)
    out_dtype = targets[0].logprobs.dtype
    for t in targets[1:]:
        out_dtype = torch.promote_types(out_dtype, t.logprobs.dtype)
    cd = compute_dtype(out_dtype)

    ids, lps = [], []
    for t, wi in zip(targets, w):
        idx = t.index.reshape(-1, t.k).long()
        lp = t.logprobs.reshape(-1, t.k).to(cd) + math.log(wi)
        valid = idx >= 0
        ids.append(torch.where(valid, idx, torch.full_like(idx, -1)))
        lps.append(torch.where(valid, lp, torch.full_like(lp, -torch.inf)))
    ids = torch.cat(ids, dim=-1)                     # [N, M]
    lps = torch.cat(lps, dim=-1)
    # sum duplicate ids in probability space, shifted by each row's largest log-prob
    shift = lps.amax(dim=-1, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    merged = merge_duplicate_ids(ids, (lps - shift).exp().double(), SLOT_SENTINEL)  # any id >= 0 is valid
    seg_id = merged.ids
    real = seg_id >= 0
    seg_lp = (merged.sums.log() + shift).to(cd)       # log of the blended mass per distinct id
    # order: real ids by mass (zero-mass real ids before unused segments)
    key = torch.where(real, seg_lp.nan_to_num(neginf=torch.finfo(cd).min), torch.full_like(seg_lp, -torch.inf))
    if kout <= ids.shape[1]:
        pos = key.topk(kout, dim=-1).indices
    else:
        pos = key.sort(dim=-1, descending=True).indices
    out_id = seg_id.gather(1, pos)
    out_lp = seg_lp.gather(1, pos)
    keep = out_id >= 0
    out_id = out_id.to(torch.int32)
    out_lp = torch.where(keep, out_lp, torch.full_like(out_lp, -torch.inf)).to(out_dtype)
    meta: dict[str, Any] = {"blend": [{**{k2: v for k2, v in t.metadata.items() if k2 != "k"}, "weight": wi}
                                      for t, wi in zip(targets, w)]}
    vs = [t.metadata.get("vocab_size") for t in targets]
    if all(isinstance(v, int) for v in vs):
        meta["vocab_size"] = max(vs)
    temps = {t.metadata.get("temperature") for t in targets}
    if len(temps) == 1 and None not in temps:
        meta["temperature"] = temps.pop()
    out = SparseTargets(out_id.reshape(*lead, -1), out_lp.reshape(*lead, -1), meta)
    return out.pad(kout) if out.k < kout else out
