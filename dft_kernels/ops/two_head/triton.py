"""The dense two-head divergence of the lean strategy in Triton (docs/design.md sec. 11):
the same math as ``TwoHeadDivergenceLean`` (ops/two_head/torch.py), neither head's
logits ever stored.

Forward: ``_two_head_stats_kernel`` computes, per (row tile, vocab tile), the student
tile and the teacher tile (two ``logits_tile`` calls over their own hidden sizes), and
writes the tile's row max and sum of exp for both heads and the unnormalised "gap" sum
(``sum e_t (t - s)`` for forward KL, ``sum e_s (s - t)`` for reverse KL) to an
[N, n_tiles, 5] fp32 buffer that torch combines (no host sync) into both lse and the
divergence. JSD needs both lse first: ``_two_head_jsd_kernel`` makes a second pass and
writes per-tile (div, KL(q||m)) partials. Backward, per (row chunk, vocab slab):
``_two_head_dz_kernel`` recomputes both tiles and writes ``g_div * d div / d z_student``
(temperature and softcap chain factors included) into a reused slab and per-block
column sums for db, then the fused path's products ``dW[slab] += dz.T @ h`` and
``dH += dz @ W[slab]``. fp32 accumulation, no atomics. The teacher gets no gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._common import TwoHeadArgs, partial_rows, tile_operand
from ..linear.config import GemmConfig, TileConfig, register_cap, with_release_overrides
from ..linear.backward import check_backward_gemm, default_backward_gemm, slab_backward
from .._triton_common import (_bias_softcap, _cast, exact_fp32_dots, is_interp_bf16, logits_tile, _slab_tile,
                              _softcap_grad, target_capability, _tile_coords)

#: ``kind`` -> the kernels' KIND constexpr.
KINDS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
#: fp32 values per (row, vocab tile) of the forward buffer: m_s, sum_s, m_t, sum_t, gap.
N_STATS = 5
_N_STATS = tl.constexpr(N_STATS)        # the same, for the kernel


# --------------------------------------------------------------------------- kernels


@triton.jit
def _head_tile(H, stride_hn, stride_hd, W, stride_wv, stride_wd, Bias, row_start, rmask, col_start, cols, cmask,
               D, softcap, inv_temp, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr,
               IEEE: tl.constexpr, INTERP_BF16: tl.constexpr, EVEN_D: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """One head's ``softcap(h @ w.T + b) * inv_temp`` tile, fp32 [BLOCK_N, BLOCK_V]."""
    z = logits_tile(H, stride_hn, stride_hd, W, stride_wv, stride_wd, row_start, rmask, col_start, cmask, D,
                     IEEE, INTERP_BF16, EVEN_D, BLOCK_N, BLOCK_V, BLOCK_D)
    return _bias_softcap(z, Bias, cols, cmask, softcap, HAS_BIAS, HAS_CAP) * inv_temp


@triton.jit
def _two_head_stats_kernel(
    H, stride_hn, stride_hd, W, stride_wv, stride_wd, Bias,
    HT, stride_tn, stride_td, WT, stride_tv, stride_twd, BiasT,
    PART, stride_pn, N, V, D, DT, cap, cap_t, inv_temp,
    HAS_BIAS: tl.constexpr, HAS_BIAS_T: tl.constexpr, HAS_CAP: tl.constexpr, HAS_CAP_T: tl.constexpr,
    GAP_REVERSE: tl.constexpr, IEEE: tl.constexpr, IEEE_T: tl.constexpr,
    INTERP_BF16: tl.constexpr, INTERP_BF16_T: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
):
    pid_v, rows0, cols0, rows, cols, rmask, cmask = _tile_coords(N, V, BLOCK_N, BLOCK_V, GROUP)
    s = _head_tile(H, stride_hn, stride_hd, W, stride_wv, stride_wd, Bias, rows0, rmask, cols0, cols, cmask,
                   D, cap, inv_temp, HAS_BIAS, HAS_CAP, IEEE, INTERP_BF16, EVEN_D, BLOCK_N, BLOCK_V, BLOCK_D)
    t = _head_tile(HT, stride_tn, stride_td, WT, stride_tv, stride_twd, BiasT, rows0, rmask, cols0, cols, cmask,
                   DT, cap_t, inv_temp, HAS_BIAS_T, HAS_CAP_T, IEEE_T, INTERP_BF16_T, EVEN_DT,
                   BLOCK_N, BLOCK_V, BLOCK_D)
    # every tile holds at least one valid column: the row maxima are finite
    d = tl.where(cmask[None, :], t - s, 0.0)
    s = tl.where(cmask[None, :], s, float("-inf"))
    t = tl.where(cmask[None, :], t, float("-inf"))
    m_s = tl.max(s, axis=1)
    e_s = tl.exp(s - m_s[:, None])
    m_t = tl.max(t, axis=1)
    e_t = tl.exp(t - m_t[:, None])
    if GAP_REVERSE:
        gap = -tl.sum(e_s * d, axis=1)
    else:
        gap = tl.sum(e_t * d, axis=1)
    out = PART + rows * stride_pn + pid_v * _N_STATS
    tl.store(out, m_s, mask=rmask)
    tl.store(out + 1, tl.sum(e_s, axis=1), mask=rmask)
    tl.store(out + 2, m_t, mask=rmask)
    tl.store(out + 3, tl.sum(e_t, axis=1), mask=rmask)
    tl.store(out + 4, gap, mask=rmask)


@triton.jit
def _jsd_terms(s, t, ls, lt, log_beta, log_1mbeta):
    """Per entry: log q, log p and log m (m = beta p + (1 - beta) q)."""
    lq = s - ls[:, None]
    lp = t - lt[:, None]
    a = lp + log_beta
    b = lq + log_1mbeta
    mx = tl.maximum(a, b)
    lm = mx + tl.log(tl.exp(a - mx) + tl.exp(b - mx))
    return lq, lp, lm


@triton.jit
def _two_head_jsd_kernel(
    H, stride_hn, stride_hd, W, stride_wv, stride_wd, Bias,
    HT, stride_tn, stride_td, WT, stride_tv, stride_twd, BiasT,
    LSE, stride_ln, PART, stride_pn, N, V, D, DT, cap, cap_t, inv_temp, beta, log_beta, log_1mbeta,
    HAS_BIAS: tl.constexpr, HAS_BIAS_T: tl.constexpr, HAS_CAP: tl.constexpr, HAS_CAP_T: tl.constexpr,
    IEEE: tl.constexpr, IEEE_T: tl.constexpr,
    INTERP_BF16: tl.constexpr, INTERP_BF16_T: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
):
    """Second JSD pass: per tile, the row sums of the divergence and of KL(q||m)."""
    pid_v, rows0, cols0, rows, cols, rmask, cmask = _tile_coords(N, V, BLOCK_N, BLOCK_V, GROUP)
    s = _head_tile(H, stride_hn, stride_hd, W, stride_wv, stride_wd, Bias, rows0, rmask, cols0, cols, cmask,
                   D, cap, inv_temp, HAS_BIAS, HAS_CAP, IEEE, INTERP_BF16, EVEN_D, BLOCK_N, BLOCK_V, BLOCK_D)
    t = _head_tile(HT, stride_tn, stride_td, WT, stride_tv, stride_twd, BiasT, rows0, rmask, cols0, cols, cmask,
                   DT, cap_t, inv_temp, HAS_BIAS_T, HAS_CAP_T, IEEE_T, INTERP_BF16_T, EVEN_DT,
                   BLOCK_N, BLOCK_V, BLOCK_D)
    ls = tl.load(LSE + rows * stride_ln, mask=rmask, other=0.0)
    lt = tl.load(LSE + rows * stride_ln + 1, mask=rmask, other=0.0)
    lq, lp, lm = _jsd_terms(s, t, ls, lt, log_beta, log_1mbeta)
    kl_qm = tl.sum(tl.where(cmask[None, :], tl.exp(lq) * (lq - lm), 0.0), axis=1)
    kl_pm = tl.sum(tl.where(cmask[None, :], tl.exp(lp) * (lp - lm), 0.0), axis=1)
    out = PART + rows * stride_pn + pid_v * 2
    tl.store(out, beta * kl_pm + (1.0 - beta) * kl_qm, mask=rmask)
    tl.store(out + 1, kl_qm, mask=rmask)


@triton.jit
def _two_head_dz_kernel(
    H, stride_hn, stride_hd, W, stride_wv, stride_wd, Bias,
    HT, stride_tn, stride_td, WT, stride_tv, stride_twd, BiasT,
    LSE, stride_ln, AUX, GDIV, ACT, DZ, stride_zn, DBP, stride_bp,
    row0, n_rows, col0, n_cols, D, DT, cap, cap_t, inv_temp, beta, log_beta, log_1mbeta,
    KIND: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BIAS_T: tl.constexpr, HAS_CAP: tl.constexpr,
    HAS_CAP_T: tl.constexpr, STORE_DZ: tl.constexpr, STORE_DB: tl.constexpr, IEEE: tl.constexpr,
    IEEE_T: tl.constexpr, INTERP_BF16: tl.constexpr, INTERP_BF16_T: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
):
    """``g_div * d div / d (h @ w.T + b)`` for rows [row0, row0 + n_rows) x columns
    [col0, col0 + n_cols), stored at slab coordinates (row - row0, col - col0)."""
    pid_n, pid_v, lrows, lcols, rmask, cmask, rows0, cols0, rows, cols = _slab_tile(row0, n_rows, col0, n_cols,
                                                                                   BLOCK_N, BLOCK_V, GROUP)
    # a block of rows without upstream gradient: both D loops run zero times and every
    # g being 0, the tile stores zeros
    active = tl.max(tl.load(ACT + rows, mask=rmask, other=0), axis=0)
    n_d = tl.where(active > 0, D, 0)
    n_dt = tl.where(active > 0, DT, 0)
    s = _head_tile(H, stride_hn, stride_hd, W, stride_wv, stride_wd, Bias, rows0, rmask, cols0, cols, cmask,
                   n_d, cap, inv_temp, HAS_BIAS, HAS_CAP, IEEE, INTERP_BF16, EVEN_D, BLOCK_N, BLOCK_V, BLOCK_D)
    t = _head_tile(HT, stride_tn, stride_td, WT, stride_tv, stride_twd, BiasT, rows0, rmask, cols0, cols, cmask,
                   n_dt, cap_t, inv_temp, HAS_BIAS_T, HAS_CAP_T, IEEE_T, INTERP_BF16_T, EVEN_DT,
                   BLOCK_N, BLOCK_V, BLOCK_D)
    ls = tl.load(LSE + rows * stride_ln, mask=rmask, other=0.0)
    lt = tl.load(LSE + rows * stride_ln + 1, mask=rmask, other=0.0)
    g_row = tl.load(GDIV + rows, mask=rmask, other=0.0) * inv_temp
    if KIND == 0:
        g = tl.exp(s - ls[:, None]) - tl.exp(t - lt[:, None])
    elif KIND == 1:
        aux = tl.load(AUX + rows, mask=rmask, other=0.0)
        lq = s - ls[:, None]
        g = tl.exp(lq) * (lq - (t - lt[:, None]) - aux[:, None])
    else:
        aux = tl.load(AUX + rows, mask=rmask, other=0.0)
        lq, lp, lm = _jsd_terms(s, t, ls, lt, log_beta, log_1mbeta)
        g = (1.0 - beta) * tl.exp(lq) * (lq - lm - aux[:, None])
    g = g * g_row[:, None]
    if HAS_CAP:
        g = _softcap_grad(g, s, cap * inv_temp)     # s = capped logits * inv_temp
    # a skipped row block (no row with upstream gradient) contributes exactly 0: its tiles hold
    # the bias alone, and 0 * exp(bias - lse) can be 0 * inf = NaN; in a live block every row's
    # logits and lse are real, so g is finite and g_row = 0 gives 0
    g = tl.where(rmask[:, None] & cmask[None, :] & (active > 0), g, 0.0)
    if STORE_DB:
        tl.store(DBP + pid_n * stride_bp + lcols, tl.sum(g, axis=0), mask=cmask)
    if STORE_DZ:
        dz_ptrs = (DZ + pid_n * BLOCK_N * stride_zn + pid_v * BLOCK_V
                   + tl.arange(0, BLOCK_N)[:, None] * stride_zn + tl.arange(0, BLOCK_V)[None, :])
        tl.store(dz_ptrs, _cast(g, DZ.dtype.element_ty, INTERP_BF16), mask=rmask[:, None] & cmask[None, :])


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TwoHeadConfig:
    """Every launch parameter of the two-head kernels."""
    fwd: TileConfig       # the stats and JSD passes
    dz: TileConfig
    gemm: GemmConfig
    #: backend of the two backward products ("triton" or "torch"), as in ``FusedConfig``
    backward_gemm: str = "triton"


def two_head_config(capability: tuple[int, int] | None, dtype: torch.dtype,
                    backward_gemm: str | None = None) -> TwoHeadConfig:
    """The one place the two-head kernels' launch configuration is chosen.

    Args:
        capability: the GPU's compute capability, or None for the Triton interpreter
            (small tiles, few programs).
        dtype: the input dtype; backward_gemm: as in ``fused_config``.
    Returns:
        :class:`TwoHeadConfig`.

    Two fp32 logits tiles are live at once (student and teacher), so the GPU tiles are
    64 x 128 (32 registers per tile value at 8 warps), 128 x 128 x 32 for the products;
    fp32 operands halve BLOCK_D. On sm_80 the explicit register cap of 255 keeps ptxas
    from aiming at 128 registers and spilling. Checked for every dtype on sm_80 and
    sm_90a by ``python -m dft_kernels.tools.compile_check --op two_head``.
    """
    products = check_backward_gemm(backward_gemm or default_backward_gemm())
    if capability is None:
        tile = TileConfig(BLOCK_N=16, BLOCK_V=64, BLOCK_D=16, GROUP=2, num_warps=4, num_stages=1)
        return TwoHeadConfig(fwd=tile, dz=tile,
                             gemm=GemmConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP=2, num_warps=4, num_stages=1),
                             backward_gemm=products)
    bd = 16 if dtype == torch.float32 else 32
    maxnreg = register_cap(capability)
    tile = TileConfig(BLOCK_N=64, BLOCK_V=128, BLOCK_D=bd, GROUP=8, num_warps=8, num_stages=4, maxnreg=maxnreg)
    # per-Triton-release cells: linear.config.RELEASE_CONFIG (fp32: Triton 3.2 on sm_86 / sm_89, 3.3-3.5 on sm_90a)
    return TwoHeadConfig(fwd=with_release_overrides(tile, capability, dtype, "_two_head_stats_kernel",
                                                    "_two_head_jsd_kernel"),
                         dz=with_release_overrides(tile, capability, dtype, "_two_head_dz_kernel"),
                         gemm=GemmConfig(BLOCK_M=128, BLOCK_N=128, BLOCK_K=bd, GROUP=8, num_warps=8, num_stages=4),
                         backward_gemm=products)


# --------------------------------------------------------------------------- launchers


def _check(h, w, b, name: str) -> None:
    if h.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"impl='triton' supports float32, bfloat16 and float16 inputs, got {h.dtype} for the "
                        f"{name}; use impl='torch' for other dtypes")
    if w.dtype != h.dtype or (b is not None and b.dtype != h.dtype):
        raise TypeError(f"the {name}'s hidden states, weight and bias must share one dtype")


def _head_args(h, w, b, cap, tile: TileConfig):
    """The kernel arguments of one head, its runtime softcap and its constexprs."""
    h, w = tile_operand(h), tile_operand(w)
    args = (h, h.stride(0), h.stride(1), w, w.stride(0), w.stride(1), b if b is not None else w)
    flags = dict(bias=b is not None, cap=cap is not None, ieee=exact_fp32_dots(h), interp=is_interp_bf16(h),
                 even=h.shape[1] % tile.BLOCK_D == 0)
    return args, float(cap) if cap is not None else 1.0, flags


def _rows(args: tuple, r0: int) -> tuple:
    """One head's kernel arguments with its hidden states from row ``r0`` on."""
    return (args[0][r0:],) + args[1:]


def _flag_kwargs(fs: dict, ft: dict, tile: TileConfig) -> dict:
    return dict(HAS_BIAS=fs["bias"], HAS_BIAS_T=ft["bias"], HAS_CAP=fs["cap"], HAS_CAP_T=ft["cap"],
                IEEE=fs["ieee"], IEEE_T=ft["ieee"], INTERP_BF16=fs["interp"], INTERP_BF16_T=ft["interp"],
                EVEN_D=fs["even"], EVEN_DT=ft["even"], BLOCK_N=tile.BLOCK_N, BLOCK_V=tile.BLOCK_V,
                BLOCK_D=tile.BLOCK_D, GROUP=tile.GROUP, **tile.launch_options())


def _jsd_logs(kind: str, beta: float) -> tuple[float, float, float]:
    """``(beta, log beta, log(1 - beta))`` for JSD; zeros for the other kinds, which do not
    read them (beta 0 and 1 are forward and reverse KL, where the logs do not exist)."""
    if kind != "jsd":
        return 0.0, 0.0, 0.0
    beta = float(beta)
    if not 0.0 < beta < 1.0:
        raise ValueError(f"kind='jsd' needs 0 < beta < 1, got {beta}: beta 0 is forward KL and 1 reverse KL")
    return beta, math.log(beta), math.log1p(-beta)


def two_head_forward(h, w, b, ht, wt, bt, cap, cap_t, inv_temp: float, kind: str, beta: float,
                     config: TwoHeadConfig | None = None):
    """Per-row ``(div, aux, lse)``: div and aux [N] fp32 (aux: R for reverse KL, KL(q||m)
    for JSD, 0 for forward KL) and ``lse`` [N, 2] fp32 (student, teacher) at temperature."""
    _check(h, w, b, "student")
    _check(ht, wt, bt, "teacher")
    N, D = h.shape
    V = w.shape[0]
    dev = h.device
    cfg = config or two_head_config(target_capability(dev), h.dtype)
    f = cfg.fwd
    sargs, cap_s, fs = _head_args(h, w, b, cap, f)
    targs, cap_tt, ft = _head_args(ht, wt, bt, cap_t, f)
    lse = torch.empty((N, 2), dtype=torch.float32, device=dev)
    div = torch.empty(N, dtype=torch.float32, device=dev)
    aux = torch.zeros(N, dtype=torch.float32, device=dev)
    if N == 0:
        return div, aux, lse
    n_vb = triton.cdiv(V, f.BLOCK_V)
    # per-tile partials for a bounded block of rows at a time: extra memory independent of N
    n_block = partial_rows(N, n_vb * N_STATS, f.BLOCK_N)
    part = torch.empty((n_block, n_vb, N_STATS), dtype=torch.float32, device=dev)
    for r0 in range(0, N, n_block):
        n = min(n_block, N - r0)
        rows = slice(r0, r0 + n)
        _two_head_stats_kernel[(triton.cdiv(n, f.BLOCK_N) * n_vb,)](
            *_rows(sargs, r0), *_rows(targs, r0), part, part.stride(0), n, V, D, ht.shape[1], cap_s, cap_tt,
            float(inv_temp), GAP_REVERSE=kind == "reverse_kl", **_flag_kwargs(fs, ft, f))
        m_s, sum_s, m_t, sum_t, gap = part[:n].unbind(-1)
        top_s, top_t = m_s.amax(1), m_t.amax(1)
        r_s, r_t = torch.exp(m_s - top_s[:, None]), torch.exp(m_t - top_t[:, None])
        tot_s, tot_t = (sum_s * r_s).sum(1), (sum_t * r_t).sum(1)
        ls, lt = top_s + tot_s.log(), top_t + tot_t.log()
        lse[rows, 0], lse[rows, 1] = ls, lt
        if kind == "forward_kl":
            div[rows] = (gap * r_t).sum(1) / tot_t - lt + ls
        elif kind == "reverse_kl":
            div[rows] = (gap * r_s).sum(1) / tot_s - ls + lt
            aux[rows] = div[rows]
    if kind != "jsd":
        return div, aux, lse
    # JSD: a second pass once both lse are known, (div, KL(q||m)) partials per tile
    part = part.view(-1)[:n_block * n_vb * 2].view(n_block, n_vb, 2)
    for r0 in range(0, N, n_block):
        n = min(n_block, N - r0)
        _two_head_jsd_kernel[(triton.cdiv(n, f.BLOCK_N) * n_vb,)](
            *_rows(sargs, r0), *_rows(targs, r0), lse[r0:], lse.stride(0), part, part.stride(0), n, V, D,
            ht.shape[1], cap_s, cap_tt, float(inv_temp), *_jsd_logs(kind, beta), **_flag_kwargs(fs, ft, f))
        div[r0:r0 + n], aux[r0:r0 + n] = part[:n].sum(1).unbind(-1)
    return div, aux, lse


def two_head_backward(h, w, b, ht, wt, bt, cap, cap_t, inv_temp: float, kind: str, beta: float, lse, aux, g_div,
                      need_h: bool, need_w: bool, need_b: bool, config: TwoHeadConfig | None = None):
    """Student gradients ``(dh, dw, db)`` of ``sum g_div * div`` (None where not needed)."""
    D = h.shape[1]
    dev = h.device
    need_b = need_b and b is not None
    dh = dw = db = None
    if not (need_h or need_w or need_b):
        return dh, dw, db
    cfg = config or two_head_config(target_capability(dev), h.dtype)
    products = check_backward_gemm(cfg.backward_gemm)
    zc = cfg.dz
    sargs, cap_s, fs = _head_args(h, w, b, cap, zc)
    targs, cap_tt, ft = _head_args(ht, wt, bt, cap_t, zc)
    g_div = g_div.float().contiguous()
    aux = aux.float().contiguous()
    active = g_div.ne(0).to(torch.int32)

    def fill_slab(dz, dbp, r0, n_rows, v0, n_cols, h_rows):
        del h_rows      # the kernel reads the student's rows from r0 on itself (no row order here)
        grid = (triton.cdiv(n_rows, zc.BLOCK_N) * triton.cdiv(n_cols, zc.BLOCK_V),)
        _two_head_dz_kernel[grid](
            *sargs, *targs, lse, lse.stride(0), aux, g_div, active, dz, dz.stride(0), dbp, dbp.stride(0),
            r0, n_rows, v0, n_cols, D, ht.shape[1], cap_s, cap_tt, float(inv_temp), *_jsd_logs(kind, beta),
            KIND=KINDS[kind], STORE_DZ=need_h or need_w, STORE_DB=need_b, **_flag_kwargs(fs, ft, zc))

    dh, dw, db32 = slab_backward(sargs[0], sargs[3], need_h, need_w, need_b, True, active, zc, cfg.gemm, products,
                                 fs["ieee"], fs["interp"], fill_slab)
    return dh, dw, (db32.to(b.dtype) if need_b else None)


class TwoHeadDivergenceTriton(torch.autograd.Function):
    """Per-row dense divergence [N] fp32 (ops/two_head/torch.py), lean strategy in Triton:
    ``apply(h, w, b, ht, wt, bt, args)`` (``args``: a :class:`TwoHeadArgs`) like
    ``TwoHeadDivergenceLean``; gradients to the student's h, w, b only."""

    @staticmethod
    def forward(ctx, h, w, b, ht, wt, bt, args: TwoHeadArgs):
        if args.kind not in KINDS:
            raise ValueError(f"kind must be one of {tuple(KINDS)}, got {args.kind!r}")
        div, aux, lse = two_head_forward(h, w, b, ht, wt, bt, args.cap, args.cap_t, args.inv_temp, args.kind,
                                         args.beta)
        ctx.save_for_backward(h, w, b, ht, wt, bt, aux, lse)
        ctx.args = args
        return div

    @staticmethod
    def backward(ctx, g_div):
        h, w, b, ht, wt, bt, aux, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        a = ctx.args
        dh, dw, db = two_head_backward(h, w, b, ht, wt, bt, a.cap, a.cap_t, a.inv_temp, a.kind, a.beta, lse, aux,
                                       g_div, need_h, need_w, need_b)
        return dh, dw, db, None, None, None, None
