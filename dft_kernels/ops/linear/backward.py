"""The backward's slab loop (``slab_backward``: row chunks x vocab slabs of dz, their
buffers and sizes) and its two products on each dz slab, by either backend of
``FusedConfig.backward_gemm`` (docs/fused_path.md, docs/design.md sec. 13):

* ``"triton"``: ``_dw_gemm_kernel`` / ``_dh_gemm_kernel`` (ops/linear/gemm.py), which skip
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

from .._common import block_rows
from .gemm import _dh_gemm_kernel, _dw_gemm_kernel

# Byte budgets of the dz slab buffer ([Nc, Vs] in the input dtype) and of the fp32 dH
# accumulator ([Nc, D]) before rows are chunked: the memory model's (memory.py)
from ...memory import ACC_BYTES, SLAB_BYTES, backward_chunking
#: Slab widths and chunk heights are rounded to multiples of this (efficiency only).
ALIGN = 256
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


def _chunking(N: int, V: int, D: int, elt: int, sep_h: bool, sep_w: bool) -> tuple[int, int]:
    """Rows per backward chunk and columns per slab: ``memory.backward_chunking`` with this
    module's budgets (which tests shrink)."""
    return backward_chunking(N, V, D, elt, sep_h, sep_w, slab_bytes=SLAB_BYTES, acc_bytes=ACC_BYTES, align=ALIGN)


def slab_backward(h: torch.Tensor, w: torch.Tensor, need_h: bool, need_w: bool, need_b: bool, accum_fp32: bool,
                  active: torch.Tensor, dz_tile, gemm, products: str, ieee: bool, interp_bf16: bool, fill_slab,
                  order: torch.Tensor | None = None, dw_from: int = 0):
    """The backward's slab loop (docs/fused_path.md), shared by every loss whose gradient
    w.r.t. the logits ``h @ w.T + b`` is recomputed tile by tile.

    Per (row chunk, vocab slab), ``fill_slab(dz, dbp, r0, n_rows, v0, n_cols, h_rows)`` writes
    the slab's dz (rows ``r0:r0 + n_rows`` x columns ``v0:v0 + n_cols`` at slab coordinates;
    ``h_rows`` [n_rows, D]: those rows of h) and, with ``need_b``, per ``dz_tile.BLOCK_N``
    row block the column sums into ``dbp``;
    then ``dW[slab] += dz.T @ h`` and ``dH += dz @ W[slab]`` (``products``: "triton" or
    "torch"), fp32 accumulation for 16-bit inputs with ``accum_fp32``, no atomics;
    ``ieee`` / ``interp_bf16``: the products' dot flags (ops/_triton_common.py).
    ``active``: int32 [N] rows with upstream gradient (their token blocks; the others skip
    their matmul work). ``order``: int64 [N] or None: row i of the problem (of ``active``
    and of what ``fill_slab`` reads) is row ``order[i]`` of ``h``; each chunk's rows of h
    are gathered in that order and its dH rows written back to ``order`` (no [N, D] copy).
    ``dw_from``: with ``need_w``, dW only for the columns ``dw_from:`` of ``w`` (a frozen
    weight beside a trained low-rank segment, docs/design.md sec. 17).
    Returns ``dh`` (in ``h``'s row order), ``dw`` (input dtypes) and ``db`` fp32 [V], None
    where not needed."""
    N, D = h.shape
    V = w.shape[0]
    dev = h.device
    dh = torch.empty((N, D), dtype=h.dtype, device=dev) if need_h else None
    dw = torch.empty((V, D - dw_from), dtype=w.dtype, device=dev) if need_w else None
    db32 = torch.zeros(V, dtype=torch.float32, device=dev) if need_b else None
    if N == 0:
        if need_w:
            dw.zero_()
        return dh, dw, db32
    low = h.dtype != torch.float32
    sep_h = need_h and accum_fp32 and low
    n_chunk, n_slab = _chunking(N, V, D, h.element_size(), sep_h, need_w and accum_fp32 and low)
    n_chunks = triton.cdiv(N, n_chunk)
    dw_acc = None
    if need_w:
        dw_acc = torch.empty((V, D - dw_from), dtype=torch.float32, device=dev) if (accum_fp32 and low and n_chunks > 1) \
            else dw
    # dH of a chunk before it reaches dh: fp32 for 16-bit inputs, or in the input dtype when
    # it goes back through ``order``
    dh_acc = None
    if sep_h or (need_h and order is not None):
        dh_acc = torch.empty((n_chunk, D), dtype=torch.float32 if sep_h else h.dtype, device=dev)
    # unused buffers are passed as a placeholder pointer (their stores are compiled out)
    dz = torch.empty((n_chunk, n_slab), dtype=h.dtype, device=dev) if (need_h or need_w) else active
    dbp = torch.empty((triton.cdiv(n_chunk, dz_tile.BLOCK_N), n_slab), dtype=torch.float32, device=dev) \
        if need_b else active
    bk = gemm.BLOCK_K

    for c, r0 in enumerate(range(0, N, n_chunk)):
        n_rows = min(n_chunk, N - r0)
        count = None
        if need_w and products == "triton":
            # token blocks of this chunk up to the last active one, counted on device
            nb = triton.cdiv(n_rows, bk)
            pad = torch.zeros(nb * bk, dtype=torch.int32, device=dev)
            pad[:n_rows] = active[r0:r0 + n_rows]
            blk_on = pad.view(nb, bk).amax(1)
            count = (blk_on * torch.arange(1, nb + 1, dtype=torch.int32, device=dev)).amax().reshape(1)
        h_rows = block_rows(h, order, r0, n_rows)
        out_h = (dh[r0:] if dh_acc is None else dh_acc) if need_h else None
        for s, v0 in enumerate(range(0, V, n_slab)):
            n_cols = min(n_slab, V - v0)
            fill_slab(dz, dbp, r0, n_rows, v0, n_cols, h_rows)
            if need_b:
                db32[v0:v0 + n_cols] += dbp[:triton.cdiv(n_rows, dz_tile.BLOCK_N), :n_cols].sum(0)
            if need_w:
                dw_product(products, gemm, dz, h_rows[:, dw_from:], dw_acc[v0:], count, n_rows, n_cols, c > 0, ieee,
                           interp_bf16)
            if need_h:
                dh_product(products, gemm, dz, w[v0:], out_h, active, r0, n_rows, n_cols, s > 0, ieee, interp_bf16)
        del h_rows
        if need_h and dh_acc is not None:
            if order is None:
                dh[r0:r0 + n_rows].copy_(dh_acc[:n_rows])
            else:
                dh.index_copy_(0, order[r0:r0 + n_rows], dh_acc[:n_rows].to(dh.dtype))
    if need_w and dw_acc is not dw:
        dw.copy_(dw_acc)
    return dh, dw, db32
