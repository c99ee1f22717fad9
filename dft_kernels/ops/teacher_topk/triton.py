"""Teacher top-k from hidden states in Triton (docs/design.md sec. 11): per row, the k
largest logits of ``h @ w.T (+ b)`` (after logit scale, softcap and temperature) and the
log-sum-exp over the full vocab, in one pass over vocab tiles; no [N, V] tensor.

``_teacher_topk_kernel`` keeps, per block of rows, an unsorted buffer of the k best
(value, id) pairs in registers. For each logits tile it counts the entries above the
buffer's minimum and runs that many (at most k) replace-the-minimum steps: the tile's
largest remaining entry (lowest id among equals) replaces the buffer's smallest one
(highest id among equals) when strictly larger. Tiles arrive in ascending id order, so
ties keep the lower id, like ``torch.topk`` on the CPU. The launcher sorts the k slots
(value descending, id ascending) and subtracts the lse. No gradients: targets are data.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._common import tile_operand
from ..linear.config import register_cap, with_release_overrides
from .._triton_common import _bias_softcap, exact_fp32_dots, is_interp_bf16, logits_tile, target_capability
from .torch import MAX_TRITON_K, sort_slots  # noqa: F401 (MAX_TRITON_K: the kernel's limit)


@triton.jit
def _teacher_topk_kernel(H, stride_hn, W, stride_wv, B, IDX, stride_in, VAL, stride_vn, LSE, N, V, D,
                         inv_temp, softcap, K,
                         KP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                         IEEE: tl.constexpr, INTERP_BF16: tl.constexpr, EVEN_D: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    row_start = tl.program_id(0).to(tl.int64) * BLOCK_N
    rows = tl.arange(0, BLOCK_N)
    rmask = rows < N - row_start
    slot = tl.arange(0, KP)
    # slots >= K hold +inf: never the minimum, never replaced, never stored
    buf_v = tl.where(slot[None, :] < K, float("-inf"), float("inf")) + tl.zeros((BLOCK_N, KP), tl.float32)
    buf_i = tl.full((BLOCK_N, KP), -1, tl.int32)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    cols = tl.arange(0, BLOCK_V)
    # the vocab tile's first row of W as a 64-bit pointer advanced tile by tile (never a
    # 32-bit col_start * stride, which wraps once V * D passes 2**31)
    w_tile = W
    for col_start in range(0, V, BLOCK_V):
        cmask = cols < V - col_start
        z = logits_tile(H, stride_hn, 1, w_tile, stride_wv, 1, row_start, rmask, 0, cmask, D,
                         IEEE, INTERP_BF16, EVEN_D, BLOCK_N, BLOCK_V, BLOCK_D)
        w_tile += BLOCK_V * stride_wv
        z = _bias_softcap(z, B + col_start, cols, cmask, softcap, HAS_BIAS, HAS_SOFTCAP)
        z = tl.where(cmask[None, :], z * inv_temp, float("-inf"))
        # running log-sum-exp per row
        new_m = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - new_m) + tl.sum(tl.exp(z - new_m[:, None]), axis=1)
        m = new_m
        # running top-k: at most min(K, entries above the buffer's minimum) replacements
        ids = (col_start + cols).to(tl.int32)
        above = tl.sum((z > tl.min(buf_v, axis=1)[:, None]).to(tl.int32), axis=1)
        n_iter = tl.minimum(tl.max(tl.where(rmask, above, 0), axis=0), K)
        for _ in range(0, n_iter):
            cand = tl.max(z, axis=1)
            cand_id = tl.min(tl.where(z == cand[:, None], ids[None, :], 2147483647), axis=1)
            low = tl.min(buf_v, axis=1)
            at_low = buf_v == low[:, None]
            out_id = tl.max(tl.where(at_low, buf_i, -2), axis=1)
            out_pos = tl.min(tl.where(at_low & (buf_i == out_id[:, None]), slot[None, :], KP), axis=1)
            hit = (slot[None, :] == out_pos[:, None]) & (cand > low)[:, None]
            buf_v = tl.where(hit, cand[:, None], buf_v)
            buf_i = tl.where(hit, cand_id[:, None], buf_i)
            z = tl.where(ids[None, :] == cand_id[:, None], float("-inf"), z)
    lse = m + tl.log(s)
    offs = row_start + rows
    smask = rmask[:, None] & (slot[None, :] < K)
    tl.store(IDX + offs[:, None] * stride_in + slot[None, :], buf_i, mask=smask)
    tl.store(VAL + offs[:, None] * stride_vn + slot[None, :], buf_v - lse[:, None], mask=smask)
    tl.store(LSE + offs, lse, mask=rmask)


# --------------------------------------------------------------------------- launcher


@dataclass(frozen=True)
class TopkConfig:
    """Block sizes and warps of :func:`_teacher_topk_kernel`."""
    BLOCK_N: int
    BLOCK_V: int
    BLOCK_D: int
    num_warps: int
    num_stages: int
    #: ptxas's register cap per thread (None: its own choice)
    maxnreg: int | None = None


def topk_config(capability: tuple[int, int] | None, dtype: torch.dtype, k: int) -> TopkConfig:
    """The one place the kernel's launch configuration is chosen.

    Args:
        capability: the GPU's compute capability, or None for the Triton interpreter.
        dtype: the input dtype; k: slots kept per row (the register buffer is [BLOCK_N, k]).
    Returns:
        :class:`TopkConfig`.

    The [64, k] buffer (k <= MAX_TRITON_K = 64) sits next to the logits tile: 16-bit
    operands take 64 x 128 x 32 tiles, fp32 ones 64 x 64 x 16 (a 128-wide fp32 tile spills);
    64 rows keep wgmma on sm_90a. Register cap: 255 for fp32 operands everywhere, for 16-bit
    ones ``linear.config.register_cap`` below sm_90 and none from sm_90 on (left to itself
    ptxas aims some variants at 128 registers and spills). Checked for every architecture
    and dtype by ``python -m dft_kernels.tools.compile_check``.
    """
    del k   # one config up to MAX_TRITON_K
    if capability is None:
        return TopkConfig(BLOCK_N=16, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=1)
    # fp32 operands take the cap of 255 on every architecture (left to itself ptxas aims the
    # softcap variant at 128 registers and spills 88 bytes, Hopper included); 16-bit ones only
    # below sm_90 (with it, sm_100a's tcgen05 variants with bias and softcap spill 8 bytes)
    if dtype == torch.float32:
        maxnreg = 255
    else:
        maxnreg = register_cap(capability) if capability < (9, 0) else None
    if dtype == torch.float32:
        cfg = TopkConfig(BLOCK_N=64, BLOCK_V=64, BLOCK_D=16, num_warps=8, num_stages=4, maxnreg=maxnreg)
    else:
        cfg = TopkConfig(BLOCK_N=64, BLOCK_V=128, BLOCK_D=32, num_warps=8, num_stages=4, maxnreg=maxnreg)
    # per-Triton-release cells: linear.config.RELEASE_CONFIG (none for this kernel so far; the
    # 16-bit sm_100a cell Triton 3.6 cannot compile is linear.config.TRITON_UNSUPPORTED's)
    return with_release_overrides(cfg, capability, dtype, "_teacher_topk_kernel")


def teacher_topk_forward(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, k: int, inv_temp: float,
                         softcap: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the kernel.

    Args:
        h: [N, D] hidden states; w: [V, D]; b: [V] or None (same dtype as ``w``).
        k: slots per row, 1 <= k <= min(V, MAX_TRITON_K).
        inv_temp: 1 / temperature; softcap: ``c`` of ``c * tanh(z / c)`` or None (a logit
        scale is folded into ``h`` and ``b`` by the caller).
    Returns:
        ``index`` [N, k] int32 and ``logprobs`` [N, k] fp32 sorted by value (descending,
        ties by ascending id), and ``lse`` [N] fp32 at the temperature.
    """
    h = tile_operand(h)
    w = tile_operand(w)
    N, D = h.shape
    V = w.shape[0]
    cfg = topk_config(target_capability(h.device), h.dtype, k)
    index = torch.empty((N, k), dtype=torch.int32, device=h.device)
    logprobs = torch.empty((N, k), dtype=torch.float32, device=h.device)
    lse = torch.empty((N,), dtype=torch.float32, device=h.device)
    if N:
        grid = (triton.cdiv(N, cfg.BLOCK_N),)
        _teacher_topk_kernel[grid](
            h, h.stride(0), w, w.stride(0), b if b is not None else w, index, index.stride(0), logprobs,
            logprobs.stride(0), lse, N, V, D, float(inv_temp), float(softcap or 1.0), k,
            KP=triton.next_power_of_2(k), HAS_BIAS=b is not None, HAS_SOFTCAP=softcap is not None,
            IEEE=exact_fp32_dots(h), INTERP_BF16=is_interp_bf16(h), EVEN_D=D % cfg.BLOCK_D == 0,
            BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_D=cfg.BLOCK_D,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            **({} if cfg.maxnreg is None else dict(maxnreg=cfg.maxnreg)))
    if h.device.type == "meta":
        return index, logprobs, lse
    index, logprobs = sort_slots(index, logprobs)
    return index, logprobs, lse

