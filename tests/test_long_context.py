"""Long context (docs/design.md sec. 10): the Triton path's buffers on ``meta`` tensors (GPU
configs, launches recorded, nothing computed) at N 262144 and 1,048,576 tokens -- nothing
grows with N * V, and the peak matches ``memory.triton_lean_bytes`` -- and the forward's
row blocks under the interpreter."""
from __future__ import annotations

import pytest
import torch

from dft_kernels import memory
from dft_kernels.ops import PrimitiveArgs, TwoHeadArgs
from dft_kernels.ops.linear import triton as fused
from dft_kernels.ops.two_head.triton import TwoHeadDivergenceTriton

from benchmarks.long_context import measured_lean

from .test_gpu_faithful import _ignored_problem, recorded_grids


@pytest.mark.parametrize("n_rows", [262144, 1 << 20])
def test_forward_partials_do_not_grow_with_tokens(n_rows, monkeypatch):
    """The launchers on ``meta`` tensors (GPU config, no compute) at N 262k / 1M, V 128256,
    D 4096, bf16: every buffer the fused path (forward + backward) and the two-head loss
    allocate is at most a fixed budget, per-row data of the M = K + 1 ids (<= 64 * M bytes
    a row: ids, lse, gathered, the merged sparse gradient), or one of the [N, D] / [V, D] /
    [V] shapes of the inputs and gradients: none scales with N * V."""
    from dft_kernels.ops import _common
    from dft_kernels.ops.linear import backward as products
    from dft_kernels.ops.two_head import triton as two_head_triton
    from dft_kernels.ops._triton_common import compile_target

    N, D, V, M = n_rows, 4096, 128256, 33
    allowed_shapes = {(N, D), (V, D), (V,)}
    budget = max(_common.PARTIAL_BYTES, 2 * products.SLAB_BYTES, products.ACC_BYTES)
    seen = []
    real = {name: getattr(torch, name) for name in ("empty", "empty_like", "zeros", "zeros_like", "full")}

    def recording(name):
        def alloc(*a, **k):
            t = real[name](*a, **k)
            seen.append((name, tuple(t.shape), t.numel() * t.element_size()))
            return t
        return alloc

    for name in real:
        monkeypatch.setattr(torch, name, recording(name))
    meta = dict(device="meta", dtype=torch.bfloat16)
    h, w, b = real["empty"](N, D, **meta), real["empty"](V, D, **meta), real["empty"](V, **meta)
    index = real["empty"](N, M, device="meta", dtype=torch.int64)
    with compile_target((9, 0)), recorded_grids():
        lse, gathered = fused.linear_lse_gather_forward(h, w, b, index, (1.0, 0.5), 30.0, 32)
        fused.linear_lse_gather_backward(h, w, b, index, (1.0, 0.5), 30.0, lse, gathered, lse, gathered,
                                         True, True, True, True, 32)
        div, aux, lse2 = two_head_triton.two_head_forward(h, w, b, h, w, b, None, None, 1.0, "jsd", 0.3)
        two_head_triton.two_head_backward(h, w, b, h, w, b, None, None, 1.0, "jsd", 0.3, lse2, aux, div,
                                          True, True, True)
    bad = [(name, shape, size) for name, shape, size in seen
           if size > budget and shape not in allowed_shapes and size > 64 * M * N]
    assert not bad, f"buffers that grow with N * V: {bad}"
    assert len(seen) > 10


@pytest.mark.parametrize("impl_rows", [7, 16])
def test_forward_in_row_blocks_equals_one_block(impl_rows, monkeypatch):
    """The forward's partials budget forced down to a few rows per launch: the fused path and
    the two-head loss give the same results as in one launch (every row block's offsets)."""
    from dft_kernels.ops import _common
    N, V, D, M = 45, 70, 16, 3
    h64, w64, b64, index, g = _ignored_problem(N, V, D, M, big=3.0)
    index[-3:, 0] = 5                        # every row counts
    args = [t.float() for t in (h64, w64, b64)]
    one = fused.LinearLSEGatherTriton.apply(*args, index, PrimitiveArgs((1.0, 0.5), None, 2))
    th = [t.float() for t in (torch.randn(N, 12, generator=g), torch.randn(V, 12, generator=g))]
    div_one = TwoHeadDivergenceTriton.apply(args[0], args[1], None, *th, None, TwoHeadArgs(None, None, 1.0, "jsd", 0.3))
    # the interpreter's tiles: 3 (fused) / 5 (two-head) fp32 columns per vocab tile and row
    monkeypatch.setattr(_common, "PARTIAL_BYTES", impl_rows * 4 * 2 * 5)
    blocks = fused.LinearLSEGatherTriton.apply(*args, index, PrimitiveArgs((1.0, 0.5), None, 2))
    div_blocks = TwoHeadDivergenceTriton.apply(args[0], args[1], None, *th, None, TwoHeadArgs(None, None, 1.0, "jsd", 0.3))
    for a, c in zip(one, blocks):
        torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(div_one, div_blocks, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("n_rows, head_trains", [(262144, True), (262144, False), (1 << 20, True)])
def test_triton_lean_peak_matches_the_memory_model(n_rows, head_trains):
    """One forward + backward of the fused op on ``meta`` tensors (bf16, the sm_90 config,
    V 128256, D 4096, K 32 + label): the peak of the buffers it creates beyond the gradients it
    returns within 20% of ``memory.triton_lean_bytes``; printed for the note."""
    N, D, V, K = n_rows, 4096, 128256, 32
    measured = measured_lean(N, D, V, K, head_trains)
    model = memory.triton_lean_bytes(n_rows=N, hidden=D, vocab=V, k=K, dtype_bytes=2, head_trains=head_trains)
    print(f"N {N}: measured {measured / 2 ** 20:.0f} MiB, model {model / 2 ** 20:.0f} MiB")
    assert 0.8 <= measured / model <= 1.2, (measured, model)


def test_plan_takes_a_sequence_length_and_reports_the_gpu_path(capsys):
    """`plan --seq-len 262144` models one sequence of that length on the Triton path; the
    lean loss path is the memory model's and has no N * V term (4x the tokens: ~4x, whatever V)."""
    import json

    from dft_kernels.cli import main
    from dft_kernels.workflow.plan import NAMED_CONFIGS
    assert main(["plan", "--model", "llama-3-8b", "--seq-len", "262144", "--lora", "16", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    cfg = NAMED_CONFIGS["llama-3-8b"]
    assert p["tokens"] == 262144 and p["kernels"] == "triton"
    assert p["loss_path"]["lean"] == memory.loss_extra_bytes(
        "lean", n_rows=262144, hidden=cfg["hidden_size"], vocab=cfg["vocab_size"], k=32, dtype_bytes=2,
        head_trains=False, kernels="triton")
    def lean(n, vocab):
        return memory.triton_lean_bytes(n_rows=n, hidden=4096, vocab=vocab, k=32, dtype_bytes=2, head_trains=False)
    assert lean(262144, 128256) == lean(262144, 256512)        # no vocab term
    assert 3.8 < lean(1 << 20, 128256) / lean(262144, 128256) < 4.1
    assert main(["plan", "--model", "llama-3-8b", "--seq-len", "1024", "--tokens", "8"]) == 2


@pytest.mark.parametrize("n_rows", [262144, 1 << 20])
def test_one_call_over_long_sequences_torch_path(n_rows):
    """One call of each public function over 262,144 and 1,048,576 tokens on the chunked PyTorch
    path (a tiny head: the row count is what is tested), no loop by the caller: the losses equal
    the float64 reference and teacher_topk the exact top-k."""
    import dft_kernels as dk
    N, D, V, K = n_rows, 4, 19, 3
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, N, D, generator=g)
    w = torch.randn(V, D, generator=g)
    tgt = dk.teacher_topk(h, w, K, impl="torch")
    assert tgt.index.shape == (1, N, K)
    z = (h.double() @ w.double().T).log_softmax(-1)
    want = z.topk(K, dim=-1)
    assert torch.equal(tgt.index.long(), want.indices)
    torch.testing.assert_close(tgt.logprobs.double(), want.values, atol=1e-5, rtol=0)
    labels = torch.randint(0, V, (1, N), generator=g)
    labels[0, ::7] = -100
    hl = h.clone().requires_grad_(True)
    loss = dk.fused_linear_dft_loss(hl, w, tgt.index, tgt.logprobs, labels, impl="torch")
    loss.backward()
    ref = dk.reference.fused_linear_dft_loss(h.double(), w.double(), tgt.index, tgt.logprobs.double(), labels)
    assert abs(loss.item() - ref.item()) < 1e-5
    assert torch.isfinite(hl.grad).all() and hl.grad[0, 7].abs().sum() == 0
    ht = torch.randn(1, N, 3, generator=g)
    wt = torch.randn(V, 3, generator=g)
    dist = dk.fused_linear_distill_loss(h, w, ht, wt, labels, impl="torch")
    ref = dk.fused_linear_distill_loss(h.double(), w.double(), ht.double(), wt.double(), labels, impl="reference")
    assert abs(dist.item() - ref.item()) < 1e-5


@pytest.mark.parametrize("chunk_elems", [None, 1 << 18], ids=["chunks-dominate", "target-merge-dominates"])
@pytest.mark.parametrize("strategy", ["lean", "fast"])
def test_cpu_torch_peak_matches_the_memory_model(strategy, chunk_elems):
    """One fp32 forward + backward of ``fused_linear_dft_loss(impl="torch")`` on the CPU, trained
    lm_head, K 32 + label, 1/8 of the rows ignored, inside ``LivePeak`` (the measurement of
    ``python -m benchmarks.long_context --cpu-torch``, benchmarks/results/long_context_cpu.md,
    at N 4096, D 64, V 3001): the peak beyond inputs and returned gradients within 20% of
    ``memory.loss_extra_bytes(..., kernels="torch")``. With the default chunks the [C, V]
    chunks dominate; with small ones (2^18 elements) the targets' slot merge does, as at
    N 262144, K 32 with the default chunks."""
    from benchmarks.long_context import measure_cpu_torch
    r = measure_cpu_torch(strategy, 4096, 64, 3001, 32, chunk_elems=chunk_elems, warmup=False)
    assert (r["grad_fn"] == "FastLinearLossBackward") == (strategy == "fast")      # the strategy ran
    phases = r["phases"]      # the targets' merge before the first chunk's logits, then the chunk loop
    if chunk_elems:
        assert phases["before_chunks"] == r["extra"] > phases["chunk_loop"]
    else:
        assert phases["chunk_loop"] == r["extra"] > 2 * phases["before_chunks"]
    print(f"{strategy}: measured {r['extra'] / 2 ** 20:.2f} MiB, model {r['model'] / 2 ** 20:.2f} MiB")
    assert 0.8 <= r["extra"] / r["model"] <= 1.2, (r["extra"], r["model"])
