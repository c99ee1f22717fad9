"""Vocab-parallel fused DFT loss across 2 and 4 processes (gloo on CPU).

Every check compares the loss and every gradient (hidden, weight shard, bias shard)
with the single-process ``fused_linear_dft_loss`` on the full weight and with
``dft_kernels.reference``, in float64. Spawning processes is slow, so each world size
is one spawned job (a module-scoped fixture) running all its checks; every check is
reported as its own test.
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import os
import socket
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dft_kernels as dk
from dft_kernels.distributed import VocabParallel

CHECKS: dict[int, dict] = {2: {}, 4: {}}


class _Skip(Exception):
    pass


def check(*worlds):
    def deco(fn):
        for w in worlds:
            CHECKS[w][fn.__name__.removeprefix("check_")] = fn
        return fn
    return deco


# --------------------------------------------------------------------------- problem data

V, D, N, K = 11, 8, 7, 4
#: rows each rank owns in rows="sharded" (uneven)
ROW_SPLITS = {2: [(0, 4), (4, 7)], 4: [(0, 3), (3, 4), (4, 5), (5, 7)]}
#: hand-made vocab shards (uneven; an empty shard in world 4), built without vocab_size
CUSTOM_SHARDS = {2: [(0, 2), (2, 11)], 4: [(0, 5), (5, 5), (5, 9), (9, 11)]}

CASES = {
    "forward_kl": dict(divergence="forward_kl", lam=0.3, temperature=2.0),
    "reverse_kl": dict(divergence="reverse_kl", lam=0.2, temperature=0.7),
    "jsd": dict(divergence="jsd", beta=0.3, lam=0.5, temperature=1.5, softcap=4.0),
    "dft_renorm_sum": dict(divergence="forward_kl", tail="renorm", accuracy="dft", lam=1.0, reduction="sum"),
    "no_labels": dict(divergence="forward_kl", temperature=1.3, labels=False),
    "ce_only": dict(lam=1.0, targets=False),
    "reduction_none": dict(divergence="jsd", beta=0.6, lam=0.4, reduction="none", temperature=0.8),
    "low_ids": dict(divergence="reverse_kl", lam=0.3, temperature=1.7, low_ids=True),
    "all_slots": dict(divergence="jsd", beta=0.5, lam=0.1, temperature=1.2, k=V),   # K = V: empty tail
}


def _problem(seed: int, *, low_ids=False, k=K):
    """float64 hidden, weight, bias; teacher top-K with empty slots; labels with ignores.
    ``low_ids``: every teacher id and label < 2, so most shards own none of them."""
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64)
    h = torch.randn(N, D, generator=g, **f64)
    w = torch.randn(V, D, generator=g, **f64) * 0.6
    b = torch.randn(V, generator=g, **f64) * 0.3
    hi = 2 if low_ids else V
    idx = torch.rand(N, hi, generator=g).argsort(-1)[:, :min(k, hi)]
    lp = torch.log_softmax(torch.randn(N, V + (3 if k < V else 0), generator=g, **f64) * 1.5, -1)[:, :idx.shape[1]]
    idx[1, 0] = -1
    idx[3] = -1                       # a row without any valid slot
    labels = torch.randint(0, hi, (N,), generator=g)
    labels[2] = labels[5] = -100
    upstream = torch.rand(N, generator=g, **f64) + 0.5
    return h, w, b, idx, lp, labels, upstream


def _loss(h, w, b, idx, lp, labels, upstream, opts, **kw):
    o = dict(opts)
    use_labels, use_targets = o.pop("labels", True), o.pop("targets", True)
    o.pop("low_ids", None), o.pop("k", None)
    loss = dk.fused_linear_dft_loss(h, w, idx if use_targets else None, lp if use_targets else None,
                                    labels if use_labels else None, bias=b, **o, **kw)
    return loss, ((loss * upstream).sum() if o.get("reduction") == "none" else loss)


def _close(actual, expected, what, rtol, atol):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _vp(split: str, rank: int, world: int, rows: str) -> VocabParallel:
    if split == "even":
        return VocabParallel.even(None, V, rows=rows)
    s, e = CUSTOM_SHARDS[world][rank]
    return VocabParallel(None, s, e, rows=rows)   # vocab_size found by all_gather


def _compare_case(rank, world, rows, split, case, *, frozen_head=False):
    opts = CASES[case]
    h, w, b, idx, lp, labels, up = _problem(list(CASES).index(case), low_ids=opts.get("low_ids", False),
                                                k=opts.get("k", K))
    vp = _vp(split, rank, world, rows)
    assert vp.vocab_size == V
    s, e = vp.start, vp.stop
    rs, re_ = ROW_SPLITS[world][rank] if rows == "sharded" else (0, N)
    mine = slice(rs, re_)

    hd = h[mine].clone().requires_grad_()
    wd = w[s:e].clone().requires_grad_(not frozen_head)
    bd = b[s:e].clone().requires_grad_(not frozen_head)
    out, scalar = _loss(hd, wd, bd, idx[mine], lp[mine], labels[mine], up[mine], opts,
                        impl="torch", vocab_parallel=vp, chunk_elems=3 * V)
    scalar.backward()

    for impl, rtol, atol in (("torch", 1e-10, 1e-12), ("reference", 1e-9, 1e-11)):
        H, Wf, B = (t.clone().requires_grad_() for t in (h, w, b))
        if rows == "replicated":
            ref_out, ref_scalar = _loss(H, Wf, B, idx, lp, labels, up, opts, impl=impl)
            ref_scalar.backward()
            h_scale = 1.0
        else:   # each rank's loss on its rows; the data-parallel objective is their mean
            outs = [_loss(H[a:c], Wf, B, idx[a:c], lp[a:c], labels[a:c], up[a:c], opts, impl=impl)
                    for a, c in ROW_SPLITS[world]]
            (sum(sc for _, sc in outs) / world).backward()
            ref_out = outs[rank][0]
            h_scale = float(world)   # this rank's hidden gets the gradient of its own loss
        tag = f"{rows}/{split}/{case} vs {impl}"
        _close(out.detach(), ref_out.detach(), f"{tag}: loss", rtol, atol)
        _close(hd.grad, H.grad[mine] * h_scale, f"{tag}: d hidden", rtol, atol)
        if frozen_head:
            assert wd.grad is None and bd.grad is None
        else:
            _close(wd.grad, Wf.grad[s:e], f"{tag}: d weight shard [{s}, {e})", rtol, atol)
            _close(bd.grad, B.grad[s:e], f"{tag}: d bias shard [{s}, {e})", rtol, atol)


def _make_case_check(rows, split, case):
    def fn(rank, world):
        _compare_case(rank, world, rows, split, case)
    fn.__name__ = f"check_{rows}-{split}-{case}"
    return fn


for _rows in ("replicated", "sharded"):
    for _split in ("even", "custom"):
        for _case in CASES:
            check(2, 4)(_make_case_check(_rows, _split, _case))


@check(2, 4)
def check_primitive_sharded_rows_with_an_empty_rank(rank, world):
    """vocab_parallel_lse_gather itself against the single-process op: rows="sharded" where
    one rank has no rows at all, the custom split (an empty vocab shard in world 4), the
    log-sum-exp outside the slots (tail_slots), upstream gradients on every output."""
    from dft_kernels import ops
    from dft_kernels.distributed import vocab_parallel_lse_gather
    h, w, b, idx, *_ = _problem(9)
    splits = [(0, 4), (4, 4), (4, 7), (7, 7)][:world] if world == 4 else [(0, 0), (0, 7)]
    a, c = splits[rank]
    scales, tail_slots = (1.0, 0.5), 3
    g = torch.Generator().manual_seed(10)
    g_lse, g_gat = torch.randn(N, 3, generator=g, dtype=torch.float64), torch.randn(N, K, generator=g,
                                                                                    dtype=torch.float64)
    vp = _vp("custom", rank, world, "sharded")
    hd = h[a:c].clone().requires_grad_()
    wd, bd = w[vp.start:vp.stop].clone().requires_grad_(), b[vp.start:vp.stop].clone().requires_grad_()
    lse, gat = vocab_parallel_lse_gather(hd, wd, bd, idx[a:c], scales, 3.0, "torch", vp, tail_slots=tail_slots)
    ((lse * g_lse[a:c]).sum() + (gat * g_gat[a:c]).sum()).backward()
    H, Wf, B = (t.clone().requires_grad_() for t in (h, w, b))
    ref_lse, ref_gat = ops.linear_lse_gather_apply(H, Wf, B, idx, scales, 3.0, "torch", tail_slots=tail_slots)
    ((ref_lse * g_lse).sum() + (ref_gat * g_gat).sum()).backward()
    assert lse.shape == (c - a, 3) and gat.shape == (c - a, K)
    _close(lse.detach(), ref_lse.detach()[a:c], "lse", 1e-12, 1e-12)
    _close(gat.detach(), ref_gat.detach()[a:c], "gathered", 1e-12, 1e-12)
    _close(hd.grad, H.grad[a:c], "d hidden", 1e-10, 1e-12)
    # the shard's gradient is the mean over ranks of their losses' gradients
    _close(wd.grad * world, Wf.grad[vp.start:vp.stop], "d weight shard", 1e-10, 1e-12)
    _close(bd.grad * world, B.grad[vp.start:vp.stop], "d bias shard", 1e-10, 1e-12)


@check(2)
def check_frozen_head(rank, world):
    _compare_case(rank, world, "replicated", "even", "forward_kl", frozen_head=True)
    _compare_case(rank, world, "sharded", "custom", "jsd", frozen_head=True)


@check(2)
def check_int32_index(rank, world):
    h, w, b, idx, lp, labels, up = _problem(5)
    vp = VocabParallel.even(None, V)
    hd = h.clone().requires_grad_()
    got = dk.fused_linear_dft_loss(hd, w[vp.start:vp.stop], idx.int(), lp, labels.int(), impl="torch",
                                   vocab_parallel=vp)
    ref = dk.fused_linear_dft_loss(h, w, idx, lp, labels, impl="torch")
    _close(got.detach(), ref, "int32 ids", 1e-10, 1e-12)


# --------------------------------------------------------------------------- DTensor weights


_MESH = {}


def _mesh(world):
    from torch.distributed.device_mesh import init_device_mesh
    if world not in _MESH:
        _MESH[world] = init_device_mesh("cpu", (world,))
    return _MESH[world]


@check(2, 4)
def check_dtensor_tensor_parallel(rank, world):
    """A Shard(0) DTensor lm_head (tensor parallel, ColwiseParallel's layout) with the
    same hidden rows on every rank; V = 9 over 4 ranks leaves the last shard empty."""
    from torch.distributed.tensor import Shard, distribute_tensor
    for v in (V, 9):
        h, w, b, idx, lp, labels, _ = _problem(11)
        w, b = w[:v], b[:v]
        idx = torch.where(idx < v, idx, torch.full_like(idx, -1))
        labels = torch.where(labels < v, labels, torch.full_like(labels, -100))
        mesh = _mesh(world)
        wd = torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)]))
        bd = torch.nn.Parameter(distribute_tensor(b.clone(), mesh, [Shard(0)]))
        vp = VocabParallel.from_dtensor(wd, rows="replicated")
        assert vp.vocab_size == v and vp.stop - vp.start == wd.to_local().shape[0]
        hd = h.clone().requires_grad_()
        loss = dk.fused_linear_dft_loss(hd, wd, idx, lp, labels, bias=bd, temperature=1.4, impl="torch",
                                        vocab_parallel=vp)
        loss.backward()
        H, Wf, B = (t.clone().requires_grad_() for t in (h, w, b))
        ref = dk.fused_linear_dft_loss(H, Wf, idx, lp, labels, bias=B, temperature=1.4, impl="reference")
        ref.backward()
        _close(loss.detach(), ref.detach(), f"V={v}: loss", 1e-9, 1e-11)
        _close(hd.grad, H.grad, f"V={v}: d hidden", 1e-9, 1e-11)
        _close(wd.grad.full_tensor(), Wf.grad, f"V={v}: d weight", 1e-9, 1e-11)
        _close(bd.grad.full_tensor(), B.grad, f"V={v}: d bias", 1e-9, 1e-11)


# --------------------------------------------------------------------------- errors


@check(2)
def check_errors(rank, world):
    vp = VocabParallel.even(None, V)
    _, w, _, idx, lp, labels, _ = _problem(1)
    h = torch.randn(N, D, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"weight has 11 rows .*full_weight\["):
        dk.fused_linear_dft_loss(h, w, idx, lp, labels, vocab_parallel=vp, impl="torch")
    with pytest.raises(ValueError, match="bias"):
        dk.fused_linear_dft_loss(h, w[vp.start:vp.stop], idx, lp, labels, bias=torch.zeros(V, dtype=h.dtype),
                                 vocab_parallel=vp, impl="torch")
    with pytest.raises(ValueError, match="reference"):
        dk.fused_linear_dft_loss(h, w[vp.start:vp.stop], idx, lp, vocab_parallel=vp, impl="reference")
    with pytest.raises(ValueError, match="rows="):
        VocabParallel(None, 0, 3, vocab_size=V, rows="data")
    with pytest.raises(ValueError, match="start <= stop"):
        VocabParallel(None, 4, 3, vocab_size=V)
    with pytest.raises(ValueError, match="vocab_size"):
        VocabParallel(None, 0, 12, vocab_size=V)
    with pytest.raises(TypeError, match="start"):
        VocabParallel(None, 0.0, 3, vocab_size=V)
    # the constructor without vocab_size is a collective: a bad shard on one rank raises on every rank
    with pytest.raises(ValueError, match="start <= stop"):
        VocabParallel(None, 0 if rank == 0 else 9, 6 if rank == 0 else 4)
    with pytest.raises(ValueError, match="rows differs"):
        VocabParallel(None, 0 if rank == 0 else 6, 6 if rank == 0 else 11, rows=("replicated", "sharded")[rank % 2])
    with pytest.raises(ValueError, match="overlap"):
        VocabParallel(None, 0, 6 + rank)
    with pytest.raises(ValueError, match="gap"):
        VocabParallel(None, 0 if rank == 0 else 7, 6 if rank == 0 else 11)
    with pytest.raises(TypeError, match="DTensor"):
        VocabParallel.from_dtensor(w, rows="sharded")
    from torch.distributed.tensor import Replicate, distribute_tensor
    with pytest.raises(ValueError, match="Shard"):
        VocabParallel.from_dtensor(distribute_tensor(w.clone(), _mesh(world), [Replicate()]), rows="sharded")
    # rows="sharded" with a different K per rank: every rank raises, nothing hangs
    vps = VocabParallel.even(None, V, rows="sharded")
    k = 3 if rank == 0 else 4
    with pytest.raises(ValueError, match="pad target_index"):
        dk.fused_linear_dft_loss(h, w[vps.start:vps.stop], idx[:, :k], lp[:, :k], vocab_parallel=vps,
                                 impl="torch")


# --------------------------------------------------------------------------- training steps


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=37, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).double()


def _lm_batch(B=4, T=6, Kt=3, Vt=37, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, Vt, (B, T), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((B, 1), -100)], dim=1)
    labels[0, :2] = -100
    t_idx = torch.rand(B, T, Vt, generator=g).argsort(-1)[..., :Kt]
    t_lp = torch.log_softmax(torch.randn(B, T, Vt + 5, generator=g, dtype=torch.float64) * 2, -1)[..., :Kt]
    return ids, t_idx, t_lp, labels


class _DFTModel(torch.nn.Module):
    """Decoder + the fused DFT loss on its last hidden state and the lm_head weight.
    A DTensor lm_head (its own FSDP2 unit, never gathered) goes the vocab-parallel way."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids, t_idx, t_lp, labels, n_items, scale):
        hidden = self.lm.model(input_ids=ids).last_hidden_state
        w = self.lm.lm_head.weight
        from torch.distributed.tensor import DTensor
        vp = VocabParallel.from_dtensor(w, rows="sharded") if isinstance(w, DTensor) else None
        self.used_vocab_parallel = vp is not None
        loss = dk.fused_linear_dft_loss(hidden, w, t_idx, t_lp, labels, lam=0.3, temperature=1.5,
                                        num_items_in_batch=n_items, impl="torch", vocab_parallel=vp)
        return loss * scale


def _single_step(lr):
    model = _DFTModel(_tiny_llama())
    ids, t_idx, t_lp, labels = _lm_batch()
    n_items = int((labels != -100).sum())
    loss = model(ids, t_idx, t_lp, labels, n_items, 1.0)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=lr).step()
    return loss.detach(), dict(model.named_parameters())


def _data_parallel_step(model, rank, world, lr):
    """Rank r trains on its rows of the batch; the loss is scaled like Hugging Face does with
    num_items_in_batch (global token count) so that averaged gradients equal the full batch's."""
    ids, t_idx, t_lp, labels = _lm_batch()
    n_items = int((labels != -100).sum())
    rows = slice(rank * ids.shape[0] // world, (rank + 1) * ids.shape[0] // world)
    loss = model(ids[rows], t_idx[rows], t_lp[rows], labels[rows], n_items, float(world))
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=lr).step()
    total = loss.detach() / world
    dist.all_reduce(total)
    return total


def _full(p):
    return p.full_tensor() if hasattr(p, "full_tensor") else p


@check(2)
def check_hf_ddp_step(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP
    ref_loss, ref_params = _single_step(lr=0.5)
    model = DDP(_DFTModel(_tiny_llama()))
    loss = _data_parallel_step(model, rank, world, lr=0.5)
    _close(loss, ref_loss, "DDP loss", 1e-9, 1e-12)
    for name, p in model.module.named_parameters():
        _close(p.detach(), ref_params[name].detach(), f"DDP {name} after one SGD step", 1e-9, 1e-11)


def _fsdp2_check(rank, world, shard_lm_head):
    from torch.distributed.fsdp import fully_shard
    ref_loss, ref_params = _single_step(lr=0.5)
    model = _DFTModel(_tiny_llama())
    mesh = _mesh(world)
    for layer in model.lm.model.layers:
        fully_shard(layer, mesh=mesh)
    if shard_lm_head:   # its own unit whose forward never runs: the weight stays a Shard(0) DTensor
        fully_shard(model.lm.lm_head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    loss = _data_parallel_step(model, rank, world, lr=0.5)
    assert model.used_vocab_parallel == shard_lm_head
    _close(loss, ref_loss, "FSDP2 loss", 1e-9, 1e-12)
    for name, p in model.named_parameters():
        _close(_full(p.detach()), ref_params[name].detach(), f"FSDP2 {name} after one SGD step", 1e-9, 1e-11)


@check(2)
def check_hf_fsdp2_vocab_parallel_lm_head(rank, world):
    _fsdp2_check(rank, world, shard_lm_head=True)


@check(2)
def check_hf_fsdp2_gathered_lm_head(rank, world):
    _fsdp2_check(rank, world, shard_lm_head=False)


@check(4)
def check_ddp_data_x_vocab_parallel(rank, world):
    """2 data-parallel x 2 vocab-parallel ranks (Megatron's layout): DDP over the data-parallel
    group, the lm_head split over the vocab-parallel group; one SGD step equals the
    single-process step on both batches."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    vp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    dp_rank, vp_rank = divmod(rank, 2)
    h0, w0, b0, idx, lp, labels, _ = _problem(21)
    torch.manual_seed(0)
    trunk0 = torch.nn.Linear(D, D, dtype=torch.float64)
    x = torch.randn(2, N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    opts = dict(divergence="jsd", lam=0.4, temperature=1.3, impl="torch")
    batches = [(idx, lp, labels), (idx.flip(0), lp.flip(0), labels.flip(0))]

    class Head(torch.nn.Module):
        def __init__(self, w, b, vp):
            super().__init__()
            self.trunk = torch.nn.Linear(D, D, dtype=torch.float64)
            self.trunk.load_state_dict(trunk0.state_dict())
            self.w, self.b, self.vp = torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone()), vp

        def forward(self, x, d):
            return dk.fused_linear_dft_loss(torch.tanh(self.trunk(x)), self.w, *batches[d], bias=self.b,
                                            vocab_parallel=self.vp, **opts)

    # single process: the mean of both batches' losses, one SGD step
    ref = Head(w0, b0, None)
    ref_loss = sum(ref(x[d], d) for d in range(2)) / 2
    ref_loss.backward()
    torch.optim.SGD(ref.parameters(), lr=0.5).step()

    vp = VocabParallel.even(vp_groups[dp_rank], V)
    model = DDP(Head(w0[vp.start:vp.stop], b0[vp.start:vp.stop], vp), process_group=dp_groups[vp_rank])
    loss = model(x[dp_rank], dp_rank)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    mean = loss.detach() / 4
    dist.all_reduce(mean)     # each batch's loss is on 2 ranks
    _close(mean, ref_loss.detach(), "loss", 1e-9, 1e-11)
    m = model.module
    _close(m.trunk.weight.detach(), ref.trunk.weight.detach(), "trunk weight after one step", 1e-9, 1e-11)
    _close(m.w.detach(), ref.w.detach()[vp.start:vp.stop], "lm_head shard after one step", 1e-9, 1e-11)
    _close(m.b.detach(), ref.b.detach()[vp.start:vp.stop], "bias shard after one step", 1e-9, 1e-11)


@check(2)
def check_triton_interpreter(rank, world):
    """The Triton kernels under the interpreter (only when they are installed)."""
    if importlib.util.find_spec("triton") is None or \
            importlib.util.find_spec("dft_kernels.ops.linear.triton") is None:
        raise _Skip("the fused Triton kernel (dft_kernels.ops.linear.triton) or triton is not available")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise _Skip("TRITON_INTERPRET=1 is not set")
    h, w, b, idx, lp, labels, _ = _problem(7)
    h, w, b, lp = h[:4].float(), w.float(), b.float(), lp[:4].float()
    idx, labels = idx[:4], labels[:4]
    vp = VocabParallel.even(None, V)
    hd = h.clone().requires_grad_()
    wd = w[vp.start:vp.stop].clone().requires_grad_()
    loss = dk.fused_linear_dft_loss(hd, wd, idx, lp, labels, bias=b[vp.start:vp.stop], impl="triton",
                                    vocab_parallel=vp)
    loss.backward()
    H, W_ = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = dk.fused_linear_dft_loss(H, W_, idx, lp, labels, bias=b, impl="torch")
    ref.backward()
    _close(loss.detach(), ref.detach(), "triton loss", 1e-4, 1e-5)
    _close(hd.grad, H.grad, "triton d hidden", 1e-4, 1e-5)
    _close(wd.grad, W_.grad[vp.start:vp.stop], "triton d weight", 1e-4, 1e-5)


# --------------------------------------------------------------------------- the spawned job


def _worker(rank, world, init_method, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for name, fn in CHECKS[world].items():
            try:
                fn(rank, world)
                results[name] = "ok"
            except _Skip as e:
                results[name] = f"skip: {e}"
            except Exception:  # noqa: BLE001 -- reported by the parent test
                results[name] = f"rank {rank}: {traceback.format_exc()}"
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int) -> dict:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world, f"tcp://127.0.0.1:{_free_port()}", out_dir), nprocs=world, join=True)
        per_rank = []
        for r in range(world):
            with open(os.path.join(out_dir, f"rank{r}.json")) as f:
                per_rank.append(json.load(f))
    return {name: [res.get(name, "not run") for res in per_rank] for name in CHECKS[world]}


@pytest.fixture(scope="module")
def world2():
    return _spawn(2)


@pytest.fixture(scope="module")
def world4():
    return _spawn(4)


def _report(results, name):
    status = results[name]
    if all(s == "ok" for s in status):
        return
    if all(s.startswith("skip: ") for s in status):
        pytest.skip(status[0][6:])
    pytest.fail("\n".join(s for s in status if s != "ok"), pytrace=False)


@pytest.mark.parametrize("name", list(CHECKS[2]))
def test_two_ranks(world2, name):
    _report(world2, name)


@pytest.mark.parametrize("name", list(CHECKS[4]))
def test_four_ranks(world4, name):
    _report(world4, name)
