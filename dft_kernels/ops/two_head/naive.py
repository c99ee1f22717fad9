"""Naive reference of the two-head divergence (the math of ``two_head/torch.py``'s
docstring): both heads' [N, V] logits materialised. Float64 in, float64 out."""
from __future__ import annotations

import math

import torch

from ...validation import compute_dtype


def two_head_divergence(student, teacher, inv_temp: float, kind: str, beta: float) -> torch.Tensor:
    """Per-row divergence [N] with both heads' full logits materialised, autograd through
    ``log_softmax`` (``impl="reference"`` of the distillation loss).

    Args:
        student, teacher: ``(h [N, D], w [V, D], b [V] | None, softcap | None)``.
        inv_temp: 1 / temperature; kind: "forward_kl" | "reverse_kl" | "jsd"; beta: JSD weight.
    """
    def logp(h, w, b, cap):
        z = torch.nn.functional.linear(h, w, b).to(compute_dtype(h.dtype))
        if cap is not None:
            z = cap * torch.tanh(z / cap)
        return torch.log_softmax(z * inv_temp, dim=-1)
    lq, lp = logp(*student), logp(*teacher)
    if kind == "forward_kl":
        return (lp.exp() * (lp - lq)).sum(-1)
    if kind == "reverse_kl":
        return (lq.exp() * (lq - lp)).sum(-1)
    lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
    return beta * (lp.exp() * (lp - lm)).sum(-1) + (1 - beta) * (lq.exp() * (lq - lm)).sum(-1)
