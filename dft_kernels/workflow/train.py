"""``dft-kernels train``: DFTTrainer from flags (or a YAML file) on a jsonl data file,
offline targets, an online teacher, or none (plain cross-entropy, the SFT baseline);
``--style-head RANK`` trains and saves a style head instead of the model."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from ..options import ACCURACIES, DIVERGENCES, LOSS_DEFAULTS, STRATEGIES, TAILS
from ..targets.store import atomic_write, read_manifest
from .guards import (check_positions, compare_tokenizers, last_checkpoint, prepare_out, quiet_transformers,
                     run_fingerprint, warn)
from .inputs import (UsageError, check_targets_dir, check_token_ids, load_causal_lm, load_tokenizer, positive_float,
                     positive_int, read_examples, vocab_size_of)

#: written last, atomically: its presence means the run finished
SUMMARY = "train_summary.json"
#: the loss options ``train`` exposes as flags (DFTConfig fields of the same name)
LOSS_FLAGS = {"lam": float, "divergence": DIVERGENCES, "beta": float, "tail": TAILS, "accuracy": ACCURACIES,
              "temperature": float, "strategy": STRATEGIES}
#: the loss flags that need a teacher: without --targets / --teacher the loss is the accuracy term at weight 1
TEACHER_ONLY_FLAGS = ("lam", "divergence", "beta", "tail", "temperature")
#: train flag -> the TrainingArguments field it sets (an --hf-FIELD given as well wins)
HF_FIELD_OF_FLAG = {"batch_size": "per_device_train_batch_size", "lr": "learning_rate", "epochs": "num_train_epochs",
                    "max_steps": "max_steps", "logging_steps": "logging_steps", "save_steps": "save_steps",
                    "seed": "seed", "quiet": "disable_tqdm"}


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


def training_arguments(args, hf: dict):
    """TrainingArguments from the command's flags, then the YAML ``hf`` mapping and
    ``--hf-KEY`` flags on top (later wins)."""
    import torch
    from transformers import TrainingArguments
    logging_steps = args.logging_steps
    if args.max_steps > 0 and logging_steps > args.max_steps:
        logging_steps = args.max_steps       # log at least once: the summary's loss first -> last needs a log
    kw = dict(output_dir=str(args.out), per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
              num_train_epochs=args.epochs, max_steps=args.max_steps, logging_steps=logging_steps,
              save_steps=args.save_steps, save_total_limit=2, report_to="none", seed=args.seed,
              disable_tqdm=args.quiet, use_cpu=not torch.cuda.is_available(), remove_unused_columns=False)
    if args.eval_data:
        kw.update(eval_strategy="steps", eval_steps=logging_steps, per_device_eval_batch_size=args.batch_size)
    explicit = getattr(args, "explicit", None) or set()
    for flag, field in HF_FIELD_OF_FLAG.items():
        if field in hf and flag in explicit and hf[field] != kw[field]:
            warn(f"--hf-{field} {hf[field]} wins over --{flag.replace('_', '-')} {getattr(args, flag)} "
                 "(--hf-KEY is applied last); give one of the two")
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


def _read(path, args, model, tokenizer_dir, arg: str) -> list[list[int]]:
    seqs = read_examples(path, tokenizer_dir, args.max_length, arg=arg)
    check_token_ids(seqs, vocab_size_of(model), arg=arg, model=f"--student {args.student}")
    check_positions(seqs, model, model_arg=f"--student {args.student}", data_arg=arg)
    return seqs


def _dataset(seqs, args, model, tokenizer):
    examples = [{"input_ids": s} for s in seqs]
    if args.targets is None:
        return examples
    from ..data import DFTTargetsDataset
    # the student's tokenizer against the one the targets were built with, when both are known
    tok = tokenizer if read_manifest(args.targets).get("tokenizer_fingerprint") else None
    return DFTTargetsDataset(examples, args.targets, vocab_size=vocab_size_of(model), tokenizer=tok)


def dft_config(args):
    """The DFTConfig of the run: the loss flags, the teacher route; plain cross-entropy
    (the accuracy term at weight 1, no divergence: ``lam`` does not apply) when there is
    no teacher; with ``--targets`` its ``k`` is the targets' K."""
    from ..hf import DFTConfig
    kw = {name: getattr(args, name) for name in LOSS_FLAGS}
    if args.targets is None and args.teacher is None:
        kw["lam"] = 1.0          # no targets: the accuracy term at weight 1 (the SFT baseline is CE itself)
    if args.targets is not None:
        k = read_manifest(args.targets).get("k")
        if isinstance(k, int) and k >= 1:
            kw["k"] = k
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


def _flag_warnings(args) -> None:
    """Flags given that this route ignores: one warning each."""
    explicit = getattr(args, "explicit", None) or set()
    if args.targets is None and args.teacher is None:
        given = [f"--{n}" for n in TEACHER_ONLY_FLAGS if n in explicit]
        if given:
            warn(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply without --targets / --teacher: "
                 "the loss is plain "
                 "cross-entropy (the accuracy term at weight 1, recorded as lam 1.0 in train_summary.json)")
        if "k" in explicit:
            warn(f"--k {args.k} does not apply without --teacher --online topk (plain cross-entropy)")
    elif "k" in explicit and args.targets is not None:
        warn(f"--k {args.k} is ignored with --targets: the targets' K ({read_manifest(args.targets).get('k')}) "
             "is used; build or blend targets with another --k to change it")
    elif "k" in explicit and args.online == "dense":
        warn(f"--k {args.k} is ignored with --online dense (the teacher's full distribution); use --online topk "
             "to keep K slots")


def run_train(args, hf: dict) -> dict:
    """Train ``args.student`` and save it to ``args.out``; returns the summary dict.

    Resumes from the newest ``checkpoint-N`` in ``args.out`` when the run recorded
    there (``run_fingerprint.json``: student weights at the start, tokenizer, data,
    targets, teacher, loss options) is this one, and refuses otherwise unless
    ``args.overwrite``; ``args.resume`` demands a checkpoint.
    """
    if (args.targets is None) == (args.teacher is None) and args.targets is not None:
        raise UsageError("give either --targets DIR (offline) or --teacher DIR --online topk|dense, not both")
    if args.teacher is not None and args.online is None:
        raise UsageError("--teacher needs --online topk|dense (the teacher runs next to the student)")
    if args.online is not None and args.teacher is None:
        raise UsageError(f"--online {args.online} needs --teacher DIR (the model that runs next to the student); "
                         "for offline targets pass --targets DIR and drop --online")
    if args.eval_data and args.targets is not None:
        raise UsageError("--eval-data with --targets needs targets for the eval data too (not supported): drop "
                         "--eval-data and score held-out data with `dft-kernels eval --targets`")
    overwrite = bool(getattr(args, "overwrite", False))
    if args.resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other: drop one")
    out = Path(args.out)
    if args.resume and (not out.is_dir() or last_checkpoint(out) is None):
        raise UsageError(f"--resume: {out} holds no checkpoint-N directory to resume from; drop --resume")
    if args.targets is not None:
        check_targets_dir(args.targets)
    _check_style_flags(args)
    _flag_warnings(args)
    with quiet_transformers(args.quiet):   # no weight loading / saving bars
        return _train(args, hf, out, overwrite)


def _check_style_flags(args) -> None:
    """``--style-head RANK`` and the flags that go with it (docs/design.md sec. 17.2)."""
    from .presets import check_preset_name
    rank = getattr(args, "style_head", None)
    for flag in ("style_alpha", "style_name"):
        if getattr(args, flag, None) is not None and rank is None:
            raise UsageError(f"--{flag.replace('_', '-')} needs --style-head RANK (it describes the style head)")
    check_preset_name(getattr(args, "style_name", None))


def _style(args) -> dict | None:
    """The style head of the run as recorded (fingerprint, summary), or None."""
    rank = getattr(args, "style_head", None)
    if rank is None:
        return None
    return {"rank": rank, "alpha": float(args.style_alpha if args.style_alpha is not None else rank)}


def _style_name(args) -> str | None:
    if args.style_name is not None:
        return args.style_name
    return read_manifest(args.targets).get("name") if args.targets is not None else None


def _train(args, hf: dict, out: Path, overwrite: bool) -> dict:
    """:func:`run_train` after the checks that need no model: load, check, fingerprint, train, save."""
    cfg = dft_config(args)
    model = load_causal_lm(args.student, arg="--student")
    student_tok = load_tokenizer(args.student)
    tok_dir = args.student if student_tok is not None else args.teacher
    seqs = _read(args.data, args, model, tok_dir, "--data")
    eval_seqs = _read(args.eval_data, args, model, tok_dir, "--eval-data") if args.eval_data else None
    train_ds = _dataset(seqs, args, model, student_tok)
    eval_ds = None if eval_seqs is None else _dataset(eval_seqs, args, model, student_tok)
    targs = training_arguments(args, hf)
    from ..hf import DFTTrainer
    extra, teacher = {}, None
    if args.teacher is not None:
        teacher = load_causal_lm(args.teacher, arg="--teacher")
        tv, sv = vocab_size_of(teacher), vocab_size_of(model)
        if tv != sv:
            raise UsageError(f"--teacher {args.teacher} has vocab size {tv}, --student {args.student} has {sv}: "
                             "an online teacher must share the student's tokenizer")
        compare_tokenizers(args.student, args.teacher, a_arg="--student", b_arg="--teacher", vocab_a=sv,
                           vocab_b=tv, purpose="the online teacher's targets")
        for s_, arg in ((seqs, "--data"), (eval_seqs, "--eval-data")):
            if s_ is not None:
                check_positions(s_, teacher, model_arg=f"--teacher {args.teacher}", data_arg=arg)
        if args.online == "topk" and args.k > tv:
            raise UsageError(f"--k {args.k} is larger than the teacher's vocab size {tv}: use --k <= {tv} "
                             "(or --online dense)")
        extra["teacher_model"] = teacher
    recorded = _recorded_config(cfg, args)
    style = _style(args)
    fingerprint = run_fingerprint(student=model, tokenizer_dir=args.student, seqs=seqs, eval_seqs=eval_seqs,
                                  targets_dir=args.targets, teacher=teacher,
                                  loss=recorded if style is None else {**recorded, "style_head": style})
    resume = prepare_out(out, fingerprint, overwrite=overwrite, resume_required=args.resume)
    if style is not None:          # after the fingerprint (the base's weights), seeded: A starts the same on a rerun
        import torch

        from ..hf import add_style_head
        torch.manual_seed(args.seed)
        add_style_head(model, rank=style["rank"], alpha=style["alpha"])
    trainer = DFTTrainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=eval_ds, dft_config=cfg,
                         processing_class=student_tok, **extra)
    if resume is not None:
        print(f"resuming from {resume} (the same run: {out}/run_fingerprint.json matches)")
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    secs = time.perf_counter() - t0
    if style is not None:          # only the style head: the base stays where it is
        from ..hf import save_style_head
        style.update(name=_style_name(args), path=str(save_style_head(model, out, targets=args.targets,
                                                                      name=_style_name(args))))
    else:
        trainer.save_model(str(out))
        if student_tok is not None:
            student_tok.save_pretrained(str(out))
    logs = [h for h in trainer.state.log_history if "loss" in h]
    last = logs[-1] if logs else {}
    sft = args.targets is None and args.teacher is None       # no divergence term at all
    mean = next((h["train_loss"] for h in reversed(trainer.state.log_history) if "train_loss" in h), None)
    summary = {"steps": trainer.state.global_step, "seconds": round(secs, 2), "resumed_from": str(resume) if resume
               else None, "first_loss": logs[0]["loss"] if logs else None, "last_loss": last.get("loss"),
               "mean_loss": mean, "last_divergence": None if sft else last.get("dft_divergence"),
               "last_accuracy": last.get("dft_accuracy"), "accuracy_weight": recorded["lam"],
               "dft_config": recorded, "style_head": style, "log_history": trainer.state.log_history}
    atomic_write(out / SUMMARY, (json.dumps(summary, indent=1, default=str) + "\n").encode())
    return summary


def _recorded_config(cfg, args) -> dict:
    """The DFTConfig as it applies: ``k`` is the targets' K offline, ``--k`` with
    ``--online topk``, None where no K applies (dense, plain cross-entropy)."""
    d = dataclasses.asdict(cfg)
    if "k" in d and args.targets is None and not (args.teacher is not None and args.online == "topk"):
        d["k"] = None
    return d


def summary_line(summary: dict, out) -> str:
    """One line: steps, loss first -> last, the last divergence / accuracy terms, time, where."""
    def f(x):
        return "n/a" if x is None else f"{x:.4f}"
    saved = f"style head (rank {summary['style_head']['rank']}) saved to {out}" if summary.get("style_head") \
        else f"model saved to {out}"
    if summary["first_loss"] is None:        # no logging step was reached: the run's mean loss instead
        loss = "no step logged" if summary.get("mean_loss") is None else f"mean loss {f(summary['mean_loss'])}"
        return f"trained {summary['steps']} steps in {summary['seconds']:.1f}s: {loss}; {saved}"
    parts = [f"{name} {f(summary[key])}" for name, key in (("divergence", "last_divergence"),
                                                            ("accuracy", "last_accuracy")) if summary[key] is not None]
    return (f"trained {summary['steps']} steps in {summary['seconds']:.1f}s: loss {f(summary['first_loss'])} -> "
            f"{f(summary['last_loss'])}{' (' + ', '.join(parts) + ')' if parts else ''}; {saved}")


def add_train_arguments(p) -> None:
    """The flags of ``dft-kernels train`` (``--hf-KEY VALUE`` pairs are read separately)."""
    p.add_argument("--student", required=True, help="local Hugging Face model directory to fine-tune")
    p.add_argument("--data", required=True, help='training jsonl: {"text": ...} or {"input_ids": [...]} per line')
    p.add_argument("--targets", default=None, help="targets directory built from --data (offline teacher)")
    p.add_argument("--teacher", default=None, help="teacher model directory (online teacher, with --online)")
    p.add_argument("--online", choices=("topk", "dense"), default=None, help="online teacher: top-k or dense")
    p.add_argument("--k", type=positive_int, default=32,
                   help="teacher slots per position with --online topk (default 32; with --targets the targets' K "
                        "is used, --online dense keeps the full distribution)")
    p.add_argument("--eval-data", default=None,
                   help="held-out jsonl evaluated every --logging-steps; without --targets only (SFT or --teacher "
                        "runs): with --targets score held-out data with `dft-kernels eval --targets`")
    p.add_argument("--out", required=True, help="output directory (checkpoints, final model, train_summary.json, "
                                                "run_fingerprint.json)")
    p.add_argument("--config", default=None, help="YAML file: any of these flags by name, and an 'hf:' mapping "
                                                  "of TrainingArguments (flags given on the command line win)")
    p.add_argument("--resume", action="store_true", help="require a checkpoint in --out to resume from "
                                                         "(one of the same run is used anyway when present)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in --out even if it holds a run of other settings (its checkpoints are "
                        "deleted); without it such a run is refused, the same run is resumed")
    p.add_argument("--max-length", type=positive_int, default=None, help="truncate sequences to this length")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="per-device batch size (default 8; --hf-per_device_train_batch_size wins when both are given)")
    p.add_argument("--lr", type=positive_float, default=5e-5,
                   help="learning rate (default 5e-5; --hf-learning_rate wins when both are given)")
    p.add_argument("--epochs", type=positive_float, default=1.0, help="epochs (default 1)")
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (default: epochs)")
    p.add_argument("--logging-steps", type=positive_int, default=10,
                   help="log every N steps (default 10; at most --max-steps, so that one step is logged)")
    p.add_argument("--save-steps", type=positive_int, default=500, help="checkpoint every N steps (default 500)")
    p.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (training and weight loading)")
    p.add_argument("--style-head", type=positive_int, default=None, metavar="RANK",
                   help="train a style head of this rank instead of the model: a low-rank correction of the frozen "
                        "lm_head, the decoder run without gradients; only the head is saved to --out "
                        "(style_head.safetensors + style_head.json; eval --style-head reads it)")
    p.add_argument("--style-alpha", type=positive_float, default=None,
                   help="the style head's alpha (scaling = alpha / rank; default: the rank, scaling 1)")
    p.add_argument("--style-name", default=None,
                   help="preset name recorded in the style head, for eval --style-head NAME (default: the name of "
                        "the --targets preset, if it has one)")
    for name, kind in LOSS_FLAGS.items():
        if isinstance(kind, tuple):
            p.add_argument(f"--{name}", choices=kind, default=LOSS_DEFAULTS.get(name, kind[0]),
                           help=f"DFT loss option (default {LOSS_DEFAULTS.get(name, kind[0])})")
        else:
            extra = "; without --targets / --teacher the loss is CE at weight 1" if name == "lam" else ""
            p.add_argument(f"--{name}", type=kind, default=LOSS_DEFAULTS[name],
                           help=f"DFT loss option (default {LOSS_DEFAULTS[name]}{extra})")
