"""``dft-kernels train``: DFTTrainer from flags (or a YAML file) on a jsonl data file,
offline targets, an online teacher, or none (plain cross-entropy, the SFT baseline)."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from ..options import ACCURACIES, DIVERGENCES, LOSS_DEFAULTS, STRATEGIES, TAILS
from ..targets.store import atomic_write
from .inputs import (UsageError, check_targets_dir, check_token_ids, load_causal_lm, load_tokenizer, positive_float,
                     positive_int, read_examples, vocab_size_of)

#: written last, atomically: its presence means the run finished
SUMMARY = "train_summary.json"
#: the loss options ``train`` exposes as flags (DFTConfig fields of the same name)
LOSS_FLAGS = {"lam": float, "divergence": DIVERGENCES, "beta": float, "tail": TAILS, "accuracy": ACCURACIES,
              "temperature": float, "strategy": STRATEGIES}


def parse_hf_value(text: str):
    """A ``--hf-KEY value`` string as int, float, bool, None or the string itself."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_hf_overrides(extra: list[str]) -> dict:
    """``["--hf-learning_rate", "1e-4", ...]`` -> ``{"learning_rate": 1e-4}``; UsageError otherwise."""
    out, i = {}, 0
    while i < len(extra):
        flag = extra[i]
        if not flag.startswith("--hf-") or len(flag) == 5:
            raise UsageError(f"unrecognized argument {flag}: TrainingArguments go as --hf-KEY VALUE "
                             "(e.g. --hf-warmup_steps 10)")
        if i + 1 >= len(extra):
            raise UsageError(f"{flag} needs a value: --hf-KEY VALUE")
        out[flag[5:].replace("-", "_")] = parse_hf_value(extra[i + 1])
        i += 2
    return out


def last_checkpoint(out: Path) -> Path | None:
    """The checkpoint-N directory of ``out`` with the largest N that holds a trainer state."""
    cks = [p for p in out.glob("checkpoint-*") if p.name[11:].isdigit() and (p / "trainer_state.json").is_file()]
    return max(cks, key=lambda p: int(p.name[11:])) if cks else None


def training_arguments(args, hf: dict):
    """TrainingArguments from the command's flags, then the YAML ``hf`` mapping and
    ``--hf-KEY`` flags on top (later wins)."""
    import torch
    from transformers import TrainingArguments
    kw = dict(output_dir=str(args.out), per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
              num_train_epochs=args.epochs, max_steps=args.max_steps, logging_steps=args.logging_steps,
              save_steps=args.save_steps, save_total_limit=2, report_to="none", seed=args.seed,
              disable_tqdm=args.quiet, use_cpu=not torch.cuda.is_available(), remove_unused_columns=False)
    if args.eval_data:
        kw.update(eval_strategy="steps", eval_steps=args.logging_steps, per_device_eval_batch_size=args.batch_size)
    kw.update(hf)
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    unknown = sorted(set(hf) - fields)
    if unknown:
        raise UsageError(f"--hf-{unknown[0]} is not a TrainingArguments field: see transformers' "
                         "TrainingArguments for the names")
    try:
        return TrainingArguments(**kw)
    except (ValueError, TypeError) as e:
        raise UsageError(f"TrainingArguments rejected the options: {str(e).splitlines()[0]}") from None


def _dataset(path, args, model, tokenizer_dir, arg: str):
    seqs = read_examples(path, tokenizer_dir, args.max_length, arg=arg)
    check_token_ids(seqs, vocab_size_of(model), arg=arg, model=f"--student {args.student}")
    examples = [{"input_ids": s} for s in seqs]
    if args.targets is None:
        return examples
    from ..data import DFTTargetsDataset
    return DFTTargetsDataset(examples, args.targets, vocab_size=vocab_size_of(model))


def dft_config(args):
    """The DFTConfig of the run: the loss flags, the teacher route; plain cross-entropy
    (``lam = 1``, no divergence) when there is no teacher."""
    from ..hf import DFTConfig
    kw = {name: getattr(args, name) for name in LOSS_FLAGS}
    if args.targets is None and args.teacher is None:
        kw["lam"] = 1.0          # no targets: the loss is lam * CE, the SFT baseline wants CE itself
    if args.teacher is not None:
        fields = {f.name for f in dataclasses.fields(DFTConfig)}
        if "teacher" not in fields:
            raise UsageError("--teacher (online teacher) needs DFTConfig(teacher=...), which this version of "
                             "dft_kernels does not have: build targets with `targets build` and pass --targets")
        kw.update(teacher=args.online, k=args.k)
    try:
        return DFTConfig(**kw)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None


def run_train(args, hf: dict) -> dict:
    """Train ``args.student`` and save it to ``args.out``; returns the summary dict.

    Resumes from the newest ``checkpoint-N`` in ``args.out`` when there is one (the
    same command re-run after a crash finishes the job); ``args.resume`` demands one.
    """
    if (args.targets is None) == (args.teacher is None) and args.targets is not None:
        raise UsageError("give either --targets DIR (offline) or --teacher DIR --online topk|dense, not both")
    if args.teacher is not None and args.online is None:
        raise UsageError("--teacher needs --online topk|dense (the teacher runs next to the student)")
    if args.online is not None and args.teacher is None:
        raise UsageError(f"--online {args.online} needs --teacher DIR (the model that runs next to the student); "
                         "for offline targets pass --targets DIR and drop --online")
    if args.targets is not None:
        check_targets_dir(args.targets)
    out = Path(args.out)
    resume = last_checkpoint(out) if out.is_dir() else None
    if args.resume and resume is None:
        raise UsageError(f"--resume: {out} holds no checkpoint-N directory to resume from; drop --resume")
    cfg = dft_config(args)
    model = load_causal_lm(args.student, arg="--student")
    tok_dir = args.student if load_tokenizer(args.student) is not None else args.teacher
    train_ds = _dataset(args.data, args, model, tok_dir, "--data")
    eval_ds = None
    if args.eval_data:
        if args.targets is not None:
            raise UsageError("--eval-data with --targets needs targets for the eval data too; evaluate with "
                             "`dft-kernels eval` instead")
        eval_ds = _dataset(args.eval_data, args, model, tok_dir, "--eval-data")
    targs = training_arguments(args, hf)
    from ..hf import DFTTrainer
    extra = {}
    if args.teacher is not None:
        teacher = load_causal_lm(args.teacher, arg="--teacher")
        tv, sv = vocab_size_of(teacher), vocab_size_of(model)
        if tv != sv:
            raise UsageError(f"--teacher {args.teacher} has vocab size {tv}, --student {args.student} has {sv}: "
                             "an online teacher must share the student's tokenizer")
        if args.online == "topk" and args.k > tv:
            raise UsageError(f"--k {args.k} is larger than the teacher's vocab size {tv}: use --k <= {tv} "
                             "(or --online dense)")
        extra["teacher_model"] = teacher
    trainer = DFTTrainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=eval_ds, dft_config=cfg,
                         processing_class=load_tokenizer(args.student), **extra)
    if resume is not None:
        print(f"resuming from {resume}")
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    secs = time.perf_counter() - t0
    trainer.save_model(str(out))
    tok = load_tokenizer(args.student)
    if tok is not None:
        tok.save_pretrained(str(out))
    logs = [h for h in trainer.state.log_history if "loss" in h]
    last = logs[-1] if logs else {}
    summary = {"steps": trainer.state.global_step, "seconds": round(secs, 2), "resumed_from": str(resume) if resume
               else None, "first_loss": logs[0]["loss"] if logs else None, "last_loss": last.get("loss"),
               "last_divergence": last.get("dft_divergence"), "last_accuracy": last.get("dft_accuracy"),
               "dft_config": dataclasses.asdict(cfg), "log_history": trainer.state.log_history}
    atomic_write(out / SUMMARY, (json.dumps(summary, indent=1, default=str) + "\n").encode())
    return summary


def summary_line(summary: dict, out) -> str:
    """One line: steps, loss first -> last, the last divergence / accuracy terms, time, where."""
    def f(x):
        return "n/a" if x is None else f"{x:.4f}"
    return (f"trained {summary['steps']} steps in {summary['seconds']:.1f}s: loss {f(summary['first_loss'])} -> "
            f"{f(summary['last_loss'])} (divergence {f(summary['last_divergence'])}, accuracy "
            f"{f(summary['last_accuracy'])}); model saved to {out}")


def add_train_arguments(p) -> None:
    """The flags of ``dft-kernels train`` (``--hf-KEY VALUE`` pairs are read separately)."""
    p.add_argument("--student", required=True, help="local Hugging Face model directory to fine-tune")
    p.add_argument("--data", required=True, help='training jsonl: {"text": ...} or {"input_ids": [...]} per line')
    p.add_argument("--targets", default=None, help="targets directory built from --data (offline teacher)")
    p.add_argument("--teacher", default=None, help="teacher model directory (online teacher, with --online)")
    p.add_argument("--online", choices=("topk", "dense"), default=None, help="online teacher: top-k or dense")
    p.add_argument("--k", type=positive_int, default=32, help="teacher slots per position with --online topk")
    p.add_argument("--eval-data", default=None, help="held-out jsonl evaluated every --logging-steps (no targets)")
    p.add_argument("--out", required=True, help="output directory (checkpoints, final model, train_summary.json)")
    p.add_argument("--config", default=None, help="YAML file: any of these flags by name, and an 'hf:' mapping "
                                                  "of TrainingArguments (flags given on the command line win)")
    p.add_argument("--resume", action="store_true", help="require a checkpoint in --out to resume from "
                                                         "(one is used anyway when present)")
    p.add_argument("--max-length", type=positive_int, default=None, help="truncate sequences to this length")
    p.add_argument("--batch-size", type=positive_int, default=8, help="per-device batch size (default 8)")
    p.add_argument("--lr", type=positive_float, default=5e-5, help="learning rate (default 5e-5)")
    p.add_argument("--epochs", type=positive_float, default=1.0, help="epochs (default 1)")
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (default: epochs)")
    p.add_argument("--logging-steps", type=positive_int, default=10, help="log every N steps (default 10)")
    p.add_argument("--save-steps", type=positive_int, default=500, help="checkpoint every N steps (default 500)")
    p.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    for name, kind in LOSS_FLAGS.items():
        if isinstance(kind, tuple):
            p.add_argument(f"--{name}", choices=kind, default=LOSS_DEFAULTS.get(name, kind[0]),
                           help=f"DFT loss option (default {LOSS_DEFAULTS.get(name, kind[0])})")
        else:
            p.add_argument(f"--{name}", type=kind, default=LOSS_DEFAULTS[name],
                           help=f"DFT loss option (default {LOSS_DEFAULTS[name]})")
