"""Measured peak memory of the dense distillation loss (``fused_linear_distill_loss``)
next to the library's model (``dft_kernels.memory.two_head_extra_bytes``).

- chunked PyTorch (naive reference, lean, fast), run on the CPU inside ``LivePeak``: every
  storage made during one forward + backward, the returned gradients left out;
- lean on the Triton path, run on ``meta`` tensors with the sm_90 launch config (launches
  are no-ops, every buffer has its real size): the op alone (the loss's two gathered hidden
  states, ``N*(D + Dt)*e``, are left out of the measurement and the model: ``nonzero`` has
  no ``meta`` result).

    python -m benchmarks.distill_memory [--out benchmarks/results/distill_memory]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .long_context import LivePeak, launches_skipped

MiB = 2 ** 20
KINDS = ("forward_kl", "reverse_kl", "jsd")


def _inputs(N: int, D: int, Dt: int, V: int, dtype, head_trains: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(V, D, generator=g) * 0.02).to(dtype).requires_grad_(head_trains)
    ht = torch.randn(N, Dt, generator=g).to(dtype)
    wt = (torch.randn(V, Dt, generator=g) * 0.02).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.125] = -100       # 1/8 of the rows ignored: never projected
    return h, w, ht, wt, labels


def measure_cpu(strategy: str, divergence: str, N: int, D: int, Dt: int, V: int, dtype=torch.float32,
                head_trains: bool = True) -> dict:
    """One forward + backward of the distillation loss on the CPU (``impl="torch"``, or
    ``"reference"`` for ``strategy="naive"``) inside ``LivePeak``.

    Returns:
        ``measured``: peak bytes beyond inputs and returned gradients; ``model``:
        ``memory.loss_extra_bytes`` over the counted rows; ``grad_fn`` (which strategy ran).
    """
    import dft_kernels as dk
    from dft_kernels import memory
    h, w, ht, wt, labels = _inputs(N, D, Dt, V, dtype, head_trains)
    impl = "reference" if strategy == "naive" else "torch"
    kw = {} if strategy == "naive" else dict(strategy=strategy)
    with LivePeak() as track:
        loss = dk.fused_linear_distill_loss(h, w, ht, wt, labels, divergence=divergence, impl=impl, **kw)
        grad_fn = type(loss.grad_fn).__name__
        loss.backward()
    grads = [t.grad for t in (h, w) if t.grad is not None]
    counted = int((labels != -100).sum())
    model = memory.loss_extra_bytes(strategy, n_rows=counted, hidden=D, vocab=V, k=0, dtype_bytes=h.element_size(),
                                    head_trains=head_trains, upcast=True, teacher_hidden=Dt, divergence=divergence)
    return {"path": "torch", "strategy": strategy, "divergence": divergence, "N": N, "counted": counted, "D": D,
            "Dt": Dt, "V": V, "dtype": str(dtype).removeprefix("torch."), "head_trains": head_trains,
            "measured": track.peak_without(grads), "model": model, "grad_fn": grad_fn}


def measure_triton_lean(divergence: str, N: int, D: int, Dt: int, V: int, dtype=torch.bfloat16,
                        head_trains: bool = True, capability=(9, 0)) -> dict:
    """The Triton two-head op's forward + backward on ``meta`` tensors (launches skipped)
    with the GPU config of ``capability``; ``model`` is the loss's less the two gathered
    hidden states ``N*(D + Dt)*e`` it makes before the op (the op's inputs here)."""
    from dft_kernels import memory
    from dft_kernels.ops import TwoHeadArgs, compile_target
    from dft_kernels.ops.two_head.triton import TwoHeadDivergenceTriton
    meta = dict(device="meta", dtype=dtype)
    h = torch.empty(N, D, **meta, requires_grad=True)
    w = torch.empty(V, D, **meta, requires_grad=head_trains)
    ht, wt = torch.empty(N, Dt, **meta), torch.empty(V, Dt, **meta)
    with compile_target(capability), launches_skipped(), LivePeak() as track:
        div = TwoHeadDivergenceTriton.apply(h, w, None, ht, wt, None, TwoHeadArgs(None, None, 1.0, divergence, 0.5))
        div.backward(torch.empty_like(div))
        op = track.peak_without([h.grad] + ([w.grad] if head_trains else []))
    e = h.element_size()
    model = memory.loss_extra_bytes("lean", n_rows=N, hidden=D, vocab=V, k=0, dtype_bytes=e, head_trains=head_trains,
                                    kernels="triton", teacher_hidden=Dt, divergence=divergence)
    return {"path": "triton (meta, sm_90 config)", "strategy": "lean", "divergence": divergence, "N": N, "counted": N,
            "D": D, "Dt": Dt, "V": V, "dtype": str(dtype).removeprefix("torch."), "head_trains": head_trains,
            "measured": op, "model": model - N * (D + Dt) * e, "grad_fn": "TwoHeadDivergenceTriton"}


def run() -> list[dict]:
    rows = []
    for strategy in ("naive", "lean", "fast"):
        for kind in KINDS:
            rows.append(measure_cpu(strategy, kind, 4096 if strategy != "naive" else 1024, 64, 96, 3001))
    rows.append(measure_cpu("lean", "forward_kl", 4096, 64, 96, 3001, torch.bfloat16))
    rows.append(measure_cpu("fast", "jsd", 4096, 64, 96, 3001, torch.bfloat16, head_trains=False))
    for N in (4096, 32768, 262144):
        for dtype in (torch.bfloat16, torch.float32):
            for trains in (True, False):
                rows.append(measure_triton_lean("jsd", N, 4096, 8192, 128256, dtype, trains))
    return rows


def write(rows: list[dict], out: Path) -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    js, md = out.with_suffix(".json"), out.with_suffix(".md")
    js.write_text(json.dumps(rows, indent=1))
    lines = ["# Dense distillation loss: measured peak memory vs the model", "",
             "`python -m benchmarks.distill_memory`. Bytes beyond the inputs and the returned gradients of one "
             "forward + backward of `fused_linear_distill_loss`; model: `memory.loss_extra_bytes(..., "
             "teacher_hidden=Dt, divergence=...)` over the counted rows. CPU rows: measured with `LivePeak` on the "
             "CPU (1/8 of the rows ignored). Triton rows: the kernels' launchers on `meta` tensors with the sm_90 "
             "config (no GPU), the op alone: the loss's two gathered hidden states are left out of both columns.", "",
             "| path | strategy | divergence | dtype | head trains | N | D | Dt | V | measured MiB | model MiB | "
             "measured / model |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['path']} | {r['strategy']} | {r['divergence']} | {r['dtype']} | {r['head_trains']} | "
                     f"{r['N']} | {r['D']} | {r['Dt']} | {r['V']} | {r['measured'] / MiB:.1f} | "
                     f"{r['model'] / MiB:.1f} | {r['measured'] / r['model']:.2f} |")
    md.write_text("\n".join(lines) + "\n")
    return [js, md]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/distill_memory"))
    args = p.parse_args(argv)
    rows = run()
    for path in write(rows, args.out):
        print(f"wrote {path}")
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
