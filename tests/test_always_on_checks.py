"""Issue 23, items 4 and 9 (docs/design.md sec. 4 and 7): without targets the loss is
the accuracy term at weight 1; the cheap data checks run on every loss call, without a
host sync, whatever ``validate`` says."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import dft_kernels as dk
from dft_kernels import reference, validation

from ._problems import make_problem

V = 50

# --------------------------------------------------------------------------- 4. no targets: lam does not apply


def _fused(impl):
    return lambda h, w, i, p, y, **kw: dk.fused_linear_dft_loss(h, w, i, p, y, impl=impl, **kw)


def _fused_module(h, w, i, p, y, **kw):
    return dk.FusedLinearDFTLoss(impl="torch", **kw)(h, w, i, p, y)


def _logits_module(h, w, i, p, y, **kw):
    return dk.DFTLoss(impl="torch", **kw)(h @ w.T, i, p, y)


ENTRY_POINTS = [
    pytest.param(lambda h, w, i, p, y, **kw: dk.dft_loss(h @ w.T, i, p, y, impl="torch", **kw), id="dft_loss-torch"),
    pytest.param(lambda h, w, i, p, y, **kw: dk.dft_loss(h @ w.T, i, p, y, impl="triton", **kw), id="dft_loss-triton"),
    pytest.param(_fused("torch"), id="fused-torch"),
    pytest.param(_fused("triton"), id="fused-triton"),
    pytest.param(_fused("reference"), id="fused-impl-reference"),
    pytest.param(lambda h, w, i, p, y, **kw: reference.dft_loss(h @ w.T, i, p, y, **kw), id="reference.dft_loss"),
    pytest.param(lambda h, w, i, p, y, **kw: reference.fused_linear_dft_loss(h, w, i, p, y, **kw),
                 id="reference.fused"),
    pytest.param(_logits_module, id="DFTLoss"),
    pytest.param(_fused_module, id="FusedLinearDFTLoss"),
]


def _student(N=12, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    y[3] = -100
    return h, w, y


@pytest.mark.parametrize("fn", ENTRY_POINTS)
@pytest.mark.parametrize("lam", [0.0, 0.2, 1.0])
def test_without_targets_the_loss_is_the_accuracy_term_at_weight_one(fn, lam):
    """Before: lam * CE (0 with lam = 0: a DFTTrainer without targets trained nothing)."""
    h, w, y = _student()
    got = fn(h, w, None, None, y, lam=lam)
    torch.testing.assert_close(got.float(), F.cross_entropy(h @ w.T, y), rtol=1e-5, atol=1e-6)
    dft = fn(h, w, None, None, y, lam=lam, accuracy="dft", reduction="sum")
    lq = torch.log_softmax(h @ w.T, -1)[y != -100].gather(1, y[y != -100, None]).squeeze(1)
    torch.testing.assert_close(dft.float(), -(lq.exp() * lq).sum(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "triton", "reference"])
def test_without_targets_lam_zero_still_has_gradients(impl):
    h, w, y = _student()
    h.requires_grad_()
    dk.fused_linear_dft_loss(h, w, None, None, y, lam=0.0, impl=impl).backward()
    assert h.grad.abs().sum() > 0


@pytest.mark.parametrize("fn", ENTRY_POINTS[:5] + ENTRY_POINTS[7:])
def test_targets_given_but_all_empty_still_use_lam(fn):
    """The targets exist (every slot empty): lam weighs the accuracy term as usual."""
    h, w, y = _student()
    idx = torch.full((12, 3), -1)
    lp = torch.full((12, 3), -math.inf)
    got = fn(h, w, idx, lp, y, lam=0.3)
    torch.testing.assert_close(got.float(), 0.3 * F.cross_entropy(h @ w.T, y), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- 9. always-on data checks


def _targets(N=12, K=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    lp, idx = torch.randn(N, V, generator=g).mul(3).log_softmax(-1).topk(K, -1)
    idx[0, -1], lp[0, -1] = -1, float("nan")          # an empty slot: its value is never read
    idx[1, :], lp[1, :] = -1, -math.inf                # a row without a slot
    return idx, lp


def _bad(case, idx, lp, y):
    idx, lp, y = idx.clone(), lp.clone(), y.clone()
    if case == "id>=V":
        idx[2, 0] = V
    elif case == "id<-1":
        idx[2, 0] = -2
    elif case == "nan":
        lp[2, 1] = float("nan")
    elif case == "logits":
        lp = torch.randn(lp.shape) * 5 + 3
    elif case == "probabilities":
        lp = lp.exp()
    elif case == "mass>1":
        lp = torch.where(idx >= 0, torch.full_like(lp, -0.5), lp)
    elif case == "label>=V":
        y[5] = V
    elif case == "label<0":
        y[5] = -1
    return idx, lp, y


BAD_CASES = [
    pytest.param("id>=V", "id 50 >= the student's vocab size 50.*teacher's vocab larger", id="id>=V"),
    pytest.param("id<-1", "id -2 < -1", id="id<-1"),
    pytest.param("nan", "target_logprobs holds NaN.*mark the slot empty", id="nan-on-a-used-slot"),
    pytest.param("logits", "positive values.*log_softmax", id="logits"),
    pytest.param("probabilities", "positive values.*probabilities", id="probabilities"),
    pytest.param("mass>1", "sum to .* > 1 \\+ 1e-3", id="mass>1"),
    pytest.param("label>=V", "labels hold ids outside \\[0, 50\\).*max 50", id="label>=V"),
    pytest.param("label<0", "labels hold ids outside \\[0, 50\\).*min -1", id="label<0"),
]


@pytest.mark.parametrize("fn", [p for p in ENTRY_POINTS if not p.id.startswith("reference.")])
@pytest.mark.parametrize("case, match", BAD_CASES)
def test_bad_data_raises_without_validate(fn, case, match):
    """Before: NaN gave a finite loss, ids / labels >= V were dropped, positive log-probs
    and mass > 1 passed -- silently, unless validate=True."""
    h, w, y = _student()
    idx, lp, y = _bad(case, *_targets(), y)
    with pytest.raises(ValueError, match=match):
        fn(h, w, idx, lp, y)


def test_good_data_passes_and_the_switch_turns_the_checks_off(monkeypatch):
    h, w, y = _student()
    idx, lp = _targets()
    assert torch.isfinite(dk.fused_linear_dft_loss(h, w, idx, lp, y, impl="torch"))
    bad_idx, _, bad_y = _bad("id>=V", idx, lp, y)
    bad_idx[3, 0], bad_y[6] = 10**9, V + 7
    monkeypatch.setattr(validation, "_ALWAYS_ON", False)      # benchmarks only: nothing reads out of bounds
    for impl in ("torch", "triton"):
        assert torch.isfinite(dk.fused_linear_dft_loss(h, w, bad_idx, lp, bad_y, impl=impl))
        assert torch.isfinite(dk.dft_loss(h @ w.T, bad_idx, lp, bad_y, impl=impl))


def test_bf16_targets_that_sum_to_one_pass():
    """The mass bound allows the storage rounding of 16-bit log-probs (as validate=True)."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(64, V, generator=g) * 2
    lp, idx = z.log_softmax(-1).topk(V, -1)
    h, w, y = _student(N=64)
    dk.fused_linear_dft_loss(h, w, idx, lp.bfloat16(), y, impl="torch")
    dk.dft_loss(z.bfloat16(), idx, lp.bfloat16(), y, impl="torch")


class _FakeEvent:
    def __init__(self):
        self.done = False

    def query(self):
        return self.done

    def synchronize(self):
        self.done = True


def test_deferred_flags_raise_once_the_copy_has_landed(monkeypatch):
    """The CUDA route without a GPU: pending flags are read only when their event is done
    (at the next check or at flush_checks), and each is reported once."""
    monkeypatch.setattr(validation, "_PENDING", [])
    ev = _FakeEvent()
    validation._PENDING.append((ev, torch.tensor([False, True]), lambda v: f"check {v.index(True)} failed", "cuda:0"))
    validation.pending_checks(block=False)                 # copy not landed yet: nothing to say
    validation.raise_when(torch.tensor([False]), lambda v: "never")
    assert len(validation._PENDING) == 1
    with pytest.raises(ValueError, match="a recent loss call on cuda:0 .*check 1 failed.*validate=True"):
        validation.flush_checks()
    assert not validation._PENDING
    validation.flush_checks()                              # reported once


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_checks_raise_at_the_next_call_or_flush():
    h, w, y = (t.cuda() for t in _student())
    idx, lp, y = (t.cuda() for t in _bad("probabilities", *_targets(), y))
    try:
        dk.fused_linear_dft_loss(h, w, idx, lp, y)
    except ValueError:
        pytest.fail("the CUDA check must not sync in the call")
    with pytest.raises(ValueError, match="positive values"):
        validation.flush_checks()


# --------------------------------------------------------------------------- from_logits


@pytest.mark.parametrize("make, match", [
    pytest.param(lambda z: z.index_fill(1, torch.tensor([3]), float("nan")), "logits hold NaN", id="nan"),
    pytest.param(lambda z: z.index_fill(1, torch.tensor([3]), float("inf")), "logits hold \\+inf", id="+inf"),
    pytest.param(lambda z: z.softmax(-1), "look like probabilities.*probs.log", id="probabilities"),
])
def test_from_logits_refuses_nan_and_probabilities(make, match):
    """Before: NaN logits and softmax outputs gave targets without a word."""
    z = torch.randn(6, V, generator=torch.Generator().manual_seed(3)) * 2
    with pytest.raises(ValueError, match=match):
        dk.SparseTargets.from_logits(make(z), 4)
    dk.SparseTargets.from_logits(z, 4).validate(V)                 # logits
    dk.SparseTargets.from_logits(z.log_softmax(-1), 4).validate(V)  # log-probs: the same targets
    dk.SparseTargets.from_logits(z.masked_fill(z < 0, -math.inf), 4)  # masked vocab: -inf is fine


# --------------------------------------------------------------------------- the patched model, every batch


def test_patched_model_checks_every_batch():
    """Before: only the first batch was checked; a later batch of probabilities gave loss 117."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32)
    torch.manual_seed(1)
    model = dk.hf.patch(transformers.LlamaForCausalLM(cfg))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (2, 9), generator=g)
    lp, ti = torch.randn(2, 9, 64, generator=g).log_softmax(-1).topk(4, -1)
    model(input_ids=ids, labels=ids, target_index=ti, target_logprobs=lp)           # first batch: fine
    with pytest.raises(ValueError, match="positive values"):
        model(input_ids=ids, labels=ids, target_index=ti, target_logprobs=lp.exp())
    bad = ti.clone()
    bad[1, 2, 0] = 70
    with pytest.raises(ValueError, match="vocab size 64"):
        model(input_ids=ids, labels=ids, target_index=bad, target_logprobs=lp)
    model.eval()
    with pytest.raises(ValueError, match="vocab size 64"):                       # the logits path too
        model(input_ids=ids, labels=ids, target_index=bad, target_logprobs=lp)


# --------------------------------------------------------------------------- DFTTrainer


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _rows(n=8, T=10, K=4, targets="real", Vs=64):
    g = torch.Generator().manual_seed(4)
    out = []
    for _ in range(n):
        ids = torch.randint(0, Vs, (T,), generator=g)
        row = dict(input_ids=ids, attention_mask=torch.ones(T, dtype=torch.long), labels=ids)
        if targets == "empty":
            row["target_index"] = torch.full((T, K), -1, dtype=torch.int32)
            row["target_logprobs"] = torch.full((T, K), -math.inf)
        out.append(row)
    return out


def _trainer(tmp_path, rows, lam, steps=2):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from dft_kernels.hf import DFTConfig, DFTTrainer
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32)
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(cfg)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=steps,
                                          learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True,
                                          disable_tqdm=True, save_strategy="no", seed=0)
    return DFTTrainer(model=model, args=args, train_dataset=_Rows(rows), dft_config=DFTConfig(lam=lam))


def test_trainer_lam_zero_without_targets_trains_on_the_labels(tmp_path):
    """Before: loss 0.0 logged every step, weights unchanged."""
    trainer = _trainer(tmp_path, _rows(targets=None), lam=0.0)
    before = trainer.model.lm_head.weight.detach().clone()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(x > 1.0 for x in losses)
    assert not torch.equal(before, trainer.model.lm_head.weight.detach())


def test_trainer_lam_zero_with_only_empty_targets_raises(tmp_path):
    trainer = _trainer(tmp_path, _rows(targets="empty"), lam=0.0)
    with pytest.raises(ValueError, match="lam=0 and no counted position.*trains nothing"):
        trainer.train()


def test_trainer_step_whose_loss_has_no_grad_raises(tmp_path):
    trainer = _trainer(tmp_path, _rows(targets=None), lam=0.2)
    model = trainer.model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    batch = trainer.data_collator(_rows(n=2, targets=None))
    with pytest.raises(ValueError, match="does not depend on the model's parameters"):
        trainer.compute_loss(model, batch)
