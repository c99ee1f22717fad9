"""The ``dft-kernels`` command.

    dft-kernels targets build --teacher DIR --data FILE.jsonl --k 32 --out DIR
    dft-kernels targets inspect DIR

Each command group registers itself with ``add_<group>_parser(subparsers)`` and sets
``func`` on its parsers; a new group (e.g. ``bench``) adds one such function to
``COMMAND_GROUPS``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number > 0")
    return v


# --------------------------------------------------------------------------- targets


def _read_jsonl(path: Path, tokenizer_dir: str, max_length: int | None):
    """Yield one list of token ids per line: {"input_ids": [...]} or {"text": ...}."""
    tok = None
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {path}:{n} is not JSON ({e})") from None
            if isinstance(rec, dict) and "input_ids" in rec:
                ids = rec["input_ids"]
                if not isinstance(ids, list) or not all(isinstance(x, int) and not isinstance(x, bool)
                                                        for x in ids):
                    raise SystemExit(f"error: {path}:{n}: input_ids must be a list of ints")
            elif isinstance(rec, dict) and isinstance(rec.get("text"), str):
                if tok is None:
                    from transformers import AutoTokenizer
                    try:
                        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
                    except Exception as e:  # noqa: BLE001 - many loader errors
                        raise SystemExit(f"error: {path}:{n} has 'text' but no tokenizer loads from "
                                         f"--teacher {tokenizer_dir} ({e}); pre-tokenize to "
                                         '{"input_ids": [...]} lines instead') from None
                ids = tok(rec["text"])["input_ids"]
            else:
                raise SystemExit(f'error: {path}:{n}: each line must be {{"text": "..."}} or '
                                 '{"input_ids": [...]}')
            yield ids[:max_length] if max_length else ids


def _count_lines(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def _batched(seqs, batch_size: int):
    batch = []
    for s in seqs:
        batch.append(s)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _cmd_targets_build(args) -> int:
    import torch

    from . import targets
    data = Path(args.data)
    if not data.is_file():
        raise SystemExit(f"error: --data {data} does not exist")
    teacher = Path(args.teacher)
    if not teacher.is_dir():
        raise SystemExit(f"error: --teacher {teacher} is not a directory (a local Hugging Face model dir)")
    from transformers import AutoModelForCausalLM
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"auto": "auto", "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.model_dtype]
    import transformers
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # the keyword was renamed in 4.56
    model = AutoModelForCausalLM.from_pretrained(str(teacher), **{key: dtype}).to(device)
    batches = _batched(_read_jsonl(data, str(teacher), args.max_length), args.batch_size)
    try:
        man = targets.build(model, batches, args.k, args.temperature, out_dir=args.out,
                            shard_size=args.shard_size, chunk_vocab=args.chunk_vocab, dtype=args.dtype,
                            teacher_name=str(teacher), progress=not args.quiet, total=_count_lines(data))
    except (ValueError, TypeError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {len(man['shards'])} shard(s), {man['n_sequences']} sequences, {man['n_positions']} "
          f"positions to {args.out}")
    return 0


def _cmd_targets_inspect(args) -> int:
    from . import targets
    try:
        info = targets.inspect(args.dir)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"teacher:      {info['teacher']}")
    print(f"positions:    {info['n_positions']}")
    print(f"sequences:    {info['n_sequences']} in {info['n_shards']} shard(s)"
          + ("" if info["complete"] else "  (INCOMPLETE: re-run the build)"))
    print(f"k:            {info['k']}")
    print(f"vocab:        {info['vocab_size']}")
    print(f"temperature:  {info['temperature']}")
    print(f"dtype:        {info['dtype']}")
    print(f"top-k mass P: mean {info['mass_mean']:.4f}, 5th percentile {info['mass_p5']:.4f}")
    return 0


def add_targets_parser(sub) -> None:
    p = sub.add_parser("targets", help="build and inspect sparse teacher targets")
    tsub = p.add_subparsers(dest="targets_command", metavar="{build,inspect}", required=True)

    b = tsub.add_parser("build", help="run a teacher over a dataset and store its top-K log-probs",
                        description="Run a local Hugging Face causal LM over a jsonl dataset and write "
                                    "top-K log-prob shards (resumable: re-run to finish an interrupted build).")
    b.add_argument("--teacher", required=True, help="local Hugging Face model directory")
    b.add_argument("--data", required=True,
                   help='jsonl file, one {"text": ...} (needs the tokenizer in --teacher) or {"input_ids": [...]} '
                        "per line")
    b.add_argument("--k", type=_positive_int, default=32, help="teacher slots per position (default 32)")
    b.add_argument("--out", required=True, help="output directory (shards + manifest.json)")
    b.add_argument("--temperature", type=_positive_float, default=1.0, help="teacher temperature (default 1)")
    b.add_argument("--max-length", type=_positive_int, default=None, help="truncate sequences to this length")
    b.add_argument("--batch-size", type=_positive_int, default=8, help="sequences per teacher forward (default 8)")
    b.add_argument("--shard-size", type=_positive_int, default=1024, help="sequences per shard (default 1024)")
    b.add_argument("--chunk-vocab", type=_positive_int, default=8192,
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


#: One function per command group; each adds its parser(s) to the top-level subparsers.
COMMAND_GROUPS = [add_targets_parser]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dft-kernels", description="Distribution Fine-Tuning kernels: tools")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMAND_GROUPS:
        add(sub)
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
