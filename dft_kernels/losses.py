"""The DFT loss (docs/design.md sec. 3-5) on top of the kernel primitive.

``dft_loss`` (logits path) and ``fused_linear_dft_loss`` (hidden @ lm_head path)
validate their input, ask a kernel for the per-row log-sum-exp and the logits
gathered at the teacher ids and the label, and do the rest -- small [N, K]
tensors -- in plain differentiable PyTorch.
"""
from __future__ import annotations

import math
import os

import torch

from . import ops
from .low_rank import LORA_ARGS_DOC, check_low_rank
from .memory import chunk_rows_for, loss_extra_bytes
from .options import (IMPLS, LOG_TINY, TINY, DFTLossOutput, check_options, check_strategy,
                      effective_divergence, needs_student_tail)
from .validation import check_loss_inputs, check_targets, compute_dtype, validate_labels, validate_target_data

# --------------------------------------------------------------------------- options


def resolve_impl(impl: str, device: torch.device) -> str:
    """"auto" -> $DFT_KERNELS_IMPL if set, else the choice `dft-kernels doctor --save` measured
    on this device, else Triton on CUDA, chunked PyTorch elsewhere. Triton chosen by "auto"
    is ``ops.AUTO_TRITON`` (equal to "triton"): a failure on an op's first call warns once and
    continues on the PyTorch path (docs/design.md sec. 16); ``impl="triton"`` raises."""
    if impl == "auto":
        env = os.environ.get("DFT_KERNELS_IMPL", "").strip()
        if env:
            if env not in IMPLS or env == "auto":
                raise ValueError(f"DFT_KERNELS_IMPL={env!r} is not one of ('triton', 'torch', 'reference')")
            return ops.AUTO_TRITON if env == "triton" else env
        if device.type != "cuda" or not ops.HAS_TRITON:
            return "torch"
        from .doctor.cache import cached_choice
        return "torch" if cached_choice("impl", device) == "torch" else ops.AUTO_TRITON
    return impl


# --------------------------------------------------------------------------- math


def _xlogy_terms(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum over the last dim of w * (a - b), terms with w == 0 exactly 0."""
    pos = w > 0
    zero = torch.zeros_like(w)
    return torch.where(pos, w * (torch.where(pos, a, zero) - torch.where(pos, b, zero)), zero).sum(-1)


def divergence_terms(lq: torch.Tensor, lp: torch.Tensor, ok: torch.Tensor, *, kind: str, beta: float,
                     tail: str, log_q_tail: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row divergence on the K+1 buckets (docs/design.md sec. 3), fp32.

    ``lq`` [N, K] student log-probs at the slots (at temperature), ``lp`` [N, K]
    teacher log-probs, ``ok`` [N, K] valid slots. ``log_q_tail`` [N], when given, is
    the student's tail log-mass computed by the kernel over the vocab outside the
    slots (exact where ``1 - Q`` cancels); else it is ``log(-expm1(log Q))``.
    Returns (div, P, Q) per row."""
    zero = torch.zeros_like(lq)
    neg = torch.full_like(lq, -torch.inf)
    lq_m = torch.where(ok, lq, neg)
    lp_m = torch.where(ok, lp, neg)
    q = torch.where(ok, lq.exp(), zero)
    p = torch.where(ok, lp_m.exp(), zero)
    P = p.sum(-1)
    # log Q with a guard for rows without a valid slot (logsumexp of all -inf)
    any_ok = ok.any(-1)
    lQ = torch.logsumexp(torch.where(any_ok.unsqueeze(-1), lq_m, zero), dim=-1)
    lQ = torch.where(any_ok, lQ, torch.full_like(lQ, -torch.inf))
    Q = lQ.exp()
    if log_q_tail is None:
        log_q_tail = torch.log(torch.clamp(-torch.expm1(torch.clamp(lQ, max=0.0)), min=TINY))
    else:
        log_q_tail = torch.clamp(log_q_tail, min=LOG_TINY, max=0.0)
    q_tail = log_q_tail.exp()

    if tail == "renorm":
        P_safe = torch.where(P > 0, P, torch.ones_like(P))
        p = p / P_safe.unsqueeze(-1)
        lp_m = lp_m - P_safe.log().unsqueeze(-1)
        p_tail = torch.zeros_like(P)
        log_p_tail = torch.full_like(P, -torch.inf)
    else:
        p_tail = torch.clamp(1.0 - P, min=0.0)
        log_p_tail = torch.log(torch.clamp(1.0 - P, min=TINY))

    if kind == "forward_kl":
        div = _xlogy_terms(p, lp_m, lq_m)
        if tail == "bucket":
            div = div + _xlogy_terms(p_tail.unsqueeze(-1), log_p_tail.unsqueeze(-1), log_q_tail.unsqueeze(-1))
    elif kind == "reverse_kl":
        div = _xlogy_terms(q, lq_m, lp_m) + q_tail * (log_q_tail - log_p_tail)
    else:  # jsd, 0 < beta < 1
        lb, l1b = math.log(beta), math.log1p(-beta)
        lm = torch.logaddexp(lp_m + lb, lq_m + l1b)
        lm_tail = torch.logaddexp(log_p_tail + lb, log_q_tail + l1b)
        kl_pm = _xlogy_terms(p, lp_m, lm) + _xlogy_terms(p_tail.unsqueeze(-1), log_p_tail.unsqueeze(-1),
                                                         lm_tail.unsqueeze(-1))
        kl_qm = _xlogy_terms(q, lq_m, lm) + q_tail * (log_q_tail - lm_tail)
        div = beta * kl_pm + (1.0 - beta) * kl_qm
    return div, P, Q


def valid_slots(idx: torch.Tensor, lp: torch.Tensor, V: int) -> torch.Tensor:
    """[N, K] bool: teacher slots with an id in [0, V) and mass > 0."""
    return (idx >= 0) & (idx < V) & (lp > -torch.inf)


def counted_rows(target_index, target_logprobs, labels, *, V: int, ignore_index: int, N: int,
                 device=None) -> torch.Tensor:
    """[N] bool: the positions that count (docs/design.md sec. 5): label not
    ``ignore_index`` when labels are given, else at least one valid slot."""
    if labels is not None:
        return labels.reshape(N) != ignore_index
    if target_index is not None:
        K = target_index.shape[-1]
        return valid_slots(target_index.reshape(N, K), target_logprobs.reshape(N, K), V).any(-1)
    return torch.zeros(N, dtype=torch.bool, device=device)


def mean_denominator(num_items_in_batch, n_tokens: torch.Tensor, cdt: torch.dtype):
    """The denominator of reduction="mean": ``num_items_in_batch`` if given, else the
    counted positions, at least 1 (a batch with nothing to count gives 0, not NaN)."""
    if num_items_in_batch is None:
        return n_tokens.clamp(min=1).to(cdt)
    if isinstance(num_items_in_batch, torch.Tensor):
        return num_items_in_batch.to(device=n_tokens.device, dtype=cdt).clamp(min=1)
    return max(num_items_in_batch, 1)


def loss_from_primitive(lse: torch.Tensor, gathered: torch.Tensor, *, target_index, target_logprobs,
                        labels, V: int, temps: tuple[float, ...], lam: float, divergence: str, beta: float,
                        tail: str, accuracy: str, temperature: float, ignore_index: int, reduction: str,
                        num_items_in_batch, return_components: bool, lead: tuple):
    """Everything after the kernel: sec. 3-5 on [N, M] tensors. ``gathered`` holds the
    K teacher columns first, then the label column when the accuracy term is on."""
    N = lse.shape[0]
    device = lse.device
    cdt = compute_dtype(lse.dtype)  # the primitive's lse is fp32, or fp64 on float64 inputs
    has_div = target_index is not None
    has_acc = labels is not None and lam > 0
    K = target_index.shape[-1] if has_div else 0

    counted = counted_rows(target_index, target_logprobs, labels, V=V, ignore_index=ignore_index, N=N,
                           device=device)
    label_ok = counted if labels is not None else None
    div = torch.zeros(N, dtype=cdt, device=device)
    P = Q = None
    if has_div:
        idx = target_index.reshape(N, K)
        lp = target_logprobs.reshape(N, K).to(cdt)
        ok = valid_slots(idx, lp, V)
        lse_tau = lse[:, temps.index(temperature)]
        lq = gathered[:, :K] / temperature - lse_tau.unsqueeze(-1)
        kind = effective_divergence(divergence, beta)
        log_q_tail = lse[:, len(temps)] - lse_tau if lse.shape[1] > len(temps) else None
        div, P, Q = divergence_terms(lq, lp, ok, kind=kind, beta=float(beta), tail=tail, log_q_tail=log_q_tail)
        if temperature != 1.0:
            div = div * (temperature ** 2)
        has_slot = ok.any(-1)
        div = torch.where(has_slot, div, torch.zeros_like(div))

    acc = torch.zeros(N, dtype=cdt, device=device)
    if has_acc:
        lq_y = gathered[:, K] - lse[:, temps.index(1.0)]
        if accuracy == "ce":
            a = -lq_y
        else:
            a = -lq_y.detach().exp() * lq_y
        acc = torch.where(label_ok, a, torch.zeros_like(a))

    div = torch.where(counted, div, torch.zeros_like(div))
    per_row = div + lam * acc if has_acc else div
    n_tokens = counted.sum()

    if reduction == "none":
        loss = per_row.reshape(lead)
        red_div, red_acc = div.reshape(lead), acc.reshape(lead)
    else:
        loss, red_div, red_acc = per_row.sum(), div.sum(), acc.sum()
        if reduction == "mean":
            denom = mean_denominator(num_items_in_batch, n_tokens, cdt)
            loss, red_div, red_acc = loss / denom, red_div / denom, red_acc / denom
    if not return_components:
        return loss
    with torch.no_grad():
        if has_div:
            sel = counted & has_slot
            cnt = sel.sum()
            tm = torch.where(sel, P, torch.zeros_like(P)).sum() / cnt
            sm = torch.where(sel, Q.detach(), torch.zeros_like(Q)).sum() / cnt
        else:
            tm = sm = torch.tensor(float("nan"), device=device)
    return DFTLossOutput(loss, red_div.detach(), red_acc.detach(), n_tokens, tm, sm)


def _plan(target_index, target_logprobs, labels, lam, temperature, ignore_index, N: int, V: int):
    """Columns to gather ([N, M] ids: K teacher ids, then the label) and the scales.

    Teacher slots with zero mass (-inf log-prob) are passed as empty (-1): their
    student mass belongs to the tail bucket. Rows that do not count are all -1, so the
    ops never project them (docs/design.md sec. 10)."""
    has_div = target_index is not None
    has_acc = labels is not None and lam > 0
    cols = []
    if has_div:
        K = target_index.shape[-1]
        idx = target_index.reshape(N, K)
        zero_mass = target_logprobs.reshape(N, K) == -torch.inf
        cols.append(torch.where(zero_mass, torch.full_like(idx, -1), idx))
    if has_acc:
        lab = labels.reshape(N, 1)
        cols.append(torch.where(lab == ignore_index, torch.full_like(lab, -1), lab).to(
            cols[0].dtype if cols else lab.dtype))
    if cols:
        index = torch.cat(cols, dim=1) if len(cols) > 1 else cols[0]
    else:
        index = torch.empty((N, 0), dtype=torch.int64, device=labels.device if labels is not None else None)
    if index.shape[1]:
        counted = counted_rows(target_index, target_logprobs, labels, V=V, ignore_index=ignore_index, N=N)
        index = torch.where(counted.to(index.device).unsqueeze(1), index, torch.full_like(index, -1))
    temps = []
    if has_acc or not has_div:
        temps.append(1.0)
    if has_div and float(temperature) not in temps:
        temps.append(float(temperature))
    if not temps:
        temps.append(1.0)
    return index.contiguous(), tuple(temps)


def gather_plan(target_index, target_logprobs, labels, *, lam: float, temperature: float, ignore_index: int,
                n_rows: int, vocab: int) -> tuple[torch.Tensor, tuple]:
    """The columns the losses gather and the temperatures of their log-sum-exps, as the
    loss entry points plan them (read by the benchmarks' memory model).

    Returns:
        ``(index, temperatures)``: ``[n_rows, M]`` ids (the K teacher slots, then the
        label; -1 = not projected) and the tuple of softmax temperatures."""
    return _plan(target_index, target_logprobs, labels, lam, float(temperature), ignore_index, n_rows, vocab)


# --------------------------------------------------------------------------- public

_TARGET_ARGS_DOC = """\
        target_index (torch.Tensor):
            ids of the teacher's slots of shape `[..., K]` (int; -1 = empty slot), row t
            holding the teacher's distribution of the token after position t; or None
            (no divergence term: a plain cross-entropy / DFT-CE loss).
        target_logprobs (torch.Tensor):
            teacher log-probs of shape `[..., K]`, normalised over the teacher's full
            vocabulary (-inf = zero mass); None together with ``target_index``. Without
            targets the loss is the accuracy term at weight 1 (``lam`` does not apply).
        labels (torch.Tensor):
            next-token ids of shape `[...]` (``ignore_index`` skips a position), or None.
"""

_OPTION_ARGS_DOC = """\
        lam, divergence, beta, tail, accuracy, temperature, softcap, ignore_index, reduction:
            the loss options (docs/design.md sec. 3-5); defaults in ``options.LOSS_DEFAULTS``.
        num_items_in_batch (int | torch.Tensor):
            denominator of ``reduction="mean"`` (Hugging Face gradient accumulation);
            None: the number of counted positions.
        impl (str):
            "auto" | "triton" | "torch" | "reference"; env ``DFT_KERNELS_IMPL`` overrides "auto".
        validate (bool):
            check the targets and labels at once with a host sync and a message naming the
            offending value. Without it the same checks still run as device-side flags
            (no host sync): raised at once on CPU, on CUDA at the next loss call or
            ``validation.flush_checks()`` (docs/design.md sec. 7).
        return_components (bool):
            return a :class:`DFTLossOutput` instead of the loss.
        chunk_elems (int):
            elements per chunk of the torch path (None: its default).
"""

_RETURNS_DOC = """
    Returns:
        The loss: a scalar, or of shape `[...]` (0 where a position does not count) with
        ``reduction="none"``; a :class:`DFTLossOutput` with ``return_components=True``.
"""


def _loss_from_student(what: str, lead: tuple, V: int, device: torch.device, primitive, reference_call, *,
                       target_index, target_logprobs, labels, lam, divergence, beta, tail, accuracy,
                       temperature, softcap, ignore_index, reduction, num_items_in_batch, impl, validate,
                       return_components, fast_primitive=None):
    """The option plumbing both public losses share.

    ``what`` names the student input in messages, ``lead`` its leading dims and ``V``
    the (full) vocab size. Runs the free checks, the optional data validation, the
    implementation choice, the column plan, then ``primitive(index, scales, impl,
    tail_slots) -> (lse, gathered)`` and the loss math of sec. 3-5;
    ``reference_call(**loss_keywords)`` runs the naive reference instead.
    ``fast_primitive(index, scales, impl, tail_slots, chunk_loss) -> (loss, lse,
    gathered)``, when given, runs the fast strategy (docs/design.md sec. 10) instead."""
    check_options(lam=lam, divergence=divergence, beta=beta, tail=tail, accuracy=accuracy,
                  temperature=temperature, softcap=softcap, reduction=reduction, impl=impl)
    check_targets(lead, target_index, target_logprobs, labels, what=what)
    if validate:
        if target_index is not None:
            validate_target_data(target_index, target_logprobs, V)
        if labels is not None:
            validate_labels(labels, V, ignore_index)
    else:   # the cheap data checks, always on, no host sync on CUDA (docs/design.md sec. 7)
        check_loss_inputs(target_index, target_logprobs, labels, V, ignore_index)
    if target_index is None:
        lam = 1.0   # no targets: the loss is the accuracy term at weight 1 (docs/design.md sec. 4)
    kw = dict(lam=lam, divergence=divergence, beta=beta, tail=tail, accuracy=accuracy,
              temperature=float(temperature), ignore_index=ignore_index, reduction=reduction,
              num_items_in_batch=num_items_in_batch, return_components=return_components)
    impl = resolve_impl(impl, device)
    if impl == "reference":
        return reference_call(softcap=softcap, **kw)
    N = math.prod(lead)
    if target_index is not None and target_index.shape[-1] > 1:
        # a repeated id is one bucket with the summed mass (docs/design.md sec. 2)
        K = target_index.shape[-1]
        idx, lp = ops.merge_duplicate_slots(target_index.reshape(N, K), target_logprobs.reshape(N, K), V)
        target_index, target_logprobs = idx.reshape(target_index.shape), lp.reshape(target_logprobs.shape)
    index, temps = _plan(target_index, target_logprobs, labels, lam, float(temperature), ignore_index, N, V)
    scales = tuple(1.0 / t for t in temps)
    tail_slots = target_index.shape[-1] if (target_index is not None and
                                            needs_student_tail(divergence, beta, tail)) else 0
    index, plan = index.to(device), dict(V=V, temps=temps)
    if fast_primitive is not None:
        return _fast_loss(fast_primitive, index, scales, impl, tail_slots, plan, N=N, lead=lead,
                          target_index=target_index, target_logprobs=target_logprobs, labels=labels, **kw)
    lse, gathered = primitive(index, scales, impl, tail_slots)
    return loss_from_primitive(lse, gathered, target_index=target_index, target_logprobs=target_logprobs,
                               labels=labels, lead=lead, **plan, **kw)


def _fast_loss(fast_primitive, index, scales, impl, tail_slots, plan: dict, *, N: int, lead: tuple,
               target_index, target_logprobs, labels, **kw):
    """The fast strategy: the loss math of sec. 3-5 as a per-chunk callable whose shares
    (the chunk's sum, over the batch's mean denominator) add up to the scalar loss."""
    K = target_index.shape[-1] if target_index is not None else 0
    idx_rows = target_index.reshape(N, K) if K else None
    lp_rows = target_logprobs.reshape(N, K) if K else None
    label_rows = labels.reshape(N) if labels is not None else None
    denom = 1.0
    if kw["reduction"] == "mean":
        counted = counted_rows(target_index, target_logprobs, labels, V=plan["V"], ignore_index=kw["ignore_index"],
                               N=N, device=index.device)
        denom = mean_denominator(kw["num_items_in_batch"], counted.sum(), torch.float64)
    chunk_kw = {**kw, "reduction": "sum", "num_items_in_batch": None, "return_components": False}

    def chunk_loss(lse, gathered, rows):
        share = loss_from_primitive(
            lse, gathered, target_index=None if idx_rows is None else idx_rows[rows],
            target_logprobs=None if lp_rows is None else lp_rows[rows],
            labels=None if label_rows is None else label_rows[rows], lead=(lse.shape[0],), **plan, **chunk_kw)
        return share / (denom.to(share.dtype) if isinstance(denom, torch.Tensor) else denom)

    loss, lse, gathered = fast_primitive(index, scales, impl, tail_slots, chunk_loss)
    if not kw["return_components"]:
        return loss
    with torch.no_grad():
        parts = loss_from_primitive(lse, gathered, target_index=target_index, target_logprobs=target_logprobs,
                                    labels=labels, lead=lead, **plan, **kw)
    return parts._replace(loss=loss)


def _check_float(name: str, t, shape: str) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor {shape}, got {getattr(t, 'dtype', type(t))}")


def dft_loss(logits, target_index=None, target_logprobs=None, labels=None, *, lam=0.2,
             divergence="forward_kl", beta=0.5, tail="bucket", accuracy="ce", temperature=1.0,
             softcap=None, ignore_index=-100, reduction="mean", num_items_in_batch=None, impl="auto",
             validate=False, return_components=False, chunk_elems=None):
    """DFT loss on student logits: ``D(P_target || P_model) + lam * L_accuracy``.

    The only `[N, V]` tensor it allocates is the gradient of the logits.

    Args:
        logits (torch.Tensor):
            student logits of shape `[..., V]` (any float dtype; leading dims are flattened).
"""
    _check_float("logits", logits, "[..., V]")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [..., V] with V > 0, got {tuple(logits.shape)}")

    def reference_call(**kw):
        from . import reference
        return reference.dft_loss(logits, target_index, target_logprobs, labels, **kw)

    def primitive(index, scales, impl, tail_slots):
        return ops.lse_gather_apply(logits, index, scales, softcap, impl, chunk_elems, tail_slots=tail_slots)

    return _loss_from_student(
        "logits", tuple(logits.shape[:-1]), logits.shape[-1], logits.device, primitive, reference_call,
        target_index=target_index, target_logprobs=target_logprobs, labels=labels, lam=lam,
        divergence=divergence, beta=beta, tail=tail, accuracy=accuracy, temperature=temperature,
        softcap=softcap, ignore_index=ignore_index, reduction=reduction, num_items_in_batch=num_items_in_batch,
        impl=impl, validate=validate, return_components=return_components)


def fused_linear_dft_loss(hidden, weight, target_index=None, target_logprobs=None, labels=None, *,
                          bias=None, lam=0.2, divergence="forward_kl", beta=0.5, tail="bucket",
                          accuracy="ce", temperature=1.0, softcap=None, ignore_index=-100,
                          reduction="mean", num_items_in_batch=None, impl="auto", validate=False,
                          return_components=False, chunk_elems=None, accum_fp32=True, vocab_parallel=None,
                          strategy="auto", memory_budget=1 << 30, lora_A=None, lora_B=None, lora_scaling=1.0,
                          lora_dropout=None):
    """DFT loss from the last hidden states and the lm_head, never materialising the
    `[N, V]` logits. With ``target_index=None`` it is a fused linear cross-entropy (or
    DFT-CE): a drop-in for ``F.cross_entropy(hidden @ weight.T + bias, labels)``.

    Gradients flow to ``hidden``, ``weight`` and ``bias``, each only if it requires
    grad (a frozen lm_head allocates no dW), and are bitwise reproducible run to run:
    every backward path accumulates in a fixed order (no atomics), so there is no
    switch for it.

    Args:
        hidden (torch.Tensor):
            last hidden states of shape `[..., D]` (leading dims are flattened).
        weight (torch.Tensor):
            lm_head weight of shape `[V, D]` (this rank's rows with ``vocab_parallel``).
"""
    _check_float("hidden", hidden, "[..., D]")
    _check_float("weight", weight, "[V, D]")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, D] (the lm_head weight), got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden has hidden size {hidden.shape[-1] if hidden.dim() else None} but weight "
                         f"{tuple(weight.shape)} expects D = {weight.shape[1]}: hidden must be [..., D] "
                         "and weight [V, D]")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype; "
                        "cast one of them (e.g. hidden.to(weight.dtype))")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be a tensor of shape ({weight.shape[0]},), got "
                             f"{tuple(getattr(bias, 'shape', ()))}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias ({bias.dtype}) must have the dtype of weight ({weight.dtype})")
    check_strategy(strategy, memory_budget)
    lora = check_low_rank(weight, lora_A, lora_B, lora_scaling, lora_dropout)
    V, D = weight.shape
    if vocab_parallel is None and type(weight).__name__ == "DTensor":
        raise TypeError("weight is a DTensor: pass vocab_parallel=dft_kernels.distributed.VocabParallel."
                        "from_dtensor(weight, rows=...) for a vocab-sharded lm_head, or weight.full_tensor()")
    if vocab_parallel is not None:
        from .distributed import VocabParallel
        if not isinstance(vocab_parallel, VocabParallel):
            raise TypeError(f"vocab_parallel must be a dft_kernels.distributed.VocabParallel, got "
                            f"{type(vocab_parallel).__name__}")
        vocab_parallel.check_weight(weight)
        V = vocab_parallel.vocab_size
        if lora is not None:
            raise ValueError("lora_A / lora_B with vocab_parallel is not supported: merge the adapter into the "
                             "sharded lm_head (dft_kernels.hf.merge_style_head) or run without vocab_parallel")

    def reference_call(**kw):
        if vocab_parallel is not None:
            raise ValueError("impl='reference' does not support vocab_parallel; use impl='torch' or 'triton'")
        from . import reference
        h, w = (hidden, weight) if lora is None else lora.joined(hidden, weight)
        return reference.fused_linear_dft_loss(h, w, target_index, target_logprobs, labels, bias=bias, **kw)

    segment = None      # (u, lora_B), formed once per call

    def low_rank(h):
        nonlocal segment
        if lora is not None and segment is None:
            segment = lora.segment(h)
        return segment

    def primitive(index, scales, impl, tail_slots):
        h = hidden.reshape(-1, D)
        if vocab_parallel is not None:
            from .distributed import vocab_parallel_lse_gather
            return vocab_parallel_lse_gather(h, weight, bias, index, scales, softcap, impl, vocab_parallel,
                                             chunk_elems=chunk_elems, accum_fp32=accum_fp32,
                                             tail_slots=tail_slots)
        return ops.linear_lse_gather_apply(h, weight, bias, index, scales, softcap, impl,
                                           chunk_elems=chunk_elems, accum_fp32=accum_fp32, tail_slots=tail_slots,
                                           lora=low_rank(h))

    N = math.prod(hidden.shape[:-1])
    fast_rows = chunk_rows_for("fast", V, N, chunk_elems)
    fast_primitive = None
    if choose_strategy(strategy, memory_budget, reduction=reduction, vocab_parallel=vocab_parallel,
                       tensors=(hidden, weight, bias) + (() if lora is None else (lora.lora_A, lora.lora_B)),
                       n_rows=N, hidden=D, vocab=V,
                       k=0 if target_index is None else target_index.shape[-1], chunk_rows=fast_rows) == "fast":
        def fast_primitive(index, scales, impl, tail_slots, chunk_loss):
            h = hidden.reshape(-1, D)
            return ops.linear_fast_loss_apply(h, weight, bias, index, scales, softcap, chunk_loss,
                                              impl, chunk_rows=fast_rows, accum_fp32=accum_fp32,
                                              tail_slots=tail_slots, lora=low_rank(h))

    return _loss_from_student(
        "hidden", tuple(hidden.shape[:-1]), V, hidden.device, primitive, reference_call,
        target_index=target_index, target_logprobs=target_logprobs, labels=labels, lam=lam,
        divergence=divergence, beta=beta, tail=tail, accuracy=accuracy, temperature=temperature,
        softcap=softcap, ignore_index=ignore_index, reduction=reduction, num_items_in_batch=num_items_in_batch,
        impl=impl, validate=validate, return_components=return_components, fast_primitive=fast_primitive)


def choose_strategy(strategy: str, memory_budget, *, reduction: str, vocab_parallel, tensors, n_rows: int,
                    hidden: int, vocab: int, k: int, chunk_rows: int | None, teacher_hidden: int | None = None,
                    divergence: str = "forward_kl") -> str:
    """"lean" or "fast" for a fused call (docs/design.md sec. 10).

    Fast applies to scalar reductions under grad mode with something to differentiate;
    elsewhere every strategy runs lean (same results). "auto" picks fast when
    ``memory.loss_extra_bytes("fast", ...)`` fits ``memory_budget``, unless
    `dft-kernels doctor --save` measured lean faster on this CUDA device.

    Args:
        strategy: "auto" | "lean" | "fast"; memory_budget: bytes.
        reduction: the loss reduction; vocab_parallel: the sharding, or None.
        tensors: (hidden, weight, bias) -- what may need a gradient.
        n_rows, hidden, vocab, k, chunk_rows: the sizes of the memory model.
        teacher_hidden, divergence: the dense two-head loss's (``fused_linear_distill_loss``),
            or None for the sparse-target loss.
    Returns:
        "lean" or "fast".
    """
    if strategy == "lean":
        return "lean"
    if vocab_parallel is not None:
        if strategy == "fast":
            raise ValueError("strategy='fast' does not support vocab_parallel (a vocab-sharded head); "
                             "use strategy='lean' or 'auto'")
        return "lean"
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if reduction == "none" or not needs_grad:
        return "lean"
    if strategy == "fast":
        return "fast"
    weight = tensors[1]
    if weight.is_cuda and teacher_hidden is None:     # the doctor times the sparse-target loss only
        from .doctor.cache import cached_choice
        if cached_choice("strategy", weight.device) == "lean":
            return "lean"     # measured faster here by `dft-kernels doctor --save` (docs/design.md sec. 16)
    extra = loss_extra_bytes("fast", n_rows=n_rows, hidden=hidden, vocab=vocab, k=k,
                             dtype_bytes=weight.element_size(), head_trains=weight.requires_grad,
                             chunk_rows=chunk_rows, upcast=not weight.is_cuda, teacher_hidden=teacher_hidden,
                             divergence=divergence)
    return "fast" if extra <= memory_budget else "lean"


dft_loss.__doc__ += _TARGET_ARGS_DOC + _OPTION_ARGS_DOC + _RETURNS_DOC
fused_linear_dft_loss.__doc__ += _TARGET_ARGS_DOC + """\
        bias (torch.Tensor):
            lm_head bias of shape `[V]`, or None.
""" + _OPTION_ARGS_DOC + """\
        accum_fp32 (bool):
            accumulate dW (and dH) in fp32 for bf16 / fp16 inputs.
        vocab_parallel (dft_kernels.distributed.VocabParallel):
            set when ``weight`` / ``bias`` hold only this rank's rows of a vocab-sharded lm_head.
        strategy (str):
            "lean" (logits recomputed in the backward), "fast" (each chunk's logits once,
            gradients formed in the forward; no double backward) or "auto": fast when its
            extra memory (``memory.loss_extra_bytes``) fits ``memory_budget``
            (docs/design.md sec. 10). ``reduction="none"`` and calls without grad run lean.
        memory_budget (int):
            bytes the fast strategy may use beyond the inputs (default 1 GiB).
""" + LORA_ARGS_DOC + _RETURNS_DOC
