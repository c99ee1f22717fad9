"""Plots of a sweep: ``python -m benchmarks.plot <results.json> [--out DIR]``.

One PNG per (path, head shape, K): memory beyond inputs and gradients vs N, and
forward + backward time vs N, one line per method.
"""
from __future__ import annotations

import argparse
import json
import sys
from itertools import groupby
from pathlib import Path

MiB = 2 ** 20


def plot_run(data: dict, out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r for r in data["rows"] if r.get("status") == "ok"]
    rows.sort(key=lambda r: (r["path"], r["head"], r["K"], r["label"], r["N"]))
    written = []
    for (path, head, K), grp in groupby(rows, key=lambda r: (r["path"], r["head"], r["K"])):
        grp = list(grp)
        fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
        for label, g in groupby(sorted(grp, key=lambda r: (r["label"], r["N"])), key=lambda r: r["label"]):
            g = list(g)
            ns = [r["N"] for r in g]
            # clipped at 1/100 MiB for the log axis (tiny shapes are at the RSS noise floor)
            mem = [max(r["memory"]["extra_minus_grads_bytes"] / MiB, 0.01) for r in g]
            tim = [r.get("time", {}).get("fwd_bwd_ms") for r in g]
            style = dict(marker="o", linewidth=2 if label.startswith("ours") else 1.2)
            ax_m.plot(ns, mem, label=label, **style)
            if all(t is not None for t in tim):
                ax_t.plot(ns, tim, label=label, **style)
        r0 = grp[0]
        for ax in (ax_m, ax_t):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("N (positions)")
            ax.grid(True, which="both", alpha=0.3)
        ax_m.set_yscale("log")
        ns_all = sorted({r["N"] for r in grp})
        for ax in (ax_m, ax_t):
            ax.set_xticks(ns_all, [str(n) for n in ns_all])
        ax_m.set_ylabel("peak memory beyond inputs and grads (MiB)")
        ax_t.set_yscale("log")
        ax_t.set_ylabel("forward + backward (ms, median)")
        ax_t.legend(fontsize=8)
        missing = sorted({r["label"] for r in data["rows"] if r["path"] == path and r["head"] == head
                          and r["K"] == K and r.get("status") != "ok"})
        sub = f"  (not measured: {', '.join(missing)})" if missing else ""
        dims = f"V={r0['V']}" if path == "logits" else f"D={r0['D']}, V={r0['V']}"
        fig.suptitle(f"{path} path, {head} ({dims}), K={K}, {r0['dtype']}, "
                     f"{data['device']['name']}{sub}", fontsize=9)
        fig.tight_layout()
        p = out_dir / f"{path}_{head}_K{K}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.split("\n\n")[0])
    ap.add_argument("json", type=Path, help="a results JSON written by python -m benchmarks.sweep")
    ap.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: next to the JSON, "
                                                           "named after the run)")
    a = ap.parse_args(argv)
    data = json.loads(a.json.read_text())
    out = a.out or a.json.parent / data["run"]
    for p in plot_run(data, out):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
