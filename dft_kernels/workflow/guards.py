"""Checks the commands run before any work starts, so that nothing is silently wrong
(docs/design.md sec. 7): each refuses with a :class:`~.inputs.UsageError` (exit code 2,
one line naming both sides and the fix) when the result would be wrong, and prints one
``warning: ...`` line on stderr when the input is legal but surprising.

- :func:`check_device`: a device that exists on this machine and holds data.
- :func:`check_positions`: sequences no longer than an absolute-position model's table
  (refused) or a rotary model's trained length (warned).
- :func:`compare_tokenizers`: an online teacher's token -> id map is the student's.
- :func:`check_targets_teacher`: ``eval --targets --teacher`` compares one teacher.
- :func:`run_fingerprint` / :func:`prepare_out`: ``train`` resumes only the same run.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
from pathlib import Path

from ..targets.store import (atomic_write, fingerprint_tokenizer, input_ids_sha256, model_fingerprints,
                             read_manifest)
from .inputs import UsageError, load_tokenizer


def warn(message: str) -> None:
    """One line ``warning: ...`` on stderr (each check calls it at most once per command)."""
    print(f"warning: {' '.join(message.split())}", file=sys.stderr)


@contextlib.contextmanager
def quiet_transformers(quiet: bool):
    """With ``quiet``, no transformers progress bars (the weight-loading bar) inside the
    block; the previous setting comes back afterwards."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------- device


def check_device(text: str | None, arg: str = "--device") -> str | None:
    """``text`` when it names a device of this machine that holds data, else UsageError
    (``meta``, CUDA / MPS where there is none, a GPU index past the count)."""
    if text is None:
        return None
    import torch
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"{arg} {text!r} is not a device: use cpu, cuda or cuda:N") from None
    if dev.type == "meta":
        raise UsageError(f"{arg} meta holds no weights (shapes only): use cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{arg} {text} but CUDA is not available on this machine: use --device cpu "
                             "(or leave --device out)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"{arg} {text} but this machine has {torch.cuda.device_count()} CUDA device(s): "
                             f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"{arg} {text} but MPS is not available on this machine: use --device cpu")
    return text


# --------------------------------------------------------------------------- positions


def position_limit(model) -> tuple[int | None, str | None]:
    """(the longest sequence ``model`` was built for, "absolute" | "relative").

    "absolute": a learned position table (GPT-2's ``wpe``, OPT's) that has no row past
    the limit -- a longer sequence indexes out of it. "relative": rotary and other
    schemes that run past the limit, untrained there. (None, None) without a limit."""
    import torch
    cfg = getattr(model, "config", None)
    limit = None
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            limit = v
            break
    if limit is None:
        return None, None
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding) and m is not inp and limit <= m.num_embeddings <= limit + 2:
            return limit, "absolute"
    return limit, "relative"


def check_positions(seqs, model, *, model_arg: str, data_arg: str = "--data") -> None:
    """Refuse sequences longer than an absolute-position model's table; warn once when a
    rotary (relative) model sees sequences past its ``max_position_embeddings``."""
    limit, kind = position_limit(model)
    if limit is None or not seqs:
        return
    i, longest = max(enumerate(len(s) for s in seqs), key=lambda x: x[1])
    if longest <= limit:
        return
    if kind == "absolute":
        raise UsageError(f"{data_arg} example {i + 1} has {longest} tokens, {model_arg} has learned positions for "
                         f"{limit} only (n_positions / max_position_embeddings): pass --max-length {limit}")
    warn(f"{data_arg} example {i + 1} has {longest} tokens, past the {limit} positions {model_arg} was built for "
         f"(max_position_embeddings): it runs, untrained there; pass --max-length {limit} to stay inside")


# --------------------------------------------------------------------------- tokenizers


def tokenizer_fingerprint_of(model_dir) -> str | None:
    """:func:`~dft_kernels.targets.fingerprint_tokenizer` of the tokenizer saved in
    ``model_dir``; None when there is none."""
    tok = load_tokenizer(model_dir)
    return None if tok is None else fingerprint_tokenizer(tok)


def compare_tokenizers(a_dir, b_dir, *, a_arg: str, b_arg: str, vocab_a: int | None = None,
                       vocab_b: int | None = None, purpose: str) -> None:
    """Refuse when the tokenizers saved in ``a_dir`` and ``b_dir`` map tokens to other
    ids (vocab identity, not only size); warn when one of them has none (unchecked)."""
    fa, fb = tokenizer_fingerprint_of(a_dir), tokenizer_fingerprint_of(b_dir)
    if fa is not None and fb is not None:
        if fa != fb:
            size = f" (the same vocab size {vocab_a})" if vocab_a is not None and vocab_a == vocab_b else ""
            raise UsageError(f"{a_arg} {a_dir} and {b_arg} {b_dir} have different tokenizers{size}: their token -> "
                             f"id maps differ, so {purpose} would compare other tokens; use a {b_arg} with "
                             f"{a_arg}'s tokenizer")
        return
    missing = " and ".join(f"{arg} {d}" for arg, d, f in ((a_arg, a_dir, fa), (b_arg, b_dir, fb)) if f is None)
    warn(f"no tokenizer in {missing}: cannot check that {a_arg} and {b_arg} share one (only the vocab sizes "
         "match); make sure they do")


# --------------------------------------------------------------------------- eval: one teacher


def check_targets_teacher(manifest: dict, teacher, *, teacher_dir, targets_dir) -> None:
    """``eval --targets X --teacher T``: the sparse KL (to X's teacher) and the full KL
    (to T) side by side must be to one teacher. Refuses when X records a
    ``teacher_fingerprint`` that is not T's (:func:`~dft_kernels.targets.model_fingerprints`,
    in the dtype X was built in); warns when X records none (a blend, an old build)."""
    recorded = manifest.get("teacher_fingerprint")
    if recorded is None:
        what = (f"a blend ({manifest.get('teacher')})" if manifest.get("kind") == "blend"
                else "built without a teacher fingerprint")
        warn(f"--targets {targets_dir} is {what}: the sparse KL is to its teacher(s), the full-vocab KL to --teacher "
             f"{teacher_dir}; they are not the same teacher's numbers (the sparse KL is no lower bound of the "
             "full one)")
        return
    if model_fingerprints(teacher)["fingerprint"] == recorded:
        return
    import torch
    for dtype in (torch.float32, torch.bfloat16, torch.float16):   # built in another dtype than saved?
        if any(p.dtype == dtype for p in teacher.parameters()):
            continue
        from .inputs import load_causal_lm
        other = load_causal_lm(teacher_dir, arg="--teacher", dtype=dtype)
        same = model_fingerprints(other)["fingerprint"] == recorded
        del other
        if same:
            return
    raise UsageError(f"--targets {targets_dir} were built by teacher {manifest.get('teacher')!r} (fingerprint "
                     f"{recorded[:12]}), --teacher {teacher_dir} is another model: the sparse KL and the full-vocab KL "
                     "would be to different teachers; pass the teacher the targets were built with, or drop "
                     "--teacher or --targets")


# --------------------------------------------------------------------------- train: the run's fingerprint

#: written into ``train --out`` (atomically) before training; a re-run resumes only when it matches
RUN_FINGERPRINT = "run_fingerprint.json"
#: files of a finished or started run that ``--overwrite`` removes (with the checkpoint-N folders)
RUN_FILES = ("train_summary.json", RUN_FINGERPRINT)

_PART_NAMES = {"student": "the --student weights", "tokenizer": "the student's tokenizer", "data": "--data",
               "eval_data": "--eval-data", "targets": "--targets", "teacher": "the --teacher weights"}


def targets_fingerprint(targets_dir) -> str:
    """sha256 of a targets directory's manifest without its free-text fields (name,
    description): the shards' hashes, K, temperature, teacher fingerprint."""
    man = {k: v for k, v in read_manifest(targets_dir).items() if k not in ("name", "description")}
    return hashlib.sha256(json.dumps(man, sort_keys=True, default=str).encode()).hexdigest()


def run_fingerprint(*, student, tokenizer_dir, seqs, eval_seqs, targets_dir, teacher, loss: dict) -> dict:
    """What makes a training run this run: the student's weights at the start, its
    tokenizer, the data (token ids as trained on), the eval data, the targets, the
    online teacher's weights and the loss options (``loss``)."""
    return {"student": model_fingerprints(student)["fingerprint"],
            "tokenizer": tokenizer_fingerprint_of(tokenizer_dir),
            "data": input_ids_sha256(seqs),
            "eval_data": None if eval_seqs is None else input_ids_sha256(eval_seqs),
            "targets": None if targets_dir is None else targets_fingerprint(targets_dir),
            "teacher": None if teacher is None else model_fingerprints(teacher)["fingerprint"],
            "loss": {k: v for k, v in sorted(loss.items())}}


def _changes(old: dict, new: dict) -> list[str]:
    out = []
    for key, name in _PART_NAMES.items():
        if old.get(key) != new.get(key):
            out.append(name)
    o, n = old.get("loss") or {}, new.get("loss") or {}
    for key in sorted(set(o) | set(n)):
        if o.get(key) != n.get(key):
            out.append(f"{key} {o.get(key)} -> {n.get(key)}")
    return out


def last_checkpoint(out: Path) -> Path | None:
    """The checkpoint-N directory of ``out`` with the largest N that holds a trainer state."""
    if not out.is_dir():
        return None
    cks = [p for p in out.glob("checkpoint-*") if p.name[11:].isdigit() and (p / "trainer_state.json").is_file()]
    return max(cks, key=lambda p: int(p.name[11:])) if cks else None


def prepare_out(out, fingerprint: dict, *, overwrite: bool, resume_required: bool):
    """Check ``out`` against this run and write its fingerprint (atomically); returns the
    checkpoint to resume from, or None.

    Resumes only a run with the same fingerprint; a run of other settings (or one
    without a fingerprint: checkpoints or a summary from elsewhere) is refused naming
    what changed, unless ``overwrite`` (its checkpoints and run files are removed)."""
    out = Path(out)
    fp_path = out / RUN_FINGERPRINT
    old = None
    if fp_path.is_file():
        try:
            old = json.loads(fp_path.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
    ckpt = last_checkpoint(out)
    started = old is not None or ckpt is not None or (out / "train_summary.json").is_file()
    if overwrite:
        if resume_required:
            raise UsageError("--resume and --overwrite contradict each other: drop one")
        if started:
            for p in out.glob("checkpoint-*"):
                if p.is_dir():
                    shutil.rmtree(p)
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
        ckpt = None
    elif started:
        if old is None:
            raise UsageError(f"--out {out} holds a run (checkpoints or train_summary.json) without {RUN_FINGERPRINT}: "
                             "it cannot be checked to be this run; pass --overwrite to start over there, or give a "
                             "new --out")
        changed = _changes(old, fingerprint)
        if changed:
            raise UsageError(f"--out {out} holds a run with other settings ({', '.join(changed)} changed): it "
                             "resumes only the same run; pass --overwrite to start over there, or give a new --out")
    if resume_required and ckpt is None:
        raise UsageError(f"--resume: {out} holds no checkpoint-N directory to resume from; drop --resume")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(fp_path, (json.dumps(fingerprint, indent=1, sort_keys=True) + "\n").encode())
    return ckpt
