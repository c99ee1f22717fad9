"""Target files on disk: atomic writes, shard headers and hashes, the manifest.

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
    return ValueError(f"targets file {str(path)!r} is truncated or corrupted ({why}); delete it and "
                      "re-run the build (dft-kernels targets build / dk.targets.build) to regenerate it")


def read_header(path: Path):
    """Open a safetensors file lazily: (handle, metadata dict). Errors name the file."""
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
    """Load a whole shard: (tensors, metadata), checking shapes and the stored
    hashes (input ids always, index/logprobs when ``check_data``). ValueError naming
    the file on any inconsistency."""
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



# --------------------------------------------------------------------------- reading a build


def read_manifest(targets_dir) -> dict:
    """The manifest of a build directory; ValueError if missing or unreadable."""
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
