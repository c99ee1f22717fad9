"""Naive reference of the fused linear primitive, for the tests: the logits
``h @ w.T + b (+ u @ lora_b.T)`` materialised, then the logits path's reference."""
from __future__ import annotations

import torch

from ..lse_gather.naive import lse_gather


def linear_lse_gather(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, index: torch.Tensor,
                      scales: tuple[float, ...], softcap: float | None, tail_slots: int = 0,
                      lora: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``ops.linear_lse_gather_apply``'s ``(lse, gathered)`` from materialised logits."""
    z = torch.nn.functional.linear(h, w, b)
    if lora is not None:
        u, lora_b = lora
        z = z + u @ lora_b.T
    return lse_gather(z, index, scales, softcap, tail_slots)
