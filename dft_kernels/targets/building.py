"""Build targets from a Hugging Face teacher over a dataset, never materialising
its [N, V] logits: chunked top-K per shard, resumable, atomic shards + manifest."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Mapping

import torch

from ..lm_head import Fallback, fold_logit_scale, logit_transforms, resolve_head, run_capturing_hidden
from ..low_rank import LowRankHead
from .container import _check_k, _check_positive, _dtype_name, resolve_dtype
from .store import SHARD_FORMAT, ShardDirWriter, fingerprint_tokenizer, input_ids_sha256, model_fingerprints

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _as_sequences(batch, where: str) -> list[torch.Tensor]:
    """One batch -> list of 1-D int64 CPU sequences (padding dropped via attention_mask)."""
    def seq(x, what):
        if isinstance(x, (list, tuple)) and len(x) == 0:
            return torch.empty(0, dtype=torch.int64)
        t = torch.as_tensor(x)
        if t.is_floating_point() or t.dtype == torch.bool or t.dim() != 1:
            raise TypeError(f"{what} must be a 1-D sequence of integer token ids, got "
                            f"{'dtype ' + str(t.dtype) if t.dim() == 1 else 'shape ' + str(tuple(t.shape))}")
        return t.detach().to("cpu", torch.int64)

    def rows(x, what):
        if isinstance(x, torch.Tensor):
            if x.dim() == 1:
                return [x]
            if x.dim() == 2:
                return list(x)
            raise TypeError(f"{what} must be [B, T] or [T], got shape {tuple(x.shape)}")
        if isinstance(x, (list, tuple)):
            return [x] if x and all(isinstance(v, Integral) for v in x) else list(x)
        return rows(torch.as_tensor(x), what)

    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise TypeError(f"{where} is a dict without 'input_ids'")
        ids = rows(batch["input_ids"], f"{where}['input_ids']")
        mask = batch.get("attention_mask")
        masks = None if mask is None else rows(mask, f"{where}['attention_mask']")
        if masks is not None and len(masks) != len(ids):
            raise ValueError(f"{where}['attention_mask'] has {len(masks)} rows, input_ids {len(ids)}")
        out = []
        for j, row in enumerate(ids):
            t = seq(row, f"{where}['input_ids'][{j}]")
            if masks is not None:
                m = torch.as_tensor(masks[j]).to("cpu").bool()
                if m.shape != t.shape:
                    raise ValueError(f"{where}['attention_mask'][{j}] has shape {tuple(m.shape)}, "
                                     f"input_ids {tuple(t.shape)}")
                t = t[m]
            out.append(t)
        return out
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 1:
            return [seq(batch, where)]
        if batch.dim() == 2:
            return [seq(r, f"{where}[{j}]") for j, r in enumerate(batch)]
        raise TypeError(f"{where} must be [B, T] or [T] token ids, got shape {tuple(batch.shape)}")
    if isinstance(batch, (list, tuple)):
        if not batch:
            return []
        if all(isinstance(x, Integral) for x in batch):
            return [seq(list(batch), where)]
        out = []
        for j, x in enumerate(batch):
            if isinstance(x, Mapping):
                if "input_ids" not in x:
                    raise TypeError(f"{where}[{j}] is a dict without 'input_ids'")
                out.append(seq(x["input_ids"], f"{where}[{j}]['input_ids']"))
            else:
                out.append(seq(x, f"{where}[{j}]"))
        return out
    raise TypeError(f"{where} is {type(batch).__name__}; a batch must be a dict with 'input_ids' "
                    "(+ 'attention_mask'), a [B, T] tensor, or a list of token-id sequences / example dicts")


def _iter_sequences(batches):
    if isinstance(batches, (Mapping, torch.Tensor)):
        batches = [batches]
    for b, batch in enumerate(batches):
        for s in _as_sequences(batch, f"batches[{b}]"):
            yield b, s


class _Teacher:
    """The pieces of a HF causal LM the build needs: the model, its lm_head, logit transforms.

    The head is read by :func:`dft_kernels.lm_head.resolve_head`, as the student's patch and
    the online teacher read it: a low-rank correction (a PEFT LoRA or ``modules_to_save``
    lm_head, a style head) is joined once for the whole build -- ``weight`` is ``[W | B]``
    (one more copy of the head, V x (D + r)) and :meth:`hidden` returns ``[h | s * h @ A.T]``
    -- so the targets are the corrected head's. A head the fused path cannot read (quantised,
    offloaded, another wrapper) raises a ValueError with the reason and the fix.
    """

    def __init__(self, model, name=None):
        if isinstance(model, (str, os.PathLike)):
            from transformers import AutoModelForCausalLM
            path = str(model)
            model = AutoModelForCausalLM.from_pretrained(path)
            name = name or path
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"teacher must be a Hugging Face causal LM (torch module) or a model path, "
                            f"got {type(model).__name__}")
        self.model = model
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            raise TypeError("teacher must be a Hugging Face causal LM with an lm_head (get_output_embeddings())")
        parts = resolve_head(head, who="targets build")
        if isinstance(parts, Fallback):
            raise ValueError(f"targets build: the teacher's output embeddings are {parts.reason}; the build projects "
                             "the teacher's final hidden states with the head's weight (never its [N, V] logits) and "
                             f"cannot compute this head. Fix: {parts.fix}")
        self.head, self.weight, self.bias, self.lora = head, parts.weight, parts.bias, None
        if parts.has_lora:    # the teacher has no gradient: [W | B] once, [h | u] per batch (docs/design.md sec. 17)
            kw = parts.lora_kwargs(dropout=False)           # the teacher is in eval mode: no dropout
            with torch.no_grad():
                self.lora = LowRankHead(kw["lora_A"].detach(), kw["lora_B"].detach(), kw["lora_scaling"], None)
                self.weight = self.lora.joined_weight(parts.weight.detach())
        # what the model's own forward does to lm_head's output, read as the student's patch reads it
        self.softcap, scale, _ = logit_transforms(model)
        self.scale = float(scale)
        cfg = getattr(model, "config", None)
        self.vocab_size = int(self.weight.shape[0])
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        self.input_vocab = int(emb.weight.shape[0]) if emb is not None else self.vocab_size
        self.device = emb.weight.device if emb is not None else self.weight.device
        self.name = name or getattr(cfg, "name_or_path", None) or getattr(cfg, "_name_or_path", None) \
            or type(model).__name__

    def hidden(self, seqs: list[torch.Tensor]) -> torch.Tensor:
        """The lm_head's input [n, D] at every position of the non-empty ``seqs`` (concatenated,
        in order), run as one right-padded batch and captured as the online teacher captures it."""
        live = [s for s in seqs if len(s)]
        T = max(len(s) for s in live)
        ids = torch.zeros(len(live), T, dtype=torch.long)
        mask = torch.zeros(len(live), T, dtype=torch.long)
        for j, s in enumerate(live):
            ids[j, :len(s)] = s
            mask[j, :len(s)] = 1
        kw = dict(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False)
        _, hidden = run_capturing_hidden(lambda: self.model(**kw), self.head, who=type(self.model).__name__,
                                         fix="targets build needs a causal LM that applies its lm_head once")
        h = hidden[mask.to(hidden.device).bool()].to(self.weight.device)
        if self.lora is not None:
            h = self.lora.joined_hidden(h.to(self.weight.dtype))
        return h

    @torch.inference_mode()
    def topk(self, seqs: list[torch.Tensor], k: int, temperature: float, chunk_vocab: int,
             chunk_rows: int, sampling: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k ids and fp32 log-probs for every position of ``seqs`` (concatenated);
        ``sampling`` = (samples, seed, index of seqs[0]) adds sampled slots (sec. 12)."""
        lengths = [len(s) for s in seqs]
        n = sum(lengths)
        if sampling is not None:
            k = k + sampling[0]
        if n == 0:
            return torch.empty(0, k, dtype=torch.int32), torch.empty(0, k)
        h = self.hidden(seqs)
        if sampling is not None:
            return _sampled_targets(self, h, k - sampling[0], temperature, lengths, *sampling)
        index = torch.empty(n, k, dtype=torch.int32)
        logprobs = torch.empty(n, k, dtype=torch.float32)
        for r in range(0, n, chunk_rows):
            i, lp = _chunked_topk(h[r:r + chunk_rows], self.weight, self.bias, k, temperature, self.softcap,
                                  chunk_vocab, self.scale)
            index[r:r + chunk_rows] = i.cpu()
            logprobs[r:r + chunk_rows] = lp.cpu()
        return index, logprobs


def _sampled_targets(tm: "_Teacher", h, k, temperature, lengths, samples, seed, first_sequence):
    """Hybrid / sampled rows (docs/design.md sec. 12) of consecutive sequences, each
    sequence's draws from its own (seed, index) generator: resume-safe."""
    from .sampling import sequence_uniforms, targets_from_hidden
    h, b = fold_logit_scale(h, tm.bias, tm.scale)
    u = sequence_uniforms(seed, first_sequence, lengths, samples)
    index, logprobs = targets_from_hidden(h, tm.weight, b, k, samples, 1.0 / temperature, tm.softcap, u)
    return index.cpu(), logprobs.cpu()


def _chunked_topk(h, weight, bias, k, temperature, softcap, chunk_vocab, scale=1.0):
    """Top-k of log_softmax over the full vocab without [N, V] logits: the Triton teacher
    top-k on CUDA (k <= its register limit), chunked PyTorch tiles of ``chunk_vocab``
    columns elsewhere (docs/design.md sec. 11)."""
    from ..ops import teacher_topk_apply, triton_usable
    from ..ops.teacher_topk.torch import MAX_TRITON_K, chunked_topk
    h, bias = fold_logit_scale(h, bias, scale)
    if h.device.type == "cuda" and triton_usable(h.device) and k <= MAX_TRITON_K:
        index, logprobs, _ = teacher_topk_apply(h, weight, bias, k, 1.0 / temperature, softcap, "triton")
    else:
        index, logprobs, _ = chunked_topk(h, weight, bias, k, 1.0 / temperature, softcap, chunk_vocab=chunk_vocab)
    return index, logprobs


def build(teacher, batches, k: int, temperature: float = 1.0, *, out_dir, shard_size: int = 1024,
          chunk_vocab: int = 8192, chunk_rows: int = 8192, dtype=torch.float16, teacher_name: str | None = None,
          progress: bool = True, total: int | None = None, tokenizer=None, name: str | None = None,
          description: str | None = None, samples: int = 0, seed: int = 0) -> dict:
    """Run ``teacher`` over ``batches`` and store its top-``k`` log-probs as shards.

    ``teacher``: a Hugging Face causal LM (or a local model path). Its own forward runs
    with its lm_head (``get_output_embeddings()``) fed one row only, and the head's input
    -- the final hidden states, after whatever the forward does between the decoder and
    the head -- is captured by the same hook as the online teacher's and the student's
    (``dft_kernels.lm_head``), so offline and online targets are the same. The logits are
    formed one [rows, chunk_vocab] tile at a time from the head's weight (the model's
    Gemma-2 ``final_logit_softcapping``, Cohere ``logit_scale`` and Granite
    ``logits_scaling`` honoured, read by ``dft_kernels.lm_head`` as for the
    student, then divided by ``temperature``; matmul in the
    teacher's dtype, as its own forward does, the rest in fp32) with a running top-k and a running
    log-sum-exp, so the log-probs are normalised over the full vocab and the
    [N, V] logits never exist. The head is read as the student's patch reads it
    (``dft_kernels.lm_head.resolve_head``): a low-rank correction -- a PEFT LoRA or
    ``modules_to_save`` lm_head, a style head -- is part of the teacher's logits (joined
    once: ``[W | B]``, docs/design.md sec. 17.2); a head that cannot be read so (quantised,
    offloaded, another wrapper) raises ValueError with the reason and the fix.

    ``batches``: an iterable of batches, each a dict with ``input_ids`` [B, T]
    (+ ``attention_mask``: masked tokens are dropped), a [B, T] tensor, or a list of
    token-id sequences or example dicts. Every sequence is numbered in order; shard
    i holds sequences [i*shard_size, (i+1)*shard_size). The teacher runs each batch
    (its part in a shard) right-padded.

    Row t of a sequence = the teacher's distribution for the token after position t.

    Files (in ``out_dir``): ``shard-00000.safetensors`` ... (see module doc) and
    ``manifest.json``, both written atomically. Re-running with the same data
    skips shards already on disk whose hashes verify (resume after a crash); a shard
    that fails verification is recomputed. A tqdm bar counts sequences (``total``:
    their number, if known; ``progress=False`` hides it). Log-probs are stored in
    ``dtype`` (fp16 default; bf16 / fp32).

    The manifest records ``teacher_fingerprint`` (weights + config, an lm_head adapter's
    scaling and active state included,
    :func:`~dft_kernels.targets.fingerprint_model`) and ``tokenizer_fingerprint``
    (:func:`~dft_kernels.targets.fingerprint_tokenizer` of ``tokenizer``, else of the
    teacher's directory when it holds tokenizer files, else None). A re-run resumes
    only when both match; otherwise ValueError naming what changed (weights / config /
    tokenizer). ``name`` / ``description`` are free text recorded in the manifest. With
    ``progress`` a line on stderr says how many shards were computed and how many were
    verified and kept.

    ``samples > 0`` stores hybrid targets (``k`` exact top-k slots, then ``samples``
    draws from the rest of the vocab) or, with ``k=0``, sampled ones (docs/design.md
    sec. 12): K = k + samples slots, the manifest's ``k`` is that K and it adds
    ``kind``, ``topk``, ``samples``, ``seed``. Sequence i's draws come from a generator
    seeded by ``(seed, i)``, so the same seed gives byte-identical shards, resumed or not.

    Returns:
        the manifest dict. ValueError when ``batches`` hold no sequence."""
    run = _settings(k, temperature, shard_size, chunk_vocab, chunk_rows, dtype, samples, seed)
    if out_dir is None:
        raise ValueError("out_dir is required: the directory the shards and manifest.json go to")
    tm = _Teacher(teacher, teacher_name)
    if run.k > tm.vocab_size:
        raise ValueError(f"k={run.k} is larger than the teacher's vocab size {tm.vocab_size}")
    fingerprints = _fingerprints(tm, teacher, tokenizer)
    writer = ShardDirWriter(
        out_dir, _manifest_params(tm, run, fingerprints),
        info={"name": name, "description": description, "teacher_weights_sha256": fingerprints["weights"],
              "teacher_config_sha256": fingerprints["config"]},
        hints={"teacher": "; pass teacher_name= to keep the old name"},
        check=lambda old: _check_same_teacher(old, fingerprints, Path(out_dir)))

    from tqdm.auto import tqdm
    bar = tqdm(total=total, unit="seq", desc="teacher top-k", disable=not progress, dynamic_ncols=True)
    was_training = tm.model.training
    tm.model.eval()
    try:
        for s, buf in enumerate(_shards(batches, run.shard_size, tm.input_vocab)):
            _build_shard(writer, tm, run, s, buf, bar)
    finally:
        tm.model.train(was_training)
        bar.close()
    man = writer.finish()
    if progress:
        print(f"targets: {writer.written} shard(s) computed, {writer.kept} already on disk verified and "
              f"kept (resumed) in {str(writer.out)!r}", file=sys.stderr)
    return man


@dataclass(frozen=True)
class _Settings:
    """The checked arguments of :func:`build` that decide what a shard holds."""
    k: int                 # exact top-k slots
    samples: int           # sampled slots on top (0: plain top-k)
    seed: int
    temperature: float
    shard_size: int
    chunk_vocab: int
    chunk_rows: int
    dtype: torch.dtype     # storage dtype of the log-probs


def _settings(k, temperature, shard_size, chunk_vocab, chunk_rows, dtype, samples, seed) -> _Settings:
    """:func:`build`'s arguments checked (ValueError / TypeError naming the bad one)."""
    from .sampling import check_sampling
    k, samples = check_sampling(k, samples)
    k = _check_k(k) if not samples else k
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise ValueError(f"seed={seed!r} must be an integer >= 0 (the sampled slots' seed)")
    temperature = _check_positive(temperature, "temperature")
    shard_size = _check_k(shard_size, "shard_size")
    chunk_vocab = _check_k(chunk_vocab, "chunk_vocab")
    chunk_rows = _check_k(chunk_rows, "chunk_rows")
    dtype = resolve_dtype(dtype)
    if dtype == torch.float64:
        raise TypeError("dtype=torch.float64 is not a storage dtype; use float16, bfloat16 or float32")
    return _Settings(k, samples, int(seed), temperature, shard_size, chunk_vocab, chunk_rows, dtype)


def _manifest_params(tm: _Teacher, run: _Settings, fingerprints: dict) -> dict:
    """What every shard and the manifest record, and a resume must match."""
    from .sampling import sampling_metadata
    params = {"format": SHARD_FORMAT, "teacher": str(tm.name), "vocab_size": tm.vocab_size, "k": run.k,
              "temperature": run.temperature, "dtype": _dtype_name(run.dtype), "shard_size": run.shard_size}
    if run.samples:  # K = k + samples slots; "topk" = the exact ones
        params.update(sampling_metadata(run.k, run.samples, run.seed, run.temperature), k=run.k + run.samples)
    params.update(teacher_fingerprint=fingerprints["teacher_fingerprint"],
                  tokenizer_fingerprint=fingerprints["tokenizer_fingerprint"])
    return params


def _shards(batches, shard_size: int, input_vocab: int):
    """``batches`` as lists of ``shard_size`` ``(batch number, sequence)`` pairs (the last one
    shorter), each yielded as soon as it is full; ValueError on an id outside the teacher's
    input vocab or when there is no sequence at all."""
    buf: list[tuple[int, torch.Tensor]] = []
    yielded = False
    for b, s in _iter_sequences(batches):
        if int(s.numel()) and (int(s.min()) < 0 or int(s.max()) >= input_vocab):
            raise ValueError(f"batches[{b}] holds token id {int(s.max()) if int(s.min()) >= 0 else int(s.min())}"
                             f" outside the teacher's vocab [0, {input_vocab}): wrong tokenizer?")
        buf.append((b, s))
        if len(buf) == shard_size:
            yield buf
            buf, yielded = [], True
    if not buf and not yielded:
        raise ValueError("batches held no sequences (an empty dataset?): nothing to build targets for")
    if buf:
        yield buf


def _build_shard(writer: ShardDirWriter, tm: _Teacher, run: _Settings, s: int, buf: list, bar) -> None:
    """Shard ``s`` (sequences ``buf``): kept when on disk and verified, else computed with the
    teacher one user batch at a time (the part of each that falls in this shard) and written."""
    seqs = [x for _, x in buf]
    first = s * run.shard_size
    expect = dict(shard=s, first_sequence=first, n_sequences=len(seqs), n_positions=sum(len(x) for x in seqs),
                  input_ids_sha256=input_ids_sha256(seqs))

    def compute():
        idx_parts, lp_parts = [], []
        j = 0
        while j < len(buf):
            e = j
            while e < len(buf) and buf[e][0] == buf[j][0]:
                e += 1
            i, lp = tm.topk(seqs[j:e], run.k, run.temperature, run.chunk_vocab, run.chunk_rows,
                            (run.samples, run.seed, first + j) if run.samples else None)
            idx_parts.append(i)
            lp_parts.append(lp.to(run.dtype))
            bar.update(e - j)
            j = e
        return torch.cat(idx_parts), torch.cat(lp_parts), seqs, {}

    if not writer.shard(expect, compute):
        bar.update(len(seqs))


def _fingerprints(tm: _Teacher, teacher, tokenizer) -> dict:
    """The teacher's weights / config hashes, their joint fingerprint and the tokenizer's
    (``tokenizer``, else the teacher's directory when it holds tokenizer files, else None)."""
    parts = model_fingerprints(tm.model)
    if tokenizer is None:
        src = teacher if isinstance(teacher, (str, os.PathLike)) else \
            getattr(getattr(tm.model, "config", None), "_name_or_path", None)
        if src and any((Path(src) / f).is_file() for f in _TOKENIZER_FILES):
            tokenizer = str(src)
    return {"weights": parts["weights"], "config": parts["config"], "teacher_fingerprint": parts["fingerprint"],
            "tokenizer_fingerprint": None if tokenizer is None else fingerprint_tokenizer(tokenizer)}


def _check_same_teacher(old: dict, fingerprints: dict, out: Path) -> None:
    """Resume only with the teacher and tokenizer the old shards were built with."""
    if not old.get("shards"):
        return
    changed = []
    if "teacher_fingerprint" not in old:
        changed.append("the teacher (the old build recorded no fingerprint)")
    elif old["teacher_fingerprint"] != fingerprints["teacher_fingerprint"]:
        parts = [what for what, key in (("weights", "teacher_weights_sha256"), ("config", "teacher_config_sha256"))
                 if old.get(key) != fingerprints[what]]
        changed.append(f"the teacher's {' and '.join(parts) or 'weights or config'}")
    if old.get("tokenizer_fingerprint") != fingerprints["tokenizer_fingerprint"]:
        changed.append("the tokenizer")
    if changed:
        raise ValueError(f"out_dir {str(out)!r} holds targets built with another teacher: {', '.join(changed)} "
                         "changed since (retrained in place?). Use a new out_dir, or delete the old one to rebuild")
