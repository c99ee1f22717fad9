"""One GPU session in one call: ``bash benchmarks/gpu_session.sh [--dry-run]``, which
installs the carried peer wheels and runs ``python -m benchmarks.gpu_session``.

Before these steps ``gpu_session.sh`` runs the doctor (``python -m dft_kernels --json``:
versions, every kernel natively against float64, timings; ``<date>_doctor.json`` under
``benchmarks/results/``, capped at 180 s). Steps, each under its own time cap so that the
whole session fits in about 8 minutes:

1. the kernel tests natively (no interpreter): ``pytest`` on the Triton test files;
2. the sweep (``python -m benchmarks.sweep``) at the lm_heads of Llama-3-8B, Qwen2.5-7B
   and Gemma-2-2B, K = 0 and 32, bf16: the reference, ours (fused, Triton, both
   strategies: lean and fast) and the peers (Liger FLCE, Cut Cross-Entropy, torch's
   chunked ``F.linear_cross_entropy`` and TRL's chunked head at K = 0; Liger's fused JSD
   and TRL's chunked distillation loss against a dense teacher at K = 32), then ours
   (lean) again with the other backend of the backward products
   (``FusedConfig.backward_gemm``, chosen by ``DFT_KERNELS_BACKWARD_GEMM``);
3. ignored rows (``python -m benchmarks.ignored_rows``): ours (lean, Triton) at the
   Llama-3-8B head with every row counted and with half of them ignored;
4. the two-head distillation loss (``python -m benchmarks.distill``) at the Llama-3-8B
   head: ours (lean, fast) vs TRL's chunked loss, time against the matmul floor;
5. ``<out>/<name>.json`` and ``<out>/<name>.md``: device, versions, the command, the
   date, each step's exit status and log tail, and the runs' own JSON / markdown / PNG
   files (written under the same folder).

``--dry-run``: tiny shapes on the CPU under the Triton interpreter, a few seconds
(tests/test_gpu_session.py runs it in CI). Exit code: 0 when every step passed, 1 when
one failed (the report is written either way), 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib
import io
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results"
#: the environment variable that sets ``FusedConfig.backward_gemm`` (ops/linear/triton.py)
GEMM_ENV = "DFT_KERNELS_BACKWARD_GEMM"   # = ops.linear.backward.BACKWARD_GEMM_ENV

KERNEL_TESTS = ["tests/test_gpu_configs.py", "tests/test_fused_linear.py", "tests/test_dft_loss.py",
                "tests/test_teacher_topk.py", "tests/test_two_head_triton.py"]
GPU_HEADS = "llama3-8b,qwen2.5-7b,gemma2-2b"


def plan(dry_run: bool, name: str, out: Path) -> list[dict]:
    """The session's steps: ``{"name", "argv", "env", "timeout_s"}`` each."""
    py = sys.executable
    if dry_run:
        tests = [py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                 "tests/test_gpu_configs.py::test_backward_gemm_rejects_unknown"]
        sweep = [py, "-m", "benchmarks.sweep", "--shapes", "cpu-small", "--device", "cpu", "--heads", "d64-v1k",
                 "--n", "64", "--k", "0", "--paths", "fused", "--repeats", "1", "--warmup", "0",
                 "--isolation", "inprocess", "--quick", "--no-plots", "--out", str(out)]
        ours, peers, more = "ours-fused:triton", "reference", "ours-fused-fast:triton"
        ignored = [py, "-m", "benchmarks.ignored_rows", "--impl", "triton", "--N", "64", "--D", "40", "--V", "300",
                   "--K", "4", "--rounds", "1", "--out", str(out / f"{name}_ignored-rows.json")]
        distill = [py, "-m", "benchmarks.distill", "--n", "16", "--d", "16", "--v", "64", "--rounds", "1",
                   "--out", str(out / f"{name}_distill.json")]
        one_head = []
        # under the interpreter already (CI), the benchmarks run in this process (no cap):
        # the imports and the device ceilings are paid once, which keeps the CI test short
        caps = (60, None, None, None, None, None) if os.environ.get("TRITON_INTERPRET") == "1" \
            else (60, 120, 120, 120, 60, 120)
        base = {"TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    else:
        tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout=120", *KERNEL_TESTS]
        sweep = [py, "-m", "benchmarks.sweep", "--shapes", "gpu", "--heads", GPU_HEADS, "--n", "8192",
                 "--k", "0,32", "--paths", "fused", "--quick", "--time-budget", "2", "--out", str(out)]
        ours, peers = "ours-fused:triton", "reference,torch-lce,liger-flce,cce"
        # the fast strategy, TRL's chunked head (K = 0) and the two dense-teacher losses
        # (K = 32) at one head: the session's time
        more = "ours-fused-fast:triton,trl-chunked,liger-jsd,trl-distill"
        ignored = [py, "-m", "benchmarks.ignored_rows", "--device", "cuda", "--impl", "triton", "--dtype", "bf16",
                   "--N", "8192", "--D", "4096", "--V", "128256", "--K", "32", "--rounds", "5",
                   "--out", str(out / f"{name}_ignored-rows.json")]
        distill = [py, "-m", "benchmarks.distill", "--device", "cuda", "--dtype", "bf16", "--n", "8192", "--d",
                   "4096", "--v", "128256", "--rounds", "1", "--repeats", "3",
                   "--out", str(out / f"{name}_distill.json")]
        one_head = ["--heads", "llama3-8b"]
        caps = (80, 195, 60, 40, 45, 40)
        base = {}
    return [
        {"name": "kernel tests", "argv": tests, "env": base, "timeout_s": caps[0]},
        {"name": "sweep (backward_gemm=triton, peers)", "env": {**base, GEMM_ENV: "triton"}, "timeout_s": caps[1],
         "argv": sweep + ["--methods", f"{peers},{ours}", "--name", f"{name}_sweep-triton-gemm"]},
        {"name": "sweep (fast strategy, TRL, dense teachers)", "env": {**base, GEMM_ENV: "triton"},
         "timeout_s": caps[2], "argv": sweep + one_head + ["--methods", more, "--name", f"{name}_sweep-more"]},
        {"name": "sweep (backward_gemm=torch)", "env": {**base, GEMM_ENV: "torch"}, "timeout_s": caps[3],
         "argv": sweep + one_head + ["--methods", ours, "--name", f"{name}_sweep-torch-gemm"]},
        {"name": "ignored rows (half of them)", "env": base, "timeout_s": caps[4], "argv": ignored},
        {"name": "two-head distillation loss vs TRL", "env": base, "timeout_s": caps[5], "argv": distill},
    ]


def _run_here(step: dict) -> tuple[int, str]:
    """A benchmark step (``python -m MODULE ARGS``) in this process (dry run): its
    environment set for the call."""
    module = importlib.import_module(step["argv"][2])
    saved = {k: os.environ.get(k) for k in step["env"]}
    os.environ.update(step["env"])
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            rc = module.main(step["argv"][3:])
    except SystemExit as e:   # argparse errors
        rc = e.code
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return rc, buf.getvalue()


def run_step(step: dict) -> dict:
    """Runs one step with its time cap (None: in this process); returns its record
    (exit status, seconds, log tail)."""
    t0 = time.perf_counter()
    if step["timeout_s"] is None:
        rc, log = _run_here(step)
    else:
        try:
            p = subprocess.run(step["argv"], cwd=ROOT, env={**os.environ, **step["env"]}, capture_output=True,
                               text=True, timeout=step["timeout_s"])
            rc, log = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"") + (e.stderr or b"")
            rc, log = "timeout", out.decode(errors="replace") if isinstance(out, bytes) else out
    return {"name": step["name"], "command": shlex.join(step["argv"]), "env": step["env"], "exit": rc,
            "seconds": round(time.perf_counter() - t0, 1), "log_tail": log[-3000:]}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def device_info() -> dict:
    """Device name and the versions of everything measured."""
    import torch

    from .methods import peer_versions
    from .runinfo import versions
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (Triton interpreter)"
    return {"device": dev, "versions": {**versions(), "peers": peer_versions()}}


def markdown(report: dict) -> str:
    """The session's report as markdown."""
    lines = [f"# GPU session {report['name']}", "",
             f"- date: {report['date']}", f"- device: {report['device']}",
             f"- command: `{report['command']}`", f"- dry run: {report['dry_run']}", "",
             "| step | exit | seconds |", "| --- | --- | --- |"]
    lines += [f"| {s['name']} | {s['exit']} | {s['seconds']} |" for s in report["steps"]]
    lines += ["", "Sweep results (JSON, markdown, PNG) of each run: the files named "
              f"`{report['name']}_sweep-*` beside this one.", "", "## Versions", "", "```",
              json.dumps(report["versions"], indent=1, sort_keys=True), "```"]
    for s in report["steps"]:
        lines += ["", f"## {s['name']}", "", f"`{s['command']}`", "", "```", s["log_tail"].strip(), "```"]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_session", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU under the Triton interpreter")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (default: benchmarks/results)")
    p.add_argument("--name", default=None, help="report name (default: date_gpu-session)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = args.name or f"{stamp}_{'dry-run' if args.dry_run else 'gpu'}-session"
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"name": name, "date": _dt.datetime.now().isoformat(timespec="seconds"), "dry_run": args.dry_run,
              "command": shlex.join(["python", "-m", "benchmarks.gpu_session", *(argv or sys.argv[1:])]),
              **device_info(), "steps": []}
    for step in plan(args.dry_run, name, args.out):
        print(f"[gpu_session] {step['name']} (cap {step['timeout_s'] or '-'} s) ...", flush=True)
        rec = run_step(step)
        print(f"[gpu_session] {step['name']}: exit {rec['exit']} in {rec['seconds']} s", flush=True)
        report["steps"].append(rec)
        _atomic_write(args.out / f"{name}.json", json.dumps(report, indent=1))
    _atomic_write(args.out / f"{name}.md", markdown(report))
    print(f"[gpu_session] wrote {args.out / (name + '.json')} and {args.out / (name + '.md')}")
    return 0 if all(s["exit"] == 0 for s in report["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
