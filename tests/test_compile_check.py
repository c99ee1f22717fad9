"""The compile gate (docs/design.md sec. 13): the real launchers on meta tensors are
specialised as Triton's runtime does, and the default set compiles for sm_80 and
sm_90a without spills, with tensor cores and full operand pipelines.

The gate compiles real kernels, so it runs in a fresh process without
TRITON_INTERPRET (this test session imports the kernels under the interpreter)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from dft_kernels.tools import compile_check as cc


def _fresh_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    return env


def _run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dft_kernels.tools.compile_check", *args],
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


#: the CI fixture's architectures: the datacenter pair (about 2.5 minutes on two cores; the other
#: five, `--arch sm_75 --arch sm_86 --arch sm_89 --arch sm_100a --arch sm_120a`, double that and
#: run before a kernel or config change, as does tools/compile_matrix.sh)
CI_ARCHS = ("sm_80", "sm_90a")
#: and dtypes: bf16 and fp32 (fp16 compiles the bf16 kernels' code with another element type;
#: tools/compile_matrix.sh and the gate's default set compile it, as they do tf32)
CI_DTYPES = ("bf16", "fp32")


@pytest.fixture(scope="module")
def default_gate():
    return _run("--jobs", str(min(2, os.cpu_count() or 1)), *(f"--arch={a}" for a in CI_ARCHS),
                *(f"--dtype={d}" for d in CI_DTYPES))


KERNELS = ["_lse_gather_fwd_kernel", "_lse_gather_bwd_kernel", "_lse_tile_kernel", "_indexed_dot_kernel",
           "_dz_tile_kernel", "_sparse_fix_kernel", "_dw_gemm_kernel", "_dh_gemm_kernel", "_teacher_topk_kernel",
           "_two_head_stats_kernel", "_two_head_jsd_kernel", "_two_head_dz_kernel"]
DOT_KERNELS = ["_lse_tile_kernel", "_dz_tile_kernel", "_dw_gemm_kernel", "_dh_gemm_kernel", "_teacher_topk_kernel",
               "_two_head_stats_kernel", "_two_head_jsd_kernel", "_two_head_dz_kernel"]


def test_default_gate_passes(default_gate):
    assert default_gate.returncode == 0, default_gate.stderr[-3000:]
    rows = _summary(default_gate.stdout)
    for kernel in KERNELS:
        for dtype in CI_DTYPES:
            for arch in CI_ARCHS:
                row = rows[(kernel, dtype, arch)]
                assert int(row["spills"]) == 0, row
                assert 0 < int(row["regs"]) <= 255, row
                assert int(row["smem"]) <= cc.ARCH_LIMITS[arch].smem_per_block, row
                assert int(row["i32"]) == 0, row


@pytest.mark.parametrize("arch, marker", [pytest.param("sm_80", "mma.sync", id="sm80-mma"),
                                          pytest.param("sm_90a", "wgmma", id="sm90a-wgmma")])
def test_16bit_dots_use_tensor_cores(default_gate, arch, marker):
    rows = _summary(default_gate.stdout)
    for kernel in DOT_KERNELS:
        for dtype in [d for d in CI_DTYPES if d != "fp32"]:
            assert marker in rows[(kernel, dtype, arch)]["tensor_cores"], (kernel, dtype, arch)


def test_dw_gemm_has_the_pipeline_depth_of_the_other_gemm(default_gate):
    rows = _summary(default_gate.stdout)
    for dtype in CI_DTYPES:
        for arch in CI_ARCHS:
            dw = int(rows[("_dw_gemm_kernel", dtype, arch)]["depth"])
            dh = int(rows[("_dh_gemm_kernel", dtype, arch)]["depth"])
            assert dw == dh >= 2, (dtype, arch, dw, dh)


_SPECIALISE = """
import dataclasses
import json
from dft_kernels.tools import compile_check as cc
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


# --------------------------------------------------------------------------- i32 index * stride rule

_TTGIR_BAD = """
  tt.func public @k(%X: !tt.ptr<f32> loc("X"(#loc)), %stride_xn: i32 loc("stride_xn"(#loc)), %V: i32 loc("V"(#loc))) {
    %c0_i32 = arith.constant 0 : i32 loc(#loc1)
    %c64_i32 = arith.constant 64 : i32 loc(#loc1)
    %offs = tt.make_range {end = 64 : i32, start = 0 : i32} : tensor<64xi32, #blocked> loc(#loc2)
    %s = tt.splat %stride_xn : i32 -> tensor<64xi32, #blocked> loc(#loc3)
    %tile = arith.muli %offs, %s : tensor<64xi32, #blocked> loc(#loc4)
    scf.for %col_start = %c0_i32 to %V step %c64_i32  : i32 {
      %w_base = arith.muli %col_start, %stride_xn : i32 loc(#loc207)
    } loc(#loc5)
    tt.return loc(#loc6)
  } loc(#loc)
"""


def test_i32_rule_flags_a_loop_counter_times_a_stride():
    """The real instance of issue 22: a 32-bit loop counter times the weight's row stride
    (an in-tile ``arange * stride`` is bounded by the launchers and passes)."""
    assert cc.i32_stride_products(_TTGIR_BAD) == ["%w_base = arith.muli %col_start, %stride_xn : i32"]
    assert cc.i32_stride_products(_TTGIR_BAD.replace(": i32 loc(#loc207)", ": i64 loc(#loc207)")) == []


def test_i32_rule_verdict():
    r = cc.Report("k", "bf16", "sm_80", "v", regs=10, spill_bytes=0, tensor_cores="mma.sync", uses_dot=True,
                  i32_products=("%a = arith.muli %pid, %stride_xn : i32",))
    assert r.problems == ["i32 index * stride product: %a = arith.muli %pid, %stride_xn : i32"]


_TINY_KERNELS = '''
import json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dft_kernels.tools import compile_check as cc

@triton.jit
def bad_kernel(X, Y, stride_xn, stride_yn, N, BLOCK: tl.constexpr):
    row = tl.program_id(0)                       # int32
    cols = tl.arange(0, BLOCK)
    x = tl.load(X + row * stride_xn + cols)      # int32 row * stride: wraps past 2**31
    for c in range(0, N, BLOCK):                 # int32 loop counter
        x += tl.load(X + c * stride_xn + cols)
    tl.store(Y + row * stride_yn + cols, x)

@triton.jit
def good_kernel(X, Y, stride_xn, stride_yn, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    x = tl.load(X + row * stride_xn + cols)
    for c in range(0, N, BLOCK):                 # in-tile arange * stride is bounded: passes
        x += tl.sum(tl.load(X + c.to(tl.int64) * stride_xn + cols[:, None] * stride_xn + cols[None, :]), axis=0)
    tl.store(Y + row * stride_yn + cols, x)

out = {}
sig = {"X": "*fp32", "Y": "*fp32", "stride_xn": "i32", "stride_yn": "i32", "N": "i32", "BLOCK": "constexpr"}
for fn in (bad_kernel, good_kernel):
    src = ASTSource(fn, sig, {(5,): 64})
    k = triton.compile(src, target=GPUTarget("cuda", 80, 32))
    out[fn.__name__] = cc.i32_stride_products(k.asm["ttgir"])
print(json.dumps(out))
'''


def test_i32_rule_on_compiled_kernels(tmp_path):
    """A deliberately bad @triton.jit kernel (program id and a loop counter times a
    stride in int32) is flagged; the same kernel with int64 indices passes."""
    script = tmp_path / "tiny_kernels.py"          # @triton.jit needs a source file
    script.write_text(_TINY_KERNELS)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=_fresh_env(),
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(got["bad_kernel"]) >= 2, got
    assert all("arith.muli" in line and "i32" in line for line in got["bad_kernel"])
    assert got["good_kernel"] == [], got


def test_every_architecture_has_limits():
    from dft_kernels.ops.linear.config import ARCHS, arch_for, register_cap
    assert {"sm_75", "sm_80", "sm_86", "sm_89", "sm_90a", "sm_100a", "sm_120a"} <= set(cc.ARCHS)
    assert ARCHS["sm_75"].tensor_core_dtypes == frozenset() and ARCHS["sm_75"].triton_dtypes == ("fp32",)
    assert ARCHS["sm_86"].smem_per_block < 110 * 1024 and ARCHS["sm_90a"].tensor_core == "wgmma"
    assert ARCHS["sm_100a"].tensor_core == "tcgen05" and ARCHS["sm_120a"].tensor_core == "mma.sync"
    assert arch_for((8, 7)).name == "sm_86" and arch_for((10, 3)).name == "sm_100a"
    assert arch_for((12, 1)).name == "sm_120a" and arch_for((9, 0)).name == "sm_90a"
    # the register cap: every architecture but Hopper
    assert [register_cap(c) for c in ((7, 5), (8, 0), (8, 9), (9, 0), (10, 0), (12, 0))] == [255] * 3 + [None, 255, 255]


@pytest.mark.parametrize("report, expected", [
    pytest.param(cc.Report("k", "bf16", "sm_100a", "v", regs=100, spill_bytes=0, tensor_cores="-", uses_dot=True),
                 ["tl.dot without tcgen05"], id="sm100-needs-tcgen05"),
    pytest.param(cc.Report("k", "fp32", "sm_75", "v", regs=100, spill_bytes=0, tensor_cores="-", uses_dot=True),
                 [], id="sm75-fp32-fma"),
    pytest.param(cc.Report("k", "bf16", "sm_86", "v", regs=100, spill_bytes=0, smem=120000, tensor_cores="mma.sync",
                           uses_dot=True), ["120000 bytes of shared memory > 101376 per block on sm_86"],
                 id="sm86-smem"),
])
def test_arch_verdicts(report, expected):
    assert report.problems == expected


def test_matrix_table(tmp_path):
    rep = cc.Report("_lse_tile_kernel", "bf16", "sm_80", "1sc", regs=120, spill_bytes=0, smem=65536, depth=4,
                    tensor_cores="mma.sync", uses_dot=True)
    good = tmp_path / "a.json"
    good.write_text(json.dumps(dict(triton="3.9.0", summary=cc.summarise([rep]))))
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps(dict(triton="3.1.0", error="ImportError: no knobs\n", summary=[])))
    out = tmp_path / "m.md"
    assert cc.main(["--matrix", str(out), str(good), str(bad)]) == 0
    text = out.read_text()
    assert "| 3.9.0 | sm_80 | bf16 | 1 | 1 | 0 | 0 | 120 | 65536 | 0 | mma.sync |" in text
    assert "3.1.0" in text and "gate did not run: ImportError: no knobs" in text
    interp = tmp_path / "i.json"    # tools/compile_matrix.sh's interpreter-test record of a release
    interp.write_text(json.dumps(dict(triton="3.2.0", interpreter_tests="tests/test_op_references.py", rc=1,
                                      summary="1 failed, 51 passed in 90.0s")))
    assert cc.main(["--matrix", str(out), str(good), str(interp)]) == 0
    text = out.read_text()
    assert "- 3.2.0: `tests/test_op_references.py`: 1 failed, 51 passed in 90.0s (exit 1)" in text
    assert "| 3.2.0 |" not in text      # not a row of the gate's table


# --------------------------------------------------------------------------- tl.dot patterns

_DOT_KERNELS = '''
import dataclasses
import json
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dft_kernels.tools import compile_check as cc


@triton.jit
def chained(A, B, C, O, K, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), tl.float32)
    for k in range(0, K, BLOCK):
        a = tl.load(A + r[:, None] * BLOCK + r[None, :])
        b = tl.load(B + r[:, None] * BLOCK + r[None, :])
        c = tl.load(C + r[:, None] * BLOCK + r[None, :])
        acc = tl.dot(a, b, acc)
        acc = tl.dot(c, b, acc)          # two tl.dot into one accumulator
    tl.store(O + r[:, None] * BLOCK + r[None, :], acc)


@triton.jit
def nested(A, B, C, O, K, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), tl.float32)
    for k in range(0, K, BLOCK):
        a = tl.load(A + r[:, None] * BLOCK + r[None, :])
        b = tl.load(B + r[:, None] * BLOCK + r[None, :])
        p = tl.dot(a, b).to(tl.float16)
        acc = tl.dot(p, b, acc)          # a dot of a dot
    tl.store(O + r[:, None] * BLOCK + r[None, :], acc)


@triton.jit
def branchy(A, B, C, O, K, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    if tl.load(C) == 0:                  # data-dependent early exit
        return
    acc = tl.zeros((BLOCK, BLOCK), tl.float32)
    for k in range(0, K, BLOCK):
        a = tl.load(A + r[:, None] * BLOCK + r[None, :])
        b = tl.load(B + r[:, None] * BLOCK + r[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(O + r[:, None] * BLOCK + r[None, :], acc)


@triton.jit
def clean(A, B, C, O, K, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), tl.float32)
    acc2 = tl.zeros((BLOCK, BLOCK), tl.float32)
    for k in range(0, K, BLOCK):
        a = tl.load(A + r[:, None] * BLOCK + r[None, :])
        b = tl.load(B + r[:, None] * BLOCK + r[None, :])
        acc = tl.dot(a, b, acc)
        acc2 = tl.dot(a, b, acc2)        # two accumulators: fine
    tl.store(O + r[:, None] * BLOCK + r[None, :], acc + acc2)


sig = {"A": "*fp16", "B": "*fp16", "C": "*fp16", "O": "*fp32", "K": "i32", "BLOCK": "constexpr"}
out = {}
for fn in (chained, nested, branchy, clean):
    k = triton.compile(ASTSource(fn, sig, {(5,): 32}), target=GPUTarget("cuda", 80, 32))
    out[fn.__name__] = cc.dot_patterns(k.asm["ttir"])
print(json.dumps(out))
'''


def test_dot_patterns_on_compiled_kernels(tmp_path):
    """Two tl.dot into one accumulator, a dot of a dot and a data-dependent early exit are
    flagged in the TTIR; two dots into two accumulators are not."""
    script = tmp_path / "dot_kernels.py"
    script.write_text(_DOT_KERNELS)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=_fresh_env(),
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert [f.split(":")[0] for f in got["chained"]] == ["chained dots"], got
    assert [f.split(":")[0] for f in got["nested"]] == ["nested dot"], got
    assert [f.split(":")[0] for f in got["branchy"]] == ["data-dependent if"], got
    assert got["clean"] == [], got


def test_positional_arguments_are_named_for_older_triton():
    """Triton 3.2 prints %arg0, %arg1...: the gate names them from the kernel's parameters,
    so the i32 rule sees the stride there too."""
    ttgir = ("  tt.func public @k(%arg0: !tt.ptr<f32> loc(#loc), %arg1: i32 loc(#loc), %arg2: i32 loc(#loc)) {\n"
             "    %c64_i32 = arith.constant 64 : i32 loc(#loc1)\n"
             "    scf.for %arg3 = %c0_i32 to %arg2 step %c64_i32  : i32 {\n"
             "      %0 = arith.muli %arg3, %arg1 : i32 loc(#loc2)\n")
    named = cc.name_arguments(ttgir, ["X", "stride_xn", "V"])
    assert "%stride_xn: i32" in named and "%arg3" in named
    assert cc.i32_stride_products(named) == ["%0 = arith.muli %arg3, %stride_xn : i32"]
    assert cc.name_arguments(ttgir, ["X", "stride_xn"]) == ttgir      # counts differ: unchanged


def test_serialized_wgmma_fails_the_gate():
    """ptxas's "wgmma serialized" performance warning (a slow path on Hopper) is a gate failure."""
    from dft_kernels.tools.compile_rules import serialized_wgmma
    log = ("ptxas info    : Used 168 registers\n"
           "ptxas k.ptx, line 5; warning : Potential Performance Loss: wgmma.mma_async instructions are "
           "serialized due to the presence of Extern calls in the function '_dz_tile_kernel'.\n")
    found = serialized_wgmma(log)
    assert len(found) == 1 and "serialized" in found[0]
    assert serialized_wgmma("ptxas info    : Used 168 registers") == ()
    report = cc.Report("k", "bf16", "sm_90a", "v", regs=168, spill_bytes=0, tensor_cores="wgmma", uses_dot=True,
                       wgmma_serialized=found)
    assert report.problems and report.problems[0].startswith("wgmma serialized")


# the log lines of the measured releases (ptxas 12.4 under Triton 3.2 via compile_rules.ptxas_usage,
# 12.8 under 3.6, ptxas-blackwell 13.x under 3.9: the last one prefixes its own name)
@pytest.mark.parametrize("line", [
    pytest.param("ptxas info    : (C7511) Potential Performance Loss: wgmma.mma_async instructions are serialized "
                 "due to insufficient register resources for the wgmma pipeline in the function '_k'", id="3.2-3.6"),
    pytest.param("ptxas-blackwell info    : (C7511) Potential Performance Loss: wgmma.mma_async instructions are "
                 "serialized due to insufficient register resources for the wgmma pipeline in the function '_k' in ",
                 id="3.9"),
    pytest.param("ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized "
                 "due to non wgmma instructions defining accumulator registers of a wgmma between start and end of "
                 "the pipeline stage in the function '_k'", id="C7515"),
])
def test_serialized_wgmma_reads_every_release_log(line):
    assert cc.serialized_wgmma("ptxas info    : Used 128 registers\n" + line + "\n") == (line.strip()[:200],)


_PROBE = '''
import dataclasses
import json
from dft_kernels.tools import compile_check as cc
r = cc.wgmma_probe()
print(json.dumps(dict(serialized=list(r.wgmma_serialized), error=r.error, tc=r.tensor_cores)))
'''


def test_wgmma_probe_serialises_on_hopper():
    """The probe kernel (tools/wgmma_probe.py) makes ptxas serialise its wgmma, and the gate's
    rule sees it (tools/compile_matrix.sh runs the same probe under every release)."""
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=_fresh_env(),
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["error"] == "" and "wgmma" in got["tc"], got
    assert got["serialized"] and "serialized" in got["serialized"][0], got


def test_cells_auto_sends_to_pytorch_are_not_compiled(monkeypatch):
    """Under a release whose TRITON_UNSUPPORTED rules send a cell to PyTorch (faked: 3.2 on
    Blackwell, 3.6's 16-bit teacher top-k on sm_100a) the gate lists it instead of compiling
    (--include-unsupported compiles it); nothing is launched for those cells."""
    import triton
    monkeypatch.setattr(triton, "__version__", "3.2.0")
    skipped: list = []
    jobs = cc.collect_jobs([cc.COMMON], ("bf16", "fp32"), ("sm_100a", "sm_120a"), skipped=skipped)
    assert jobs == []
    assert {(s["arch"], s["dtype"], s["op"]) for s in skipped} == {
        (a, d, op) for a in ("sm_100a", "sm_120a") for d in ("bf16", "fp32") for op in cc.DRIVERS}
    assert all("cannot target Blackwell" in s["why"] for s in skipped)
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    assert cc.unsupported_reason("sm_100a", "bf16", "teacher_topk") is not None
    assert cc.unsupported_reason("sm_100a", "fp16", "teacher_topk") is not None
    assert cc.unsupported_reason("sm_100a", "tf32", "teacher_topk") is not None
    assert cc.unsupported_reason("sm_100a", "fp32", "teacher_topk") is None
    assert cc.unsupported_reason("sm_100a", "bf16", "fused") is None
    assert cc.unsupported_reason("sm_120a", "bf16", "teacher_topk") is None
    monkeypatch.setattr(triton, "__version__", "3.9.0")
    assert all(cc.unsupported_reason(a, d, op) is None for a in cc.ARCHS for d in cc.ARCH_LIMITS[a].triton_dtypes
               for op in cc.DRIVERS)


def test_matrix_lists_skipped_cells_and_the_probe(tmp_path):
    rep = cc.Report("_lse_tile_kernel", "bf16", "sm_100a", "1sc", regs=120, spill_bytes=0, smem=65536, depth=4,
                    tensor_cores="tcgen05", uses_dot=True)
    probe = cc.Report("_serialising_mm_kernel", "bf16", "sm_90a", "probe", wgmma_serialized=("ptxas info : ... "
                      "wgmma.mma_async instructions are serialized",))
    why36 = "Triton 3.6 fails to compile the teacher top-k kernel for sm_100a"
    a = tmp_path / "a.json"
    a.write_text(json.dumps(dict(triton="3.6.0", args=["--arch", "sm_100a", "--wgmma-probe", "--dtype", "bf16"],
                                 summary=cc.summarise([rep]), wgmma_probe=dataclasses.asdict(probe),
                                 skipped=[dict(arch="sm_100a", dtype="bf16", op="teacher_topk",
                                               why=f"bf16 (teacher_topk) on sm_100a under Triton 3.6: {why36}; "
                                                   "auto uses the chunked PyTorch path")])))
    b = tmp_path / "b.json"
    b.write_text(json.dumps(dict(triton="3.2.0", args=[], summary=[], skipped=[
        dict(arch="sm_120a", dtype=d, op="fused", why="Triton before 3.3 cannot target Blackwell") for d in
        ("bf16", "fp32")])))
    out = tmp_path / "m.md"
    assert cc.main(["--matrix", str(out), str(a), str(b)]) == 0
    text = out.read_text()
    assert "| 3.6.0 | sm_100a | bf16 | 1 | 1 | 0 | 0 | 120 | 65536 | 0 | tcgen05 |" in text
    assert "- 3.6.0 sm_100a bf16 `teacher_topk`: " + why36 in text
    assert "| 3.2.0 | sm_120a | - | 0 | 0 | - |" in text and "auto runs PyTorch: Triton before 3.3" in text
    assert "3.6.0: fires" in text
    assert "- 3.6.0: `--dtype bf16`" in text      # --wgmma-probe is not coverage
