"""Two-head dense loss alone, fwd + bwd: ours (fast and lean) vs TRL 1.16's
``_chunked_divergence_loss``, each method in a fresh process, round-robin.

    python -m benchmarks.distill [--n 2048 --d 1024 --v 32000 --rounds 3]
    python -m benchmarks.distill --device cuda --dtype bf16 --n 8192 --d 4096 --v 128256 [--out FILE.json]

CPU: one timed step per process, memory = peak RSS growth. CUDA: a warm-up step, then the
median of ``--repeats`` timed steps, memory = ``max_memory_allocated`` beyond the inputs, and
the time against the matmul floor: lean 8·N·D·V (student: logits, recomputed, dH, dW) +
4·N·Dt·V (teacher's projection, computed and recomputed), fast 6·N·D·V + 2·N·Dt·V, at the
bf16 / fp32 matmul rate measured in the same process.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

METHODS = ("trl", "fast", "lean")


def _matmul_rate(n: int, d: int, dtype, device) -> float:
    """FLOP/s of an [n, d] x [d, 8192] matmul (the tile shape of the loss)."""
    import torch

    from .harness import time_calls
    a = torch.randn(n, d, device=device, dtype=dtype)
    b = torch.randn(d, 8192, device=device, dtype=dtype)
    times = time_calls(lambda: a @ b, device, warmup=3, repeats=10)
    return len(times) * 2 * n * d * 8192 / sum(times)


def _one(method: str, n: int, d: int, v: int, device: str, dtype_name: str, repeats: int) -> dict:
    import torch

    from .harness import MiB, PeakMemory, time_calls
    dtype = dict(fp32=torch.float32, bf16=torch.bfloat16)[dtype_name]
    torch.manual_seed(0)
    h = torch.randn(n, d, device=device).to(dtype).requires_grad_()
    w = (torch.randn(v, d, device=device) * 0.02).to(dtype).requires_grad_()
    ht, wt = torch.randn(n, d, device=device).to(dtype), (torch.randn(v, d, device=device) * 0.02).to(dtype)

    def step():
        h.grad = w.grad = None
        if method == "trl":
            from trl.trainer.distillation_trainer import _chunked_divergence_loss
            loss, _, _ = _chunked_divergence_loss(h[None], ht[None], w, wt, torch.ones(1, n, device=device), 0.0)
        else:
            import dft_kernels as dk
            loss = dk.fused_linear_distill_loss(h, w, ht, wt, strategy=method)
        loss.backward()

    cuda = device.startswith("cuda")
    if cuda:
        step()                                    # warm-up: compiles, allocator
        h.grad = w.grad = None
    with PeakMemory(device) as mem:               # CPU: one cold step (peak RSS growth, gradients included)
        times = time_calls(step, device, warmup=0, repeats=repeats if cuda else 1)
    if not cuda:
        return {"method": method, "seconds": times[0], "extra_peak_mib": mem.extra / MiB}
    grads = 2 * (n * d + v * d) * h.element_size()
    flops = (8 * n * d * v + 4 * n * d * v) if method != "fast" else (6 * n * d * v + 2 * n * d * v)
    rate = _matmul_rate(n, d, dtype, device)
    sec = statistics.median(times)
    return {"method": method, "seconds": sec, "best_seconds": min(times),
            "extra_peak_mib": (mem.extra - grads) / MiB,
            "floor_flops": flops, "matmul_tflops": rate / 1e12, "time_over_floor": sec / (flops / rate)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per process (CUDA)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    methods = a.methods.split(",")
    if any(m not in METHODS for m in methods) or "trl" not in methods:
        p.error(f"--methods {a.methods}: choose from {','.join(METHODS)}, trl included (the ratios are against it)")
    if a.one:
        print(json.dumps(_one(a.one, a.n, a.d, a.v, a.device, a.dtype, a.repeats)))
        return 0
    res: dict[str, list] = {}
    for _ in range(a.rounds):
        for m in methods:
            cmd = [sys.executable, "-m", "benchmarks.distill", "--one", m, "--n", str(a.n), "--d", str(a.d),
                   "--v", str(a.v), "--device", a.device, "--dtype", a.dtype, "--repeats", str(a.repeats)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            res.setdefault(m, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    trl = min(r["seconds"] for r in res["trl"])
    for m, rs in res.items():
        best = min(r["seconds"] for r in rs)
        mem = min(r["extra_peak_mib"] for r in rs)
        floor = f"  {min(r['time_over_floor'] for r in rs):5.2f}x floor" if "time_over_floor" in rs[0] else ""
        print(f"{m:5s} best {best:8.3f} s  ratio vs trl {best / trl:5.2f}  extra peak {mem:8.1f} MiB{floor}")
    if a.out:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"args": vars(a), "results": res}, f, indent=1)
        os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
