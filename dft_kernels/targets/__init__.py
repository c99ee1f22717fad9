"""Sparse teacher targets (docs/design.md sec. 2 and 7): the container, blending,
building from a teacher over a dataset, the on-disk store and its summary.

- ``container``: :class:`SparseTargets` (validate, pad / truncate, retemper,
  from_logits, from_vllm_prompt_logprobs, save / load)
- ``blending``: :func:`blend`, the per-position mixture of several teachers
- ``store``: atomic shard files, their headers and hashes, the manifest, the one
  resumable shard-directory writer (``ShardDirWriter``) of ``build`` and ``blend_dirs``
- ``building``: :func:`build`, a teacher's targets over a dataset, resumable
- ``inspection``: :func:`inspect`, a summary of a build directory
"""
from .blending import blend
from .building import build
from .container import LOGPROB_DTYPES, SparseTargets, resolve_dtype
from .inspection import inspect
from .store import (MANIFEST, METADATA_KEY, SHARD_FORMAT, check_shard_k, fingerprint_model, fingerprint_tokenizer,
                    input_ids_sha256, read_header, read_manifest, read_shard, shard_error, shard_name)

__all__ = ["SparseTargets", "blend", "build", "inspect", "read_shard", "read_manifest", "read_header",
           "shard_error", "shard_name", "check_shard_k", "fingerprint_model", "fingerprint_tokenizer", "input_ids_sha256",
           "resolve_dtype", "LOGPROB_DTYPES", "MANIFEST", "METADATA_KEY", "SHARD_FORMAT"]
