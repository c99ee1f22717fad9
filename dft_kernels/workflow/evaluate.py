"""``dft-kernels eval``: held-out metrics of one or more models side by side, written
as ``report.json``, ``report.md`` and ``report.png`` (docs/design.md sec. 7)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..targets.store import atomic_write
from .inputs import (UsageError, check_targets_dir, check_token_ids, load_causal_lm, load_tokenizer, read_examples,
                     vocab_size_of)

#: metric key -> (label in the report, lower is better)
METRICS = {"ce": ("held-out CE (nats/token)", True), "perplexity": ("perplexity", True),
           "sparse_kl": ("sparse KL to the targets (bucket)", True),
           "full_kl": ("full-vocab KL(teacher || model)", True),
           "student_mass": ("model mass on the teacher's top-k", False),
           "distinct_1": ("distinct-1", False), "distinct_2": ("distinct-2", False),
           "type_token_ratio": ("type-token ratio", False)}


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.no_grad()
def score_model(model, seqs, *, targets=None, teacher=None, temperature: float = 1.0, batch_size: int = 8) -> dict:
    """Held-out metrics of ``model`` on token-id sequences.

    Args:
        model: a causal LM. seqs: list of token-id lists (the held-out data).
        targets: a DFTTargetsDataset over ``seqs`` (None: no sparse metrics).
        teacher: a causal LM with the same vocab (None: no full-vocab KL).
        temperature: the targets' temperature (the student is scored at it, as in the loss).
        batch_size: sequences per forward.
    Returns:
        dict with ``ce`` and ``perplexity`` (next-token, nats), and with targets
        ``sparse_kl`` (forward KL with the tail as one bucket: the loss's math,
        ``dk.dft_loss(lam=0)``) and ``student_mass`` (the model's probability on the
        teacher's slots), with a teacher ``full_kl`` (KL(teacher || model) over the
        full vocab, per position; the sparse KL is a lower bound of it at temperature 1).
    """
    from .. import dft_loss
    from ..hf import DFTDataCollator
    model.eval()
    sums = {"ce": 0.0, "n_ce": 0, "sparse_kl": 0.0, "student_mass": 0.0, "n_sparse": 0, "full_kl": 0.0, "n_full": 0}
    collate = DFTDataCollator(pad_token_id=0)
    order = list(range(len(seqs)))
    for idx in _batches(order, batch_size):
        feats = [targets[i] if targets is not None else {"input_ids": torch.tensor(seqs[i])} for i in idx]
        batch = collate(feats)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = model(input_ids=ids, attention_mask=mask).logits.float()       # [B, T, V]
        V = logits.shape[-1]
        y, ok = ids[:, 1:], (mask[:, 1:] * mask[:, :-1]).bool()
        ce = -logits[:, :-1].log_softmax(-1).gather(-1, y[..., None]).squeeze(-1)
        sums["ce"] += float(ce[ok].sum())
        sums["n_ce"] += int(ok.sum())
        if targets is not None:
            ti, tl = batch["target_index"], batch["target_logprobs"]
            out = dft_loss(logits.reshape(-1, V), ti.reshape(-1, ti.shape[-1]), tl.reshape(-1, tl.shape[-1]),
                           lam=0.0, temperature=temperature, reduction="sum", return_components=True)
            n = int(out.n_tokens)
            sums["sparse_kl"] += float(out.divergence)
            sums["student_mass"] += float(out.student_mass) * n if n else 0.0
            sums["n_sparse"] += n
        if teacher is not None:
            lt = teacher(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
            ls = logits.log_softmax(-1)
            kl = (lt.exp() * (lt - ls)).sum(-1)
            sums["full_kl"] += float(kl[mask.bool()].sum())
            sums["n_full"] += int(mask.sum())
    res = {"ce": sums["ce"] / max(sums["n_ce"], 1)}
    res["perplexity"] = math.exp(min(res["ce"], 700.0))
    if targets is not None:
        res["sparse_kl"] = sums["sparse_kl"] / max(sums["n_sparse"], 1)
        res["student_mass"] = sums["student_mass"] / max(sums["n_sparse"], 1)
    if teacher is not None:
        res["full_kl"] = sums["full_kl"] / max(sums["n_full"], 1)
    return res


def lexical_diversity(samples: list[list]) -> dict:
    """distinct-1 / distinct-2 (distinct n-grams over all n-grams of all samples) and the
    type-token ratio (distinct units / units per sample, averaged over samples).

    Args:
        samples: one list of units (words or token ids) per sampled continuation.
    Returns:
        dict with ``distinct_1``, ``distinct_2``, ``type_token_ratio`` (0 when there are no units).
    """
    uni = [u for s in samples for u in s]
    bi = [tuple(s[i:i + 2]) for s in samples for i in range(len(s) - 1)]
    ttr = [len(set(s)) / len(s) for s in samples if s]
    return {"distinct_1": len(set(uni)) / len(uni) if uni else 0.0,
            "distinct_2": len(set(bi)) / len(bi) if bi else 0.0,
            "type_token_ratio": sum(ttr) / len(ttr) if ttr else 0.0}


@torch.no_grad()
def sample_continuations(model, seqs, *, n: int, max_new_tokens: int, seed: int, tokenizer=None) -> list[list]:
    """``n`` sampled continuations (temperature 1, no top-k / top-p) of prompts taken from
    the start of the first ``n`` sequences (half of each, at most 8 tokens); units are
    whitespace words of the decoded text with a tokenizer, token ids without."""
    torch.manual_seed(seed)
    out = []
    for s in seqs[:n]:
        prompt = torch.tensor([s[:max(1, min(8, len(s) // 2))]])
        gen = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0,
                             top_p=1.0, max_new_tokens=max_new_tokens, pad_token_id=0)[0, prompt.shape[1]:].tolist()
        out.append(tokenizer.decode(gen, skip_special_tokens=True).split() if tokenizer is not None else gen)
    return out


def run_eval(args) -> dict:
    """Score every ``args.model`` and write the report files to ``args.out``; returns the report."""
    from ..data import DFTTargetsDataset
    from ..targets.store import read_manifest
    teacher = load_causal_lm(args.teacher, arg="--teacher").float().eval() if args.teacher else None
    first = args.model[0]
    tok_dir = first if load_tokenizer(first) is not None else args.teacher
    seqs = read_examples(args.data, tok_dir, args.max_length)
    temperature = 1.0
    if args.targets is not None:
        temperature = float(read_manifest(check_targets_dir(args.targets)).get("temperature") or 1.0)
    rows = []
    for path in args.model:
        model = load_causal_lm(path, arg="--model").float().eval()
        V = vocab_size_of(model)
        check_token_ids(seqs, V, arg="--data", model=f"--model {path}")
        if teacher is not None and vocab_size_of(teacher) != V:
            raise UsageError(f"--teacher {args.teacher} has vocab {vocab_size_of(teacher)}, --model {path} has {V}: "
                             "the full-vocab KL needs one vocab")
        targets = None
        if args.targets is not None:
            targets = DFTTargetsDataset([{"input_ids": s} for s in seqs], args.targets, vocab_size=V)
        row = {"model": str(path), **score_model(model, seqs, targets=targets, teacher=teacher,
                                                 temperature=temperature, batch_size=args.batch_size)}
        if args.generate:
            samples = sample_continuations(model, seqs, n=args.generate, max_new_tokens=args.max_new_tokens,
                                           seed=args.seed, tokenizer=load_tokenizer(path))
            row.update(lexical_diversity(samples))
            row["samples"] = samples[:3]
        rows.append(row)
    report = {"data": str(args.data), "n_sequences": len(seqs), "targets": args.targets, "teacher": args.teacher,
              "generate": args.generate, "max_new_tokens": args.max_new_tokens, "seed": args.seed, "models": rows}
    write_report(report, Path(args.out))
    return report


def markdown_table(report: dict) -> str:
    """The report's models as rows and its metrics as columns (GitHub markdown)."""
    keys = [k for k in METRICS if any(k in r for r in report["models"])]
    head = "| model | " + " | ".join(METRICS[k][0] for k in keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 1)]
    for r in report["models"]:
        lines.append(f"| {r['model']} | " + " | ".join(f"{r[k]:.4f}" if k in r else "-" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> None:
    """``report.json``, ``report.md`` and ``report.png`` (one bar chart per metric, the
    models side by side), each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "report.json", (json.dumps(report, indent=1) + "\n").encode())
    md = (f"# Evaluation on {report['data']} ({report['n_sequences']} sequences)\n\n" + markdown_table(report)
          + "\nLower is better for CE, perplexity and KL; higher for the mass and the diversity measures.\n")
    atomic_write(out / "report.md", md.encode())
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k in METRICS if any(k in r for r in report["models"])]
    fig, axes = plt.subplots(1, len(keys), figsize=(2.6 * len(keys), 3.2), squeeze=False)
    names = [Path(r["model"]).name for r in report["models"]]
    for ax, k in zip(axes[0], keys):
        ax.bar(range(len(names)), [r.get(k, 0.0) for r in report["models"]], color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(METRICS[k][0] + (" (lower better)" if METRICS[k][1] else ""), fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(out / "report.png", buf.getvalue())
