"""``SparseTargets``: a teacher's sparse distribution per position (docs/design.md sec. 2).

``index`` [..., K] int32 token ids (-1 = empty slot) and ``logprobs`` [..., K]
log-probabilities normalised over the teacher's *full* vocabulary, so the slots hold
P = sum_k exp(logprobs_k) <= 1 and the rest, 1 - P, is the tail. Row t of a sequence
is the teacher's distribution for the token *after* position t.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Mapping

import torch

from ..validation import check_logits_input, compute_dtype, mass_rounding, validate_target_data
from .store import METADATA_KEY, atomic_write, metadata_json, read_safetensors

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
        lp = self.logprobs.to(compute_dtype(self.logprobs.dtype))
        return torch.where(self.index >= 0, lp.exp(), torch.zeros_like(lp)).sum(-1)

    def validate(self, vocab_size: int | None = None) -> "SparseTargets":
        """Read the data and raise ValueError on ids out of range, NaN or positive
        log-probs, or mass > 1 + 1e-3 + its storage rounding. Returns self."""
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
        tau this gives the teacher at tau / a (metadata["temperature"] is updated); the
        tail, being one bucket for many tokens, is an approximation when K < V.

        A tail smaller than the rounding error of P (``eps(dtype) * sum_k p_k |log p_k|
        + K * eps(fp32)``) is taken as 0: otherwise, for a < 1, rounding noise in P
        (e.g. 1e-7 when K = V) would be amplified into visible tail mass.

        Args:
            ratio: the power ``a`` > 0.
        Returns:
            New SparseTargets: the same ``index`` [..., K], ``logprobs`` [..., K] in the
            same dtype."""
        a = _check_positive(ratio, "ratio")
        from .sampling import is_sampled
        if is_sampled(self.metadata) and a != 1.0:
            raise ValueError(f"retemper() of {self.metadata['kind']} targets would be biased: p_hat**a is not an "
                             "estimate of p**a (docs/design.md sec. 12); rebuild them at the new temperature")
        cd = compute_dtype(self.logprobs.dtype)
        lp = self.logprobs.to(cd)
        valid = self.index >= 0
        neg = torch.full_like(lp, -torch.inf)
        lpa = torch.where(valid, lp * a, neg)
        log_tail = _tail_log(lp, valid)
        noise = mass_rounding(self.logprobs, valid)
        log_tail = torch.where(log_tail.exp() <= noise, torch.full_like(log_tail, -torch.inf), log_tail * a)
        log_z = torch.logsumexp(torch.cat([lpa, log_tail.unsqueeze(-1)], dim=-1), dim=-1, keepdim=True)
        out = torch.where(valid, lpa - log_z, neg).to(self.logprobs.dtype)
        meta = dict(self.metadata)
        if isinstance(meta.get("temperature"), (int, float)):
            meta["temperature"] = float(meta["temperature"]) / a
        return SparseTargets(self.index.clone(), out, meta)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_logits(cls, logits: torch.Tensor, k: int, temperature: float = 1.0, *, samples: int = 0,
                    generator: torch.Generator | None = None, chunk_rows: int | None = None, dtype=None,
                    metadata: dict | None = None) -> "SparseTargets":
        """Top-``k`` of ``log_softmax(logits / temperature)`` per row of ``logits`` [..., V],
        plus ``samples`` draws from the rest of the vocab (docs/design.md sec. 12).

        ``samples=0``: plain top-k. ``k > 0, samples > 0``: hybrid (the top-k, then each
        distinct drawn id with ``log((1 - P_topk) * count / samples)``); ``k=0``: sampled.
        Then K = k + samples slots (repeated draws share one, the rest are -1 / -inf
        padding), each row sums to 1, and the metadata holds ``kind``, ``topk`` (= k),
        ``samples``, ``seed`` (``generator.initial_seed()``, None without a generator)
        and ``temperature``. ``generator``: the draws' torch.Generator (None: torch's).

        Rows are processed in chunks (``chunk_rows``, default: about 2**24 elements
        per chunk), so the fp32 copies are chunk-sized [rows, V] temporaries, never [N, V].
        Log-probs come back in ``dtype`` (default fp32; fp64 for fp64 logits). NaN or +inf
        logits and probabilities passed as logits (every value in [0, 1], rows summing to
        1) raise ValueError (``validation.check_logits_input``)."""
        from .sampling import check_sampling, sampling_metadata, targets_from_logits
        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() < 1:
            raise TypeError("logits must be a floating-point tensor [..., V]")
        check_logits_input(logits)      # NaN / +inf logits, probabilities passed as logits: refused
        k, samples = check_sampling(k, samples)
        if samples == 0:
            k = _check_k(k)
        t = _check_positive(temperature, "temperature")
        v = logits.shape[-1]
        if k > v:
            raise ValueError(f"k={k} is larger than the vocab size {v} (logits' last dim)")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        cd = compute_dtype(logits.dtype)
        out_dtype = resolve_dtype(dtype) if dtype is not None else cd
        lead = logits.shape[:-1]
        flat = logits.reshape(-1, v)
        if chunk_rows is None:
            chunk_rows = max(1, (1 << 24) // max(v, 1))
        chunk_rows = _check_k(chunk_rows, "chunk_rows")
        index, logprobs = targets_from_logits(flat, k, samples, t, generator, chunk_rows=chunk_rows,
                                              out_dtype=out_dtype)
        meta = {"vocab_size": v, "temperature": t}
        if samples:
            meta.update(sampling_metadata(k, samples, None if generator is None else generator.initial_seed(), t))
        meta.update(metadata or {})
        return cls(index.reshape(*lead, k + samples), logprobs.reshape(*lead, k + samples), meta)

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
        position t (docs/design.md sec. 2). So row t = ``prompt_logprobs[t + 1]`` for
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
        atomic_write(Path(path), save(tensors, metadata={METADATA_KEY: metadata_json(self.metadata)}))

    @classmethod
    def load(cls, path, device="cpu") -> "SparseTargets":
        """Read a file written by ``save`` (or a shard written by ``build``)."""
        tensors, meta = read_safetensors(Path(path), ("index", "logprobs"))
        return cls(tensors["index"], tensors["logprobs"], meta).to(device)
