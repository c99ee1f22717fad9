"""A LoRA'd lm_head inside the fused loss against the logits fallback (docs/design.md sec. 17).

``python -m benchmarks.lora_head [--tokens 4096 --hidden 1024 --vocab 32000 --rank 16 --k 32]
[--rounds 3] [--out benchmarks/results]``

One forward + backward of the DFT loss (forward KL over K teacher slots + 0.2 CE) with the
head ``W + s * B @ A`` (W frozen, A and B trained, h trained: a LoRA on the decoder too),
each method in its own fresh process, round-robin over ``--rounds``:

- ``fused-lean`` / ``fused-fast``: ``fused_linear_dft_loss(..., lora_A=, lora_B=)``
  (no [N, V] tensor);
- ``logits``: what the Hugging Face patch did before for a LoRA'd head: the model's
  ``[N, V]`` logits (``h @ W.T + s * (h @ A.T) @ B.T``) then ``dft_loss`` on them.

Peak memory is the process's resident set beyond the inputs (``harness.PeakMemory``, CPU) or
``max_memory_allocated`` (GPU); time is the median of the rounds. Writes ``lora_head.json`` /
``.md``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from .harness import MiB, PeakMemory, malloc_release_to_os, summary, time_call

METHODS = ("fused-lean", "fused-fast", "logits")


def _inputs(N, D, V, r, K, device, dtype):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g) * 0.02).to(device, dtype)
    a = (torch.randn(r, D, generator=g) * D ** -0.5).to(device, dtype).requires_grad_()
    b = (torch.randn(V, r, generator=g) * 0.01).to(device, dtype).requires_grad_()
    idx = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(min(N, 64))]).repeat(N // 64 + 1, 1)[:N]
    lp = torch.log_softmax(torch.randn(N, K, generator=g), -1) - 0.1
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::7] = -100
    return h, w, a, b, idx.to(device), lp.to(device), labels.to(device)


def step(method: str, t, scaling: float) -> None:
    """One forward + backward of ``method`` on the inputs ``t``."""
    import dft_kernels as dk
    h, w, a, b, idx, lp, labels = t
    if method == "logits":
        logits = h @ w.T + scaling * (h @ a.T) @ b.T
        loss = dk.dft_loss(logits, idx, lp, labels, impl="torch")
    else:
        loss = dk.fused_linear_dft_loss(h, w, idx, lp, labels, lora_A=a, lora_B=b, lora_scaling=scaling,
                                        strategy=method.split("-")[1])
    loss.backward()
    for x in (h, a, b):
        x.grad = None


def run_one(method: str, N, D, V, r, K) -> dict:
    """One method in this process: warm-up, then the timed call under ``PeakMemory``."""
    malloc_release_to_os()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t = _inputs(N, D, V, r, K, device, dtype)
    step(method, t, 2.0)                           # warm-up (kernels compiled, buffers touched)
    with PeakMemory(device) as m:
        seconds = time_call(lambda: step(method, t, 2.0), device)
    return dict(method=method, seconds=seconds, extra_mib=m.extra / MiB, device=device, dtype=str(dtype))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lora_head", description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)     # the child process
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    shape = (args.tokens, args.hidden, args.vocab, args.rank, args.k)
    if args.one:
        print(json.dumps(run_one(args.one, *shape)))
        return 0
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    for _ in range(args.rounds):
        for m in METHODS:
            out = subprocess.run([sys.executable, "-m", "benchmarks.lora_head", "--one", m,
                                  *[f"--{k}={v}" for k, v in zip(("tokens", "hidden", "vocab", "rank", "k"), shape)]],
                                 capture_output=True, text=True, check=True)
            runs[m].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    for m, rs in runs.items():
        t = summary([r["seconds"] for r in rs])
        rows.append(dict(method=m, median_s=t["median"], best_s=t["best"],
                         extra_mib=min(r["extra_mib"] for r in rs), device=rs[0]["device"], dtype=rs[0]["dtype"]))
    base = next(r for r in rows if r["method"] == "logits")
    args.out.mkdir(parents=True, exist_ok=True)
    result = dict(tokens=args.tokens, hidden=args.hidden, vocab=args.vocab, rank=args.rank, k=args.k,
                  rounds=args.rounds, rows=rows, command="python -m benchmarks.lora_head " + " ".join(argv or sys.argv[1:]))
    (args.out / "lora_head.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# LoRA'd lm_head: fused vs logits fallback (N {args.tokens}, D {args.hidden}, V {args.vocab}, "
             f"r {args.rank}, K {args.k}, {rows[0]['device']} {rows[0]['dtype']})", "",
             f"`{result['command']}`. One forward + backward, W frozen, A / B / h trained; each method in a fresh "
             f"process, {args.rounds} rounds round-robin; memory: peak beyond the inputs (min over rounds).", "",
             "| method | median s | best s | vs logits (time) | extra MiB | vs logits (memory) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['median_s']:.3f} | {r['best_s']:.3f} | {r['median_s'] / base['median_s']:.2f}x "
                     f"| {r['extra_mib']:.0f} | {r['extra_mib'] / max(base['extra_mib'], 1e-9):.2f}x |")
    (args.out / "lora_head.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
