"""The dense two-head divergence (docs/design.md sec. 11) in chunked PyTorch: the CPU path
and the fallback of the Triton kernel (``two_head/triton.py``).

:class:`TwoHeadDivergenceLean` / :func:`two_head_divergence_fast`: the dense per-row
divergence between two heads' softmaxes (forward KL, reverse KL, generalised JSD),
gradients to the student's hidden, weight and bias.

Both heads are given as ``(h, w, b, softcap)`` with logits ``softcap(h @ w.T + b)``
(any logit scale already folded into ``h`` and ``b``); the divergence sees them at
``inv_temp`` = 1 / temperature: ``s = z_student * inv_temp``, ``t = z_teacher * inv_temp``,
``q = softmax(s)``, ``p = softmax(t)``. Per row and ``kind``:

- "forward_kl": ``sum p (log p - log q)``; d/ds = ``q - p``.
- "reverse_kl": ``sum q (log q - log p)`` (= R); d/ds = ``q (log q - log p - R)``.
- "jsd": with ``m = beta p + (1 - beta) q``, ``beta KL(p||m) + (1 - beta) KL(q||m)``;
  d/ds = ``(1 - beta) q (log q - log m - KL(q||m))``.

Lean: the logits exist one [C, Cv] tile at a time; the forward makes one pass over the
vocab (forward / reverse KL: the divergence accumulates online next to the two lse) or two
(JSD: log m needs both final lse), the backward recomputes every tile. Fast: each row
chunk's [C, V] logits of both heads exist once, the divergence and its gradient are formed
right there and the backward only scales dH, dW, db by the incoming scalar.
"""
from __future__ import annotations

import math

import torch

from ...memory import FAST_CHUNK_ELEMS, TWO_HEAD_TILE_ELEMS, TWO_HEAD_TILE_VOCAB
from ...validation import compute_dtype
from .._common import DOUBLE_BACKWARD_ERROR, TwoHeadArgs
from .._torch_common import head_logits


# --------------------------------------------------------------------------- two heads


def tile_divergence(s: torch.Tensor, t: torch.Tensor, lse_s: torch.Tensor, lse_t: torch.Tensor, kind: str,
                    beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One tile's share of the per-row divergence and of its auxiliary sum (the row
    scalar the gradient needs: R for reverse KL, KL(q||m) for JSD, 0 for forward KL).

    Args:
        s, t: [C, Cv] student / teacher logits at temperature; lse_s, lse_t: [C] full-vocab lse.
        kind: "forward_kl" | "reverse_kl" | "jsd"; beta: the JSD weight (0 < beta < 1).
    Returns:
        ``(div, aux)`` [C] each.
    """
    lq = s - lse_s.unsqueeze(-1)
    lp = t - lse_t.unsqueeze(-1)
    if kind == "forward_kl":
        div = (lp.exp() * (lp - lq)).sum(-1)
        return div, torch.zeros_like(div)
    if kind == "reverse_kl":
        div = (lq.exp() * (lq - lp)).sum(-1)
        return div, div
    lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
    kl_qm = (lq.exp() * (lq - lm)).sum(-1)
    return beta * (lp.exp() * (lp - lm)).sum(-1) + (1.0 - beta) * kl_qm, kl_qm


def tile_grad(s: torch.Tensor, t: torch.Tensor, lse_s: torch.Tensor, lse_t: torch.Tensor, aux: torch.Tensor,
              kind: str, beta: float) -> torch.Tensor:
    """d divergence / d s on one tile ([C, Cv]); arguments as in :func:`tile_divergence`."""
    lq = s - lse_s.unsqueeze(-1)
    lp = t - lse_t.unsqueeze(-1)
    q = lq.exp()
    if kind == "forward_kl":
        return q - lp.exp()
    if kind == "reverse_kl":
        return q * (lq - lp - aux.unsqueeze(-1))
    lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
    return (1.0 - beta) * q * (lq - lm - aux.unsqueeze(-1))


def _logits_grad(g_s: torch.Tensor, th: torch.Tensor | None, inv_temp: float, dtype: torch.dtype) -> torch.Tensor:
    """d/ds -> d/d(h @ w.T + b): the temperature and softcap chain factors."""
    g = g_s * inv_temp
    if th is not None:
        g = g * (1.0 - th * th)
    return g.to(dtype)


def _add_grads(dz: torch.Tensor, h: torch.Tensor, w: torch.Tensor, r: slice, c: slice, dh, dw, db) -> None:
    if dh is not None:
        dh[r].addmm_(dz, w[c].to(dz.dtype))
    if dw is not None:
        dw[c].addmm_(dz.t(), h[r].to(dz.dtype))
    if db is not None:
        db[c] += dz.sum(0)


def _grad_buffers(h, w, b, needs):
    acc = compute_dtype(h.dtype)
    return (torch.zeros(h.shape, dtype=acc, device=h.device) if needs[0] else None,
            torch.zeros(w.shape, dtype=acc, device=w.device) if needs[1] else None,
            torch.zeros(b.shape, dtype=acc, device=b.device) if (b is not None and needs[2]) else None)


def _tiles(N: int, V: int):
    cv = min(V, TWO_HEAD_TILE_VOCAB)
    cr = max(1, TWO_HEAD_TILE_ELEMS // max(cv, 1))
    for r0 in range(0, N, cr):
        yield slice(r0, min(N, r0 + cr)), [slice(c0, min(V, c0 + cv)) for c0 in range(0, V, cv)]


def _lean_stats(student, teacher, inv_temp, kind, beta):
    """Forward of the lean strategy: per-row (div, aux, lse_s, lse_t), all [N]."""
    (h, w, b, cap), (ht, wt, bt, cap_t) = student, teacher
    N, V = h.shape[0], w.shape[0]
    cdt = compute_dtype(h.dtype)
    out = [torch.zeros(N, dtype=cdt, device=h.device) for _ in range(4)]
    div, aux, lse_s, lse_t = out
    for r, cols in _tiles(N, V):
        n = r.stop - r.start
        m_s = torch.full((n,), -torch.inf, dtype=cdt, device=h.device)
        m_t, sum_s, sum_t, gap = m_s.clone(), torch.zeros_like(m_s), torch.zeros_like(m_s), torch.zeros_like(m_s)
        for c in cols:
            s, _ = head_logits(h[r], w, b, cap, inv_temp, c.start, c.stop)
            t, _ = head_logits(ht[r], wt, bt, cap_t, inv_temp, c.start, c.stop)
            new_s, new_t = torch.maximum(m_s, s.amax(-1)), torch.maximum(m_t, t.amax(-1))
            es, et = (s - new_s.unsqueeze(-1)).exp(), (t - new_t.unsqueeze(-1)).exp()
            rs, rt = (m_s - new_s).exp(), (m_t - new_t).exp()
            # online sums of p (t - s) (forward KL) or q (s - t) (reverse KL), unnormalised
            if kind == "forward_kl":
                gap = gap * rt + (et * (t - s)).sum(-1)
            elif kind == "reverse_kl":
                gap = gap * rs + (es * (s - t)).sum(-1)
            sum_s, sum_t = sum_s * rs + es.sum(-1), sum_t * rt + et.sum(-1)
            m_s, m_t = new_s, new_t
        ls, lt = m_s + sum_s.log(), m_t + sum_t.log()
        lse_s[r], lse_t[r] = ls, lt
        if kind == "forward_kl":
            div[r] = gap / sum_t - lt + ls
        elif kind == "reverse_kl":
            div[r] = aux[r] = gap / sum_s - ls + lt
        else:
            d = torch.zeros_like(ls)
            a = torch.zeros_like(ls)
            for c in cols:
                s, _ = head_logits(h[r], w, b, cap, inv_temp, c.start, c.stop)
                t, _ = head_logits(ht[r], wt, bt, cap_t, inv_temp, c.start, c.stop)
                dd, aa = tile_divergence(s, t, ls, lt, kind, beta)
                d, a = d + dd, a + aa
            div[r], aux[r] = d, a
    return div, aux, lse_s, lse_t


class TwoHeadDivergenceLean(torch.autograd.Function):
    """Per-row dense divergence [N] (see the module docstring), lean strategy."""

    @staticmethod
    def forward(ctx, h, w, b, ht, wt, bt, args: TwoHeadArgs):
        with torch.no_grad():
            div, aux, lse_s, lse_t = _lean_stats((h, w, b, args.cap), (ht, wt, bt, args.cap_t), args.inv_temp,
                                                 args.kind, args.beta)
        ctx.save_for_backward(h, w, b, ht, wt, bt, aux, lse_s, lse_t)
        ctx.args = args
        return div

    @staticmethod
    def backward(ctx, g_div):
        h, w, b, ht, wt, bt, aux, lse_s, lse_t = ctx.saved_tensors
        a = ctx.args
        cap, cap_t, inv_temp, kind, beta = a.cap, a.cap_t, a.inv_temp, a.kind, a.beta
        dh, dw, db = _grad_buffers(h, w, b, ctx.needs_input_grad)
        g_div = g_div.to(lse_s.dtype)
        with torch.no_grad():
            for r, cols in _tiles(h.shape[0], w.shape[0]):
                for c in cols:
                    s, th = head_logits(h[r], w, b, cap, inv_temp, c.start, c.stop)
                    t, _ = head_logits(ht[r], wt, bt, cap_t, inv_temp, c.start, c.stop)
                    g = tile_grad(s, t, lse_s[r], lse_t[r], aux[r], kind, beta) * g_div[r].unsqueeze(-1)
                    _add_grads(_logits_grad(g, th, inv_temp, dh.dtype if dh is not None else lse_s.dtype),
                               h, w, r, c, dh, dw, db)
        cast = lambda g, ref: None if g is None else g.to(ref.dtype)  # noqa: E731
        return cast(dh, h), cast(dw, w), cast(db, b), None, None, None, None


class _TwoHeadFast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, ht, wt, bt, row_weight, args: TwoHeadArgs):
        cap, cap_t, inv_temp, kind, beta = args.cap, args.cap_t, args.inv_temp, args.kind, args.beta
        dh, dw, db = _grad_buffers(h, w, b, (h.requires_grad, w.requires_grad, b is not None and b.requires_grad))
        N, V = h.shape[0], w.shape[0]
        div = torch.zeros(N, dtype=compute_dtype(h.dtype), device=h.device)
        step = max(1, FAST_CHUNK_ELEMS // max(V, 1))
        full = slice(0, V)
        with torch.no_grad():
            for r0 in range(0, N, step):
                r = slice(r0, min(N, r0 + step))
                s, th = head_logits(h[r], w, b, cap, inv_temp)
                t, _ = head_logits(ht[r], wt, bt, cap_t, inv_temp)
                ls, lt = torch.logsumexp(s, -1), torch.logsumexp(t, -1)
                d, aux = tile_divergence(s, t, ls, lt, kind, beta)
                div[r] = d
                if dh is not None or dw is not None or db is not None:
                    g = tile_grad(s, t, ls, lt, aux, kind, beta) * row_weight[r].to(s.dtype).unsqueeze(-1)
                    _add_grads(_logits_grad(g, th, inv_temp, div.dtype), h, w, r, full, dh, dw, db)
        ctx.save_for_backward(dh, dw, db)
        ctx.dtypes = (h.dtype, w.dtype, None if b is None else b.dtype)
        loss = (div * row_weight.to(div.dtype)).sum()
        ctx.mark_non_differentiable(div)
        return loss, div

    @staticmethod
    def backward(ctx, g_loss, _g_div):
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD_ERROR)
        out = [None if g is None else (g * g_loss.to(g.dtype)).to(dt) for g, dt in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*out, None, None, None, None, None)


def two_head_divergence_fast(student, teacher, row_weight: torch.Tensor, inv_temp: float, kind: str, beta: float
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast strategy: ``sum_r row_weight[r] * div[r]`` with its gradients formed in the forward.

    Args:
        student, teacher: ``(h [N, D], w [V, D], b [V] | None, softcap | None)`` each.
        row_weight: [N] weights of the rows in the scalar loss (no gradient).
        inv_temp, kind, beta: as in the module docstring.
    Returns:
        ``loss`` (0-dim, differentiable w.r.t. the student's h, w, b; no double backward)
        and ``div`` [N] (detached).
    """
    (h, w, b, cap), (ht, wt, bt, cap_t) = student, teacher
    loss, div = _TwoHeadFast.apply(h, w, b, ht, wt, bt, row_weight.detach(), TwoHeadArgs(cap, cap_t, inv_temp, kind,
                                                                                          beta))
    return loss, div
