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

``python -m benchmarks.long_context --cpu-torch [--tokens 262144 --hidden 512 --vocab 32000 --k 32]
[--strategies lean,fast] [--chunk-elems C] [--render]`` measures the chunked PyTorch path
instead: one fp32 forward + backward of ``fused_linear_dft_loss(..., impl="torch")`` per
strategy, each in a fresh process, on real CPU tensors inside :class:`LivePeak` (minutes at
the default N 262144: 4.3e12 multiply-adds a matmul), next to ``memory.loss_extra_bytes(...,
kernels="torch")`` and the process's peak RSS; writes ``long_context_cpu.json`` / ``.md``
(``--render``: the .md again from the JSON, the model columns from the current library).
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
    tensors included: their sizes are real, their data absent; on real CPU tensors too,
    autograd's saved tensors and the backward's buffers included when ``backward()`` runs
    inside the block). A storage counts until the last tensor seen on it (the one that
    created it and every view of it) is freed. Buffers an op allocates and frees within
    itself (not returned) are not seen.

    ``steps[s]``: the live bytes after op ``s``; ``allocations``: one record a storage,
    ``(bytes, op, shape, dtype, first step, step freed or None)``, for :meth:`live_at`."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}      # storage address -> bytes
        self.refs: dict[int, int] = {}      # storage address -> tensors seen on it, alive
        self.uid: dict[int, int] = {}       # storage address -> allocation number (addresses are reused)
        self.current = self.peak = 0
        self.steps: list[int] = []
        self.records: list[list] = []       # allocation number - 1 -> [bytes, op, shape, dtype, born, freed]

    @property
    def allocations(self) -> int:
        return len(self.records)

    def _held(self, tensors) -> list[tuple[int, int]]:
        """(first step, bytes) of the storages of ``tensors`` (alive now) made inside the block."""
        out = {}
        for t in tensors:
            key = t.untyped_storage()._cdata
            if key in self.uid:
                rec = self.records[self.uid[key] - 1]
                out[self.uid[key]] = (rec[4], rec[0])
        return sorted(out.values())

    def peak_step_without(self, tensors, start: int = 0, stop: int | None = None) -> tuple[int, int]:
        """``(bytes, step)``: the peak of the live bytes not held by ``tensors`` (alive now:
        e.g. the returned gradients) after ops ``start`` to ``stop`` (None: the last), and the
        op after which it was reached."""
        held, best, at, sub, i = self._held(tensors), -1, start, 0, 0
        for s, cur in enumerate(self.steps[:stop]):
            while i < len(held) and held[i][0] <= s:
                sub += held[i][1]
                i += 1
            if s >= start and cur - sub > best:
                best, at = cur - sub, s
        return max(best, 0), at

    def first(self, *ops: str) -> int | None:
        """The step of the first allocation made by one of ``ops`` (e.g. "mm.default"), or None."""
        return next((r[4] for r in self.records if r[1] in ops), None)

    def peak_without(self, tensors) -> int:
        return self.peak_step_without(tensors)[0]

    def live_at(self, step: int) -> list[tuple]:
        """The allocations live after op ``step``, biggest first: ``(bytes, op, shape, dtype)``."""
        return sorted(((r[0], r[1], r[2], r[3]) for r in self.records
                       if r[4] <= step and (r[5] is None or r[5] > step)), key=lambda r: -r[0])

    def _release(self, key):
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.records[self.uid[key] - 1][5] = len(self.steps)
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
                self.records.append([self.live[key], str(func.__name__), tuple(t.shape), str(t.dtype).replace(
                    "torch.", ""), len(self.steps), None])
                self.uid[key] = len(self.records)
                self.current += self.live[key]
                self.peak = max(self.peak, self.current)
            self.refs[key] += 1
            weakref.finalize(t, self._release, key)
        self.steps.append(self.current)
        return out


def launches_skipped(record=None):
    """Kernel launches (``kernel[grid](...)``, compiled or interpreted, under any Triton
    release) do nothing within the block; ``record(kernel, grid, kwargs)`` sees each one."""
    import contextlib

    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    @contextlib.contextmanager
    def ctx():
        classes = (JITFunction, InterpretedFunction)
        originals = [cls.__dict__.get("__getitem__") for cls in classes]

        def getitem(kernel, grid):
            def launch(*args, **kwargs):
                if record is not None:
                    record(kernel, grid, kwargs)
            return launch
        for cls in classes:
            cls.__getitem__ = getitem
        try:
            yield
        finally:
            for cls, original in zip(classes, originals):
                if original is None:
                    del cls.__getitem__
                else:
                    cls.__getitem__ = original
    return ctx()


def measured_lean(N: int, D: int, V: int, K: int, head_trains: bool = True, capability=(9, 0)) -> int:
    """Peak bytes beyond inputs and returned gradients of the Triton fused op, bf16, on ``meta``."""
    from dft_kernels.ops import PrimitiveArgs, compile_target
    from dft_kernels.ops.linear import triton as fused
    meta = dict(device="meta", dtype=torch.bfloat16)
    h = torch.empty(N, D, **meta, requires_grad=True)
    w = torch.empty(V, D, **meta, requires_grad=head_trains)
    index = torch.empty(N, K + 1, device="meta", dtype=torch.int64)
    with compile_target(capability), launches_skipped(), LivePeak() as track:
        lse, gathered = fused.LinearLSEGatherTriton.apply(h, w, None, index, PrimitiveArgs((1.0,), None, K))
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


# --------------------------------------------------------------------------- the chunked PyTorch path, CPU

CPU_SHAPE = {"N": 262144, "D": 512, "V": 32000, "K": 32}
CPU_STRATEGIES = ("lean", "fast")
CPU_JSON, CPU_MD = "long_context_cpu.json", "long_context_cpu.md"


def cpu_inputs(N: int, D: int, V: int, K: int, seed: int = 0, ignored: float = 0.125):
    """fp32 inputs of the CPU measurement: hidden [N, D] (std 1) and lm_head [V, D] (std
    0.02), K teacher slots a row (random ids: distinct but for chance repeats, which the
    loss merges; log-probs holding 90% of the mass, normalised over the full vocab) and
    labels with about ``ignored`` of the rows -100 (not counted, never projected).

    Returns:
        ``(hidden, weight, target_index int64 [N, K], target_logprobs [N, K], labels int64 [N])``.
    """
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.02
    idx = torch.randint(0, V, (N, K), generator=g)
    lp = torch.log_softmax(torch.randn(N, K, generator=g) * 2, -1) + math.log(0.9)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < ignored] = -100
    return h, w, idx, lp, labels


def cpu_model(strategy: str, n_rows: int, D: int, V: int, K: int, chunk_elems: int | None = None) -> int:
    """The library's model of the bytes ``measure_cpu_torch`` measures: ``memory.loss_extra_bytes
    (strategy, ..., kernels="torch")`` for fp32 inputs and a trained head over ``n_rows`` rows
    (all of the call's rows, as ``fused_linear_dft_loss`` itself asks the model), less what
    "fast" holds from the forward to the backward (fp32 dW and dH: the very gradients it
    returns, which the measurement leaves out) -- but not below the targets' slot merge,
    which runs before they exist (``memory.target_merge_bytes``)."""
    from dft_kernels import memory
    rows = None if chunk_elems is None or strategy == "naive" else memory.chunk_rows_for(strategy, V, None, chunk_elems)
    b = memory.loss_extra_bytes(strategy, n_rows=n_rows, hidden=D, vocab=V, k=K, dtype_bytes=4, head_trains=True,
                                chunk_rows=rows, kernels="torch")
    if strategy != "fast":
        return b
    return max(b - (V * D * 4 + n_rows * D * 4), memory.target_merge_bytes(n_rows, K))


def measure_cpu_torch(strategy: str, N: int, D: int, V: int, K: int, chunk_elems: int | None = None,
                      seed: int = 0, top: int = 10, warmup: bool = True) -> dict:
    """One forward + backward of ``fused_linear_dft_loss(..., impl="torch", strategy=strategy)``
    on the CPU (fp32, trained lm_head, inputs of :func:`cpu_inputs`) inside :class:`LivePeak`.

    Returns:
        ``extra``: the peak of the bytes created inside the call beyond the returned gradients
        (h.grad, w.grad; inputs were made before); ``model``: :func:`cpu_model` over all N
        rows; ``live_peak``: the peak with the gradients; ``rss_extra``: the process's peak
        RSS (VmHWM) during the call minus its RSS before (grads, bookkeeping and allocator
        slack included: a cross-check); ``at_peak``: the ``top`` biggest allocations live at
        the peak (MiB, op, shape, dtype); ``phases``: ``extra`` before the first chunk's logits
        (the targets' preparation) and from them on (the chunk loop, forward and backward);
        ``wall_s``; ``grad_fn`` (which strategy ran).
        ``warmup``: one call on 64 rows first (not measured).
    """
    import gc
    import time

    import dft_kernels as dk

    from . import harness
    if warmup:   # the first call's one-off costs (the dispatch mode's and torch's lazy imports: ~150 MiB
        small = list(cpu_inputs(64, D, V, K, seed + 1))   # of RSS) out of the RSS cross-check
        small[0].requires_grad_(True)
        with LivePeak():
            dk.fused_linear_dft_loss(*small, impl="torch", strategy=strategy, chunk_elems=chunk_elems).backward()
        del small
    h, w, idx, lp, labels = cpu_inputs(N, D, V, K, seed)
    h.requires_grad_(True)
    w.requires_grad_(True)
    counted = int((labels != -100).sum())
    gc.collect()
    base, resettable = harness.rss_now(), harness.reset_rss_peak()
    t0 = time.perf_counter()
    with LivePeak() as track:
        loss = dk.fused_linear_dft_loss(h, w, idx, lp, labels, impl="torch", strategy=strategy,
                                        chunk_elems=chunk_elems)
        grad_fn = type(loss.grad_fn).__name__
        loss.backward()
    wall = time.perf_counter() - t0
    rss = harness.rss_peak() - base if base is not None else None
    extra, step = track.peak_step_without([h.grad, w.grad])
    mm = track.first("mm.default", "addmm.default")      # the first chunk's logits: the chunk loop begins
    phases, at_loop = {}, []
    if mm is not None:
        loop, loop_step = track.peak_step_without([h.grad, w.grad], mm)
        phases = {"before_chunks": track.peak_step_without([h.grad, w.grad], 0, mm)[0], "chunk_loop": loop}
        at_loop = track.live_at(loop_step)[:top]
    return {"strategy": strategy, "N": N, "D": D, "V": V, "K": K, "counted_rows": counted,
            "chunk_elems": chunk_elems, "extra": extra, "model": cpu_model(strategy, N, D, V, K, chunk_elems),
            "live_peak": track.peak, "rss_extra": rss, "rss_resettable": resettable,
            "phases": phases, "grads": h.grad.nbytes + w.grad.nbytes, "wall_s": round(wall, 1), "grad_fn": grad_fn,
            "loss": loss.item(), "ops": len(track.steps), "allocations": track.allocations,
            "peak_op": step, "at_peak": [[round(b / MiB, 2), op, list(shape), dt]
                                         for b, op, shape, dt in track.live_at(step)[:top]],
            "at_chunk_loop_peak": [[round(b / MiB, 2), op, list(shape), dt] for b, op, shape, dt in at_loop]}


def _cpu_command(shape: dict, strategies, chunk_elems=None) -> str:
    cmd = "python -m benchmarks.long_context --cpu-torch"
    if shape != CPU_SHAPE:
        cmd += f" --tokens {shape['N']} --hidden {shape['D']} --vocab {shape['V']} --k {shape['K']}"
    if chunk_elems:
        cmd += f" --chunk-elems {chunk_elems}"
    return cmd + f" --strategies {','.join(strategies)}"


def run_cpu(shape: dict, strategies, out: Path, chunk_elems=None, timeout: float = 7200) -> Path:
    """Each strategy in a fresh process, one after the other; the results merge into
    ``out/long_context_cpu.json`` (a rerun of one strategy replaces its row), then
    :func:`write_cpu`."""
    import os
    import subprocess
    import sys
    path = out / CPU_JSON
    data = json.loads(path.read_text()) if path.exists() else {}
    if data.get("shape") != shape or data.get("chunk_elems") != chunk_elems:
        data = {"shape": shape, "chunk_elems": chunk_elems, "rows": {}}
    for s in strategies:
        arg = json.dumps([s, shape["N"], shape["D"], shape["V"], shape["K"], chunk_elems])
        p = subprocess.run([sys.executable, "-m", "benchmarks.long_context", "--cpu-child", arg],
                           capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"{s}: {p.stderr.strip()[-2000:]}")
        row = json.loads(p.stdout.strip().splitlines()[-1])
        row["command"] = _cpu_command(shape, [s], chunk_elems)
        data["rows"][s] = row
        data["env"] = _cpu_env()
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)
        print(f"{s}: extra {row['extra'] / MiB:.1f} MiB, model {row['model'] / MiB:.1f} MiB, {row['wall_s']} s",
              flush=True)
    return write_cpu(path)


def _cpu_env() -> dict:
    import platform
    import subprocess
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu, "commit": commit}


def write_cpu(path: Path) -> Path:
    """``long_context_cpu.md`` next to the JSON: the measured rows against the model (the
    model columns recomputed from the current ``dft_kernels.memory``)."""
    data = json.loads(path.read_text())
    shape, chunk_elems = data["shape"], data.get("chunk_elems")
    N, D, V, K = shape["N"], shape["D"], shape["V"], shape["K"]
    naive = cpu_model("naive", N, D, V, K)
    env = data.get("env", {})
    lines = ["# Extra memory of one forward + backward on the chunked PyTorch path (CPU, fp32)", "",
             f"N {N} tokens, D {D}, V {V}, K {K} teacher slots + the label, trained lm_head, "
             "`fused_linear_dft_loss(..., impl=\"torch\", strategy=...)`"
             + (f", chunk_elems {chunk_elems}" if chunk_elems else "") + ". **Extra** = the peak of the "
             "bytes created during the call (`LivePeak`, op by op: autograd's saved tensors and the "
             "backward's buffers included) beyond the inputs and the returned gradients; split into the "
             "targets' preparation (before the first chunk's logits) and the chunk loop (forward and "
             "backward). **Model** = `memory.loss_extra_bytes(strategy, ..., kernels=\"torch\")` over all N "
             "rows, as the loss asks it (fast: less the fp32 dW and dH it holds from the forward, which "
             "are the returned gradients, but not below `memory.target_merge_bytes`: the merge runs "
             "before they exist). **RSS** = the process's peak RSS during the call minus its RSS "
             "before (returned gradients, bookkeeping and the ops' internal buffers included): a "
             "cross-check of LivePeak's peak with the gradients. **Naive** (the reference: [N, V] "
             f"logits materialised) is the model's figure, not measured: {naive / MiB:.0f} MiB.", "",
             f"torch {env.get('torch')}, {env.get('threads')} threads, {env.get('cpu')}, commit "
             f"{env.get('commit')}. Wall time: the measured call, LivePeak's bookkeeping included, on a "
             "shared machine." + (f" {data['note']}" if data.get("note") else ""), "",
             "| strategy | counted rows | measured extra MiB | targets' prep / chunk loop MiB | model MiB "
             "| measured / model | naive (model) MiB | LivePeak with grads MiB | RSS peak delta MiB | wall s "
             "| command |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s, r in data["rows"].items():
        model = cpu_model(s, N, D, V, K, chunk_elems)
        rss = "" if r.get("rss_extra") is None else f"{r['rss_extra'] / MiB:.1f}"
        ph = r.get("phases") or {}
        split = f"{ph['before_chunks'] / MiB:.1f} / {ph['chunk_loop'] / MiB:.1f}" if ph else ""
        lines.append(f"| {s} | {r['counted_rows']} | {r['extra'] / MiB:.1f} | {split} | {model / MiB:.1f} | "
                     f"{r['extra'] / model:.3f} | {naive / MiB:.0f} | {r['live_peak'] / MiB:.1f} | {rss} | "
                     f"{r['wall_s']} | `{r['command']}` |")
    for s, r in data["rows"].items():
        for title, key in (("peak", "at_peak"), ("chunk loop's peak", "at_chunk_loop_peak")):
            if r.get(key):
                lines += ["", f"Live at {s}'s {title}, biggest first (MiB, the op that made it, shape; "
                          "returned gradients listed where live): "
                          + "; ".join(f"{mib} {op} {shape} {dt}" for mib, op, shape, dt in r[key]) + "."]
    md = path.with_name(CPU_MD)
    md.write_text("\n".join(lines) + "\n")
    return md


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=None, help="D (default 4096; --cpu-torch: 512)")
    p.add_argument("--vocab", type=int, default=None, help="V (default 128256; --cpu-torch: 32000)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--cpu-torch", action="store_true",
                   help="measure the chunked PyTorch path on the CPU (fp32) instead: long_context_cpu.{json,md}")
    p.add_argument("--tokens", type=int, default=CPU_SHAPE["N"], help="--cpu-torch: N")
    p.add_argument("--strategies", default=",".join(CPU_STRATEGIES), help="--cpu-torch: comma-separated")
    p.add_argument("--chunk-elems", type=int, default=None, help="--cpu-torch: chunk_elems of the loss")
    p.add_argument("--render", action="store_true", help="--cpu-torch: rewrite the .md from the JSON only")
    p.add_argument("--cpu-child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.cpu_child:
        from .harness import malloc_release_to_os
        malloc_release_to_os()
        print(json.dumps(measure_cpu_torch(*json.loads(a.cpu_child))))
        return 0
    if a.cpu_torch:
        if a.render:
            print(write_cpu(a.out / CPU_JSON))
            return 0
        shape = {"N": a.tokens, "D": a.hidden or CPU_SHAPE["D"], "V": a.vocab or CPU_SHAPE["V"], "K": a.k}
        print(run_cpu(shape, [s for s in a.strategies.split(",") if s], a.out, a.chunk_elems))
        return 0
    for path in write(run(a.hidden or 4096, a.vocab or 128256, a.k), a.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
