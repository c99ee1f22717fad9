"""``impl="auto"``'s first-call numerical check (docs/design.md sec. 16).

A Triton or ptxas bug can compile a kernel that runs without an error and gives wrong
numbers (a miscompiled backward, wrong code from one ptxas release). Before an op's Triton
kernels serve a (device, dtype) for the first time, :func:`guarded` runs them on a small
problem shaped like the call -- the same hidden sizes, dtype, options and the same vocab
divisibility, so the same kernel specialisations, but :data:`ROWS` rows and a vocab of about
a thousand -- next to the chunked PyTorch path, forward and backward (upstream gradients
!= 1, some rows ignored). Outputs or gradients that differ by more than :data:`TOLERANCE`
of their largest magnitude send the op to the PyTorch path with one warning, like a
compile failure. Both paths compute in fp32 from the same operands, so they agree to
accumulation order (TF32 included); a miscompile is off by far more.

On by default on CUDA; ``DFT_KERNELS_SELF_CHECK=0`` switches it off, ``=1`` forces it on
(also for the Triton interpreter, where it is off by default: tests).
"""
from __future__ import annotations

import os
from collections.abc import Callable

import torch

#: rows of the check's problem on a GPU: one full row tile of the GPU configs and a partial
#: one (under the interpreter, whose tiles are 16 rows: :data:`INTERPRETER_ROWS`)
ROWS = 80
INTERPRETER_ROWS = 21
#: the largest difference allowed, relative to the largest magnitude of the PyTorch path's tensor
TOLERANCE = {torch.float32: 1e-2, torch.bfloat16: 3e-2, torch.float16: 3e-2}


def enabled(device: torch.device) -> bool:
    """Whether the check runs on ``device`` (see the module docstring)."""
    flag = os.environ.get("DFT_KERNELS_SELF_CHECK")
    if flag is not None:
        return flag.strip() not in ("0", "", "false", "no")
    return device.type == "cuda"


def rows(device) -> int:
    """Rows of the check's problem on ``device``."""
    return ROWS if torch.device(device).type == "cuda" else INTERPRETER_ROWS


def _vocab(V: int, device) -> int:
    """A small vocab with ``V``'s divisibility by 16 (Triton specialises on it): over 8 GPU
    vocab tiles, or 2-3 of the interpreter's."""
    if torch.device(device).type != "cuda":
        return 144 if V % 16 == 0 else 141
    return 1040 if V % 16 == 0 else 1037


def _index(n: int, m: int, v: int, device, g: torch.Generator) -> torch.Tensor:
    """[n, m] distinct ids per row in [0, v) (-1 past v when m > v), every 7th row all -1
    (ignored)."""
    idx = torch.full((n, m), -1, dtype=torch.int64)
    for r in range(n):
        ids = torch.randperm(v, generator=g)[:m]
        idx[r, :len(ids)] = ids
    idx[::7] = -1
    return idx.to(device)


def _randn(shape, dtype, device, g: torch.Generator, std: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=g) * std).to(device=device, dtype=dtype)


def _compare(got, want, dtype: torch.dtype, names) -> str | None:
    """The first pair that disagrees, as a sentence; None if all agree."""
    tol = TOLERANCE.get(dtype, 1e-2)
    for name, a, b in zip(names, got, want):
        if a is None and b is None:
            continue
        if (a is None) != (b is None):
            return f"{name} is missing on one path"
        a, b = a.detach().double(), b.detach().double()
        finite = torch.isfinite(b)
        if not torch.equal(finite, torch.isfinite(a)):
            return f"{name} is not finite where the PyTorch path's is (or the reverse)"
        scale = b[finite].abs().max().item() if finite.any() else 0.0
        err = (a[finite] - b[finite]).abs().max().item() if finite.any() else 0.0
        if err > tol * max(scale, 1e-6):
            return (f"{name} differs from the PyTorch path's by {err:.3g} (largest magnitude {scale:.3g}, "
                    f"tolerance {tol:g} of it)")
    return None


def _forward_backward(fn: Callable, leaves: list, g: torch.Generator):
    """Outputs of ``fn(*leaves)`` and the gradients of the leaves that require grad for
    fixed upstream gradients (random, != 1)."""
    leaves = [t.detach().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t for t in leaves]
    with torch.enable_grad():
        outs = fn(*leaves)
        outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
        diff = [o for o in outs if o.requires_grad]
        ups = [(torch.rand(o.shape, generator=g) + 0.5).to(o.device, o.dtype) for o in diff]
        wrt = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
        grads = torch.autograd.grad(diff, wrt, ups, allow_unused=True) if diff and wrt else ()
    return [o.detach() for o in outs], list(grads)


def compare_paths(run_triton: Callable, run_torch: Callable, leaves: list, dtype: torch.dtype,
                  out_names, seed: int = 0) -> str | None:
    """Run both paths on ``leaves`` (forward, and backward where outputs need grad) and
    compare; returns why they disagree, or None."""
    t_out, t_grads = _forward_backward(run_triton, leaves, torch.Generator().manual_seed(seed))
    r_out, r_grads = _forward_backward(run_torch, leaves, torch.Generator().manual_seed(seed))
    names = list(out_names) + [f"gradient {i}" for i in range(len(r_grads))]
    return _compare(t_out + t_grads, r_out + r_grads, dtype, names)


def head_problem(D: int, V: int, dtype: torch.dtype, device, *, bias: bool, rank: int = 0, seed: int = 0):
    """``(h [n, D], w [V', D], b [V'] | None, u [n, r] | None, B [V', r] | None)`` with
    gradients required, logits of std ~2 (n = :func:`rows`, V' = :func:`_vocab`)."""
    g = torch.Generator().manual_seed(seed)
    v, n = _vocab(V, device), rows(device)
    h = _randn((n, D), dtype, device, g).requires_grad_(True)
    w = _randn((v, D), dtype, device, g, 2.0 / D ** 0.5).requires_grad_(True)
    b = _randn((v,), dtype, device, g, 0.5).requires_grad_(True) if bias else None
    u = _randn((n, rank), dtype, device, g).requires_grad_(True) if rank else None
    lb = _randn((v, rank), dtype, device, g, 0.1).requires_grad_(True) if rank else None
    return h, w, b, u, lb


def problem_index(M: int, V: int, device, seed: int = 1) -> torch.Tensor:
    """[n, M] ids for :func:`head_problem`'s vocab (every 7th row ignored)."""
    return _index(rows(device), M, _vocab(V, device), device, torch.Generator().manual_seed(seed))


def logits_problem(V: int, dtype: torch.dtype, device, seed: int = 0) -> torch.Tensor:
    """[n, V'] logits of std 2 that require grad."""
    return _randn((rows(device), _vocab(V, device)), dtype, device, torch.Generator().manual_seed(seed),
                  2.0).requires_grad_(True)
