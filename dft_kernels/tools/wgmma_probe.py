"""A kernel that makes ptxas serialise its wgmma instructions on sm_90a, to prove that the
compile gate's "wgmma serialized" rule (``compile_rules.serialized_wgmma``) sees ptxas's
log under the Triton release at hand (docs/design.md sec. 16).

Each release hands ptxas's log over differently (3.6 / 3.9 print it when
``knobs.nvidia.dump_ptxas_log`` is set; 3.2's compile is read back by running the bundled
ptxas on the PTX, ``compile_rules.ptxas_usage``), so a clean sm_90a gate only means "no
serialisation" if the rule fires on a kernel that does serialise. This one: a 128 x 128
fp32 accumulator over 4 warps (128 registers per thread for the accumulator alone) with
ptxas's register cap at 128 -- "(C7511) ... wgmma.mma_async instructions are serialized due
to insufficient register resources" under ptxas 12.4 (Triton 3.2), 12.8 (3.6) and 13.x
(3.9). ``python -m dft_kernels.tools.compile_check --wgmma-probe`` compiles it.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _serialising_mm_kernel(A, B, C, K, stride_am, stride_bk, stride_cm,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(A + rm[:, None].to(tl.int64) * stride_am + (k + rk)[None, :])
        b = tl.load(B + (k + rk)[:, None].to(tl.int64) * stride_bk + rn[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(C + rm[:, None].to(tl.int64) * stride_cm + rn[None, :], acc)


def launch_probe() -> None:
    """Launch the kernel on ``meta`` tensors (inside ``compile_check.recorded_launches``)."""
    import torch
    a = torch.empty((4096, 4096), dtype=torch.bfloat16, device="meta")
    c = torch.empty((4096, 4096), dtype=torch.float32, device="meta")
    _serialising_mm_kernel[(1, 1)](a, a, c, 4096, 4096, 4096, 4096, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64,
                                   num_warps=4, num_stages=3, maxnreg=128)
