"""SparseTargets: from_logits, pad / truncate, retemper, blend, save / load, validate, vLLM import."""
import math
from types import SimpleNamespace

import pytest
import torch

import dft_kernels as dk

V = 40


def _logits(*shape, seed=0, scale=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _dense(t: dk.SparseTargets, v: int) -> torch.Tensor:
    """Slots as a dense [..., V] probability tensor (float64), zero elsewhere."""
    idx = t.index.long()
    valid = idx >= 0
    p = torch.where(valid, t.logprobs.double().exp(), torch.zeros((), dtype=torch.float64))
    out = torch.zeros(*idx.shape[:-1], v, dtype=torch.float64)
    return out.scatter_add(-1, idx.clamp(min=0), p)


# --------------------------------------------------------------------------- from_logits


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_from_logits_k_equals_v_is_the_full_distribution(temperature):
    z = _logits(3, 5, V)
    t = dk.SparseTargets.from_logits(z, V, temperature=temperature)
    assert t.index.dtype == torch.int32 and t.logprobs.dtype == torch.float64 and t.shape == (3, 5, V)
    ref = torch.log_softmax(z / temperature, dim=-1)
    torch.testing.assert_close(_dense(t, V), ref.exp(), rtol=0, atol=1e-12)
    torch.testing.assert_close(t.logprobs, ref.gather(-1, t.index.long()), rtol=0, atol=1e-12)
    assert bool((t.logprobs[..., :-1] >= t.logprobs[..., 1:]).all()), "slots sorted by mass"
    assert t.metadata == {"vocab_size": V, "temperature": temperature, "k": V}


def test_from_logits_chunks_rows_and_keeps_dtype():
    z = _logits(37, V, dtype=torch.float32)
    whole = dk.SparseTargets.from_logits(z, 5, chunk_rows=1000)
    chunked = dk.SparseTargets.from_logits(z, 5, chunk_rows=4)
    assert torch.equal(whole.index, chunked.index) and torch.equal(whole.logprobs, chunked.logprobs)
    assert whole.logprobs.dtype == torch.float32
    ref = torch.log_softmax(z.double(), -1).topk(5, dim=-1)
    assert torch.equal(whole.index.long(), ref.indices)
    torch.testing.assert_close(whole.logprobs.double(), ref.values, rtol=0, atol=1e-5)
    half = dk.SparseTargets.from_logits(z.half(), 5, dtype="fp16")
    assert half.logprobs.dtype == torch.float16
    z0 = z.clone()
    dk.SparseTargets.from_logits(z, 5, temperature=2.0)
    assert torch.equal(z, z0), "from_logits must not modify its input"


def test_from_logits_rejects_bad_arguments():
    z = _logits(2, V)
    with pytest.raises(ValueError, match="k=41"):
        dk.SparseTargets.from_logits(z, V + 1)
    with pytest.raises(ValueError, match="temperature"):
        dk.SparseTargets.from_logits(z, 3, temperature=0.0)
    with pytest.raises(ValueError, match="k=0"):
        dk.SparseTargets.from_logits(z, 0)
    with pytest.raises(TypeError, match="logits"):
        dk.SparseTargets.from_logits(z.long(), 3)


# --------------------------------------------------------------------------- basics


def test_construction_dtypes_and_checks():
    idx = torch.tensor([[1, 2, -1]])
    t = dk.SparseTargets(idx, torch.tensor([[-0.5, -1.5, -math.inf]]), {"teacher": "x"})
    assert t.index.dtype == torch.int32, "index is stored as int32"
    assert t.metadata == {"teacher": "x", "k": 3}
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        assert dk.SparseTargets(idx, torch.zeros(1, 3, dtype=dt)).logprobs.dtype == dt
    with pytest.raises(TypeError, match="logprobs"):
        dk.SparseTargets(idx, torch.zeros(1, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="index"):
        dk.SparseTargets(idx.float(), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="same shape"):
        dk.SparseTargets(idx, torch.zeros(1, 4))


def test_len_getitem_to():
    t = dk.SparseTargets.from_logits(_logits(6, V), 4, metadata={"teacher": "m"})
    assert len(t) == 6
    s = t[2:5]
    assert isinstance(s, dk.SparseTargets) and s.shape == (3, 4) and s.metadata["teacher"] == "m"
    assert torch.equal(s.index, t.index[2:5]) and torch.equal(s.logprobs, t.logprobs[2:5])
    assert t[1].shape == (4,)
    assert torch.equal(t[torch.tensor([0, 5])].index, t.index[[0, 5]])
    with pytest.raises(IndexError):
        t[:, :2]
    with pytest.raises(TypeError):
        len(t[0])
    u = t.to("cpu", dtype=torch.float16)
    assert u.logprobs.dtype == torch.float16 and u.index.dtype == torch.int32 and u.device.type == "cpu"
    b = dk.SparseTargets.from_logits(_logits(2, 3, V), 4)
    assert len(b) == 2 and b[:, 1].shape == (2, 4)


def test_pad_and_truncate():
    t = dk.SparseTargets.from_logits(_logits(4, V), 6, metadata={"teacher": "m"})
    p = t.pad(9)
    assert p.k == 9 and p.metadata["k"] == 9
    assert torch.equal(p.index[:, :6], t.index) and bool((p.index[:, 6:] == -1).all())
    assert bool(torch.isneginf(p.logprobs[:, 6:]).all())
    assert torch.equal(p.pad(9).index, p.index)
    # truncate keeps the largest slots, wherever they are
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    shuffled = dk.SparseTargets(p.index[:, perm], p.logprobs[:, perm], p.metadata)
    tr = shuffled.truncate(3)
    assert tr.k == 3 and tr.metadata["k"] == 3
    assert torch.equal(tr.index, t.index[:, :3]) and torch.equal(tr.logprobs, t.logprobs[:, :3])
    assert bool((tr.mass() <= t.mass() + 1e-12).all())
    assert torch.equal(shuffled.truncate(6).index, t.index)   # empty slots go last
    with pytest.raises(ValueError, match="truncate"):
        t.pad(3)
    with pytest.raises(ValueError, match="pad"):
        t.truncate(7)


# --------------------------------------------------------------------------- retemper


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=["fp32", "fp16", "bf16", "fp64"])
def test_retemper_one_is_identity(dtype):
    t = dk.SparseTargets.from_logits(_logits(3, 7, V), 5, dtype=dtype)
    t = t.pad(6)
    r = t.retemper(1.0)
    assert torch.equal(r.index, t.index)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}.get(dtype, 1e-6)
    torch.testing.assert_close(r.logprobs.double(), t.logprobs.double(), rtol=tol, atol=tol)
    assert r.logprobs.dtype == dtype


@pytest.mark.parametrize("a", [0.5, 2.0, 3.0])
def test_retemper_matches_dense_when_k_is_v(a):
    z = _logits(5, V)
    r = dk.SparseTargets.from_logits(z, V, temperature=2.0).retemper(a)
    dense = torch.log_softmax(a * torch.log_softmax(z / 2.0, -1), -1)
    torch.testing.assert_close(r.logprobs, dense.gather(-1, r.index.long()), rtol=0, atol=1e-10)
    # = the teacher at temperature tau / a
    torch.testing.assert_close(dense, torch.log_softmax(z * a / 2.0, -1), rtol=0, atol=1e-10)
    assert r.metadata["temperature"] == pytest.approx(2.0 / a)


@pytest.mark.parametrize("a", [0.5, 2.0])
def test_retemper_tail_is_one_more_bucket(a):
    t = dk.SparseTargets.from_logits(_logits(6, V), 4).pad(5)
    r = t.retemper(a)
    p = _dense(t, V).sum(-1)
    buckets = torch.cat([t.logprobs[:, :4].exp(), (1 - p).unsqueeze(-1)], -1) ** a
    ref = buckets / buckets.sum(-1, keepdim=True)
    torch.testing.assert_close(r.logprobs[:, :4].exp(), ref[:, :4], rtol=0, atol=1e-12)
    assert bool(torch.isneginf(r.logprobs[:, 4]).all()) and bool((r.index[:, 4] == -1).all())
    assert bool((r.mass() <= 1 + 1e-12).all())
    with pytest.raises(ValueError, match="ratio"):
        t.retemper(0)
    with pytest.raises(ValueError, match="ratio"):
        t.retemper(float("inf"))


# --------------------------------------------------------------------------- blend


def test_blend_single_target_weight_one_is_identity():
    t = dk.SparseTargets.from_logits(_logits(2, 5, V), 6, dtype=torch.float32).pad(8)
    b = dk.blend([t], [1.0])
    assert b.shape == t.shape and b.logprobs.dtype == torch.float32
    assert torch.equal(b.index, t.index)   # t is sorted by mass, so is b
    torch.testing.assert_close(b.logprobs, t.logprobs, rtol=0, atol=1e-6)


def test_blend_two_teachers_equals_dense_mixture():
    t1 = dk.SparseTargets.from_logits(_logits(3, 4, V, seed=1), 6)
    t2 = dk.SparseTargets.from_logits(_logits(3, 4, V, seed=2), 9)
    w = [0.3, 0.7]
    b = dk.blend([t1, t2], w, k=15)   # 15 >= |union|: nothing dropped
    mix = w[0] * _dense(t1, V) + w[1] * _dense(t2, V)
    torch.testing.assert_close(_dense(b, V), mix, rtol=0, atol=1e-12)
    assert b.k == 15 and bool((b.index >= 0).sum(-1).eq((mix > 0).sum(-1)).all())
    # tails mix: 1 - P_blend = sum_i w_i (1 - P_i)
    torch.testing.assert_close(1 - b.mass(), w[0] * (1 - t1.mass()) + w[1] * (1 - t2.mass()), rtol=0, atol=1e-12)
    # full distributions: K = V blends to the dense mixture of the softmaxes
    f1 = dk.SparseTargets.from_logits(_logits(3, 4, V, seed=1), V)
    f2 = dk.SparseTargets.from_logits(_logits(3, 4, V, seed=2), V)
    fb = dk.blend([f1, f2], w)
    dense = w[0] * torch.softmax(_logits(3, 4, V, seed=1), -1) + w[1] * torch.softmax(_logits(3, 4, V, seed=2), -1)
    torch.testing.assert_close(_dense(fb, V), dense, rtol=0, atol=1e-12)


def test_blend_truncates_by_mass():
    t1 = dk.SparseTargets.from_logits(_logits(50, V, seed=3), 8)
    t2 = dk.SparseTargets.from_logits(_logits(50, V, seed=4), 4)
    b = dk.blend([t1, t2], [0.5, 0.5])
    assert b.k == 8
    mix = 0.5 * _dense(t1, V) + 0.5 * _dense(t2, V)
    ref = mix.topk(8, dim=-1)
    torch.testing.assert_close(b.logprobs, ref.values.log(), rtol=0, atol=1e-12)
    assert bool((b.mass() <= 0.5 * t1.mass() + 0.5 * t2.mass() + 1e-12).all())
    assert b.metadata["blend"][0]["weight"] == 0.5 and b.metadata["vocab_size"] == V


def test_blend_default_weights_and_mixed_dtypes():
    t1 = dk.SparseTargets.from_logits(_logits(4, V, seed=1), 3, dtype=torch.float16)
    t2 = dk.SparseTargets.from_logits(_logits(4, V, seed=2), 3, dtype=torch.float32)
    b = dk.blend([t1, t2])
    assert b.logprobs.dtype == torch.float32
    torch.testing.assert_close(b.mass(), (0.5 * _dense(t1, V) + 0.5 * _dense(t2, V)).topk(3, -1).values.sum(-1).float(),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("weights", [[0.5, 0.6], [1.2, -0.2], [1.0, 0.0], [0.5], [0.5, 0.5 + 1e-5]],
                         ids=["sum>1", "negative", "zero", "count", "off-by-1e-5"])
def test_blend_rejects_bad_weights(weights):
    t = dk.SparseTargets.from_logits(_logits(2, V), 3)
    with pytest.raises(ValueError, match="weights"):
        dk.blend([t, t], weights)


def test_blend_rejects_other_shapes_and_types():
    t1 = dk.SparseTargets.from_logits(_logits(2, V), 3)
    t2 = dk.SparseTargets.from_logits(_logits(3, V), 3)
    with pytest.raises(ValueError, match="leading shape"):
        dk.blend([t1, t2], [0.5, 0.5])
    with pytest.raises(TypeError):
        dk.blend(t1, [1.0])
    with pytest.raises(TypeError):
        dk.blend([t1, (t1.index, t1.logprobs)], [0.5, 0.5])


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_save_load_round_trip(tmp_path, dtype):
    t = dk.SparseTargets.from_logits(_logits(3, 5, V), 4, dtype=dtype,
                                     metadata={"teacher": "tiny", "note": [1, 2]}).pad(6)
    path = tmp_path / "t.safetensors"
    t.save(path)
    u = dk.SparseTargets.load(path)
    assert torch.equal(u.index, t.index) and torch.equal(u.logprobs, t.logprobs)
    assert u.index.dtype == torch.int32 and u.logprobs.dtype == dtype
    assert u.metadata == t.metadata
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"], "no temp file left behind"
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == {"index", "logprobs"} and "dft_kernels" in f.metadata()


def test_load_truncated_or_foreign_file_names_it(tmp_path):
    t = dk.SparseTargets.from_logits(_logits(8, V), 4)
    path = tmp_path / "t.safetensors"
    t.save(path)
    data = path.read_bytes()
    path.write_bytes(data[:-7])
    with pytest.raises(ValueError, match="t.safetensors.*truncated or corrupted"):
        dk.SparseTargets.load(path)
    path.write_bytes(b"\xff" * 8 + data[8:])
    with pytest.raises(ValueError, match="t.safetensors"):
        dk.SparseTargets.load(path)
    from safetensors.torch import save_file
    save_file({"index": t.index, "logprobs": t.logprobs}, str(path))
    with pytest.raises(ValueError, match="not written by dft_kernels"):
        dk.SparseTargets.load(path)


# --------------------------------------------------------------------------- validate


@pytest.mark.parametrize("index,logprobs,match", [
    pytest.param([[1, 45]], [[-1.0, -2.0]], "45 >= ", id="id>=V"),
    pytest.param([[1, -2]], [[-1.0, -2.0]], "< -1", id="id<-1"),
    pytest.param([[1, 2]], [[float("nan"), -2.0]], "NaN", id="nan"),
    pytest.param([[1, 2]], [[0.5, -2.0]], "positive", id="positive"),
    pytest.param([[1, 2]], [[-0.1, -0.2]], "did you pass logits", id="mass>1"),
])
def test_validate_errors(index, logprobs, match):
    t = dk.SparseTargets(torch.tensor(index), torch.tensor(logprobs))
    with pytest.raises(ValueError, match=match):
        t.validate(vocab_size=V)


def test_validate_accepts_good_targets():
    t = dk.SparseTargets.from_logits(_logits(5, V, dtype=torch.float32), V)
    assert t.validate(vocab_size=V) is t
    t.pad(V + 3).validate(vocab_size=V)


# --------------------------------------------------------------------------- vLLM


def test_from_vllm_prompt_logprobs_alignment():
    lp = SimpleNamespace
    # 4 prompt tokens; entry t = distribution of token t given tokens < t (vLLM), entry 0 None
    prompt_logprobs = [
        None,
        {5: lp(logprob=-0.1, rank=1, decoded_token="a"), 7: lp(logprob=-2.5, rank=2, decoded_token="b")},
        {3: -1.0, 9: -0.7, 11: -3.0},                       # plain floats work too
        {2: lp(logprob=-0.05, rank=1, decoded_token="c")},
    ]
    t = dk.SparseTargets.from_vllm_prompt_logprobs(prompt_logprobs, metadata={"teacher": "vllm-model"})
    assert t.shape == (4, 3) and t.metadata["teacher"] == "vllm-model"
    # row t = prompt_logprobs[t + 1], sorted by mass; last row empty
    assert t.index.tolist() == [[5, 7, -1], [9, 3, 11], [2, -1, -1], [-1, -1, -1]]
    torch.testing.assert_close(t.logprobs[1], torch.tensor([-0.7, -1.0, -3.0]))
    assert bool(torch.isneginf(t.logprobs[3]).all())
    t.validate(vocab_size=12)
    # k keeps the largest slots / pads
    t2 = dk.SparseTargets.from_vllm_prompt_logprobs(prompt_logprobs, k=2)
    assert t2.index.tolist() == [[5, 7], [9, 3], [2, -1], [-1, -1]]
    assert dk.SparseTargets.from_vllm_prompt_logprobs(prompt_logprobs, k=5).k == 5
    # a RequestOutput-like object
    out = SimpleNamespace(prompt_logprobs=prompt_logprobs, prompt_token_ids=[1, 5, 9, 2])
    assert torch.equal(dk.SparseTargets.from_vllm_prompt_logprobs(out).index, t.index)
    with pytest.raises(TypeError, match="prompt_logprobs"):
        dk.SparseTargets.from_vllm_prompt_logprobs({1: -0.5})
    with pytest.raises(TypeError, match=r"prompt_logprobs\[1\]"):
        dk.SparseTargets.from_vllm_prompt_logprobs([None, [-0.5]])


def test_retemper_fp32_rounding_noise_in_p_is_not_a_tail():
    # K = V in fp32: P = 1 +- 1e-7 from rounding; that must not become tail mass at a < 1
    z = _logits(8, V)
    r = dk.SparseTargets.from_logits(z.float(), V).retemper(0.5)
    dense = torch.log_softmax(0.5 * torch.log_softmax(z, -1), -1)
    torch.testing.assert_close(r.logprobs.double(), dense.gather(-1, r.index.long()), rtol=0, atol=2e-6)


# --------------------------------------------------------------------------- blend: every source checked (issue 23)


def test_blend_checks_the_kind_of_every_source_in_any_order():
    g = torch.Generator().manual_seed(11)
    z = _logits(4, V, seed=5)
    top8 = dk.SparseTargets.from_logits(z, 8)                          # no kind recorded: top-k
    hybrid = dk.SparseTargets.from_logits(z, 2, samples=6, generator=g)
    for order in ([top8, hybrid], [hybrid, top8]):
        with pytest.raises(ValueError, match=r"targets\[\d\] holds hybrid targets and targets\[\d\] topk targets"):
            dk.blend(order)
    mix = dk.blend([hybrid, hybrid])
    assert mix.metadata["kind"] == "hybrid" and mix.k == 2 * hybrid.k


def test_blend_refuses_other_temperatures_and_keeps_what_sources_share():
    a = dk.SparseTargets.from_logits(_logits(3, V, seed=1), 6,
                                     metadata={"tokenizer_fingerprint": "tok", "teacher_fingerprint": "ta"})
    hot = dk.SparseTargets.from_logits(_logits(3, V, seed=2), 6, temperature=2.0)
    for order in ([a, hot], [hot, a]):
        with pytest.raises(ValueError, match=r"different temperatures.*retemper.*"
                                             r"\(temperature (1.0 vs 2.0|2.0 vs 1.0)\)"):
            dk.blend(order)
    b = dk.SparseTargets.from_logits(_logits(3, V, seed=2), 6,
                                     metadata={"tokenizer_fingerprint": "tok", "teacher_fingerprint": "tb"})
    meta = dk.blend([a, b]).metadata
    assert meta["temperature"] == 1.0 and meta["tokenizer_fingerprint"] == "tok" and "teacher_fingerprint" not in meta
    b.metadata["tokenizer_fingerprint"] = "other"
    with pytest.raises(ValueError, match=r"different tokenizers.*'tok' vs 'other'"):
        dk.blend([a, b])
    del b.metadata["tokenizer_fingerprint"]             # recorded by one side only: not vouched for
    assert "tokenizer_fingerprint" not in dk.blend([a, b]).metadata


class _Tok:
    """Just enough of a tokenizer for its fingerprint."""

    def get_vocab(self):
        return {f"w{i}": i for i in range(V)}


def _tiny_teacher(seed):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


def test_blend_dirs_checks_every_source_and_keeps_the_tokenizer_fingerprint(tmp_path):
    from dft_kernels import targets as T
    from dft_kernels.data import DFTTargetsDataset
    from dft_kernels.targets.blending import blend_dirs
    g = torch.Generator().manual_seed(2)
    examples = [{"input_ids": torch.randint(0, V, (n,), generator=g).tolist()} for n in (5, 3, 7)]
    kw = dict(out_dir=None, shard_size=2, progress=False, tokenizer=_Tok())
    t1, t2 = _tiny_teacher(1), _tiny_teacher(2)
    top = tmp_path / "top"
    T.build(t1, [examples], 4, **{**kw, "out_dir": top})
    hyb = tmp_path / "hyb"
    T.build(t2, [examples], 2, **{**kw, "out_dir": hyb}, samples=3, seed=1)
    for order in ([top, hyb], [hyb, top]):                 # the hybrid's sampled slots would be truncated
        with pytest.raises(ValueError, match=r"hyb holds hybrid targets"):
            blend_dirs(order, out_dir=tmp_path / "o", progress=False)
    hot = tmp_path / "hot"
    T.build(t2, [examples], 4, 2.0, **{**kw, "out_dir": hot})
    with pytest.raises(ValueError, match="different temperatures"):
        blend_dirs([top, hot], out_dir=tmp_path / "o", progress=False)
    top2 = tmp_path / "top2"
    T.build(t2, [examples], 4, **{**kw, "out_dir": top2})
    man = blend_dirs([top, top2], out_dir=tmp_path / "mix", progress=False)
    assert man["tokenizer_fingerprint"] == T.fingerprint_tokenizer(_Tok()) and man["temperature"] == 1.0
    ds = DFTTargetsDataset(examples, tmp_path / "mix", vocab_size=V, tokenizer=_Tok())   # the check still works
    assert len(ds) == 3
