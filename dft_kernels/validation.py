"""Input checks below the losses, the reference and the targets: shapes and dtypes
(free), the data checks that read the targets (``validate=True``), and the compute
dtype rule."""
from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (gradcheck, references); everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _is_int(t: torch.Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def check_targets(lead: tuple, target_index, target_logprobs, labels, *, what: str):
    """Shape / dtype checks (no data read). ``lead`` = leading dims of the student."""
    if (target_index is None) != (target_logprobs is None):
        raise ValueError("target_index and target_logprobs go together: pass both or neither")
    if target_index is not None:
        if not isinstance(target_index, torch.Tensor) or not _is_int(target_index):
            raise TypeError(f"target_index must be an integer tensor (int32 or int64 token ids), got "
                            f"{getattr(target_index, 'dtype', type(target_index))}")
        if not isinstance(target_logprobs, torch.Tensor) or not target_logprobs.is_floating_point():
            raise TypeError(f"target_logprobs must be a floating-point tensor of log-probabilities, got "
                            f"{getattr(target_logprobs, 'dtype', type(target_logprobs))}")
        if target_index.shape != target_logprobs.shape:
            raise ValueError(f"target_index {tuple(target_index.shape)} and target_logprobs "
                             f"{tuple(target_logprobs.shape)} must have the same shape [..., K]")
        if target_index.dim() < 1 or tuple(target_index.shape[:-1]) != tuple(lead):
            raise ValueError(f"target_index has shape {tuple(target_index.shape)}; expected "
                             f"{tuple(lead)} + (K,) to match the leading dims of {what}")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or not _is_int(labels):
            raise TypeError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels))}")
        if tuple(labels.shape) != tuple(lead):
            raise ValueError(f"labels has shape {tuple(labels.shape)}; expected {tuple(lead)} "
                             f"(the leading dims of {what})")


def mass_rounding(logprobs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Bound on the rounding error of P = sum_k exp(logprobs_k) that storing the log-probs
    in their dtype causes: ``eps(dtype) * sum_k p_k |log p_k| + K * eps(compute dtype)``.

    Args:
        logprobs: [..., K] log-probs (any float dtype); valid: [..., K] bool, the used slots.
    Returns:
        [...] in the compute dtype.
    """
    cd = compute_dtype(logprobs.dtype)
    lp = torch.where(valid, logprobs.to(cd), 0.0)
    p = torch.where(valid, lp.exp(), 0.0)
    spread = torch.where(p > 0, p * lp.abs(), 0.0).sum(-1)          # 0 * inf (zero-mass slots) is 0
    return torch.finfo(logprobs.dtype).eps * spread + logprobs.shape[-1] * torch.finfo(cd).eps


def validate_target_data(index: torch.Tensor, logprobs: torch.Tensor, vocab_size: int | None,
                         *, name: str = "target") -> None:
    """The checks that read the data: ids in [-1, vocab_size), log-probs not NaN and <= 0,
    mass per position <= 1 + 1e-3 (+ storage rounding). One host sync when the data is
    fine; the messages are worked out only when it is not.

    Args:
        index: [..., K] int ids (-1 = empty slot); logprobs: [..., K] float log-probs.
        vocab_size: the student's vocab size, or None (not checked).
        name: how the messages call the pair (``{name}_index`` / ``{name}_logprobs``).
    Raises:
        ValueError naming the problem and the likely fix.
    """
    if index.numel() == 0:
        return
    lp32 = logprobs.to(compute_dtype(logprobs.dtype))
    ok_slots = index >= 0
    mass = torch.where(ok_slots, lp32.exp(), torch.zeros_like(lp32)).sum(-1)
    over_one = mass > 1 + 1e-3 + mass_rounding(logprobs, ok_slots)
    stats = torch.stack([index.max().double(), index.min().double(), lp32.max().double(),
                         over_one.any().double()]).tolist()   # the one host sync
    hi, lo, lp_max, over = stats
    if (vocab_size is None or hi < vocab_size) and lo >= -1 and lp_max <= 1e-6 and not over:
        return   # NaN makes lp_max NaN, which fails the test above
    if vocab_size is not None:
        hi = int(index.max())
        if hi >= vocab_size:
            raise ValueError(f"{name}_index holds id {hi} >= the student's vocab size {vocab_size}: "
                             "is the teacher's vocab larger than the student's? Map or drop those ids")
    lo = int(index.min())
    if lo < -1:
        raise ValueError(f"{name}_index holds id {lo} < -1; only -1 marks an empty slot")
    lp = logprobs.float()
    if bool(torch.isnan(lp).any()):
        raise ValueError(f"{name}_logprobs holds NaN")
    if bool((lp > 1e-6).any()):
        raise ValueError(f"{name}_logprobs holds positive values ({float(lp.max()):.4g}): log-probabilities "
                         "are <= 0 -- did you pass logits instead of log-probs?")
    valid = index >= 0
    mass = torch.where(valid, lp.exp(), torch.zeros_like(lp)).sum(-1)
    # a sum that is 1 (sampled / hybrid targets, K = V) may exceed it by its storage rounding
    if bool((mass > 1 + 1e-3 + mass_rounding(logprobs, valid)).any()):
        raise ValueError(f"{name}_logprobs: probabilities of a position sum to {float(mass.max()):.4g} > 1 + 1e-3 "
                         "-- did you pass logits instead of log-probs (apply log_softmax first)?")


def validate_labels(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    lab = labels[labels != ignore_index]
    if lab.numel() and (int(lab.max()) >= vocab_size or int(lab.min()) < 0):
        raise ValueError(f"labels hold ids outside [0, {vocab_size}) other than ignore_index={ignore_index}")
