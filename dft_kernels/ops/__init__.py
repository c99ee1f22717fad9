"""Kernel entry points. Kernels know nothing of losses: they compute the primitive
of DESIGN.md sec. 6 -- per-row fp32 log-sum-exp at one or two scales and the
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
                     softcap: float | None, impl: str, chunk_elems: int | None = None, n_slots: int = 0):
    """``x`` [..., V] logits, ``index`` [N, M] ids (N = prod of leading dims).

    Returns ``lse`` [N, len(scales) (+1)] fp32 and ``gathered`` [N, M] fp32 (the
    softcapped logits at ``index``, 0 where an id is -1 or out of range). With
    ``n_slots > 0`` the extra last lse column is the log-sum-exp at ``scales[-1]``
    over the vocab outside the first ``n_slots`` ids of each row (``-inf`` if empty)."""
    if impl == "triton":
        _check_triton(x.device)
        from .lse_gather import LSEGatherTriton
        return LSEGatherTriton.apply(x, index, tuple(scales), softcap, n_slots)
    from .torch_chunked import LSEGatherTorch
    return LSEGatherTorch.apply(x, index, tuple(scales), softcap, chunk_elems, n_slots)


def linear_lse_gather_apply(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, index: torch.Tensor,
                      scales: tuple[float, ...], softcap: float | None, impl: str, *,
                      chunk_elems: int | None = None, deterministic: bool = False,
                      accum_fp32: bool = True, n_slots: int = 0):
    """Same primitive for logits ``h @ w.T + b`` that are never materialised.

    ``h`` [N, D], ``w`` [V, D], ``b`` [V] or None, ``index`` [N, M]. An op that
    cannot compute the rest column returns ``lse`` without it (callers check
    ``lse.shape[1]``)."""
    if impl == "triton":
        _check_triton(h.device)
        from .linear_lse_gather import LinearLSEGatherTriton
        if getattr(LinearLSEGatherTriton, "SUPPORTS_REST", False):
            return LinearLSEGatherTriton.apply(h, w, b, index, tuple(scales), softcap, deterministic,
                                               accum_fp32, n_slots)
        return LinearLSEGatherTriton.apply(h, w, b, index, tuple(scales), softcap, deterministic, accum_fp32)
    from .torch_chunked import LinearLSEGatherTorch
    return LinearLSEGatherTorch.apply(h, w, b, index, tuple(scales), softcap, chunk_elems, accum_fp32, n_slots)
