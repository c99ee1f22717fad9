"""What a style head saves in one training step (docs/design.md sec. 17.2), on the CPU.

One training step (patched forward + backward, fused loss, K teacher slots) of a small
Llama, each configuration in its own process:

- ``full``: every parameter trains (the baseline of a full fine-tune);
- ``head_graph``: a style head with ``train_decoder=True`` and ``enable_input_require_grads()``
  (what the Trainer does with gradient checkpointing and adapters): nothing in the decoder
  trains, but autograd records it and keeps its activations, and the loss computes dH;
- ``head_frozen``: a style head with ``train_decoder=True`` and no input grads: a frozen base
  records no graph by itself, but the head's input is not detached either;
- ``style``: ``add_style_head`` as it is (the decoder under ``torch.no_grad()``, the head's
  input detached).

Per configuration: the bytes autograd saves for the backward that are not parameters
(``torch.autograd.graph.saved_tensors_hooks``, each storage counted once), the peak resident
memory of the step beyond its start (``harness.PeakMemory``) and the step's time.

    python -m benchmarks.style_head_memory [--layers 4 --hidden 512 --vocab 8192 --batch 4 --seq 512 --k 32]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings

import torch

from .harness import MiB, PeakMemory, malloc_release_to_os

CONFIGS = ("full", "head_graph", "head_frozen", "style")


def _model(args):
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                   intermediate_size=args.hidden * 8 // 3, num_hidden_layers=args.layers,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=args.seq)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM(cfg).train()


def _batch(args):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=g)
    lp, idx = torch.randn(args.batch, args.seq, args.vocab, generator=g).log_softmax(-1).topk(args.k, dim=-1) \
        if args.k else (None, None)
    out = {"input_ids": ids, "labels": ids.clone()}
    if args.k:
        out.update(target_index=idx, target_logprobs=lp)
    return out


def one(config: str, args) -> dict:
    """Measure one configuration in this process."""
    import dft_kernels as dk
    malloc_release_to_os()
    model = _model(args)
    if config != "full":
        dk.hf.add_style_head(model, rank=args.rank, train_decoder=config != "style")
        if config == "head_graph":
            model.enable_input_require_grads()
    dk.hf.patch(model, impl="torch")
    batch = _batch(args)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, saved = set(), [0]

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            saved[0] += s.nbytes()
        return t

    with PeakMemory("cpu") as mem:
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**batch).loss
        loss.backward()
        secs = time.perf_counter() - t0
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"config": config, "saved_bytes": saved[0], "peak_extra_bytes": mem.extra, "seconds": round(secs, 3),
            "trained_params": trained, "loss": float(loss)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--one", choices=CONFIGS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args)))
        return 0
    rows = []
    passthrough = list(argv if argv is not None else sys.argv[1:])
    for c in CONFIGS:
        out = subprocess.run([sys.executable, "-m", "benchmarks.style_head_memory", *passthrough, "--one", c],
                             check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"Llama {args.layers} layers, D {args.hidden}, V {args.vocab}, B {args.batch} x T {args.seq}, K {args.k}, "
          f"style head rank {args.rank}, fp32, CPU\n")
    print("| config | trained params | saved for backward (MiB) | peak RSS beyond start (MiB) | step (s) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['trained_params']} | {r['saved_bytes'] / MiB:.1f} | "
              f"{r['peak_extra_bytes'] / MiB:.1f} | {r['seconds']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
