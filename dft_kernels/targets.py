"""Sparse teacher targets: top-K ids + log-probs per position."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .losses import validate_target_data


@dataclass
class SparseTargets:
    """Teacher distribution stored sparsely: ``index`` [..., K] int (-1 = empty slot)
    and ``logprobs`` [..., K] float, normalised over the teacher's full vocab."""

    index: torch.Tensor
    logprobs: torch.Tensor
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.index.shape != self.logprobs.shape:
            raise ValueError(f"index {tuple(self.index.shape)} and logprobs {tuple(self.logprobs.shape)} "
                             "must have the same shape [..., K]")
        if self.index.is_floating_point():
            raise TypeError(f"index must be an integer tensor, got {self.index.dtype}")
        if not self.logprobs.is_floating_point():
            raise TypeError(f"logprobs must be a floating-point tensor, got {self.logprobs.dtype}")

    @property
    def k(self) -> int:
        return self.index.shape[-1]

    def validate(self, vocab_size: int | None = None) -> "SparseTargets":
        """Read the data and raise ValueError on ids out of range, NaN or positive
        log-probs, or mass > 1 + 1e-3. Returns self."""
        validate_target_data(self.index, self.logprobs, vocab_size)
        return self


def blend(targets, weights=None, k=None):
    """Per-position mixture of several teachers' sparse distributions (to be completed)."""
    raise NotImplementedError
