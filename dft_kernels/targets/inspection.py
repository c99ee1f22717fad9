"""Summary of a build directory."""
from __future__ import annotations

from pathlib import Path

import torch

from .container import SparseTargets
from .store import check_shard_k, read_header, read_manifest, read_shard


def inspect(targets_dir, *, bins: int = 10000) -> dict:
    """Summary of a build: positions, sequences, K, vocab, temperature, teacher, the
    target ``kind`` with ``topk`` / ``samples`` / ``seed`` (docs/design.md sec. 12; a
    build without them is plain top-k), and
    the teacher mass P covered by the top-K per position: its mean and its 5th
    percentile (the smallest x with P <= x at >= 5% of the positions, rounded up to
    a ``bins``-bin histogram edge, i.e. to 1/bins; memory does not grow with N).

    Every shard is read whole and each tensor checked against its stored sha256
    (ValueError naming the file; a shard with another K is named by its K)."""
    man = read_manifest(targets_dir)
    hist = torch.zeros(bins, dtype=torch.float64)
    total, count = 0.0, 0
    for e in man["shards"]:
        path = Path(targets_dir) / e["file"]
        handle, meta = read_header(path)
        with handle:
            check_shard_k(path, meta.get("k"), man.get("k"))
        tensors, _ = read_shard(path, check_data=True)   # every tensor against its sha256
        t = SparseTargets(tensors["index"], tensors["logprobs"])
        p = t.mass().double().clamp(0.0, 1.0)
        total += float(p.sum())
        count += p.numel()
        hist += torch.histc(p, bins=bins, min=0.0, max=1.0)
    p5 = float("nan")
    if count:
        cum = hist.cumsum(0)
        b = int(torch.searchsorted(cum, torch.tensor(0.05 * count, dtype=torch.float64)))
        p5 = min(b + 1, bins) / bins  # upper edge of the bin holding the 5th percentile
    return {"teacher": man.get("teacher"), "vocab_size": man.get("vocab_size"), "k": man.get("k"),
            "kind": man.get("kind", "topk"), "topk": man.get("topk", man.get("k")),
            "samples": man.get("samples", 0), "seed": man.get("seed"), "temperature": man.get("temperature"),
            "dtype": man.get("dtype"), "complete": man.get("complete"),
            "n_shards": len(man["shards"]), "n_sequences": man.get("n_sequences"), "n_positions": count,
            "mass_mean": total / count if count else float("nan"), "mass_p5": p5}
