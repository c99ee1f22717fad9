"""Naive reference of the teacher's top-k, for the tests: the [N, V] log-softmax
materialised, ``topk`` with ties broken by the lower id."""
from __future__ import annotations

import torch


def teacher_topk(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, k: int, inv_temp: float,
                 softcap: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(index [N, k] int64, logprobs [N, k], lse [N])`` of ``softcap(h @ w.T + b) * inv_temp``
    (value descending, ties by ascending id)."""
    z = torch.nn.functional.linear(h, w, b)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z * inv_temp
    lse = torch.logsumexp(z, dim=-1)
    values, index = (z - lse[:, None]).sort(dim=-1, descending=True, stable=True)
    return index[:, :k], values[:, :k], lse
