"""Sampled and hybrid targets (docs/design.md sec. 12): unbiased forward-KL gradients,
rows that are distributions, hybrid with samples=0 = top-k, draws from softmax(z / T),
seeded byte-identical builds, and how blend / retemper / validate / the trainer treat them."""
import json
import warnings

import pytest
import torch

import dft_kernels as dk
from dft_kernels import targets as dkt
from dft_kernels.ops.sampling import draw_samples
from dft_kernels.targets import sampling
from dft_kernels.targets.container import SparseTargets


def _counts(t: SparseTargets, samples: int, offset: int = 0) -> dict[int, int]:
    """id -> number of draws, read back from a row's log(mass * count / S) slots."""
    idx, lp = t.index[offset:], t.logprobs[offset:].double()
    outside = 1.0 - t.logprobs[:offset].double().exp().sum()        # the hybrid's draws hold 1 - P_topk
    keep = idx >= 0
    return {int(i): int(round(float(c))) for i, c in zip(idx[keep], lp[keep].exp() * samples / outside)}


# --------------------------------------------------------------------------- (a) unbiasedness


def _mean_grad(z, teacher, labels, make, seeds, lam, upstream):
    """Mean over draws (one per seed) of d(upstream * loss_sum)/dz, all draws in one loss call."""
    ts = [make(teacher, torch.Generator().manual_seed(s)) for s in seeds]
    k = max(t.k for t in ts)
    ts = [t.pad(k) for t in ts]
    zr = z.detach().repeat(len(seeds), 1).requires_grad_(True)
    idx = torch.cat([t.index for t in ts]).long()
    lp = torch.cat([t.logprobs for t in ts])
    loss = dk.dft_loss(zr, idx, lp, labels.repeat(len(seeds)), lam=lam, reduction="sum", impl="torch")
    (upstream * loss).backward()
    return zr.grad.view(len(seeds), *z.shape).double().mean(0)


def test_forward_kl_gradient_is_unbiased_topk_is_not():
    g = torch.Generator().manual_seed(0)
    N, V, lam, up = 5, 41, 0.3, 0.7
    z = torch.randn(N, V, generator=g, dtype=torch.float64).float()
    teacher = (torch.randn(N, V, generator=g) * 2.0).double()
    labels = torch.randint(0, V, (N,), generator=g)
    labels[2] = -100                                            # an ignored row: zero gradient
    # float64 reference: dense (K = V) forward KL + lam * CE, sum reduction
    q, p = z.double().softmax(-1), teacher.softmax(-1)
    onehot = torch.nn.functional.one_hot(labels.clamp(min=0), V).double()
    ref = up * ((q - p) + lam * (q - onehot)) * (labels != -100).double()[:, None]
    makers = {
        "sampled": lambda t, gen: SparseTargets.from_logits(t.float(), 0, samples=8, generator=gen),
        "hybrid": lambda t, gen: SparseTargets.from_logits(t.float(), 3, samples=5, generator=gen),
        "topk": lambda t, gen: SparseTargets.from_logits(t.float(), 8),
    }
    err = {}
    for name, make in makers.items():
        for draws in (16, 256):
            est = _mean_grad(z, teacher, labels, make, range(1000, 1000 + draws), lam, up)
            assert torch.equal(est[2], torch.zeros(V, dtype=torch.float64)), "ignored row must get no gradient"
            err[name, draws] = float((est - ref).norm())
    print("||mean gradient - dense|| by (targets, draws):", {key: round(e, 4) for key, e in err.items()})
    for name in ("sampled", "hybrid"):   # 16x the draws: error / 4 expected (1 / sqrt(draws)); allow / 2
        assert err[name, 256] < 0.5 * err[name, 16], err
        assert err[name, 256] < 0.03, err
    assert err["topk", 256] == pytest.approx(err["topk", 16]), "top-k is deterministic: its error stays put"
    assert err["topk", 256] > 3 * max(err["sampled", 256], err["hybrid", 256]), err


# --------------------------------------------------------------------------- (b) a distribution per row


@pytest.mark.parametrize("k,samples", [pytest.param(0, 7, id="sampled"), pytest.param(3, 9, id="hybrid"),
                                       pytest.param(5, 1, id="hybrid-one-draw")])
def test_each_row_is_a_distribution(k, samples):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 7, 37, generator=g) * 3.0
    t = SparseTargets.from_logits(logits, k, 1.3, samples=samples, generator=g, chunk_rows=3)
    assert t.shape == (2, 7, k + samples) and t.logprobs.dtype == torch.float32
    assert (t.mass() - 1.0).abs().max() <= 1e-5
    valid = t.index >= 0
    assert bool((t.logprobs[valid] <= 0).all()) and bool((t.index < 37).all())
    assert bool(torch.isneginf(t.logprobs[~valid]).all())
    flat = t.index.view(-1, t.k)
    for row in flat:
        ids = row[row >= 0].tolist()
        assert len(ids) == len(set(ids)), "each drawn id once per row"
        assert set(ids[:k]).isdisjoint(ids[k:]), "the hybrid draws come from outside the top-k"
    assert t.metadata["kind"] == ("sampled" if k == 0 else "hybrid")
    assert (t.metadata["topk"], t.metadata["samples"], t.metadata["temperature"]) == (k, samples, 1.3)
    assert t.validate(37) is t


def test_draw_samples_over_vocab_chunks_matches_one_chunk():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(6, 29, generator=g) * 2
    lse = torch.logsumexp(z, -1)
    top = z.topk(2, -1).indices
    top[1, 1] = -1                                             # a row excluding one id only
    one = draw_samples(lambda a, b: z[:, a:b], 29, lse, top, 11, torch.Generator().manual_seed(9), chunk=64)
    many = draw_samples(lambda a, b: z[:, a:b], 29, lse, top, 11, torch.Generator().manual_seed(9), chunk=5)
    assert torch.equal(one[0], many[0]) and torch.allclose(one[1], many[1])
    p_excl = torch.where(top >= 0, (z - lse[:, None]).gather(1, top.clamp(min=0)).double().exp(), 0).sum(1)
    mass = torch.where(one[0] >= 0, one[1].double().exp(), 0).sum(1)
    assert torch.allclose(mass + p_excl, torch.ones(6, dtype=torch.float64), atol=1e-6)
    # a row whose excluded ids hold all the mass gets no draws
    full = draw_samples(lambda a, b: z[:3, a:b], 29, lse[:3], torch.arange(29).expand(3, 29), 4, None)
    assert bool((full[0] == -1).all()) and bool(torch.isneginf(full[1]).all())


# --------------------------------------------------------------------------- (c) samples = 0 is top-k


def test_hybrid_without_samples_is_topk_exactly():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(9, 23, generator=g).double()
    plain = SparseTargets.from_logits(logits, 4, 0.8, samples=0)
    ref_v, ref_i = (logits / 0.8).log_softmax(-1).topk(4, -1)          # float64 reference
    assert torch.equal(plain.index.long(), ref_i) and torch.allclose(plain.logprobs, ref_v, atol=1e-12)
    assert "kind" not in plain.metadata or plain.metadata["kind"] == "topk"
    hybrid = SparseTargets.from_logits(logits, 4, 0.8, samples=6, generator=g)
    assert torch.equal(hybrid.index[:, :4], plain.index) and torch.equal(hybrid.logprobs[:, :4], plain.logprobs)


# --------------------------------------------------------------------------- (d) draws follow softmax(z / T)


def _chi2(counts: dict[int, int], probs: torch.Tensor, n: int) -> float:
    obs = torch.tensor([counts.get(i, 0) for i in range(len(probs))], dtype=torch.float64)
    exp = probs * n
    assert float(obs[exp == 0].sum()) == 0, "no draw of an excluded id"
    return float(((obs - exp)[exp > 0] ** 2 / exp[exp > 0]).sum())


@pytest.mark.parametrize("k", [pytest.param(0, id="sampled"), pytest.param(2, id="hybrid")])
def test_draws_follow_softmax_at_temperature(k):
    V, T, S = 9, 2.5, 20000
    z = torch.linspace(-2.0, 3.0, V).double()[torch.randperm(V, generator=torch.Generator().manual_seed(1))]
    t = SparseTargets.from_logits(z[None].float(), k, T, samples=S, generator=torch.Generator().manual_seed(7))
    counts = _counts(t[0], S, offset=k)
    assert sum(counts.values()) == S

    def restricted(p):
        p = p.clone()
        p[t.index[0, :k].long()] = 0.0
        return p / p.sum()
    # chi-square, V - k - 1 degrees of freedom; 99.9% quantiles: 26.1 (8 dof), 22.5 (6 dof)
    crit = {8: 26.12, 6: 22.46}[V - k - 1]
    assert _chi2(counts, restricted((z / T).softmax(-1)), S) < crit
    assert _chi2(counts, restricted(z.softmax(-1)), S) > 10 * crit, "the test tells T = 1 from T = 2.5"


# --------------------------------------------------------------------------- build: seeded, resumable


@pytest.fixture(scope="module")
def teacher():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg)


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_build_same_seed_same_bytes_after_resume(teacher, tmp_path):
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 97, (int(n),), generator=g) for n in (5, 9, 1, 7, 6, 3, 8)]
    kw = dict(samples=12, seed=11, shard_size=3, progress=False, dtype=torch.float32)
    man = dkt.build(teacher, [seqs[:4], seqs[4:]], 4, out_dir=tmp_path / "a", **kw)
    assert (man["kind"], man["k"], man["topk"], man["samples"], man["seed"]) == ("hybrid", 16, 4, 12, 11)
    dkt.build(teacher, [seqs[:2], seqs[2:]], 4, out_dir=tmp_path / "b", **kw)     # other batching
    (tmp_path / "b" / "shard-00001.safetensors").unlink()                      # a crash lost shard 1
    dkt.build(teacher, [seqs[:2], seqs[2:]], 4, out_dir=tmp_path / "b", **kw)     # resume
    ref = _files(tmp_path / "a")
    assert {n: b for n, b in _files(tmp_path / "b").items() if n != "manifest.json"} == \
        {n: b for n, b in ref.items() if n != "manifest.json"}
    other = dkt.build(teacher, [seqs], 4, out_dir=tmp_path / "c", **{**kw, "seed": 12})
    assert other["shards"][0]["data_sha256"] != man["shards"][0]["data_sha256"]
    t = SparseTargets.load(tmp_path / "a" / "shard-00000.safetensors")
    assert (t.mass() - 1).abs().max() <= 1e-5 and t.metadata["kind"] == "hybrid"
    info = dkt.inspect(tmp_path / "a")
    assert (info["kind"], info["topk"], info["samples"], info["seed"], info["k"]) == ("hybrid", 4, 12, 11, 16)
    assert info["mass_mean"] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="holds targets built with"):
        dkt.build(teacher, [seqs], 4, out_dir=tmp_path / "a", **{**kw, "samples": 5})
    with pytest.raises(ValueError, match="k=0 with samples=0"):
        dkt.build(teacher, [seqs], 0, out_dir=tmp_path / "d", progress=False)


def test_cli_build_with_samples_and_inspect(teacher, tmp_path, capsys):
    from dft_kernels.cli import main
    teacher.save_pretrained(tmp_path / "t")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"input_ids": [1, 5, 9, 2, n]}) + "\n" for n in range(4)))
    rc = main(["targets", "build", "--teacher", str(tmp_path / "t"), "--data", str(tmp_path / "d.jsonl"),
               "--k", "0", "--samples", "6", "--seed", "3", "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 0
    capsys.readouterr()
    assert main(["targets", "inspect", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "kind:         sampled" in out and "top-0 + 6 samples, seed 3" in out


# --------------------------------------------------------------------------- blend, retemper, validate, warn


def test_blend_keeps_every_slot_and_retemper_refuses():
    g = torch.Generator().manual_seed(6)
    a = SparseTargets.from_logits(torch.randn(4, 19, generator=g), 2, samples=5, generator=g)
    b = SparseTargets.from_logits(torch.randn(4, 19, generator=g), 2, samples=5, generator=g)
    mix = dkt.blend([a, b], [0.25, 0.75])
    assert mix.k == 14 and (mix.mass() - 1).abs().max() <= 1e-5 and mix.metadata["kind"] == "hybrid"
    with pytest.raises(ValueError, match="bias the mixture"):
        dkt.blend([a, b], k=8)
    with pytest.raises(ValueError, match="rebuild them at the new temperature"):
        a.retemper(2.0)
    with pytest.raises(ValueError, match="of different kinds"):
        dkt.blend([a, SparseTargets.from_logits(torch.randn(4, 19), 7, metadata={"kind": "topk"})])


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")])
def test_validate_accepts_rounding_of_a_sum_of_one(dtype):
    g = torch.Generator().manual_seed(8)
    t = SparseTargets.from_logits(torch.randn(3000, 300, generator=g) * 3, 4, samples=12, generator=g, dtype=dtype)
    assert float(t.mass().max()) > 1.0                        # storage rounding pushes some rows above 1
    t.validate(300)
    bad = SparseTargets(t.index, (t.logprobs.float() + 0.05).clamp(max=0).to(dtype))   # 5% too much mass
    with pytest.raises(ValueError, match="sum to"):
        bad.validate(300)


def test_reverse_kl_and_jsd_on_sampled_targets_warn_once(monkeypatch):
    monkeypatch.setattr(sampling, "_WARNED", set())
    meta = {"kind": "sampled"}
    with pytest.warns(UserWarning, match="'reverse_kl' on sampled targets is biased"):
        assert sampling.warn_if_biased(meta, "reverse_kl", 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sampling.warn_if_biased(meta, "reverse_kl", 0.5)            # biased, but said once already
        assert not sampling.warn_if_biased(meta, "jsd", 0.0)               # beta = 0 is forward KL
        assert not sampling.warn_if_biased({"kind": "topk"}, "jsd", 0.5)
        assert not sampling.warn_if_biased(None, "jsd", 0.5)
    with pytest.warns(UserWarning, match="'jsd' on hybrid targets"):
        sampling.warn_if_biased({"kind": "hybrid"}, "jsd", 0.5)


@pytest.mark.parametrize("kwargs,match", [
    pytest.param(dict(k=0, samples=0), "k=0 with samples=0", id="nothing"),
    pytest.param(dict(k=2, samples=-1), "samples=-1", id="negative"),
    pytest.param(dict(k=2, samples=1.5), "samples=1.5", id="float"),
    pytest.param(dict(k=2, samples=3, generator=7), "generator must be a torch.Generator", id="generator"),
])
def test_bad_sampling_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SparseTargets.from_logits(torch.randn(2, 11), **kwargs)
