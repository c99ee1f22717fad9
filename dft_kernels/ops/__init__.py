"""Kernel entry points. Kernels know nothing of losses: they compute the primitive
of docs/design.md sec. 6 -- per-row fp32 log-sum-exp at one or two scales and the
logits gathered at given ids -- and its backward.

``impl`` is "triton" or "torch"; the Triton modules are imported lazily so that
``TRITON_INTERPRET=1`` may be set any time before the first Triton call. The Triton
choice of ``impl="auto"`` (``fallback.AUTO_TRITON``) runs each op's first call on a
device through ``fallback.guarded``: a Triton failure warns once and the op continues
on the chunked PyTorch path (docs/design.md sec. 16).
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import replace

import torch

from . import self_check
from ._common import PrimitiveArgs, TwoHeadArgs, lse_columns, merge_duplicate_slots  # noqa: F401 (public to the losses)
from .fallback import AUTO_TRITON, guarded  # noqa: F401 (impl="auto"'s first-call fallback, docs/design.md sec. 16)

HAS_TRITON = importlib.util.find_spec("triton") is not None


def compile_target(capability: tuple[int, int]):
    """A context manager: within it, launchers given ``meta`` tensors choose the GPU
    configuration of ``capability`` (their launches are then recorded or skipped, never
    run): what the compile gate and the memory benchmarks drive the kernels with."""
    from ._triton_common import compile_target as target
    return target(capability)


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


def _head_check_problem(h, w, b, u, lb, index) -> tuple[list, torch.Tensor]:
    """The first-call check's ``[h, w, b, u, B]`` (every one needing a gradient: the check
    covers the backward kernels once, whatever the call needs) and index for a fused call."""
    small = self_check.head_problem(h.shape[1], w.shape[0], h.dtype, h.device, bias=b is not None,
                                    rank=0 if u is None else u.shape[1])
    return list(small), self_check.problem_index(index.shape[1], w.shape[0], h.device).to(index.dtype)


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
    from .lse_gather.torch import LSEGatherTorch
    args = PrimitiveArgs(tuple(scales), softcap, tail_slots, chunk_elems=chunk_elems)

    def run_torch(x):
        return LSEGatherTorch.apply(x, index, args)

    if impl == "triton":
        _check_triton(x.device)

        def run_triton(x):
            from .lse_gather.triton import LSEGatherTriton
            return LSEGatherTriton.apply(x, index, args)

        def check():
            from .lse_gather.triton import LSEGatherTriton
            idx = self_check.problem_index(index.shape[1], x.shape[-1], x.device).to(index.dtype)
            return self_check.compare_paths(lambda x: LSEGatherTriton.apply(x, idx, args),
                                            lambda x: LSEGatherTorch.apply(x, idx, args),
                                            [self_check.logits_problem(x.shape[-1], x.dtype, x.device)], x.dtype,
                                            ("lse", "gathered"))
        return guarded("lse_gather", impl, x.device, x.dtype, run_triton, run_torch, (x,), check=check)
    return run_torch(x)


def linear_lse_gather_apply(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, index: torch.Tensor,
                            scales: tuple[float, ...], softcap: float | None, impl: str, *,
                            chunk_elems: int | None = None, accum_fp32: bool = True, tail_slots: int = 0,
                            lora: tuple | None = None):
    """The same primitive for logits ``h @ w.T + b`` that are never materialised.

    Args:
        h: [N, D] hidden states; w: [V, D] lm_head weight; b: [V] bias or None.
        index, scales, softcap, impl, chunk_elems, tail_slots: as in :func:`lse_gather_apply`.
        accum_fp32: accumulate dW (and dH) in fp32 for bf16 / fp16 inputs.
        lora: ``(u [N, r], B [V, r])`` or None: a second segment of the contraction, logits
            ``h @ w.T + b + u @ B.T`` (docs/design.md sec. 17); gradients reach u and B.
    Returns:
        ``lse`` [N, len(scales) + (tail_slots > 0)] fp32 and ``gathered`` [N, M] fp32.
        Gradients are bitwise reproducible run to run (no atomics).
    """
    from .linear.torch import LinearLSEGatherTorch
    u, lb = (None, None) if lora is None else lora
    args = PrimitiveArgs(tuple(scales), softcap, tail_slots, accum_fp32, chunk_elems)

    def run_torch(h, w, b, u, lb):
        return LinearLSEGatherTorch.apply(h, w, b, index, args, u, lb)

    if impl == "triton":
        _check_triton(h.device)

        def run_triton(h, w, b, u, lb):
            from .linear.triton import LinearLSEGatherTriton
            return LinearLSEGatherTriton.apply(h, w, b, index, args, u, lb)

        def check():
            from .linear.triton import LinearLSEGatherTriton
            leaves, idx = _head_check_problem(h, w, b, u, lb, index)
            return self_check.compare_paths(lambda *t: LinearLSEGatherTriton.apply(*t[:3], idx, args, *t[3:]),
                                            lambda *t: LinearLSEGatherTorch.apply(*t[:3], idx, args, *t[3:]),
                                            leaves, h.dtype, ("lse", "gathered"))
        return guarded("linear_lse_gather", impl, h.device, h.dtype, run_triton, run_torch, (h, w, b, u, lb),
                       check=check)
    return run_torch(h, w, b, u, lb)


def linear_fast_loss_apply(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, index: torch.Tensor,
                           scales: tuple[float, ...], softcap: float | None, chunk_loss, impl: str, *,
                           chunk_rows: int, accum_fp32: bool = True, tail_slots: int = 0, lora: tuple | None = None):
    """Strategy "fast" (docs/design.md sec. 10): a scalar loss whose gradients are formed
    in the forward, chunk by chunk of rows, each chunk's logits computed once.

    Args:
        h, w, b, index, scales, softcap, impl, accum_fp32, tail_slots, lora: as in
            :func:`linear_lse_gather_apply`.
        chunk_loss: ``chunk_loss(lse [C, T], gathered [C, M], rows) -> scalar``, the chunk's
            share of the loss (``rows``: a slice or int64 row numbers into [0, N)).
        chunk_rows: C, rows per chunk.
    Returns:
        ``loss`` (0-dim, differentiable w.r.t. h, w, b and the lora pair; no double
        backward), ``lse`` [N, T] and ``gathered`` [N, M] (detached).
    """
    from .linear.fast import FastLinearLoss
    u, lb = (None, None) if lora is None else lora
    args = PrimitiveArgs(tuple(scales), softcap, tail_slots, accum_fp32, chunk_rows=chunk_rows)

    def run(path):
        return lambda h, w, b, u, lb: FastLinearLoss.apply(h, w, b, index, args, chunk_loss, path, u, lb)

    if impl == "triton":
        _check_triton(h.device)

        def check():
            leaves, idx = _head_check_problem(h, w, b, u, lb, index)
            g = torch.Generator().manual_seed(2)
            n = self_check.rows(h.device)
            wl = torch.rand((n, lse_columns(args.scales, args.tail_slots)), generator=g).to(h.device)
            wg = torch.rand((n, idx.shape[1]), generator=g).to(h.device)

            def loss(lse, gathered, rows):
                return (lse * wl[rows]).sum() + (gathered * wg[rows]).sum()
            small = replace(args, chunk_rows=max(1, n * 3 // 5))      # two chunks

            def on(path):
                return lambda *t: FastLinearLoss.apply(*t[:3], idx, small, loss, path, *t[3:])
            return self_check.compare_paths(on("triton"), on("torch"), leaves, h.dtype, ("loss", "lse", "gathered"))
        # the gradients are formed in the forward: guarding the forward covers every kernel
        return guarded("linear_fast_loss", impl, h.device, h.dtype, run("triton"), run("torch"), (h, w, b, u, lb),
                       differentiable=False, check=check)
    return run(impl)(h, w, b, u, lb)


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
    from .teacher_topk.torch import chunked_topk

    def run_torch(h, w, b):
        return chunked_topk(h, w, b, k, inv_temp, softcap)

    with torch.no_grad():
        if impl == "triton":
            _check_triton(h.device)

            def run_triton(h, w, b):
                from .teacher_topk.triton import teacher_topk_forward
                return teacher_topk_forward(h, w, b, k, inv_temp, softcap)

            def check():
                from .teacher_topk.triton import teacher_topk_forward
                hs, ws, bs, _, _ = self_check.head_problem(h.shape[1], w.shape[0], h.dtype, h.device,
                                                           bias=b is not None)
                kk = min(k, ws.shape[0])
                return self_check.compare_paths(   # values and lse (near-ties may order ids differently)
                    lambda *t: teacher_topk_forward(*t, kk, inv_temp, softcap)[1:],
                    lambda *t: chunked_topk(*t, kk, inv_temp, softcap)[1:],
                    [t.detach() if t is not None else None for t in (hs, ws, bs)], h.dtype, ("logprobs", "lse"))
            return guarded("teacher_topk", impl, h.device, h.dtype, run_triton, run_torch, (h, w, b),
                           differentiable=False, check=check)
        return run_torch(h, w, b)


def two_head_divergence_apply(student: tuple, teacher: tuple, inv_temp: float, kind: str, beta: float, *,
                              row_weight: torch.Tensor | None = None, impl: str = "torch"):
    """Dense per-row divergence between two heads' softmaxes (see ops/two_head/torch.py).

    Args:
        student, teacher: ``(h [N, D], w [V, D], b [V] | None, softcap | None)``; the
            teacher's hidden size may differ; gradients flow to the student's tensors only.
        inv_temp: 1 / temperature; kind: "forward_kl" | "reverse_kl" | "jsd"; beta: JSD weight.
        row_weight: None for the lean strategy; [N] row weights for the fast one.
        impl: "triton" (the lean strategy's kernel, ops/two_head/triton.py; fast stays
            chunked PyTorch) or "torch".
    Returns:
        lean: ``div`` [N] (differentiable); fast: ``(loss, div)``, ``loss = sum(row_weight * div)``
        (0-dim, differentiable, no double backward) and ``div`` [N] detached.
    """
    from .two_head.torch import TwoHeadDivergenceLean, two_head_divergence_fast
    if row_weight is not None:
        return two_head_divergence_fast(student, teacher, row_weight, inv_temp, kind, beta)
    args = TwoHeadArgs(student[3], teacher[3], inv_temp, kind, beta)

    def run_torch(*heads):
        return TwoHeadDivergenceLean.apply(*heads, args)

    if impl == "triton":
        _check_triton(student[0].device)

        def run_triton(*heads):
            from .two_head.triton import TwoHeadDivergenceTriton
            return TwoHeadDivergenceTriton.apply(*heads, args)

        def check():
            from .two_head.triton import TwoHeadDivergenceTriton
            (h, w, b), (ht, wt, bt) = student[:3], teacher[:3]
            hs, ws, bs, _, _ = self_check.head_problem(h.shape[1], w.shape[0], h.dtype, h.device, bias=b is not None)
            tt = self_check.head_problem(ht.shape[1], wt.shape[0], ht.dtype, ht.device, bias=bt is not None, seed=3)
            teach = [None if t is None else t.detach() for t in tt[:3]]
            return self_check.compare_paths(lambda *t: TwoHeadDivergenceTriton.apply(*t, args),
                                            lambda *t: TwoHeadDivergenceLean.apply(*t, args),
                                            [hs, ws, bs, *teach], h.dtype, ("divergence",))
        return guarded("two_head", impl, student[0].device, student[0].dtype, run_triton, run_torch,
                       (*student[:3], *teacher[:3]), check=check)
    return run_torch(*student[:3], *teacher[:3])
