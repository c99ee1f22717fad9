"""The compile gate (docs/design.md sec. 13): the real launchers on meta tensors are
specialised as Triton's runtime does, and the default set compiles for sm_80 and
sm_90a without spills, with tensor cores and full operand pipelines.

The gate compiles real kernels, so it runs in a fresh process without
TRITON_INTERPRET (this test session imports the kernels under the interpreter)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dft_kernels.ops import compile_check as cc


def _fresh_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    return env


def _run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dft_kernels.ops.compile_check", *args],
                          capture_output=True, text=True, env=_fresh_env(), timeout=timeout)


def _summary(stdout: str) -> dict[tuple[str, str, str], dict]:
    """The second table the gate prints: (kernel, dtype, arch) -> its columns."""
    tables = stdout.strip().split("\n\n")
    lines = [ln for ln in tables[-1].splitlines() if ln.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[1:]:
        row = dict(zip(head, (c.strip() for c in ln.strip("|").split("|"))))
        rows[(row["kernel"], row["dtype"], row["arch"])] = row
    return rows


@pytest.fixture(scope="module")
def default_gate():
    return _run("--jobs", str(min(2, os.cpu_count() or 1)))


KERNELS = ["_lse_gather_fwd_kernel", "_lse_gather_bwd_kernel", "_lse_tile_kernel", "_indexed_dot_kernel",
           "_dz_tile_kernel", "_sparse_fix_kernel", "_dw_gemm_kernel", "_dh_gemm_kernel", "_teacher_topk_kernel",
           "_two_head_stats_kernel", "_two_head_jsd_kernel", "_two_head_dz_kernel"]
DOT_KERNELS = ["_lse_tile_kernel", "_dz_tile_kernel", "_dw_gemm_kernel", "_dh_gemm_kernel", "_teacher_topk_kernel",
               "_two_head_stats_kernel", "_two_head_jsd_kernel", "_two_head_dz_kernel"]


def test_default_gate_passes(default_gate):
    assert default_gate.returncode == 0, default_gate.stderr[-3000:]
    rows = _summary(default_gate.stdout)
    for kernel in KERNELS:
        for dtype in cc.DEFAULT_DTYPES:
            for arch in cc.ARCHS:
                row = rows[(kernel, dtype, arch)]
                assert int(row["spills"]) == 0, row
                assert 0 < int(row["regs"]) <= 255, row
                assert int(row["smem"]) <= 228 * 1024, row


@pytest.mark.parametrize("arch, marker", [pytest.param("sm_80", "mma.sync", id="sm80-mma"),
                                          pytest.param("sm_90a", "wgmma", id="sm90a-wgmma")])
def test_16bit_dots_use_tensor_cores(default_gate, arch, marker):
    rows = _summary(default_gate.stdout)
    for kernel in DOT_KERNELS:
        for dtype in ("bf16", "fp16"):
            assert marker in rows[(kernel, dtype, arch)]["tensor_cores"], (kernel, dtype, arch)


def test_dw_gemm_has_the_pipeline_depth_of_the_other_gemm(default_gate):
    rows = _summary(default_gate.stdout)
    for dtype in cc.DEFAULT_DTYPES:
        for arch in cc.ARCHS:
            dw = int(rows[("_dw_gemm_kernel", dtype, arch)]["depth"])
            dh = int(rows[("_dh_gemm_kernel", dtype, arch)]["depth"])
            assert dw == dh >= 2, (dtype, arch, dw, dh)


_SPECIALISE = """
import json
from dft_kernels.ops import compile_check as cc
jobs = cc.collect_jobs([cc.COMMON], ("bf16",), ("sm_90a",), ops=("fused",))
tile = next(j for j in jobs if j.kernel == "_lse_tile_kernel")
names = list(tile.signature)
print(json.dumps(dict(kernels=sorted({j.kernel for j in jobs}), stride_hd=tile.signature["stride_hd"],
                      hn_attrs=tile.attrs[(names.index("stride_hn"),)], options=tile.options,
                      block_n=tile.constexprs[(names.index("BLOCK_N"),)])))
"""


def test_launches_are_specialised_like_the_runtime():
    """Ints equal to 1 become constexprs, multiples of 16 get divisibility hints, and
    the GPU branch of the config function supplies warps and stages."""
    out = subprocess.run([sys.executable, "-c", _SPECIALISE], capture_output=True, text=True, env=_fresh_env(),
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"_lse_tile_kernel", "_dz_tile_kernel", "_dw_gemm_kernel", "_dh_gemm_kernel"} <= set(got["kernels"])
    # h is [N, D] contiguous: stride_hd == 1 is a constexpr, stride_hn == 4096 is divisible by 16
    assert got["stride_hd"] == "constexpr"
    assert ["tt.divisibility", 16] in got["hn_attrs"]
    assert got["options"]["num_warps"] == 8 and got["options"]["num_stages"] >= 3
    assert got["block_n"] == 128


@pytest.mark.parametrize("report, expected", [
    pytest.param(cc.Report("k", "bf16", "sm_80", "v", regs=100, spill_bytes=0, depth=3, tensor_cores="mma.sync",
                           uses_dot=True), [], id="clean"),
    pytest.param(cc.Report("k", "fp32", "sm_90a", "v", regs=255, spill_bytes=8, tensor_cores="-", uses_dot=True),
                 ["8 spill bytes"], id="spill"),
    pytest.param(cc.Report("k", "tf32", "sm_90a", "v", regs=100, spill_bytes=0, tensor_cores="mma.sync",
                           uses_dot=True), ["tl.dot without wgmma"], id="tf32-no-wgmma"),
    pytest.param(cc.Report("k", "fp16", "sm_80", "v", error="PTXASError: boom"), ["compile failed: PTXASError: boom"],
                 id="compile-error"),
])
def test_gate_verdict(report, expected):
    assert report.problems == expected


def test_pipeline_depth_reads_the_buffered_allocations():
    ttgir = ("%a = ttg.local_alloc : () -> !ttg.memdesc<4x128x32xbf16, #shared, #smem, mutable>\n"
             "%b = ttg.local_alloc : () -> !ttg.memdesc<4x32x128xbf16, #shared1, #smem, mutable>\n"
             "%c = ttg.local_alloc : () -> !ttg.memdesc<4xi64, #shared2, #smem, mutable>\n")
    assert cc.pipeline_depth(ttgir) == 4
    assert cc.pipeline_depth("%a = ttg.local_alloc %x : (tensor<128x32xbf16>) -> !ttg.memdesc<128x32xbf16>") == 1


def test_bad_argument_exits_2_with_one_line():
    out = _run("--jobs", "0", timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "--jobs" in out.stderr
