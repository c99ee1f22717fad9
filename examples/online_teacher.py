"""Distil a tiny Hugging Face student from a live tiny teacher, no teacher logits stored.

    python examples/online_teacher.py                  # both modes, under a minute on a 2-core CPU
    python examples/online_teacher.py --mode topk --steps 40 --json result.json

1. Data: short English sentences from embedded word lists, byte-level ids (vocab 257),
   no tokenizer, no download (the helpers of examples/hf_trainer.py).
2. Teacher: a tiny Llama trained briefly with plain cross-entropy, so that its next-byte
   distributions are far from a random student's.
3. Students (same random init) trained by ``DFTTrainer(..., teacher_model=teacher)``:
   ``DFTConfig(teacher="topk", k=K)`` -- the teacher's top-K computed per batch from its last
   hidden states and lm_head -- and ``DFTConfig(teacher="dense")`` -- the full-vocabulary
   two-head loss. Neither materialises the teacher's [N, V] logits in training.
4. Printed: the held-out dense KL(teacher || student) over the full vocabulary, per token,
   before training and every ``--eval-every`` steps. The exit status is 1 if it did not fall
   in some mode.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))      # the helpers of examples/hf_trainer.py

MODES = ("topk", "dense")


def train_online(mode: str, teacher, train_texts: list[str], held_out, args, out_dir: str) -> dict:
    """Train a fresh student against the live teacher; {step: (held-out CE, held-out KL)}."""
    import transformers
    from hf_trainer import EvalEvery, encode, tiny_llama

    from dft_kernels.hf import DFTConfig, DFTTrainer

    student = tiny_llama(args.seed + 1, hidden=48)            # the same init in every mode
    feats = []
    for t in train_texts:                                     # ids and labels only: no targets in the data
        ids = torch.tensor(encode(t))
        feats.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    targs = transformers.TrainingArguments(
        output_dir=out_dir, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, logging_steps=args.eval_every, save_strategy="no",
        report_to=[], disable_tqdm=True, seed=args.seed, use_cpu=not torch.cuda.is_available())
    cb = EvalEvery(held_out, args.eval_every)
    cb.rows[0] = held_out.evaluate(student)
    trainer = DFTTrainer(model=student, args=targs, train_dataset=feats, callbacks=[cb], teacher_model=teacher,
                         dft_config=DFTConfig(teacher=mode, k=args.k, lam=args.lam, divergence="forward_kl"))
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    trainer.train()
    return cb.rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="student optimizer steps per mode")
    p.add_argument("--teacher-steps", type=int, default=60, help="cross-entropy steps that shape the teacher")
    p.add_argument("--mode", choices=("both",) + MODES, default="both")
    p.add_argument("--k", type=int, default=8, help="teacher slots per position in topk mode")
    p.add_argument("--lam", type=float, default=0.0, help="weight of the cross-entropy term on the labels")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (models this small run fastest on one)")
    p.add_argument("--json", metavar="PATH", help="also write {mode: {step: [ce, kl]}} here")
    args = p.parse_args(argv)
    for name in ("steps", "teacher_steps", "k", "batch", "eval_every", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lam < 0 or args.lr <= 0:
        p.error("--lam must be >= 0 and --lr > 0")
    if args.k > 257:
        p.error(f"--k {args.k} exceeds the vocabulary (257)")

    import transformers
    from hf_trainer import HeldOut, sentences, train_teacher    # imports transformers: after the arguments are checked
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    texts = sentences(360, seed=args.seed)
    train_texts, eval_texts = texts[:300], texts[300:]
    teacher = train_teacher(train_texts, args.teacher_steps, seed=args.seed + 100)
    held_out = HeldOut(teacher, eval_texts)
    ce_t, _ = held_out.evaluate(teacher)
    print(f"teacher: {args.teacher_steps} cross-entropy steps, held-out CE {ce_t:.3f} nats/byte "
          f"({time.time() - t0:.1f}s)")

    modes = MODES if args.mode == "both" else (args.mode,)
    results = {}
    with tempfile.TemporaryDirectory(prefix="dft-online-") as out_dir:
        for mode in modes:
            t1 = time.time()
            results[mode] = train_online(mode, teacher, train_texts, held_out, args, out_dir)
            print(f"{mode}: {args.steps} steps in {time.time() - t1:.1f}s")

    label = {"topk": f"top-{args.k}", "dense": "dense"}
    print(f"\nHeld-out KL(teacher || student) over the full vocabulary, nats per token "
          f"(forward KL{f' + {args.lam} * CE' if args.lam else ''}).\n")
    head = f"{'step':>5} | " + " ".join(f"{label[m]:>8}" for m in modes)
    print(head)
    print("-" * len(head))
    for s in sorted(set().union(*(results[m] for m in modes))):
        print(f"{s:5d} | " + " ".join(f"{results[m][s][1]:8.4f}" if s in results[m] else f"{'':8}" for m in modes))
    ok = True
    for m in modes:
        first, last = results[m][0][1], results[m][max(results[m])][1]
        fell = last < first
        ok &= fell
        print(f"{label[m]}: KL {first:.4f} -> {last:.4f} ({'fell' if fell else 'DID NOT FALL'})")
    print(f"total {time.time() - t0:.1f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({m: {str(s): list(v) for s, v in results[m].items()} for m in modes}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
