"""dk.teacher_topk (docs/design.md sec. 11) against log_softmax(...).topk in float64."""
import pytest
import torch

import dft_kernels as dk
from dft_kernels.ops.teacher_topk import torch as teacher_chunked


def _reference(h, w, b, temperature, softcap, scale):
    z = torch.nn.functional.linear(h.double(), w.double(), None if b is None else b.double()) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return (z / temperature).log_softmax(-1)


CASES = [
    pytest.param(dict(N=19, D=24, V=77, k=5), id="odd-V-k5"),
    pytest.param(dict(N=7, D=40, V=131, k=1, bias=True), id="k1-bias"),
    pytest.param(dict(N=5, D=16, V=37, k=37), id="k-equals-V"),
    pytest.param(dict(N=9, D=24, V=70, k=8, temperature=0.6, softcap=3.0, scale=1.3, bias=True), id="temp-cap-scale"),
]


@pytest.mark.parametrize("impl", [pytest.param("triton", id="triton"), pytest.param("torch", id="torch")])
@pytest.mark.parametrize("case", CASES)
def test_matches_float64_topk(case, impl):
    g = torch.Generator().manual_seed(0)
    N, D, V, k = case["N"], case["D"], case["V"], case["k"]
    h = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g)
    b = torch.randn(V, generator=g) if case.get("bias") else None
    T, cap, sc = case.get("temperature", 1.0), case.get("softcap"), case.get("scale", 1.0)
    out = dk.teacher_topk(h.reshape(1, N, D), w, k, bias=b, temperature=T, softcap=cap, logit_scale=sc, impl=impl)
    assert out.index.shape == (1, N, k) and out.index.dtype == torch.int32
    assert out.metadata["kind"] == "topk" and out.metadata["k"] == k and out.metadata["vocab_size"] == V
    idx, lp = out.index[0].long(), out.logprobs[0].double()
    ref = _reference(h, w, b, T, cap, sc)
    # log-probs normalised over the full vocab, at the ids returned
    assert torch.allclose(lp, ref.gather(1, idx), atol=2e-5, rtol=0)
    # the same values as the float64 top-k, sorted descending, each id once per row
    ref_v, ref_i = ref.topk(k, dim=-1)
    assert torch.allclose(lp, ref_v, atol=2e-5, rtol=0)
    assert (lp[:, 1:] <= lp[:, :-1]).all()
    assert all(len(set(r.tolist())) == k for r in idx)
    # ids equal wherever the float64 values are separated by more than rounding
    gap = torch.ones_like(ref_v, dtype=torch.bool)
    gap[:, 1:] &= (ref_v[:, :-1] - ref_v[:, 1:]) > 1e-4
    gap[:, :-1] &= (ref_v[:, :-1] - ref_v[:, 1:]) > 1e-4
    assert (idx[gap] == ref_i[gap]).all()


@pytest.mark.parametrize("impl", [pytest.param("triton", id="triton"), pytest.param("torch", id="torch")])
def test_ties_keep_the_lower_id(impl):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(90, 16, generator=g)
    w[3] *= 4.0
    w[4] = w[70] = w[71] = w[3]        # equal logits within a tile and in later tiles
    h = w[3] + 0.1 * torch.randn(6, 16, generator=g)
    out = dk.teacher_topk(h, w, 3, impl=impl)
    assert out.index[:, :2].tolist() == [[3, 4]] * 6
    assert (out.index[:, 2] == 70).all()
    # the order of a stable descending sort (torch.topk itself does not order ties by id)
    assert torch.equal(out.index.long(), (h @ w.T).sort(dim=-1, descending=True, stable=True).indices[:, :3])


def test_bad_input_is_named():
    h, w = torch.randn(3, 8), torch.randn(11, 8)
    with pytest.raises(ValueError, match="k=12"):
        dk.teacher_topk(h, w, 12)
    with pytest.raises(ValueError, match="hidden size"):
        dk.teacher_topk(torch.randn(3, 7), w, 2)
    with pytest.raises(ValueError, match="logit_scale"):
        dk.teacher_topk(h, w, 2, logit_scale=0.0)
    with pytest.raises(ValueError, match="samples"):
        dk.teacher_topk(h, w, 2, samples=-1)


def test_larger_k_than_the_kernel_holds_runs_the_chunked_path(monkeypatch):
    monkeypatch.setattr(teacher_chunked, "MAX_TRITON_K", 2)
    h, w = torch.randn(4, 8), torch.randn(13, 8)
    out = dk.teacher_topk(h, w, 5, impl="triton")
    assert torch.allclose(out.logprobs.double(), _reference(h, w, None, 1.0, None, 1.0).topk(5).values, atol=1e-5)


def test_targets_build_matches_teacher_topk(tmp_path):
    transformers = pytest.importorskip("transformers")
    from dft_kernels.targets import build
    from dft_kernels.targets.store import read_manifest, read_shard
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 61, (1, 9))
    build(model, [ids], k=4, temperature=0.8, out_dir=tmp_path, progress=False, dtype=torch.float32)
    shard = read_manifest(tmp_path)["shards"][0]
    tensors, _ = read_shard(tmp_path / (shard["file"] if isinstance(shard, dict) else shard))
    with torch.no_grad():
        h = model.model(input_ids=ids).last_hidden_state[0]
    ref = dk.teacher_topk(h, model.lm_head.weight, 4, temperature=0.8, impl="triton")
    assert torch.equal(tensors["index"].reshape(9, 4).int(), ref.index)
    assert torch.allclose(tensors["logprobs"].reshape(9, 4).float(), ref.logprobs, atol=1e-5)


def test_teacher_topk_with_samples_is_hybrid_and_reproducible():
    """samples > 0: the exact top-k first, then sampled slots from the rest; the row is a
    distribution; the same generator seed gives the same target."""
    torch.manual_seed(0)
    h, w = torch.randn(37, 16, dtype=torch.float64), torch.randn(101, 16, dtype=torch.float64)
    run = lambda seed: dk.teacher_topk(h, w, 3, samples=9, temperature=1.5,  # noqa: E731
                                       generator=torch.Generator().manual_seed(seed))
    a, b, c = run(5), run(5), run(6)
    top = dk.teacher_topk(h, w, 3, temperature=1.5)
    assert a.index.shape == (37, 12) and a.metadata["kind"] == "hybrid" and a.metadata["samples"] == 9
    assert torch.equal(a.index[:, :3], top.index) and torch.allclose(a.logprobs[:, :3], top.logprobs)
    torch.testing.assert_close(a.mass().double(), torch.ones(37, dtype=torch.float64), atol=1e-5, rtol=0)
    assert torch.equal(a.index, b.index) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.index, c.index)
    pure = dk.teacher_topk(h, w, 0, samples=8, generator=torch.Generator().manual_seed(1))
    assert pure.metadata["kind"] == "sampled"
    with pytest.raises(ValueError, match="keeps nothing"):
        dk.teacher_topk(h, w, 0, samples=0)


def test_tiny_temperature_names_the_teacher():
    """A temperature below 0.01 is refused in the teacher's terms, not the student's."""
    with pytest.raises(ValueError, match="teacher's softmax is one-hot"):
        dk.teacher_topk(torch.randn(3, 4), torch.randn(9, 4), 2, temperature=1e-6)
