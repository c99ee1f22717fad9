"""Ahead-of-time compile gate for every Triton kernel of the package (docs/design.md sec. 13).

``python -m dft_kernels.tools.compile_check [--all]`` runs the real launchers on ``meta``
tensors with the GPU branch of their one config function, records each kernel launch
instead of running it, specialises it exactly as Triton's runtime does (ints equal to 1
become constexprs, multiples of 16 get divisibility hints), compiles it for sm_80 and
every architecture in :data:`ARCHS` (sm_75 ... sm_120a, each with its limits, from
``linear.config.ARCHS``) with the ptxas Triton ships, and prints per kernel, dtype and
arch: registers, spill bytes, shared memory, operand pipeline depth and the
tensor-core instructions found in the PTX. It exits 1 on a compile failure, a spill,
shared memory over the architecture's per-block limit, a ``tl.dot`` kernel without the
architecture's tensor-core instruction for a dtype that has one there (``mma.sync``,
``wgmma``, ``tcgen05.mma``), an i32 product of an index with a stride in the TTGIR
(:func:`i32_stride_products`: such an offset wraps past 2**31 elements), or a ``tl.dot``
pattern Triton / ptxas mishandle (:func:`dot_patterns`: two dots into one accumulator, a
dot of a dot, a data-dependent branch in a dot kernel); the rules live in
``tools/compile_rules.py``.

``--json FILE`` also writes the reports and the summary; ``--matrix OUT FILE...`` merges
such files from several Triton releases into one table (``tools/compile_matrix.py``, run by
the repository's tools/compile_matrix.sh).
``--wgmma-probe`` also compiles a kernel known to serialise wgmma on sm_90a
(tools/wgmma_probe.py) and fails unless the "wgmma serialized" rule sees it under this
Triton. Cells ``impl="auto"`` sends to PyTorch under this Triton release
(``linear.config.TRITON_UNSUPPORTED``, e.g. 3.2 on Blackwell) are listed, not compiled
(``--include-unsupported`` compiles them).

Kernels plug in through :data:`DRIVERS`: a function per op that calls its launchers,
forward and backward, on ``meta`` tensors for one :class:`Variant` and dtype.

Needs no GPU; the Triton runtime internals it uses are those of triton 3.9 (older
releases: :func:`specialise` falls back to their binder, see tools/compile_matrix.sh).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import torch

from .compile_matrix import format_table, write_matrix
from .compile_rules import (_PTXAS_REGS, _PTXAS_SPILL, dot_patterns, i32_stride_products,  # noqa: F401
                            name_arguments, pipeline_depth, ptxas_usage, serialized_wgmma)
from ..ops._common import lse_columns
from ..ops.linear.config import ARCHS as ARCH_LIMITS

#: Architectures checked: name -> compute capability (limits: ``linear.config.ARCHS``).
ARCHS = {name: a.capability for name, a in ARCH_LIMITS.items()}
#: The tensor-core instruction names of the PTX: gate name -> marker.
TC_MARKERS = {"mma.sync": "mma.sync", "wgmma": "wgmma.mma_async", "tcgen05": "tcgen05.mma"}
#: Input dtypes checked: label -> (dtype, TF32 matmuls allowed).
DTYPES = {"bf16": (torch.bfloat16, False), "fp16": (torch.float16, False),
          "fp32": (torch.float32, False), "tf32": (torch.float32, True)}
#: Dtypes of the default (CI) run; ``--all`` adds TF32.
DEFAULT_DTYPES = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class HeadShape:
    """The problem the launchers are run at (Llama-3-8B's head by default)."""
    N: int = 8192
    D: int = 4096
    V: int = 128256
    K: int = 32


@dataclass(frozen=True)
class Variant:
    """One combination of the launcher options that select constexprs."""
    two_scales: bool
    softcap: bool
    tail: bool
    bias: bool
    accum_fp32: bool = True

    @property
    def label(self) -> str:
        parts = [f"{2 if self.two_scales else 1}sc"]
        parts += [name for name, on in (("cap", self.softcap), ("tail", self.tail), ("bias", self.bias)) if on]
        if not self.accum_fp32:
            parts.append("acc16")
        return "+".join(parts)


#: The heaviest combination and the most common one (DFT, 1 scale, teacher tail, no
#: softcap, no bias): the default set, per kernel, dtype and arch.
HEAVIEST = Variant(two_scales=True, softcap=True, tail=True, bias=True)
COMMON = Variant(two_scales=False, softcap=False, tail=True, bias=False)


def all_variants() -> list[Variant]:
    """Every combination the launchers can produce."""
    return [Variant(*flags) for flags in itertools.product((False, True), repeat=5)]


# --------------------------------------------------------------------------- drivers


def _meta_inputs(shape: HeadShape, variant: Variant, dtype: torch.dtype):
    meta = dict(device="meta")
    index = torch.empty((shape.N, shape.K + 1), dtype=torch.int64, **meta)
    scales = (1.0, 0.5) if variant.two_scales else (1.0,)
    softcap = 30.0 if variant.softcap else None
    tail_slots = shape.K if variant.tail else 0
    n_lse = lse_columns(scales, tail_slots)
    lse = torch.empty((shape.N, n_lse), dtype=torch.float32, **meta)
    g_lse = torch.empty_like(lse)
    g_gathered = torch.empty((shape.N, shape.K + 1), dtype=torch.float32, **meta)
    return index, scales, softcap, tail_slots, lse, g_lse, g_gathered


def drive_logits_path(shape: HeadShape, variant: Variant, dtype: torch.dtype) -> None:
    """The logits path (ops/lse_gather/triton.py): forward and backward on [N, V] logits."""
    from ..ops.lse_gather import triton as lse_gather
    index, scales, softcap, tail_slots, lse, g_lse, g_gathered = _meta_inputs(shape, variant, dtype)
    x = torch.empty((shape.N, shape.V), dtype=dtype, device="meta")
    lse_gather.lse_gather_forward(x, index, scales, softcap, tail_slots)
    lse_gather.lse_gather_backward(x, index, scales, softcap, lse, g_lse, g_gathered, tail_slots)


def drive_fused_path(shape: HeadShape, variant: Variant, dtype: torch.dtype) -> None:
    """The fused path (ops/linear/triton.py): forward, and the backward with dH, dW
    (and db with a bias)."""
    from ..ops.linear import triton as linear_lse_gather
    index, scales, softcap, tail_slots, lse, g_lse, g_gathered = _meta_inputs(shape, variant, dtype)
    h = torch.empty((shape.N, shape.D), dtype=dtype, device="meta")
    w = torch.empty((shape.V, shape.D), dtype=dtype, device="meta")
    b = torch.empty((shape.V,), dtype=dtype, device="meta") if variant.bias else None
    _, gathered = linear_lse_gather.linear_lse_gather_forward(h, w, b, index, scales, softcap, tail_slots)
    linear_lse_gather.linear_lse_gather_backward(
        h, w, b, index, scales, softcap, lse, gathered, g_lse, g_gathered,
        True, True, variant.bias, variant.accum_fp32, tail_slots)


def drive_teacher_topk(shape: HeadShape, variant: Variant, dtype: torch.dtype) -> None:
    """The teacher's top-k (ops/teacher_topk/triton.py) at k = K and at the kernel's largest k
    (the register buffer is [BLOCK_N, k]); softcap and bias from the variant."""
    from ..ops.teacher_topk import triton as teacher_topk
    h = torch.empty((shape.N, shape.D), dtype=dtype, device="meta")
    w = torch.empty((shape.V, shape.D), dtype=dtype, device="meta")
    b = torch.empty((shape.V,), dtype=dtype, device="meta") if variant.bias else None
    for k in (shape.K, teacher_topk.MAX_TRITON_K):
        teacher_topk.teacher_topk_forward(h, w, b, k, 1.0, 30.0 if variant.softcap else None)


def drive_two_head(shape: HeadShape, variant: Variant, dtype: torch.dtype) -> None:
    """The dense two-head divergence (ops/two_head/triton.py), teacher hidden size D: the
    forward (both passes for JSD) and the backward with dH, dW (and db with a bias) for
    each kind; softcap (both heads) and bias (both heads) from the variant."""
    from ..ops.two_head import triton as two_head_triton
    meta = dict(dtype=dtype, device="meta")
    h, ht = torch.empty((shape.N, shape.D), **meta), torch.empty((shape.N, shape.D), **meta)
    w, wt = torch.empty((shape.V, shape.D), **meta), torch.empty((shape.V, shape.D), **meta)
    b = torch.empty((shape.V,), **meta) if variant.bias else None
    bt = torch.empty((shape.V,), **meta) if variant.bias else None
    cap = 30.0 if variant.softcap else None
    f32 = dict(dtype=torch.float32, device="meta")
    lse, aux, g_div = torch.empty((shape.N, 2), **f32), torch.empty((shape.N,), **f32), torch.empty((shape.N,), **f32)
    for kind in two_head_triton.KINDS:
        two_head_triton.two_head_forward(h, w, b, ht, wt, bt, cap, cap, 1.0, kind, 0.5)
        two_head_triton.two_head_backward(h, w, b, ht, wt, bt, cap, cap, 1.0, kind, 0.5, lse, aux, g_div,
                                          True, True, variant.bias)


#: driver -> the op's name in ``fallback.guarded`` (``linear.config.triton_unsupported``'s ``op``)
GUARDED_OP = {"logits": "lse_gather", "fused": "linear_lse_gather", "teacher_topk": "teacher_topk",
              "two_head": "two_head"}

#: op name -> driver. A new op module adds its driver here.
DRIVERS: dict[str, Callable[[HeadShape, Variant, torch.dtype], None]] = {
    "logits": drive_logits_path,
    "fused": drive_fused_path,
    "teacher_topk": drive_teacher_topk,
    "two_head": drive_two_head,
}


# --------------------------------------------------------------------------- recording


@dataclass
class Launch:
    """One recorded kernel launch: the JIT function and its call arguments."""
    fn: object
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def recorded_launches() -> Iterator[list[Launch]]:
    """Within the block, ``kernel[grid](...)`` records a :class:`Launch` instead of
    compiling or running anything."""
    from triton.runtime.jit import JITFunction
    launches: list[Launch] = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, dict(kwargs)))

    original = JITFunction.run
    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = original


@dataclass(frozen=True)
class Job:
    """A specialised launch, ready to compile (picklable)."""
    module: str
    kernel: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    arch: str
    dtype: str
    variant: str
    key: str = field(compare=False)


def specialise(launch: Launch, arch: str, dtype: str, variant: str) -> Job:
    """Bind and specialise ``launch`` for ``arch`` the way ``JITFunction.run`` does."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    fn = launch.fn
    backend = make_backend(GPUTarget("cuda", _cc(arch), 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, specialization, options)
    opts = {k: v for k, v in options.__dict__.items() if k in ("num_warps", "num_stages", "num_ctas", "maxnreg")
            and v is not None}
    key = repr((fn.__name__, sorted(signature.items()), sorted(constexprs.items()), sorted(attrs.items()),
                sorted(opts.items()), arch, dtype))
    return Job(fn.__module__, fn.__name__, signature, constexprs, attrs, opts, arch, dtype, variant, key)


def _cc(arch: str) -> int:
    major, minor = ARCHS[arch]
    return 10 * major + minor


# --------------------------------------------------------------------------- compiling


@dataclass(frozen=True)
class Report:
    """What one compile produced."""
    kernel: str
    dtype: str
    arch: str
    variant: str
    regs: int = -1
    spill_bytes: int = -1
    smem: int = -1
    depth: int = -1
    tensor_cores: str = "-"
    uses_dot: bool = False
    error: str = ""
    #: TTGIR lines with an i32 product of an index with a stride (:func:`i32_stride_products`)
    i32_products: tuple = ()
    #: TTIR findings of :func:`dot_patterns` (chained / nested dots, data-dependent if)
    dot_patterns: tuple = ()
    #: ptxas's "wgmma ... serialized" warnings (:func:`serialized_wgmma`)
    wgmma_serialized: tuple = ()

    @property
    def problems(self) -> list[str]:
        """Why this compile fails the gate (empty when it passes)."""
        if self.error:
            return [f"compile failed: {self.error}"]
        out = []
        if self.spill_bytes > 0:
            out.append(f"{self.spill_bytes} spill bytes")
        limits = ARCH_LIMITS.get(self.arch)
        if limits is not None and self.smem > limits.smem_per_block:
            out.append(f"{self.smem} bytes of shared memory > {limits.smem_per_block} per block on {self.arch}")
        if self.uses_dot and limits is not None and self.dtype in limits.tensor_core_dtypes:
            if limits.tensor_core not in self.tensor_cores:
                out.append(f"tl.dot without {limits.tensor_core}")
        for line in self.i32_products:
            out.append(f"i32 index * stride product: {line}")
        out += list(self.dot_patterns)
        out += [f"wgmma serialized: {line}" for line in self.wgmma_serialized]
        return out


def compile_job(job) -> Report:
    """Compile ``job`` with ptxas ``-v`` and read its resources."""
    if isinstance(job, LegacyJob):
        return compile_legacy(job)
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    base = dict(kernel=job.kernel, dtype=job.dtype, arch=job.arch, variant=job.variant)
    fn = getattr(importlib.import_module(job.module), job.kernel)
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True    # the ptxas log is printed only on a real compile
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, job.signature, job.constexprs, job.attrs),
                                      target=GPUTarget("cuda", _cc(job.arch), 32), options=job.options)
    except Exception as exc:  # noqa: BLE001 - every failure is reported, the gate fails
        return Report(**base, error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}")
    text = log.getvalue()
    regs = max((int(r) for r in _PTXAS_REGS.findall(text)), default=-1)
    spills = max((int(a) + int(b) for a, b in _PTXAS_SPILL.findall(text)), default=-1)
    ptx = compiled.asm["ptx"]
    tc = [name for name, marker in TC_MARKERS.items() if marker in ptx]
    return Report(**base, regs=regs, spill_bytes=spills, smem=int(compiled.metadata.shared),
                  depth=pipeline_depth(compiled.asm["ttgir"]), tensor_cores="+".join(tc) or "-",
                  uses_dot="tt.dot" in compiled.asm["ttir"],
                  i32_products=tuple(i32_stride_products(compiled.asm["ttgir"])),
                  dot_patterns=tuple(dot_patterns(compiled.asm["ttir"])), wgmma_serialized=serialized_wgmma(text))


# --------------------------------------------------------------------------- older Triton releases


def _modern_runtime() -> bool:
    """Whether this Triton has the runtime internals :func:`specialise` uses (>= 3.4 or so);
    older releases (3.2, 3.3) compile through :func:`compile_legacy`."""
    from triton.runtime.jit import JITFunction
    try:
        from triton import knobs  # noqa: F401
    except ImportError:
        return False
    return hasattr(JITFunction, "_pack_args")


@dataclass(frozen=True)
class LegacyJob:
    """A recorded launch for an older Triton: compiled in this process by ``warmup``."""
    launch: Launch
    arch: str
    dtype: str
    variant: str
    key: str


def _arg_key(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"T[{v.dtype},{v.stride()},{v.data_ptr() % 16 == 0}]"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"i[{v == 1},{v % 16 == 0}]"
    return repr(v)


def _legacy_job(launch: Launch, arch: str, dtype: str, variant: str) -> LegacyJob:
    key = repr((launch.fn.__name__, [_arg_key(a) for a in launch.args],
                sorted((k, _arg_key(v)) for k, v in launch.kwargs.items()), arch, dtype))
    return LegacyJob(launch, arch, dtype, variant, key)


class _CompileOnlyDriver:
    """Stands in for the CUDA driver while ``warmup`` compiles for ``target`` (no GPU)."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def compile_legacy(job: LegacyJob) -> Report:
    """Compile a recorded launch with an older Triton's own ``warmup`` against a stand-in
    driver for the job's architecture, then read registers and spills with ptxas ``-v``."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    base = dict(kernel=job.launch.fn.__name__, dtype=job.dtype, arch=job.arch, variant=job.variant)
    fn = job.launch.fn
    for cache in (getattr(fn, "cache", None), getattr(fn, "device_caches", None)):
        if isinstance(cache, dict):
            cache.clear()    # keyed by device, not by target: never reuse another arch's kernel
    driver.set_active(_CompileOnlyDriver(GPUTarget("cuda", _cc(job.arch), 32)))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            compiled = fn.warmup(*job.launch.args, grid=(1,), **job.launch.kwargs)
    except Exception as exc:  # noqa: BLE001 - every failure is reported, the gate fails
        return Report(**base, error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
                      if str(exc).strip() else type(exc).__name__)
    finally:
        driver.reset_active()
    ptx = compiled.asm["ptx"]
    regs, spills, err, ptxas_log = ptxas_usage(ptx, _cc(job.arch))
    if err:
        return Report(**base, error=f"ptxas: {err}")
    names = [p.name for p in fn.params if not p.is_constexpr]
    ttgir = name_arguments(compiled.asm["ttgir"], names)
    tc = [name for name, marker in TC_MARKERS.items() if marker in ptx]
    return Report(**base, regs=regs, spill_bytes=spills, smem=int(compiled.metadata.shared),
                  depth=pipeline_depth(ttgir), tensor_cores="+".join(tc) or "-",
                  uses_dot="tt.dot" in compiled.asm["ttir"], i32_products=tuple(i32_stride_products(ttgir)),
                  dot_patterns=tuple(dot_patterns(compiled.asm["ttir"])), wgmma_serialized=serialized_wgmma(ptxas_log))


# --------------------------------------------------------------------------- the wgmma probe


def wgmma_probe() -> Report:
    """Compile :mod:`.wgmma_probe`'s kernel (known to make ptxas serialise its wgmma) for
    sm_90a through the gate's own path: under a Triton whose ptxas log the gate sees,
    its report carries the warning (``wgmma_serialized``), i.e. a clean sm_90a gate under
    that release really has no serialised wgmma."""
    from . import wgmma_probe as probe
    with recorded_launches() as launches:
        probe.launch_probe()
    launch = launches[0]
    job = specialise(launch, "sm_90a", "bf16", "probe") if _modern_runtime() else \
        _legacy_job(launch, "sm_90a", "bf16", "probe")
    return compile_job(job)


# --------------------------------------------------------------------------- the gate


def unsupported_reason(arch: str, dt: str, op: str) -> str | None:
    """Why ``impl="auto"`` never runs ``op`` (a :data:`DRIVERS` key) in dtype ``dt`` on ``arch``
    under this Triton (None: it does): ``linear.config.triton_unsupported``'s release rules."""
    from ..ops.linear.config import triton_unsupported
    dtype, allow_tf32 = DTYPES[dt]
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        return triton_unsupported(ARCHS[arch], dtype, GUARDED_OP.get(op, op))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def collect_jobs(variants: list[Variant], dtypes: tuple[str, ...], archs: tuple[str, ...],
                 shape: HeadShape = HeadShape(), ops: tuple[str, ...] | None = None,
                 skipped: list | None = None, include_unsupported: bool = False) -> list[Job]:
    """Every distinct specialised launch of the drivers over the given matrix.

    Args:
        variants: launcher option combinations; dtypes: keys of :data:`DTYPES`;
        archs: keys of :data:`ARCHS`; shape: the problem; ops: keys of :data:`DRIVERS`
            (None: all).
        skipped: if given, receives ``dict(arch, dtype, op, why)`` for each cell not compiled
            because ``impl="auto"`` sends it to the PyTorch path under this Triton release
            (:func:`unsupported_reason`); include_unsupported: compile those cells anyway.
    Returns:
        The jobs, one per distinct (kernel, specialisation, options, arch, dtype).
    """
    from ..ops._triton_common import compile_target
    jobs: dict[str, Job] = {}
    seen_skips: set = set()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    gemm_env = os.environ.get("DFT_KERNELS_BACKWARD_GEMM")
    os.environ["DFT_KERNELS_BACKWARD_GEMM"] = "triton"   # the Triton products are compiled, whatever is cached
    try:
        for arch, dt, variant, op in itertools.product(archs, dtypes, variants, ops or tuple(DRIVERS)):
            if dt not in ARCH_LIMITS[arch].triton_dtypes:
                continue   # auto runs the chunked PyTorch path there (linear.config.triton_unsupported)
            why = None if include_unsupported else unsupported_reason(arch, dt, op)
            if why is not None:   # this release cannot compile it: auto never tries (e.g. 3.2 on Blackwell)
                if skipped is not None and (arch, dt, op) not in seen_skips:
                    skipped.append(dict(arch=arch, dtype=dt, op=op, why=why))
                seen_skips.add((arch, dt, op))
                continue
            dtype, allow_tf32 = DTYPES[dt]
            if not variant.accum_fp32 and dtype == torch.float32:
                continue   # fp32 inputs accumulate in fp32 either way
            torch.backends.cuda.matmul.allow_tf32 = allow_tf32
            with compile_target(ARCHS[arch]), recorded_launches() as launches:
                DRIVERS[op](shape, variant, dtype)
            for launch in launches:
                job = specialise(launch, arch, dt, variant.label) if _modern_runtime() else \
                    _legacy_job(launch, arch, dt, variant.label)
                jobs.setdefault(job.key, job)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        if gemm_env is None:
            os.environ.pop("DFT_KERNELS_BACKWARD_GEMM", None)
        else:
            os.environ["DFT_KERNELS_BACKWARD_GEMM"] = gemm_env
    return list(jobs.values())


def run_jobs(jobs: list[Job], workers: int) -> list[Report]:
    """Compile the jobs in ``workers`` processes (progress on stderr)."""
    from tqdm import tqdm
    if workers <= 1 or not _modern_runtime():
        return [compile_job(j) for j in tqdm(jobs, desc="compile", file=sys.stderr)]
    with ProcessPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(compile_job, jobs), total=len(jobs), desc="compile", file=sys.stderr))


def summarise(reports: list[Report]) -> list[dict]:
    """Per kernel x dtype x arch: the worst registers, spills and shared memory, the
    smallest pipeline depth and the tensor-core instructions seen across variants."""
    rows: dict[tuple, dict] = {}
    for r in reports:
        k = (r.kernel, r.dtype, r.arch)
        row = rows.setdefault(k, dict(kernel=r.kernel, dtype=r.dtype, arch=r.arch, compiles=0, regs=0,
                                      spills=0, smem=0, depth=10 ** 6, tensor_cores=set(), i32=0,
                                      failures=0))
        row["compiles"] += 1
        row["failures"] += bool(r.problems)
        row["regs"] = max(row["regs"], r.regs)
        row["spills"] = max(row["spills"], r.spill_bytes)
        row["smem"] = max(row["smem"], r.smem)
        row["depth"] = min(row["depth"], r.depth)
        row["tensor_cores"].add(r.tensor_cores)
        row["i32"] += len(r.i32_products)
    for row in rows.values():
        row["tensor_cores"] = "/".join(sorted(row["tensor_cores"]))
    return [rows[k] for k in sorted(rows)]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2
        self.exit(2, f"compile_check: {message}\n")


def _triton_version() -> str:
    import triton
    return triton.__version__


def write_json(path: str, reports: list[Report], args: list[str] | None = None,
               probe: Report | None = None, skipped: list | None = None) -> None:
    """The reports and their summary as JSON (one Triton release's cell of the matrix);
    ``args``: the gate's arguments (what it covered); ``probe``: the :func:`wgmma_probe`
    report when it ran; ``skipped``: the cells :func:`collect_jobs` left to the PyTorch path."""
    out = dict(triton=_triton_version(), args=args or [],
               reports=[asdict(r) | {"problems": r.problems} for r in reports], summary=summarise(reports),
               skipped=skipped or [])
    if probe is not None:
        out["wgmma_probe"] = asdict(probe)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


def main(argv: list[str] | None = None) -> int:
    """Run the gate. Returns the exit code: 0 pass, 1 a failure, 2 bad arguments."""
    p = _Parser(prog="python -m dft_kernels.tools.compile_check", description=__doc__.splitlines()[0])
    p.add_argument("--all", action="store_true", help="every constexpr combination and TF32 (slow)")
    p.add_argument("--arch", choices=list(ARCHS), action="append", help="only this arch (repeatable)")
    p.add_argument("--dtype", choices=sorted(DTYPES), action="append", help="only this dtype (repeatable)")
    p.add_argument("--op", choices=sorted(DRIVERS), action="append", help="only this op (repeatable)")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compile processes")
    p.add_argument("--json", metavar="FILE", help="also write the reports and the summary as JSON")
    p.add_argument("--include-unsupported", action="store_true",
                   help="also compile the (release, arch, dtype, op) cells impl='auto' runs on PyTorch "
                        "(linear.config.TRITON_UNSUPPORTED; e.g. to see whether a newer release fixed one)")
    p.add_argument("--wgmma-probe", action="store_true",
                   help="also compile a kernel known to serialise wgmma on sm_90a and fail unless the "
                        "'wgmma serialized' rule sees it (proves the rule works under this Triton)")
    p.add_argument("--matrix", nargs="+", metavar=("OUT", "FILE"),
                   help="merge --json files of several Triton releases into the markdown table OUT; compiles nothing")
    a = p.parse_args(argv)
    if a.matrix:
        if len(a.matrix) < 2:
            p.error("--matrix needs OUT and at least one --json FILE")
        write_matrix(a.matrix[0], a.matrix[1:])
        return 0
    if a.jobs < 1:
        p.error(f"--jobs must be >= 1, got {a.jobs}")
    os.environ.pop("TRITON_INTERPRET", None)
    from triton.runtime.jit import JITFunction
    from ..ops.linear import triton as linear_lse_gather  # noqa: F401 - kernels must be JIT functions, not interpreted
    if not isinstance(linear_lse_gather._lse_tile_kernel, JITFunction):
        p.error("the kernels were loaded under TRITON_INTERPRET=1; run in a fresh process without it")
    variants = all_variants() if a.all else [HEAVIEST, COMMON]
    dtypes = tuple(a.dtype or (tuple(DTYPES) if a.all else DEFAULT_DTYPES))
    skipped: list = []
    jobs = collect_jobs(variants, dtypes, tuple(a.arch or ARCHS), ops=tuple(a.op) if a.op else None,
                        skipped=skipped, include_unsupported=a.include_unsupported)
    for s in skipped:
        print(f"skip {s['op']} {s['dtype']} {s['arch']}: {s['why']}", file=sys.stderr)
    reports = run_jobs(jobs, a.jobs)
    cols = ["kernel", "dtype", "arch", "variant", "regs", "spill_bytes", "smem", "depth", "tensor_cores"]
    print(format_table([{**r.__dict__, "variant": r.variant} for r in reports], cols))
    print()
    print(format_table(summarise(reports), ["kernel", "dtype", "arch", "compiles", "regs", "spills", "smem",
                                            "depth", "tensor_cores", "i32", "failures"]))
    probe = wgmma_probe() if a.wgmma_probe else None
    if a.json:
        write_json(a.json, reports, list(sys.argv[1:] if argv is None else argv), probe, skipped)
    bad = [(r, why) for r in reports for why in r.problems]
    if probe is not None:
        if probe.wgmma_serialized:
            print(f"wgmma probe: the rule fires ({probe.wgmma_serialized[0][:120]})", file=sys.stderr)
        else:
            bad.append((probe, "wgmma probe: the 'wgmma serialized' rule did not see ptxas's warning "
                               f"({probe.error or 'no warning in the log'})"))
    for r, why in bad:
        print(f"FAIL {r.kernel} {r.dtype} {r.arch} {r.variant}: {why}", file=sys.stderr)
    print(f"triton {_triton_version()}: {len(reports)} compiles, {len(bad)} failures", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
