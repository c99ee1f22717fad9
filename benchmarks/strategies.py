"""Lean vs fast (docs/design.md sec. 10) side by side with the CPU peers, and the memory model.

    python -m benchmarks.strategies [--D 512,1024] [--N 2048] [--V 32000] [--K 0,32] [--rounds 3]
                                    [--out benchmarks/results/strategies-cpu]

Methods, each measured in a fresh process, round-robin over ``--rounds`` rounds:
naive (the library's reference: [N, V] logits, autograd), ours-lean / ours-fast
(``impl="torch"``), the frozen-head (LoRA) variants of both, both strategies with half of
the rows ignored, torch's chunked ``F.linear_cross_entropy(..., options=
torch.nn.LinearCrossEntropyOptions())`` and TRL's ``ChunkedLogProbFunction`` (K = 0 only:
they compute cross-entropy), and ``torch.compile`` of a chunked reference
(benchmarks/chunked.py). Time: median of the rounds' fwd+bwd times (each round = one
process: a warm-up step, then one timed step). Memory: one more process per method, peak
RSS beyond the inputs minus the returned gradients, next to ``memory.loss_extra_bytes``.
Writes ``results.json``, ``results.md`` (ratios against the CPU targets) and one
time-vs-memory PNG per shape; the JSON is rewritten after every measurement (atomic),
and a rerun with the same ``--out`` resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

MiB = 2 ** 20
PEERS_K0 = ("torch-lce", "trl-chunked")
METHODS = ("naive", "lean", "fast", "lean-frozen", "fast-frozen", "lean-ignored50", "fast-ignored50",
           "torch-lce", "trl-chunked", "compile-chunked")


def applies(method: str, K: int) -> bool:
    return K == 0 or method not in PEERS_K0


# --------------------------------------------------------------------------- one measurement (child)


def _inputs(N, D, V, K, seed=0):
    import torch
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g) * (2.0 / D ** 0.5)
    labels = torch.randint(0, V, (N,), generator=g)
    idx = lp = None
    if K:
        idx = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)]) if N * K <= 1 << 20 else \
            (torch.randint(0, V, (N, 1), generator=g) + torch.arange(K) * (V // K)) % V
        lp = torch.log_softmax(torch.randn(N, K, generator=g) * 2, -1) + torch.log(torch.tensor(0.9))
    return h, w, idx, lp, labels


def _loss_fn(method, h, w, idx, lp, labels, V):
    import torch
    import dft_kernels as dk
    lam = 1.0 if idx is None else 0.2
    if method == "naive":
        return lambda: dk.fused_linear_dft_loss(h, w, idx, lp, labels, lam=lam, impl="reference")
    if method.startswith(("lean", "fast")):
        strategy = method.split("-")[0]
        return lambda: dk.fused_linear_dft_loss(h, w, idx, lp, labels, lam=lam, impl="torch", strategy=strategy)
    if method == "torch-lce":
        opts = torch.nn.LinearCrossEntropyOptions()
        return lambda: torch.nn.functional.linear_cross_entropy(h, w, labels, ignore_index=-100, options=opts)
    if method == "trl-chunked":
        from trl.kernels import ChunkedLogProbFunction

        def trl_loss():   # as TRL's trainer calls it off-Triton: every position scored, then masked
            mask = labels != -100
            out = ChunkedLogProbFunction.apply(h, w, None, labels.clamp(min=0), 1.0, 32768, None, 1.0, ())
            lp_tok = out[0] if isinstance(out, tuple) else out
            return -(lp_tok * mask).sum() / mask.sum().clamp(min=1)
        return trl_loss
    if method == "compile-chunked":
        from .chunked import CompiledChunkedDFT
        fn = CompiledChunkedDFT(lam=lam, V=V)
        return lambda: fn(h, w, idx, lp, labels)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def measure(method: str, N: int, D: int, V: int, K: int, mode: str) -> dict:
    """fwd+bwd time (mode "time") or peak RSS beyond inputs and gradients ("memory")."""
    from . import harness
    if mode == "memory":
        harness.malloc_release_to_os()
    h, w, idx, lp, labels = _inputs(N, D, V, K)
    if method.endswith("ignored50"):
        labels[::2] = -100
        if idx is not None:
            idx[::2] = -1
    h.requires_grad_(True)
    w.requires_grad_(not method.endswith("frozen"))
    grads = [t for t in (h, w) if t.requires_grad]
    f = _loss_fn(method, h, w, idx, lp, labels, V)
    losses = []

    def step():
        harness.drop_grads(grads)
        loss = f()
        loss.backward()
        losses.append(float(loss))

    step()  # warm-up (compiles, first-touch pages)
    harness.drop_grads(grads)
    if mode == "time":
        ms = harness.time_call(step) * 1e3
        return {"ms": ms, "loss": losses[-1]}
    with harness.PeakMemory("cpu") as pm:
        step()
    return {"extra_minus_grads": pm.extra - harness.grad_bytes(grads), "loss": losses[-1]}


# --------------------------------------------------------------------------- driver


def _model(method: str, N, D, V, K) -> int | None:
    from dft_kernels.memory import loss_extra_bytes
    kind = method.split("-")[0]
    if kind not in ("naive", "lean", "fast"):
        return None
    n = N // 2 if method.endswith("ignored50") else N
    trains = not method.endswith("frozen")
    b = loss_extra_bytes(kind, n_rows=n, hidden=D, vocab=V, k=K, dtype_bytes=4, head_trains=trains)
    if kind == "fast":   # the held gradients are returned gradients here (fp32): not in the measurement
        b -= (V * D * 4 if trains else 0) + n * D * 4
    return b


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _child(method, N, D, V, K, mode, timeout) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.strategies", "--child", json.dumps([method, N, D, V, K, mode])]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout {timeout}s"}
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def summarize(data: dict) -> str:
    lines = ["# Lean vs fast and the CPU peers", "", f"command: `{data['command']}`", "",
             "| shape | K | method | median fwd+bwd ms | vs naive | mem beyond inputs+grads MiB | model MiB |",
             "|---|---|---|---|---|---|---|"]
    for key, rows in sorted(data["cases"].items()):
        D, K = key.split("/")
        naive = statistics.median(rows["naive"]["ms"]) if rows.get("naive", {}).get("ms") else None
        for m, r in rows.items():
            t = statistics.median(r["ms"]) if r.get("ms") else None
            mem, mod = r.get("mem"), r.get("model")
            lines.append(f"| {D} | {K} | {m} | {t and round(t)} | {t and naive and round(t / naive, 3)} | "
                         f"{mem and round(mem / MiB, 1)} | {mod and round(mod / MiB, 1)} |")
    lines += ["", "## Targets", ""] + [f"- {t}" for t in targets(data)]
    return "\n".join(lines) + "\n"


def targets(data: dict) -> list[str]:
    out = []
    for key, rows in sorted(data["cases"].items()):
        med = {m: statistics.median(r["ms"]) for m, r in rows.items() if r.get("ms")}
        mem = {m: r["mem"] for m, r in rows.items() if r.get("mem") is not None}
        D, K = key.split("/")
        if "naive" not in med:
            continue
        auto = rows.get("fast", {}).get("auto_picks", "fast")
        a = med.get(auto)
        if a is None:
            continue
        out.append(f"{D} K={K}: auto ({auto}) / naive time = {a / med['naive']:.3f} (target <= 1.05)")
        peers = [med[p] for p in ("torch-lce", "trl-chunked", "compile-chunked") if p in med]
        if K == "K0" and peers:
            out.append(f"{D} K={K}: auto / best chunked peer = {a / min(peers):.3f} (target <= 0.9)")
        if auto in mem and "naive" in mem and mem["naive"] > 0:
            out.append(f"{D} K={K}: auto / naive extra memory = {mem[auto] / mem['naive']:.3f} (target <= 0.125)")
        if "fast-frozen" in med and "lean-frozen" in med:
            out.append(f"{D} K={K}: frozen head fast / lean = {med['fast-frozen'] / med['lean-frozen']:.3f} "
                       "(target <= 0.75)")
        for s in ("lean", "fast"):
            if f"{s}-ignored50" in med and s in med:
                out.append(f"{D} K={K}: {s} with 50% rows ignored / all counted = "
                           f"{med[f'{s}-ignored50'] / med[s]:.3f} (target <= 0.6)")
        for m in mem:
            mod = rows[m].get("model")
            if mod and mem[m] > 0:
                out.append(f"{D} K={K}: memory model / measured, {m} = {mod / mem[m]:.3f} (within 0.8-1.2)")
    return out


def plot(data: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for key, rows in data["cases"].items():
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for m, r in rows.items():
            if r.get("ms") and r.get("mem") is not None:
                x, y = max(r["mem"], 0) / MiB, statistics.median(r["ms"])
                ax.scatter([x], [y])
                ax.annotate(m, (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("memory beyond inputs and gradients (MiB)")
        ax.set_ylabel("median fwd+bwd time (ms)")
        ax.set_title(f"fp32 CPU, N {data['N']}, V {data['V']}, {key.replace('/', ', ')}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / f"pareto_{key.replace('/', '_')}.png", dpi=110)
        plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--D", default="512,1024")
    p.add_argument("--N", type=int, default=2048)
    p.add_argument("--V", type=int, default=32000)
    p.add_argument("--K", default="0,32")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--out", default="benchmarks/results/strategies-cpu")
    p.add_argument("--report", action="store_true", help="only rewrite results.md / PNGs from results.json")
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(measure(*json.loads(a.child))))
        return 0
    try:
        Ds, Ks = [int(x) for x in a.D.split(",")], [int(x) for x in a.K.split(",")]
        methods = [m for m in a.methods.split(",") if m]
        bad = [m for m in methods if m not in METHODS]
        if bad or a.rounds < 1:
            raise ValueError(f"unknown methods {bad}" if bad else "--rounds must be >= 1")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    from dft_kernels.losses import choose_strategy  # noqa: F401 -- the library's choice, for the record
    from dft_kernels.memory import chunk_rows_for, loss_extra_bytes
    from dft_kernels.options import STRATEGY_DEFAULTS
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    jpath = out / "results.json"
    data = json.loads(jpath.read_text()) if jpath.exists() else {}
    if data.get("N") != a.N or data.get("V") != a.V:
        data = {"N": a.N, "V": a.V, "cases": {}}
    data["command"] = "python -m benchmarks.strategies " + " ".join(argv if argv is not None else sys.argv[1:])
    jobs = []
    for D in Ds:
        for K in Ks:
            key = f"D{D}/K{K}"
            rows = data["cases"].setdefault(key, {})
            fast_fits = loss_extra_bytes("fast", n_rows=a.N, hidden=D, vocab=a.V, k=K, dtype_bytes=4,
                                         chunk_rows=chunk_rows_for("fast", a.V, a.N)) \
                <= STRATEGY_DEFAULTS["memory_budget"]
            for m in methods:
                if applies(m, K):
                    r = rows.setdefault(m, {"ms": []})
                    r["model"] = _model(m, a.N, D, a.V, K)
                    if m == "fast":
                        r["auto_picks"] = "fast" if fast_fits else "lean"
                    if "mem" not in r:
                        jobs.append((key, m, D, K, "memory"))
            for rnd in range(a.rounds):
                for m in methods:     # round-robin: every method once per round
                    if applies(m, K) and len(rows[m]["ms"]) <= rnd:
                        jobs.append((key, m, D, K, "time"))
    if not a.report:
        for key, m, D, K, mode in tqdm(jobs, desc="strategies"):
            res = _child(m, a.N, D, a.V, K, mode, a.timeout)
            r = data["cases"][key][m]
            if "error" in res:
                r["error"] = res["error"]
            elif mode == "time":
                r["ms"].append(res["ms"])
                r["loss"] = res["loss"]
            else:
                r["mem"] = res["extra_minus_grads"]
            _write_atomic(jpath, json.dumps(data, indent=1))
    _write_atomic(jpath, json.dumps(data, indent=1))
    _write_atomic(out / "results.md", summarize(data))
    plot(data, out)
    print(summarize(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
