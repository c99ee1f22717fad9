"""Nothing silently wrong: each case below would otherwise train on the wrong thing
without a word (docs/design.md sec. 7)."""
import json
import os
import re
import shutil
import struct
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import dft_kernels as dk  # noqa: E402
from dft_kernels import targets as T  # noqa: E402
from dft_kernels.cli import main  # noqa: E402
from dft_kernels.data import DFTTargetsDataset  # noqa: E402
from dft_kernels.hf import DFTConfig, DFTDataCollator  # noqa: E402
from dft_kernels.targets import store  # noqa: E402

V = 300


def _llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                   intermediate_size=64)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    return model


def _tokenizer(shift=0):
    vocab = {f"w{(i + shift) % (V - 1)}": i for i in range(V - 1)}
    vocab["[UNK]"] = V - 1
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher16") / "teacher"
    _llama().save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


def _examples(n=7, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, V, (int(torch.randint(2, 12, (1,), generator=g)),),
                                        generator=g).tolist()} for _ in range(n)]


def _build(teacher, out, examples=None, **kw):
    kw.setdefault("progress", False)
    return T.build(teacher, [examples or _examples()], 4, out_dir=out, shard_size=4, **kw)


# --------------------------------------------------------------------------- 1. retrained teacher


def test_resume_refuses_a_retrained_teacher_and_names_what_changed(teacher_dir, tmp_path):
    man = _build(str(teacher_dir), tmp_path)          # tokenizer found in the teacher's directory
    assert len(man["teacher_fingerprint"]) == 64 and len(man["tokenizer_fingerprint"]) == 64
    teacher = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir)
    assert man["teacher_fingerprint"] == T.fingerprint_model(teacher)
    assert man["tokenizer_fingerprint"] == T.fingerprint_tokenizer(_tokenizer())
    _build(teacher, tmp_path, teacher_name=str(teacher_dir), tokenizer=_tokenizer())    # same: resumes
    with torch.no_grad():
        teacher.model.norm.weight.add_(0.01)                                            # "retrained in place"
    with pytest.raises(ValueError, match=r"teacher's weights changed"):
        _build(teacher, tmp_path, teacher_name=str(teacher_dir), tokenizer=_tokenizer())
    with torch.no_grad():
        teacher.model.norm.weight.sub_(0.01)
    eps = teacher.config.rms_norm_eps
    teacher.config.rms_norm_eps = eps * 2
    with pytest.raises(ValueError, match=r"teacher's config changed"):
        _build(teacher, tmp_path, teacher_name=str(teacher_dir), tokenizer=_tokenizer())
    teacher.config.rms_norm_eps = eps
    with pytest.raises(ValueError, match=r"the tokenizer changed"):
        _build(teacher, tmp_path, teacher_name=str(teacher_dir), tokenizer=_tokenizer(shift=1))


# --------------------------------------------------------------------------- 3. / 5. data and vocab


@pytest.fixture(scope="module")
def built(teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("built16")
    _build(str(teacher_dir), out)
    return out


def _rewrite_shard(src, dst, fn):
    """Copy the build ``src`` to ``dst`` with shard 0's log-probs replaced by fn(logprobs)."""
    shutil.copytree(src, dst)
    path = dst / T.shard_name(0)
    tensors, meta = T.read_shard(path)
    seqs = list(torch.split(tensors["input_ids"], tensors["lengths"].tolist()))
    store.write_shard(path, index=tensors["index"], logprobs=fn(tensors["logprobs"]), seqs=seqs, meta=meta)
    return dst


@pytest.mark.parametrize("fn, match", [
    pytest.param(lambda lp: lp.float().exp(), "positive values", id="probabilities"),
    pytest.param(lambda lp: lp * -3.0, "positive values", id="logits"),
    pytest.param(lambda lp: (lp.float() + 2.0).clamp(max=0.0), r"sum to .* > 1", id="mass-above-one"),
])
def test_dataset_items_that_are_not_logprobs_raise(built, tmp_path, fn, match):
    ds = DFTTargetsDataset(_examples(), _rewrite_shard(built, tmp_path / "t", fn), vocab_size=V)
    with pytest.raises(ValueError, match=f"example 0 .*{match}"):
        ds[0]
    assert ds[5]["target_logprobs"].max() <= 0          # shard 1 is untouched


def test_collator_rejects_logits_and_probabilities():
    ids = torch.arange(5)
    ti = torch.arange(15, dtype=torch.int32).reshape(5, 3)
    lp = torch.log_softmax(torch.randn(5, 3, dtype=torch.float64), -1).float() - 1.0
    DFTDataCollator()([{"input_ids": ids, "target_index": ti, "target_logprobs": lp}])
    for bad in (lp.exp(), lp + 5.0):
        with pytest.raises(ValueError, match="feature 0: .*positive"):
            DFTDataCollator()([{"input_ids": ids, "target_index": ti, "target_logprobs": bad}])


def test_dataset_refuses_a_larger_teacher_vocab_and_another_tokenizer(built):
    with pytest.raises(ValueError, match=f"vocab_size={V}, the student has vocab_size=200"):
        DFTTargetsDataset(_examples(), built, vocab_size=200)
    DFTTargetsDataset(_examples(), built, vocab_size=V, tokenizer=_tokenizer())
    with pytest.raises(ValueError, match="tokenizer differs"):
        DFTTargetsDataset(_examples(), built, vocab_size=V, tokenizer=_tokenizer(shift=2))


# --------------------------------------------------------------------------- 3. / 4. first batch in the model


def _aligned_batch(B=3, T_=12, K=4, Vs=64, seed=0):
    """Targets whose top slot is the next token (a teacher that knows the data)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, Vs, (B, T_), generator=g)
    ti = torch.randint(0, Vs, (B, T_, K), generator=g)
    ti[:, :-1, 0] = ids[:, 1:]
    lp = torch.log(torch.tensor([0.7, 0.1, 0.1, 0.05])).expand(B, T_, K).clone()
    return ids, ti, lp


def _student(Vs=64):
    cfg = transformers.LlamaConfig(vocab_size=Vs, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32)
    torch.manual_seed(1)
    return dk.hf.patch(transformers.LlamaForCausalLM(cfg))


@pytest.mark.parametrize("offset", [pytest.param(-1, id="minus-one"), pytest.param(1, id="plus-one")])
def test_first_batch_warns_on_shifted_targets(offset):
    ids, ti, lp = _aligned_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _student()(input_ids=ids, labels=ids, target_index=ti, target_logprobs=lp)      # aligned: silent
    with pytest.warns(UserWarning, match=re.escape(f"reads row t{offset:+d} of the targets") + ".*look shifted"):
        _student()(input_ids=ids, labels=ids, target_index=ti.roll(offset, 1), target_logprobs=lp)


def test_first_batch_warns_on_labels_shifted_twice_and_refuses_both_label_kinds():
    ids, ti, lp = _aligned_batch()
    pre = torch.nn.functional.pad(ids, (0, 1), value=-100)[..., 1:]
    with pytest.warns(UserWarning, match="labels look shifted already"):
        _student()(input_ids=ids, labels=pre, target_index=ti, target_logprobs=lp)
    with pytest.raises(ValueError, match="not both"):
        _student()(input_ids=ids, labels=ids, shift_labels=pre, target_index=ti, target_logprobs=lp)


@pytest.mark.parametrize("bad, match", [
    pytest.param("logits", "positive values", id="logits"),
    pytest.param("probs", "positive values", id="probabilities"),
    pytest.param("id", "id 5000 >= the student's vocab size 64", id="id-out-of-vocab"),
])
def test_first_batch_checks_target_data_without_validate(bad, match):
    ids, ti, lp = _aligned_batch()
    if bad == "logits":
        lp = torch.randn(lp.shape) * 5 + 3
    elif bad == "probs":
        lp = lp.exp()
    else:
        ti[1, 2, 3] = 5000
    model = _student()
    assert model.__dict__["_dft_kernels_patch"].loss_kwargs.get("validate", False) is False
    with pytest.raises(ValueError, match=match):
        model(input_ids=ids, labels=ids, target_index=ti, target_logprobs=lp)


def test_temperature_has_a_lower_bound():
    with pytest.raises(ValueError, match="temperature=1e-08 must be >= 0.01.*divergence term vanishes"):
        DFTConfig(temperature=1e-8)
    z = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="temperature"):
        dk.dft_loss(z, torch.zeros(2, 5, 2, dtype=torch.long), torch.full((2, 5, 2), -1.0), temperature=1e-8)
    DFTConfig(temperature=0.01)


# --------------------------------------------------------------------------- 7. store, inspect, CLI


def _flip_logprobs_byte(path):
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    start, end = json.loads(raw[8:8 + n])["logprobs"]["data_offsets"]
    raw[8 + n + (start + end) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def test_inspect_verifies_every_tensor(built, tmp_path):
    assert T.inspect(built)["n_positions"] > 0
    bad = tmp_path / "t"
    shutil.copytree(built, bad)
    _flip_logprobs_byte(bad / T.shard_name(1))
    with pytest.raises(ValueError, match="shard-00001.*index/logprobs do not match their sha256"):
        T.inspect(bad)


def test_a_shard_with_another_k_is_named_by_its_k(teacher_dir, built, tmp_path):
    other = tmp_path / "k6"
    T.build(str(teacher_dir), [_examples()], 6, out_dir=other, shard_size=4, progress=False)
    mixed = tmp_path / "mixed"
    shutil.copytree(built, mixed)
    shutil.copy(other / T.shard_name(0), mixed / T.shard_name(0))
    for call in (lambda: T.inspect(mixed), lambda: DFTTargetsDataset(_examples(), mixed, vocab_size=V)):
        with pytest.raises(ValueError, match="holds K=6 .* says k=4: it comes from another build"):
            call()


def test_a_sparse_targets_file_in_a_dataset_dir_says_what_is_missing(built, tmp_path):
    blended = tmp_path / "blend"
    shutil.copytree(built, blended)
    t = T.SparseTargets(torch.zeros(9, 4, dtype=torch.int32), torch.full((9, 4), -2.0))
    t.save(blended / T.shard_name(0))
    with pytest.raises(ValueError, match=r"not a build shard: it lacks the tensors \['input_ids', 'lengths'\]"):
        DFTTargetsDataset(_examples(), blended, vocab_size=V)


def test_build_says_what_it_computed_and_kept_and_follows_the_umask(teacher_dir, tmp_path, capsys):
    old = os.umask(0o027)
    try:
        _build(str(teacher_dir), tmp_path, progress=True)
    finally:
        os.umask(old)
    assert "2 shard(s) computed, 0 already on disk verified and kept" in capsys.readouterr().err
    assert (tmp_path / T.shard_name(0)).stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "manifest.json").stat().st_mode & 0o777 == 0o640
    _build(str(teacher_dir), tmp_path, progress=True)
    assert "0 shard(s) computed, 2 already on disk verified and kept" in capsys.readouterr().err


@pytest.mark.parametrize("lines, match", [
    pytest.param("", "no examples", id="empty-file"),
    pytest.param('{"text": "w1 w2", "input_ids": [1, 2]}\n', "both 'text' and 'input_ids'", id="text-and-ids"),
])
def test_cli_build_refuses_empty_data_and_ambiguous_lines(teacher_dir, tmp_path, capsys, lines, match):
    data = tmp_path / "d.jsonl"
    data.write_text(lines)
    rc = main(["targets", "build", "--teacher", str(teacher_dir), "--data", str(data), "--k", "4",
               "--out", str(tmp_path / "out"), "--quiet"])
    assert rc == 2 and match in capsys.readouterr().err
    with pytest.raises(ValueError, match="no sequences"):
        T.build(str(teacher_dir), [], 4, out_dir=tmp_path / "api", progress=False)


# --------------------------------------------------------------------------- 2. resume; TRL route


def _trainer_args(out, steps, **kw):
    return dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=steps, learning_rate=1e-2,
                logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=0, **kw)


def test_logged_components_after_resume_add_up_to_the_loss(tmp_path):
    pytest.importorskip("accelerate")
    from dft_kernels.hf import DFTTrainer
    from tests.test_hf import _TeacherData, tiny
    args = transformers.TrainingArguments(**_trainer_args(tmp_path, 4, save_strategy="steps", save_steps=4))
    DFTTrainer(model=tiny("gpt2_tied", seed=5, dtype=torch.float32), args=args, train_dataset=_TeacherData(n=16),
               dft_config=DFTConfig(lam=0.5)).train()
    args = transformers.TrainingArguments(**_trainer_args(tmp_path, 6, save_strategy="no"))
    trainer = DFTTrainer(model=tiny("gpt2_tied", seed=5, dtype=torch.float32), args=args,
                         train_dataset=_TeacherData(n=16), dft_config=DFTConfig(lam=0.5))
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    logs = [h for h in trainer.state.log_history if "loss" in h and h["step"] > 4]
    assert [h["step"] for h in logs] == [5, 6]
    for h in logs:    # before: the first one was divided by global_step = 5
        assert h["loss"] == pytest.approx(h["dft_divergence"] + 0.5 * h["dft_accuracy"], rel=1e-4, abs=1e-5)


def test_targets_dataset_into_trl_sft_trainer_without_loading_it(built):
    trl = pytest.importorskip("trl")
    pytest.importorskip("datasets")
    from dft_kernels.hf import DFTTrainerMixin

    class DFTSFTTrainer(DFTTrainerMixin, trl.SFTTrainer):
        pass

    class Counting(DFTTargetsDataset):
        reads = 0

        def __getitem__(self, i):
            Counting.reads += 1
            return super().__getitem__(i)

    ds = Counting(_examples(), built, vocab_size=V)
    hf = ds.as_hf_dataset()
    assert Counting.reads == 0 and type(hf).__name__ == "IterableDataset"     # nothing loaded up front
    first = next(iter(hf))
    assert Counting.reads == 1
    assert first["target_index"] == ds[0]["target_index"].tolist() and first["labels"] == ds[0]["labels"].tolist()
    args = trl.SFTConfig(**_trainer_args(built.parent / "trl", 2, save_strategy="no"),
                         dataset_kwargs={"skip_prepare_dataset": True})
    trainer = DFTSFTTrainer(model=_llama(seed=2), args=args, processing_class=_tokenizer(), train_dataset=hf,
                            dft_config=DFTConfig(lam=0.5))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(h["dft_divergence"] > 0 for h in logs)
