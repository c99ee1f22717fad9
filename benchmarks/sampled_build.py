"""Build time of hybrid targets vs top-k targets of the same slot count
(docs/design.md sec. 12; target: hybrid <= 1.2x top-k).

    python -m benchmarks.sampled_build                     # V 32000, D 256, 3 rounds
    python -m benchmarks.sampled_build --vocab 257 --hidden 64

Each (method, round) runs ``targets.build`` in a fresh process, methods round-robin,
so a noisy machine hits them alike; prints every time, the median and best per
method, and the hybrid / top-k ratios.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

METHODS = {"top16": (16, 0), "hybrid4+12": (4, 12), "sampled16": (0, 16)}


def _one(vocab: int, hidden: int, n_seqs: int, length: int, k: int, samples: int) -> tuple[float, float]:
    """Wall and CPU seconds of one build (teacher forward + targets + shard write)."""
    import torch
    import transformers

    from dft_kernels import targets

    from .harness import time_call
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4)
    model = transformers.LlamaForCausalLM(cfg).eval()
    seqs = torch.randint(0, vocab, (n_seqs, length), generator=torch.Generator().manual_seed(1))
    batches = [seqs[i:i + 8] for i in range(0, n_seqs, 8)]
    with tempfile.TemporaryDirectory() as d:
        c0 = time.process_time()
        wall = time_call(lambda: targets.build(model, batches, k, out_dir=d, samples=samples, seed=0, progress=False))
        return wall, time.process_time() - c0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seqs", type=int, default=32)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--one", nargs=2, type=int, metavar=("K", "SAMPLES"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.vocab, args.hidden, args.seqs, args.length, args.rounds) < 1:
        p.error("--vocab, --hidden, --seqs, --length and --rounds must be >= 1")
    if args.one:
        print(json.dumps(_one(args.vocab, args.hidden, args.seqs, args.length, *args.one)))
        return {}
    times: dict[str, list[float]] = {m: [] for m in METHODS}     # wall seconds
    cpu: dict[str, list[float]] = {m: [] for m in METHODS}       # process CPU seconds (less noisy when shared)
    base = [sys.executable, "-m", "benchmarks.sampled_build", "--vocab", str(args.vocab), "--hidden",
            str(args.hidden), "--seqs", str(args.seqs), "--length", str(args.length)]
    for r in range(args.rounds):
        for name, (k, s) in METHODS.items():
            out = subprocess.run(base + ["--one", str(k), str(s)], capture_output=True, text=True, check=True)
            wall, used = json.loads(out.stdout.strip().splitlines()[-1])
            times[name].append(wall)
            cpu[name].append(used)
            print(f"round {r}: {name:<11} wall {wall:.3f}s cpu {used:.3f}s", flush=True)
    print(f"\nV={args.vocab} D={args.hidden}, {args.seqs} x {args.length} positions, {args.rounds} rounds")
    for what, table in (("wall", times), ("cpu", cpu)):
        for name, ts in table.items():
            ref = table["top16"]
            print(f"{what:<4} {name:<11} median {statistics.median(ts):.3f}s best {min(ts):.3f}s  ratio to top16: "
                  f"median {statistics.median(ts) / statistics.median(ref):.3f}x best {min(ts) / min(ref):.3f}x")
    return {"wall": times, "cpu": cpu}


if __name__ == "__main__":
    main()
