"""Online teacher (docs/design.md sec. 11): targets and losses from a live teacher's
last hidden states and lm_head, never its [N, V] logits.

- :func:`teacher_topk`: the teacher's top-k ids and full-vocab log-probs as
  :class:`~dft_kernels.SparseTargets` (the offline target format).
- :func:`fused_linear_distill_loss`: the dense (K = V) divergence between the student's
  and the teacher's heads, both projected tile by tile, gradients to the student only.
"""
from __future__ import annotations

import math

import torch

from . import ops
from .losses import choose_strategy, mean_denominator, resolve_impl
from .lm_head import fold_logit_scale
from .low_rank import check_low_rank
from .options import DFTLossOutput, check_options, check_strategy, effective_divergence
from .targets.container import SparseTargets
from .validation import compute_dtype


def _check_head(name_h: str, h, name_w: str, w, name_b: str, b) -> None:
    """Types, shapes and dtypes of one head's (hidden [..., D], weight [V, D], bias [V])."""
    for name, t in ((name_h, h), (name_w, w)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t))}")
    if w.dim() != 2:
        raise ValueError(f"{name_w} must be 2-D [V, D] (an lm_head weight), got shape {tuple(w.shape)}")
    if h.dim() < 1 or h.shape[-1] != w.shape[1]:
        raise ValueError(f"{name_h} has hidden size {h.shape[-1] if h.dim() else None} but {name_w} "
                         f"{tuple(w.shape)} expects D = {w.shape[1]}")
    if h.dtype != w.dtype:
        raise TypeError(f"{name_h} ({h.dtype}) and {name_w} ({w.dtype}) must have the same dtype; cast one of them")
    if b is not None:
        if not isinstance(b, torch.Tensor) or tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"{name_b} must be a tensor of shape ({w.shape[0]},), got {tuple(getattr(b, 'shape', ()))}")
        if b.dtype != w.dtype:
            raise TypeError(f"{name_b} ({b.dtype}) must have the dtype of {name_w} ({w.dtype})")


def _check_scale(name: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or not x > 0:
        raise ValueError(f"{name}={x!r} must be a finite number > 0 (1.0 = no scaling)")
    return float(x)


def teacher_topk(hidden, weight, k, *, bias=None, temperature=1.0, softcap=None, logit_scale=1.0, samples=0,
                 generator=None, impl="auto", lora_A=None, lora_B=None, lora_scaling=1.0) -> SparseTargets:
    """A teacher's top-k targets from its last hidden states and lm_head, never
    materialising the [N, V] logits (docs/design.md sec. 11).

    The logits are ``softcap(logit_scale * (hidden @ weight.T + bias)) / temperature``;
    the log-probs are normalised over the full vocab (the log-sum-exp comes out of the
    same pass). Ties are broken by the lower id, like ``torch.topk`` on the CPU.

    Args:
        hidden (torch.Tensor): teacher hidden states `[..., D]` (leading dims kept).
        weight (torch.Tensor): teacher lm_head weight `[V, D]`.
        k (int): slots per position, 1 <= k <= V.
        bias (torch.Tensor): lm_head bias `[V]`, or None.
        temperature (float): the teacher's temperature (> 0).
        softcap (float): ``c`` of ``c * tanh(z / c)`` (Gemma-2), or None.
        logit_scale (float): multiplies the lm_head output (Cohere / Granite style), > 0.
        samples (int): sampled slots on top of the top-k (docs/design.md sec. 12): ``k`` exact
            slots plus each distinct id of ``samples`` draws from the rest of the vocab (k = 0:
            a pure sampled target); 0 = plain top-k.
        generator (torch.Generator): the sampler's generator (with ``samples``).
        impl (str): "auto" (Triton on CUDA, chunked PyTorch elsewhere), "triton" or "torch".
        lora_A, lora_B, lora_scaling: a low-rank correction of the teacher's head (PEFT's
            names; docs/design.md sec. 17), or None.
    Returns:
        :class:`SparseTargets` with ``index`` `[..., k]` int32 and ``logprobs`` `[..., k]`
        fp32 (value descending), metadata ``kind="topk"``, ``k``, ``temperature``, ``vocab_size``.
    """
    _check_head("hidden", hidden, "weight", weight, "bias", bias)
    V = weight.shape[0]
    from .targets.sampling import check_sampling, sampling_metadata, targets_from_hidden
    k, samples = check_sampling(k, samples, V)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if isinstance(temperature, (int, float)) and not temperature >= 0.01:
        raise ValueError(f"temperature={temperature!r} must be >= 0.01: below it the teacher's softmax is one-hot in "
                         "float32 (log-probs 0 and -inf), which leaves the student no distribution to learn")
    check_options(lam=0.0, divergence="forward_kl", beta=0.5, tail="bucket", accuracy="ce",
                  temperature=temperature, softcap=softcap, reduction="mean", impl=impl)
    scale = _check_scale("logit_scale", logit_scale)
    lora = check_low_rank(weight, lora_A, lora_B, lora_scaling, None)
    impl = resolve_impl(impl, hidden.device)
    if impl == "reference":
        impl = "torch"
    from .ops.teacher_topk.torch import MAX_TRITON_K
    if impl == "triton" and k > MAX_TRITON_K:
        impl = "torch"          # the register buffer holds at most MAX_TRITON_K slots
    lead = tuple(hidden.shape[:-1])
    h = hidden.detach().reshape(-1, weight.shape[1])
    b = None if bias is None else bias.detach()
    if lora is not None:      # the teacher's [h | u] and [W | B]: one contraction, no gradients
        with torch.no_grad():
            h, weight = lora.joined(h, weight.detach())
    h, b = fold_logit_scale(h, b, scale)
    if samples:   # hybrid / sampled (docs/design.md sec. 12): row blocks of logits, never [N, V]
        from .ops.sampling import sorted_uniforms
        uniforms = sorted_uniforms(h.shape[0], samples, generator, device=h.device)
        index, logprobs = targets_from_hidden(h, weight.detach(), b, k, samples, 1.0 / float(temperature),
                                              None if softcap is None else float(softcap), uniforms)
        meta = {**sampling_metadata(k, samples, None, temperature), "vocab_size": V}
        return SparseTargets(index.reshape(lead + (k + samples,)), logprobs.reshape(lead + (k + samples,)), meta)
    index, logprobs, _ = ops.teacher_topk_apply(h, weight.detach(), b, k, 1.0 / float(temperature),
                                                None if softcap is None else float(softcap), impl)
    meta = dict(kind="topk", samples=0, temperature=float(temperature), vocab_size=V)
    return SparseTargets(index.reshape(lead + (k,)), logprobs.reshape(lead + (k,)), meta)


def fused_linear_distill_loss(hidden, weight, teacher_hidden, teacher_weight, labels=None, *, bias=None,
                              teacher_bias=None, divergence="forward_kl", beta=0.5, temperature=1.0, lam=0.0,
                              accuracy="ce", softcap=None, teacher_softcap=None, logit_scale=1.0,
                              teacher_logit_scale=1.0, ignore_index=-100, reduction="mean",
                              num_items_in_batch=None, impl="auto", strategy="auto", memory_budget=1 << 30,
                              return_components=False, lora_A=None, lora_B=None, lora_scaling=1.0,
                              lora_dropout=None, teacher_lora_A=None, teacher_lora_B=None,
                              teacher_lora_scaling=1.0):
    """Dense distillation loss between two heads (docs/design.md sec. 11):
    ``tau**2 * D(P_teacher || P_student) + lam * L_accuracy`` per position, over the full
    vocab (K = V), from both models' last hidden states and lm_heads.

    Neither model's [N, V] logits exist: lean projects both heads tile by tile, fast one
    [C, V] row chunk at a time (docs/design.md sec. 10). Gradients flow to ``hidden``,
    ``weight`` and ``bias`` only. ``divergence`` / ``beta`` follow TRL's convention
    (sec. 3); TRL's ``_chunked_divergence_loss`` equals this loss divided by ``tau**2``.

    Args:
        hidden (torch.Tensor): student hidden states `[..., D]`.
        weight (torch.Tensor): student lm_head weight `[V, D]`.
        teacher_hidden (torch.Tensor): teacher hidden states `[..., D_t]` (same leading dims; no grad).
        teacher_weight (torch.Tensor): teacher lm_head weight `[V, D_t]` (same V; no grad).
        labels (torch.Tensor): next-token ids `[...]`; ``ignore_index`` rows are skipped
            (never projected). None: every row counts.
        bias, teacher_bias (torch.Tensor): lm_head biases `[V]`, or None.
        divergence, beta, temperature, lam, accuracy, ignore_index, reduction: as in
            :func:`dft_kernels.fused_linear_dft_loss` (the accuracy term needs labels).
        softcap, teacher_softcap (float): each head's final-logit softcap, or None.
        logit_scale, teacher_logit_scale (float): each head's logit multiplier.
        num_items_in_batch (int | torch.Tensor): denominator of ``reduction="mean"``.
        impl (str): "auto" (Triton on CUDA, chunked PyTorch elsewhere) | "triton" | "torch" |
            "reference" (materialised logits, for checks). Triton runs the lean strategy;
            the fast one is chunked PyTorch whatever ``impl``.
        strategy (str), memory_budget (int): "auto" | "lean" | "fast" (sec. 10).
        return_components (bool): return a :class:`DFTLossOutput` (teacher / student mass 1).
        lora_A, lora_B, lora_scaling, lora_dropout: a low-rank correction of the student's
            head, as in :func:`dft_kernels.fused_linear_dft_loss` (docs/design.md sec. 17).
        teacher_lora_A, teacher_lora_B, teacher_lora_scaling: the teacher's, or None.
    Returns:
        The loss: a scalar, or `[...]` with ``reduction="none"`` (0 where a row does not count).
    """
    s_scale, t_scale, lora, t_lora = _check_distill_args(
        hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_softcap, logit_scale,
        teacher_logit_scale, (lora_A, lora_B, lora_scaling, lora_dropout),
        (teacher_lora_A, teacher_lora_B, teacher_lora_scaling))
    check_options(lam=lam, divergence=divergence, beta=beta, tail="bucket", accuracy=accuracy,
                  temperature=temperature, softcap=softcap, reduction=reduction, impl=impl)
    check_strategy(strategy, memory_budget)
    lead = tuple(hidden.shape[:-1])
    N = math.prod(lead)
    counted = _counted_rows(labels, lead, ignore_index, hidden.device)
    impl = _distill_impl(impl, hidden, teacher_hidden)
    tau = float(temperature)
    kind = effective_divergence(divergence, beta)
    rows = counted.nonzero().squeeze(1)      # host sync: uncounted rows are never projected
    student, teacher = _heads(hidden.reshape(N, -1), weight, bias, softcap, s_scale, lora, teacher_hidden.reshape(N, -1),
                              teacher_weight, teacher_bias, teacher_softcap, t_scale, t_lora, rows)
    n_tokens = counted.sum()
    cdt = compute_dtype(hidden.dtype)
    denom = mean_denominator(num_items_in_batch, n_tokens, cdt) if reduction == "mean" else 1.0
    div_c, fast_loss = _divergence(student, teacher, bias, rows, tau, kind, float(beta), impl, reduction, strategy,
                                   memory_budget, denom, cdt)
    div = torch.zeros(N, dtype=div_c.dtype, device=hidden.device).index_copy(0, rows, div_c) * (tau * tau)
    has_acc = labels is not None and lam > 0
    acc = torch.zeros_like(div)
    if has_acc:
        from .losses import fused_linear_dft_loss
        low_rank = {} if lora is None else dict(lora_A=lora.lora_A, lora_B=lora.lora_B, lora_scaling=lora.scaling,
                                                lora_dropout=lora.dropout)
        acc = fused_linear_dft_loss(hidden.reshape(N, -1) * s_scale, weight, labels=labels.reshape(N).to(hidden.device),
                                    bias=student[2], lam=1.0, accuracy=accuracy, softcap=softcap,
                                    ignore_index=ignore_index, reduction="none",
                                    impl="reference" if impl == "reference" else "auto", **low_rank).to(div.dtype)
    per_row = div + lam * acc
    if reduction == "none":
        loss, red_div, red_acc = per_row.reshape(lead), div.detach().reshape(lead), acc.detach().reshape(lead)
    else:
        red_div, red_acc = div.detach().sum() / denom, acc.detach().sum() / denom
        if fast_loss is not None:
            loss = fast_loss.to(div.dtype) + (lam * acc.sum() / denom if has_acc else 0.0)
        else:
            loss = per_row.sum() / denom
        if isinstance(loss, torch.Tensor) and not loss.requires_grad and hidden.requires_grad \
                and torch.is_grad_enabled() and rows.numel() == 0:
            loss = loss + hidden.sum() * 0.0      # nothing counted: zero gradients, not None
    if not return_components:
        return loss
    one = torch.ones((), dtype=torch.float32, device=hidden.device)
    return DFTLossOutput(loss, red_div, red_acc, n_tokens, one, one)


def _check_distill_args(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_softcap,
                        logit_scale, teacher_logit_scale, student_lora: tuple, teacher_lora: tuple):
    """The distillation loss's tensor checks; returns the two logit scales and the two heads'
    low-rank corrections (:class:`LowRankHead` or None)."""
    _check_head("hidden", hidden, "weight", weight, "bias", bias)
    _check_head("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight, "teacher_bias", teacher_bias)
    if teacher_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"the teacher's vocab ({teacher_weight.shape[0]} rows of teacher_weight) differs from the "
                         f"student's ({weight.shape[0]} rows of weight): dense distillation needs one shared vocab")
    if tuple(teacher_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
        raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} and hidden {tuple(hidden.shape)} must have the "
                         "same leading dims (one teacher row per student row)")
    for name, t in (("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                    ("teacher_bias", teacher_bias)):
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name} requires grad: the teacher gets no gradient; run the teacher under "
                             "torch.no_grad() or pass .detach()")
    if teacher_softcap is not None and (not isinstance(teacher_softcap, (int, float)) or not teacher_softcap > 0):
        raise ValueError(f"teacher_softcap={teacher_softcap!r} must be None or a number > 0")
    s_scale = _check_scale("logit_scale", logit_scale)
    t_scale = _check_scale("teacher_logit_scale", teacher_logit_scale)
    lora = check_low_rank(weight, *student_lora)
    t_lora = check_low_rank(teacher_weight, *teacher_lora, None, prefix="teacher_")
    return s_scale, t_scale, lora, t_lora


def _counted_rows(labels, lead: tuple, ignore_index: int, device) -> torch.Tensor:
    """[N] bool: the rows whose label is not ``ignore_index`` (every row without labels)."""
    N = math.prod(lead)
    if labels is None:
        return torch.ones(N, dtype=torch.bool, device=device)
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or tuple(labels.shape) != lead:
        raise ValueError(f"labels must be an integer tensor of shape {lead} (the leading dims of hidden), got "
                         f"{getattr(labels, 'dtype', type(labels))} {tuple(getattr(labels, 'shape', ()))}")
    return labels.reshape(N).to(device) != ignore_index


def _distill_impl(impl: str, hidden, teacher_hidden) -> str:
    """The resolved impl: "auto" takes the chunked PyTorch path for dtypes the kernel lacks."""
    if impl == "triton":
        ops._check_triton(hidden.device)
    elif impl == "auto" and resolve_impl(impl, hidden.device) == "triton" and not all(
            t.dtype in (torch.float32, torch.bfloat16, torch.float16) for t in (hidden, teacher_hidden)):
        impl = "torch"        # the kernel's dtypes; float64 runs the chunked PyTorch path
    return resolve_impl(impl, hidden.device)


def _heads(h, weight, bias, softcap, s_scale, lora, ht, teacher_weight, teacher_bias, teacher_softcap, t_scale,
           t_lora, rows):
    """``(student, teacher)``: each ``(h, w, b, softcap)`` on the counted ``rows``, the
    low-rank segment joined (``[h | u] @ [W | B].T``, docs/design.md sec. 17) and the logit
    scale folded into h and b; the teacher detached."""
    h_c, ht_c = h.index_select(0, rows), ht.detach().index_select(0, rows)
    w_s, w_t = weight, teacher_weight.detach()
    if lora is not None:
        h_c, w_s = lora.joined(h_c, w_s)
    if t_lora is not None:
        with torch.no_grad():
            ht_c, w_t = t_lora.joined(ht_c, w_t)
    h_c, b = fold_logit_scale(h_c, bias, s_scale)
    ht_c, bt = fold_logit_scale(ht_c, None if teacher_bias is None else teacher_bias.detach(), t_scale)
    return ((h_c, w_s, b, None if softcap is None else float(softcap)),
            (ht_c, w_t, bt, None if teacher_softcap is None else float(teacher_softcap)))


def _divergence(student, teacher, bias, rows, tau: float, kind: str, beta: float, impl: str, reduction: str,
                strategy: str, memory_budget, denom, cdt):
    """``(div_c [rows], fast_loss | None)``: the per-row divergence of the counted rows, by
    the reference, the lean strategy or the fast one (then also its scalar loss share)."""
    if impl == "reference":
        from .ops.two_head.naive import two_head_divergence
        return two_head_divergence(student, teacher, 1.0 / tau, kind, beta), None
    h_c, w_s = student[0], student[1]
    chosen = choose_strategy(strategy, memory_budget, reduction=reduction, vocab_parallel=None,
                             tensors=(h_c, w_s, bias), n_rows=int(rows.numel()), hidden=h_c.shape[1],
                             vocab=w_s.shape[0], k=0, chunk_rows=None, teacher_hidden=teacher[0].shape[1],
                             divergence=kind)
    if chosen == "lean":
        return ops.two_head_divergence_apply(student, teacher, 1.0 / tau, kind, beta, impl=impl), None
    row_weight = torch.full_like(rows, tau * tau, dtype=cdt) / denom
    fast_loss, div_c = ops.two_head_divergence_apply(student, teacher, 1.0 / tau, kind, beta, row_weight=row_weight)
    return div_c, fast_loss
