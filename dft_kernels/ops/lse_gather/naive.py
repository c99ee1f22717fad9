"""Naive reference of the primitive (docs/design.md sec. 6) on materialised logits, for the
tests: the whole [N, V] softcapped logits, ``torch.logsumexp`` per scale, the tail column
with the row's first ``tail_slots`` ids masked, ``gather`` at the ids. Differentiable by
autograd; computes in the input dtype (pass float64)."""
from __future__ import annotations

import torch


def lse_gather(x: torch.Tensor, index: torch.Tensor, scales: tuple[float, ...], softcap: float | None,
               tail_slots: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse [N, T (+1)], gathered [N, M])`` of ``x`` [N, V] as ``ops.lse_gather_apply``
    defines them (rows whose index holds no id in [0, V): lse 0, gathered 0)."""
    N, V = x.shape
    z = x if softcap is None else softcap * torch.tanh(x / softcap)
    ok = (index >= 0) & (index < V)
    safe = torch.where(ok, index, torch.zeros_like(index)).long()
    gathered = torch.where(ok, z.gather(1, safe), torch.zeros_like(z[:, :1]))
    cols = [torch.logsumexp(z * s, dim=-1) for s in scales]
    if tail_slots:
        slot = torch.zeros((N, V + 1), dtype=torch.bool, device=x.device)
        first = ok[:, :tail_slots]
        slot.scatter_(1, torch.where(first, safe[:, :tail_slots], torch.full_like(safe[:, :tail_slots], V)), True)
        rest = (z * scales[-1]).masked_fill(slot[:, :V], -torch.inf)
        cols.append(torch.logsumexp(rest, dim=-1))
    lse = torch.stack(cols, dim=1)
    counted = ok.any(1, keepdim=True)
    return torch.where(counted, lse, torch.zeros_like(lse)), torch.where(counted, gathered, torch.zeros_like(gathered))
