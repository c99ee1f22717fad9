"""Random DFT problems shared by the loss tests."""
from __future__ import annotations

import torch


def make_problem(N=24, V=700, K=8, *, seed=0, empty_slots=True, ignored=True, lead=None,
                 scale=3.0, dtype=torch.float64):
    """Student logits, teacher top-K (unique ids, log-probs of a real teacher softmax),
    labels. Some slots empty (-1), some labels ignored (-100), one row with no slot."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g, dtype=torch.float64) * scale
    teacher = torch.randn(N, V, generator=g, dtype=torch.float64) * scale
    tlp = torch.log_softmax(teacher, dim=-1)
    lp, idx = tlp.topk(K, dim=-1)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::3] = idx[::3, 0]          # the label is often one of the teacher's ids
    if empty_slots and N > 2:
        idx[1, -1] = -1
        lp[1, -1] = 0.0                 # value of an empty slot is never read
        idx[2, :] = -1                  # a row with no valid slot
        if K > 2:
            lp[3, 1] = -torch.inf       # a slot with zero mass
    if ignored and N > 5:
        labels[4] = -100
        labels[5] = -100
    if lead is not None:
        logits = logits.reshape(*lead, V)
        idx = idx.reshape(*lead, K)
        lp = lp.reshape(*lead, K)
        labels = labels.reshape(*lead)
    return logits.to(dtype), idx, lp.to(dtype), labels


def loss_and_grad(fn, logits, *args, upstream=1.0, **kw):
    """Run ``fn`` on a fresh leaf copy of ``logits``; returns (loss, dlogits) in float64."""
    x = logits.detach().clone().requires_grad_(True)
    out = fn(x, *args, **kw)
    loss = out.loss if hasattr(out, "loss") else out
    if loss.dim() == 0:
        loss.backward(torch.tensor(upstream, dtype=loss.dtype))
    else:
        loss.backward(torch.full_like(loss, upstream))
    return loss.detach().double(), x.grad.double()
