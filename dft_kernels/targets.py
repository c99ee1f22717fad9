"""Sparse teacher targets: top-K ids + log-probs per position.

``SparseTargets`` holds one teacher distribution per position (DESIGN.md sec. 2):
``index`` [..., K] int32 token ids (-1 = empty slot) and ``logprobs`` [..., K]
log-probabilities normalised over the teacher's *full* vocabulary, so the slots
hold P = sum_k exp(logprobs_k) <= 1 and the rest, 1 - P, is the tail.

This module also builds targets from a Hugging Face teacher without ever
materialising its [N, V] logits (``build``), stores them as safetensors shards,
blends several teachers (``blend``) and summarises a build (``inspect``).

Shard format (``shard-00000.safetensors`` ...), one JSON metadata key
``"dft_kernels"`` (a single key keeps the file bytes deterministic):

    index      [n_positions, K] int32     top-K teacher ids, -1 = empty slot
    logprobs   [n_positions, K] fp16      log-probs (normalised over the full vocab)
    input_ids  [n_positions]    int64     the tokens the targets were computed for
    lengths    [n_sequences]    int64     sequence lengths (positions are concatenated)

Row t of a sequence is the teacher's distribution for the token *after* position t.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from .validation import validate_target_data

#: The one safetensors metadata key this package writes (value: a JSON object).
METADATA_KEY = "dft_kernels"
SHARD_FORMAT = "dft_kernels.targets/1"
MANIFEST = "manifest.json"
_TMP_PREFIX = ".dft-tmp-"

LOGPROB_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DTYPE_NAMES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def resolve_dtype(dtype, *, name: str = "dtype") -> torch.dtype:
    """torch dtype or one of "fp16"/"bf16"/"fp32" (and long names) -> a log-prob dtype."""
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPE_NAMES:
            raise ValueError(f"{name}={dtype!r} is not one of 'float16', 'bfloat16', 'float32'")
        return _DTYPE_NAMES[dtype.lower()]
    if dtype not in LOGPROB_DTYPES:
        raise TypeError(f"{name}={dtype!r} must be torch.float16, torch.bfloat16 or torch.float32")
    return dtype


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_k(k, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, Integral) or k < 1:
        raise ValueError(f"{name}={k!r} must be an integer >= 1 (the number of teacher slots per position)")
    return int(k)


def _check_positive(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, Real) or not math.isfinite(float(x)) or not float(x) > 0:
        raise ValueError(f"{name}={x!r} must be a finite number > 0")
    return float(x)


def _tail_log(lp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log of the tail mass max(0, 1 - P) per position, -inf where the slots hold it all."""
    neg = torch.full_like(lp, -torch.inf)
    lse = torch.logsumexp(torch.where(valid, lp, neg), dim=-1)  # -inf for rows without a valid slot
    return torch.log(-torch.expm1(torch.clamp(lse, max=0.0)))


# --------------------------------------------------------------------------- SparseTargets


@dataclass(eq=False)
class SparseTargets:
    """Teacher distribution stored sparsely: ``index`` [..., K] int32 (-1 = empty slot)
    and ``logprobs`` [..., K] float (fp16 / bf16 / fp32; fp64 accepted for checks),
    normalised over the teacher's full vocab.

    ``metadata`` is a JSON-serialisable dict; the keys this package sets are
    ``teacher`` (name or path), ``vocab_size`` (teacher vocab), ``temperature`` and
    ``k`` (kept equal to ``self.k``). ``len(t)`` and ``t[i:j]`` index positions
    (the leading dim); the K dim is never sliced by ``[]`` (use ``truncate``)."""

    index: torch.Tensor
    logprobs: torch.Tensor
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.index, torch.Tensor) or not isinstance(self.logprobs, torch.Tensor):
            raise TypeError("index and logprobs must be torch tensors")
        if self.index.shape != self.logprobs.shape:
            raise ValueError(f"index {tuple(self.index.shape)} and logprobs {tuple(self.logprobs.shape)} "
                             "must have the same shape [..., K]")
        if self.index.dim() < 1:
            raise ValueError("index and logprobs need a last dim K (shape [..., K])")
        if self.index.is_floating_point() or self.index.is_complex() or self.index.dtype == torch.bool:
            raise TypeError(f"index must be an integer tensor, got {self.index.dtype}")
        if self.logprobs.dtype not in LOGPROB_DTYPES:
            raise TypeError(f"logprobs must be float16, bfloat16 or float32 (float64 for checks), "
                            f"got {self.logprobs.dtype}")
        if self.index.dtype != torch.int32:
            self.index = self.index.to(torch.int32)
        if not isinstance(self.metadata, Mapping):
            raise TypeError(f"metadata must be a dict, got {type(self.metadata).__name__}")
        self.metadata = dict(self.metadata)
        self.metadata["k"] = self.k

    # ------------------------------------------------------------------ basics

    @property
    def k(self) -> int:
        return self.index.shape[-1]

    @property
    def shape(self) -> torch.Size:
        return self.index.shape

    @property
    def device(self) -> torch.device:
        return self.index.device

    def __len__(self) -> int:
        if self.index.dim() < 2:
            raise TypeError("len() of a single position's targets (shape [K])")
        return self.index.shape[0]

    def __getitem__(self, key) -> "SparseTargets":
        if self.index.dim() < 2:
            raise TypeError("a single position's targets (shape [K]) cannot be indexed further")
        keys = key if isinstance(key, tuple) else (key,)
        if any(x is Ellipsis or x is None for x in keys) or len(keys) > self.index.dim() - 1:
            raise IndexError(f"SparseTargets[...] indexes the {self.index.dim() - 1} position dim(s) only; "
                             "use truncate(k) to drop slots")
        return SparseTargets(self.index[key], self.logprobs[key], dict(self.metadata))

    def __repr__(self) -> str:
        meta = {k: v for k, v in self.metadata.items() if k != "k"}
        return (f"SparseTargets(shape={tuple(self.index.shape)}, logprobs={_dtype_name(self.logprobs.dtype)}, "
                f"device={self.device}, metadata={meta})")

    def to(self, device=None, dtype=None) -> "SparseTargets":
        """Move to ``device``; ``dtype`` (optional) converts the log-probs."""
        lp = self.logprobs.to(device=device, dtype=resolve_dtype(dtype) if dtype is not None else None)
        return SparseTargets(self.index.to(device), lp, dict(self.metadata))

    def mass(self) -> torch.Tensor:
        """P per position: the teacher mass the slots cover (fp32, [...])."""
        lp = self.logprobs.to(_compute_dtype(self.logprobs.dtype))
        return torch.where(self.index >= 0, lp.exp(), torch.zeros_like(lp)).sum(-1)

    def validate(self, vocab_size: int | None = None) -> "SparseTargets":
        """Read the data and raise ValueError on ids out of range, NaN or positive
        log-probs, or mass > 1 + 1e-3. Returns self."""
        validate_target_data(self.index, self.logprobs, vocab_size)
        return self

    # ------------------------------------------------------------------ slots

    def pad(self, k: int) -> "SparseTargets":
        """Grow to ``k`` slots, new slots empty (id -1, log-prob -inf)."""
        k = _check_k(k)
        if k < self.k:
            raise ValueError(f"pad(k={k}) cannot shrink {self.k} slots; use truncate(k={k})")
        extra = (*self.index.shape[:-1], k - self.k)
        index = torch.cat([self.index, self.index.new_full(extra, -1)], dim=-1)
        logprobs = torch.cat([self.logprobs, self.logprobs.new_full(extra, -torch.inf)], dim=-1)
        return SparseTargets(index, logprobs, dict(self.metadata))

    def truncate(self, k: int) -> "SparseTargets":
        """Keep the ``k`` slots of largest mass per position (sorted by mass, empty
        slots last); the dropped mass joins the tail (1 - P grows)."""
        k = _check_k(k)
        if k > self.k:
            raise ValueError(f"truncate(k={k}) cannot grow {self.k} slots; use pad(k={k})")
        lpf = self.logprobs.float().nan_to_num(nan=-3e38, neginf=-3e38)  # valid zero-mass slots ...
        key = torch.where(self.index >= 0, lpf, torch.full_like(lpf, -torch.inf))  # ... before empty ones
        pos = key.topk(k, dim=-1).indices
        index, logprobs = self.index.gather(-1, pos), self.logprobs.gather(-1, pos)
        return SparseTargets(index, logprobs, dict(self.metadata))

    def retemper(self, ratio: float) -> "SparseTargets":
        """Raise the teacher distribution to the power ``ratio`` = a and renormalise.

        With the tail bucket ``p_tail = max(0, 1 - P)`` treated as one more bucket,

            p_k' = p_k**a / Z,   p_tail' = p_tail**a / Z,   Z = sum_k p_k**a + p_tail**a

        i.e. ``logprobs' = a * logprobs - log Z`` on the valid slots. ``retemper(1)``
        is the identity (Z = 1), the slots still sum to <= 1, and when K = V (no tail)
        this is exactly the dense ``softmax(a * log p)``. For a teacher at temperature
        T this gives the teacher at T / a (metadata["temperature"] is updated); the
        tail, being one bucket for many tokens, is an approximation when K < V.

        A tail smaller than the rounding error of P (``eps(dtype) * sum_k p_k |log p_k|
        + K * eps(fp32)``) is taken as 0: otherwise, for a < 1, rounding noise in P
        (e.g. 1e-7 when K = V) would be amplified into visible tail mass."""
        a = _check_positive(ratio, "ratio")
        cd = _compute_dtype(self.logprobs.dtype)
        lp = self.logprobs.to(cd)
        valid = self.index >= 0
        neg = torch.full_like(lp, -torch.inf)
        lpa = torch.where(valid, lp * a, neg)
        log_tail = _tail_log(lp, valid)
        p = torch.where(valid, lp.exp(), torch.zeros_like(lp))
        noise = torch.finfo(self.logprobs.dtype).eps * (p * torch.where(valid, lp, 0.0).abs()).sum(-1) \
            + self.k * torch.finfo(cd).eps
        log_tail = torch.where(log_tail.exp() <= noise, torch.full_like(log_tail, -torch.inf), log_tail * a)
        log_z = torch.logsumexp(torch.cat([lpa, log_tail.unsqueeze(-1)], dim=-1), dim=-1, keepdim=True)
        out = torch.where(valid, lpa - log_z, neg).to(self.logprobs.dtype)
        meta = dict(self.metadata)
        if isinstance(meta.get("temperature"), (int, float)):
            meta["temperature"] = float(meta["temperature"]) / a
        return SparseTargets(self.index.clone(), out, meta)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_logits(cls, logits: torch.Tensor, k: int, temperature: float = 1.0, *,
                    chunk_rows: int | None = None, dtype=None, metadata: dict | None = None) -> "SparseTargets":
        """Top-``k`` of ``log_softmax(logits / temperature)`` per row of ``logits`` [..., V].

        Rows are processed in chunks (``chunk_rows``, default: about 2**24 elements
        per chunk), so the fp32 copies are chunk-sized [rows, V] temporaries, never [N, V].
        Log-probs come back in ``dtype`` (default fp32; fp64 for fp64 logits)."""
        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() < 1:
            raise TypeError("logits must be a floating-point tensor [..., V]")
        k = _check_k(k)
        t = _check_positive(temperature, "temperature")
        v = logits.shape[-1]
        if k > v:
            raise ValueError(f"k={k} is larger than the vocab size {v} (logits' last dim)")
        cd = torch.float64 if logits.dtype == torch.float64 else torch.float32
        out_dtype = resolve_dtype(dtype) if dtype is not None else cd
        lead = logits.shape[:-1]
        flat = logits.reshape(-1, v)
        n = flat.shape[0]
        if chunk_rows is None:
            chunk_rows = max(1, (1 << 24) // max(v, 1))
        chunk_rows = _check_k(chunk_rows, "chunk_rows")
        index = torch.empty(n, k, dtype=torch.int32, device=logits.device)
        logprobs = torch.empty(n, k, dtype=out_dtype, device=logits.device)
        for i in range(0, n, chunk_rows):
            x = flat[i:i + chunk_rows].to(cd, copy=True)
            if t != 1.0:
                x.div_(t)
            vals, ids = x.topk(k, dim=-1)
            lse = torch.logsumexp(x, dim=-1, keepdim=True)
            index[i:i + chunk_rows] = ids.to(torch.int32)
            logprobs[i:i + chunk_rows] = (vals - lse).to(out_dtype)
            del x
        meta = {"vocab_size": v, "temperature": t}
        meta.update(metadata or {})
        return cls(index.reshape(*lead, k), logprobs.reshape(*lead, k), meta)

    @classmethod
    def from_vllm_prompt_logprobs(cls, prompt_logprobs, k: int | None = None, *, dtype=torch.float32,
                                  metadata: dict | None = None) -> "SparseTargets":
        """Import vLLM ``prompt_logprobs`` (``SamplingParams(prompt_logprobs=n)``).

        ``prompt_logprobs`` is a list over the T prompt tokens of mappings token id ->
        log-prob (a float, or an object with a ``.logprob`` attribute, e.g. vLLM's
        ``Logprob``); entry 0 is None. A ``RequestOutput`` (anything with a
        ``.prompt_logprobs`` attribute) is accepted too.

        Alignment: vLLM's ``prompt_logprobs[t]`` is the distribution of token t given
        tokens < t, whereas targets row t is the distribution of the token after
        position t (DESIGN.md sec. 2). So row t = ``prompt_logprobs[t + 1]`` for
        t < T - 1, and the last row (nothing after the prompt) is empty (all -1).
        The result has T rows, aligned with the prompt's input_ids.

        vLLM returns the top-n ids plus the prompt token itself, so a position may
        hold n + 1 ids; ``k`` (default: the most ids at any position) keeps the k of
        largest mass, shorter positions are padded with empty slots."""
        if hasattr(prompt_logprobs, "prompt_logprobs"):
            prompt_logprobs = prompt_logprobs.prompt_logprobs
        if prompt_logprobs is None or isinstance(prompt_logprobs, (str, bytes, Mapping)) \
                or not hasattr(prompt_logprobs, "__len__"):
            raise TypeError("prompt_logprobs must be a list over positions of {token id: logprob} "
                            "mappings (vLLM RequestOutput.prompt_logprobs), entry 0 None")
        rows = []
        for t in range(1, len(prompt_logprobs)):
            entry = prompt_logprobs[t]
            if entry is None:
                rows.append({})
                continue
            if not hasattr(entry, "items"):
                raise TypeError(f"prompt_logprobs[{t}] is {type(entry).__name__}; expected a mapping "
                                "token id -> logprob (or None)")
            row = {}
            for tok, val in entry.items():
                lp = getattr(val, "logprob", val)
                try:
                    row[int(tok)] = float(lp)
                except (TypeError, ValueError):
                    raise TypeError(f"prompt_logprobs[{t}][{tok!r}] = {val!r} is not a log-prob (a float or "
                                    "an object with .logprob)") from None
            rows.append(row)
        n = len(prompt_logprobs)
        kmax = max([len(r) for r in rows] + [1])
        kk = kmax if k is None else _check_k(k)
        index = torch.full((n, max(kk, kmax)), -1, dtype=torch.int32)
        logprobs = torch.full((n, max(kk, kmax)), -torch.inf, dtype=torch.float64)
        for t, row in enumerate(rows):
            if row:
                items = sorted(row.items(), key=lambda kv: -kv[1])
                index[t, :len(items)] = torch.tensor([i for i, _ in items], dtype=torch.int32)
                logprobs[t, :len(items)] = torch.tensor([v for _, v in items], dtype=torch.float64)
        out = cls(index, logprobs.to(resolve_dtype(dtype)), dict(metadata or {}))
        if kk < out.k:
            out = out.truncate(kk)
        elif kk > out.k:
            out = out.pad(kk)
        return out

    # ------------------------------------------------------------------ files

    def save(self, path) -> None:
        """Write ``index`` + ``logprobs`` (+ metadata as JSON) to a safetensors file,
        atomically (temp file in the same directory, fsync, rename)."""
        from safetensors.torch import save
        tensors = {"index": self.index.detach().cpu().contiguous(),
                   "logprobs": self.logprobs.detach().cpu().contiguous()}
        _atomic_write(Path(path), save(tensors, metadata={METADATA_KEY: _json(self.metadata)}))

    @classmethod
    def load(cls, path, device="cpu") -> "SparseTargets":
        """Read a file written by ``save`` (or a shard written by ``build``)."""
        tensors, meta = _read_safetensors(Path(path), ("index", "logprobs"))
        return cls(tensors["index"], tensors["logprobs"], meta).to(device)


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
    cd = _compute_dtype(out_dtype)
    dev = targets[0].device

    ids, lps = [], []
    for t, wi in zip(targets, w):
        idx = t.index.reshape(-1, t.k).long()
        lp = t.logprobs.reshape(-1, t.k).to(cd) + math.log(wi)
        valid = idx >= 0
        ids.append(torch.where(valid, idx, torch.full_like(idx, -1)))
        lps.append(torch.where(valid, lp, torch.full_like(lp, -torch.inf)))
    ids = torch.cat(ids, dim=-1)                     # [N, M]
    lps = torch.cat(lps, dim=-1)
    rows, m = ids.shape
    sentinel = torch.iinfo(torch.int64).max          # empty slots sort last
    ids = torch.where(ids >= 0, ids, torch.full_like(ids, sentinel))
    ids, order = ids.sort(dim=-1)
    lps = lps.gather(-1, order)
    # segment ids: position of each slot's first occurrence of its token id
    start = torch.ones_like(ids, dtype=torch.bool)
    start[:, 1:] = ids[:, 1:] != ids[:, :-1]
    seg = start.long().cumsum(-1) - 1                # [N, M] in [0, M)
    seg_max = torch.full((rows, m), -torch.inf, dtype=cd, device=dev)
    seg_max = seg_max.scatter_reduce(1, seg, lps, reduce="amax", include_self=True)
    shift = torch.where(torch.isfinite(seg_max), seg_max, torch.zeros_like(seg_max))
    seg_sum = torch.zeros((rows, m), dtype=cd, device=dev).scatter_add(1, seg, (lps - shift.gather(1, seg)).exp())
    seg_lp = shift + seg_sum.log()                   # log of the blended mass per segment
    seg_id = torch.full((rows, m), sentinel, dtype=torch.int64, device=dev).scatter(1, seg, ids)
    real = seg_id != sentinel
    # order: real ids by mass (zero-mass real ids before unused segments)
    key = torch.where(real, seg_lp.nan_to_num(neginf=torch.finfo(cd).min), torch.full_like(seg_lp, -torch.inf))
    if kout <= m:
        pos = key.topk(kout, dim=-1).indices
    else:
        pos = key.sort(dim=-1, descending=True).indices
    out_id = seg_id.gather(1, pos)
    out_lp = seg_lp.gather(1, pos)
    keep = out_id != sentinel
    out_id = torch.where(keep, out_id, torch.full_like(out_id, -1)).to(torch.int32)
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


# --------------------------------------------------------------------------- files


def _json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent/old or complete:
    temp file in the same directory, fsync, os.replace, fsync of the directory."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename durable; not possible on every platform
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _corrupt(path: Path, why: str) -> ValueError:
    return ValueError(f"targets file {str(path)!r} is truncated or corrupted ({why}); delete it and "
                      "re-run the build (dft-kernels targets build / dk.targets.build) to regenerate it")


def _read_header(path: Path):
    """Open a safetensors file lazily: (handle, metadata dict). Errors name the file."""
    from safetensors import SafetensorError, safe_open
    if not path.is_file():
        raise FileNotFoundError(f"targets file {str(path)!r} does not exist")
    try:
        handle = safe_open(str(path), framework="pt")
        raw = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise _corrupt(path, str(e)) from None
    if METADATA_KEY not in raw:
        raise _corrupt(path, f"no {METADATA_KEY!r} metadata: not written by dft_kernels")
    try:
        meta = json.loads(raw[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise _corrupt(path, f"metadata is not JSON: {e}") from None
    if not isinstance(meta, dict):
        raise _corrupt(path, "metadata is not a JSON object")
    return handle, meta


def _read_safetensors(path: Path, names: Sequence[str]):
    handle, meta = _read_header(Path(path))
    with handle:  # closes the memory map (the file may be replaced next)
        keys = set(handle.keys())
        missing = [n for n in names if n not in keys]
        if missing:
            raise _corrupt(Path(path), f"missing tensors {missing}")
        try:
            tensors = {n: handle.get_tensor(n).clone() for n in names}
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise _corrupt(Path(path), str(e)) from None
    return tensors, meta


def _sha256_tensors(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def input_ids_sha256(sequences: Iterable) -> str:
    """sha256 identifying a list of token-id sequences: the lengths (int64 LE) then
    the concatenated ids (int64 LE). Stored in each shard's metadata."""
    arrs = [np.asarray(s.cpu() if isinstance(s, torch.Tensor) else s, dtype="<i8").reshape(-1)
            for s in sequences]
    h = hashlib.sha256()
    h.update(np.asarray([len(a) for a in arrs], dtype="<i8").tobytes())
    for a in arrs:
        h.update(a.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- build


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _as_sequences(batch, where: str) -> list[torch.Tensor]:
    """One batch -> list of 1-D int64 CPU sequences (padding dropped via attention_mask)."""
    def seq(x, what):
        if isinstance(x, (list, tuple)) and len(x) == 0:
            return torch.empty(0, dtype=torch.int64)
        t = torch.as_tensor(x)
        if t.is_floating_point() or t.dtype == torch.bool or t.dim() != 1:
            raise TypeError(f"{what} must be a 1-D sequence of integer token ids, got "
                            f"{'dtype ' + str(t.dtype) if t.dim() == 1 else 'shape ' + str(tuple(t.shape))}")
        return t.detach().to("cpu", torch.int64)

    def rows(x, what):
        if isinstance(x, torch.Tensor):
            if x.dim() == 1:
                return [x]
            if x.dim() == 2:
                return list(x)
            raise TypeError(f"{what} must be [B, T] or [T], got shape {tuple(x.shape)}")
        if isinstance(x, (list, tuple)):
            return [x] if x and all(isinstance(v, Integral) for v in x) else list(x)
        return rows(torch.as_tensor(x), what)

    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise TypeError(f"{where} is a dict without 'input_ids'")
        ids = rows(batch["input_ids"], f"{where}['input_ids']")
        mask = batch.get("attention_mask")
        masks = None if mask is None else rows(mask, f"{where}['attention_mask']")
        if masks is not None and len(masks) != len(ids):
            raise ValueError(f"{where}['attention_mask'] has {len(masks)} rows, input_ids {len(ids)}")
        out = []
        for j, row in enumerate(ids):
            t = seq(row, f"{where}['input_ids'][{j}]")
            if masks is not None:
                m = torch.as_tensor(masks[j]).to("cpu").bool()
                if m.shape != t.shape:
                    raise ValueError(f"{where}['attention_mask'][{j}] has shape {tuple(m.shape)}, "
                                     f"input_ids {tuple(t.shape)}")
                t = t[m]
            out.append(t)
        return out
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 1:
            return [seq(batch, where)]
        if batch.dim() == 2:
            return [seq(r, f"{where}[{j}]") for j, r in enumerate(batch)]
        raise TypeError(f"{where} must be [B, T] or [T] token ids, got shape {tuple(batch.shape)}")
    if isinstance(batch, (list, tuple)):
        if not batch:
            return []
        if all(isinstance(x, Integral) for x in batch):
            return [seq(list(batch), where)]
        out = []
        for j, x in enumerate(batch):
            if isinstance(x, Mapping):
                if "input_ids" not in x:
                    raise TypeError(f"{where}[{j}] is a dict without 'input_ids'")
                out.append(seq(x["input_ids"], f"{where}[{j}]['input_ids']"))
            else:
                out.append(seq(x, f"{where}[{j}]"))
        return out
    raise TypeError(f"{where} is {type(batch).__name__}; a batch must be a dict with 'input_ids' "
                    "(+ 'attention_mask'), a [B, T] tensor, or a list of token-id sequences / example dicts")


def _iter_sequences(batches):
    if isinstance(batches, (Mapping, torch.Tensor)):
        batches = [batches]
    for b, batch in enumerate(batches):
        for s in _as_sequences(batch, f"batches[{b}]"):
            yield b, s


class _Teacher:
    """The pieces of a HF causal LM the build needs: decoder, lm_head, softcap."""

    def __init__(self, model, name=None):
        if isinstance(model, (str, os.PathLike)):
            from transformers import AutoModelForCausalLM
            path = str(model)
            model = AutoModelForCausalLM.from_pretrained(path)
            name = name or path
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"teacher must be a Hugging Face causal LM (torch module) or a model path, "
                            f"got {type(model).__name__}")
        self.model = model
        decoder = None
        if hasattr(model, "get_decoder"):
            try:
                decoder = model.get_decoder()
            except (AttributeError, NotImplementedError):
                decoder = None
        if decoder is None or decoder is model:
            decoder = getattr(model, "model", None)
            if decoder is None:
                decoder = getattr(model, getattr(model, "base_model_prefix", "") or "model", None)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if decoder is None or head is None or getattr(head, "weight", None) is None:
            raise TypeError("teacher must be a Hugging Face causal LM with a decoder (model.model / "
                            "get_decoder()) and an lm_head (get_output_embeddings())")
        self.decoder = decoder
        self.weight = head.weight
        self.bias = getattr(head, "bias", None)
        cfg = getattr(model, "config", None)
        tcfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

        def option(key):
            val = getattr(cfg, key, None)
            val = getattr(tcfg, key, None) if val is None else val
            return float(val) if isinstance(val, (int, float)) and not isinstance(val, bool) and val else None

        # what the model's own forward does to lm_head's output: Gemma-2 style softcap,
        # Cohere's logit_scale (multiply), Granite's logits_scaling (divide)
        self.softcap = option("final_logit_softcapping")
        self.scale = (option("logit_scale") or 1.0) / (option("logits_scaling") or 1.0)
        self.vocab_size = int(self.weight.shape[0])
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        self.input_vocab = int(emb.weight.shape[0]) if emb is not None else self.vocab_size
        self.device = emb.weight.device if emb is not None else self.weight.device
        self.name = name or getattr(cfg, "name_or_path", None) or getattr(cfg, "_name_or_path", None) \
            or type(model).__name__

    @torch.inference_mode()
    def topk(self, seqs: list[torch.Tensor], k: int, temperature: float, chunk_vocab: int,
             chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k ids and fp32 log-probs for every position of ``seqs`` (concatenated)."""
        lengths = [len(s) for s in seqs]
        n = sum(lengths)
        if n == 0:
            return torch.empty(0, k, dtype=torch.int32), torch.empty(0, k)
        live = [s for s in seqs if len(s)]
        T = max(len(s) for s in live)
        ids = torch.zeros(len(live), T, dtype=torch.long)
        mask = torch.zeros(len(live), T, dtype=torch.long)
        for j, s in enumerate(live):
            ids[j, :len(s)] = s
            mask[j, :len(s)] = 1
        out = self.decoder(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        h = hidden[mask.to(hidden.device).bool()].to(self.weight.device)  # [n, D], sequences in order
        del out, hidden
        index = torch.empty(n, k, dtype=torch.int32)
        logprobs = torch.empty(n, k, dtype=torch.float32)
        for r in range(0, n, chunk_rows):
            i, lp = _chunked_topk(h[r:r + chunk_rows], self.weight, self.bias, k, temperature, self.softcap,
                                  chunk_vocab, self.scale)
            index[r:r + chunk_rows] = i.cpu()
            logprobs[r:r + chunk_rows] = lp.cpu()
        return index, logprobs


def _chunked_topk(h, weight, bias, k, temperature, softcap, chunk_vocab, scale=1.0):
    """Top-k of log_softmax over the full vocab, one [rows, chunk_vocab] logits tile at
    a time: a running top-k and a running log-sum-exp (fp32)."""
    rows, v = h.shape[0], weight.shape[0]
    best_v = torch.empty(rows, 0, dtype=torch.float32, device=h.device)
    best_i = torch.empty(rows, 0, dtype=torch.long, device=h.device)
    lse = torch.full((rows,), -torch.inf, dtype=torch.float32, device=h.device)
    for c0 in range(0, v, chunk_vocab):
        c1 = min(v, c0 + chunk_vocab)
        z = torch.nn.functional.linear(h, weight[c0:c1], None if bias is None else bias[c0:c1]).float()
        if scale != 1.0:
            z = z * scale
        if softcap is not None:
            z = torch.tanh(z / softcap) * softcap
        if temperature != 1.0:
            z = z / temperature
        lse = torch.logaddexp(lse, torch.logsumexp(z, dim=-1))
        vals, ids = z.topk(min(k, c1 - c0), dim=-1)
        best_v = torch.cat([best_v, vals], dim=-1)
        best_i = torch.cat([best_i, ids + c0], dim=-1)
        if best_v.shape[1] > k:
            best_v, pos = best_v.topk(k, dim=-1)
            best_i = best_i.gather(1, pos)
    best_v, pos = best_v.sort(dim=-1, descending=True, stable=True)
    best_i = best_i.gather(1, pos)
    return best_i.to(torch.int32), best_v - lse.unsqueeze(-1)


def _write_shard(path: Path, *, index, logprobs, seqs, meta) -> dict:
    from safetensors.torch import save
    input_ids = torch.cat(seqs) if seqs else torch.empty(0, dtype=torch.int64)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    meta = dict(meta)
    meta["data_sha256"] = _sha256_tensors(index, logprobs)
    data = save({"index": index.contiguous(), "logprobs": logprobs.contiguous(),
                 "input_ids": input_ids.contiguous(), "lengths": lengths},
                metadata={METADATA_KEY: _json(meta)})
    _atomic_write(path, data)
    return meta


def read_shard(path, *, check_data: bool = True) -> tuple[dict, dict]:
    """Load a whole shard: (tensors, metadata), checking shapes and the stored
    hashes (input ids always, index/logprobs when ``check_data``). ValueError naming
    the file on any inconsistency."""
    path = Path(path)
    tensors, meta = _read_safetensors(path, ("index", "logprobs", "input_ids", "lengths"))
    _check_shard(path, meta, tensors, check_data=check_data)
    return tensors, meta


def _check_shard(path: Path, meta: dict, tensors: dict, *, check_data: bool) -> None:
    idx, lp, ids, lengths = (tensors[n] for n in ("index", "logprobs", "input_ids", "lengths"))
    n = ids.shape[0] if ids.dim() == 1 else -1
    if idx.dim() != 2 or idx.shape != lp.shape or ids.dim() != 1 or idx.shape[0] != n \
            or lengths.dim() != 1 or int(lengths.sum()) != n or idx.shape[1] != meta.get("k"):
        raise _corrupt(path, "tensor shapes are inconsistent")
    if meta.get("n_sequences") != lengths.shape[0] or meta.get("n_positions") != n:
        raise _corrupt(path, "sequence / position counts disagree with the metadata")
    got = input_ids_sha256(torch.split(ids, lengths.tolist()))
    if got != meta.get("input_ids_sha256"):
        raise _corrupt(path, "input_ids do not match their sha256")
    if check_data and _sha256_tensors(idx, lp) != meta.get("data_sha256"):
        raise _corrupt(path, "index/logprobs do not match their sha256")


def build(teacher, batches, k: int, temperature: float = 1.0, *, out_dir, shard_size: int = 1024,
          chunk_vocab: int = 8192, chunk_rows: int = 8192, dtype=torch.float16, teacher_name: str | None = None,
          progress: bool = True, total: int | None = None) -> dict:
    """Run ``teacher`` over ``batches`` and store its top-``k`` log-probs as shards.

    ``teacher``: a Hugging Face causal LM (or a local model path). Its decoder gives
    the last hidden state; the logits are formed one [rows, chunk_vocab] tile at a
    time from ``get_output_embeddings()`` (the config's Gemma-2
    ``final_logit_softcapping``, Cohere ``logit_scale`` and Granite
    ``logits_scaling`` honoured, then divided by ``temperature``; matmul in the
    teacher's dtype, as its own forward does, the rest in fp32) with a running top-k and a running
    log-sum-exp, so the log-probs are normalised over the full vocab and the
    [N, V] logits never exist.

    ``batches``: an iterable of batches, each a dict with ``input_ids`` [B, T]
    (+ ``attention_mask``: masked tokens are dropped), a [B, T] tensor, or a list of
    token-id sequences or example dicts. Every sequence is numbered in order; shard
    i holds sequences [i*shard_size, (i+1)*shard_size). The teacher runs each batch
    (its part in a shard) right-padded.

    Row t of a sequence = the teacher's distribution for the token after position t.

    Files (in ``out_dir``): ``shard-00000.safetensors`` ... (see module doc) and
    ``manifest.json``, both written atomically. Re-running with the same data
    skips shards already on disk whose hashes verify (resume after a crash); a shard
    that fails verification is recomputed. A tqdm bar counts sequences (``total``:
    their number, if known; ``progress=False`` hides it). Log-probs are stored in
    ``dtype`` (fp16 default; bf16 / fp32). Returns the manifest dict."""
    k = _check_k(k)
    temperature = _check_positive(temperature, "temperature")
    shard_size = _check_k(shard_size, "shard_size")
    chunk_vocab = _check_k(chunk_vocab, "chunk_vocab")
    chunk_rows = _check_k(chunk_rows, "chunk_rows")
    dtype = resolve_dtype(dtype)
    if dtype == torch.float64:
        raise TypeError("dtype=torch.float64 is not a storage dtype; use float16, bfloat16 or float32")
    if out_dir is None:
        raise ValueError("out_dir is required: the directory the shards and manifest.json go to")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(_TMP_PREFIX + "*"):  # leftovers of a crash mid-write
        try:
            stale.unlink()
        except OSError:
            pass
    tm = _Teacher(teacher, teacher_name)
    if k > tm.vocab_size:
        raise ValueError(f"k={k} is larger than the teacher's vocab size {tm.vocab_size}")

    params = {"format": SHARD_FORMAT, "teacher": str(tm.name), "vocab_size": tm.vocab_size, "k": k,
              "temperature": temperature, "dtype": _dtype_name(dtype), "shard_size": shard_size}
    mpath = out / MANIFEST
    if mpath.exists():
        try:
            old = json.loads(mpath.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        for key, val in params.items():
            if key in old and old[key] != val:
                raise ValueError(f"out_dir {str(out)!r} holds targets built with {key}={old[key]!r}, this build "
                                 f"has {key}={val!r}: use a new out_dir (or delete the old one)"
                                 + ("; pass teacher_name= to keep the old name" if key == "teacher" else ""))

    from tqdm.auto import tqdm
    bar = tqdm(total=total, unit="seq", desc="teacher top-k", disable=not progress, dynamic_ncols=True)

    entries: list[dict] = []
    stats = {"n_sequences": 0, "n_positions": 0}

    def write_manifest(complete: bool):
        man = dict(params)
        man.update(complete=complete, n_sequences=stats["n_sequences"], n_positions=stats["n_positions"],
                   shards=entries)
        _atomic_write(mpath, (json.dumps(man, indent=1, sort_keys=True) + "\n").encode())
        return man

    def finish_shard(buf: list[tuple[int, torch.Tensor]]):
        s = len(entries)
        seqs = [x for _, x in buf]
        path = out / shard_name(s)
        meta = dict(params, shard=s, first_sequence=s * shard_size, n_sequences=len(seqs),
                    n_positions=sum(len(x) for x in seqs), input_ids_sha256=input_ids_sha256(seqs))
        done = None
        if path.exists():
            try:
                _, old_meta = read_shard(path)
                if all(old_meta.get(key) == val for key, val in meta.items()):
                    done = old_meta
            except (ValueError, FileNotFoundError):
                done = None
        if done is None:
            idx_parts, lp_parts = [], []
            j = 0
            while j < len(buf):  # the part of each user batch that falls in this shard
                e = j
                while e < len(buf) and buf[e][0] == buf[j][0]:
                    e += 1
                i, lp = tm.topk(seqs[j:e], k, temperature, chunk_vocab, chunk_rows)
                idx_parts.append(i)
                lp_parts.append(lp.to(dtype))
                bar.update(e - j)
                j = e
            done = _write_shard(path, index=torch.cat(idx_parts), logprobs=torch.cat(lp_parts), seqs=seqs,
                                meta=meta)
        else:
            bar.update(len(seqs))
        entries.append({"file": path.name, "first_sequence": done["first_sequence"],
                        "n_sequences": done["n_sequences"], "n_positions": done["n_positions"],
                        "input_ids_sha256": done["input_ids_sha256"], "data_sha256": done["data_sha256"]})
        stats["n_sequences"] += done["n_sequences"]
        stats["n_positions"] += done["n_positions"]
        write_manifest(complete=False)

    was_training = tm.model.training
    tm.model.eval()
    try:
        buf: list[tuple[int, torch.Tensor]] = []
        for b, s in _iter_sequences(batches):
            if int(s.numel()) and (int(s.min()) < 0 or int(s.max()) >= tm.input_vocab):
                raise ValueError(f"batches[{b}] holds token id {int(s.max()) if int(s.min()) >= 0 else int(s.min())}"
                                 f" outside the teacher's vocab [0, {tm.input_vocab}): wrong tokenizer?")
            buf.append((b, s))
            if len(buf) == shard_size:
                finish_shard(buf)
                buf = []
        if buf or not entries:
            finish_shard(buf)
    finally:
        tm.model.train(was_training)
        bar.close()
    return write_manifest(complete=True)


# --------------------------------------------------------------------------- reading a build


def read_manifest(targets_dir) -> dict:
    """The manifest of a build directory; ValueError if missing or unreadable."""
    path = Path(targets_dir) / MANIFEST
    if not path.is_file():
        raise ValueError(f"targets_dir {str(targets_dir)!r} has no {MANIFEST}: build targets first "
                         "(dft-kernels targets build / dk.targets.build)")
    try:
        man = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}); re-run the build to rewrite it") from None
    if not isinstance(man, dict) or man.get("format") != SHARD_FORMAT or not isinstance(man.get("shards"), list):
        raise ValueError(f"{str(path)!r} is not a dft_kernels targets manifest (format {SHARD_FORMAT})")
    return man


def inspect(targets_dir, *, bins: int = 10000) -> dict:
    """Summary of a build: positions, sequences, K, vocab, temperature, teacher, and
    the teacher mass P covered by the top-K per position: its mean and its 5th
    percentile (the smallest x with P <= x at >= 5% of the positions, rounded up to
    a ``bins``-bin histogram edge, i.e. to 1/bins; memory does not grow with N)."""
    man = read_manifest(targets_dir)
    hist = torch.zeros(bins, dtype=torch.float64)
    total, count = 0.0, 0
    for e in man["shards"]:
        tensors, _ = read_shard(Path(targets_dir) / e["file"], check_data=False)
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
            "temperature": man.get("temperature"), "dtype": man.get("dtype"), "complete": man.get("complete"),
            "n_shards": len(man["shards"]), "n_sequences": man.get("n_sequences"), "n_positions": count,
            "mass_mean": total / count if count else float("nan"), "mass_p5": p5}
