"""Launch configuration of the fused linear path (ops/linear_lse_gather.py): the one
function that chooses every block size, warp count, stage count and the backward
product backend, per compute capability and dtype. The launchers and the compile
gate (ops/compile_check.py) both call it."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from .linear_lse_gather_products import check_backward_gemm, default_backward_gemm


@dataclass(frozen=True)
class TileConfig:
    """A logits-tile kernel (forward ``_lse_tile_kernel``, backward ``_dz_tile_kernel``)."""
    BLOCK_N: int
    BLOCK_V: int
    BLOCK_D: int
    GROUP: int
    num_warps: int
    num_stages: int
    #: ptxas's register cap per thread (None: its own choice)
    maxnreg: int | None = None

    def launch_options(self) -> dict:
        """The launch keywords of warps, stages and the register cap."""
        out = dict(num_warps=self.num_warps, num_stages=self.num_stages)
        if self.maxnreg is not None:
            out["maxnreg"] = self.maxnreg
        return out


@dataclass(frozen=True)
class GemmConfig:
    """The backward products ``_dw_gemm_kernel`` / ``_dh_gemm_kernel``."""
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class RowConfig:
    """A one-program-per-row kernel (``_indexed_dot_kernel``, ``_sparse_fix_kernel``)."""
    BLOCK_M: int
    BLOCK_D: int
    num_warps: int


@dataclass(frozen=True)
class FusedConfig:
    """Every launch parameter of the fused path."""
    fwd: TileConfig
    dz: TileConfig
    gemm: GemmConfig
    gather: RowConfig
    fix: RowConfig
    #: backend of the two backward products: "triton" (ops/_gemm.py) or "torch"
    #: (torch.mm / addmm, cuBLAS on a GPU); see ops/linear_lse_gather_products.py
    backward_gemm: str = "triton"


def fused_config(capability: tuple[int, int] | None, dtype: torch.dtype, M: int,
                 backward_gemm: str | None = None) -> FusedConfig:
    """Block sizes, warps and stages of every kernel: the one place they are chosen.

    Args:
        capability: the GPU's compute capability, e.g. (8, 0) or (9, 0); None for the
            Triton interpreter on the CPU (tests): small tiles, few programs.
        dtype: the input dtype; M: gathered columns per row.
        backward_gemm: backend of the two backward products, "triton" or "torch"
            (None: the ``DFT_KERNELS_BACKWARD_GEMM`` environment variable, else "triton").
    Returns:
        the :class:`FusedConfig`.
    """
    products = check_backward_gemm(backward_gemm or default_backward_gemm())
    bm = lambda cap: min(triton.next_power_of_2(max(M, 1)), cap)  # noqa: E731
    if capability is None:
        tile = TileConfig(BLOCK_N=16, BLOCK_V=128, BLOCK_D=64, GROUP=2, num_warps=4, num_stages=1)
        return FusedConfig(
            fwd=tile, dz=tile,
            gemm=GemmConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP=2, num_warps=4, num_stages=1),
            gather=RowConfig(BLOCK_M=bm(16), BLOCK_D=64, num_warps=4),
            fix=RowConfig(BLOCK_M=bm(64), BLOCK_D=0, num_warps=1),
            backward_gemm=products,
        )
    # 128 x 128 fp32 tiles over 8 warps = 64 registers per tile-sized value: room for the
    # accumulator plus the two or three tiles the forward epilogue keeps live. 128 x 256
    # tiles or BLOCK_D = 64 spill (the operand offsets of a [128, 64] tile cost ~64
    # registers); 128 x 128 x 32 does not, and 4 stages keep the loads ahead (64 KiB of
    # shared memory for 16-bit operands on sm_90a). fp32 operands halve BLOCK_D.
    # The backward epilogue (up to three exponent terms, the slot walk, softcap, db)
    # spilled at 128 x 128 on sm_80 (16-bit, fp32) and sm_90a (fp32) and used all 255
    # registers elsewhere; its tile is split in half along the rows (64 x 128: 32
    # registers per tile value), which leaves it at <= 190 registers without spills
    # on both architectures (`python -m dft_kernels.ops.compile_check --all`). Left to
    # itself, ptxas aims some of its variants at 128 registers (two programs per SM) and
    # spills 16-32 bytes on sm_80; there the explicit cap of 255 (the limit at 8 warps)
    # makes it allocate freely, and those variants fit in 123 without a spill. On
    # sm_90a the same cap makes three fp32 variants spill (64 bytes), so it is sm_80's only.
    bd = 16 if dtype == torch.float32 else 32
    tile = TileConfig(BLOCK_N=128, BLOCK_V=128, BLOCK_D=bd, GROUP=8, num_warps=8, num_stages=4)
    return FusedConfig(
        fwd=tile, dz=TileConfig(BLOCK_N=64, BLOCK_V=128, BLOCK_D=bd, GROUP=8, num_warps=8, num_stages=4,
                                maxnreg=255 if capability < (9, 0) else None),
        gemm=GemmConfig(BLOCK_M=128, BLOCK_N=128, BLOCK_K=bd, GROUP=8, num_warps=8, num_stages=4),
        gather=RowConfig(BLOCK_M=bm(16), BLOCK_D=256, num_warps=4),
        fix=RowConfig(BLOCK_M=bm(256), BLOCK_D=0, num_warps=4),
        backward_gemm=products,
    )
