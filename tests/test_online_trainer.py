"""DFTTrainer with a live teacher (docs/design.md sec. 11)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import dft_kernels as dk  # noqa: E402
from dft_kernels.hf import DFTConfig, DFTTrainer  # noqa: E402

V = 67


def _llama(seed, hidden):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    return transformers.LlamaForCausalLM(cfg)


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (2, 11), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _trainer(tmp_path, mode, teacher):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, report_to=[],
                                          use_cpu=True, max_steps=1)
    return DFTTrainer(model=_llama(1, 16), args=args, teacher_model=teacher,
                      dft_config=DFTConfig(teacher=mode, k=5, lam=0.2, temperature=1.5, impl="torch"))


def test_online_topk_equals_offline_targets(tmp_path):
    teacher = _llama(0, 24)
    trainer = _trainer(tmp_path, "topk", teacher)
    batch = _batch()
    online = trainer.compute_loss(trainer.model, dict(batch))
    with torch.no_grad():
        h = teacher.model(input_ids=batch["input_ids"]).last_hidden_state
    t = dk.teacher_topk(h, teacher.lm_head.weight, 5, temperature=1.5)
    offline = trainer.compute_loss(trainer.model, {**batch, "target_index": t.index, "target_logprobs": t.logprobs})
    assert torch.allclose(online, offline, atol=1e-6) and online.item() > 0


def test_online_dense_equals_the_loss_on_captured_states(tmp_path):
    teacher = _llama(0, 24)
    trainer = _trainer(tmp_path, "dense", teacher)
    batch = _batch()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    assert not any(p.grad is not None for p in teacher.parameters())
    assert trainer.model.lm_head.weight.grad is not None
    with torch.no_grad():
        ht = teacher.model(input_ids=batch["input_ids"]).last_hidden_state
    hs = trainer.model.model(input_ids=batch["input_ids"]).last_hidden_state
    shifted = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
    ref = dk.fused_linear_distill_loss(hs, trainer.model.lm_head.weight, ht, teacher.lm_head.weight, shifted,
                                       temperature=1.5, lam=0.2, impl="reference")
    assert torch.allclose(loss, ref, atol=1e-5)


def test_teacher_without_mode_is_an_error(tmp_path):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="teacher_model"):
        DFTTrainer(model=_llama(1, 16), args=args, teacher_model=_llama(0, 24), dft_config=DFTConfig())
