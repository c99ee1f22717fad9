"""dk.targets.build (teacher top-K shards) and dft_kernels.data.DFTTargetsDataset."""
import copy
import json
import pickle

import pytest
import torch

transformers = pytest.importorskip("transformers")

import dft_kernels as dk  # noqa: E402
from dft_kernels import targets as dkt  # noqa: E402
from dft_kernels.targets import building, store  # noqa: E402
from dft_kernels.data import ITEM_KEYS, DFTTargetsDataset  # noqa: E402

V = 300


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # a peakier teacher than the random init, so top-K mass is not ~K/V
        model.lm_head.weight.mul_(40.0)
    path = tmp_path_factory.mktemp("teacher") / "tiny-llama"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(teacher_dir)


def _examples(n=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(1, 17, (1,), generator=g))
        out.append({"input_ids": torch.randint(0, V, (length,), generator=g).tolist()})
    return out


def _batches(examples, bs=3):
    return [examples[i:i + bs] for i in range(0, len(examples), bs)]


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _dense_logprobs(model, ids, temperature=1.0):
    with torch.no_grad():
        z = model(input_ids=torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(z / temperature, dim=-1)


# --------------------------------------------------------------------------- build


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)], ids=["fp32", "fp16"])
def test_build_equals_log_softmax_of_teacher_logits(teacher, teacher_dir, tmp_path, dtype, tol):
    examples = _examples()
    # by path (loaded inside build) and by model; vocab tile 64 does not divide V = 300
    src = teacher_dir if dtype == torch.float32 else teacher
    man = dkt.build(src, _batches(examples), 8, 1.5, out_dir=tmp_path, shard_size=4, chunk_vocab=64, dtype=dtype,
                  progress=False)
    assert man["complete"] and man["k"] == 8 and man["vocab_size"] == V and man["temperature"] == 1.5
    assert man["teacher"] == str(teacher_dir) and man["n_sequences"] == len(examples)
    assert [e["file"] for e in man["shards"]] == [f"shard-0000{i}.safetensors" for i in range(3)]
    assert json.loads((tmp_path / "manifest.json").read_text()) == man
    ds = DFTTargetsDataset(examples, tmp_path, vocab_size=V)
    for i, ex in enumerate(examples):
        item = ds[i]
        ref = _dense_logprobs(teacher, ex["input_ids"], 1.5)      # row t = distribution after token t
        top = ref.topk(8, dim=-1)
        assert item["target_logprobs"].shape == (len(ex["input_ids"]), 8)
        got_ids, order = item["target_index"].long().sort(-1)
        ref_ids, ref_order = top.indices.sort(-1)
        assert torch.equal(got_ids, ref_ids), f"example {i}: top-K ids differ"
        torch.testing.assert_close(item["target_logprobs"].double().gather(-1, order),
                                   top.values.gather(-1, ref_order), rtol=tol, atol=tol)
        assert dkt.SparseTargets(item["target_index"], item["target_logprobs"]).validate(V)
    shard = dk.SparseTargets.load(tmp_path / "shard-00000.safetensors")
    assert shard.logprobs.dtype == dtype and shard.index.dtype == torch.int32
    assert shard.metadata["teacher"] == str(teacher_dir) and shard.metadata["temperature"] == 1.5


_SMALL = dict(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
              intermediate_size=64)


@pytest.mark.parametrize("family,extra", [
    pytest.param("Gemma2", dict(head_dim=16, final_logit_softcapping=3.0), id="gemma2-softcap"),
    pytest.param("Cohere", dict(logit_scale=0.5), id="cohere-logit_scale"),
    pytest.param("Granite", dict(logits_scaling=4.0), id="granite-logits_scaling"),
])
def test_build_applies_the_models_logit_transform(tmp_path, family, extra):
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{family}Config")(**_SMALL, **extra)
    model = getattr(transformers, f"{family}ForCausalLM")(cfg).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)
    ids = list(range(5, 17))
    dkt.build(model, [[ids]], 6, out_dir=tmp_path, chunk_vocab=128, dtype=torch.float32, progress=False,
            teacher_name=f"tiny-{family}")
    t = dk.SparseTargets.load(tmp_path / "shard-00000.safetensors")
    ref = _dense_logprobs(model, ids)            # the model's own forward applies the transform
    torch.testing.assert_close(t.logprobs.double(), ref.gather(-1, t.index.long()), rtol=1e-5, atol=1e-5)
    assert torch.equal(t.index.long().sort(-1).values, ref.topk(6, -1).indices.sort(-1).values)


def test_batch_forms_give_identical_shards(teacher, tmp_path):
    examples = _examples(5)
    dkt.build(teacher, _batches(examples, 5), 4, out_dir=tmp_path / "lists", progress=False)
    # the same sequences as one padded [B, T] batch with an attention mask (left padding)
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(5, width, dtype=torch.long)
    mask = torch.zeros(5, width, dtype=torch.long)
    for j, e in enumerate(examples):
        ids[j, width - len(e["input_ids"]):] = torch.tensor(e["input_ids"])
        mask[j, width - len(e["input_ids"]):] = 1
    dkt.build(teacher, [{"input_ids": ids, "attention_mask": mask}], 4, out_dir=tmp_path / "dict", progress=False)
    assert _files(tmp_path / "lists") == _files(tmp_path / "dict")


def test_interrupted_build_resumes_byte_identical(teacher, tmp_path, monkeypatch):
    examples = _examples(11)
    kw = dict(shard_size=3, chunk_vocab=128, progress=False)
    dkt.build(teacher, _batches(examples, 2), 5, out_dir=tmp_path / "ref", **kw)

    real_write = store.write_shard                  # the one shard-directory writer's (build and blend)
    written = []

    def crash_after_two(path, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt("simulated crash")
        written.append(path.name)
        return real_write(path, **kwargs)

    monkeypatch.setattr(store, "write_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        dkt.build(teacher, _batches(examples, 2), 5, out_dir=tmp_path / "run", **kw)
    monkeypatch.undo()
    assert sorted(_files(tmp_path / "run")) == ["manifest.json", "shard-00000.safetensors", "shard-00001.safetensors"]
    assert not json.loads((tmp_path / "run" / "manifest.json").read_text())["complete"]
    with pytest.raises(ValueError, match="incomplete"):
        DFTTargetsDataset(examples, tmp_path / "run")

    calls = []
    real_topk = building._Teacher.topk
    monkeypatch.setattr(building._Teacher, "topk", lambda self, seqs, *a: calls.append(len(seqs)) or real_topk(self, seqs, *a))
    dkt.build(teacher, _batches(examples, 2), 5, out_dir=tmp_path / "run", **kw)
    assert sum(calls) == len(examples) - 6, "finished shards are skipped, not recomputed"
    assert _files(tmp_path / "run") == _files(tmp_path / "ref")

    # a corrupted finished shard fails verification and is recomputed
    path = tmp_path / "run" / "shard-00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    calls.clear()
    dkt.build(teacher, _batches(examples, 2), 5, out_dir=tmp_path / "run", **kw)
    assert sum(calls) == 3
    assert _files(tmp_path / "run") == _files(tmp_path / "ref")


def test_crash_while_writing_leaves_no_partial_shard(teacher, tmp_path, monkeypatch):
    def no_disk(fd):
        raise OSError("disk full")

    monkeypatch.setattr(store.os, "fsync", no_disk)
    with pytest.raises(OSError, match="disk full"):
        dkt.build(teacher, [_examples(2)], 4, out_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_build_refuses_other_parameters_in_same_dir(teacher, tmp_path):
    dkt.build(teacher, [_examples(2)], 4, out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="k=4"):
        dkt.build(teacher, [_examples(2)], 6, out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="temperature"):
        dkt.build(teacher, [_examples(2)], 4, 2.0, out_dir=tmp_path, progress=False)


def test_build_rejects_bad_input(teacher, tmp_path):
    with pytest.raises(ValueError, match="outside the teacher's vocab"):
        dkt.build(teacher, [[[1, 2, V]]], 4, out_dir=tmp_path, progress=False)
    with pytest.raises(TypeError, match="batches"):
        dkt.build(teacher, ["some text"], 4, out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="k=301"):
        dkt.build(teacher, [[[1, 2]]], V + 1, out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="shard_size"):
        dkt.build(teacher, [[[1, 2]]], 4, out_dir=tmp_path, shard_size=0, progress=False)


# --------------------------------------------------------------------------- loader


@pytest.fixture(scope="module")
def built(teacher, tmp_path_factory):
    examples = _examples(9, seed=3)
    out = tmp_path_factory.mktemp("built")
    dkt.build(teacher, _batches(examples, 4), 6, out_dir=out, shard_size=4, progress=False)
    return examples, out


def _copy(src, dst):
    dst.mkdir()
    for name, data in _files(src).items():
        (dst / name).write_bytes(data)
    return dst


def test_loader_items(built):
    examples, out = built
    examples = [dict(e) for e in examples]
    examples[2]["labels"] = [-100] + examples[2]["input_ids"][1:]
    ds = DFTTargetsDataset(examples, out, vocab_size=V)
    assert len(ds) == 9
    rows = torch.cat([dkt.read_shard(out / e["file"])[0]["logprobs"] for e in ds.manifest["shards"]])
    row = 0
    for i, ex in enumerate(examples):
        item = ds[i]
        n = len(ex["input_ids"])
        assert tuple(item) == ITEM_KEYS
        assert item["input_ids"].dtype == torch.long and item["input_ids"].tolist() == ex["input_ids"]
        assert torch.equal(item["attention_mask"], torch.ones(n, dtype=torch.long))
        assert item["labels"].tolist() == ex.get("labels", ex["input_ids"])
        assert item["target_index"].shape == (n, 6) and item["target_index"].dtype == torch.int32
        assert item["target_logprobs"].dtype == torch.float32
        assert torch.equal(item["target_logprobs"], rows[row:row + n].float())
        row += n
    assert torch.equal(ds[-1]["input_ids"], ds[8]["input_ids"])
    # pickles (DataLoader workers) and works through a DataLoader
    ds2 = pickle.loads(pickle.dumps(ds))
    assert torch.equal(ds2[5]["target_index"], ds[5]["target_index"])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=None)))
    assert set(batch) == set(ITEM_KEYS)


def test_loader_refuses_mismatched_input_ids(built):
    examples, out = built
    bad = [dict(e) for e in examples]
    bad[5] = {"input_ids": list(bad[5]["input_ids"])}
    bad[5]["input_ids"][0] = (bad[5]["input_ids"][0] + 1) % V
    with pytest.raises(ValueError, match=r"example 5 .*shard-00001\.safetensors"):
        DFTTargetsDataset(bad, out)
    with pytest.raises(ValueError, match="built for 9 sequences"):
        DFTTargetsDataset(examples[:8], out)


def test_loader_checks_vocab(built):
    examples, out = built
    with pytest.raises(ValueError, match="vocab_size=5"):       # up front, from the manifest
        DFTTargetsDataset(examples, out, vocab_size=5)


def test_loader_names_truncated_or_corrupted_shard(built, tmp_path):
    examples, out = built
    d = _copy(out, tmp_path / "trunc")
    shard = d / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-20])
    with pytest.raises(ValueError, match=r"shard-00001\.safetensors.*truncated or corrupted"):
        DFTTargetsDataset(examples, d)

    d = _copy(out, tmp_path / "header")
    shard = d / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[10:20] = b"#" * 10
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"shard-00002\.safetensors.*truncated or corrupted"):
        DFTTargetsDataset(examples, d)

    d = _copy(out, tmp_path / "body")     # flipped bytes in the data: found by verify="full"
    shard = d / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-40] ^= 0x55
    shard.write_bytes(bytes(data))
    DFTTargetsDataset(examples, d)  # the cheap check reads headers and input ids only
    with pytest.raises(ValueError, match=r"shard-00000\.safetensors.*truncated or corrupted"):
        DFTTargetsDataset(examples, d, verify="full")

    d = _copy(out, tmp_path / "missing")
    (d / "shard-00000.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="shard-00000"):
        DFTTargetsDataset(examples, d)
    with pytest.raises(ValueError, match="manifest.json"):
        DFTTargetsDataset(examples, tmp_path)


def test_loader_with_the_hf_collator(built):
    examples, out = built
    hf = pytest.importorskip("dft_kernels.hf")
    ds = DFTTargetsDataset(examples, out, vocab_size=V)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=hf.DFTDataCollator())
    batch = next(iter(loader))
    width = max(len(e["input_ids"]) for e in examples[:4])
    assert batch["input_ids"].shape == (4, width) and batch["target_index"].shape == (4, width, 6)
    assert torch.equal(batch["target_logprobs"][1, :len(examples[1]["input_ids"])], ds[1]["target_logprobs"])


# --------------------------------------------------------------------------- offline = online


def _head_input_differs(model):
    """A model whose lm_head input is not its decoder's last_hidden_state: the causal-LM
    wrapper transforms the final hidden states once more before its head (a final norm
    outside the decoder), here with a forward pre-hook on the head that stays on the model."""
    norm = torch.nn.LayerNorm(model.config.hidden_size)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    model.extra_norm = norm                               # a submodule: in the state dict and the fingerprint
    model.get_output_embeddings().register_forward_pre_hook(lambda module, args: (model.extra_norm(args[0]),))
    return model


@pytest.mark.parametrize("family,extra,wrap", [
    pytest.param("Llama", {}, _head_input_differs, id="llama-norm-before-head"),
    pytest.param("Gemma2", dict(head_dim=16, final_logit_softcapping=3.0), None, id="gemma2-softcap"),
    pytest.param("Cohere", dict(logit_scale=0.5), None, id="cohere-logit_scale"),
])
def test_offline_targets_equal_the_online_teachers(tmp_path, family, extra, wrap):
    """targets build and the online teacher (DFTConfig(teacher="topk")) capture the teacher's
    hidden states at its lm_head with one hook: the same targets, bit for bit, for every model."""
    from dft_kernels.hf.online import OnlineTeacher
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{family}Config")(**_SMALL, **extra)
    model = getattr(transformers, f"{family}ForCausalLM")(cfg).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)
    if wrap is not None:
        model = wrap(model)
    seqs = [list(range(5, 17)), list(range(40, 47)), [3, 1, 4, 1, 5, 9, 2, 6]]
    dkt.build(model, [seqs], 6, 1.5, out_dir=tmp_path, dtype=torch.float32, progress=False, teacher_name="tiny")
    shard = dk.SparseTargets.load(tmp_path / "shard-00000.safetensors")

    width = max(map(len, seqs))                       # the same right-padded batch for the online teacher
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for j, s in enumerate(seqs):
        ids[j, :len(s)], mask[j, :len(s)] = torch.tensor(s), 1
    online = OnlineTeacher(model, "topk", 6, 1.5).targets({"input_ids": ids, "attention_mask": mask}, "cpu")
    keep = mask.bool()
    assert torch.equal(shard.index, online["target_index"][keep])
    assert torch.equal(shard.logprobs, online["target_logprobs"][keep])

    ref = torch.cat([_dense_logprobs(model, s, 1.5) for s in seqs])        # and both are the model's own
    torch.testing.assert_close(shard.logprobs.double(), ref.gather(-1, shard.index.long()), rtol=1e-5, atol=1e-5)
    if wrap is not None:                              # the decoder's last_hidden_state would have given others
        with torch.no_grad():
            h = model.model(input_ids=torch.tensor([seqs[0]])).last_hidden_state[0]
        naive = dk.teacher_topk(h, model.lm_head.weight, 6, temperature=1.5)
        assert not torch.allclose(naive.logprobs, shard.logprobs[:len(seqs[0])], atol=1e-3)


# --------------------------------------------------------------------------- a teacher with a low-rank lm_head


def _low_rank_teacher(kind):
    """A float64 teacher whose lm_head output is not its base weight's: a PEFT LoRA on the lm_head
    (B not zero), a style head (B not zero) or PEFT's modules_to_save copy (changed); with its
    plain merged copy and the base model."""
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_SMALL)).double().eval()
    with torch.no_grad():
        base.lm_head.weight.mul_(30.0)
    model = copy.deepcopy(base)
    if kind == "style":
        dk.hf.add_style_head(model, rank=4, alpha=8)
        with torch.no_grad():
            dk.hf.get_style_head(model).lora_B.normal_(0, 2.0, generator=torch.Generator().manual_seed(7))
        merged = copy.deepcopy(model)
        dk.hf.remove_style_head(merged, merge=True)
        return model, merged, base
    peft = pytest.importorskip("peft")
    if kind == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"],
                                                           init_lora_weights=False))
        with torch.no_grad():
            model.base_model.model.lm_head.lora_B["default"].weight.mul_(20.0)
    else:
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
        with torch.no_grad():
            copy_ = model.base_model.model.lm_head.modules_to_save["default"]
            copy_.weight.add_(torch.randn(copy_.weight.shape, generator=torch.Generator().manual_seed(3),
                                          dtype=copy_.weight.dtype))
    return model.eval(), copy.deepcopy(model).merge_and_unload(), base


_SEQS = [list(range(5, 17)), list(range(40, 47)), [3, 1, 4, 1, 5, 9, 2, 6]]


def _shard(model, out, **kw):
    dkt.build(model, [_SEQS], 6, 1.5, out_dir=out, dtype=torch.float32, progress=False, teacher_name="t", **kw)
    return dk.SparseTargets.load(out / "shard-00000.safetensors")


@pytest.mark.parametrize("kind", ["lora", "style", "modules_to_save"])
@pytest.mark.parametrize("samples", [0, 3], ids=["topk", "hybrid"])
def test_build_with_a_low_rank_teacher_head_equals_the_merged_teacher(tmp_path, kind, samples):
    """targets build reads the teacher's head as the patch does: the targets of a LoRA'd /
    style-head / modules_to_save teacher are the merged model's (and its own logits'), not its
    base head's."""
    model, merged, base = _low_rank_teacher(kind)
    kw = dict(samples=samples, seed=4) if samples else {}
    got, want, plain = (_shard(m, tmp_path / name, **kw) for m, name in ((model, "a"), (merged, "m"), (base, "b")))
    assert torch.equal(got.index, want.index)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=1e-6, atol=1e-6)
    assert not torch.equal(got.index, plain.index)                       # the adapter matters
    ref = torch.cat([_dense_logprobs(model, s, 1.5) for s in _SEQS])     # the model's own logits (top-k slots)
    torch.testing.assert_close(got.logprobs[:, :6].double(), ref.gather(-1, got.index[:, :6].long()),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["lora", "style"])
def test_the_teacher_fingerprint_follows_its_adapter(tmp_path, kind):
    """A resume refuses a teacher whose adapter changed since: its weights (A / B are state-dict
    tensors), and for PEFT its scaling or whether it is enabled (not in the state dict)."""
    model, _, _ = _low_rank_teacher(kind)
    _shard(model, tmp_path)
    _shard(model, tmp_path)                                              # the same teacher resumes
    head = model.get_output_embeddings()
    B = head.lora_B if kind == "style" else head.lora_B["default"].weight
    saved = B.detach().clone()
    with torch.no_grad():
        B.add_(0.01)
    with pytest.raises(ValueError, match="built with another teacher: the teacher's weights changed"):
        _shard(model, tmp_path)
    with torch.no_grad():
        B.copy_(saved)
    if kind == "lora":
        head.scaling["default"] *= 2
        with pytest.raises(ValueError, match="the teacher's weights changed"):
            _shard(model, tmp_path)
        head.scaling["default"] /= 2
        with model.disable_adapter(), pytest.raises(ValueError, match="the teacher's weights changed"):
            _shard(model, tmp_path)
    _shard(model, tmp_path)


class _QuantisedLinear(torch.nn.Linear):
    """A stand-in for bitsandbytes' 8-bit layer (not installed here): what resolve_head looks at."""

    def forward(self, x):
        return super().forward(x)


_QuantisedLinear.__module__ = "bitsandbytes.nn.modules"


def test_build_refuses_a_teacher_head_it_cannot_read(tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_SMALL))
    q = _QuantisedLinear(model.config.hidden_size, V, bias=False)
    q.weight = model.lm_head.weight
    model.lm_head = q
    with pytest.raises(ValueError, match=r"targets build: the teacher's output embeddings are a quantised layer "
                                         r"\(bitsandbytes\.nn\.modules\._QuantisedLinear\).*cannot compute this head."
                                         r" Fix: .*llm_int8_skip_modules"):
        _shard(model, tmp_path)
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- one resume protocol


def _two_builds(tmp_path, teacher):
    examples = _examples(7, seed=5)
    kw = dict(shard_size=3, progress=False)
    dkt.build(teacher, _batches(examples), 4, out_dir=tmp_path / "a", **kw)
    dkt.build(teacher, _batches(examples), 6, out_dir=tmp_path / "b", **kw)
    return [tmp_path / "a", tmp_path / "b"]


def test_blend_dirs_resumes_like_build(teacher, tmp_path, monkeypatch):
    """blend_dirs and build share one shard-directory writer: stale temp files are removed, a
    verified shard is kept, a corrupted one recomputed, a crash leaves a resumable directory
    and other settings in the same out_dir are refused naming the key."""
    from dft_kernels.targets.blending import blend_dirs
    srcs = _two_builds(tmp_path, teacher)
    ref = tmp_path / "ref"
    blend_dirs(srcs, [0.6, 0.4], out_dir=ref, progress=False)

    run = tmp_path / "run"
    run.mkdir()
    (run / (store._TMP_PREFIX + "shard-00000.safetensors.x")).write_bytes(b"half a shard")
    real_write = store.write_shard
    written = []

    def crash_after_one(path, **kwargs):
        if written:
            raise KeyboardInterrupt("simulated crash")
        written.append(path.name)
        return real_write(path, **kwargs)

    monkeypatch.setattr(store, "write_shard", crash_after_one)
    with pytest.raises(KeyboardInterrupt):
        blend_dirs(srcs, [0.6, 0.4], out_dir=run, progress=False)
    monkeypatch.undo()
    assert sorted(_files(run)) == ["manifest.json", "shard-00000.safetensors"]      # the temp file is gone
    assert not json.loads((run / "manifest.json").read_text())["complete"]

    kept = (run / "shard-00000.safetensors").stat().st_ino
    path = run / "shard-00001.safetensors"
    path.write_bytes(b"not a shard")                      # a damaged shard fails verification: recomputed
    man = blend_dirs(srcs, [0.6, 0.4], out_dir=run, progress=False)
    assert man["complete"] and (run / "shard-00000.safetensors").stat().st_ino == kept
    assert _files(run) == _files(ref)

    with pytest.raises(ValueError, match=r"holds another blend built with k=6, this blend has k=5"):
        blend_dirs(srcs, [0.6, 0.4], out_dir=run, k=5, progress=False)
    with pytest.raises(ValueError, match="holds another blend built with teacher="):
        blend_dirs(srcs, [0.5, 0.5], out_dir=run, progress=False)
    assert _files(run) == _files(ref)                     # a refused run writes nothing


def test_writer_is_the_one_resume_protocol(tmp_path):
    """store.ShardDirWriter on its own: keep-or-write per shard, counts, manifest."""
    seqs = [torch.tensor([1, 2, 3]), torch.tensor([4])]
    expect = {"shard": 0, "first_sequence": 0, "n_sequences": 2, "n_positions": 4,
              "input_ids_sha256": dkt.input_ids_sha256(seqs)}
    calls = []

    def compute():
        calls.append(1)
        return torch.zeros(4, 2, dtype=torch.int32), torch.full((4, 2), -1.0, dtype=torch.float16), seqs, {}

    params = {"format": dkt.SHARD_FORMAT, "k": 2, "vocab_size": 8}
    w = store.ShardDirWriter(tmp_path, params, info={"name": "x"})
    assert w.shard(expect, compute) is True
    man = w.finish()
    assert man["complete"] and man["name"] == "x" and man["n_positions"] == 4 and len(calls) == 1
    w = store.ShardDirWriter(tmp_path, params, info={"name": "y"})     # free fields may change
    assert w.shard(expect, compute) is False and (w.written, w.kept) == (0, 1) and len(calls) == 1
    assert w.shard({**expect, "shard": 1}, compute) is True             # a shard not on disk yet
    assert dkt.read_manifest(tmp_path)["shards"][1]["file"] == "shard-00001.safetensors"
    with pytest.raises(ValueError, match="holds targets built with k=2, this build has k=3: use a new out_dir"):
        store.ShardDirWriter(tmp_path, {**params, "k": 3})

    def refuse(old):                                       # the caller's own check runs first, on the old manifest
        if old.get("k") == 2:
            raise ValueError("teacher was retrained")

    with pytest.raises(ValueError, match="teacher was retrained"):
        store.ShardDirWriter(tmp_path, {**params, "k": 3}, check=refuse)
