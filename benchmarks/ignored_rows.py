"""What ignored rows cost: fwd+bwd time of ``fused_linear_dft_loss`` with every row
counted and with a fraction of the rows ignored (label = ignore_index, no teacher slot),
interleaved so that no tile is ignored whole before the rows are reordered.

    python -m benchmarks.ignored_rows [--device cpu|cuda] [--impl torch|triton]
                                      [--strategy lean|fast] [--N 2048 --D 1024 --V 32000 --K 32]
                                      [--fraction 0.5] [--rounds 5] [--out FILE.json]

Both problems are measured in one process, alternating, after a warm-up of each; the
ratio of the medians is printed (target: <= 0.6 at half the rows ignored).
"""
from __future__ import annotations

import argparse
import json
import os


def _problem(N, D, V, K, fraction, device, dtype):
    import torch
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(N, D, generator=g).to(device, dtype).requires_grad_(True)
    w = (torch.randn(V, D, generator=g) * (2.0 / D ** 0.5)).to(device, dtype).requires_grad_(True)
    labels = torch.randint(0, V, (N,), generator=g)
    idx = (torch.randint(0, V, (N, 1), generator=g) + torch.arange(K) * max(1, V // max(K, 1))) % V
    lp = torch.log_softmax(torch.randn(N, K, generator=g) * 2, -1) + torch.log(torch.tensor(0.9))
    step = round(1 / fraction) if fraction > 0 else 0
    if step:
        labels[::step] = -100          # every step-th row does not count
        idx[::step] = -1
    return h, w, idx.to(device), lp.to(device), labels.to(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--impl", choices=("torch", "triton"), default="torch")
    p.add_argument("--strategy", choices=("lean", "fast"), default="lean")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--N", type=int, default=2048)
    p.add_argument("--D", type=int, default=1024)
    p.add_argument("--V", type=int, default=32000)
    p.add_argument("--K", type=int, default=32)
    p.add_argument("--fraction", type=float, default=0.5, help="share of the rows ignored (0 < f <= 0.5)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None, help="write the result as JSON here")
    a = p.parse_args(argv)
    if not 0 < a.fraction <= 0.5:
        p.error(f"--fraction {a.fraction}: must be in (0, 0.5] (every round(1/f)-th row is ignored)")
    if a.rounds < 1:
        p.error(f"--rounds {a.rounds}: must be >= 1")

    import torch

    import dft_kernels as dk

    from .harness import round_robin, summary
    dtype = dict(fp32=torch.float32, bf16=torch.bfloat16)[a.dtype]

    def step_fn(problem):
        h, w, idx, lp, labels = problem

        def step():
            h.grad = w.grad = None
            loss = dk.fused_linear_dft_loss(h, w, idx, lp, labels, lam=0.2, impl=a.impl, strategy=a.strategy)
            loss.backward()
        return step

    runs = {"all counted": step_fn(_problem(a.N, a.D, a.V, a.K, 0.0, a.device, dtype)),
            f"{a.fraction:.0%} ignored": step_fn(_problem(a.N, a.D, a.V, a.K, a.fraction, a.device, dtype))}
    times = round_robin(runs, a.rounds, a.device, warmup=1)      # after a warm-up of each (compiles, allocator)
    stats = {name: summary(t) for name, t in times.items()}
    all_t, ign_t = (st["median"] for st in stats.values())
    ratio = ign_t / all_t
    for name, st in stats.items():
        print(f"{name:>12}: median {st['median'] * 1e3:9.1f} ms  best {st['best'] * 1e3:9.1f} ms")
    print(f"ratio (ignored / all counted) = {ratio:.3f}  (target <= 0.6 at 50%)")
    if a.out:
        result = dict(args=vars(a), torch=torch.__version__, seconds=times, median_ratio=ratio,
                      device_name=torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu")
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
