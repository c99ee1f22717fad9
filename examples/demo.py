"""dft_kernels demo: the DFT loss and its gradients, naive reference vs dft_kernels.

A random problem of realistic shape for the device (the Llama-3-8B head on a GPU,
a smaller head on a CPU) is run through
  * the naive PyTorch reference (materialises the [N, V] logits and log-softmax),
  * dft_kernels' fused path (hidden @ lm_head, logits never materialised),
  * dft_kernels' logits path (on logits computed beforehand),
and for each the loss, its agreement with the reference, the time of forward +
backward and the peak memory beyond the inputs are printed.

    python examples/demo.py [--n 1024] [--k 32] [--device cpu|cuda]

Peak memory: CUDA's allocator statistics on a GPU; on a CPU each method runs in a
fresh process and the growth of its peak resident set size is reported.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import time

import torch

import dft_kernels as dk


def make_inputs(n, d, v, k, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = (torch.randn(n, d, generator=g) * 0.5).to(dtype).to(device)
    weight = (torch.randn(v, d, generator=g) / d ** 0.5).to(dtype).to(device)
    teacher = torch.randn(n, v, generator=g) * 2.0 if n * v <= 2**27 else None
    if teacher is not None:
        lp, idx = torch.log_softmax(teacher, -1).topk(k, dim=-1)
    else:  # very large heads: random ids with a plausible mass profile
        idx = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
        lp = torch.log_softmax(torch.randn(n, k, generator=g) * 2, -1) + torch.log(torch.tensor(0.9))
    labels = torch.where(torch.rand(n, generator=g) < 0.5, idx[:, 0], torch.randint(0, v, (n,), generator=g))
    labels[: n // 16] = -100  # a prompt that is not trained on
    return hidden, weight, idx.to(device), lp.to(device), labels.to(device)


def run_method(method, n, d, v, k, dtype, device, repeats):
    hidden, weight, idx, lp, labels = make_inputs(n, d, v, k, dtype, device)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    kw = dict(lam=0.2, divergence="forward_kl")

    def step():
        h.grad = w.grad = None
        if method == "reference":
            loss = dk.reference.fused_linear_dft_loss(h, w, idx, lp, labels, **kw)
        elif method == "fused":
            loss = dk.fused_linear_dft_loss(h, w, idx, lp, labels, **kw)
        else:  # logits path: logits are an input here, like in an ordinary training loop
            logits = h @ w.t()
            loss = dk.dft_loss(logits, idx, lp, labels, **kw)
        loss.backward()
        return loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    step()  # warm-up (compiles the kernels on a GPU)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_now()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return loss.item(), sorted(times)[len(times) // 2], max(peak, 0)


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(q, *args):
    q.put(run_method(*args))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=None, help="positions (batch * sequence)")
    ap.add_argument("--k", type=int, default=32, help="teacher slots per position")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.device == "cuda":
        n, d, v, dtype = args.n or 8192, 4096, 128256, torch.bfloat16
    else:
        n, d, v, dtype = args.n or 1024, 512, 32000, torch.float32
    print(f"device={args.device}  N={n}  D={d}  V={v}  K={args.k}  dtype={str(dtype).split('.')[-1]}  "
          f"torch={torch.__version__}")
    print(f"{'method':<11}{'loss':>12}{'|diff| vs ref':>15}{'fwd+bwd ms':>12}{'peak extra MB':>15}")
    results = {}
    for method in ["reference", "fused", "logits"]:
        a = (method, n, d, v, args.k, dtype, args.device, args.repeats)
        if args.device == "cpu":  # a fresh process per method: its peak RSS is its own
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            p = ctx.Process(target=_child, args=(q, *a))
            p.start()
            res = q.get()
            p.join()
        else:
            res = run_method(*a)
            torch.cuda.empty_cache()
        results[method] = res
        loss, t, peak = res
        diff = abs(loss - results["reference"][0])
        print(f"{method:<11}{loss:>12.6f}{diff:>15.2e}{t * 1e3:>12.1f}{peak / 2**20:>15.1f}")
    ref_peak = results["reference"][2]
    for m in ["fused", "logits"]:
        print(f"{m}: {results['reference'][1] / results[m][1]:.2f}x the reference's speed, "
              f"{results[m][2] / max(ref_peak, 1):.3f}x its peak extra memory")


if __name__ == "__main__":
    main()
