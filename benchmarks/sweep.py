"""Time and memory sweep: ``python -m benchmarks.sweep [--shapes PRESET] [options]``.

For every (path, head shape, K, N, method) it measures forward, backward and
forward + backward time (medians) and the peak memory beyond the inputs (see
``benchmarks/measure.py`` for the exact method on GPU and CPU), checks that the
loss of every method agrees with the reference's, and puts each row against the
device's floors (matmul FLOPs at the measured matmul rate, bytes moved at the
measured copy bandwidth). Writes ``<out>/<run>.json``, ``<out>/<run>.md`` and
PNG plots under ``<out>/<run>/``; non-quick runs also update ``<out>/LATEST.md``.

Presets (``--shapes``): gpu, cpu, cpu-small, check-logits, check-fused; the
check-* presets evaluate the two memory / speed targets and say PASS or FAIL.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

import torch

from .analysis import LOSS_RTOL, annotate, evaluate_check
from .cases import DTYPES, HEADS, IGNORE_FRACTION, IGNORE_INDEX, LAM_DISTILL, PATHS, Case
from .methods import ALL_METHODS, METHOD_NOTES, applies, method_status, parse_method
from .presets import PRESETS
from .report import check_console_lines, fmt_row, markdown, update_latest
from .runinfo import git_rev, loadavg, source_hashes, versions
from .runner import Runner, measure_group

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.replace(" ", "").split(",") if x]


def _strs(s: str) -> list[str]:
    return [x for x in s.replace(" ", "").split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", choices=sorted(PRESETS), default=None,
                   help="preset (default: gpu when CUDA is available, else cpu)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the preset's)")
    p.add_argument("--heads", type=_strs, default=None,
                   help=f"comma list of head shapes, from {', '.join(HEADS)}")
    p.add_argument("--n", type=_ints, default=None, help="comma list of N (positions)")
    p.add_argument("--k", type=_ints, default=None, help="comma list of K (teacher slots; 0 = pure CE)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    p.add_argument("--paths", type=_strs, default=None, help="logits,fused")
    p.add_argument("--methods", type=_strs, default=None,
                   help="comma list; ours-logits / ours-fused take an optional :torch / :triton suffix. "
                        f"Known: {', '.join(ALL_METHODS)}")
    p.add_argument("--repeats", type=int, default=None, help="timed iterations (median reported)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None,
                   help="timing processes per case, interleaved across the methods of a shape (CPU); the "
                        "samples are pooled")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds of timed iterations per case before stopping early (min 3 iterations)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--name", default=None, help="run name (default: date_device_preset)")
    p.add_argument("--quick", action="store_true",
                   help="few repeats, small ceiling measurements, torch.compile left out unless named in "
                        "--methods, LATEST.md not updated")
    p.add_argument("--isolation", choices=("auto", "subprocess", "inprocess"), default="auto",
                   help="auto: a fresh process per measurement on CPU (peak RSS), in-process on GPU")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plots", action="store_true")
    return p.parse_args(argv)


def build_cases(args, preset, device: str, dtype: str, versions_: dict) -> tuple[list[Case], list[dict]]:
    """Cases to measure, and rows that are known without measuring (missing / skipped)."""
    heads = args.heads or preset.heads
    for h in heads:
        if h not in HEADS:
            raise SystemExit(f"unknown head {h!r}; known: {', '.join(HEADS)}")
    ns = args.n or preset.n
    ks = args.k or preset.k
    paths = args.paths or preset.paths
    for p_ in paths:
        if p_ not in PATHS:
            raise SystemExit(f"unknown path {p_!r}; known: {', '.join(PATHS)}")
    specs = args.methods or preset.methods
    methods = [parse_method(m) for m in specs]
    explicit = set(args.methods or [])
    repeats = args.repeats or (2 if args.quick else preset.repeats)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else preset.warmup)
    budget = args.time_budget or (5.0 if args.quick else 60.0)
    cases, fixed = [], []
    for path in paths:
        for head in heads:
            D, V = HEADS[head]
            for K in ks:
                for N in ns:
                    for base, impl in methods:
                        if not applies(base, path, K):
                            continue
                        c = Case(path=path, head=head, D=D, V=V, N=N, K=K, dtype=dtype, device=device,
                                 method=base, impl=impl, seed=args.seed, repeats=repeats, warmup=warmup,
                                 time_budget_s=budget)
                        st = method_status(base, versions_["peers"], device)
                        if st is None and base == "compile-chunked" and args.quick and not any(
                                s.startswith("compile-chunked") for s in explicit):
                            st = "skipped: --quick leaves torch.compile (minutes per shape) out unless named in --methods"
                        if st is not None:
                            fixed.append({**c.to_dict(), "label": c.label, "status": st})
                        else:
                            cases.append(c)
    return cases, fixed


def main(argv=None) -> int:
    args = parse_args(argv)
    preset_name = args.shapes or ("gpu" if torch.cuda.is_available() else "cpu")
    preset = PRESETS[preset_name]
    device = args.device or preset.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"preset {preset_name!r} / --device {device} needs CUDA, which this machine does not have; "
              "use --shapes cpu or cpu-small (or --device cpu to run these shapes on the CPU)", file=sys.stderr)
        return 2
    dtype = args.dtype or preset.dtype
    isolation = args.isolation
    if isolation == "auto":
        isolation = "subprocess" if torch.device(device).type == "cpu" else "inprocess"

    from .measure import MEMORY_METHOD, TIMING_METHOD, combine_ceilings, device_info, measure_ceilings
    vers = versions()
    dinfo = device_info(device)
    now = _dt.datetime.now(_dt.timezone.utc)
    dev_tag = "cpu" if dinfo["type"] == "cpu" else re.sub(r"[^A-Za-z0-9]+", "-", dinfo["name"]).strip("-").lower()
    run = args.name or f"{now:%Y%m%d-%H%M%S}_{dev_tag}_{preset_name}" + ("_quick" if args.quick else "")
    command = "python -m benchmarks.sweep" + ("" if not (argv if argv is not None else sys.argv[1:]) else
                                              " " + shlex.join(argv if argv is not None else sys.argv[1:]))
    print(f"[sweep] {run}: {command}")
    print(f"[sweep] device {dinfo['name']} ({device}), dtype {dtype}, isolation {isolation}")
    print("[sweep] peers: " + "; ".join(f"{k}: {v}" for k, v in vers["peers"].items()))

    cases, fixed = build_cases(args, preset, device, dtype, vers)
    t0 = time.perf_counter()
    ceil = measure_ceilings(device, dtype, quick=args.quick)
    print(f"[sweep] ceilings: {ceil['matmul_tflops'] * 1e3:.1f} GFLOP/s {ceil['matmul_dtype']} matmul, "
          f"{ceil['copy_gbps']:.1f} GB/s copy")

    uses_dynamo = any(c.method in ("torch-lce", "compile-chunked") for c in cases)
    runner = Runner(isolation, args.timeout, preload=("torch._dynamo",) if uses_dynamo else ())
    rounds = args.rounds or (1 if args.quick else preset.rounds)
    rows = list(fixed)
    for r in fixed:
        print("[sweep] " + fmt_row(r))

    def report(c, res):
        row = {**c.to_dict(), "label": c.label, **res}
        rows.append(row)
        print("[sweep] " + fmt_row(row), flush=True)

    load0 = loadavg()
    groups: dict = {}
    for c in cases:
        groups.setdefault((c.path, c.head, c.K, c.N), []).append(c)
    for grp in groups.values():
        measure_group(runner, grp, rounds, report)
    load1 = loadavg()
    # the ceilings again at the end: on a shared machine the best of the two is the device's
    ceil_end = measure_ceilings(device, dtype, quick=args.quick)
    ceil = combine_ceilings(ceil, ceil_end)
    print(f"[sweep] ceilings at the end: {ceil_end['matmul_tflops'] * 1e3:.1f} GFLOP/s, "
          f"{ceil_end['copy_gbps']:.1f} GB/s; using the larger")
    annotate(rows, ceil)
    order = {m: i for i, m in enumerate(ALL_METHODS)}
    rows.sort(key=lambda r: (PATHS.index(r["path"]), r["head"], r["K"], r["N"], order[r["method"]],
                             r["label"]))

    checks = [evaluate_check(preset.check, rows)] if preset.check else []
    for ch in checks:
        for line in check_console_lines(ch):
            print("[sweep] " + line)

    bad = [r for r in rows if r.get("agree") is False]
    data = {
        "schema": 1,
        "run": run,
        "date": now.isoformat(),
        "command": command,
        "argv": list(argv if argv is not None else sys.argv[1:]),
        "preset": preset_name,
        "preset_doc": preset.doc,
        "quick": bool(args.quick),
        "device": dinfo,
        "versions": vers,
        "git_rev": git_rev(Path(__file__).resolve().parent.parent),
        "source_sha256": source_hashes(),
        "env": {k: os.environ[k] for k in ("DFT_KERNELS_IMPL", "TRITON_INTERPRET", "OMP_NUM_THREADS")
                if k in os.environ},
        "ceilings": ceil,
        "load_average": {"start": load0, "end": load1,
                         "note": "1/5/15-minute load averages; above the core count, other work shared the "
                                 "machine and times are less reliable"},
        "timing_rounds": rounds,
        "isolation": isolation + (f" ({runner.start_method})" if isolation == "subprocess" else ""),
        "memory_method": MEMORY_METHOD[dinfo["type"]],
        "timing_method": TIMING_METHOD[dinfo["type"]],
        "loss": {"divergence": "forward_kl", "tail": "bucket", "accuracy": "ce",
                 "lam": f"{LAM_DISTILL} for K > 0; K = 0 is pure CE (lam = 1)",
                 "ignore_index": IGNORE_INDEX, "ignored_fraction": IGNORE_FRACTION,
                 "reduction": "mean"},
        "methods": {m: METHOD_NOTES[m] for m in ALL_METHODS},
        "loss_rtol": LOSS_RTOL,
        "all_losses_agree": not bad,
        "checks": checks,
        "rows": rows,
        "elapsed_s": time.perf_counter() - t0,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{run}.json"
    json_path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    pngs = []
    if not args.no_plots:
        from .plot import plot_run
        pngs = plot_run(data, out / run)
        data["plots"] = [str(p.relative_to(out)) for p in pngs]
        json_path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    md_path = out / f"{run}.md"
    md_path.write_text(markdown(data))
    if not args.quick:
        update_latest(out, data, md_path)
    print(f"[sweep] wrote {json_path}, {md_path}" + (f" and {len(pngs)} plots under {out / run}" if pngs else ""))
    if bad:
        print("[sweep] LOSS MISMATCH: " + ", ".join(f"{r['label']} N={r['N']} K={r['K']} "
                                                   f"rel {r['loss_rel_diff']:.3g}" for r in bad), file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
