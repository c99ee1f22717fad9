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
import multiprocessing as mp
import os
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from . import common
from .common import PRESETS, Case, applies, floors, method_status, parse_method, peer_versions

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
#: relative loss difference allowed against the reference, by dtype
LOSS_RTOL = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 5e-3}


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
                   help=f"comma list of head shapes, from {', '.join(common.HEADS)}")
    p.add_argument("--n", type=_ints, default=None, help="comma list of N (positions)")
    p.add_argument("--k", type=_ints, default=None, help="comma list of K (teacher slots; 0 = pure CE)")
    p.add_argument("--dtype", choices=sorted(common.DTYPES), default=None)
    p.add_argument("--paths", type=_strs, default=None, help="logits,fused")
    p.add_argument("--methods", type=_strs, default=None,
                   help="comma list; ours-logits / ours-fused take an optional :torch / :triton suffix. "
                        f"Known: {', '.join(common.ALL_METHODS)}")
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


# --------------------------------------------------------------------------- running


class Runner:
    """Runs measurements in fresh processes (CPU) or in this process (GPU)."""

    def __init__(self, isolation: str, timeout: float, preload: tuple = ()):
        self.isolation = isolation
        self.timeout = timeout
        self.ctx = None
        if isolation == "subprocess":
            method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
            self.ctx = mp.get_context(method)
            if method == "forkserver":
                # the server imports torch once; each measurement is a fork of it: a fresh
                # process (fresh heap, no earlier measurement in it) that starts in milliseconds
                # (torch._dynamo too when a method imports it on first use: ~3 s per process otherwise)
                self.ctx.set_forkserver_preload(["torch", "dft_kernels", "benchmarks.measure", *preload])
            self.start_method = method

    def run(self, case: Case, mode: str) -> dict:
        from .measure import child_main, run_case
        if self.ctx is None:
            return run_case(case, mode)
        rx, tx = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=child_main, args=(case.to_dict(), mode, tx), daemon=True)
        proc.start()
        tx.close()
        try:
            if rx.poll(self.timeout):
                res = rx.recv()
            else:
                proc.kill()
                res = {"status": f"error: timeout after {self.timeout:.0f} s"}
        except EOFError:
            res = None
        proc.join(10)
        if res is None:
            code = proc.exitcode
            why = "killed (out of memory?)" if code in (-9, 137) else f"exit code {code}"
            res = {"status": f"error: measurement process died: {why}"}
        rx.close()
        return res


def _merge_times(parts: list[dict]) -> dict:
    """Pool the per-iteration samples of several timing processes; medians of the pool."""
    if len(parts) == 1:
        return parts[0]
    fwd = [x for p in parts for x in p["samples_fwd_ms"]]
    bwd = [x for p in parts for x in p["samples_bwd_ms"]]
    tot = [x for p in parts for x in p["samples_fwd_bwd_ms"]]
    return {"fwd_ms": statistics.median(fwd), "bwd_ms": statistics.median(bwd), "fwd_bwd_ms": statistics.median(tot),
            "fwd_bwd_min_ms": min(tot), "runs": len(tot), "rounds": len(parts),
            "round_medians_fwd_bwd_ms": [p["fwd_bwd_ms"] for p in parts],
            "samples_fwd_ms": fwd, "samples_bwd_ms": bwd, "samples_fwd_bwd_ms": tot, "clock": parts[0]["clock"]}


def measure_group(runner: Runner, cases: list[Case], rounds: int, report) -> list[dict]:
    """All methods of one shape: memory first (one process each), then ``rounds`` timing
    processes per method, interleaved (A B A B ...) so that a change in background load
    hits every method alike. In-process (GPU): one pass that measures both."""
    results = []
    if runner.ctx is None:
        for c in cases:
            res = runner.run(c, "both")
            results.append(res)
            report(c, res)
        return results
    for c in cases:
        results.append(runner.run(c, "memory"))
    times: list[list[dict]] = [[] for _ in cases]
    for _ in range(max(1, rounds)):
        for i, c in enumerate(cases):
            if results[i].get("status") != "ok" or (times[i] and times[i][-1] is None):
                continue
            tim = runner.run(c, "time")
            if tim.get("status") == "ok":
                times[i].append(tim["time"])
            else:
                results[i]["status"] = "time " + tim.get("status", "error")
                if "traceback" in tim:
                    results[i]["traceback"] = tim["traceback"]
                times[i].append(None)
    for i, c in enumerate(cases):
        parts = [t for t in times[i] if t is not None]
        if parts and results[i].get("status") == "ok":
            results[i]["time"] = _merge_times(parts)
        report(c, results[i])
    return results


# --------------------------------------------------------------------------- post-processing


def _rel(a, b) -> float | None:
    if a is None or b is None:
        return None
    return abs(a - b) / max(abs(b), 1e-30)


def annotate(rows: list[dict], ceilings: dict) -> None:
    """Loss agreement with the reference of the same shape, and the floors."""
    ref = {(r["path"], r["head"], r["N"], r["K"]): r for r in rows
           if r["method"] == "reference" and r["status"] == "ok"}
    peak = ceilings["matmul_tflops"] * 1e12
    bw = ceilings["copy_gbps"] * 1e9
    for r in rows:
        if r["status"] != "ok":
            continue
        key = (r["path"], r["head"], r["N"], r["K"])
        rr = ref.get(key)
        comparable = r["method"] != "liger-jsd"
        if rr is not None and comparable:
            r["loss_rel_diff"] = _rel(r.get("loss"), rr.get("loss"))
            gn, gr = r.get("grad_norms") or [], rr.get("grad_norms") or []
            diffs = [_rel(a, b) for a, b in zip(gn, gr) if a is not None and b is not None]
            r["grad_norm_rel_diff"] = max(diffs) if diffs else None
            tol = LOSS_RTOL.get(r["dtype"], 1e-2)
            r["loss_rtol"] = tol
            r["agree"] = bool(r["loss_rel_diff"] is not None and r["loss_rel_diff"] <= tol and r.get("finite", True))
        else:
            r["loss_rel_diff"] = None
            r["agree"] = None
            r["agree_note"] = ("different loss (dense teacher JSD)" if not comparable
                               else "no reference row at this shape")
        pr = predict(r)
        if pr is not None:
            r["predicted_extra_bytes"] = pr["peak_bytes"]
            r["predicted_rss_extra_bytes"] = pr["rss_expected_bytes"]
        c = Case(**{k: r[k] for k in Case.__dataclass_fields__})
        fl = floors(c)
        t = r.get("time", {})
        fb = t.get("fwd_bwd_ms")
        fl["t_flops_ms"] = fl["flops"] / peak * 1e3 if peak else None
        fl["t_bytes_ms"] = fl["bytes"] / bw * 1e3 if bw else None
        fl["t_floor_ms"] = max(fl["t_flops_ms"] or 0.0, fl["t_bytes_ms"] or 0.0)
        r["floor"] = fl
        if fb:
            r["achieved_tflops"] = fl["flops"] / (fb * 1e-3) / 1e12 if fl["flops"] else None
            r["pct_matmul_peak"] = 100.0 * r["achieved_tflops"] * 1e12 / peak if fl["flops"] else None
            r["x_floor"] = fb / fl["t_floor_ms"] if fl["t_floor_ms"] else None
            if fl["flops"] and t.get("fwd_ms") and t.get("bwd_ms"):
                r["achieved_tflops_fwd"] = fl["flops_fwd"] / (t["fwd_ms"] * 1e-3) / 1e12
                r["achieved_tflops_bwd"] = fl["flops_bwd"] / (t["bwd_ms"] * 1e-3) / 1e12


def _find(rows, path, method):
    for r in rows:
        if r["path"] == path and r["method"] == method and r["status"] == "ok":
            return r
    return None


def ours_lam(r: dict) -> float:
    return common.LAM_DISTILL if r["K"] > 0 else 1.0


def predict(r: dict) -> dict | None:
    """Predicted extra memory (memory_model) of an ours-* row on the chunked PyTorch path."""
    from .memory_model import predict_fused_torch, predict_logits_torch
    if r.get("impl") != "torch" or not r["method"].startswith("ours-"):
        return None
    itemsize = torch.tensor([], dtype=common.DTYPES[r["dtype"]]).element_size()
    if r["path"] == "logits":
        return predict_logits_torch(r["N"], r["V"], r["K"], itemsize, lam=ours_lam(r))
    return predict_fused_torch(r["N"], r["D"], r["V"], r["K"], itemsize, lam=ours_lam(r))


def _lse_via_log_softmax(z: torch.Tensor) -> torch.Tensor:
    j = z.argmax(dim=-1, keepdim=True)
    return (z.gather(1, j) - torch.log_softmax(z, dim=-1).gather(1, j)).squeeze(1)


def lse_micro_benchmark(C: int, V: int, reps: int = 7) -> dict:
    """Per-chunk row log-sum-exp on this CPU: ``torch.logsumexp`` (what the chunked path
    uses) against the same value read off ``torch.log_softmax`` (one fused kernel):
    ``lse = z[r, j] - log_softmax(z)[r, j]`` at each row's max column j (finite even where
    other entries are -inf). Interleaved, medians of ``reps``."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(C, V, generator=g) * 2.0
    fns = {"torch.logsumexp": lambda: torch.logsumexp(z, dim=-1),
           "log_softmax-derived": lambda: _lse_via_log_softmax(z)}
    err = float((fns["torch.logsumexp"]() - fns["log_softmax-derived"]()).abs().max())
    ts = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[k].append((time.perf_counter() - t0) * 1e3)
    med = {k: statistics.median(v) for k, v in ts.items()}
    return {"chunk": [C, V], "median_ms": med, "speedup": med["torch.logsumexp"] / med["log_softmax-derived"],
            "max_abs_diff": err,
            "suggestion": "in torch_chunked._lse_and_gather, take the row log-sum-exp from torch.log_softmax "
                          "(lse = z[r, j] - log_softmax(z)[r, j] at each row's max column j) or another single-pass kernel "
                          "instead of "
                          "torch.logsumexp, which makes several passes over the chunk on CPU"}


def evaluate_check(kind: str, rows: list[dict]) -> dict:
    """The targets of the check-logits / check-fused presets."""
    path = "logits" if kind == "logits" else "fused"
    ours_m = "ours-logits" if kind == "logits" else "ours-fused"
    ref, ours = _find(rows, path, "reference"), _find(rows, path, ours_m)
    out = {"kind": kind}
    if ref is None or ours is None:
        out.update(passed=False, verdict="FAIL (a measurement is missing: "
                   + ", ".join(f"{r['label']}: {r['status']}" for r in rows if r["path"] == path) + ")")
        return out
    em_ref = ref["memory"]["extra_minus_grads_bytes"]
    em_ours = ours["memory"]["extra_minus_grads_bytes"]
    mem_ratio = em_ours / em_ref if em_ref > 0 else float("inf")
    tr, to = ref["time"], ours["time"]
    time_ratio = to["fwd_bwd_ms"] / tr["fwd_bwd_ms"]
    out.update(shape={k: ours[k] for k in ("head", "D", "V", "N", "K", "dtype", "device")},
               ours=ours["label"], ours_impl=ours.get("impl"),
               ref_extra_minus_grads_bytes=em_ref, ours_extra_minus_grads_bytes=em_ours,
               ref_peak_extra_bytes=ref["memory"]["peak_extra_bytes"],
               ours_peak_extra_bytes=ours["memory"]["peak_extra_bytes"],
               grads_bytes=ours["memory"]["grads_bytes"],
               mem_ratio=mem_ratio,
               time_ratio=time_ratio, fwd_ratio=to["fwd_ms"] / tr["fwd_ms"], bwd_ratio=to["bwd_ms"] / tr["bwd_ms"],
               ref_time=tr, ours_time=to, loss_rel_diff=ours.get("loss_rel_diff"))
    if kind == "logits":
        mem_lim, time_lim = 1 / 8, 1.1
        out["criterion"] = ("ours extra (beyond logits and dlogits) <= 1/8 of the reference's, "
                            "and fwd+bwd time <= 1.1x the reference's")
        out["mem_limit"], out["time_limit"] = mem_lim, time_lim
        out["mem_pass"] = mem_ratio <= mem_lim
        out["time_pass"] = time_ratio <= time_lim
        out["passed"] = out["mem_pass"] and out["time_pass"]
    else:
        mem_lim = 1 / 16
        out["criterion"] = "ours peak memory beyond inputs and gradients < 1/16 of the reference's"
        out["mem_limit"] = mem_lim
        out["mem_pass"] = mem_ratio < mem_lim
        out["passed"] = out["mem_pass"]
    pred = predict(ours)
    if pred is not None:
        out["predicted"] = pred
        key = "rss_expected_bytes" if ours["device"] == "cpu" else "peak_bytes"
        out["predicted_compared"] = key
        out["measured_over_predicted"] = em_ours / pred[key] if pred[key] else None
        if not pred["model"]["matches"]:
            out["predicted_note"] = (f"memory model derived for torch_chunked.py {pred['model']['derived_for']}, "
                                     f"measured with {pred['model']['current']}: re-derive benchmarks/memory_model.py")
    slow = [f"{ph} {r_:.2f}x" for ph, r_ in (("forward", out["fwd_ratio"]), ("backward", out["bwd_ratio"]))
            if r_ > 1.1]
    if kind == "logits" and (slow or not out["time_pass"]):
        # reported even when the total passes: a phase slower than the reference's is worth fixing
        out["speed_diagnosis"] = {"slow_phases": slow or ["neither phase alone; the sum is over the limit"]}
        if ours.get("impl") == "torch" and ours["device"] == "cpu":
            from .memory_model import _chunk_rows
            out["speed_diagnosis"]["lse_micro_benchmark"] = lse_micro_benchmark(_chunk_rows(ours["V"], None), ours["V"])
    if pred is None and kind == "fused" and ours.get("impl") == "triton":
        from .memory_model import triton_fused_model_doc
        out["predicted"] = {"formula": triton_fused_model_doc() or "no memory model in linear_lse_gather.py"}
    parts = [f"memory {mem_ratio:.4f} (1/{1 / mem_ratio:.1f}) vs limit 1/{1 / mem_lim:.0f}: "
             f"{'PASS' if out['mem_pass'] else 'FAIL'}"] if mem_ratio > 0 else [
             f"memory ratio {mem_ratio:.4f}: {'PASS' if out['mem_pass'] else 'FAIL'}"]
    if kind == "logits":
        parts.append(f"time {time_ratio:.3f}x vs limit 1.1x: {'PASS' if out['time_pass'] else 'FAIL'} "
                     f"(fwd {out['fwd_ratio']:.3f}x, bwd {out['bwd_ratio']:.3f}x)")
    else:
        parts.append(f"time {time_ratio:.3f}x the reference (fwd {out['fwd_ratio']:.3f}x, "
                     f"bwd {out['bwd_ratio']:.3f}x; no target)")
    out["verdict"] = ("PASS" if out["passed"] else "FAIL") + ": " + "; ".join(parts)
    return out


# --------------------------------------------------------------------------- main


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _git_rev(root: Path) -> str | None:
    head = root / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            p = root / ".git" / ref[5:]
            if p.exists():
                return p.read_text().strip()
            packed = root / ".git" / "packed-refs"
            for line in packed.read_text().splitlines():
                if line.endswith(ref[5:]):
                    return line.split()[0]
            return None
        return ref
    except OSError:
        return None


def _source_hashes() -> dict:
    import hashlib
    import dft_kernels
    root = Path(dft_kernels.__file__).parent
    out = {}
    for rel in ("losses.py", "reference.py", "ops/torch_chunked.py", "ops/lse_gather.py", "ops/linear_lse_gather.py"):
        p = root / rel
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()[:12] if p.exists() else "absent"
    return out


def versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__,
         "dft_kernels": common.dft_kernels_version()}
    try:
        import importlib.metadata
        v["triton"] = importlib.metadata.version("triton")
    except Exception as e:  # noqa: BLE001
        v["triton"] = f"missing: {type(e).__name__}: {e}"
    v["peers"] = peer_versions()
    return v


def build_cases(args, preset, device: str, dtype: str, versions_: dict) -> tuple[list[Case], list[dict]]:
    """Cases to measure, and rows that are known without measuring (missing / skipped)."""
    heads = args.heads or preset.heads
    for h in heads:
        if h not in common.HEADS:
            raise SystemExit(f"unknown head {h!r}; known: {', '.join(common.HEADS)}")
    ns = args.n or preset.n
    ks = args.k or preset.k
    paths = args.paths or preset.paths
    for p_ in paths:
        if p_ not in common.PATHS:
            raise SystemExit(f"unknown path {p_!r}; known: {', '.join(common.PATHS)}")
    specs = args.methods or preset.methods
    methods = [parse_method(m) for m in specs]
    explicit = set(args.methods or [])
    repeats = args.repeats or (2 if args.quick else preset.repeats)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else preset.warmup)
    budget = args.time_budget or (5.0 if args.quick else 60.0)
    cases, fixed = [], []
    for path in paths:
        for head in heads:
            D, V = common.HEADS[head]
            for K in ks:
                for N in ns:
                    for base, impl in methods:
                        if not applies(base, path, K):
                            continue
                        c = Case(path=path, head=head, D=D, V=V, N=N, K=K, dtype=dtype, device=device,
                                 method=base, impl=impl, seed=args.seed, repeats=repeats, warmup=warmup,
                                 time_budget_s=budget)
                        st = method_status(base, versions_["peers"])
                        if st is None and base == "compile-chunked" and args.quick and not any(
                                s.startswith("compile-chunked") for s in explicit):
                            st = "skipped: --quick (torch.compile takes minutes; name it in --methods to run it)"
                        if st is not None:
                            fixed.append({**c.to_dict(), "label": c.label, "status": st})
                        else:
                            cases.append(c)
    return cases, fixed


def _fmt_row(r: dict) -> str:
    s = f"{r['path']:6s} {r['head']:13s} N={r['N']:<6d} K={r['K']:<4d} {r['label']:18s} "
    if r["status"] != "ok":
        return s + r["status"]
    t = r.get("time", {})
    m = r.get("memory", {})
    return (s + f"fwd {t.get('fwd_ms', float('nan')):9.2f} ms  bwd {t.get('bwd_ms', float('nan')):9.2f} ms  "
            f"extra {m.get('peak_extra_bytes', 0) / 2**20:9.1f} MiB  (-grads {m.get('extra_minus_grads_bytes', 0) / 2**20:8.1f})"
            f"  loss {r.get('loss', float('nan')):.6g}")


def update_latest(out_dir: Path, data: dict, md_path: Path) -> None:
    idx_path = out_dir / "index.json"
    try:
        idx = json.loads(idx_path.read_text())
    except (OSError, ValueError):
        idx = {}
    key = f"{data['device']['type']}:{data['preset']}"
    idx[key] = {"run": data["run"], "date": data["date"], "md": md_path.name, "device": data["device"]["name"],
                "preset": data["preset"], "command": data["command"],
                "checks": [c.get("verdict") for c in data.get("checks", [])]}
    idx_path.write_text(json.dumps(idx, indent=1, sort_keys=True) + "\n")
    lines = ["# Latest benchmark runs", "",
             "Updated by every non-quick `python -m benchmarks.sweep` run; one line per (device, preset).", "",
             "| device | preset | run | date | checks |", "|---|---|---|---|---|"]
    for k in sorted(idx):
        e = idx[k]
        checks = "; ".join(c for c in e.get("checks") or [] if c) or "-"
        lines.append(f"| {k.split(':')[0]} ({e['device']}) | {e['preset']} | [{e['run']}]({e['md']}) | "
                     f"{e['date'][:19]} | {checks} |")
    (out_dir / "LATEST.md").write_text("\n".join(lines) + "\n")


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

    from .measure import device_info, measure_ceilings
    vers = versions()
    dinfo = device_info(device)
    now = _dt.datetime.now(_dt.timezone.utc)
    dev_tag = "cpu" if dinfo["type"] == "cpu" else re.sub(r"[^A-Za-z0-9]+", "-", dinfo["name"]).strip("-").lower()
    run = args.name or f"{now:%Y%m%d-%H%M%S}_{dev_tag}_{preset_name}" + ("_quick" if args.quick else "")
    command = "python -m benchmarks.sweep" + ("" if not (argv if argv is not None else sys.argv[1:]) else
                                              " " + shlex.join(argv if argv is not None else sys.argv[1:]))
    print(f"[sweep] {run}: {command}")
    print(f"[sweep] device {dinfo['name']} ({device}), dtype {dtype}, isolation {isolation}")
    print(f"[sweep] peers: " + "; ".join(f"{k}: {v}" for k, v in vers["peers"].items()))

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
        print("[sweep] " + _fmt_row(r))

    def report(c, res):
        row = {**c.to_dict(), "label": c.label, **res}
        rows.append(row)
        print("[sweep] " + _fmt_row(row), flush=True)

    load0 = _loadavg()
    groups: dict = {}
    for c in cases:
        groups.setdefault((c.path, c.head, c.K, c.N), []).append(c)
    for grp in groups.values():
        measure_group(runner, grp, rounds, report)
    load1 = _loadavg()
    # the ceilings again at the end: on a shared machine the best of the two is the device's
    ceil_end = measure_ceilings(device, dtype, quick=args.quick)
    ceil = {**ceil, "start": {k: ceil[k] for k in ("matmul_tflops", "copy_gbps")},
            "end": {k: ceil_end[k] for k in ("matmul_tflops", "copy_gbps")},
            "matmul_tflops": max(ceil["matmul_tflops"], ceil_end["matmul_tflops"]),
            "copy_gbps": max(ceil["copy_gbps"], ceil_end["copy_gbps"]),
            "rule": "measured before and after the cases; the larger of the two is used"}
    print(f"[sweep] ceilings at the end: {ceil_end['matmul_tflops'] * 1e3:.1f} GFLOP/s, "
          f"{ceil_end['copy_gbps']:.1f} GB/s; using the larger")
    annotate(rows, ceil)
    order = {m: i for i, m in enumerate(common.ALL_METHODS)}
    rows.sort(key=lambda r: (common.PATHS.index(r["path"]), r["head"], r["K"], r["N"], order[r["method"]],
                             r["label"]))

    checks = [evaluate_check(preset.check, rows)] if preset.check else []
    for ch in checks:
        print(f"[sweep] check {ch['kind']}: {ch['verdict']}")
        if "predicted" in ch and "peak_bytes" in ch["predicted"]:
            print(f"[sweep]   measured ours extra (beyond inputs and grads) "
                  f"{ch['ours_extra_minus_grads_bytes'] / 2**20:.1f} MiB; predicted "
                  f"{ch['predicted']['peak_bytes'] / 2**20:.1f} MiB at allocator level, "
                  f"{ch['predicted']['rss_expected_bytes'] / 2**20:.1f} MiB as peak RSS sees it: "
                  f"{ch['predicted']['formula']}")
        if "predicted_note" in ch:
            print(f"[sweep]   note: {ch['predicted_note']}")
        if "speed_diagnosis" in ch:
            sd = ch["speed_diagnosis"]
            print(f"[sweep]   slower than the reference's: {', '.join(sd['slow_phases'])}")
            mb = sd.get("lse_micro_benchmark")
            if mb:
                print(f"[sweep]   row log-sum-exp per [{mb['chunk'][0]}, {mb['chunk'][1]}] chunk: "
                      + ", ".join(f"{k} {v:.2f} ms" for k, v in mb["median_ms"].items())
                      + f" ({mb['speedup']:.1f}x)")

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
        "git_rev": _git_rev(Path(__file__).resolve().parent.parent),
        "source_sha256": _source_hashes(),
        "env": {k: os.environ[k] for k in ("DFT_KERNELS_IMPL", "TRITON_INTERPRET", "OMP_NUM_THREADS")
                if k in os.environ},
        "ceilings": ceil,
        "load_average": {"start": load0, "end": load1,
                         "note": "1/5/15-minute load averages; above the core count, other work shared the "
                                 "machine and times are less reliable"},
        "timing_rounds": rounds,
        "isolation": isolation + (f" ({runner.start_method})" if isolation == "subprocess" else ""),
        "memory_method": (
            "GPU: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() "
            "once the inputs exist (after warm-up)." if dinfo["type"] == "cuda" else
            "CPU: each case in a fresh process; glibc mallopt(M_MMAP_THRESHOLD=64 KiB) so freed blocks return "
            "to the OS; inputs allocated and written, one warm-up step, then peak RSS (VmHWM, reset via "
            "/proc/self/clear_refs) minus RSS before the measured step. RSS counts pages when first written, so "
            "a gradient buffer filled chunk by chunk hides part of a chunked method's temporaries "
            "(benchmarks/memory_model.py predicts both the allocator-level and the RSS figure)."),
        "timing_method": ("CUDA events around forward and backward, median over repeats after warm-up"
                          if dinfo["type"] == "cuda" else
                          "time.perf_counter around forward and backward (CPU work is synchronous), median "
                          "over repeats after warm-up, in its own fresh process with default malloc settings"),
        "loss": {"divergence": "forward_kl", "tail": "bucket", "accuracy": "ce",
                 "lam": f"{common.LAM_DISTILL} for K > 0; K = 0 is pure CE (lam = 1)",
                 "ignore_index": common.IGNORE_INDEX, "ignored_fraction": common.IGNORE_FRACTION,
                 "reduction": "mean"},
        "methods": {m: common.METHOD_NOTES[m] for m in common.ALL_METHODS},
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
    from .report import markdown
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
