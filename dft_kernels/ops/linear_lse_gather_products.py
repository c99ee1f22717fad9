"""The two backward products of the fused path on one dz slab, by either backend of
``FusedConfig.backward_gemm`` (docs/fused_path.md, docs/design.md sec. 13):

* ``"triton"``: ``_dw_gemm_kernel`` / ``_dh_gemm_kernel`` (ops/_gemm.py), which skip
  the token blocks after the last row with upstream gradient and the row tiles
  without any;
* ``"torch"``: ``torch.mm`` / ``torch.addmm`` (cuBLAS on a GPU). bf16 / fp16 products
  that accumulate into an fp32 buffer use ``out_dtype=torch.float32`` on CUDA (fp32
  accumulation, one fp32 result); the CPU has no such kernel, so there the operands
  are upcast (tests only).

Both give the same sums up to the order of fp32 additions.
"""
from __future__ import annotations

import os

import torch
import triton

from ._gemm import _dh_gemm_kernel, _dw_gemm_kernel

#: the values of ``FusedConfig.backward_gemm``
BACKWARD_GEMMS = ("triton", "torch")
#: the environment variable that sets the default backend (benchmarks choose with it)
BACKWARD_GEMM_ENV = "DFT_KERNELS_BACKWARD_GEMM"


def default_backward_gemm() -> str:
    """``$DFT_KERNELS_BACKWARD_GEMM`` (checked), else "triton" (docs/design.md sec. 13)."""
    value = os.environ.get(BACKWARD_GEMM_ENV, "").strip() or "triton"
    if value not in BACKWARD_GEMMS:
        raise ValueError(f"{BACKWARD_GEMM_ENV}={value!r}: set it to one of {', '.join(BACKWARD_GEMMS)} "
                         "or leave it unset")
    return value


def check_backward_gemm(backward_gemm: str) -> str:
    """``backward_gemm`` itself, or a ValueError naming the choices."""
    if backward_gemm not in BACKWARD_GEMMS:
        raise ValueError(f"backward_gemm must be one of {', '.join(map(repr, BACKWARD_GEMMS))}, "
                         f"got {backward_gemm!r}")
    return backward_gemm


def _torch_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """``out (+)= a @ b`` with torch; ``out`` may be fp32 while ``a`` / ``b`` are 16-bit."""
    if out.dtype != a.dtype:
        if out.is_cuda:
            if accumulate:
                torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
            else:
                torch.mm(a, b, out_dtype=out.dtype, out=out)
            return
        a, b = a.to(out.dtype), b.to(out.dtype)
    if accumulate:
        out.addmm_(a, b)
    else:
        torch.mm(a, b, out=out)


def dw_product(backend: str, gemm, dz: torch.Tensor, h_chunk: torch.Tensor, out_w: torch.Tensor,
               count: torch.Tensor, n_rows: int, n_cols: int, accumulate: bool, ieee: bool,
               interp_bf16: bool) -> None:
    """``out_w[:n_cols] (+)= dz[:n_rows, :n_cols].T @ h_chunk[:n_rows]``.

    Args:
        backend: "triton" or "torch"; gemm: the config's ``GemmConfig`` (Triton only).
        dz: [Nc, Vs] slab; h_chunk: [>= n_rows, D] (the chunk's rows first);
        out_w: [>= n_cols, D] (the slab's rows of dW or its fp32 accumulator).
        count: [1] int32 on the device, the BLOCK_K token blocks up to the last active
            row (Triton only).
        accumulate: add to ``out_w`` (False: overwrite).
    """
    D = h_chunk.shape[1]
    if backend == "torch":
        _torch_product(out_w[:n_cols], dz[:n_rows, :n_cols].t(), h_chunk[:n_rows], accumulate)
        return
    grid = (triton.cdiv(n_cols, gemm.BLOCK_M) * triton.cdiv(D, gemm.BLOCK_N),)
    _dw_gemm_kernel[grid](
        dz, dz.stride(0), h_chunk, h_chunk.stride(0), h_chunk.stride(1), out_w, out_w.stride(0), out_w.stride(1),
        count, n_rows, n_cols, D,
        ACCUMULATE=accumulate, IEEE=ieee, INTERP_BF16=interp_bf16,
        BLOCK_M=gemm.BLOCK_M, BLOCK_N=gemm.BLOCK_N, BLOCK_K=gemm.BLOCK_K, GROUP=gemm.GROUP,
        num_warps=gemm.num_warps, num_stages=gemm.num_stages,
    )


def dh_product(backend: str, gemm, dz: torch.Tensor, w_slab: torch.Tensor, out_h: torch.Tensor,
               active: torch.Tensor, row0: int, n_rows: int, n_cols: int, accumulate: bool, ieee: bool,
               interp_bf16: bool) -> None:
    """``out_h[:n_rows] (+)= dz[:n_rows, :n_cols] @ w_slab[:n_cols]``.

    Args:
        backend, gemm, dz, accumulate: as in :func:`dw_product`.
        w_slab: [>= n_cols, D] (the slab's rows of w); out_h: [>= n_rows, D].
        active: [N] int32, 1 for rows with upstream gradient; row0: the chunk's first
            row in it (Triton only).
    """
    D = w_slab.shape[1]
    if backend == "torch":
        _torch_product(out_h[:n_rows], dz[:n_rows, :n_cols], w_slab[:n_cols], accumulate)
        return
    grid = (triton.cdiv(n_rows, gemm.BLOCK_M) * triton.cdiv(D, gemm.BLOCK_N),)
    _dh_gemm_kernel[grid](
        dz, dz.stride(0), w_slab, w_slab.stride(0), w_slab.stride(1),
        out_h, out_h.stride(0), out_h.stride(1), active,
        row0, n_rows, n_cols, D,
        ACCUMULATE=accumulate, IEEE=ieee, INTERP_BF16=interp_bf16,
        BLOCK_M=gemm.BLOCK_M, BLOCK_N=gemm.BLOCK_N, BLOCK_K=gemm.BLOCK_K, GROUP=gemm.GROUP,
        num_warps=gemm.num_warps, num_stages=gemm.num_stages,
    )
