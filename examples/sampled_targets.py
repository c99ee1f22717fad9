"""Top-k vs hybrid vs sampled teacher targets at equal storage, on CPU in minutes.

    python examples/sampled_targets.py                                  # 3 seeds, table on stdout
    python examples/sampled_targets.py --out benchmarks/results/sampled_targets   # + .md table, .json, .png

With ``--out`` the results are saved after every seed; a re-run with the same
settings skips the seeds already done (resume after an interruption).

The byte-level teacher / student set-up of ``examples/hf_trainer.py`` (vocab 257,
tiny Llamas, embedded sentences). Per seed: one teacher, one student init, and five
students trained from it with the same steps and batches:

- ``sft``: cross-entropy on the labels only (the floor);
- ``top16``: forward KL to the teacher's top-16 (``tail="bucket"``) + lam * CE;
- ``hybrid4+12``: top-4 + 12 draws from the rest of the vocab (docs/design.md sec. 12);
- ``sampled16``: 16 draws from the whole distribution;
- ``dense``: all 257 log-probs (K = V, the ceiling).

The sparse targets are built once (offline, like a stored build) with 16 slots per
position. Held-out metrics: dense KL(teacher || student), next-byte cross-entropy,
expected calibration error of the student's top-1 (10 bins), and distinct-2 /
type-token ratio of sampled continuations (words of the decoded bytes).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_trainer import HeldOut, VOCAB, encode, pad_batch, sentences, tiny_llama, train_teacher  # noqa: E402

import dft_kernels as dk  # noqa: E402

METHODS = {  # name -> (top-k slots, sampled slots); None = no targets (SFT), "dense" = K = V
    "sft": None, "top16": (16, 0), "hybrid4+12": (4, 12), "sampled16": (0, 16), "dense": "dense"}
METRICS = (("kl", "held-out KL(teacher||student)", "nats/byte"), ("ce", "held-out CE", "nats/byte"),
           ("ece", "top-1 ECE", ""), ("distinct2", "distinct-2 of samples", ""), ("ttr", "type-token ratio", ""))


@torch.no_grad()
def targets_for(teacher, seqs: list[list[int]], method, seed: int) -> dk.SparseTargets | None:
    """The teacher's targets of every padded position [B, T, K] for one method."""
    if method is None:
        return None
    batch = pad_batch(seqs)
    logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    if method == "dense":
        return dk.SparseTargets.from_logits(logits, VOCAB)
    k, samples = method
    return dk.SparseTargets.from_logits(logits, k, samples=samples, generator=torch.Generator().manual_seed(seed))


def train_student(seqs, targets, args, seed: int):
    student = tiny_llama(seed + 1, hidden=48).train()
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr)
    warm = max(1, args.steps // 10)          # linear warm-up, then cosine decay
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    order = torch.Generator().manual_seed(seed + 2)
    full = pad_batch(seqs)
    for _ in range(args.steps):
        rows = torch.randperm(len(seqs), generator=order)[:args.batch]
        width = int(full["attention_mask"][rows].sum(1).max())
        ids, labels = full["input_ids"][rows, :width], full["labels"][rows, :width]
        logits = student(input_ids=ids, attention_mask=full["attention_mask"][rows, :width]).logits
        # row t of the targets is aligned with logits row t; the label of row t is the next byte
        shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
        if targets is None:
            loss = dk.dft_loss(logits, labels=shifted, lam=1.0)
        else:
            t = targets[rows, :width]
            loss = dk.dft_loss(logits, t.index, t.logprobs, shifted, lam=args.lam, tail="bucket")
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return student.eval()


@torch.no_grad()
def calibration_error(model, held: HeldOut, bins: int = 10) -> float:
    """Expected calibration error of the top-1 next byte over held-out positions."""
    p = model(**held.inputs).logits[:, :-1].float().softmax(-1)[held.ok]
    conf, pred = p.max(-1)
    right = (pred == held.y[held.ok]).double()
    which = (conf * bins).long().clamp(max=bins - 1)
    ece = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            ece += float(m.double().mean()) * abs(float(right[m].mean()) - float(conf[m].double().mean()))
    return ece


@torch.no_grad()
def diversity(model, prompts: list[str], seed: int, new_bytes: int = 48) -> tuple[float, float]:
    """distinct-2 and type-token ratio of the words of sampled continuations (T = 1)."""
    ids = torch.tensor([encode(p) for p in prompts])
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                         max_new_tokens=new_bytes, pad_token_id=0)
    words = []
    for row in out[:, ids.shape[1]:]:
        text = bytes(int(x) for x in row if x < 256).decode("utf-8", errors="replace")
        words.append(text.split())
    bigrams = [tuple(w[i:i + 2]) for w in words for i in range(len(w) - 1)]
    flat = [x for w in words for x in w]
    return len(set(bigrams)) / max(len(bigrams), 1), len(set(flat)) / max(len(flat), 1)


def run_seed(seed: int, args) -> dict:
    texts = sentences(360, seed=seed)
    train_texts, eval_texts = texts[:300], texts[300:]
    teacher = train_teacher(train_texts, args.teacher_steps, seed=seed + 100)
    seqs = [encode(t) for t in train_texts]
    held = HeldOut(teacher, eval_texts)
    prompts = [t[:6] for t in eval_texts]
    rows = {}
    for name, method in [("teacher", None)] + list(METHODS.items()):
        t0 = time.time()
        if name == "teacher":
            model = teacher
        else:
            model = train_student(seqs, targets_for(teacher, seqs, method, seed + 7), args, seed)
        ce, kl = held.evaluate(model)
        d2, ttr = diversity(model, prompts, seed + 3)
        rows[name] = {"kl": kl, "ce": ce, "ece": calibration_error(model, held), "distinct2": d2, "ttr": ttr}
        print(f"  seed {seed} {name:<11} KL {kl:.4f} CE {ce:.4f} ECE {rows[name]['ece']:.4f} distinct-2 {d2:.3f} "
              f"TTR {ttr:.3f} ({time.time() - t0:.1f}s)", flush=True)
    mass = targets_for(teacher, seqs, (16, 0), 0).mass()[pad_batch(seqs)["attention_mask"].bool()]
    rows["teacher"]["top16_mass"] = float(mass.mean())
    return rows


def summarise(per_seed: dict[int, dict]) -> str:
    names = ["teacher"] + list(METHODS)
    lines = ["| method | " + " | ".join(f"{title}" + (f" ({unit})" if unit else "") for _, title, unit in METRICS)
             + " |", "|---|" + "---|" * len(METRICS)]
    for name in names:
        cells = []
        for key, _, _ in METRICS:
            vals = [per_seed[s][name][key] for s in per_seed]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.4f} ± {sd:.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Paired by seed (same teacher, init and batches), held-out KL minus top16's: "
                 + "; ".join(f"{n}: " + ", ".join(f"{per_seed[s][n]['kl'] - per_seed[s]['top16']['kl']:+.4f}"
                                                   for s in per_seed) for n in ("hybrid4+12", "sampled16", "dense")))
    mass = [per_seed[s]["teacher"]["top16_mass"] for s in per_seed]
    lines.append(f"Teacher mass on its top-16 (training positions, mean over seeds): {statistics.mean(mass):.4f}")
    return "\n".join(lines)


def plot(per_seed: dict[int, dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(METHODS)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 3.4))
    for ax, (key, title, unit) in zip(axes, METRICS):
        for j, name in enumerate(names):
            vals = [per_seed[s][name][key] for s in per_seed]
            ax.scatter([j] * len(vals), vals, s=14, alpha=0.6)
            ax.errorbar(j, statistics.mean(vals), yerr=statistics.stdev(vals) if len(vals) > 1 else 0,
                        fmt="_", color="k", markersize=14, capsize=3)
        ax.axhline(statistics.mean(per_seed[s]["teacher"][key] for s in per_seed), ls=":", c="gray", label="teacher")
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(title + (f"\n({unit})" if unit else ""), fontsize=9)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"16 slots per position: top-k vs hybrid vs sampled ({len(per_seed)} seeds; dots = seeds)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=150, help="student optimizer steps")
    p.add_argument("--teacher-steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lam", type=float, default=0.2, help="weight of the cross-entropy term")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--out", metavar="PREFIX", help="write PREFIX.md, PREFIX.json and PREFIX.png")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.teacher_steps < 1:
        p.error("--steps, --teacher-steps and --batch must be >= 1")
    import transformers
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t0 = time.time()
    per_seed: dict[int, dict] = {}
    done = {}
    if args.out and os.path.exists(args.out + ".json"):      # resume: seeds finished with the same settings
        with open(args.out + ".json") as f:
            old = json.load(f)
        if {k: v for k, v in old["args"].items() if k != "seeds"} == {k: v for k, v in vars(args).items()
                                                                     if k != "seeds"}:
            done = {int(s): rows for s, rows in old["per_seed"].items()}
    for s in args.seeds:
        per_seed[s] = done[s] if s in done else run_seed(s, args)
        if args.out:                                          # after every seed, atomically
            with open(args.out + ".json.tmp", "w") as f:
                json.dump({"args": vars(args), "per_seed": {**done, **per_seed}}, f, indent=1)
            os.replace(args.out + ".json.tmp", args.out + ".json")
    table = summarise(per_seed)
    print("\n" + table + f"\n\ntotal {time.time() - t0:.0f}s")
    if args.out:
        cmd = "python examples/sampled_targets.py " + " ".join(argv if argv is not None else sys.argv[1:])
        head = (f"# Top-k vs hybrid vs sampled targets (16 slots per position)\n\nRegenerate: `{cmd}`\n\n"
                f"Mean ± standard deviation over seeds {args.seeds}; {args.steps} student steps of "
                f"{args.batch} sentences, lam = {args.lam}, forward KL with tail='bucket'.\n\n")
        tmp = args.out + ".md.tmp"
        with open(tmp, "w") as f:
            f.write(head + table + "\n")
        os.replace(tmp, args.out + ".md")
        plot(per_seed, args.out + ".png")
        print(f"wrote {args.out}.md, .json, .png")
    return per_seed


if __name__ == "__main__":
    main()
