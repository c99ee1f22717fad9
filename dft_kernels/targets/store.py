"""Target files on disk: atomic writes, shard headers and hashes, the manifest, and the
one resumable shard-directory writer that ``build`` and ``blend_dirs`` share.

Shard format (``shard-00000.safetensors`` ...), one JSON metadata key
``"dft_kernels"`` (a single key keeps the file bytes deterministic):

    index      [n_positions, K] int32     top-K teacher ids, -1 = empty slot
    logprobs   [n_positions, K] fp16      log-probs (normalised over the full vocab)
    input_ids  [n_positions]    int64     the tokens the targets were computed for
    lengths    [n_sequences]    int64     sequence lengths (positions are concatenated)
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

#: The one safetensors metadata key this package writes (value: a JSON object).
METADATA_KEY = "dft_kernels"
SHARD_FORMAT = "dft_kernels.targets/1"
MANIFEST = "manifest.json"
_TMP_PREFIX = ".dft-tmp-"

# --------------------------------------------------------------------------- files


def metadata_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent/old or complete:
    temp file in the same directory, fsync, os.replace, fsync of the directory."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes 0600: give the file the mode open() would (umask)
            mask = os.umask(0)
            os.umask(mask)
            os.fchmod(fd, 0o666 & ~mask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename durable; not possible on every platform
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def shard_error(path: Path, why: str) -> ValueError:
    """The error for a damaged targets file (raise it).

    Args:
        path: the shard file.
        why: what is wrong, e.g. the reader's own message.
    Returns:
        A ValueError naming the file and how to regenerate it."""
    return ValueError(f"targets file {str(path)!r} is truncated or corrupted ({why}); delete it and "
                      "re-run the build (dft-kernels targets build / dk.targets.build) to regenerate it")


def check_shard_k(path: Path, shard_k, manifest_k) -> None:
    """A shard from another build (another K) is named as such, not as corrupted."""
    if shard_k != manifest_k:
        raise ValueError(f"targets file {str(path)!r} holds K={shard_k} teacher slots per position but its "
                         f"manifest.json says k={manifest_k}: it comes from another build. Put it back where it "
                         "came from, or re-run this build to regenerate it")


def read_header(path: Path):
    """Open a shard lazily (memory-mapped): nothing is read but the header.

    Args:
        path: a shard file written by ``build`` / ``blend``.
    Returns:
        ``(handle, metadata)``: the ``safetensors.safe_open`` handle (``get_slice(name)``
        reads rows of ``index`` [n_positions, K], ``logprobs`` [n_positions, K],
        ``input_ids`` [n_positions], ``lengths`` [n_sequences]) and the shard's
        metadata dict. FileNotFoundError if absent, :func:`shard_error` if damaged."""
    from safetensors import SafetensorError, safe_open
    if not path.is_file():
        raise FileNotFoundError(f"targets file {str(path)!r} does not exist")
    try:
        handle = safe_open(str(path), framework="pt")
        raw = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise shard_error(path, str(e)) from None
    if METADATA_KEY not in raw:
        raise shard_error(path, f"no {METADATA_KEY!r} metadata: not written by dft_kernels")
    try:
        meta = json.loads(raw[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise shard_error(path, f"metadata is not JSON: {e}") from None
    if not isinstance(meta, dict):
        raise shard_error(path, "metadata is not a JSON object")
    return handle, meta


def read_safetensors(path: Path, names: Sequence[str]):
    handle, meta = read_header(Path(path))
    with handle:  # closes the memory map (the file may be replaced next)
        keys = set(handle.keys())
        missing = [n for n in names if n not in keys]
        if missing:
            raise shard_error(Path(path), f"missing tensors {missing}")
        try:
            tensors = {n: handle.get_tensor(n).clone() for n in names}
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise shard_error(Path(path), str(e)) from None
    return tensors, meta


def _sha256_tensors(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def input_ids_sha256(sequences: Iterable) -> str:
    """sha256 identifying a list of token-id sequences: the lengths (int64 LE) then
    the concatenated ids (int64 LE). Stored in each shard's metadata."""
    arrs = [np.asarray(s.cpu() if isinstance(s, torch.Tensor) else s, dtype="<i8").reshape(-1)
            for s in sequences]
    h = hashlib.sha256()
    h.update(np.asarray([len(a) for a in arrs], dtype="<i8").tobytes())
    for a in arrs:
        h.update(a.tobytes())
    return h.hexdigest()


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def write_shard(path: Path, *, index, logprobs, seqs, meta) -> dict:
    from safetensors.torch import save
    input_ids = torch.cat(seqs) if seqs else torch.empty(0, dtype=torch.int64)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    meta = dict(meta)
    meta["data_sha256"] = _sha256_tensors(index, logprobs)
    data = save({"index": index.contiguous(), "logprobs": logprobs.contiguous(),
                 "input_ids": input_ids.contiguous(), "lengths": lengths},
                metadata={METADATA_KEY: metadata_json(meta)})
    atomic_write(path, data)
    return meta


def read_shard(path, *, check_data: bool = True) -> tuple[dict, dict]:
    """Load a whole shard, checking shapes and the stored hashes.

    Args:
        path: a shard file written by ``build`` / ``blend``.
        check_data: also check the sha256 of ``index`` / ``logprobs`` (the input ids'
            hash is always checked).
    Returns:
        ``(tensors, metadata)``: ``tensors`` holds ``index`` [n_positions, K] int32,
        ``logprobs`` [n_positions, K], ``input_ids`` [n_positions] int64 and ``lengths``
        [n_sequences] int64. ValueError naming the file on any inconsistency."""
    path = Path(path)
    tensors, meta = read_safetensors(path, ("index", "logprobs", "input_ids", "lengths"))
    _check_shard(path, meta, tensors, check_data=check_data)
    return tensors, meta


def _check_shard(path: Path, meta: dict, tensors: dict, *, check_data: bool) -> None:
    idx, lp, ids, lengths = (tensors[n] for n in ("index", "logprobs", "input_ids", "lengths"))
    n = ids.shape[0] if ids.dim() == 1 else -1
    if idx.dim() != 2 or idx.shape != lp.shape or ids.dim() != 1 or idx.shape[0] != n \
            or lengths.dim() != 1 or int(lengths.sum()) != n or idx.shape[1] != meta.get("k"):
        raise shard_error(path, "tensor shapes are inconsistent")
    if meta.get("n_sequences") != lengths.shape[0] or meta.get("n_positions") != n:
        raise shard_error(path, "sequence / position counts disagree with the metadata")
    got = input_ids_sha256(torch.split(ids, lengths.tolist()))
    if got != meta.get("input_ids_sha256"):
        raise shard_error(path, "input_ids do not match their sha256")
    if check_data and _sha256_tensors(idx, lp) != meta.get("data_sha256"):
        raise shard_error(path, "index/logprobs do not match their sha256")


# --------------------------------------------------------------------------- writing a build


class ShardDirWriter:
    """The one resumable writer of a shard directory, shared by ``build`` and ``blend_dirs``.

    Opening it creates ``out_dir``, removes the temp files a crash mid-write left there and
    refuses (ValueError naming the key) an earlier run's manifest recorded with other
    ``params``. Then :meth:`shard` is called once per shard, in order: a shard already on
    disk that verifies (every stored sha256) and was written with the same metadata is kept,
    any other is computed and written atomically; the manifest is rewritten, atomically,
    after every shard (``complete=False``) and by :meth:`finish` (``complete=True``).

    Args:
        out_dir: the output directory.
        params: the settings every shard and the manifest record; a resume needs them equal.
        info: free manifest fields (name, description, ...) that a resume may change.
        noun: "build" or "blend", for the conflict message.
        hints: per params key, a sentence added to its conflict message.
        check: called with the earlier run's manifest (``{}`` if none) before ``params`` are
            compared, to refuse it with a message of the caller's own.
    """

    def __init__(self, out_dir, params: dict, *, info: dict | None = None, noun: str = "build",
                 hints: dict | None = None, check=None):
        self.out = Path(out_dir)
        self.params, self.info = dict(params), dict(info or {})
        self.entries: list[dict] = []
        self.written = self.kept = 0
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in self.out.glob(_TMP_PREFIX + "*"):  # leftovers of a crash mid-write
            try:
                stale.unlink()
            except OSError:
                pass
        old = previous_manifest(self.out)
        if check is not None:
            check(old)
        for key, val in self.params.items():
            if key in old and old[key] != val:
                held = "targets" if noun == "build" else f"another {noun}"
                raise ValueError(f"out_dir {str(self.out)!r} holds {held} built with {key}={old[key]!r}, "
                                 f"this {noun} has {key}={val!r}: use a new out_dir (or delete the old one)"
                                 + (hints or {}).get(key, ""))

    def _verified(self, path: Path, expect: dict) -> dict | None:
        """The metadata of the shard at ``path`` if it verifies and records ``expect``, else None."""
        if not path.exists():
            return None
        try:
            _, meta = read_shard(path)
        except (ValueError, FileNotFoundError):
            return None
        return meta if all(meta.get(key) == val for key, val in expect.items()) else None

    def shard(self, expect: dict, compute) -> bool:
        """Keep or write the next shard; returns whether it was written.

        Args:
            expect: the shard's metadata (``params`` are added) that a kept shard must record.
            compute: ``() -> (index, logprobs, seqs, extra)``, called only when the shard is
                written; ``extra`` adds to its metadata.
        """
        path = self.out / shard_name(len(self.entries))
        expect = {**self.params, **expect}
        done = self._verified(path, expect)
        written = done is None
        if written:
            index, logprobs, seqs, extra = compute()
            done = write_shard(path, index=index, logprobs=logprobs, seqs=seqs, meta={**expect, **extra})
        self.written += written
        self.kept += not written
        self.entries.append({key: done[key] for key in ("first_sequence", "n_sequences", "n_positions",
                                                        "input_ids_sha256", "data_sha256")} | {"file": path.name})
        self._write_manifest(complete=False)
        return written

    def finish(self) -> dict:
        """Write the complete manifest and return it."""
        return self._write_manifest(complete=True)

    def _write_manifest(self, complete: bool) -> dict:
        man = dict(self.params, **self.info, complete=complete, shards=self.entries,
                   n_sequences=sum(e["n_sequences"] for e in self.entries),
                   n_positions=sum(e["n_positions"] for e in self.entries))
        atomic_write(self.out / MANIFEST, (json.dumps(man, indent=1, sort_keys=True) + "\n").encode())
        return man


# --------------------------------------------------------------------------- reading a build


def read_manifest(targets_dir) -> dict:
    """The manifest of a build directory.

    Args:
        targets_dir: a directory written by ``build`` / ``blend``.
    Returns:
        The ``manifest.json`` dict (``format``, ``k``, ``vocab_size``, ``complete``,
        ``shards``: one entry per shard file, ...). ValueError if missing or unreadable."""
    path = Path(targets_dir) / MANIFEST
    if not path.is_file():
        raise ValueError(f"targets_dir {str(targets_dir)!r} has no {MANIFEST}: build targets first "
                         "(dft-kernels targets build / dk.targets.build)")
    try:
        man = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}); re-run the build to rewrite it") from None
    if not isinstance(man, dict) or man.get("format") != SHARD_FORMAT or not isinstance(man.get("shards"), list):
        raise ValueError(f"{str(path)!r} is not a dft_kernels targets manifest (format {SHARD_FORMAT})")
    return man


def previous_manifest(out_dir) -> dict:
    """The manifest an earlier run left in ``out_dir`` (to resume it or refuse to mix runs).

    Args:
        out_dir: an output directory of ``build`` / ``blend``.
    Returns:
        Its ``manifest.json`` dict; ``{}`` when there is none or it is unreadable."""
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


# --------------------------------------------------------------------------- fingerprints


def _head_correction(model) -> str | None:
    """How the lm_head's low-rank correction enters its output, or None without one: what
    the state dict does not say -- which adapter is active (a disabled or merged one is the
    base head), its scaling (PEFT's ``lora_alpha / r``). Its A / B are state-dict tensors."""
    from ..lm_head import HeadParts, resolve_head
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if not isinstance(head, torch.nn.Module):
        return None
    try:
        parts = resolve_head(head)
    except ValueError as e:                    # a variant no fused path computes: its description still counts
        return f"unsupported: {e}"
    if not isinstance(parts, HeadParts) or not parts.has_lora:
        return None
    return f"{parts.what}|scaling={parts.lora_scaling!r}|r={tuple(parts.lora_A.shape)}"


def _model_parts(model) -> tuple[str, str]:
    """(weights sha256, config sha256) of a torch module: every state-dict tensor
    (name, dtype, shape, bytes) and the config's fields (private ones dropped); a low-rank
    correction of the lm_head (a PEFT LoRA, a style head) adds its active adapter and
    scaling to the weights (:func:`_head_correction`; a plain head's hash is unchanged)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            if t.device.type != "meta":
                h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    correction = _head_correction(model)
    if correction is not None:
        h.update(f"lm_head correction|{correction}".encode())
    cfg = getattr(model, "config", None)
    fields = cfg.to_dict() if hasattr(cfg, "to_dict") else {}
    fields = {k: v for k, v in fields.items() if not k.startswith("_")
              and k not in ("transformers_version", "dtype", "torch_dtype", "use_cache")}
    return h.hexdigest(), hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint_model(model) -> str:
    """A hex sha256 of a teacher's weights and config (docs/design.md sec. 7): equal
    for the same weights and config, different after retraining in place.

    Args:
        model: a torch module (a Hugging Face causal LM; its ``config`` is included
            when it has one). Reads every weight once (seconds for a 7B model).
    Returns:
        64 hex characters."""
    return model_fingerprints(model)["fingerprint"]


def model_fingerprints(model) -> dict:
    """``{"weights", "config", "fingerprint"}``: the hex sha256 of the weights, of the
    config, and of both (:func:`fingerprint_model`); the parts say what changed."""
    weights, config = _model_parts(model)
    return {"weights": weights, "config": config,
            "fingerprint": hashlib.sha256(f"{weights}:{config}".encode()).hexdigest()}


def fingerprint_tokenizer(tokenizer) -> str:
    """A hex sha256 of a tokenizer's token -> id map (added and special tokens included):
    what decides whether two tokenizers give the same ids.

    Args:
        tokenizer: a Hugging Face tokenizer (anything with ``get_vocab()``) or the path
            of a directory it loads from.
    Returns:
        64 hex characters."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    if not callable(getattr(tokenizer, "get_vocab", None)):
        raise TypeError(f"tokenizer must be a Hugging Face tokenizer (with get_vocab()) or its directory, got "
                        f"{type(tokenizer).__name__}")
    vocab = sorted((str(k), int(v)) for k, v in tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, separators=(",", ":")).encode()).hexdigest()
