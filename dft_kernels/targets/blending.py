"""Blend several teachers' sparse targets into one mixture per position."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..ops._common import SLOT_SENTINEL, merge_duplicate_ids
from ..validation import compute_dtype
from .container import SparseTargets, _check_k, _dtype_name
from .store import SHARD_FORMAT, ShardDirWriter, read_manifest, read_shard

# --------------------------------------------------------------------------- blend

#: metadata keys that must agree between blended targets: (key, what a mismatch means)
_SAME_SOURCE = (("input_ids_sha256", "built over different sequences (input_ids sha256 differ): blend targets "
                                     "built from the same examples, in the same order"),
                ("vocab_size", "built for different vocab sizes: blend teachers that share one tokenizer"),
                ("kind", "of different kinds (topk / sampled / hybrid): blend targets of one kind"),
                ("tokenizer_fingerprint", "built with different tokenizers (tokenizer_fingerprint differ): one id "
                                          "would mean different tokens; blend teachers that share one tokenizer"),
                ("temperature", "built at different temperatures: the mixture would have none; rebuild them at one "
                                "temperature (targets build --temperature T), or retemper top-k targets in memory "
                                "to T first (SparseTargets.retemper(T_built / T))"))
#: metadata a blend keeps when every source records it with one value (DFTTargetsDataset checks
#: tokenizer_fingerprint; the trainer compares the temperature with the loss's)
_SHARED_KEYS = ("temperature", "tokenizer_fingerprint", "teacher_fingerprint")


def _check_weights(weights, n: int, what: str) -> list[float]:
    """``weights`` as n floats > 0 summing to 1 (None: uniform); ValueError / TypeError otherwise."""
    if weights is None:
        return [1.0 / n] * n
    try:
        w = [float(x) for x in weights]
    except (TypeError, ValueError):
        raise TypeError(f"weights must be a sequence of {n} numbers") from None
    if len(w) != n:
        raise ValueError(f"weights has {len(w)} entries for {n} {what}: give one weight per entry")
    if not all(math.isfinite(x) and x > 0 for x in w):
        raise ValueError(f"weights {w} must all be > 0 (drop a teacher instead of giving it weight 0)")
    if abs(sum(w) - 1.0) > 1e-6:
        raise ValueError(f"weights {w} sum to {sum(w):.8g}, not 1 (+-1e-6); normalise them: w / sum(w)")
    return w


def _check_same_source(metas, names) -> None:
    """ValueError naming both sides when two targets disagree on a key of ``_SAME_SOURCE``
    (a key absent from one side's metadata is not checked)."""
    for key, why in _SAME_SOURCE:
        seen = [(name, m.get(key)) for name, m in zip(names, metas) if m.get(key) is not None]
        for name, val in seen[1:]:
            if val != seen[0][1]:
                raise ValueError(f"{seen[0][0]} and {name} are {why} ({key} {seen[0][1]!r} vs {val!r})")


def _kind(metadata) -> str:
    """The kind of targets with this metadata; none recorded = top-k (a truncated estimate)."""
    return metadata.get("kind") or "topk"


def _check_kinds(metas, names) -> bool:
    """ValueError when sampled / hybrid targets would be blended with top-k (or other truncated)
    ones, in either order; returns whether the sources are sampled / hybrid."""
    from .sampling import is_sampled
    sampled = [(n, _kind(m)) for n, m in zip(names, metas) if is_sampled(m)]
    truncated = [(n, _kind(m)) for n, m in zip(names, metas) if not is_sampled(m)]
    if sampled and truncated:
        (a, ka), (b, kb) = sampled[0], truncated[0]
        raise ValueError(f"{a} holds {ka} targets and {b} {kb} targets: their mixture is neither an unbiased "
                         f"estimate ({ka}) nor a top-k, and one kind cannot describe it (docs/design.md sec. 12); "
                         "blend targets of one kind")
    return bool(sampled)


def _shared_metadata(metas) -> dict:
    """The keys of ``_SHARED_KEYS`` every one of ``metas`` records with the same value."""
    out = {}
    for key in _SHARED_KEYS:
        vals = [m.get(key) for m in metas]
        if vals and vals[0] is not None and all(v == vals[0] for v in vals):
            out[key] = vals[0]
    return out


def blend(targets, weights=None, k=None) -> SparseTargets:
    """Per-position mixture ``sum_i w_i p_i`` of several teachers' sparse distributions.

    ``targets``: SparseTargets with the same leading shape (K may differ) on one
    device; ``weights``: positive, summing to 1 (default: uniform). Each teacher's
    slots are concatenated, duplicate ids summed (log-space, vectorised: sort by id,
    segment log-sum-exp), and the ``k`` (default: the largest input K) ids of largest
    blended mass kept, sorted by mass; fewer distinct ids leave empty slots. Tails
    mix implicitly: the blended tail 1 - P = sum_i w_i (1 - P_i) + the dropped mass.
    The log-probs come back in the widest input dtype.

    Sampled / hybrid sources keep every slot (``k`` = the sum of their K) and cannot be mixed
    with top-k ones, in any order; sources recording different sequences, vocab sizes, kinds,
    tokenizers or temperatures are refused. The result records ``kind``, ``temperature``,
    ``tokenizer_fingerprint`` and ``teacher_fingerprint`` when every source agrees on them."""
    if isinstance(targets, SparseTargets) or not isinstance(targets, (list, tuple)) or not targets:
        raise TypeError("targets must be a non-empty list of SparseTargets")
    for i, t in enumerate(targets):
        if not isinstance(t, SparseTargets):
            raise TypeError(f"targets[{i}] is {type(t).__name__}, not SparseTargets")
    n = len(targets)
    w = _check_weights(weights, n, "targets")
    names = [f"targets[{i}]" for i in range(n)]
    _check_same_source([t.metadata for t in targets], names)
    sampled = _check_kinds([t.metadata for t in targets], names)
    lead = targets[0].index.shape[:-1]
    for i, t in enumerate(targets):
        if t.index.shape[:-1] != lead:
            raise ValueError(f"targets[{i}] has leading shape {tuple(t.index.shape[:-1])}, targets[0] has "
                             f"{tuple(lead)}: all targets must cover the same positions")
        if t.device != targets[0].device:
            raise ValueError(f"targets[{i}] is on {t.device}, targets[0] on {targets[0].device}; "
                             "move them to one device with .to(device)")
    if sampled:  # every slot kept: the mixture of unbiased estimates stays one
        if k is not None and _check_k(k) < sum(t.k for t in targets):
            raise ValueError(f"k={k} would drop slots of {_kind(targets[0].metadata)} targets and bias the "
                             f"mixture (docs/design.md sec. 12): pass k >= {sum(t.k for t in targets)} or None")
        k = sum(t.k for t in targets)
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
    for key in ("input_ids_sha256", "kind"):          # equal on every side that records them
        vals = {t.metadata.get(key) for t in targets} - {None}
        if len(vals) == 1:
            meta[key] = vals.pop()
    meta.update(_shared_metadata([t.metadata for t in targets]))
    out = SparseTargets(out_id.reshape(*lead, -1), out_lp.reshape(*lead, -1), meta)
    return out.pad(kout) if out.k < kout else out


# --------------------------------------------------------------------------- blend on disk


def blend_dirs(targets_dirs, weights=None, *, out_dir, k=None, name=None, description=None,
               progress: bool = True) -> dict:
    """:func:`blend` applied shard by shard to target directories written by ``build``.

    Args:
        targets_dirs: two or more build directories (complete, same examples in the same
            shard layout: each shard's input_ids sha256 must agree, as must vocab size and kind).
        weights: one positive weight per directory summing to 1 (default: uniform).
        out_dir: the output directory (shards + manifest.json, each written atomically).
        k: slots per position of the mixture (default: the largest input K).
        name, description: recorded in the manifest (a preset, see ``targets list``).
        progress: tqdm bar over shards.
    Returns:
        The manifest dict. Re-running the same blend skips output shards whose
        hashes verify (resume after a crash); a different blend into the same
        ``out_dir`` raises ValueError.
    """
    dirs = [Path(d) for d in targets_dirs]
    mans, w = _read_sources(dirs, weights)
    params = _blend_params(dirs, mans, w, k)
    out = Path(out_dir)
    if out.resolve() in {d.resolve() for d in dirs}:
        raise ValueError(f"out_dir {str(out)!r} is one of the inputs: write the blend to a new directory")
    info = {key: val for key, val in (("name", name), ("description", description)) if val is not None}
    writer = ShardDirWriter(out, params, info=info, noun="blend")
    dtype = getattr(torch, params["dtype"])

    from tqdm.auto import tqdm
    for s in tqdm(range(len(mans[0]["shards"])), desc="blend", unit="shard", disable=not progress):
        files = [d / m["shards"][s]["file"] for d, m in zip(dirs, mans)]

        def compute(files=files):
            parts = [read_shard(f) for f in files]
            mix = blend([SparseTargets(t["index"], t["logprobs"], meta) for t, meta in parts], w, params["k"])
            t0, m0 = parts[0]
            seqs = list(torch.split(t0["input_ids"], t0["lengths"].tolist()))
            extra = {key: m0[key] for key in ("first_sequence", "n_sequences", "n_positions", "input_ids_sha256")}
            return mix.index, mix.logprobs.to(dtype), seqs, extra

        writer.shard({"shard": s, "sources_data_sha256": [m["shards"][s]["data_sha256"] for m in mans]}, compute)
    return writer.finish()


def _read_sources(dirs: list[Path], weights) -> tuple[list[dict], list[float]]:
    """The manifests of the blend's sources and the checked weights; ValueError (naming both
    sides) unless every source is complete, all cover the same examples in the same shard
    layout and none holds sampled / hybrid targets."""
    if len(dirs) < 2:
        raise ValueError(f"targets_dirs has {len(dirs)} directory; blend needs two or more")
    mans = [read_manifest(d) for d in dirs]
    for d, m in zip(dirs, mans):
        if not m.get("complete"):
            raise ValueError(f"the build in {str(d)!r} is incomplete: re-run its build to finish it first")
    w = _check_weights(weights, len(dirs), "directories")
    names = [str(d) for d in dirs]
    _check_same_source(mans, names)
    for d, m in zip(dirs[1:], mans[1:]):
        if len(m["shards"]) != len(mans[0]["shards"]) or m.get("n_sequences") != mans[0].get("n_sequences"):
            raise ValueError(f"{names[0]} ({mans[0].get('n_sequences')} sequences in {len(mans[0]['shards'])} "
                             f"shard(s)) and {d} ({m.get('n_sequences')} in {len(m['shards'])}) are built over "
                             "different examples or shard sizes: rebuild them from one data file with one "
                             "--shard-size")
    for s in range(len(mans[0]["shards"])):
        _check_same_source([m["shards"][s] for m in mans], names)
    from .sampling import is_sampled
    for d, m in zip(names, mans):          # every source, whatever the order
        if is_sampled(m):
            raise ValueError(f"{d} holds {m['kind']} targets: blend_dirs keeps the top-K of the mixture and writes "
                             "a 'blend' kind, which would drop sampled slots and lose that (docs/design.md sec. "
                             "12); blend them in memory with blend(), which keeps every slot, or build top-k "
                             "targets to blend on disk")
    return mans, w


def _blend_params(dirs: list[Path], mans: list[dict], w: list[float], k) -> dict:
    """What every output shard and the manifest record, and a resume must match: the K
    (default: the largest input K), the widest storage dtype, the weighted sources and the
    metadata they share."""
    kout = max(int(m["k"]) for m in mans) if k is None else _check_k(k)
    vocab = mans[0].get("vocab_size")
    if isinstance(vocab, int) and kout > vocab:
        raise ValueError(f"k={kout} is larger than the vocab size {vocab}")
    dtype = mans[0]["dtype"]
    for m in mans[1:]:  # the widest storage dtype
        dtype = _dtype_name(torch.promote_types(getattr(torch, dtype), getattr(torch, m["dtype"])))
    sources = [{"dir": str(d), "name": m.get("name"), "teacher": m.get("teacher"), "weight": float(wi)}
               for d, m, wi in zip(dirs, mans, w)]
    return {"format": SHARD_FORMAT, "kind": "blend", "teacher": " + ".join(
            f"{s['weight']:g} * {s['name'] or s['teacher']}" for s in sources),
            "vocab_size": vocab, "k": kout, "dtype": dtype, "shard_size": mans[0].get("shard_size"),
            "temperature": mans[0].get("temperature") if len({m.get("temperature") for m in mans}) == 1 else None,
            "sources": sources, **_shared_metadata(mans)}
