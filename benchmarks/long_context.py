"""Long context: the loss's extra memory against the number of tokens (4k to 1M) at a head.

``python -m benchmarks.long_context [--hidden 4096 --vocab 128256 --k 32] [--out benchmarks/results]``

Writes ``long_context.json`` / ``.md`` / ``.png``: per N, bytes beyond the inputs and the
returned gradients of one forward + backward on a GPU, bf16, trained lm_head,

- ours (lean, Triton): measured by running the launchers on ``meta`` tensors with the sm_90
  config (no compute; every buffer the op creates, its peak tracked op by op) next to the
  library's model (``memory.triton_lean_bytes``);
- the naive reference and the peers, **modelled** from their source (not measured):
  Liger-Kernel's fused linear cross-entropy (row chunks of N / ceil(V / D) rows: a
  [chunk, V] logits chunk in the input dtype and its fp32 softmax, dH held from the forward,
  an fp32 dW), TRL's chunked log-prob (a [4096, 32768] fp32 tile, fp32 dH and dW
  accumulators), Cut Cross-Entropy (per-row lse and bookkeeping, no [N, V] or [N, D]
  buffer beyond the gradients). K = 0 for the peers (they compute cross-entropy / token
  log-probs), K as given for ours.
"""
from __future__ import annotations

import argparse
import json
import math
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .harness import MiB

TOKENS = [4096, 16384, 65536, 262144, 1 << 20]


class LivePeak(TorchDispatchMode):
    """The live bytes of the storages created inside the block, after every op (``meta``
    tensors included: their sizes are real, their data absent). A storage counts until
    the last tensor seen on it (the one that created it and every view of it) is freed."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}      # storage address -> bytes
        self.refs: dict[int, int] = {}      # storage address -> tensors seen on it, alive
        self.uid: dict[int, int] = {}       # storage address -> allocation number (addresses are reused)
        self.current = self.peak = self.allocations = 0
        self.timeline: list[tuple[int, frozenset]] = []

    def peak_without(self, tensors) -> int:
        """The peak of the live bytes not held by ``tensors`` (alive now: e.g. the returned
        gradients)."""
        held = {self.uid[t.untyped_storage()._cdata]: t.untyped_storage().nbytes() for t in tensors
                if t.untyped_storage()._cdata in self.uid}
        return max(cur - sum(n for u, n in held.items() if u in live) for cur, live in self.timeline)

    def _release(self, key):
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key], self.uid[key]
            self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage()._cdata
            if key not in self.live:
                if key in inputs:
                    continue        # a view of a storage made outside the block
                self.live[key] = t.untyped_storage().nbytes()
                self.refs[key] = 0
                self.allocations += 1
                self.uid[key] = self.allocations
                self.current += self.live[key]
                self.peak = max(self.peak, self.current)
            self.refs[key] += 1
            weakref.finalize(t, self._release, key)
        self.timeline.append((self.current, frozenset(self.uid.values())))
        return out


def launches_skipped():
    """Kernel launches (compiled or interpreted) do nothing within the block."""
    import contextlib

    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    @contextlib.contextmanager
    def ctx():
        originals = JITFunction.run, InterpretedFunction.run
        JITFunction.run = InterpretedFunction.run = lambda self, *a, **k: None
        try:
            yield
        finally:
            JITFunction.run, InterpretedFunction.run = originals
    return ctx()


def measured_lean(N: int, D: int, V: int, K: int, head_trains: bool = True, capability=(9, 0)) -> int:
    """Peak bytes beyond inputs and returned gradients of the Triton fused op, bf16, on ``meta``."""
    from dft_kernels.ops import linear_lse_gather as fused
    from dft_kernels.ops._triton_common import compile_target
    meta = dict(device="meta", dtype=torch.bfloat16)
    h = torch.empty(N, D, **meta, requires_grad=True)
    w = torch.empty(V, D, **meta, requires_grad=head_trains)
    index = torch.empty(N, K + 1, device="meta", dtype=torch.int64)
    with compile_target(capability), launches_skipped(), LivePeak() as track:
        lse, gathered = fused.LinearLSEGatherTriton.apply(h, w, None, index, (1.0,), None, True, K)
        torch.autograd.backward((lse, gathered), (torch.empty_like(lse), torch.empty_like(gathered)))
        return track.peak_without([h.grad] + ([w.grad] if head_trains else []))


def modelled_peers(N: int, D: int, V: int, e: int = 2) -> dict[str, int]:
    """Bytes beyond inputs and returned gradients, from each peer's source (see the module doc)."""
    chunk = math.ceil(N / math.ceil(V / D))
    return {
        "naive (materialised logits)": N * V * (e + 4 + 8),
        "Liger FLCE (modelled)": chunk * V * (e + 4) + N * D * e + V * D * 4,
        "TRL chunked log-prob (modelled)": min(N, 4096) * 32768 * 4 + N * D * 4 + V * D * 4,
        "CCE (modelled)": N * 16,
    }


def run(D: int, V: int, K: int, tokens=TOKENS) -> dict:
    from dft_kernels import memory
    rows = []
    for N in tokens:
        row = {"N": N, "ours lean (Triton, measured on meta)": measured_lean(N, D, V, K),
               "ours lean (Triton, model)": memory.triton_lean_bytes(n_rows=N, hidden=D, vocab=V, k=K, dtype_bytes=2)}
        row.update(modelled_peers(N, D, V))
        rows.append(row)
    return {"hidden": D, "vocab": V, "k": K, "dtype": "bf16", "head_trains": True, "rows": rows,
            "command": f"python -m benchmarks.long_context --hidden {D} --vocab {V} --k {K}"}


def write(result: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out.mkdir(parents=True, exist_ok=True)
    (out / "long_context.json").write_text(json.dumps(result, indent=1))
    names = [k for k in result["rows"][0] if k != "N"]
    lines = [f"# Extra memory against tokens (D {result['hidden']}, V {result['vocab']}, ours K {result['k']}, "
             "bf16, trained lm_head)", "", f"`{result['command']}`. Bytes beyond inputs and returned gradients, "
             "GiB. Ours measured on `meta` tensors (GPU config, no compute); peers modelled from their source.", "",
             "| N | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in result["rows"]:
        lines.append(f"| {r['N']} | " + " | ".join(f"{r[n] / 2 ** 30:.2f}" for n in names) + " |")
    (out / "long_context.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(8, 5))
    ns = [r["N"] for r in result["rows"]]
    for n in names:
        style = dict(marker="o", linewidth=2.5) if n.startswith("ours") else dict(marker=".", linestyle="--")
        ax.plot(ns, [max(r[n], 1) / MiB for r in result["rows"]], label=n, **style)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens in one call (N)")
    ax.set_ylabel("extra memory beyond inputs and gradients (MiB)")
    ax.set_title(f"Loss extra memory vs tokens, D {result['hidden']}, V {result['vocab']}, bf16")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "long_context.png", dpi=110)
    plt.close(fig)
    return [out / "long_context.json", out / "long_context.md", out / "long_context.png"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = p.parse_args(argv)
    for path in write(run(a.hidden, a.vocab, a.k), a.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
