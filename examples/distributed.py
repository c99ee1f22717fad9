"""Vocab-parallel DFT loss: the lm_head split by vocab rows across processes.

    torchrun --nproc_per_node 2 examples/distributed.py

Runs on CPU (gloo), or on one GPU per process (nccl) when CUDA is available. Every
rank holds only its rows of the lm_head (V = 1001 does not divide evenly: the first
ranks get one row more) and no rank ever computes more than its share of the logits.
Two layouts are shown:

1. tensor parallel (``rows="replicated"``): every rank has the same hidden states;
2. data parallel (``rows="sharded"``, the FSDP2 layout): every rank has its own rows
   of the batch; the hidden states are all-gathered, the lm_head never is.

Rank 0 also computes the single-process loss on the full weight and prints both,
with the largest gradient differences.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

import dft_kernels as dk
from dft_kernels.distributed import VocabParallel


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` (row counts may differ), concatenated in rank order, on rank 0's CPU."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, x.detach().cpu())
    return torch.cat(parts)


def main():
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    # the same problem on every rank (same seed): hidden states, lm_head, teacher top-K, labels
    N, D, V, K = 96, 64, 1001, 8
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=g)
    weight = torch.randn(V, D, generator=g) / D ** 0.5
    teacher = torch.log_softmax(torch.randn(N, V, generator=g) * 3, dim=-1)
    target_logprobs, target_index = teacher.topk(K, dim=-1)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100
    hidden, weight, target_index, target_logprobs, labels = (
        t.to(device) for t in (hidden, weight, target_index, target_logprobs, labels))
    n_items = int((labels != -100).sum())   # tokens in the whole batch (HF's num_items_in_batch)
    kw = dict(lam=0.2, divergence="forward_kl", temperature=2.0, num_items_in_batch=n_items)

    # 1) tensor parallel: same rows everywhere, this rank's vocab shard
    vp = VocabParallel.even(None, V)
    h = hidden.clone().requires_grad_()
    w = weight[vp.start:vp.stop].clone().requires_grad_()
    loss_tp = dk.fused_linear_dft_loss(h, w, target_index, target_logprobs, labels, vocab_parallel=vp, **kw)
    loss_tp.backward()
    dw_tp = gather_rows(w.grad)

    # 2) data parallel: this rank's rows of the batch, this rank's vocab shard
    vp_dp = VocabParallel.even(None, V, rows="sharded")
    rows = slice(rank * N // world, (rank + 1) * N // world)
    h_dp = hidden[rows].clone().requires_grad_()
    w_dp = weight[vp_dp.start:vp_dp.stop].clone().requires_grad_()
    loss_dp = dk.fused_linear_dft_loss(h_dp, w_dp, target_index[rows], target_logprobs[rows], labels[rows],
                                       vocab_parallel=vp_dp, **kw)
    loss_dp.backward()   # the shard's gradient is averaged over ranks, like DDP / FSDP2
    total_dp = loss_dp.detach().clone()
    dist.all_reduce(total_dp)              # with num_items_in_batch the ranks' losses add up
    dh_dp, dw_dp = gather_rows(h_dp.grad), gather_rows(w_dp.grad)
    shards = [None] * world
    dist.all_gather_object(shards, (vp.start, vp.stop))

    if rank == 0:
        H = hidden.clone().requires_grad_()
        W = weight.clone().requires_grad_()
        loss = dk.fused_linear_dft_loss(H, W, target_index, target_logprobs, labels, **kw)
        loss.backward()
        dH, dW = H.grad.cpu(), W.grad.cpu()
        print(f"{world} ranks ({backend}), V = {V} split as {shards}")
        print(f"single-process loss (full weight)        {loss.item():.8f}")
        print(f"vocab-parallel loss, tensor parallel     {loss_tp.item():.8f}   "
              f"max |dH diff| {(h.grad.cpu() - dH).abs().max().item():.1e}   "
              f"max |dW diff| {(dw_tp - dW).abs().max().item():.1e}")
        print(f"vocab-parallel loss, data parallel (sum) {total_dp.item():.8f}   "
              f"max |dH diff| {(dh_dp - dH).abs().max().item():.1e}   "
              f"max |dW diff| {(dw_dp * world - dW).abs().max().item():.1e}")
        ok = all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in (
            (loss_tp.detach().cpu(), loss.detach().cpu()), (total_dp.cpu(), loss.detach().cpu()),
            (dw_tp, dW), (dh_dp, dH), (dw_dp * world, dW)))
        print("match" if ok else "MISMATCH")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
