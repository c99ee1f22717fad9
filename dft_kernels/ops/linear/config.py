"""Launch configuration of the fused linear path (ops/linear/triton.py): the one
function that chooses every block size, warp count, stage count and the backward
product backend, per compute capability and dtype. The launchers and the compile
gate (tools/compile_check.py) both call it.

It also holds what every op's config shares: the architectures the compile gate
covers with their limits (:data:`ARCHS`), the register-cap rule
(:func:`register_cap`) and which (architecture, dtype) cells the Triton path serves
under ``impl="auto"`` (:func:`triton_unsupported`; docs/design.md sec. 16)."""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, replace

import torch
import triton

from .backward import check_backward_gemm, default_backward_gemm


@dataclass(frozen=True)
class Arch:
    """One GPU architecture as the compile gate sees it."""
    name: str
    capability: tuple[int, int]
    #: the largest shared memory one block may use (bytes, the opt-in limit)
    smem_per_block: int
    #: tensor-core instruction Triton emits for ``tl.dot`` here ("" for none)
    tensor_core: str
    #: input dtypes ("bf16", "fp16", "tf32") whose ``tl.dot`` runs on tensor cores
    tensor_core_dtypes: frozenset
    #: input dtypes the Triton path serves here (the gate's dtypes; others: chunked PyTorch)
    triton_dtypes: tuple
    cards: str = ""


_ALL = ("bf16", "fp16", "fp32", "tf32")
_TC = frozenset({"bf16", "fp16", "tf32"})
#: Every architecture the ptxas bundled with Triton targets (ptxas for sm_75-89,
#: ptxas-blackwell from sm_90 on); Triton appends the "a" of sm_90a / sm_100a / sm_120a.
#: Turing (sm_75): Triton >= 3.3 lowers ``tl.dot`` there without tensor cores (FMA) and
#: Turing has no bf16 tensor cores at all, so ``impl="auto"`` runs 16-bit inputs on the
#: chunked PyTorch path (cuBLAS: fp16 tensor cores) and only fp32 on Triton.
ARCHS: dict[str, Arch] = {a.name: a for a in (
    Arch("sm_75", (7, 5), 65536, "", frozenset(), ("fp32",), "T4, RTX 20xx"),
    Arch("sm_80", (8, 0), 166912, "mma.sync", _TC, _ALL, "A100, A30"),
    Arch("sm_86", (8, 6), 101376, "mma.sync", _TC, _ALL, "A10, A40, RTX 30xx, RTX A6000"),
    Arch("sm_89", (8, 9), 101376, "mma.sync", _TC, _ALL, "L4, L40S, RTX 40xx"),
    Arch("sm_90a", (9, 0), 232448, "wgmma", _TC, _ALL, "H100, H200, GH200"),
    Arch("sm_100a", (10, 0), 232448, "tcgen05", _TC, _ALL, "B200, GB200"),
    Arch("sm_120a", (12, 0), 101376, "mma.sync", _TC, _ALL, "RTX 50xx, RTX PRO 6000 Blackwell"),
)}


def arch_for(capability: tuple[int, int]) -> Arch:
    """The :data:`ARCHS` entry a device of ``capability`` runs (the nearest one at or
    below it within the same major version; e.g. (8, 7) -> sm_86, (10, 3) -> sm_100a)."""
    same = [a for a in ARCHS.values() if a.capability[0] == capability[0] and a.capability <= tuple(capability)]
    below = [a for a in ARCHS.values() if a.capability <= tuple(capability)]
    pool = same or below or [ARCHS["sm_75"]]
    return max(pool, key=lambda a: a.capability)


def dtype_label(dtype: torch.dtype) -> str:
    """"bf16" / "fp16" / "fp32" / "tf32" (fp32 with TF32 matmuls allowed)."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype).removeprefix("torch."))


def triton_version(version: str | None = None) -> tuple[int, int]:
    """(major, minor) of ``version`` (None: the installed ``triton.__version__``, read at
    each call); (0, 0) when it does not parse."""
    text = triton.__version__ if version is None else version
    nums = []
    for part in str(text).split(".")[:2]:
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        nums.append(int(digits))
    return tuple(nums) if len(nums) == 2 else (0, 0)


@dataclass(frozen=True)
class ReleaseRule:
    """One cell of the Triton release x architecture x dtype x kernel (or op) matrix where
    the one config does not serve (docs/design.md sec. 16, benchmarks/results/compile_matrix.md)."""
    #: Triton releases, (major, minor), both ends included
    first: tuple[int, int]
    last: tuple[int, int]
    #: architecture names of :data:`ARCHS`
    archs: tuple
    #: dtype labels ("bf16", "fp16", "fp32", "tf32")
    dtypes: tuple
    #: the kernel (config overrides) or op (``TRITON_UNSUPPORTED``; "*": every op)
    target: str
    #: the measurement behind it
    why: str
    #: TileConfig / TopkConfig fields to override (config rules only)
    override: tuple = ()

    def matches(self, version: tuple[int, int], capability: tuple[int, int], label: str, target: str) -> bool:
        return (self.first <= version <= self.last and arch_for(capability).name in self.archs
                and label in self.dtypes and self.target in ("*", target))


_16BIT = ("bf16", "fp16")
_BLACKWELL = ("sm_100a", "sm_120a")

#: Per-release config overrides: the Triton 3.9 config everywhere else (the gate under each
#: release: tools/compile_matrix.sh). Keep it a short table.
RELEASE_CONFIG: tuple[ReleaseRule, ...] = (
    # Triton 3.6.0: left to itself ptxas aims the forward tile's most common variant at 128
    # registers and spills 24 B on sm_80 / sm_86 / sm_89 (bf16, fp16, tf32: the mma.sync
    # tiles; fp32 on FMA fits in 220); the cap of 255 (the dz tile's) fits it in 163 (214 in
    # the heaviest) without a spill. 3.2 and 3.9 do not spill without it; 3.3-3.5, 3.7 and
    # 3.8 were not compiled (the cap is applied there too).
    ReleaseRule((3, 3), (3, 8), ("sm_80", "sm_86", "sm_89"), ("bf16", "fp16", "tf32"), "_lse_tile_kernel",
                "Triton 3.6.0: 24 B spill at 128 registers", (("maxnreg", 255),)),
    # Triton 3.2.0 on Hopper: the fp32 dz tile (64 x 128, no cap) spills 32 B in its
    # heaviest variant at 255 registers (the cap of 255 still spills 24 B); a 64 x 64 tile
    # needs 128 without a spill. TF32 (wgmma), 3.6 and 3.9 fit 64 x 128.
    ReleaseRule((3, 2), (3, 2), ("sm_90a",), ("fp32",), "_dz_tile_kernel",
                "Triton 3.2.0: 32 B spill at 255 registers", (("BLOCK_V", 64),)),
    # Triton 3.2.0 on sm_86 / sm_89 (not sm_80): the fp32 two-head tiles (64 x 128, two
    # logits tiles live, cap 255) spill in their heaviest variant, 8 B in the stats pass and
    # 32 B in the dz tile; 64 x 64 tiles do not. 3.6 and 3.9 fit 64 x 128.
    ReleaseRule((3, 2), (3, 2), ("sm_86", "sm_89"), ("fp32",), "_two_head_stats_kernel",
                "Triton 3.2.0: 8 B spill at 255 registers", (("BLOCK_V", 64),)),
    ReleaseRule((3, 2), (3, 2), ("sm_86", "sm_89"), ("fp32",), "_two_head_dz_kernel",
                "Triton 3.2.0: 32 B spill at 255 registers", (("BLOCK_V", 64),)),
    # Triton 3.4.0 on Hopper: the fp32 two-head dz tile (64 x 128, no cap on Hopper) spills
    # 8 B in its most common variant; 64 x 64 does not. 3.2, 3.6, 3.8 and 3.9 fit 64 x 128;
    # 3.3 and 3.5 were not compiled (the smaller tile is applied there too).
    ReleaseRule((3, 3), (3, 5), ("sm_90a",), ("fp32",), "_two_head_dz_kernel",
                "Triton 3.4.0: 8 B spill", (("BLOCK_V", 64),)),
)

#: (release, architecture, dtype, op) cells ``impl="auto"`` sends to the chunked PyTorch path
#: before compiling anything (:func:`triton_unsupported`).
TRITON_UNSUPPORTED: tuple[ReleaseRule, ...] = (
    ReleaseRule((0, 0), (3, 2), _BLACKWELL, _ALL, "*",
                "Triton before 3.3 cannot target Blackwell (3.2.0 aborts in AccelerateMatmul: "
                "'computeCapability not supported')"),
    # every launch config tried that keeps tcgen05 fails (BLOCK_N 64 / 128, BLOCK_V 64-256,
    # BLOCK_D 32 / 64, 4 or 8 warps, 2 or 4 stages, cap 255); fp32 on FMA compiles; 3.9 does
    # not have the bug; 3.7 / 3.8 were not compiled
    ReleaseRule((3, 6), (3, 6), ("sm_100a",), ("bf16", "fp16", "tf32"), "teacher_topk",
                "Triton 3.6 fails to compile the tensor-core (16-bit, TF32) teacher top-k kernel for sm_100a "
                "(PassManager::run failed in TritonNvidiaGPUOptimizeTMemLayoutsPass, a Triton bug)"),
)


def release_overrides(kernel: str, capability: tuple[int, int] | None, dtype: torch.dtype,
                      version: str | None = None) -> dict:
    """The :data:`RELEASE_CONFIG` fields for ``kernel`` on ``capability`` and ``dtype`` under
    Triton ``version`` (None: the installed one); {} for the interpreter (no capability)."""
    if capability is None:
        return {}
    v, label = triton_version(version), dtype_label(dtype)
    out: dict = {}
    for rule in RELEASE_CONFIG:
        if rule.matches(v, capability, label, kernel):
            out.update(rule.override)
    return out


def with_release_overrides(config, capability: tuple[int, int] | None, dtype: torch.dtype, *kernels: str):
    """``config`` (a frozen dataclass: TileConfig, TopkConfig...) with the
    :data:`RELEASE_CONFIG` fields of ``kernels`` (the kernels it launches) applied."""
    over: dict = {}
    for kernel in kernels:
        over.update(release_overrides(kernel, capability, dtype))
    return replace(config, **over) if over else config


def triton_unsupported(capability: tuple[int, int] | None, dtype: torch.dtype, op: str | None = None,
                       version: str | None = None) -> str | None:
    """Why ``impl="auto"`` does not run the Triton kernels for ``dtype`` on a device of
    ``capability`` (None: it does): a dtype the architecture serves on the chunked path, or a
    (Triton release, architecture, dtype, op) cell of :data:`TRITON_UNSUPPORTED` (``op``:
    the op's name in ``fallback.guarded``, None: only the rules for every op; ``version``:
    None for the installed Triton). The reason names the architecture and the path."""
    if capability is None:
        return None
    arch = arch_for(capability)
    label = "fp32" if dtype == torch.float32 else dtype_label(dtype)
    if label not in arch.triton_dtypes:
        return (f"{label} on {arch.name}: Triton has no tensor-core tl.dot for it there, so auto uses the "
                "chunked PyTorch path (cuBLAS)")
    v = triton_version(version)
    labels = {label, dtype_label(dtype)}     # fp32 rules also hold for TF32 and the reverse
    for rule in TRITON_UNSUPPORTED:
        if any(rule.matches(v, capability, lab, op or "*") for lab in labels):
            what = "" if rule.target == "*" else f" ({rule.target})"
            return (f"{dtype_label(dtype)}{what} on {arch.name} under Triton {'.'.join(map(str, v))}: {rule.why}; "
                    "auto uses the chunked PyTorch path")
    return None


def register_cap(capability: tuple[int, int]) -> int | None:
    """ptxas's register cap per thread for the 8-warp logits-tile kernels (the fused dz
    tile, the two-head tiles): 255 (the most at 8 warps) everywhere but Hopper, None
    (ptxas's own choice) on Hopper.

    Left to itself ptxas aims some variants at 128 registers (two programs per SM) and
    spills: sm_80 16-32 bytes, sm_120a tf32 ``_dz_tile_kernel`` 8 bytes, sm_100a tf32
    ``_teacher_topk_kernel`` 16 bytes; with the cap they allocate freely and fit without a
    spill. On sm_90a the cap itself makes the dz tile spill (64 bytes in the four fp32
    variants with a bias), so Hopper is the one without it. Every config function of a
    logits-tile kernel (fused, two-head, teacher top-k) takes its cap from here."""
    return None if capability[0] == 9 else 255


def _stages(capability: tuple[int, int], stage_bytes: int) -> int:
    """Operand pipeline depth: 4, fewer when 4 stages would not fit the block's shared
    memory with room for the epilogue's layout conversions (a third of the budget)."""
    budget = arch_for(capability).smem_per_block * 2 // 3
    return max(2, min(4, budget // max(stage_bytes, 1)))


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
    #: backend of the two backward products: "triton" (ops/linear/gemm.py) or "torch"
    #: (torch.mm / addmm, cuBLAS on a GPU); see ops/linear/backward.py
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
    products = check_backward_gemm(backward_gemm or _measured_backward_gemm(capability) or default_backward_gemm())
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
    # on both architectures (`python -m dft_kernels.tools.compile_check --all`). Left to
    # itself, ptxas aims some of its variants at 128 registers (two programs per SM) and
    # spills 16-32 bytes on sm_80; there the explicit cap of 255 (the limit at 8 warps)
    # makes it allocate freely, and those variants fit in 123 without a spill. On
    # sm_90a the same cap makes three fp32 variants spill (64 bytes), so it is every
    # architecture's but Hopper's (:func:`register_cap`; sm_100a and sm_120a spill without it).
    # Consumer cards (sm_86, sm_89, sm_120: ~100 KB per block) keep 4 stages of 16 KiB;
    # sm_75 (64 KiB) gets fewer (:func:`_stages`).
    bd = 16 if dtype == torch.float32 else 32
    stages = _stages(capability, 2 * 128 * bd * dtype.itemsize)
    # A few (Triton release, arch, dtype) cells differ (:data:`RELEASE_CONFIG`).
    tile = TileConfig(BLOCK_N=128, BLOCK_V=128, BLOCK_D=bd, GROUP=8, num_warps=8, num_stages=stages)
    dz = TileConfig(BLOCK_N=64, BLOCK_V=128, BLOCK_D=bd, GROUP=8, num_warps=8, num_stages=stages,
                    maxnreg=register_cap(capability))
    return FusedConfig(
        fwd=with_release_overrides(tile, capability, dtype, "_lse_tile_kernel"),
        dz=with_release_overrides(dz, capability, dtype, "_dz_tile_kernel"),
        gemm=GemmConfig(BLOCK_M=128, BLOCK_N=128, BLOCK_K=bd, GROUP=8, num_warps=8, num_stages=stages),
        gather=RowConfig(BLOCK_M=bm(16), BLOCK_D=256, num_warps=4),
        fix=RowConfig(BLOCK_M=bm(256), BLOCK_D=0, num_warps=4),
        backward_gemm=products,
    )


def _measured_backward_gemm(capability: tuple[int, int] | None) -> str | None:
    """The backward-product backend ``dft-kernels doctor --save`` measured fastest on this
    device (None: not measured, or ``DFT_KERNELS_BACKWARD_GEMM`` is set and wins)."""
    if capability is None or os.environ.get("DFT_KERNELS_BACKWARD_GEMM"):
        return None
    from ...doctor.cache import cached_choice
    return cached_choice("backward_gemm")
