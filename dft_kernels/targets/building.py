"""Build targets from a Hugging Face teacher over a dataset, never materialising
its [N, V] logits: chunked top-K per shard, resumable, atomic shards + manifest."""
from __future__ import annotations

import json
import os
from numbers import Integral
from pathlib import Path
from typing import Mapping

import torch

from .container import _check_k, _check_positive, _dtype_name, resolve_dtype
from .store import (MANIFEST, SHARD_FORMAT, _TMP_PREFIX, atomic_write, input_ids_sha256, read_shard, shard_name, write_shard)



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
    """The pieces of a HF causal LM the build needs: decoder, lm_head, softcap."""

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
        decoder = None
        if hasattr(model, "get_decoder"):
            try:
                decoder = model.get_decoder()
            except (AttributeError, NotImplementedError):
                decoder = None
        if decoder is None or decoder is model:
            decoder = getattr(model, "model", None)
            if decoder is None:
                decoder = getattr(model, getattr(model, "base_model_prefix", "") or "model", None)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if decoder is None or head is None or getattr(head, "weight", None) is None:
            raise TypeError("teacher must be a Hugging Face causal LM with a decoder (model.model / "
                            "get_decoder()) and an lm_head (get_output_embeddings())")
        self.decoder = decoder
        self.weight = head.weight
        self.bias = getattr(head, "bias", None)
        cfg = getattr(model, "config", None)
        tcfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

        def option(key):
            val = getattr(cfg, key, None)
            val = getattr(tcfg, key, None) if val is None else val
            return float(val) if isinstance(val, (int, float)) and not isinstance(val, bool) and val else None

        # what the model's own forward does to lm_head's output: Gemma-2 style softcap,
        # Cohere's logit_scale (multiply), Granite's logits_scaling (divide)
        self.softcap = option("final_logit_softcapping")
        self.scale = (option("logit_scale") or 1.0) / (option("logits_scaling") or 1.0)
        self.vocab_size = int(self.weight.shape[0])
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        self.input_vocab = int(emb.weight.shape[0]) if emb is not None else self.vocab_size
        self.device = emb.weight.device if emb is not None else self.weight.device
        self.name = name or getattr(cfg, "name_or_path", None) or getattr(cfg, "_name_or_path", None) \
            or type(model).__name__

    @torch.inference_mode()
    def topk(self, seqs: list[torch.Tensor], k: int, temperature: float, chunk_vocab: int,
             chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k ids and fp32 log-probs for every position of ``seqs`` (concatenated)."""
        lengths = [len(s) for s in seqs]
        n = sum(lengths)
        if n == 0:
            return torch.empty(0, k, dtype=torch.int32), torch.empty(0, k)
        live = [s for s in seqs if len(s)]
        T = max(len(s) for s in live)
        ids = torch.zeros(len(live), T, dtype=torch.long)
        mask = torch.zeros(len(live), T, dtype=torch.long)
        for j, s in enumerate(live):
            ids[j, :len(s)] = s
            mask[j, :len(s)] = 1
        out = self.decoder(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        h = hidden[mask.to(hidden.device).bool()].to(self.weight.device)  # [n, D], sequences in order
        del out, hidden
        index = torch.empty(n, k, dtype=torch.int32)
        logprobs = torch.empty(n, k, dtype=torch.float32)
        for r in range(0, n, chunk_rows):
            i, lp = _chunked_topk(h[r:r + chunk_rows], self.weight, self.bias, k, temperature, self.softcap,
                                  chunk_vocab, self.scale)
            index[r:r + chunk_rows] = i.cpu()
            logprobs[r:r + chunk_rows] = lp.cpu()
        return index, logprobs


def _chunked_topk(h, weight, bias, k, temperature, softcap, chunk_vocab, scale=1.0):
    """Top-k of log_softmax over the full vocab, one [rows, chunk_vocab] logits tile at
    a time: a running top-k and a running log-sum-exp (fp32)."""
    rows, v = h.shape[0], weight.shape[0]
    best_v = torch.empty(rows, 0, dtype=torch.float32, device=h.device)
    best_i = torch.empty(rows, 0, dtype=torch.long, device=h.device)
    lse = torch.full((rows,), -torch.inf, dtype=torch.float32, device=h.device)
    for c0 in range(0, v, chunk_vocab):
        c1 = min(v, c0 + chunk_vocab)
        z = torch.nn.functional.linear(h, weight[c0:c1], None if bias is None else bias[c0:c1]).float()
        if scale != 1.0:
            z = z * scale
        if softcap is not None:
            z = torch.tanh(z / softcap) * softcap
        if temperature != 1.0:
            z = z / temperature
        lse = torch.logaddexp(lse, torch.logsumexp(z, dim=-1))
        vals, ids = z.topk(min(k, c1 - c0), dim=-1)
        best_v = torch.cat([best_v, vals], dim=-1)
        best_i = torch.cat([best_i, ids + c0], dim=-1)
        if best_v.shape[1] > k:
            best_v, pos = best_v.topk(k, dim=-1)
            best_i = best_i.gather(1, pos)
    best_v, pos = best_v.sort(dim=-1, descending=True, stable=True)
    best_i = best_i.gather(1, pos)
    return best_i.to(torch.int32), best_v - lse.unsqueeze(-1)



def build(teacher, batches, k: int, temperature: float = 1.0, *, out_dir, shard_size: int = 1024,
          chunk_vocab: int = 8192, chunk_rows: int = 8192, dtype=torch.float16, teacher_name: str | None = None,
          progress: bool = True, total: int | None = None) -> dict:
    """Run ``teacher`` over ``batches`` and store its top-``k`` log-probs as shards.

    ``teacher``: a Hugging Face causal LM (or a local model path). Its decoder gives
    the last hidden state; the logits are formed one [rows, chunk_vocab] tile at a
    time from ``get_output_embeddings()`` (the config's Gemma-2
    ``final_logit_softcapping``, Cohere ``logit_scale`` and Granite
    ``logits_scaling`` honoured, then divided by ``temperature``; matmul in the
    teacher's dtype, as its own forward does, the rest in fp32) with a running top-k and a running
    log-sum-exp, so the log-probs are normalised over the full vocab and the
    [N, V] logits never exist.

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
    ``dtype`` (fp16 default; bf16 / fp32). Returns the manifest dict."""
    k = _check_k(k)
    temperature = _check_positive(temperature, "temperature")
    shard_size = _check_k(shard_size, "shard_size")
    chunk_vocab = _check_k(chunk_vocab, "chunk_vocab")
    chunk_rows = _check_k(chunk_rows, "chunk_rows")
    dtype = resolve_dtype(dtype)
    if dtype == torch.float64:
        raise TypeError("dtype=torch.float64 is not a storage dtype; use float16, bfloat16 or float32")
    if out_dir is None:
        raise ValueError("out_dir is required: the directory the shards and manifest.json go to")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(_TMP_PREFIX + "*"):  # leftovers of a crash mid-write
        try:
            stale.unlink()
        except OSError:
            pass
    tm = _Teacher(teacher, teacher_name)
    if k > tm.vocab_size:
        raise ValueError(f"k={k} is larger than the teacher's vocab size {tm.vocab_size}")

    params = {"format": SHARD_FORMAT, "teacher": str(tm.name), "vocab_size": tm.vocab_size, "k": k,
              "temperature": temperature, "dtype": _dtype_name(dtype), "shard_size": shard_size}
    mpath = out / MANIFEST
    if mpath.exists():
        try:
            old = json.loads(mpath.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        for key, val in params.items():
            if key in old and old[key] != val:
                raise ValueError(f"out_dir {str(out)!r} holds targets built with {key}={old[key]!r}, this build "
                                 f"has {key}={val!r}: use a new out_dir (or delete the old one)"
                                 + ("; pass teacher_name= to keep the old name" if key == "teacher" else ""))

    from tqdm.auto import tqdm
    bar = tqdm(total=total, unit="seq", desc="teacher top-k", disable=not progress, dynamic_ncols=True)

    entries: list[dict] = []
    stats = {"n_sequences": 0, "n_positions": 0}

    def write_manifest(complete: bool):
        man = dict(params)
        man.update(complete=complete, n_sequences=stats["n_sequences"], n_positions=stats["n_positions"],
                   shards=entries)
        atomic_write(mpath, (json.dumps(man, indent=1, sort_keys=True) + "\n").encode())
        return man

    def finish_shard(buf: list[tuple[int, torch.Tensor]]):
        s = len(entries)
        seqs = [x for _, x in buf]
        path = out / shard_name(s)
        meta = dict(params, shard=s, first_sequence=s * shard_size, n_sequences=len(seqs),
                    n_positions=sum(len(x) for x in seqs), input_ids_sha256=input_ids_sha256(seqs))
        done = None
        if path.exists():
            try:
                _, old_meta = read_shard(path)
                if all(old_meta.get(key) == val for key, val in meta.items()):
                    done = old_meta
            except (ValueError, FileNotFoundError):
                done = None
        if done is None:
            idx_parts, lp_parts = [], []
            j = 0
            while j < len(buf):  # the part of each user batch that falls in this shard
                e = j
                while e < len(buf) and buf[e][0] == buf[j][0]:
                    e += 1
                i, lp = tm.topk(seqs[j:e], k, temperature, chunk_vocab, chunk_rows)
                idx_parts.append(i)
                lp_parts.append(lp.to(dtype))
                bar.update(e - j)
                j = e
            done = write_shard(path, index=torch.cat(idx_parts), logprobs=torch.cat(lp_parts), seqs=seqs,
                                meta=meta)
        else:
            bar.update(len(seqs))
        entries.append({"file": path.name, "first_sequence": done["first_sequence"],
                        "n_sequences": done["n_sequences"], "n_positions": done["n_positions"],
                        "input_ids_sha256": done["input_ids_sha256"], "data_sha256": done["data_sha256"]})
        stats["n_sequences"] += done["n_sequences"]
        stats["n_positions"] += done["n_positions"]
        write_manifest(complete=False)

    was_training = tm.model.training
    tm.model.eval()
    try:
        buf: list[tuple[int, torch.Tensor]] = []
        for b, s in _iter_sequences(batches):
            if int(s.numel()) and (int(s.min()) < 0 or int(s.max()) >= tm.input_vocab):
                raise ValueError(f"batches[{b}] holds token id {int(s.max()) if int(s.min()) >= 0 else int(s.min())}"
                                 f" outside the teacher's vocab [0, {tm.input_vocab}): wrong tokenizer?")
            buf.append((b, s))
            if len(buf) == shard_size:
                finish_shard(buf)
                buf = []
        if buf or not entries:
            finish_shard(buf)
    finally:
        tm.model.train(was_training)
        bar.close()
    return write_manifest(complete=True)
