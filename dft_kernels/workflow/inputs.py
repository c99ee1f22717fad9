"""Inputs shared by the commands: jsonl data files, local Hugging Face models, and
the one error type the command line turns into exit code 2 with one line."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


class UsageError(ValueError):
    """Bad input to a command: the message names the argument and the fix."""


def _int_at_least(text: str, low: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= {low}")
    return v


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number > 0")
    return v


def read_examples(path, tokenizer_dir=None, max_length: int | None = None, *, arg: str = "--data") -> list[list[int]]:
    """Token-id sequences of a jsonl file, one ``{"input_ids": [...]}`` or ``{"text": ...}`` per line.

    Args:
        path: the jsonl file.
        tokenizer_dir: a local model directory whose tokenizer encodes ``text`` lines
            (None: only ``input_ids`` lines are accepted).
        max_length: truncate each sequence to this many tokens (None: keep all).
        arg: the option name used in error messages.
    Returns:
        One list of ints per non-blank line, in file order.
    Raises:
        UsageError: a missing or empty file, a line that is not JSON (with its line
            number), a record of another shape, text without a tokenizer.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{arg} {path} does not exist: give a jsonl file")
    tok, out = None, []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{arg} {path}:{n} is not JSON ({e}); write one JSON object per line") from None
            if isinstance(rec, dict) and "input_ids" in rec and "text" in rec:
                raise UsageError(f"{arg} {path}:{n} has both 'text' and 'input_ids': keep one (input_ids are used "
                                 "as they are, text is tokenized with the teacher's tokenizer)")
            if isinstance(rec, dict) and "input_ids" in rec:
                ids = rec["input_ids"]
                if not isinstance(ids, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in ids):
                    raise UsageError(f"{arg} {path}:{n}: input_ids must be a list of ints")
            elif isinstance(rec, dict) and isinstance(rec.get("text"), str):
                if tok is None:
                    tok = load_tokenizer(tokenizer_dir)
                    if tok is None:
                        raise UsageError(f"{arg} {path}:{n} has 'text' but no tokenizer loads from {tokenizer_dir}; "
                                         'pre-tokenize to {"input_ids": [...]} lines instead')
                ids = tok(rec["text"])["input_ids"]
            else:
                raise UsageError(f'{arg} {path}:{n}: each line must be {{"text": "..."}} or {{"input_ids": [...]}}')
            out.append(ids[:max_length] if max_length else ids)
    if not out:
        raise UsageError(f"{arg} {path} has no examples: give a jsonl file with one example per line")
    return out


def check_token_ids(seqs: list[list[int]], vocab_size: int, *, arg: str, model: str) -> None:
    """UsageError when a token id is outside [0, vocab_size) of ``model``."""
    for i, s in enumerate(seqs):
        bad = [x for x in s if not 0 <= x < vocab_size]
        if bad:
            raise UsageError(f"{arg} example {i + 1} holds token id {bad[0]} outside the vocab [0, {vocab_size}) "
                             f"of {model}: tokenize the data with that model's tokenizer")


def check_targets_dir(path, arg: str = "--targets") -> Path:
    """UsageError naming ``arg`` unless ``path`` is a targets directory (holds a manifest.json)."""
    p = Path(path)
    if not (p / "manifest.json").is_file():
        raise UsageError(f"{arg} {p} is not a targets directory (no manifest.json): build one with "
                         "`dft-kernels targets build` (or blend presets with `targets blend`)")
    return p


def load_tokenizer(model_dir):
    """The tokenizer saved in ``model_dir``, or None when there is none."""
    if model_dir is None:
        return None
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception:  # noqa: BLE001 - many loader errors mean "no tokenizer here"
        return None


def load_causal_lm(model_dir, *, arg: str, dtype="auto", device: str = "cpu"):
    """A local Hugging Face causal LM; UsageError naming ``arg`` when ``model_dir`` is not one."""
    import transformers
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise UsageError(f"{arg} {path} is not a local Hugging Face model directory (no config.json): "
                         "pass a directory written by save_pretrained")
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # the keyword was renamed in 4.56
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), **{key: dtype})
    except (OSError, ValueError) as e:
        raise UsageError(f"{arg} {path} does not load as a causal LM ({str(e).splitlines()[0]})") from None
    return model.to(device)


def vocab_size_of(model) -> int:
    """Rows of the model's output embedding (the vocab its logits cover)."""
    return int(model.get_output_embeddings().weight.shape[0])
