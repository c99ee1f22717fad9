"""Cost of the default data checks (docs/design.md sec. 7) per training step, on CPU.

``--what loss`` (default): the always-on checks of the loss entry points
(``validation.check_loss_inputs``: device-side flags on the [N, K] targets and the [N]
labels). Times one training step of ``fused_linear_dft_loss`` (forward + backward, torch
path) at ``--n`` rows, ``--d`` hidden, ``--vocab`` and ``--k`` slots with the checks on
and off (the private switch ``validation._ALWAYS_ON``; the benchmark is its only user),
alternating on / off round-robin for ``--rounds`` rounds, and prints the medians, their
difference, and the checks timed alone (the median of many calls, less noisy than the
difference of two multi-second steps, which a busy machine swamps) as a share of the step.

``--what pipeline``: each item's targets are checked twice by the data pipeline
(``DFTTargetsDataset.__getitem__`` and ``DFTDataCollator``) with
``validation.validate_target_data``. Times those checks for a batch of ``--batch`` items of
``--seq`` positions against one training step of a small causal LM on the same batch.

    python -m benchmarks.check_overhead [--what loss --n 2048 --d 512 --vocab 32000 --k 32 --rounds 5]
    python -m benchmarks.check_overhead --what pipeline [--batch 8 --seq 512 --k 32 --vocab 8192]
"""
from __future__ import annotations

import argparse
import statistics

import torch

from .harness import round_robin, time_calls


def _median_s(fn, rounds: int) -> float:
    return statistics.median(time_calls(fn, warmup=1, repeats=rounds))


def loss_overhead(n: int, d: int, vocab: int, k: int, rounds: int, seed: int = 0) -> dict:
    """Median seconds of a fused-loss training step with the always-on checks on and off
    (round-robin), and of the checks alone. Returns a dict of the numbers."""
    import dft_kernels as dk
    from dft_kernels import validation
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    weight = (torch.randn(vocab, d, generator=g) * d ** -0.5).requires_grad_()
    h = hidden.requires_grad_()
    lp = (torch.randn(n, 4 * k, generator=g) * 2).log_softmax(-1).topk(k, -1).values   # top-k of a softmax
    idx = (torch.randint(0, vocab, (n, 1), generator=g) + torch.arange(k) * (vocab // k)) % vocab  # distinct
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[: n // 8] = -100

    def step():
        h.grad = weight.grad = None
        dk.fused_linear_dft_loss(h, weight, idx, lp, labels, impl="torch").backward()

    def step_with_checks(on: bool):
        def run():
            validation._ALWAYS_ON = on
            try:
                step()
            finally:
                validation._ALWAYS_ON = True
        return run

    # after a warm-up of each (allocator, threads); alternate, the starting side flips each round
    times = round_robin({"on": step_with_checks(True), "off": step_with_checks(False)}, rounds, alternate=True)
    on, off = times["on"], times["off"]
    checks = _median_s(lambda: validation.check_loss_inputs(idx, lp, labels, vocab, -100), 200)
    return {"on_ms": statistics.median(on) * 1e3, "off_ms": statistics.median(off) * 1e3, "checks_ms": checks * 1e3,
            "on_all_ms": [round(t * 1e3) for t in on], "off_all_ms": [round(t * 1e3) for t in off]}


def pipeline_overhead(batch: int, seq: int, k: int, vocab: int, rounds: int) -> tuple[float, float]:
    """(seconds of the pipeline's checks for one batch, seconds of a small LM's step)."""
    import transformers

    import dft_kernels as dk
    from dft_kernels.validation import validate_target_data
    g = torch.Generator().manual_seed(0)
    items = []
    for _ in range(batch):
        lp, idx = torch.randn(seq, vocab, generator=g).log_softmax(-1).topk(k, -1)
        items.append((idx.to(torch.int32), lp))

    def checks():
        for idx, lp in items:
            for _ in range(2):                       # dataset item + collator feature
                validate_target_data(idx, lp, vocab)

    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=512)
    model = dk.hf.patch(transformers.LlamaForCausalLM(cfg))
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    ti = torch.stack([i for i, _ in items])
    tl = torch.stack([lp for _, lp in items])

    def step():
        model(input_ids=ids, labels=ids, target_index=ti, target_logprobs=tl).loss.backward()

    return _median_s(checks, rounds), _median_s(step, rounds)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--what", choices=("loss", "pipeline"), default="loss")
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=None, help="default 32000 (loss), 8192 (pipeline)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.what == "loss":
        vocab = a.vocab or 32000
        r = loss_overhead(a.n, a.d, vocab, a.k, a.rounds)
        print(f"fused_linear_dft_loss fwd+bwd (torch, CPU, {torch.get_num_threads()} threads), N={a.n} D={a.d} "
              f"V={vocab} K={a.k}, median of {a.rounds} round-robin rounds: checks on {r['on_ms']:.1f} ms, off "
              f"{r['off_ms']:.1f} ms, difference {(r['on_ms'] - r['off_ms']) / r['off_ms']:+.2%}; the checks alone "
              f"{r['checks_ms']:.3f} ms (median of 200 calls) = {r['checks_ms'] / r['off_ms']:.3%} of the step\n"
              f"  steps on  (ms): {r['on_all_ms']}\n  steps off (ms): {r['off_all_ms']}")
        return
    vocab = a.vocab or 8192
    c, s = pipeline_overhead(a.batch, a.seq, a.k, vocab, a.rounds)
    print(f"batch {a.batch} x {a.seq} positions, K={a.k}, V={vocab}: checks {c * 1e3:.2f} ms, "
          f"CPU train step (2-layer d=256 Llama) {s * 1e3:.1f} ms, ratio {c / s:.2%}")


if __name__ == "__main__":
    main()
