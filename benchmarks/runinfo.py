"""Where and with what a sweep ran: versions, git revision, source hashes, load."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from .methods import peer_versions


def loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def git_rev(root: Path) -> str | None:
    head = root / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            p = root / ".git" / ref[5:]
            if p.exists():
                return p.read_text().strip()
            packed = root / ".git" / "packed-refs"
            for line in packed.read_text().splitlines():
                if line.endswith(ref[5:]):
                    return line.split()[0]
            return None
        return ref
    except OSError:
        return None


def source_hashes() -> dict:
    import hashlib
    import dft_kernels
    root = Path(dft_kernels.__file__).parent
    out = {}
    for rel in ("losses.py", "reference.py", "ops/_torch_common.py", "ops/lse_gather/triton.py", "ops/linear/triton.py"):
        p = root / rel
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()[:12] if p.exists() else "absent"
    return out


def versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__,
         "dft_kernels": dft_kernels_version()}
    try:
        import importlib.metadata
        v["triton"] = importlib.metadata.version("triton")
    except Exception as e:  # noqa: BLE001
        v["triton"] = f"missing: {type(e).__name__}: {e}"
    v["peers"] = peer_versions()
    return v


def dft_kernels_version() -> str:
    try:
        import dft_kernels
        return getattr(dft_kernels, "__version__", "unknown")
    except Exception as e:  # noqa: BLE001
        return f"missing: {type(e).__name__}: {e}"
