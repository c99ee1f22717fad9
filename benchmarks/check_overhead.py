"""Cost of the default data checks (docs/design.md sec. 7) per training step, on CPU.

Each item's targets are checked twice by default (``DFTTargetsDataset.__getitem__``
and ``DFTDataCollator``) with ``validation.validate_target_data``. This times, for a
batch of ``--batch`` items of ``--seq`` positions and ``--k`` slots: the checks alone,
and one training step of a small causal LM on the same batch (fused DFT loss,
forward + backward), each the median of ``--rounds`` repeats, and prints the ratio.

    python -m benchmarks.check_overhead [--batch 8 --seq 512 --k 32 --vocab 8192 --rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def _median_s(fn, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    import transformers

    import dft_kernels as dk
    from dft_kernels.validation import validate_target_data
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    items = []
    for _ in range(a.batch):
        lp, idx = torch.randn(a.seq, a.vocab, generator=g).log_softmax(-1).topk(a.k, -1)
        items.append((idx.to(torch.int32), lp))

    def checks():
        for idx, lp in items:
            for _ in range(2):                       # dataset item + collator feature
                validate_target_data(idx, lp, a.vocab)

    cfg = transformers.LlamaConfig(vocab_size=a.vocab, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=512)
    model = dk.hf.patch(transformers.LlamaForCausalLM(cfg))
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)
    ti = torch.stack([i for i, _ in items])
    tl = torch.stack([lp for _, lp in items])

    def step():
        model(input_ids=ids, labels=ids, target_index=ti, target_logprobs=tl).loss.backward()

    c, s = _median_s(checks, a.rounds), _median_s(step, a.rounds)
    print(f"batch {a.batch} x {a.seq} positions, K={a.k}, V={a.vocab}: checks {c * 1e3:.2f} ms, "
          f"CPU train step (2-layer d=256 Llama) {s * 1e3:.1f} ms, ratio {c / s:.2%}")


if __name__ == "__main__":
    main()
