"""Sampled and hybrid targets (docs/design.md sec. 12): unbiased sparse estimates of a
teacher's distribution, built block of rows by block of rows, never [N, V].

- **hybrid** (``k > 0, samples > 0``): the exact top-k, then ``samples`` ids drawn from
  the teacher restricted to the rest of the vocab, each distinct id stored once with
  ``log((1 - P_topk) * count / samples)``.
- **sampled** (``k = 0``): ``samples`` ids drawn from the whole distribution, each
  distinct id with ``log(count / samples)``.
- **topk** (``samples = 0``): plain top-k (what :meth:`SparseTargets.from_logits` gives).

Rows are ``[top-k slots | sampled slots]``, K = k + samples columns, -1 / -inf padded
(repeated draws share a slot). Each row sums to 1 up to rounding, so forward KL with
``tail="bucket"`` has an unbiased gradient. Draws come from one torch.Generator per
sequence, seeded from ``(seed, sequence index)`` (:func:`sequence_generator`), so a
resumed build writes the same bytes as an uninterrupted one.

This module is tensors in, tensors out (no container), so the container and the
build can both call it.
"""
from __future__ import annotations

import hashlib
import warnings
from numbers import Integral
from typing import Sequence

import torch

from ..ops._torch_common import head_logits
from ..options import effective_divergence
from ..validation import compute_dtype
from ..ops.sampling import DEFAULT_SAMPLING_CHUNK, draw_samples, per_row_uniforms, sorted_uniforms

TARGET_KINDS = ("topk", "hybrid", "sampled")
_WARNED: set[tuple[str, str]] = set()       # (kind, divergence) pairs already warned about
DEFAULT_BLOCK_ELEMS = 1 << 24     # fp32 logits per row block: 64 MiB


def is_sampled(metadata) -> bool:
    """Whether targets with this metadata (or manifest) are sampled or hybrid."""
    return metadata.get("kind") in ("hybrid", "sampled")


def warn_if_biased(metadata, divergence: str, beta: float) -> bool:
    """Warn once per (kind, divergence) when reverse KL or JSD is trained on sampled /
    hybrid targets: only forward KL has an unbiased gradient there (docs/design.md sec. 12).

    Args:
        metadata: the targets' metadata or manifest (a dict), or None.
        divergence, beta: the loss options.
    Returns:
        True when the combination is biased (whether or not the warning was shown before).
    """
    if not isinstance(metadata, dict) or not is_sampled(metadata):
        return False
    kind = effective_divergence(divergence, beta)
    if kind == "forward_kl":
        return False
    if (metadata["kind"], kind) not in _WARNED:
        _WARNED.add((metadata["kind"], kind))
        warnings.warn(f"divergence={kind!r} on {metadata['kind']} targets is biased (only forward KL has an "
                      "unbiased gradient on sampled slots, docs/design.md sec. 12); use divergence='forward_kl' "
                      "or top-k targets", UserWarning, stacklevel=3)
    return True


def target_kind(k: int, samples: int) -> str:
    """"topk" | "hybrid" | "sampled" for ``k`` exact slots and ``samples`` draws."""
    return "topk" if samples == 0 else ("sampled" if k == 0 else "hybrid")


def check_sampling(k, samples, vocab_size: int | None = None) -> tuple[int, int]:
    """Check a (top-k, samples) pair: ints, ``k >= 0``, ``samples >= 0``, ``k + samples >= 1``
    and ``k <= vocab_size``. Returns ``(k, samples)`` as ints; ValueError naming the fix."""
    for name, x in (("k", k), ("samples", samples)):
        if isinstance(x, bool) or not isinstance(x, Integral) or x < 0:
            raise ValueError(f"{name}={x!r} must be an integer >= 0")
    k, samples = int(k), int(samples)
    if k + samples < 1:
        raise ValueError("k=0 with samples=0 keeps nothing: pass k >= 1 (top-k) and/or samples >= 1 (sampled)")
    if vocab_size is not None and k > vocab_size:
        raise ValueError(f"k={k} is larger than the vocab size {vocab_size}")
    return k, samples


def sampling_metadata(k: int, samples: int, seed: int | None, temperature: float) -> dict:
    """The metadata of a sampled / hybrid target: ``kind``, ``topk`` (exact slots; the
    container's ``k`` is the slot count k + samples), ``samples``, ``seed`` (None: an
    unseeded generator) and ``temperature``."""
    return {"kind": target_kind(k, samples), "topk": k, "samples": samples, "seed": seed,
            "temperature": float(temperature)}


def sequence_generator(seed: int, sequence_index: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, sequence_index)`` by a hash, so sequence i's
    draws depend on nothing else (resume-safe, order-free).

    Args:
        seed: the build's seed (int); sequence_index: the sequence's number in the dataset.
    Returns:
        torch.Generator (CPU).
    """
    digest = hashlib.blake2b(f"{int(seed)}:{int(sequence_index)}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def sequence_uniforms(seed: int, first_sequence: int, lengths: Sequence[int], samples: int,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Sorted uniforms [sum(lengths), samples] fp64 for consecutive sequences numbered
    ``first_sequence, first_sequence + 1, ...`` with ``lengths`` rows each."""
    gens = [sequence_generator(seed, first_sequence + i) for i in range(len(lengths))]
    return per_row_uniforms(gens, lengths, samples, device)


def block_targets(z: torch.Tensor, k: int, samples: int, uniforms: torch.Tensor | None, *,
                  chunk: int = DEFAULT_SAMPLING_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k + sampled slots of one block of rows from its logits at the target temperature.

    Args:
        z: [R, V] fp32 / fp64 logits (every transform and the temperature applied).
        k: exact top-k slots (>= 0); samples: draws per row (>= 0).
        uniforms: [R, samples] U[0, 1) draws (with ``samples > 0``).
        chunk: vocab columns per step of the sampler.
    Returns:
        ``index`` [R, k + samples] int32 and ``logprobs`` [R, k + samples] (``z``'s
        compute dtype): the top-k by value, then each distinct drawn id ascending;
        padding -1 / -inf.
    """
    lse = torch.logsumexp(z, dim=-1)
    ids, lps = [], []
    top_ids = top_lp = None
    if k:
        vals, top_ids = z.topk(k, dim=-1)
        top_lp = vals - lse[:, None]
        ids.append(top_ids)
        lps.append(top_lp)
    if samples:
        s_ids, s_lp = draw_samples(lambda v0, v1: z[:, v0:v1].float(), z.shape[1], lse.float(), top_ids,
                                   samples, None, chunk=chunk, exclude_logprobs=top_lp, uniforms=uniforms)
        ids.append(s_ids)
        lps.append(s_lp.to(z.dtype))
    return torch.cat(ids, 1).to(torch.int32), torch.cat(lps, 1)


def targets_from_logits(flat: torch.Tensor, k: int, samples: int, temperature: float, generator, *,
                        chunk_rows: int, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Hybrid / sampled targets of logits ``flat`` [N, V], ``chunk_rows`` rows at a time.

    Args:
        flat: [N, V] logits; k, samples: see :func:`block_targets`; temperature: > 0.
        generator: torch.Generator for the draws (None: torch's default generator).
        chunk_rows: rows per block; out_dtype: the log-probs' dtype.
    Returns:
        ``index`` [N, k + samples] int32 and ``logprobs`` [N, k + samples] ``out_dtype``.
    """
    n, v = flat.shape
    cd = compute_dtype(flat.dtype)
    u = sorted_uniforms(n, samples, generator, flat.device) if samples else None
    index = torch.empty(n, k + samples, dtype=torch.int32, device=flat.device)
    logprobs = torch.empty(n, k + samples, dtype=out_dtype, device=flat.device)
    for i in range(0, n, chunk_rows):
        z = flat[i:i + chunk_rows].to(cd, copy=True)
        if temperature != 1.0:
            z.div_(temperature)
        idx, lp = block_targets(z, k, samples, None if u is None else u[i:i + chunk_rows])
        index[i:i + chunk_rows], logprobs[i:i + chunk_rows] = idx, lp.to(out_dtype)
    return index, logprobs


def targets_from_hidden(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int, samples: int,
                        inv_temp: float, softcap: float | None, uniforms: torch.Tensor, *,
                        block_elems: int = DEFAULT_BLOCK_ELEMS) -> tuple[torch.Tensor, torch.Tensor]:
    """Hybrid / sampled targets from a teacher's hidden states and lm_head: the logits
    of a block of ``block_elems // V`` rows at a time (one GEMM per block, never [N, V]).

    Args:
        h: [N, D] hidden states (logit scale folded in); weight: [V, D]; bias: [V] or None.
        k, samples: see :func:`block_targets`; inv_temp: 1 / temperature; softcap: or None.
        uniforms: [N, samples] U[0, 1) draws (e.g. :func:`sequence_uniforms`).
        block_elems: logits per row block.
    Returns:
        ``index`` [N, k + samples] int32 and ``logprobs`` [N, k + samples] fp32.
    """
    n, v = h.shape[0], weight.shape[0]
    rows = max(1, block_elems // max(v, 1))
    index = torch.empty(n, k + samples, dtype=torch.int32, device=h.device)
    logprobs = torch.empty(n, k + samples, dtype=torch.float32, device=h.device)
    for i in range(0, n, rows):
        z, _ = head_logits(h[i:i + rows], weight, bias, softcap, inv_temp)
        idx, lp = block_targets(z.float(), k, samples, uniforms[i:i + rows].to(h.device))
        index[i:i + rows], logprobs[i:i + rows] = idx, lp
    return index, logprobs
