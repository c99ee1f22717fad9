"""Hugging Face integration: what would otherwise train on the wrong thing without a word
(issue 23) -- an lm_head the online teacher cannot read (quantised), the student as its own
teacher, teacher and student of different vocab sizes, left padding, offline targets built at
another temperature than the loss's. (A low-rank lm_head -- PEFT LoRA, style head -- on the
teacher or the student is computed: tests/test_online_trainer.py.)"""
import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import dft_kernels as dk  # noqa: E402
from dft_kernels.hf import DFTConfig, DFTDataCollator, DFTTrainer  # noqa: E402

V = 67
OPTS = dict(k=5, lam=0.3, temperature=1.5, impl="torch")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _llama(seed, hidden=16, vocab=V):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    return transformers.LlamaForCausalLM(cfg)


def _args(tmp_path):
    return transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no",
                                          disable_tqdm=True, max_steps=1)


def _rows(n=3, seed=5):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(3, V, (4 + 3 * i,), generator=g)
        labels = ids.clone()
        labels[:2] = -100                                         # a prompt
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _lora(model, **kw):
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **kw))


# --------------------------------------------------------------------------- LoRA on an lm_head


class Linear8bitLt(torch.nn.Linear):
    """A stand-in for bitsandbytes' 8-bit layer (not installed here): its own forward, its class
    in a bitsandbytes module -- what lm_head.resolve_head looks at."""

    def forward(self, x):
        return super().forward(x)


Linear8bitLt.__module__ = "bitsandbytes.nn.modules"


def _quantised_head(model):
    q = Linear8bitLt(model.config.hidden_size, model.config.vocab_size, bias=False)
    q.weight = model.lm_head.weight
    model.lm_head = q
    return model


def test_dense_mode_refuses_a_student_lm_head_it_cannot_read(tmp_path):
    """teacher='dense' projects with the head's weight (+ a low-rank correction): a quantised
    head cannot be computed that way (the patch's logits fallback does not apply to it)."""
    with pytest.raises(ValueError, match=r"the student's output embeddings 'lm_head' are a quantised layer "
                                         r"\(bitsandbytes\.nn\.modules\.Linear8bitLt\).*cannot compute this head.*"
                                         r"llm_int8_skip_modules"):
        DFTTrainer(model=_quantised_head(_llama(1)), args=_args(tmp_path), teacher_model=_llama(0, 24),
                   dft_config=DFTConfig(teacher="dense", **OPTS))


@pytest.mark.parametrize("mode", ["topk", "dense"])
def test_online_teacher_refuses_an_lm_head_it_cannot_read(tmp_path, mode):
    teacher = _quantised_head(_llama(0, 24))
    with pytest.raises(ValueError, match=r"teacher_model's output embeddings 'lm_head' are a quantised layer "
                                         rf".*teacher='{mode}'.*cannot compute this head.*llm_int8_skip_modules"):
        DFTTrainer(model=_llama(1), args=_args(tmp_path), teacher_model=teacher,
                   dft_config=DFTConfig(teacher=mode, **OPTS))
    assert all(p.requires_grad for p in teacher.parameters())        # refused before the teacher froze it


@pytest.mark.parametrize("mode", ["offline", "topk"])
def test_lora_on_the_lm_head_uses_the_adapter_offline_and_topk(tmp_path, mode):
    """dk.hf.patch of a student whose lm_head is a LoRA layer computes the loss with the adapter
    (fused: lora_A / lora_B go to the loss): loss and adapter gradients equal the unpatched model's."""
    student = _lora(_llama(1).double(), target_modules=["lm_head", "q_proj"], init_lora_weights=False)
    ref = copy.deepcopy(student)
    teacher = _llama(0, 24).double()
    batch = DFTDataCollator(pad_token_id=0)(_rows())
    with torch.no_grad():
        lt = teacher(input_ids=batch["input_ids"]).logits
    t = dk.SparseTargets.from_logits(lt, OPTS["k"], OPTS["temperature"], dtype=torch.float64)
    cfg = DFTConfig(teacher=mode, **OPTS)
    tr = DFTTrainer(model=student, args=_args(tmp_path), dft_config=cfg,
                    teacher_model=teacher if mode == "topk" else None)
    inputs = dict(batch) if mode == "topk" else {**batch, "target_index": t.index, "target_logprobs": t.logprobs}
    student.train()
    loss = tr.compute_loss(tr.model, inputs)
    loss.backward()
    shifted = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
    expected = dk.reference.dft_loss(ref(input_ids=batch["input_ids"]).logits, t.index, t.logprobs.to(torch.float32)
                                     .double() if mode == "topk" else t.logprobs, shifted, lam=OPTS["lam"],
                                     temperature=OPTS["temperature"])
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-9)
    grads = dict(ref.named_parameters())
    head_lora = [n for n, p in student.named_parameters() if p.requires_grad and "lm_head" in n]
    assert head_lora
    for n, p in student.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().max() > 0, n
            torch.testing.assert_close(p.grad, grads[n].grad, rtol=1e-5, atol=1e-9)


# --------------------------------------------------------------------------- teacher vs student


def test_the_student_as_its_own_teacher_is_refused(tmp_path):
    m = _llama(1)
    with pytest.raises(ValueError, match="teacher_model is the student model itself.*separate teacher"):
        DFTTrainer(model=m, args=_args(tmp_path), teacher_model=m, dft_config=DFTConfig(teacher="topk", **OPTS))
    assert all(p.requires_grad for p in m.parameters())           # refused before the teacher froze it
    base = _llama(2)
    student = _lora(base, target_modules=["q_proj"])              # wraps base in place
    with pytest.raises(ValueError, match="teacher_model (is the student model itself|shares .* parameter)"):
        DFTTrainer(model=student, args=_args(tmp_path), teacher_model=base,
                   dft_config=DFTConfig(teacher="dense", **OPTS))


@pytest.mark.parametrize("mode", ["topk", "dense"])
@pytest.mark.parametrize("teacher_vocab", [V - 7, V + 5], ids=["smaller", "larger"])
def test_teacher_of_another_vocab_size_is_refused(tmp_path, mode, teacher_vocab):
    with pytest.raises(ValueError, match=rf"teacher_model has a vocab of {teacher_vocab} .* the student {V}"):
        DFTTrainer(model=_llama(1), args=_args(tmp_path), teacher_model=_llama(0, 24, vocab=teacher_vocab),
                   dft_config=DFTConfig(teacher=mode, **OPTS))


# --------------------------------------------------------------------------- left padding


def _targets_rows():
    rows = _rows(4)
    teacher = _llama(0, 24)
    for r in rows:
        with torch.no_grad():
            lt = teacher(input_ids=r["input_ids"][None]).logits[0]
        t = dk.SparseTargets.from_logits(lt, OPTS["k"])
        r["target_index"], r["target_logprobs"] = t.index, t.logprobs
    return rows


def _patched_loss(model, batch):
    model.train()
    out = model(**batch)
    return out.loss, int(out.loss_components.n_tokens)


def test_left_and_right_padding_count_the_same_rows():
    """The last pad before a left-padded sequence would be scored against its first token (one extra
    row per sequence): collator and patched model count the same positions on either side."""
    rows = _targets_rows()
    model = dk.hf.patch(_llama(1), lam=OPTS["lam"], impl="torch")
    right = DFTDataCollator(pad_token_id=0)(rows)
    left = DFTDataCollator(pad_token_id=0, padding_side="left")(rows)
    loss_r, n_r = _patched_loss(model, right)
    loss_l, n_l = _patched_loss(model, left)
    assert n_r == sum(int((r["labels"][1:] != -100).sum()) for r in rows)
    assert n_l == n_r
    torch.testing.assert_close(loss_l, loss_r, rtol=1e-5, atol=1e-6)     # RoPE: a uniform shift changes nothing
    # what the Trainer counts for num_items_in_batch (labels[..., 1:]) agrees as well
    assert int((left["labels"][:, 1:] != -100).sum()) == int((right["labels"][:, 1:] != -100).sum())

    # a batch padded elsewhere (labels = input_ids, -100 on pads): the patched model, given the mask
    hf_left = {**left, "labels": torch.where(left["attention_mask"] == 1, left["input_ids"], -100)}
    hf_right = {**right, "labels": torch.where(right["attention_mask"] == 1, right["input_ids"], -100)}
    loss_l, n_l = _patched_loss(model, hf_left)
    loss_r, n_r = _patched_loss(model, hf_right)
    assert n_l == n_r
    torch.testing.assert_close(loss_l, loss_r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["topk", "dense"])
def test_online_left_padding_counts_the_same_rows(tmp_path, mode):
    tr = DFTTrainer(model=_llama(1), args=_args(tmp_path), teacher_model=_llama(0, 24),
                    dft_config=DFTConfig(teacher=mode, **OPTS))
    rows = [{"input_ids": r["input_ids"]} for r in _rows(4)]
    out = []
    for side in ("right", "left"):
        batch = DFTDataCollator(pad_token_id=0, padding_side=side)(rows)
        batch["labels"] = torch.where(batch["attention_mask"] == 1, batch["input_ids"], -100)   # not the collator's
        tr.model.train()
        out.append(tr.compute_loss(tr.model, batch))
    torch.testing.assert_close(out[1], out[0], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- temperatures


def test_offline_targets_built_at_another_temperature_warn_once(tmp_path):
    from dft_kernels import targets as T
    from dft_kernels.data import DFTTargetsDataset
    examples = [{"input_ids": r["input_ids"].tolist()} for r in _rows()]
    T.build(_llama(0, 24), [examples], 4, 1.0, out_dir=tmp_path / "t1", shard_size=2, progress=False)
    ds = DFTTargetsDataset(examples, tmp_path / "t1", vocab_size=V)
    with pytest.warns(UserWarning, match=r"built at temperature 1 \(the teacher's\).*DFTConfig\(temperature=2\) "
                                         r"\(the student's\).*p_teacher \*\* \(2 / 1\).*--temperature 2") as rec:
        DFTTrainer(model=_llama(1), args=_args(tmp_path), train_dataset=ds, eval_dataset={"a": ds, "b": ds},
                   dft_config=DFTConfig(temperature=2.0, impl="torch"))
    assert sum("built at temperature" in str(w.message) for w in rec) == 1
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*built at temperature")
        DFTTrainer(model=_llama(1), args=_args(tmp_path), train_dataset=ds,
                   dft_config=DFTConfig(temperature=1.0, impl="torch"))
