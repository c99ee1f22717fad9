"""What the compile gate (tools/compile_check.py) reads from a compiled kernel: registers and
spills from ptxas ``-v``, the operand pipeline depth, the i32 index * stride rule and the
``tl.dot`` patterns Triton / ptxas mishandle (docs/design.md sec. 13, 16). Text in, findings
out: no Triton import at module level."""
from __future__ import annotations

import re

_SSA_DEF = re.compile(r"^\s*(%[\w.$-]+)(?::\d+)?\s*=\s*([\w.]+)(.*)$")
_SSA_NAME = re.compile(r"%[\w.$-]+")
_INT_ARG = re.compile(r"(%[\w.$-]+)\s*:\s*i(?:32|64)\b")
_FOR_IV = re.compile(r"scf\.for\s+(%[\w.$-]+)\s*=")
_FOR_ARGS = re.compile(r"(%[\w.$-]+)\s*=\s*(%[\w.$-]+)")
_I32 = re.compile(r"^(?:i32|tensor<[\dx]*i32\b)")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
# a multi-buffered shared allocation: !ttg.memdesc<STAGESxROWSxCOLSx...>
_BUFFERED_ALLOC = re.compile(r"(?:ttg|triton_gpu)\.local_alloc\s*(?::\s*\(\)\s*->|\{[^}]*\}\s*:\s*\(\)\s*->)"
                             r"\s*!(?:ttg|tt|triton_gpu)\.memdesc<(\d+)x\d+x\d+x")


def pipeline_depth(ttgir: str) -> int:
    """Operand buffers of the main loop: the leading dimension of the multi-buffered
    shared allocations Triton's pipeliner makes (1 when nothing is multi-buffered)."""
    depths = [int(m) for m in _BUFFERED_ALLOC.findall(ttgir)]
    return min(depths) if depths else 1


#: ops whose result is a runtime index (not bounded by a block size)
_INDEX_SOURCES = ("tt.get_program_id", "tt.get_num_programs", "tt.load", "tt.atomic_rmw", "tt.atomic_cas")


_POS_ARG = re.compile(r"%arg(\d+)\b")


def name_arguments(ttgir: str, names: list[str]) -> str:
    """Older Triton releases print kernel arguments as ``%arg0, %arg1, ...``: rename them to
    the kernel's (non-constexpr) parameter ``names`` when the counts agree, so that the
    rules below can see which argument is a stride. Unchanged otherwise."""
    header = next((ln for ln in ttgir.splitlines() if "tt.func" in ln), "")
    n_args = len(set(_POS_ARG.findall(header)))
    if not n_args or n_args != len(names):
        return ttgir
    return _POS_ARG.sub(lambda m: f"%{names[int(m.group(1))]}" if int(m.group(1)) < len(names) else m.group(0), ttgir)


def i32_stride_products(ttgir: str) -> list[str]:
    """The ``arith.muli`` on i32 (scalar or tensor) of a stride with a runtime index: one
    operand derived from a kernel argument named ``stride*``, the other from a program
    id, a loop counter, another integer argument (N, V, a row start...) or a loaded
    value, through any chain of ops (splat, broadcast, sums, loop-carried values). Such
    an offset wraps once it passes 2**31 elements (docs/design.md sec. 14); cast the
    index to int64 first. In-tile offsets (``tl.arange(0, BLOCK) * stride``, a block
    size times a stride) are bounded by the launchers' ``BLOCK * stride < 2**31`` check
    and pass, as does every product formed in i64.

    Returns:
        The offending TTGIR lines, stripped of their locations (empty when clean).
    """
    strides: set[str] = set()
    index: set[str] = set()
    header = "\n".join(ln for ln in ttgir.splitlines() if "tt.func" in ln)   # the kernel's arguments
    for name in _INT_ARG.findall(header):
        (strides if name[1:].startswith("stride") else index).add(name)
    found = []
    for raw in ttgir.splitlines():
        line = raw.split(" loc(")[0].strip()
        if "scf.for " in line:
            index.update(_FOR_IV.findall(line))     # the induction variable is a runtime index
            for lhs, rhs in _FOR_ARGS.findall(line.split("iter_args", 1)[1] if "iter_args" in line else ""):
                if rhs in strides:
                    strides.add(lhs)
                if rhs in index:
                    index.add(lhs)
        m = _SSA_DEF.match(line)
        if not m:
            continue
        name, op, rest = m.groups()
        operands, sep, typ = rest.rpartition(" : ")
        if not sep:
            operands, typ = rest, ""
        used = _SSA_NAME.findall(operands)
        if op == "arith.muli" and len(used) == 2 and _I32.match(typ.strip()):
            a, b = used
            if (a in strides and b in index) or (b in strides and a in index):
                found.append(line)
        if op in _INDEX_SOURCES or any(u in index for u in used):
            index.add(name)
        if any(u in strides for u in used):
            strides.add(name)
    return found


_DOT_OPS = ("tt.dot", "tt.dot_scaled")


def dot_patterns(ttir: str) -> list[str]:
    """The ``tl.dot`` shapes that Triton / ptxas have miscompiled or de-pipelined here,
    found in the TTIR (before layouts):

    - ``chained dots``: a dot accumulating directly into another dot's result (two
      ``tl.dot`` into one accumulator in one loop body);
    - ``nested dot``: a dot whose A or B operand is computed from another dot's result;
    - ``data-dependent if``: an ``scf.if`` / ``cf.cond_br`` whose condition comes from a
      loaded value in a kernel with a dot (an early exit or a branch around the epilogue).

    Returns:
        One line per finding (empty when clean).
    """
    dots: set[str] = set()
    from_dot: set[str] = set()
    loaded: set[str] = set()
    has_dot = any(f" {op} " in ttir for op in _DOT_OPS)
    found = []
    for raw in ttir.splitlines():
        line = raw.split(" loc(")[0].strip()
        if line.startswith(("scf.if ", "cf.cond_br ")) and has_dot:
            cond = _SSA_NAME.findall(line)
            if cond and cond[0] in loaded:
                found.append(f"data-dependent if: {line}")
        m = _SSA_DEF.match(line)
        if not m:
            continue
        name, op, rest = m.groups()
        used = _SSA_NAME.findall(rest.rpartition(" : ")[0] or rest)
        if op in _DOT_OPS and len(used) >= 3:
            a, b, acc = used[:3]
            if acc in dots:
                found.append(f"chained dots: {line}")
            if a in from_dot or b in from_dot:
                found.append(f"nested dot: {line}")
            dots.add(name)
            from_dot.add(name)
        elif any(u in from_dot for u in used):
            from_dot.add(name)
        if op == "tt.load" or any(u in loaded for u in used):
            loaded.add(name)
    return found


def serialized_wgmma(ptxas_log: str) -> tuple[str, ...]:
    """ptxas's "wgmma.mma_async instructions are serialized" performance warnings in its
    log (a slow path on Hopper: the warpgroup MMAs no longer overlap), one line each."""
    lines = {line.strip()[:200] for line in ptxas_log.splitlines()
             if "wgmma" in line.lower() and "serializ" in line.lower()}
    return tuple(sorted(lines))


def ptxas_usage(ptx: str, cc: int) -> tuple[int, int, str, str]:
    """Registers and spill bytes from the ptxas Triton ships (ptxas-blackwell from sm_90 on,
    where present), run on ``ptx`` for compute capability ``cc`` (e.g. 90); its error text
    ("" on success) and its whole log."""
    import subprocess
    import tempfile
    from pathlib import Path

    import triton
    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptxas = bindir / ("ptxas-blackwell" if cc >= 90 and (bindir / "ptxas-blackwell").exists() else "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([str(ptxas), "-v", f"--gpu-name=sm_{cc}{'a' if cc >= 90 else ''}", str(src),
                              "-o", str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
    text = out.stdout + out.stderr
    if out.returncode:
        return -1, -1, text.strip().splitlines()[-1][:200] if text.strip() else f"ptxas exit {out.returncode}", text
    regs = max((int(r) for r in _PTXAS_REGS.findall(text)), default=-1)
    spills = max((int(a) + int(b) for a, b in _PTXAS_SPILL.findall(text)), default=-1)
    return regs, spills, "", text
