"""Two-head dense loss alone, fwd + bwd: ours (fast and lean, chunked PyTorch) vs TRL 1.16's
``_chunked_divergence_loss``, each method in a fresh process, round-robin.

    python -m benchmarks.distill [--n 2048 --d 1024 --v 32000 --rounds 3]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _one(method: str, n: int, d: int, v: int) -> dict:
    import resource

    import torch
    torch.manual_seed(0)
    h = torch.randn(n, d, requires_grad=True)
    w = (torch.randn(v, d) * 0.02).requires_grad_()
    ht, wt = torch.randn(n, d), torch.randn(v, d) * 0.02
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if method == "trl":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss
        loss, _, _ = _chunked_divergence_loss(h[None], ht[None], w, wt, torch.ones(1, n), 0.0)
    else:
        import dft_kernels as dk
        loss = dk.fused_linear_distill_loss(h, w, ht, wt, impl="torch", strategy=method)
    loss.backward()
    dt = time.perf_counter() - t0
    return {"method": method, "seconds": dt, "extra_peak_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(_one(a.one, a.n, a.d, a.v)))
        return
    res: dict[str, list] = {}
    for _ in range(a.rounds):
        for m in ("trl", "fast", "lean"):
            out = subprocess.run([sys.executable, "-m", "benchmarks.distill", "--one", m, "--n", str(a.n), "--d",
                                  str(a.d), "--v", str(a.v)], capture_output=True, text=True, check=True)
            res.setdefault(m, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    trl = min(r["seconds"] for r in res["trl"])
    for m, rs in res.items():
        best = min(r["seconds"] for r in rs)
        mem = min(r["extra_peak_mib"] for r in rs)
        print(f"{m:5s} best {best:7.2f} s  ratio vs trl {best / trl:5.2f}  extra peak RSS {mem:8.1f} MiB")


if __name__ == "__main__":
    main()
