"""The per-user cache of ``dft-kernels doctor --save`` (docs/design.md sec. 16).

``$XDG_CACHE_HOME/dft_kernels/doctor.json`` (default ``~/.cache/dft_kernels/doctor.json``)
maps a device key -- the GPU's name and capability, the torch, Triton and dft_kernels
versions -- to the fastest choices the doctor measured there: ``impl`` ("triton" |
"torch"), ``strategy`` ("lean" | "fast") and ``backward_gemm`` ("triton" | "torch").
``impl="auto"``, ``strategy="auto"`` and the fused path's backward products read it
(environment variables and explicit arguments win). An upgrade of any version, or
another GPU, is a different key: stale measurements are never used.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

#: the choices the doctor saves and "auto" reads, with their allowed values
CHOICES = {"impl": ("triton", "torch"), "strategy": ("lean", "fast"), "backward_gemm": ("triton", "torch")}

_MEMO: dict[str, dict] = {}


def cache_path() -> Path:
    """Where the cache lives (honours ``XDG_CACHE_HOME``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dft_kernels" / "doctor.json"


def _versions() -> str:
    from .. import __version__
    try:
        import triton
        tv = triton.__version__
    except Exception:  # noqa: BLE001 - no (working) triton is a key like any other
        tv = "none"
    return f"torch {torch.__version__} | triton {tv} | dft_kernels {__version__}"


def device_key(device: torch.device | None = None) -> str:
    """The cache key of ``device`` (the current CUDA device if None; "cpu" without CUDA)."""
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(idx)
        name = f"{torch.cuda.get_device_name(idx)} | sm_{cap[0]}{cap[1]}"
    else:
        name = device.type
    return f"{name} | {_versions()}"


def load() -> dict:
    """The whole cache ({} when absent or unreadable), read once per process and path."""
    path = str(cache_path())
    if path not in _MEMO:
        try:
            with open(path) as f:
                data = json.load(f)
            _MEMO[path] = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            _MEMO[path] = {}
    return _MEMO[path]


def cached_choice(name: str, device: torch.device | None = None) -> str | None:
    """The saved choice ``name`` (a key of :data:`CHOICES`) for ``device``, or None."""
    if device is not None and device.type != "cuda":
        return None
    if device is None and not torch.cuda.is_available():
        return None
    entry = load().get(device_key(device), {})
    value = entry.get("choices", {}).get(name)
    return value if value in CHOICES.get(name, ()) else None


def save(choices: dict, measured: dict, device: torch.device | None = None) -> Path:
    """Store ``choices`` (and the timings they came from) under ``device``'s key."""
    bad = {k: v for k, v in choices.items() if v not in CHOICES.get(k, ())}
    if bad:
        raise ValueError(f"unknown doctor choices {bad}; allowed: {CHOICES}")
    path = cache_path()
    data = dict(load())
    data[device_key(device)] = dict(choices=choices, measured=measured)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)
    _MEMO.pop(str(path), None)
    return path


def clear() -> bool:
    """Remove the cache file. Returns whether there was one."""
    path = cache_path()
    _MEMO.pop(str(path), None)
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False
