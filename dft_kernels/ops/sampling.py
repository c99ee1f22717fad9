"""Drawing token ids from a distribution over the vocab, one vocab chunk at a time
(docs/design.md sec. 12): never an [N, V] tensor beyond the caller's own chunks.

Inverse CDF of sorted uniforms: each row's S uniforms in [0, mass) are sorted, the
vocab is walked in id order, and the uniforms that fall in a chunk's cumulative-mass
interval are resolved by a binary search of that chunk's cumulative sum (fp64). The
ids come out sorted, so repeated draws of one id sit next to each other and are
merged into one slot holding ``log(mass * count / S)``. Excluded ids (a hybrid
target's top-k) have their mass set to 0, so the draws come from the distribution
restricted to the rest of the vocab.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

DEFAULT_SAMPLING_CHUNK = 8192


def sorted_uniforms(n_rows: int, samples: int, generator: torch.Generator | None,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """Sorted U[0, 1) draws per row, from ``generator`` (on its own device, so a CPU
    generator gives the same numbers whatever ``device`` is).

    Args:
        n_rows: N; samples: S; generator: a torch.Generator or None (torch's default).
        device: where the result goes.
    Returns:
        [N, S] fp64, ascending along the last dim.
    """
    gdev = generator.device if generator is not None else "cpu"
    u = torch.rand((n_rows, samples), generator=generator, dtype=torch.float64, device=gdev)
    return u.sort(dim=-1).values.to(device)


def _zero_excluded(p: torch.Tensor, exclude: torch.Tensor | None, v0: int) -> None:
    """Set the chunk's columns (vocab ids v0..v0 + C) listed in ``exclude`` [N, k] to 0,
    in place; O(N * k) work, not O(N * C)."""
    if exclude is None or exclude.shape[1] == 0:
        return
    local = exclude.long() - v0
    rows, slots = ((exclude >= 0) & (local >= 0) & (local < p.shape[1])).nonzero(as_tuple=True)
    p[rows, local[rows, slots]] = 0.0


def _merge_runs(ids: torch.Tensor, log_mass: torch.Tensor, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted draws [N, S] (-1 = none) -> each distinct id once, packed left, with
    ``log_mass + log(count / S)``; padding -1 / -inf."""
    N, S = ids.shape
    drawn = ids >= 0
    new = drawn.clone()
    new[:, 1:] &= ids[:, 1:] != ids[:, :-1]
    slot = torch.where(new, new.long().cumsum(1) - 1, S)             # S = a discard column
    slot = torch.where(drawn & ~new, torch.cummax(torch.where(new, slot, -1), 1).values, slot)
    out_ids = torch.full((N, S + 1), -1, dtype=torch.int64, device=ids.device)
    out_ids.scatter_(1, torch.where(new, slot, S), ids)
    counts = torch.zeros((N, S + 1), dtype=torch.float64, device=ids.device)
    counts.scatter_add_(1, torch.where(drawn, slot, S), drawn.double())
    out_ids, counts = out_ids[:, :S], counts[:, :S]
    lp = torch.where(out_ids >= 0, log_mass.double()[:, None] + torch.log(counts / samples),
                     torch.full_like(counts, -torch.inf))
    return out_ids, lp.float()


def draw_samples(chunk_logits: Callable[[int, int], torch.Tensor], vocab_size: int, lse: torch.Tensor,
                 exclude: torch.Tensor | None, samples: int, generator: torch.Generator | None, *,
                 chunk: int = DEFAULT_SAMPLING_CHUNK, exclude_logprobs: torch.Tensor | None = None,
                 uniforms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``samples`` ids per row i.i.d. from ``softmax(logits)`` restricted to the ids
    not in ``exclude``, walking the vocab in chunks (docs/design.md sec. 12).

    Args:
        chunk_logits: ``chunk_logits(v0, v1)`` -> fp32 [N, v1 - v0], the logits of vocab
            columns v0..v1 at the target temperature with every transform applied.
        vocab_size: V. lse: [N] fp32, the full-vocab log-sum-exp of those logits.
        exclude: [N, k] ids to sample outside of (a hybrid target's top-k; -1 = none),
            or None (pure sampling).
        samples: S >= 1 draws per row.
        generator: torch.Generator for the uniforms (ignored when ``uniforms`` is given).
        chunk: vocab columns per ``chunk_logits`` call.
        exclude_logprobs: [N, k] the excluded ids' log-probs (``logits - lse``), e.g. the
            top-k the caller already has; None: gathered from ``chunk_logits`` in an
            extra pass (only when ``exclude`` is given).
        uniforms: [N, S] U[0, 1) draws (any order) to use instead of ``generator``'s,
            e.g. one generator per sequence for reproducible resumable builds.
    Returns:
        ``ids`` [N, S] int64 and ``logprobs`` [N, S] fp32: each distinct drawn id once,
        ascending, with ``log(mass_outside * count / S)`` where ``mass_outside`` =
        1 - P(exclude) (1 for pure sampling); padding -1 / -inf. Rows whose outside
        mass is 0 (``exclude`` holds it all) get no draws. Each chunk's CDF is summed
        in fp32 on top of an fp64 running total, so a boundary moves by ~1e-7 of the
        chunk's mass at most.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples={samples!r} must be an int >= 1")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk={chunk!r} must be an int >= 1 (vocab columns per chunk)")
    N, dev = lse.shape[0], lse.device
    if exclude is not None and (exclude.dim() != 2 or exclude.shape[0] != N):
        raise ValueError(f"exclude must be [N={N}, k] ids, got shape {tuple(exclude.shape)}")
    if uniforms is None:
        u = sorted_uniforms(N, samples, generator, dev)
    else:
        if tuple(uniforms.shape) != (N, samples):
            raise ValueError(f"uniforms must be [N={N}, samples={samples}], got {tuple(uniforms.shape)}")
        u = uniforms.to(dev, torch.float64).sort(dim=-1).values
    lse = lse.to(torch.float32)
    if exclude is not None and exclude.shape[1] and exclude_logprobs is None:
        exclude_logprobs = torch.full(exclude.shape, -torch.inf, dtype=torch.float32, device=dev)
        for v0 in range(0, vocab_size, chunk):
            v1 = min(vocab_size, v0 + chunk)
            inside = (exclude >= v0) & (exclude < v1)
            z = chunk_logits(v0, v1).float()
            got = z.gather(1, (exclude.long() - v0).clamp(0, v1 - v0 - 1)) - lse[:, None]
            exclude_logprobs = torch.where(inside, got, exclude_logprobs)
    if exclude is not None and exclude.shape[1]:
        p_excl = torch.where(exclude >= 0, exclude_logprobs.double().exp(), 0.0).sum(1)
        mass = (1.0 - p_excl).clamp(min=0.0)
    else:
        mass = torch.ones(N, dtype=torch.float64, device=dev)
    u = u * mass[:, None]
    ids = torch.full((N, samples), -1, dtype=torch.int64, device=dev)
    cum = torch.zeros(N, dtype=torch.float64, device=dev)             # CDF at the chunk's start, fp64
    for v0 in range(0, vocab_size, chunk):
        v1 = min(vocab_size, v0 + chunk)
        p = (chunk_logits(v0, v1).float() - lse[:, None]).exp_()          # fp32 probabilities
        _zero_excluded(p, exclude, v0)
        c = p.cumsum_(1)                                                # the chunk's own CDF, fp32
        pos = torch.searchsorted(c, (u - cum[:, None]).float(), right=True)   # first column with CDF > u
        ids = torch.where((ids < 0) & (pos < v1 - v0), pos + v0, ids)
        cum += c[:, -1].double()
        del p, c
    # a uniform beyond the summed CDF (rounding, ~1e-7) takes the row's largest drawn id
    ids = torch.where((ids < 0) & (mass > 0)[:, None], ids.amax(1, keepdim=True), ids)
    ids = torch.where((mass > 0)[:, None], ids, -1)
    return _merge_runs(ids, mass.log(), samples)


def per_row_uniforms(generators: Sequence[torch.Generator], lengths: Sequence[int], samples: int,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniforms for consecutive row groups, group i (``lengths[i]`` rows) from
    ``generators[i]``: a group's draws do not depend on the others.

    Args:
        generators: one torch.Generator per group; lengths: rows per group.
        samples: S per row; device: where the result goes.
    Returns:
        [sum(lengths), S] fp64 sorted uniforms.
    """
    if len(generators) != len(lengths):
        raise ValueError(f"{len(generators)} generators for {len(lengths)} row groups")
    parts = [sorted_uniforms(n, samples, g, device) for g, n in zip(generators, lengths)]
    return torch.cat(parts) if parts else torch.empty(0, samples, dtype=torch.float64, device=device)
