"""Checks on the batches a patched model sees (docs/design.md sec. 7, "nothing
silently wrong"): the label arguments on every call (free); the target data and the
labels on every batch by the loss itself (``validation.check_loss_inputs``: device-side
flags, no host sync); and on the first batch only -- whatever ``validate`` says -- the
target data at once with the offending value named, and the alignment of targets,
labels and input ids (host syncs, once)."""
from __future__ import annotations

import warnings

import torch

from ..validation import validate_target_data

#: a shifted offset must explain at least this share of next tokens more than offset 0
_CLEAR_MARGIN = 0.2
#: fewer counted positions than this tell nothing about the alignment
_MIN_POSITIONS = 8


def check_label_arguments(labels, shift_labels) -> None:
    """``labels`` and ``shift_labels`` are two ways to give the same thing: one only."""
    if labels is not None and shift_labels is not None:
        raise ValueError("pass labels (unshifted, one per input position; the model shifts them) or shift_labels "
                         "(already shifted), not both")


def check_first_batch(input_ids, labels, shifted, target_index, target_logprobs, vocab_size: int,
                      ignore_index: int) -> None:
    """The data checks of ``validate=True`` on one batch, and an alignment check.

    Args:
        input_ids: [B, T] token ids, or None (``inputs_embeds``).
        labels: [B, T] unshifted labels as passed, or None.
        shifted: [B, T] the labels after the shift (``shifted[t]`` = label of token t+1), or None.
        target_index / target_logprobs: [B, T, K] teacher slots, or None.
        vocab_size: the student's vocab size (rows of the lm_head).
        ignore_index: the label value that does not count.
    Returns:
        None. ValueError on bad target data (ids out of range, logits or probabilities
        instead of log-probs); a UserWarning naming the fix when the labels look shifted
        twice or the targets fit the next token clearly better at offset -1 or +1."""
    if target_index is not None:
        validate_target_data(target_index.detach(), target_logprobs.detach(), vocab_size)
    if isinstance(input_ids, torch.Tensor) and isinstance(labels, torch.Tensor) and input_ids.shape[1] > 1:
        lab, ids = labels[:, :-1], input_ids[:, 1:].to(labels.device)
        valid = lab != ignore_index
        n = int(valid.sum())
        if n >= _MIN_POSITIONS and float(((lab == ids) & valid).sum()) / n > 0.9 \
                and float(((labels == input_ids.to(labels.device)) & (labels != ignore_index)).sum()) / n < 0.5:
            warnings.warn("labels look shifted already (labels[t] == input_ids[t+1]) and the model shifts them "
                          "again: pass labels = input_ids (with -100 where nothing counts), or the shifted ones "
                          "as shift_labels=", UserWarning, stacklevel=4)
            return
    if target_index is None:
        return
    nxt = shifted
    if nxt is None and isinstance(input_ids, torch.Tensor):
        nxt = torch.nn.functional.pad(input_ids, (0, 1), value=ignore_index)[..., 1:]
    if nxt is None:
        return
    hits = {d: _hit_rate(nxt.to(target_index.device), target_index, d, ignore_index) for d in (-1, 0, 1)}
    if hits[0] is None:
        return
    best = max((d for d in (-1, 1) if hits[d] is not None), key=lambda d: hits[d], default=None)
    if best is not None and hits[best] >= hits[0] + _CLEAR_MARGIN:
        warnings.warn(f"the teacher's top-{target_index.shape[-1]} holds the next token at "
                      f"{hits[best]:.0%} of the positions when position t reads row t{best:+d} of the targets, at "
                      f"{hits[0]:.0%} when it reads row t: the targets (or the labels) look shifted. Row t must be the teacher's distribution "
                      "of the token after position t, in the same positions as input_ids (do not shift targets; "
                      "the labels are unshifted and the model shifts them)", UserWarning, stacklevel=4)


def _hit_rate(nxt, index, offset: int, ignore_index: int):
    """Share of counted positions t whose next token is among the slots of row t + offset."""
    T = nxt.shape[1]
    lo, hi = max(0, -offset), min(T, T - offset)
    if hi - lo <= 0:
        return None
    tok = nxt[:, lo:hi]
    rows = index[:, lo + offset:hi + offset]
    valid = (tok != ignore_index) & (rows >= 0).any(-1)
    n = int(valid.sum())
    if n < _MIN_POSITIONS:
        return None
    hit = (rows == tok.unsqueeze(-1).to(rows.dtype)).any(-1) & valid
    return float(hit.sum()) / n
