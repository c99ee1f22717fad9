"""The fused path's launch configs under the interpreter: each GPU architecture's
config (sm_80, sm_90 branches of ``fused_config``, forced on the CPU) and both backends
of the backward products (``FusedConfig.backward_gemm``), forward and every gradient
against a float64 reference at small odd shapes (docs/design.md sec. 13)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from dft_kernels.ops import PrimitiveArgs
from dft_kernels.ops.linear import triton as fused
from dft_kernels.ops.linear import backward as products
from dft_kernels.ops.linear.backward import check_backward_gemm


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
    lse, gat = fused.LinearLSEGatherTriton.apply(*leaves, index, PrimitiveArgs(tuple(scales), softcap, tail_slots,
                                                                               accum_fp32, config=config))
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
    from dft_kernels.ops.linear.config import ARCHS
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


# --------------------------------------------------------------------------- Triton releases
# The config functions read triton.__version__ at each call (linear.config.RELEASE_CONFIG);
# these tests fake it and compile nothing (the compiles: tools/compile_matrix.sh,
# benchmarks/results/compile_matrix.md).

ALL_CAPS = [(7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)]


def _configs(monkeypatch, version, capability, dtype):
    """(fused, two-head, teacher top-k) configs under Triton ``version``."""
    import triton

    from dft_kernels.ops.teacher_topk.triton import topk_config
    from dft_kernels.ops.two_head.triton import two_head_config
    monkeypatch.setattr(triton, "__version__", version)
    return (fused.fused_config(capability, dtype, 8, backward_gemm="triton"),
            two_head_config(capability, dtype, backward_gemm="triton"), topk_config(capability, dtype, 32))


def test_triton_version_parses_releases():
    from dft_kernels.ops.linear.config import triton_version
    assert triton_version("3.2.0") == (3, 2)
    assert triton_version("3.6.0+git1234abcd") == (3, 6)
    assert triton_version("3.10.1") == (3, 10)
    assert triton_version("3.5.0rc1") == (3, 5)
    assert triton_version("garbage") == (0, 0)


def test_triton_39_config_has_no_release_override(monkeypatch):
    """Triton 3.9 (and later) runs the one config: no release rule touches it, so its gate
    results (benchmarks/results/compile_matrix_gate-3.9.md) stand."""
    from dft_kernels.ops.linear.config import release_overrides
    kernels = ("_lse_tile_kernel", "_dz_tile_kernel", "_teacher_topk_kernel", "_two_head_stats_kernel",
               "_two_head_jsd_kernel", "_two_head_dz_kernel")
    for version in ("3.9.0", "3.10.0"):
        for cap in ALL_CAPS:
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                assert all(release_overrides(k, cap, dtype, version) == {} for k in kernels), (version, cap, dtype)
    for cap in ALL_CAPS:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            fc, th, tk = _configs(monkeypatch, "3.9.0", cap, dtype)
            assert fc.fwd.maxnreg is None and fc.fwd.BLOCK_V == 128 and fc.dz.BLOCK_V == 128, (cap, dtype)
            assert fc.dz.maxnreg == (None if cap[0] == 9 else 255), (cap, dtype)
            assert th.fwd == th.dz and th.dz.BLOCK_V == 128 and th.dz.maxnreg == fc.dz.maxnreg, (cap, dtype)
            assert (tk.BLOCK_N, tk.BLOCK_V) == ((64, 64) if dtype == torch.float32 else (64, 128)), (cap, dtype)


@pytest.mark.parametrize("version", ["3.6.0", "3.3.0", "3.8.1"])
def test_triton_36_caps_the_forward_tile_on_ampere_and_ada(monkeypatch, version):
    """Triton 3.6: the forward tile's common variant spilled 24 B at 128 registers on sm_80 /
    sm_86 / sm_89 in bf16, fp16 and tf32; the cap of 255 there, nowhere else, not for fp32."""
    for cap in ALL_CAPS:
        for dtype, tf32 in ((torch.bfloat16, False), (torch.float16, False), (torch.float32, False),
                            (torch.float32, True)):
            monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
            fc, _, _ = _configs(monkeypatch, version, cap, dtype)
            want = 255 if cap[0] == 8 and (dtype != torch.float32 or tf32) else None
            assert fc.fwd.maxnreg == want, (version, cap, dtype, tf32)
            assert fc.fwd.launch_options().get("maxnreg") == want
            assert fc.dz.BLOCK_V == 128 and fc.dz.maxnreg == (None if cap[0] == 9 else 255)
    fc, _, _ = _configs(monkeypatch, "3.2.0", (8, 0), torch.bfloat16)
    assert fc.fwd.maxnreg is None


def test_triton_32_halves_the_fp32_dz_tile_on_hopper(monkeypatch):
    """Triton 3.2 on sm_90a: the fp32 dz tile (64 x 128) spilled 32 B; 64 x 64 there only."""
    fc, _, _ = _configs(monkeypatch, "3.2.0", (9, 0), torch.float32)
    assert (fc.dz.BLOCK_N, fc.dz.BLOCK_V, fc.dz.maxnreg) == (64, 64, None)
    assert fc.fwd.BLOCK_V == 128
    for cap, dtype in (((9, 0), torch.bfloat16), ((9, 0), torch.float16), ((8, 0), torch.float32)):
        fc, _, _ = _configs(monkeypatch, "3.2.0", cap, dtype)
        assert fc.dz.BLOCK_V == 128, (cap, dtype)
    for version in ("3.3.0", "3.6.0", "3.9.0"):
        fc, _, _ = _configs(monkeypatch, version, (9, 0), torch.float32)
        assert fc.dz.BLOCK_V == 128, version
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)   # TF32 (wgmma) fits 64 x 128
    fc, _, _ = _configs(monkeypatch, "3.2.0", (9, 0), torch.float32)
    assert fc.dz.BLOCK_V == 128


def test_triton_32_halves_the_fp32_two_head_tiles_on_sm86_sm89(monkeypatch):
    """Triton 3.2 on sm_86 / sm_89: the fp32 two-head tiles (64 x 128) spilled 8 B (stats)
    and 32 B (dz); 64 x 64 there only -- not on sm_80, not in 16-bit, not under 3.6."""
    for cap in ((8, 6), (8, 9)):
        _, th, _ = _configs(monkeypatch, "3.2.0", cap, torch.float32)
        assert (th.fwd.BLOCK_V, th.dz.BLOCK_V, th.dz.maxnreg) == (64, 64, 255), cap
    for version, cap, dtype in (("3.2.0", (8, 0), torch.float32), ("3.2.0", (8, 6), torch.bfloat16),
                                ("3.6.0", (8, 9), torch.float32), ("3.9.0", (8, 6), torch.float32)):
        _, th, _ = _configs(monkeypatch, version, cap, dtype)
        assert th.fwd.BLOCK_V == th.dz.BLOCK_V == 128, (version, cap, dtype)


def test_triton_34_halves_the_fp32_two_head_dz_tile_on_hopper(monkeypatch):
    """Triton 3.4 on sm_90a: the fp32 two-head dz tile spilled 8 B at 64 x 128; 64 x 64 for
    3.3-3.5 there, the forward tile unchanged; 3.2, 3.6 and 16-bit keep 64 x 128."""
    for version in ("3.3.1", "3.4.0", "3.5.1"):
        _, th, _ = _configs(monkeypatch, version, (9, 0), torch.float32)
        assert (th.fwd.BLOCK_V, th.dz.BLOCK_V) == (128, 64), version
    for version, dtype in (("3.2.0", torch.float32), ("3.6.0", torch.float32), ("3.4.0", torch.bfloat16)):
        _, th, _ = _configs(monkeypatch, version, (9, 0), dtype)
        assert th.dz.BLOCK_V == 128, (version, dtype)


@pytest.mark.parametrize("version", ["3.2.0", "3.2.1"])
@pytest.mark.parametrize("capability", [(10, 0), (10, 3), (12, 0)])
def test_blackwell_needs_triton_33(version, capability):
    """Triton < 3.3 cannot target Blackwell (3.2 aborts in AccelerateMatmul): every op, every
    dtype goes to the chunked PyTorch path before anything is compiled."""
    from dft_kernels.ops.linear.config import triton_unsupported
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for op in (None, "linear_lse_gather", "teacher_topk", "two_head", "lse_gather"):
            why = triton_unsupported(capability, dtype, op, version)
            assert why is not None and "Triton before 3.3 cannot target Blackwell" in why, (dtype, op)
    for later in ("3.3.0", "3.6.0", "3.9.0"):
        assert triton_unsupported(capability, torch.bfloat16, "linear_lse_gather", later) is None
    assert triton_unsupported((9, 0), torch.bfloat16, "linear_lse_gather", version) is None


def test_triton_36_teacher_topk_on_sm100_runs_pytorch(monkeypatch):
    """Triton 3.6 cannot compile the tensor-core teacher top-k kernel (bf16, fp16, TF32) for
    sm_100a (a pass error): that op and those dtypes only, that release only; fp32 on FMA
    compiles."""
    from dft_kernels.ops.linear.config import triton_unsupported
    for dtype, tf32 in ((torch.bfloat16, False), (torch.float16, False), (torch.float32, True)):
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
        why = triton_unsupported((10, 0), dtype, "teacher_topk", "3.6.0")
        assert why is not None and "teacher_topk" in why and "sm_100a" in why, dtype
        assert triton_unsupported((10, 0), dtype, "linear_lse_gather", "3.6.0") is None
        assert triton_unsupported((10, 0), dtype, "teacher_topk", "3.9.0") is None
        assert triton_unsupported((12, 0), dtype, "teacher_topk", "3.6.0") is None
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert triton_unsupported((10, 0), torch.float32, "teacher_topk", "3.6.0") is None


@pytest.mark.parametrize("version, capability, dtype, op, match", [
    pytest.param("3.2.0", (10, 0), torch.bfloat16, "linear_lse_gather", "cannot target Blackwell", id="3.2-sm100"),
    pytest.param("3.2.0", (12, 0), torch.float32, "two_head", "cannot target Blackwell", id="3.2-sm120"),
    pytest.param("3.6.0", (10, 0), torch.bfloat16, "teacher_topk", "TMemLayouts", id="3.6-sm100-topk"),
    pytest.param("3.6.0", (10, 0), torch.float16, "teacher_topk", "TMemLayouts", id="3.6-sm100-topk-fp16"),
])
def test_auto_falls_back_before_compiling(monkeypatch, version, capability, dtype, op, match):
    """fallback.guarded with the injected Triton version on a (faked) Blackwell device: the
    Triton side is never called, the op runs on the PyTorch path, one warning."""
    from dft_kernels.ops import fallback
    monkeypatch.setattr(fallback, "_triton_version", lambda: version)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA faked")
    fallback.reset()
    try:
        def must_not_compile(*_):
            raise AssertionError("Triton must not be tried")
        with pytest.warns(fallback.TritonFallbackWarning, match=match):
            out = fallback.guarded(op, fallback.AUTO_TRITON, torch.device("cuda", 0), dtype, must_not_compile,
                                   lambda *_: (torch.ones(2),), (), differentiable=False)
        assert torch.equal(out[0], torch.ones(2))
        assert fallback._STATE[(op, "cuda:0", str(dtype).removeprefix("torch."))] == "failed"
        # the same cell under Triton 3.9 is tried
        fallback.reset()
        monkeypatch.setattr(fallback, "_triton_version", lambda: "3.9.0")
        assert fallback.preflight(torch.device("cuda", 0), dtype, op) is None
    finally:
        fallback.reset()
