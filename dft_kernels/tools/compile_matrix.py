"""The Triton-release matrix of the compile gate (docs/design.md sec. 16): merges the
``--json`` files of :mod:`dft_kernels.tools.compile_check` run under several Triton releases
(one per release and architecture, tools/compile_matrix.sh) into one markdown table,
release x architecture x dtype, the kernels pooled.

    python -m dft_kernels.tools.compile_check --matrix OUT FILE...
"""
from __future__ import annotations

import json

from ..ops.linear.config import ARCHS

def format_table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table of ``rows`` restricted to ``columns``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


MATRIX_COLUMNS = ["triton", "arch", "dtype", "kernels", "compiles", "failures", "spills", "max_regs", "max_smem",
                  "i32", "tensor_cores"]


def _rule_text(why: str) -> str:
    """A ``triton_unsupported`` reason without its cell prefix and the path suffix."""
    if "under Triton " in why and ": " in why.split("under Triton ", 1)[1]:
        why = why.split("under Triton ", 1)[1].split(": ", 1)[1]
    return why.split("; auto uses")[0]


def matrix_rows(results: list[dict]) -> list[dict]:
    """Per Triton release x arch x dtype (the kernels pooled): compiles, failures, the
    worst spills / registers / shared memory, i32 products and the tensor-core
    instructions seen; a release whose gate did not run is one row with its error."""
    rows = []
    for res in results:
        if not res.get("summary") and "error" not in res:
            whys = sorted({_rule_text(s["why"]) for s in res.get("skipped", [])})
            archs = sorted({s["arch"] for s in res.get("skipped", [])}, key=lambda a: list(ARCHS).index(a))
            for arch in archs:    # every cell asked goes to the PyTorch path under this release
                rows.append(dict(triton=res.get("triton", "?"), arch=arch, dtype="-", kernels=0, compiles=0,
                                 failures="-", spills="-", max_regs="-", max_smem="-", i32="-",
                                 tensor_cores=f"not compiled, auto runs PyTorch: {'; '.join(whys)[:200]}"))
            continue    # else nothing to compile: the dtypes asked are not Triton's on that arch (sm_75: fp32 only)
        if not res.get("summary"):
            err = (res.get("error") or "no result").strip().splitlines()
            rows.append(dict(triton=res.get("triton", "?"), arch=res.get("arch", "-"), dtype="-", kernels=0,
                             compiles=0, failures="-",
                             spills="-", max_regs="-", max_smem="-", i32="-",
                             tensor_cores=f"gate did not run: {err[-1][:120] if err else ''}"))
            continue
        cells: dict[tuple, list[dict]] = {}
        for row in res["summary"]:
            cells.setdefault((row["arch"], row["dtype"]), []).append(row)
        order = {a: i for i, a in enumerate(ARCHS)}
        for (arch, dtype), group in sorted(cells.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1])):
            tcs = sorted({t for g in group for t in g["tensor_cores"].split("/")} - {"-"})
            rows.append(dict(triton=res["triton"], arch=arch, dtype=dtype, kernels=len(group),
                             compiles=sum(g["compiles"] for g in group),
                             failures=sum(g["failures"] for g in group),
                             spills=max(g["spills"] for g in group), max_regs=max(g["regs"] for g in group),
                             max_smem=max(g["smem"] for g in group), i32=sum(g.get("i32", 0) for g in group),
                             tensor_cores="/".join(tcs) or "-"))
    return rows


def _coverage(args: list[str]) -> str:
    """The gate arguments that say what was compiled (not --arch, --jobs, --json, --wgmma-probe)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in ("--arch", "--jobs", "--json"):
            skip = True
        elif a != "--wgmma-probe" and not a.startswith(("--arch=", "--jobs=", "--json=")):
            out.append(a)
    return " ".join(out)


def write_matrix(out: str, paths: list[str]) -> None:
    """Merge the ``--json`` files of several Triton releases into one markdown table."""
    results, interp = [], []
    for path in paths:
        with open(path) as f:
            res = json.load(f)
        (interp if "interpreter_tests" in res else results).append(res)
    text = ["# Compile gate x Triton release", "",
            "`tools/compile_matrix.sh`: `python -m dft_kernels.tools.compile_check` under each Triton release; per "
            "release x architecture x dtype the kernels pooled: compiles, failing compiles (spill, shared memory, "
            "missing tensor cores, i32 index*stride product, tl.dot pattern, compile error), worst spill bytes, "
            "registers and shared memory, i32 products found, tensor-core instructions in the PTX.", "",
            format_table(matrix_rows(results), MATRIX_COLUMNS), ""]
    runs = sorted({(r.get("triton", "?"), _coverage(r.get("args", []))) for r in results if r.get("summary")})
    text += ["Gate arguments per release (beyond one `--arch` per run; none: the default set, every op, "
             "bf16 / fp16 / fp32, the heaviest and the most common option combination):", ""]
    text += [f"- {v}: `{a or '(default)'}`" for v, a in runs] + [""]
    skips = sorted({(r.get("triton", "?"), s["arch"], s["dtype"], s["op"], _rule_text(s["why"])) for r in results
                    for s in r.get("skipped", []) if r.get("summary")})
    if skips:
        text += ["Cells not compiled because `impl=\"auto\"` runs them on the PyTorch path under that release "
                 "(`linear.config.TRITON_UNSUPPORTED`):", ""]
        text += [f"- {v} {a} {d} `{o}`: {w}" for v, a, d, o, w in skips] + [""]
    probes = {}
    for r in results:
        p = r.get("wgmma_probe")
        if p is not None:
            probes[r.get("triton", "?")] = ("fires" if p.get("wgmma_serialized") else
                                            f"does NOT fire ({p.get('error') or 'no warning in the log'})")
    if probes:
        text += ["\"wgmma serialized\" rule on a kernel known to serialise on sm_90a (`--wgmma-probe`): "
                 + "; ".join(f"{v}: {probes[v]}" for v in sorted(probes)), ""]
    if interp:
        text += ["Interpreter tests under each release (`TRITON_INTERPRET=1`, the same kernels run on the CPU; "
                 "pytest's summary line):", ""]
        text += [f"- {r['triton']}: `{r['interpreter_tests']}`: {r['summary']}" + ("" if r["rc"] == 0 else
                                                                                   f" (exit {r['rc']})")
                 for r in sorted(interp, key=lambda r: r["triton"])] + [""]
    with open(out, "w") as f:
        f.write("\n".join(text))
