"""The fused path's launch configs under the interpreter: each GPU architecture's
config (sm_80, sm_90 branches of ``fused_config``, forced on the CPU) and both backends
of the backward products (``FusedConfig.backward_gemm``), forward and every gradient
against a float64 reference at small odd shapes (docs/design.md sec. 13)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from dft_kernels.ops import linear_lse_gather as fused
from dft_kernels.ops import linear_lse_gather_products as products
from dft_kernels.ops.linear_lse_gather_products import check_backward_gemm


def _problem(N, V, D, M, seed=0):
    """h [N, D], w [V, D], b [V] float64; index [N, M] with duplicates, -1 slots, a row
    of only -1 (ignored) and upstream gradients that are zero on some rows."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * (3.0 / D ** 0.5)
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.5
    index = torch.randint(0, V, (N, M), generator=g)
    index[0, 1] = index[0, 0]            # the same id twice in a row
    index[1, -1] = -1
    index[2, :] = -1                     # an ignored row: no id in [0, V)
    return h, w, b, index, g


def _reference(h, w, b, index, scales, softcap, tail_slots):
    """(lse [N, T (+1)], gathered [N, M]) in float64 by plain torch ops."""
    z = h @ w.T + b
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    cols = [torch.logsumexp(z * s, dim=-1) for s in scales]
    if tail_slots:
        slot = torch.zeros_like(z, dtype=torch.bool)
        ids = index[:, :tail_slots]
        slot.scatter_(1, ids.clamp(min=0), ids >= 0)
        cols.append(torch.logsumexp((z * scales[-1]).masked_fill(slot, -torch.inf), dim=-1))
    ok = index >= 0
    gathered = torch.where(ok, z.gather(1, index.clamp(min=0)), torch.zeros((), dtype=z.dtype))
    counts = ok.any(1, keepdim=True)     # a row without an id does not count: lse 0, no gradient
    return torch.where(counts, torch.stack(cols, dim=-1), 0.0), gathered


def _check(config, dtype, N, V, D, M, *, scales=(1.0,), softcap=None, tail_slots=0, accum_fp32=True):
    h64, w64, b64, index, g = _problem(N, V, D, M)
    T = len(scales) + (1 if tail_slots else 0)
    g_lse = torch.randn(N, T, generator=g, dtype=torch.float64) * 1.7
    g_gat = torch.randn(N, M, generator=g, dtype=torch.float64) * 1.7
    g_lse[3] = 0.0                       # a row without upstream gradient
    g_gat[3] = 0.0
    leaves = [t.to(dtype).requires_grad_(True) for t in (h64, w64, b64)]
    lse, gat = fused.LinearLSEGatherTriton.apply(*leaves, index, tuple(scales), softcap, accum_fp32,
                                                 tail_slots, config)
    torch.autograd.backward((lse, gat), (g_lse.float(), g_gat.float()))
    refs = [t.detach().double().requires_grad_(True) for t in leaves]   # the same rounded inputs
    lse_r, gat_r = _reference(*refs, index, scales, softcap, tail_slots)
    torch.autograd.backward((lse_r, gat_r), (g_lse, g_gat))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse.double(), lse_r, **tol)
    torch.testing.assert_close(gat.double(), gat_r, **tol)
    for name, got, ref in zip(("dh", "dw", "db"), leaves, refs):
        scale = ref.grad.abs().max().item()
        torch.testing.assert_close(got.grad.double() / scale, ref.grad / scale, **tol, msg=name)
    assert torch.all(gat[2] == 0) and torch.all(lse[2] == 0) and torch.all(leaves[0].grad[2] == 0)


# each architecture once, each dtype once (the suite's time budget)
ARCHS = [pytest.param((8, 0), torch.float32, id="sm80-fp32"), pytest.param((9, 0), torch.bfloat16, id="sm90-bf16")]
# the Triton products with several chunks and slabs: tests/test_fused_linear.py
# (test_triton_many_slabs_and_row_chunks); here the torch backend
GEMMS = [pytest.param("torch", torch.bfloat16, id="torch-gemm-bf16"),
         pytest.param("torch", torch.float32, id="torch-gemm-fp32")]


@pytest.mark.parametrize("capability, dtype", ARCHS)
def test_gpu_config_under_interpreter(capability, dtype):
    """128-wide tiles, grouping and masking of a GPU's config at N 130, V 300, D 72."""
    config = fused.fused_config(capability, dtype, 4)
    assert config.fwd.BLOCK_N >= 64 and config.gemm.BLOCK_M >= 64   # really a GPU config
    _check(config, dtype, 130, 300, 72, 4, scales=(1.0, 0.5), softcap=20.0, tail_slots=2)


@pytest.mark.parametrize("backward_gemm, dtype", GEMMS)
def test_backward_gemm_options(backward_gemm, dtype, monkeypatch):
    """Both backends of the two backward products, with several row chunks and slabs
    (fp32 accumulators for bf16) forced by small buffer budgets."""
    monkeypatch.setattr(products, "ALIGN", 16)
    monkeypatch.setattr(products, "SLAB_BYTES", 48 * 32 * 2)
    monkeypatch.setattr(products, "ACC_BYTES", 32 * 40 * 4)
    config = dataclasses.replace(fused.fused_config(None, dtype, 3), backward_gemm=backward_gemm)
    _check(config, dtype, 71, 113, 40, 3, softcap=None, tail_slots=1)


def test_backward_gemm_rejects_unknown():
    with pytest.raises(ValueError, match="backward_gemm must be one of"):
        check_backward_gemm("cublas")


def test_backward_gemm_from_environment(monkeypatch):
    monkeypatch.setenv("DFT_KERNELS_BACKWARD_GEMM", "torch")
    assert fused.fused_config((9, 0), torch.bfloat16, 8).backward_gemm == "torch"
    assert fused.fused_config(None, torch.float32, 8, backward_gemm="triton").backward_gemm == "triton"
    monkeypatch.setenv("DFT_KERNELS_BACKWARD_GEMM", "cublas")
    with pytest.raises(ValueError, match="DFT_KERNELS_BACKWARD_GEMM"):
        fused.fused_config(None, torch.float32, 8)


def test_config_per_architecture():
    """Every architecture of the compile gate gets its config from the one function: the
    register cap everywhere but Hopper, operand stages that fit the block's shared memory
    (4 on the ~100 KB consumer cards, fewer on sm_75's 64 KB)."""
    from dft_kernels.ops.linear_config import ARCHS
    for arch in ARCHS.values():
        for dtype in (torch.bfloat16, torch.float32):
            cfg = fused.fused_config(arch.capability, dtype, 8)
            assert cfg.dz.maxnreg == (None if arch.capability[0] == 9 else 255), arch.name
            stage = 2 * cfg.fwd.BLOCK_N * cfg.fwd.BLOCK_D * dtype.itemsize
            assert stage * cfg.fwd.num_stages <= arch.smem_per_block * 2 // 3, (arch.name, dtype)
            assert cfg.fwd.num_stages == (2 if arch.name == "sm_75" else 4), (arch.name, cfg.fwd.num_stages)


@pytest.mark.parametrize("capability, dtype", [pytest.param((8, 6), torch.bfloat16, id="sm86-bf16"),
                                               pytest.param((7, 5), torch.float32, id="sm75-fp32")])
def test_consumer_config_under_interpreter(capability, dtype):
    """A consumer card's and Turing's configs (fewer stages, the register cap) at odd shapes."""
    config = fused.fused_config(capability, dtype, 3)
    _check(config, dtype, 67, 259, 40, 3, softcap=None, tail_slots=1)
