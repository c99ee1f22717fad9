"""Fine-tune a tiny Hugging Face model with DFT against a tiny teacher, end to end on CPU.

    python examples/hf_trainer.py            # under a minute on a 2-core CPU
    python examples/hf_trainer.py --plot curves.png

1. Data: a few hundred short English sentences built from embedded word lists,
   byte-level token ids (vocab 257 = 256 bytes + BOS), no tokenizer, no download.
2. Teacher: a tiny Llama trained briefly with plain cross-entropy.
3. Sparse targets: for every training sequence, the top-K of the teacher's
   log_softmax at every position (row t = the teacher's distribution of the token
   after position t -- aligned with the input positions, not shifted).
4. Two students from the same random init: SFT (transformers.Trainer, cross-entropy
   on the labels) and DFT (dft_kernels.hf.DFTTrainer: forward KL to the teacher's
   top-K + lam * cross-entropy). Both are evaluated on held-out sentences with the
   next-token cross-entropy and the full-vocabulary KL(teacher || student).
"""
from __future__ import annotations

import argparse
import math
import random
import tempfile
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments

from dft_kernels.hf import DFTConfig, DFTDataCollator, DFTTrainer

BOS, VOCAB = 256, 257

SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher", "her brother",
            "the farmer", "a young girl", "the baker", "our neighbour", "the captain"]
VERBS = ["sees", "likes", "finds", "paints", "carries", "watches", "follows", "feeds", "builds", "sells"]
OBJECTS = ["a red apple", "the blue boat", "an old book", "the green hill", "a warm coat", "the tall tree",
           "a bright lamp", "the quiet river", "a wooden box", "the new garden"]
ENDINGS = ["today", "at night", "in the morning", "every day", "near the house", "by the sea", "again", "slowly"]


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)}."
            for _ in range(n)]


def encode(text: str) -> list[int]:
    return [BOS] + list(text.encode("utf-8"))


def tiny_llama(seed: int, hidden: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=BOS, eos_token_id=ord("."), pad_token_id=0, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def pad_batch(seqs: list[list[int]]) -> dict[str, torch.Tensor]:
    return DFTDataCollator(pad_token_id=0)([{"input_ids": s} for s in seqs])


def train_teacher(texts: list[str], steps: int, seed: int) -> LlamaForCausalLM:
    teacher = tiny_llama(seed, hidden=64).train()
    opt = torch.optim.AdamW(teacher.parameters(), lr=5e-3)
    rng = random.Random(seed)
    ids = [encode(t) for t in texts]
    for _ in range(steps):
        batch = pad_batch(rng.sample(ids, 32))
        loss = teacher(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return teacher.eval()


@torch.no_grad()
def teacher_targets(teacher, texts: list[str], k: int) -> list[dict]:
    """One feature per sentence: ids, labels, and the teacher's top-K per position."""
    seqs = [encode(t) for t in texts]
    batch = pad_batch(seqs)                                      # right-padded: row t of sentence i is row t
    logprobs = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lp, idx = logprobs.float().log_softmax(-1).topk(k, dim=-1)  # [B, T, K]
    feats = []
    for i, s in enumerate(seqs):
        ids, n = torch.tensor(s), len(s)
        feats.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
                      "target_index": idx[i, :n], "target_logprobs": lp[i, :n]})
    return feats


class HeldOut:
    """Held-out sentences with the teacher's full next-byte log-probs, computed once."""

    @torch.no_grad()
    def __init__(self, teacher, texts: list[str]):
        self.batch = pad_batch([encode(t) for t in texts])
        self.inputs = {"input_ids": self.batch["input_ids"], "attention_mask": self.batch["attention_mask"]}
        self.teacher_lp = teacher(**self.inputs).logits[:, :-1].float().log_softmax(-1)
        y = self.batch["labels"][:, 1:]
        self.y, self.ok = y.clamp(min=0), y != -100

    @torch.no_grad()
    def evaluate(self, model) -> tuple[float, float]:
        """Next-token cross-entropy and dense KL(teacher || model), per token."""
        was_training = model.training
        model.eval()
        ls = model(**self.inputs).logits[:, :-1].float().log_softmax(-1)
        model.train(was_training)
        ce = -ls.gather(-1, self.y[..., None]).squeeze(-1)[self.ok].mean()
        lt = self.teacher_lp
        kl = (lt.exp() * (lt - ls)).sum(-1)[self.ok].mean()
        return float(ce), float(kl)


class EvalEvery(TrainerCallback):
    def __init__(self, held_out: HeldOut, every: int):
        self.held_out, self.every, self.rows = held_out, every, {}

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.rows[state.global_step] = self.held_out.evaluate(model)


def run(kind: str, train_feats, held_out: HeldOut, args, out_dir: str) -> tuple[dict, dict]:
    student = tiny_llama(args.seed + 1, hidden=48)          # same init for SFT and DFT
    targs = TrainingArguments(
        output_dir=out_dir, max_steps=args.steps, per_device_train_batch_size=16, learning_rate=args.lr,
        lr_scheduler_type="cosine", warmup_steps=5, logging_steps=args.eval_every, save_strategy="no",
        report_to=[], disable_tqdm=True, seed=args.seed, use_cpu=not torch.cuda.is_available())
    cb = EvalEvery(held_out, args.eval_every)
    cb.rows[0] = held_out.evaluate(student)
    if kind == "sft":      # the unpatched model: transformers' own cross-entropy, no targets
        feats = [{k: f[k] for k in ("input_ids", "attention_mask", "labels")} for f in train_feats]
        trainer = transformers.Trainer(model=student, args=targs, train_dataset=feats,
                                       data_collator=DFTDataCollator(pad_token_id=0), callbacks=[cb])
    else:                  # DFTTrainer patches the model and pads the targets with the ids
        trainer = DFTTrainer(model=student, args=targs, train_dataset=train_feats, callbacks=[cb],
                             dft_config=DFTConfig(lam=args.lam, divergence="forward_kl", tail="bucket"))
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)     # we print our own table
    trainer.train()
    train_loss = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    return train_loss, cb.rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60, help="student optimizer steps")
    p.add_argument("--teacher-steps", type=int, default=80)
    p.add_argument("--k", type=int, default=8, help="teacher slots per position")
    p.add_argument("--lam", type=float, default=0.2, help="weight of the cross-entropy term in DFT")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", metavar="PNG", help="also save the curves as a PNG (needs matplotlib)")
    args = p.parse_args(argv)
    transformers.logging.set_verbosity_error()
    t0 = time.time()

    texts = sentences(360, seed=args.seed)
    train_texts, eval_texts = texts[:300], texts[300:]
    teacher = train_teacher(train_texts, args.teacher_steps, seed=args.seed + 100)
    train_feats = teacher_targets(teacher, train_texts, args.k)
    held_out = HeldOut(teacher, eval_texts)
    ce0, _ = held_out.evaluate(teacher)
    print(f"teacher: {args.teacher_steps} steps, held-out CE {ce0:.3f} nats/byte; "
          f"top-{args.k} targets for {len(train_feats)} sentences ({time.time() - t0:.1f}s)")

    with tempfile.TemporaryDirectory(prefix="dft-example-") as out_dir:
        results = {kind: run(kind, train_feats, held_out, args, out_dir) for kind in ("sft", "dft")}
    print(f"\nSFT = cross-entropy on the labels; DFT = forward KL to the teacher's top-{args.k} "
          f"+ {args.lam} * cross-entropy. Held-out: next-byte CE and dense KL(teacher || student).\n")
    head = (f"{'step':>5} | {'SFT train':>9} {'DFT train':>9} | {'SFT CE':>7} {'DFT CE':>7} | "
            f"{'SFT KL':>7} {'DFT KL':>7}")
    print(head)
    print("-" * len(head))
    steps = sorted(set(results["sft"][1]) | set(results["dft"][1]))
    for s in steps:
        def tr(kind):
            h = results[kind][0].get(s)
            return f"{h['loss']:9.3f}" if h else f"{'':9}"
        (sce, skl), (dce, dkl) = results["sft"][1].get(s, (math.nan,) * 2), results["dft"][1].get(s, (math.nan,) * 2)
        print(f"{s:5d} | {tr('sft')} {tr('dft')} | {sce:7.3f} {dce:7.3f} | {skl:7.3f} {dkl:7.3f}")
    last_dft = results["dft"][0][max(results["dft"][0])]
    print(f"\nDFT loss parts at the end: divergence {last_dft.get('dft_divergence', math.nan):.3f}, "
          f"accuracy (CE) {last_dft.get('dft_accuracy', math.nan):.3f}, student mass on the teacher's top-{args.k} "
          f"{last_dft.get('dft_student_mass', math.nan):.3f}")
    print(f"total {time.time() - t0:.1f}s")

    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for kind in ("sft", "dft"):
            rows = results[kind][1]
            xs = sorted(rows)
            axes[0].plot(xs, [rows[x][0] for x in xs], marker="o", label=kind.upper())
            axes[1].plot(xs, [rows[x][1] for x in xs], marker="o", label=kind.upper())
        axes[0].set(title="held-out next-byte cross-entropy", xlabel="step", ylabel="nats")
        axes[1].set(title="held-out KL(teacher || student)", xlabel="step", ylabel="nats")
        for ax in axes:
            ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"saved {args.plot}")
    return results


if __name__ == "__main__":
    main()
