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
    """The checks that read the data: ids in [-1, vocab_size), log-probs of the used slots
    (id >= 0) not NaN and <= 0, mass per position <= 1 + 1e-3 (+ storage rounding). One
    host sync when the data is fine; the messages are worked out only when it is not.

    Args:
        index: [..., K] int ids (-1 = empty slot); logprobs: [..., K] float log-probs.
        vocab_size: the student's vocab size, or None (not checked).
        name: how the messages call the pair (``{name}_index`` / ``{name}_logprobs``).
    Raises:
        ValueError naming the problem and the likely fix.
    """
    if index.numel() == 0:
        return
    ok_slots = index >= 0      # the value of an empty slot (-1) is never read: not checked
    lp32 = torch.where(ok_slots, logprobs.to(compute_dtype(logprobs.dtype)), -torch.inf)
    mass = lp32.exp().sum(-1)
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
    lp = torch.where(index >= 0, logprobs.float(), -torch.inf)
    if bool(torch.isnan(lp).any()):
        raise ValueError(f"{name}_logprobs holds NaN: fix the targets, or mark the slot empty (id -1, "
                         "log-prob -inf)")
    if bool((lp > 1e-6).any()):
        raise ValueError(f"{name}_logprobs holds positive values ({float(lp.max()):.4g}): log-probabilities "
                         "are <= 0 -- did you pass logits instead of log-probs (or probabilities)? Apply "
                         "log_softmax first")
    valid = index >= 0
    mass = torch.where(valid, lp.exp(), torch.zeros_like(lp)).sum(-1)
    # a sum that is 1 (sampled / hybrid targets, K = V) may exceed it by its storage rounding
    if bool((mass > 1 + 1e-3 + mass_rounding(logprobs, valid)).any()):
        raise ValueError(f"{name}_logprobs: probabilities of a position sum to {float(mass.max()):.4g} > 1 + 1e-3 "
                         "-- did you pass logits instead of log-probs (apply log_softmax first)?")


def validate_labels(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    lab = labels[labels != ignore_index]
    if lab.numel() and (int(lab.max()) >= vocab_size or int(lab.min()) < 0):
        raise ValueError(f"labels hold ids outside [0, {vocab_size}) other than ignore_index={ignore_index} "
                         f"(min {int(lab.min())}, max {int(lab.max())}): are they from another tokenizer, or "
                         "padded with another value than ignore_index?")


# --------------------------------------------------------------------------- always-on checks
#
# docs/design.md sec. 7, "nothing silently wrong": the loss entry points compute a few
# device-side booleans on the [N, K] targets and the [N] labels (elementwise work, no
# host sync) and hand them to ``raise_when``. On CPU they are read at once; on CUDA they
# are copied to pinned host memory behind an event and read when the copy has landed:
# at the next loss call, or at ``flush_checks()`` (``DFTTrainer`` calls it when it logs).

#: private switch for benchmarks/check_overhead.py (timing the checks); not an option
_ALWAYS_ON = True
#: the tolerance of "log-probs are <= 0"
POSITIVE_TOL = 1e-6
#: pending device-side flags: (event, host copy, explain, where)
_PENDING: list = []
_MAX_PENDING = 64

TARGET_CHECKS = ("id_high", "id_low", "nan", "positive", "mass")


def target_flags(index: torch.Tensor, logprobs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Device-side [5] bool flags of the data checks on targets (no host sync), in the
    order of ``TARGET_CHECKS``: an id >= ``vocab_size``; an id < -1; a NaN log-prob on
    a used slot (id >= 0); a log-prob > 1e-6 on a used slot; a position whose used
    slots' probabilities sum to > 1 + 1e-3 (+ their storage rounding, as
    :func:`validate_target_data`)."""
    cd = compute_dtype(logprobs.dtype)
    lo, hi = index.aminmax()
    lp = torch.where(index >= 0, logprobs.to(cd), -torch.inf)
    lp_max = lp.amax()                               # NaN propagates: one reduction, two checks
    p = lp.exp()                                     # 0 on empty slots
    mass = p.sum(-1)
    spread = torch.where(p > 0, p * lp.abs(), 0.0).sum(-1)
    bound = 1 + 1e-3 + torch.finfo(logprobs.dtype).eps * spread + index.shape[-1] * torch.finfo(cd).eps
    return torch.stack([hi >= vocab_size, lo < -1, torch.isnan(lp_max), lp_max > POSITIVE_TOL,
                        (mass > bound).any()])


def label_flags(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> torch.Tensor:
    """Device-side [1] bool flag: a label outside [0, vocab_size) other than ``ignore_index``."""
    return (((labels < 0) | (labels >= vocab_size)) & (labels != ignore_index)).any().reshape(1)


def _target_message(flags: list, vocab_size: int, name: str = "target") -> str:
    msgs = {
        "id_high": f"{name}_index holds an id >= the student's vocab size {vocab_size}: is the teacher's vocab "
                   "larger than the student's? Map or drop those ids",
        "id_low": f"{name}_index holds an id < -1; only -1 marks an empty slot",
        "nan": f"{name}_logprobs holds NaN on a used slot (id >= 0): fix the targets, or mark the slot empty "
               "(id -1, log-prob -inf)",
        "positive": f"{name}_logprobs holds positive values: log-probabilities are <= 0 -- did you pass logits "
                    "instead of log-probs (or probabilities)? Apply log_softmax first",
        "mass": f"{name}_logprobs: the probabilities of a position sum to > 1 + 1e-3 -- did you pass logits instead "
                "of log-probs (apply log_softmax first)?",
    }
    return "; ".join(msgs[c] for c, bad in zip(TARGET_CHECKS, flags) if bad)


def check_loss_inputs(target_index, target_logprobs, labels, vocab_size: int, ignore_index: int) -> None:
    """The always-on data checks of the loss entry points (docs/design.md sec. 7).

    Args:
        target_index / target_logprobs: [..., K] targets, or None; labels: [...] or None.
        vocab_size: the student's (full) vocab size; ignore_index: the label that does not count.
    Raises:
        ValueError naming the check and the fix: at once on CPU (worded by a re-check with
        :func:`validate_target_data` / :func:`validate_labels`), on CUDA at the next loss
        call or :func:`flush_checks` (no host sync in the step)."""
    if not _ALWAYS_ON:
        return
    parts = []
    has_t = target_index is not None and target_index.numel() > 0
    if has_t:
        parts.append(target_flags(target_index, target_logprobs, vocab_size))
    has_y = labels is not None and labels.numel() > 0
    if has_y:
        parts.append(label_flags(labels, vocab_size, ignore_index).to(parts[0].device if parts else labels.device))
    if not parts:
        return
    flags = torch.cat(parts) if len(parts) > 1 else parts[0]

    def explain(vals: list) -> str:
        msgs = []
        if has_t and any(vals[:len(TARGET_CHECKS)]):
            msgs.append(_target_message(vals[:len(TARGET_CHECKS)], vocab_size))
        if has_y and vals[-1]:
            msgs.append(f"labels hold ids outside [0, {vocab_size}) other than ignore_index={ignore_index}: "
                        "are they from another tokenizer, or padded with another value than ignore_index?")
        return "; ".join(msgs)

    def recheck() -> None:      # CPU: the detailed message (the offending value)
        if has_t:
            validate_target_data(target_index, target_logprobs, vocab_size)
        if has_y:
            validate_labels(labels, vocab_size, ignore_index)

    raise_when(flags, explain, recheck=recheck)


def raise_when(flags: torch.Tensor, explain, *, recheck=None) -> None:
    """Raise ValueError(``explain(flags.tolist())``) when any of the bool ``flags`` is set.

    CPU (and any device but CUDA): read now; ``recheck()``, when given, runs first and
    may raise a more detailed ValueError. CUDA: no host sync -- the flags are copied to
    pinned memory behind an event and read once the copy has landed, at the next call of
    this function or :func:`flush_checks`; the message then says it was a recent call.
    Nothing is checked during CUDA graph capture."""
    pending_checks(block=False)
    if flags.device.type != "cuda":
        vals = flags.tolist()
        if any(vals):
            if recheck is not None:
                recheck()
            raise ValueError(explain(vals))
        return
    if torch.cuda.is_current_stream_capturing():
        return
    host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
    host.copy_(flags, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    _PENDING.append((event, host, explain, str(flags.device)))
    if len(_PENDING) > _MAX_PENDING:
        _PENDING[0][0].synchronize()
        pending_checks(block=False)


def pending_checks(block: bool) -> None:
    """Read the CUDA flags whose copy has landed (all of them, waiting, with ``block``)
    and raise ValueError for the first that is set."""
    while _PENDING:
        event, host, explain, where = _PENDING[0]
        if block:
            event.synchronize()
        elif not event.query():
            return
        _PENDING.pop(0)
        vals = host.tolist()
        if any(vals):
            raise ValueError(f"a recent loss call on {where} (checked without a host sync): {explain(vals)}. "
                             "Pass validate=True to stop at the offending batch")


def flush_checks() -> None:
    """Wait for every pending device-side data check and raise ValueError if one failed
    (``DFTTrainer`` calls it when it logs; call it at the end of a custom loop)."""
    pending_checks(block=True)


def check_logits_input(logits: torch.Tensor, name: str = "logits") -> None:
    """Refuse NaN or +inf ``logits`` and probabilities passed as logits (every value in
    [0, 1], every row summing to 1 within 1e-2, V >= 2): ``log_softmax`` of them is
    wrong without a word. Reads the data (one host sync, no [N, V] temporary).

    Raises:
        ValueError naming ``name`` and the fix."""
    if logits.numel() == 0:
        return
    lo, hi = torch.stack([logits.amin(), logits.amax()]).double().tolist()   # NaN propagates
    if lo != lo or hi != hi:
        raise ValueError(f"{name} hold NaN: the teacher's forward produced NaN (overflow in fp16? a bad "
                         "checkpoint?); fix the teacher, or its dtype (bfloat16 / float32)")
    if hi == float("inf"):
        raise ValueError(f"{name} hold +inf: softmax of them is NaN; fix the teacher's forward (dtype?)")
    if logits.shape[-1] >= 2 and 0.0 <= lo and hi <= 1.0:
        sums = logits.reshape(-1, logits.shape[-1]).sum(-1, dtype=torch.float64)
        if bool(((sums - 1.0).abs() <= 1e-2).all()):
            raise ValueError(f"{name} look like probabilities (every value in [0, 1], every row summing to 1): "
                             "pass the teacher's logits (or log-probs: probs.log()), not softmax outputs")
