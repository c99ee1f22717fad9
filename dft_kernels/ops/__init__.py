"""Kernel entry points. Kernels know nothing of losses: they compute the primitive
of docs/design.md sec. 6 -- per-row fp32 log-sum-exp at one or two scales and the
logits gathered at given ids -- and its backward.

``impl`` is "triton" or "torch"; the Triton modules are imported lazily so that
``TRITON_INTERPRET=1`` may be set any time before the first Triton call.
"""
from __future__ import annotations

import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_usable(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of ``device``."""
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _check_triton(device: torch.device) -> None:
    if not HAS_TRITON:
        raise RuntimeError("impl='triton' needs the triton package (pip install triton); "
                           "use impl='torch' on this machine")
    if not triton_usable(device):
        raise RuntimeError(
            f"impl='triton' got tensors on {device}: Triton runs on CUDA, or on the CPU only under "
            "the interpreter (set TRITON_INTERPRET=1 before the first Triton call); "
            "use impl='torch' otherwise")


def lse_gather_apply(x: torch.Tensor, index: torch.Tensor, scales: tuple[float, ...],
                     softcap: float | None, impl: str, chunk_elems: int | None = None, *, tail_slots: int = 0):
    """The primitive on logits.

    Args:
        x: [..., V] logits (N = prod of the leading dims).
        index: [N, M] ids to gather (-1 = none).
        scales: one or two scales (1 / temperature) for the log-sum-exp.
        softcap: ``c`` of ``c * tanh(x / c)``, or None.
        impl: "triton" or "torch".
        chunk_elems: elements per chunk of the torch path (None: its default).
        tail_slots: with ``tail_slots > 0``, one more lse column: the log-sum-exp at
            ``scales[-1]`` over the vocab outside the row's first ``tail_slots`` ids
            (the student's tail; ``-inf`` if empty).
    Returns:
        ``lse`` [N, len(scales) + (tail_slots > 0)] fp32 and ``gathered`` [N, M] fp32
        (the softcapped logits at ``index``, 0 where an id is -1 or out of range).
    """
    if impl == "triton":
        _check_triton(x.device)
        from .lse_gather import LSEGatherTriton
        return LSEGatherTriton.apply(x, index, tuple(scales), softcap, tail_slots)
    from .torch_chunked import LSEGatherTorch
    return LSEGatherTorch.apply(x, index, tuple(scales), softcap, chunk_elems, tail_slots)


def linear_lse_gather_apply(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, index: torch.Tensor,
                            scales: tuple[float, ...], softcap: float | None, impl: str, *,
                            chunk_elems: int | None = None, accum_fp32: bool = True, tail_slots: int = 0):
    """The same primitive for logits ``h @ w.T + b`` that are never materialised.

    Args:
        h: [N, D] hidden states; w: [V, D] lm_head weight; b: [V] bias or None.
        index, scales, softcap, impl, chunk_elems, tail_slots: as in :func:`lse_gather_apply`.
        accum_fp32: accumulate dW (and dH) in fp32 for bf16 / fp16 inputs.
    Returns:
        ``lse`` [N, len(scales) + (tail_slots > 0)] fp32 and ``gathered`` [N, M] fp32.
        Gradients are bitwise reproducible run to run (no atomics).
    """
    if impl == "triton":
        _check_triton(h.device)
        from .linear_lse_gather import LinearLSEGatherTriton
        return LinearLSEGatherTriton.apply(h, w, b, index, tuple(scales), softcap, accum_fp32, tail_slots)
    from .torch_chunked import LinearLSEGatherTorch
    return LinearLSEGatherTorch.apply(h, w, b, index, tuple(scales), softcap, chunk_elems, accum_fp32, tail_slots)


def linear_fast_loss_apply(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, index: torch.Tensor,
                           scales: tuple[float, ...], softcap: float | None, chunk_loss, impl: str, *,
                           chunk_rows: int, accum_fp32: bool = True, tail_slots: int = 0):
    """Strategy "fast" (docs/design.md sec. 10): a scalar loss whose gradients are formed
    in the forward, chunk by chunk of rows, each chunk's logits computed once.

    Args:
        h, w, b, index, scales, softcap, impl, accum_fp32, tail_slots: as in
            :func:`linear_lse_gather_apply`.
        chunk_loss: ``chunk_loss(lse [C, T], gathered [C, M], rows) -> scalar``, the chunk's
            share of the loss (``rows``: a slice or int64 row numbers into [0, N)).
        chunk_rows: C, rows per chunk.
    Returns:
        ``loss`` (0-dim, differentiable w.r.t. h, w, b; no double backward), ``lse``
        [N, T] and ``gathered`` [N, M] (detached).
    """
    if impl == "triton":
        _check_triton(h.device)
    from .fast_chunked import FastLinearLoss
    return FastLinearLoss.apply(h, w, b, index, tuple(scales), softcap, chunk_loss, impl, chunk_rows, accum_fp32,
                                tail_slots)


def teacher_topk_apply(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, k: int, inv_temp: float,
                       softcap: float | None, impl: str):
    """A teacher's top-k from hidden states (docs/design.md sec. 11), no [N, V] tensor.

    Args:
        h: [N, D] hidden states (logit scale folded in); w: [V, D]; b: [V] or None.
        k: slots per row (1 <= k <= V); inv_temp: 1 / temperature; softcap: or None.
        impl: "triton" (k <= ``teacher_topk.MAX_TRITON_K``) or "torch".
    Returns:
        ``index`` [N, k] int32, ``logprobs`` [N, k] fp32 normalised over the full vocab
        (value descending, ties by ascending id), ``lse`` [N] fp32. No gradients.
    """
    with torch.no_grad():
        if impl == "triton":
            _check_triton(h.device)
            from .teacher_topk import teacher_topk_forward
            return teacher_topk_forward(h, w, b, k, 1.0, inv_temp, softcap)
        from .teacher_chunked import chunked_topk
        return chunked_topk(h, w, b, k, inv_temp, softcap)


def two_head_divergence_apply(student: tuple, teacher: tuple, inv_temp: float, kind: str, beta: float, *,
                              row_weight: torch.Tensor | None = None, impl: str = "torch"):
    """Dense per-row divergence between two heads' softmaxes (see ops/teacher_chunked.py).

    Args:
        student, teacher: ``(h [N, D], w [V, D], b [V] | None, softcap | None)``; the
            teacher's hidden size may differ; gradients flow to the student's tensors only.
        inv_temp: 1 / temperature; kind: "forward_kl" | "reverse_kl" | "jsd"; beta: JSD weight.
        row_weight: None for the lean strategy; [N] row weights for the fast one.
        impl: "triton" (the lean strategy's kernel, ops/two_head_triton.py; fast stays
            chunked PyTorch) or "torch".
    Returns:
        lean: ``div`` [N] (differentiable); fast: ``(loss, div)``, ``loss = sum(row_weight * div)``
        (0-dim, differentiable, no double backward) and ``div`` [N] detached.
    """
    from .teacher_chunked import TwoHeadDivergenceLean, two_head_divergence_fast
    if row_weight is not None:
        return two_head_divergence_fast(student, teacher, row_weight, inv_temp, kind, beta)
    if impl == "triton":
        _check_triton(student[0].device)
        from .two_head_triton import TwoHeadDivergenceTriton
        return TwoHeadDivergenceTriton.apply(*student[:3], *teacher[:3], student[3], teacher[3], inv_temp, kind, beta)
    return TwoHeadDivergenceLean.apply(*student[:3], *teacher[:3], student[3], teacher[3], inv_temp, kind, beta)
