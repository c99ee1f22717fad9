"""Naive PyTorch reference of every term of docs/design.md sec. 3-5.

It materialises the full [N, V] log-softmax (at each temperature), builds the
K+1 bucket distributions explicitly and applies textbook divergence formulas.
It is the ground truth of the tests (run it on float64 inputs) and the baseline
of the benchmarks. Computation is in float64 for float64 inputs, float32 else.
"""
from __future__ import annotations

import math

import torch

from .options import TINY, DFTLossOutput, effective_divergence
from .validation import compute_dtype


def _kl(a: torch.Tensor, la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """sum_b a_b (log a_b - log b_b), 0 * anything = 0."""
    t = a * (la - lb)
    return torch.where(a > 0, t, torch.zeros_like(t)).sum(-1)


def _merge_repeated_ids(index: torch.Tensor, logprobs: torch.Tensor, V: int):
    """A row's slots that repeat an id become one slot (the first) with their summed mass;
    the later ones become empty (-1, -inf). Pairwise [N, K, K] comparison, no sorting."""
    valid = (index >= 0) & (index < V) & (logprobs > -math.inf)
    ids = torch.where(valid, index.long(), torch.full_like(index, -1, dtype=torch.long))
    same = (ids[:, :, None] == ids[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    K = index.shape[1]
    before = torch.ones(K, K, dtype=torch.bool, device=index.device).tril(diagonal=-1)
    repeat = (same & before).any(-1)                      # an earlier slot holds the same id
    count = same.sum(-1)
    p = torch.where(valid, logprobs.exp(), torch.zeros_like(logprobs))
    total = (same.to(p.dtype) * p[:, None, :]).sum(-1).log()
    first = valid & ~repeat
    lp = torch.where(first, torch.where(count > 1, total, logprobs), torch.full_like(logprobs, -math.inf))
    return torch.where(first, index, torch.full_like(index, -1)), lp


def _buckets(logq: torch.Tensor, index: torch.Tensor, logprobs: torch.Tensor, tail: str):
    """Explicit bucket distributions [N, K+1] (slots then tail) for student and teacher."""
    N, V = logq.shape
    valid = (index >= 0) & (index < V) & (logprobs > -math.inf)
    safe = torch.where(valid, index, torch.zeros_like(index)).long()
    q_slots = torch.where(valid, logq.gather(1, safe).exp(), torch.zeros_like(logprobs))
    p_slots = torch.where(valid, logprobs.exp(), torch.zeros_like(logprobs))
    Q = q_slots.sum(-1, keepdim=True)
    P = p_slots.sum(-1, keepdim=True)
    q_tail = (1.0 - Q).clamp(min=0.0)
    q = torch.cat([q_slots, q_tail], dim=-1)
    if tail == "renorm":
        p = torch.cat([p_slots / torch.where(P > 0, P, torch.ones_like(P)), torch.zeros_like(P)], dim=-1)
    elif tail == "raw":
        p = torch.cat([p_slots, torch.zeros_like(P)], dim=-1)
    else:
        p = torch.cat([p_slots, (1.0 - P).clamp(min=0.0)], dim=-1)
    # logs: slots exact, tails floored at float32's smallest normal number
    lq = torch.cat([torch.where(valid, logq.gather(1, safe), torch.zeros_like(logprobs)),
                    q_tail.clamp(min=TINY).log()], dim=-1)
    if tail == "renorm":
        lp_tail = torch.full_like(P, -math.inf)
        lp_slots = logprobs - torch.where(P > 0, P, torch.ones_like(P)).log()
    else:
        lp_tail = (1.0 - P).clamp(min=TINY).log()
        lp_slots = logprobs
    lp = torch.cat([torch.where(valid, lp_slots, torch.zeros_like(lp_slots)), lp_tail], dim=-1)
    mask = torch.cat([valid, torch.full_like(P, tail != "raw", dtype=torch.bool)], dim=-1)
    q = torch.where(mask, q, torch.zeros_like(q))
    return q, lq, p, lp, valid, P.squeeze(-1), Q.squeeze(-1)


def _divergence(q, lq, p, lp, kind: str, beta: float) -> torch.Tensor:
    if kind == "forward_kl":
        return _kl(p, lp, lq)
    if kind == "reverse_kl":
        return _kl(q, lq, lp)
    m = beta * p + (1.0 - beta) * q
    lm = m.clamp(min=1e-300 if m.dtype == torch.float64 else TINY).log()
    return beta * _kl(p, lp, lm) + (1.0 - beta) * _kl(q, lq, lm)


def dft_loss(logits, target_index=None, target_logprobs=None, labels=None, *, lam=0.2,
             divergence="forward_kl", beta=0.5, tail="bucket", accuracy="ce", temperature=1.0,
             softcap=None, ignore_index=-100, reduction="mean", num_items_in_batch=None,
             return_components=False):
    """Reference DFT loss: materialises the `[N, V]` log-softmax at each temperature.

    Computes in ``validation.compute_dtype`` of the logits; runs no input checks.

    Args:
        logits (torch.Tensor):
            student logits of shape `[..., V]`.
        target_index (torch.Tensor):
            teacher ids of shape `[..., K]` (-1 = empty slot), or None.
        target_logprobs (torch.Tensor):
            teacher log-probs of shape `[..., K]`, or None.
        labels (torch.Tensor):
            next-token ids of shape `[...]`, or None.
        lam, divergence, beta, tail, accuracy, temperature, softcap, ignore_index, reduction,
        num_items_in_batch, return_components:
            as in :func:`dft_kernels.dft_loss` (without targets the accuracy term has
            weight 1, whatever ``lam``); other keywords of it (``impl``,
            ``validate``, ``chunk_elems``, ...) are accepted and ignored.

    Returns:
        The loss: a scalar, or of shape `[...]` with ``reduction="none"``; a
        :class:`~dft_kernels.options.DFTLossOutput` with ``return_components=True``.
    """
    if target_index is None:
        lam = 1.0   # no targets: the accuracy term at weight 1 (docs/design.md sec. 4)
    lead = tuple(logits.shape[:-1])
    V = logits.shape[-1]
    dtype = compute_dtype(logits.dtype)
    z = logits.reshape(-1, V).to(dtype)
    N = z.shape[0]
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logq1 = torch.log_softmax(z, dim=-1)                       # [N, V]
    has_div = target_index is not None
    has_acc = labels is not None and lam > 0
    div = torch.zeros(N, dtype=dtype, device=z.device)
    if labels is not None:
        label_ok = labels.reshape(N) != ignore_index
    if has_div:
        logq_t = torch.log_softmax(z / temperature, dim=-1)    # [N, V]
        idx = target_index.reshape(N, -1)
        lpr = target_logprobs.reshape(N, -1).to(dtype)
        idx, lpr = _merge_repeated_ids(idx, lpr, V)
        q, lq, p, lp, valid, P, Q = _buckets(logq_t, idx, lpr, tail)
        kind = effective_divergence(divergence, beta)
        div = _divergence(q, lq, p, lp, kind, float(beta)) * temperature ** 2
        has_slot = valid.any(-1)
        div = torch.where(has_slot, div, torch.zeros_like(div))
        counted = label_ok if labels is not None else has_slot
    else:
        counted = label_ok if labels is not None else torch.zeros(N, dtype=torch.bool, device=z.device)
    acc = torch.zeros(N, dtype=dtype, device=z.device)
    if has_acc:
        safe = torch.where(label_ok, labels.reshape(N), torch.zeros_like(labels.reshape(N))).long()
        lqy = logq1.gather(1, safe[:, None]).squeeze(1)
        a = -lqy if accuracy == "ce" else -(lqy.detach().exp()) * lqy
        acc = torch.where(label_ok, a, torch.zeros_like(a))
    div = torch.where(counted, div, torch.zeros_like(div))
    per_row = div + lam * acc
    n = counted.sum()
    if reduction == "none":
        out = (per_row.reshape(lead), div.reshape(lead), acc.reshape(lead))
    else:
        out = (per_row.sum(), div.sum(), acc.sum())
        if reduction == "mean":
            d = num_items_in_batch if num_items_in_batch is not None else n.clamp(min=1)
            if isinstance(d, torch.Tensor):
                d = d.to(device=z.device, dtype=dtype).clamp(min=1)
            else:
                d = max(d, 1)
            out = tuple(o / d for o in out)
    loss = out[0]
    if not return_components:
        return loss
    with torch.no_grad():
        if has_div:
            sel = counted & has_slot
            tm = (P * sel).sum() / sel.sum()
            sm = (Q * sel).sum() / sel.sum()
        else:
            tm = sm = torch.tensor(float("nan"), device=z.device)
    return DFTLossOutput(loss, out[1].detach(), out[2].detach(), n, tm, sm)


def fused_linear_dft_loss(hidden, weight, target_index=None, target_logprobs=None, labels=None, *,
                          bias=None, **kw):
    """Reference fused loss: materialises ``logits = hidden @ weight.T + bias``.

    Args:
        hidden (torch.Tensor):
            last hidden states of shape `[..., D]`.
        weight (torch.Tensor):
            lm_head weight of shape `[V, D]`.
        target_index, target_logprobs, labels:
            as in :func:`dft_loss`, of shapes `[..., K]`, `[..., K]`, `[...]`.
        bias (torch.Tensor):
            lm_head bias of shape `[V]`, or None.
        **kw:
            the loss keywords of :func:`dft_loss`.

    Returns:
        What :func:`dft_loss` returns on those logits.
    """
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return dft_loss(logits, target_index, target_logprobs, labels, **kw)
