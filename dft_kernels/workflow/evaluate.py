"""``dft-kernels eval``: held-out metrics of one or more models side by side, written
as ``report.json``, ``report.md`` and ``report.png`` (docs/design.md sec. 7)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..targets.store import atomic_write
from .guards import check_positions, check_targets_teacher, compare_tokenizers
from .inputs import (UsageError, check_targets_dir, check_token_ids, load_causal_lm, load_tokenizer, read_examples,
                     vocab_size_of)

#: metric key -> (label in the report, which way is better: "lower", "higher" or "reference" = closer to
#: the held-out data's own value)
METRICS = {"ce": ("held-out CE (nats/token)", "lower"), "perplexity": ("perplexity", "lower"),
           "sparse_kl": ("sparse KL to the targets (bucket)", "lower"),
           "full_kl": ("full-vocab KL(teacher || model)", "lower"),
           "student_mass": ("model mass on the teacher's top-k", "higher"),
           "distinct_1": ("distinct-1", "reference"), "distinct_2": ("distinct-2", "reference"),
           "type_token_ratio": ("type-token ratio", "reference")}
#: the plot's panel titles (short enough for a 4-wide grid); "reference" metrics say so below the title
PANEL_TITLES = {"ce": "held-out CE (nats/token)", "perplexity": "perplexity (log scale)",
                "sparse_kl": "sparse KL to the targets", "full_kl": "full-vocab KL(teacher || model)",
                "student_mass": "mass on the teacher's top-k", "distinct_1": "distinct-1",
                "distinct_2": "distinct-2", "type_token_ratio": "type-token ratio"}


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


def reference_continuations(seqs, *, n: int, max_new_tokens: int, tokenizer=None) -> list[list]:
    """What the held-out data itself continues the prompts of :func:`sample_continuations`
    with (the same prompts, up to ``max_new_tokens`` tokens): the diversity the models are
    compared against."""
    out = []
    for s in seqs[:n]:
        p = max(1, min(8, len(s) // 2))
        cont = list(s[p:p + max_new_tokens])
        out.append(tokenizer.decode(cont, skip_special_tokens=True).split() if tokenizer is not None else cont)
    return out


def _check_model_dirs(args) -> None:
    """Every --model and --teacher is a model directory, before any data is read."""
    for arg, paths in (("--model", args.model), ("--teacher", [args.teacher] if args.teacher else [])):
        for path in paths:
            if not (Path(path) / "config.json").is_file():
                raise UsageError(f"{arg} {path} is not a local Hugging Face model directory (no config.json): "
                                 "pass a directory written by save_pretrained")


def _style_heads(args) -> list[Path]:
    """The ``--style-head`` directories (names resolved in ``--presets``), each scored on the one
    ``--model`` it belongs to, next to that model alone."""
    import os

    from .presets import resolve_style_head
    given = getattr(args, "style_head", None) or []
    if given and len(args.model) != 1:
        raise UsageError(f"--style-head needs exactly one --model (the base model the style heads were trained on), "
                         f"got {len(args.model)}")
    search = getattr(args, "presets", None) or os.environ.get("DFT_KERNELS_PRESETS", ".").split(os.pathsep)
    return [resolve_style_head(h, search) for h in given]


def run_eval(args) -> dict:
    """Score every ``args.model`` and write the report files to ``args.out``; returns the report."""
    from ..data import DFTTargetsDataset
    from ..targets.store import read_manifest
    _check_model_dirs(args)
    _style_heads(args)                       # names resolved before any model loads
    manifest = read_manifest(check_targets_dir(args.targets)) if args.targets is not None else None
    teacher = None
    if args.teacher:
        teacher = load_causal_lm(args.teacher, arg="--teacher")
        if manifest is not None:
            check_targets_teacher(manifest, teacher, teacher_dir=args.teacher, targets_dir=args.targets)
        teacher = teacher.float().eval()
    first = args.model[0]
    tok_dir = first if load_tokenizer(first) is not None else args.teacher
    seqs = read_examples(args.data, tok_dir, args.max_length)
    if teacher is not None:
        check_positions(seqs, teacher, model_arg=f"--teacher {args.teacher}")
    temperature = 1.0
    if manifest is not None:
        temperature = float(manifest.get("temperature") or 1.0)
    heads = _style_heads(args)
    rows = []
    for path, head in [(m, None) for m in args.model] + [(args.model[0], h) for h in heads]:
        model = load_causal_lm(path, arg="--model").float().eval()
        if head is not None:                 # refused (exit 2) when it was trained on another base
            from ..hf import load_style_head
            load_style_head(model, head)
            model.eval()
        V = vocab_size_of(model)
        check_token_ids(seqs, V, arg="--data", model=f"--model {path}")
        check_positions(seqs, model, model_arg=f"--model {path}")
        if teacher is not None:
            if vocab_size_of(teacher) != V:
                raise UsageError(f"--teacher {args.teacher} has vocab {vocab_size_of(teacher)}, --model {path} has "
                                 f"{V}: the full-vocab KL needs one vocab")
            compare_tokenizers(path, args.teacher, a_arg="--model", b_arg="--teacher", vocab_a=V,
                               vocab_b=vocab_size_of(teacher), purpose="the full-vocab KL")
        targets = None
        if args.targets is not None:
            tok = load_tokenizer(path) if manifest.get("tokenizer_fingerprint") else None
            targets = DFTTargetsDataset([{"input_ids": s} for s in seqs], args.targets, vocab_size=V, tokenizer=tok)
        name = str(path) if head is None else f"{path} + {head}"
        row = {"model": name, **score_model(model, seqs, targets=targets, teacher=teacher,
                                            temperature=temperature, batch_size=args.batch_size)}
        if args.generate:
            samples = sample_continuations(model, seqs, n=args.generate, max_new_tokens=args.max_new_tokens,
                                           seed=args.seed, tokenizer=load_tokenizer(path))
            row.update(lexical_diversity(samples))
            row["samples"] = samples[:3]
        rows.append(row)
    report = {"data": str(args.data), "n_sequences": len(seqs), "targets": args.targets, "teacher": args.teacher,
              "generate": args.generate, "max_new_tokens": args.max_new_tokens, "seed": args.seed, "models": rows}
    if args.generate:   # the held-out data's own continuations: the diversity to be close to
        report["reference"] = lexical_diversity(reference_continuations(
            seqs, n=args.generate, max_new_tokens=args.max_new_tokens, tokenizer=load_tokenizer(first)))
    write_report(report, Path(args.out))
    return report


def markdown_table(report: dict) -> str:
    """The report's models as rows and its metrics as columns (GitHub markdown); with
    samples, a last row holds the held-out data's own diversity (the reference)."""
    keys = [k for k in METRICS if any(k in r for r in report["models"])]
    head = "| model | " + " | ".join(METRICS[k][0] for k in keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 1)]
    for r in report["models"]:
        lines.append(f"| {r['model']} | " + " | ".join(f"{r[k]:.4f}" if k in r else "-" for k in keys) + " |")
    ref = report.get("reference")
    if ref:
        lines.append("| reference: the held-out data | " + " | ".join(f"{ref[k]:.4f}" if k in ref else "-"
                                                                      for k in keys) + " |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> None:
    """``report.json``, ``report.md`` and ``report.png`` (a grid of bar charts, one per
    metric, the models side by side; perplexity on a log scale; the diversity panels
    with the held-out data's value as a dashed target line), each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "report.json", (json.dumps(report, indent=1) + "\n").encode())
    md = (f"# Evaluation on {report['data']} ({report['n_sequences']} sequences)\n\n" + markdown_table(report)
          + "\nLower is better for CE, perplexity and KL; higher for the mass on the teacher's top-k; for the "
            "diversity measures closer to the reference (the held-out data's own continuations) is better: a "
            "random model scores high.\n")
    atomic_write(out / "report.md", md.encode())
    import io
    import textwrap

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k in METRICS if any(k in r for r in report["models"])]
    cols = min(4, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 3.3 * nrows), squeeze=False)
    names = [Path(r["model"]).name for r in report["models"]]
    colors = [f"C{i}" for i in range(len(names))]
    ref = report.get("reference") or {}
    line = None
    for i, ax in enumerate(axes.flat):
        if i >= len(keys):
            ax.set_visible(False)
            continue
        k = keys[i]
        vals = [r.get(k, float("nan")) for r in report["models"]]
        ax.bar(range(len(names)), vals, color=colors)
        ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
        better = METRICS[k][1]
        note = {"lower": "lower is better", "higher": "higher is better",
                "reference": "closer to the reference is better"}[better]
        if k == "perplexity":
            ax.set_yscale("log")
        ax.tick_params(axis="y", which="both", labelsize=8)
        if better == "reference" and k in ref:
            line = ax.axhline(ref[k], color="black", linestyle="--", linewidth=1.2)
        title = "\n".join(textwrap.wrap(PANEL_TITLES[k], 28))
        ax.set_title(f"{title}\n({note})", fontsize=9)
    if line is not None:      # one legend for the dashed target line, under the grid
        fig.legend([line], ["reference: the held-out data's own continuations (the target value)"],
                   loc="lower center", fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
    else:
        fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(out / "report.png", buf.getvalue())
