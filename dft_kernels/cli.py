"""The ``dft-kernels`` command (docs/design.md sec. 7): it parses and dispatches; the
work lives in ``dft_kernels.targets`` and ``dft_kernels.workflow``.

    dft-kernels targets build --teacher DIR --data FILE.jsonl --k 32 --out DIR [--name N --description D]
    dft-kernels targets inspect DIR
    dft-kernels targets list DIR...
    dft-kernels targets blend A B --weights 0.7 0.3 --out DIR [--k 32]
    dft-kernels train --student DIR --data FILE [--targets DIR | --teacher DIR --online topk|dense] --out DIR [--overwrite]
                      [--style-head RANK [--style-alpha A --style-name N]]
    dft-kernels eval --model DIR [DIR ...] --data FILE [--targets DIR] [--teacher DIR] --out DIR
                     [--style-head DIR|NAME ... [--presets DIR ...]]
    dft-kernels plan --model CONFIG.json|NAME --tokens N | --seq-len L [--batch-size B] [--gpu a100-80gb] [--kernels triton|torch]
    dft-kernels doctor [--model DIR | --vocab V --hidden D] [--tokens N] [--json] [--save | --clear]

Bad input (a ValueError / TypeError / missing file) ends with exit code 2 and one line
``error: ...`` on stderr. Each command group registers itself in ``COMMAND_GROUPS``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from .workflow.inputs import UsageError, nonnegative_int, positive_float, positive_int

# --------------------------------------------------------------------------- targets


def _cmd_targets_build(args) -> int:
    import inspect as _inspect

    import torch

    from . import targets
    from .workflow.guards import check_device, check_positions, quiet_transformers
    from .workflow.inputs import load_causal_lm, read_examples
    from .workflow.presets import check_preset_name, set_preset
    check_preset_name(args.name)
    check_device(args.device)
    if not Path(args.teacher).is_dir():
        raise UsageError(f"--teacher {args.teacher} is not a directory (a local Hugging Face model dir)")
    seqs = read_examples(args.data, args.teacher, args.max_length)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"auto": "auto", "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.model_dtype]
    with quiet_transformers(args.quiet):
        model = load_causal_lm(args.teacher, arg="--teacher", dtype=dtype, device=device)
    check_positions(seqs, model, model_arg=f"--teacher {args.teacher}")
    vocab = int(model.get_output_embeddings().weight.shape[0])
    if args.k == 0 and args.samples == 0:
        raise UsageError("--k 0 keeps no slot: give --k >= 1 (top-k) and/or --samples >= 1 (sampled targets)")
    if args.k > vocab:
        raise UsageError(f"--k {args.k} is larger than the teacher's vocab size {vocab}: use --k <= {vocab}")
    batches = [seqs[i:i + args.batch_size] for i in range(0, len(seqs), args.batch_size)]
    preset = {"name": args.name, "description": args.description}
    takes_preset = "description" in _inspect.signature(targets.build).parameters
    man = targets.build(model, batches, args.k, args.temperature, out_dir=args.out, shard_size=args.shard_size,
                        chunk_vocab=args.chunk_vocab, dtype=args.dtype, teacher_name=str(args.teacher),
                        progress=not args.quiet, total=len(seqs), samples=args.samples, seed=args.seed,
                        **(preset if takes_preset else {}))
    if not takes_preset:
        set_preset(args.out, args.name, args.description)
    print(f"wrote {len(man['shards'])} shard(s), {man['n_sequences']} sequences, {man['n_positions']} "
          f"positions to {args.out}" + (f" (preset {args.name})" if args.name else ""))
    return 0


def _cmd_targets_inspect(args) -> int:
    from . import targets
    info = targets.inspect(args.dir)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"teacher:      {info['teacher']}")
    print(f"positions:    {info['n_positions']}")
    print(f"sequences:    {info['n_sequences']} in {info['n_shards']} shard(s)"
          + ("" if info["complete"] else "  (INCOMPLETE: re-run the build)"))
    print(f"kind:         {info.get('kind', 'topk')}")
    print(f"k:            {info['k']}" + (f" slots = top-{info['topk']} + {info['samples']} samples, seed "
                                          f"{info['seed']}" if info.get("kind", "topk") != "topk" else ""))
    print(f"vocab:        {info['vocab_size']}")
    print(f"temperature:  {info['temperature']}")
    print(f"dtype:        {info['dtype']}")
    print(f"slot mass P:  mean {info['mass_mean']:.4f}, 5th percentile {info['mass_p5']:.4f}")
    return 0


def _cmd_targets_list(args) -> int:
    from .workflow.presets import format_table, list_presets
    rows = list_presets(args.dirs)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"no targets directories in {' '.join(args.dirs)}")
        return 0
    print(format_table(rows), end="")
    return 0


def _cmd_targets_blend(args) -> int:
    from .targets.blending import blend_dirs
    from .workflow.presets import check_preset_name, resolve_target_dir
    check_preset_name(args.name)
    if len(args.sources) < 2:
        raise UsageError(f"targets blend needs two or more directories or preset names, got {len(args.sources)}")
    if args.weights is not None and len(args.weights) != len(args.sources):
        raise UsageError(f"--weights has {len(args.weights)} values for {len(args.sources)} sources: give one "
                         "weight per directory, in the same order")
    if args.weights is not None and not all(math.isfinite(w) and w > 0 for w in args.weights):
        raise UsageError(f"--weights {' '.join(map(str, args.weights))}: weights must be finite and > 0 (drop a "
                         "source instead of giving it weight 0)")
    search = args.presets or os.environ.get("DFT_KERNELS_PRESETS", ".").split(os.pathsep)
    dirs = [resolve_target_dir(s, search) for s in args.sources]
    weights = None if args.weights is None else [w / sum(args.weights) for w in args.weights]
    man = blend_dirs(dirs, weights, out_dir=args.out, k=args.k, name=args.name, description=args.description,
                     progress=not args.quiet)
    print(f"wrote {len(man['shards'])} shard(s), {man['n_sequences']} sequences, K={man['k']}: {man['teacher']} "
          f"to {args.out}")
    return 0


def add_targets_parser(sub) -> None:
    p = sub.add_parser("targets", help="build, inspect, list and blend sparse teacher targets")
    tsub = p.add_subparsers(dest="targets_command", metavar="{build,inspect,list,blend}", required=True)

    b = tsub.add_parser("build", help="run a teacher over a dataset and store its top-K log-probs",
                        description="Run a local Hugging Face causal LM over a jsonl dataset and write "
                                    "top-K log-prob shards (resumable: re-run to finish an interrupted build).")
    b.add_argument("--teacher", required=True, help="local Hugging Face model directory")
    b.add_argument("--data", required=True,
                   help='jsonl file, one {"text": ...} (needs the tokenizer in --teacher) or {"input_ids": [...]} '
                        "per line")
    b.add_argument("--k", type=nonnegative_int, default=32,
                   help="exact top-k slots per position (default 32; 0 with --samples: sampled targets)")
    b.add_argument("--samples", type=nonnegative_int, default=0,
                   help="sampled slots per position on top of the top-k (default 0: plain top-k; "
                        "--k 4 --samples 12: hybrid)")
    b.add_argument("--seed", type=nonnegative_int, default=0,
                   help="seed of the sampled slots (same seed: byte-identical shards; default 0)")
    b.add_argument("--out", required=True, help="output directory (shards + manifest.json)")
    b.add_argument("--name", default=None, help="preset name recorded in the manifest (for list / blend)")
    b.add_argument("--description", default=None, help="a short description of the preset")
    b.add_argument("--temperature", type=positive_float, default=1.0, help="teacher temperature (default 1)")
    b.add_argument("--max-length", type=positive_int, default=None, help="truncate sequences to this length")
    b.add_argument("--batch-size", type=positive_int, default=8, help="sequences per teacher forward (default 8)")
    b.add_argument("--shard-size", type=positive_int, default=1024, help="sequences per shard (default 1024)")
    b.add_argument("--chunk-vocab", type=positive_int, default=8192,
                   help="vocab tile of the top-K pass (default 8192)")
    b.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                   help="storage dtype of the log-probs (default float16)")
    b.add_argument("--model-dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="dtype to load the teacher in (default: as saved)")
    b.add_argument("--device", default=None, help="teacher device (default: cuda if available, else cpu)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_cmd_targets_build)

    i = tsub.add_parser("inspect", help="summarise a targets directory")
    i.add_argument("dir", help="directory written by `targets build`")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.set_defaults(func=_cmd_targets_inspect)

    ls = tsub.add_parser("list", help="list the targets directories (presets) in some directories")
    ls.add_argument("dirs", nargs="+", help="targets directories, or folders holding them")
    ls.add_argument("--json", action="store_true", help="print the rows as JSON")
    ls.set_defaults(func=_cmd_targets_list)

    bl = tsub.add_parser("blend", help="weighted mixture of target directories or presets, shard by shard",
                         description="Per position, the mixture sum_i w_i p_i over the union of the teachers' ids, "
                                     "the K of largest mass kept (resumable: re-run to finish).")
    bl.add_argument("sources", nargs="+", help="targets directories or preset names (see --presets)")
    bl.add_argument("--weights", type=float, nargs="+", default=None,
                    help="one weight per source (normalised to sum 1; default uniform)")
    bl.add_argument("--out", required=True, help="output directory")
    bl.add_argument("--k", type=positive_int, default=None, help="slots per position (default: the largest K)")
    bl.add_argument("--name", default=None, help="preset name of the blend")
    bl.add_argument("--description", default=None, help="a short description of the blend")
    bl.add_argument("--presets", nargs="+", default=None,
                    help="folders searched for preset names (default: $DFT_KERNELS_PRESETS or .)")
    bl.add_argument("--quiet", action="store_true", help="no progress bar")
    bl.set_defaults(func=_cmd_targets_blend)


# --------------------------------------------------------------------------- train / eval / plan


def _cmd_train(args) -> int:
    from .workflow.train import run_train, summary_line
    summary = run_train(args, args.hf_overrides)
    print(summary_line(summary, args.out))
    return 0


def add_train_parser(sub) -> None:
    from .workflow.train import add_train_arguments
    t = sub.add_parser("train", help="fine-tune a model with DFT (DFTTrainer); any TrainingArguments as --hf-KEY V",
                       description="Fine-tune --student with the DFT loss against offline --targets or an online "
                                   "--teacher (neither: plain cross-entropy, lam does not apply). Checkpoints in "
                                   "--out; re-run the same command to resume after a crash (only the same run "
                                   "resumes: --overwrite starts over). An --hf-KEY that sets the same "
                                   "TrainingArguments field as a flag (--hf-per_device_train_batch_size and "
                                   "--batch-size) wins over it, with a warning.")
    add_train_arguments(t)
    t.set_defaults(func=_cmd_train, takes_hf=True, train_parser=t)


def _cmd_eval(args) -> int:
    from .workflow.evaluate import markdown_table, run_eval
    from .workflow.guards import quiet_transformers
    with quiet_transformers(args.quiet):
        report = run_eval(args)
    print(markdown_table(report), end="")
    print(f"report in {args.out}/report.json, report.md, report.png")
    return 0


def add_eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="held-out CE / perplexity, KL to the teacher, lexical diversity; JSON + MD + PNG")
    e.add_argument("--model", nargs="+", required=True, help="one or more model directories (side by side)")
    e.add_argument("--data", required=True, help="held-out jsonl")
    e.add_argument("--targets", default=None, help="targets built from --data: sparse KL and mass on the top-k")
    e.add_argument("--teacher", default=None,
                   help="teacher model directory: full-vocabulary KL(teacher || model); with --targets it must be "
                        "the teacher the targets were built with (refused otherwise)")
    e.add_argument("--style-head", nargs="+", default=None, metavar="DIR_OR_NAME",
                   help="style heads (train --style-head) to score on the one --model, each next to the model alone: "
                        "directories or names (searched in --presets)")
    e.add_argument("--presets", nargs="+", default=None,
                   help="folders searched for --style-head names (default: $DFT_KERNELS_PRESETS or .)")
    e.add_argument("--generate", type=int, default=0, help="sample N continuations per model for distinct-1/2, TTR")
    e.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens per sample (default 32)")
    e.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    e.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward (default 8)")
    e.add_argument("--max-length", type=positive_int, default=None, help="truncate sequences to this length")
    e.add_argument("--out", required=True, help="report directory")
    e.add_argument("--quiet", action="store_true", help="no weight-loading progress bars")
    e.set_defaults(func=_cmd_eval)


def _cmd_plan(args) -> int:
    from .workflow.plan import load_config, memory_plan, plan_text
    if args.master_weights and args.dtype == "fp32":
        from .workflow.guards import warn
        warn("--master-weights with --dtype fp32 adds nothing: the weights are fp32 already")
    if (args.tokens is None) == (args.seq_len is None):
        raise UsageError("plan needs one of --tokens N (tokens per step) or --seq-len L (with --batch-size B)")
    tokens = args.tokens if args.tokens is not None else args.seq_len * args.batch_size
    teacher = load_config(args.teacher, flag="--teacher") if args.teacher else None
    p = memory_plan(load_config(args.model), tokens=tokens, k=args.k, lora=args.lora, optimizer=args.optimizer,
                    grad_ckpt=args.grad_ckpt, gpu=args.gpu, dtype=args.dtype, master_weights=args.master_weights,
                    kernels=args.kernels, teacher=teacher, divergence=args.divergence)
    print(json.dumps(p, indent=1) if args.json else plan_text(p))
    return 0


def add_plan_parser(sub) -> None:
    from .workflow.plan import DTYPE_BYTES, GPUS, NAMED_CONFIGS, OPTIMIZER_BYTES
    p = sub.add_parser("plan", help="memory of a training step for a model config and a GPU")
    p.add_argument("--model", required=True, help=f"config.json (or its dir) or one of {', '.join(NAMED_CONFIGS)}")
    p.add_argument("--tokens", type=positive_int, default=None, help="tokens per step (batch * sequence length)")
    p.add_argument("--seq-len", type=positive_int, default=None,
                   help="sequence length, instead of --tokens (tokens per step = --batch-size * --seq-len)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="sequences per step with --seq-len (default 1)")
    p.add_argument("--kernels", choices=("triton", "torch"), default="triton",
                   help="the loss path modelled: triton (a GPU, default) or torch (the chunked PyTorch path: CPU)")
    p.add_argument("--k", type=nonnegative_int, default=32,
                   help="teacher slots per position (default 32; 0: plain cross-entropy)")
    p.add_argument("--teacher", default=None,
                   help="an online teacher's config.json or name: dense distillation over the full vocab "
                        "(fused_linear_distill_loss; --k not used), the teacher's weights held frozen")
    p.add_argument("--divergence", choices=("forward_kl", "reverse_kl", "jsd"), default="forward_kl",
                   help="the dense loss's divergence with --teacher (default forward_kl)")
    p.add_argument("--lora", type=positive_int, default=None, help="LoRA rank (default: full fine-tune)")
    p.add_argument("--optimizer", choices=tuple(OPTIMIZER_BYTES), default="adamw",
                   help="optimizer state per trained parameter, fp32: adamw 8 B (m, v), adamw8bit 2 B, sgd 0")
    p.add_argument("--master-weights", action="store_true",
                   help="mixed precision with an fp32 master copy of the trained weights (+4 B per trained "
                        "parameter; default: the optimizer updates the bf16/fp16 weights directly)")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing of every decoder layer")
    p.add_argument("--gpu", choices=tuple(GPUS), default="a100-80gb")
    p.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default="bf16", help="weights / activations dtype")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_cmd_plan)


def add_doctor_parser(sub) -> None:
    from .doctor import add_parser
    add_parser(sub)


#: One function per command group; each adds its parser(s) to the top-level subparsers.
COMMAND_GROUPS = [add_targets_parser, add_train_parser, add_eval_parser, add_plan_parser, add_doctor_parser]


class _Parser(argparse.ArgumentParser):
    """argparse with the command line's error convention: one line ``error: ...`` naming the
    argument (and the command's --help for the fix), exit code 2. Subcommand parsers are of
    the same class (argparse makes them with the parent's class)."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {' '.join(message.split())} (see {self.prog} --help)\n")


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dft-kernels", description="Distribution Fine-Tuning kernels: tools")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMAND_GROUPS:
        add(sub)
    return parser


_UNSET = object()


def _given_flags(sub_parser, argv: list) -> set:
    """The dests of the flags given on the command line (not left at their default),
    by parsing the command's arguments again into a namespace of markers."""
    rest = argv[argv.index("train") + 1:] if "train" in argv else argv
    ns = argparse.Namespace(**{a.dest: _UNSET for a in sub_parser._actions if a.dest != argparse.SUPPRESS})
    sub_parser.parse_known_args(rest, namespace=ns)
    return {d for d, v in vars(ns).items() if v is not _UNSET}


def _parse(argv) -> argparse.Namespace:
    """Parse; ``train`` also takes ``--hf-KEY VALUE`` pairs and a ``--config`` YAML file
    (its keys are the flags' names; command-line flags win)."""
    parser = make_parser()
    args, extra = parser.parse_known_args(argv)
    if not getattr(args, "takes_hf", False):
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return args
    from .workflow.train import parse_hf_overrides
    args.explicit = _given_flags(args.train_parser, list(sys.argv[1:] if argv is None else argv))
    hf = {}
    if args.config:
        import yaml
        path = Path(args.config)
        if not path.is_file():
            raise UsageError(f"--config {path} does not exist: give a YAML file")
        try:
            cfg = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UsageError(f"--config {path} is not YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(cfg, dict):
            raise UsageError(f"--config {path} must be a mapping of flag names to values")
        hf = dict(cfg.pop("hf", None) or {})
        flags = {k.replace("-", "_"): v for k, v in cfg.items()}
        unknown = sorted(k for k in flags if not hasattr(args, k) or k in ("func", "takes_hf", "train_parser", "config"))
        if unknown:
            raise UsageError(f"--config {path}: unknown key {unknown[0]!r}: use train's flag names")
        for k, v in flags.items():   # YAML fills the flags the command line did not give
            if k not in args.explicit:
                setattr(args, k, v)
                args.explicit.add(k)
    hf.update(parse_hf_overrides(extra))
    args.hf_overrides = hf
    return args


def main(argv=None) -> int:
    """Run the command; 0 on success, 2 with one line ``error: ...`` on bad input."""
    try:
        args = _parse(argv)
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
