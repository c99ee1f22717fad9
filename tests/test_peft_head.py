"""The fused path through a PEFT-wrapped lm_head (docs/design.md sec. 17.2): a LoRA on the head
(its low-rank term goes to the loss as lora_A / lora_B, never as logits), PEFT's modules_to_save,
tied embeddings, the refusals (DoRA, several adapters), the quantised head that falls back with
one warning. Ground truth: the unpatched model's own logits through dft_kernels.reference."""
import copy
import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import dft_kernels as dk  # noqa: E402
from dft_kernels.lm_head import Fallback, HeadParts, resolve_head  # noqa: E402

from .test_hf import V, make_batch, reference_loss, tiny  # noqa: E402
from .test_style_head import ShapeRecorder, two_step_trainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

B, T = 3, 11
#: a few rows per chunk: the chunked paths never hold [B*T, V] either (the default chunk would
#: cover all 33 rows of these tiny batches at once)
SMALL_CHUNKS = dict(chunk_elems=4 * V, impl="torch")


def lora(model, targets=("lm_head", "q_proj"), **kw):
    kw = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "init_lora_weights": False, **kw}
    return peft.get_peft_model(model, peft.LoraConfig(target_modules=list(targets), **kw))


def trained(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def check_against_reference(model, ref, batch, *, rtol, atol, **patch_kw):
    dk.hf.patch(model, **patch_kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # the fused path: no fallback warning
        out = model(**batch)
    assert out.logits is None, "the fused path returns no logits"
    out.loss.backward()
    expected = reference_loss(ref, batch)
    expected.backward()
    torch.testing.assert_close(out.loss, expected.to(out.loss.dtype), rtol=rtol, atol=atol)
    ref_params = trained(ref)
    params = trained(model)
    assert params.keys() == ref_params.keys() and params
    for n, p in params.items():
        q = ref_params[n].grad
        assert p.grad is not None and q is not None and q.abs().max() > 0, n
        err = float((p.grad - q).abs().max() / q.abs().max())
        assert err < rtol * 10, f"{n}: relative gradient error {err:.3g}"
    return out


# --------------------------------------------------------------------------- LoRA on the lm_head


@pytest.mark.parametrize("family", ["llama", "gemma2_softcap", "phi_lm_head_bias", "cohere_logit_scale"])
def test_lora_head_fused_equals_logits(family):
    """Loss and the gradients of the head's A / B and of a decoder layer's LoRA equal the unpatched
    model's (float64: bitwise-level agreement), softcap, logit scale and an lm_head bias included."""
    targets = ("lm_head", "q_proj") if family != "phi_lm_head_bias" else ("lm_head", "q_proj", "dense")
    model = lora(tiny(family), targets)
    ref = copy.deepcopy(model)
    check_against_reference(model, ref, make_batch(), rtol=1e-7, atol=1e-9)
    assert any("lm_head.lora_A" in n for n in trained(model)) and any("q_proj.lora_B" in n for n in trained(model))


@pytest.mark.parametrize("strategy", ["lean", "fast"])
def test_lora_head_fp32_within_rounding(strategy):
    model = lora(tiny("llama", dtype=torch.float32))
    ref = copy.deepcopy(model)
    check_against_reference(model, ref, make_batch(), rtol=2e-5, atol=1e-6, strategy=strategy, **SMALL_CHUNKS)


@pytest.mark.parametrize("strategy", ["lean", "fast"])
def test_no_batch_by_vocab_tensor_is_ever_produced(strategy):
    model = lora(tiny("llama", dtype=torch.float32))
    dk.hf.patch(model, strategy=strategy, **SMALL_CHUNKS)
    batch = make_batch(B=B, T=T)
    with ShapeRecorder() as rec:
        loss = model(**batch).loss
        loss.backward()
    assert len(rec.shapes) > 100                       # it saw the whole forward and backward
    assert rec.vocab_sized(B * T) == []
    assert model.base_model.model.lm_head.lora_B["default"].weight.grad is not None
    # the recorder does see [B, T, V] logits when they exist: the logits path
    model.zero_grad()
    dk.hf.patch(model, skip_logits=False, **SMALL_CHUNKS)
    with ShapeRecorder() as rec:
        model(**batch).loss.backward()
    assert rec.vocab_sized(B * T)


def test_lora_dropout_trains_and_checks():
    """A head adapter with dropout: the first call's check runs with the dropout off (the model's
    own row is deterministic), training applies it (two calls differ), eval mode equals the reference."""
    model = lora(tiny("llama"), lora_dropout=0.3)
    ref = copy.deepcopy(model).eval()
    dk.hf.patch(model, skip_logits=True)
    batch = make_batch()
    a, b = model(**batch).loss, model(**batch).loss
    assert not torch.equal(a, b)
    a.backward()
    assert model.base_model.model.lm_head.lora_A["default"].weight.grad.abs().max() > 0
    assert model.base_model.model.lm_head.lora_dropout["default"].training     # restored after the check
    model.eval()
    torch.testing.assert_close(model(**batch).loss, reference_loss(ref, batch), rtol=1e-7, atol=1e-9)


def test_the_check_sees_the_low_rank_term(monkeypatch):
    """A fused path that dropped the adapter would be caught by the first call's check."""
    import importlib
    patch_mod = importlib.import_module("dft_kernels.hf.patch")
    model = lora(tiny("llama"), ("lm_head",))
    real = patch_mod.resolve_head

    def without_adapter(head):
        parts = real(head)
        return HeadParts(parts.weight, parts.bias, parts.what)

    monkeypatch.setattr(patch_mod, "resolve_head", without_adapter)
    dk.hf.patch(model)
    with pytest.raises(ValueError, match="does not reproduce .*lm_head: PEFT LoRA adapter 'default'"):
        model(**make_batch())


def test_dft_trainer_two_steps_with_a_lora_head(tmp_path):
    model = lora(tiny("llama", dtype=torch.float32))
    head_A = model.base_model.model.lm_head.lora_A["default"].weight
    before = head_A.detach().clone()
    tr = two_step_trainer(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)       # no fallback to the logits path
        tr.train()
    assert tr.state.global_step == 2
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert not torch.equal(before, head_A.detach())


# --------------------------------------------------------------------------- modules_to_save, tied, disabled


def test_modules_to_save_lm_head():
    model = peft.get_peft_model(tiny("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                               modules_to_save=["lm_head"], lora_dropout=0.0,
                                                               init_lora_weights=False))
    head = model.base_model.model.lm_head
    assert type(head).__name__ == "ModulesToSaveWrapper"
    with torch.no_grad():                                 # the trained copy differs from the original
        head.modules_to_save["default"].weight.mul_(1.5)
    ref = copy.deepcopy(model)
    check_against_reference(model, ref, make_batch(), rtol=1e-7, atol=1e-9)
    assert head.modules_to_save["default"].weight.grad is not None
    assert head.original_module.weight.grad is None
    assert "modules_to_save" in resolve_head(head).what


@pytest.mark.parametrize("kind", ["lora", "modules_to_save"])
def test_tied_embeddings(kind):
    base = tiny("llama", tie_word_embeddings=True)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    if kind == "lora":
        model = lora(base)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                              modules_to_save=["lm_head"], lora_dropout=0.0,
                                                              init_lora_weights=False))
    ref = copy.deepcopy(model)
    check_against_reference(model, ref, make_batch(), rtol=1e-7, atol=1e-9)


def test_disabled_and_merged_adapters_are_the_base_head():
    model = lora(tiny("llama"), ("lm_head",))
    head = model.base_model.model.lm_head
    with_adapter = reference_loss(copy.deepcopy(model), make_batch())
    plain = copy.deepcopy(model)
    with plain.disable_adapter():
        without = reference_loss(plain, make_batch())
    dk.hf.patch(model)
    with model.disable_adapter():
        parts = resolve_head(head)
        assert isinstance(parts, HeadParts) and not parts.has_lora
        out = model(**make_batch())
    assert out.logits is None
    torch.testing.assert_close(out.loss, without, rtol=1e-7, atol=1e-9)
    model.merge_adapter()                            # PEFT's forward: the base layer, which holds the adapter
    assert not resolve_head(head).has_lora
    out = model(**make_batch())
    assert out.logits is None
    torch.testing.assert_close(out.loss, with_adapter, rtol=1e-7, atol=1e-9)


# --------------------------------------------------------------------------- refusals


def test_dora_on_the_head_is_refused():
    model = lora(tiny("llama"), ("lm_head",), use_dora=True)
    with pytest.raises(ValueError, match=r"DoRA \(use_dora=True.*use_dora=False.*skip_logits=False"):
        dk.hf.patch(model)
    dk.hf.patch(model, skip_logits=False)            # the way out the message gives
    ref = copy.deepcopy(model)
    dk.hf.unpatch(ref)
    batch = make_batch()
    torch.testing.assert_close(model(**batch).loss, reference_loss(ref, batch), rtol=1e-7, atol=1e-9)


def test_several_active_adapters_on_the_head_are_refused():
    model = lora(tiny("llama"), ("lm_head",))
    model.add_adapter("second", peft.LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False))
    model.base_model.set_adapter(["default", "second"])
    with pytest.raises(ValueError, match=r"2 active LoRA adapters \['default', 'second'\].*set_adapter"):
        dk.hf.patch(model)
    model.base_model.set_adapter("second")
    dk.hf.patch(model)
    ref = copy.deepcopy(model)
    check_against_reference(model, ref, make_batch(), rtol=1e-7, atol=1e-9)


# --------------------------------------------------------------------------- quantised head: one warning


class Linear8bitLt(torch.nn.Linear):
    """A stand-in for bitsandbytes' 8-bit layer (bitsandbytes is not installed here): its own
    forward, its class in a bitsandbytes module -- what resolve_head looks at."""

    def forward(self, x):
        return super().forward(x)


Linear8bitLt.__module__ = "bitsandbytes.nn.modules"


def test_quantised_head_falls_back_with_one_warning():
    model = tiny("llama")
    q = Linear8bitLt(model.config.hidden_size, V, bias=False).double()
    q.weight = model.lm_head.weight
    model.lm_head = q
    part = resolve_head(q)
    assert isinstance(part, Fallback) and part.quantised
    ref = copy.deepcopy(model)
    dk.hf.patch(model)
    batch = make_batch(B=B, T=T)
    with pytest.warns(UserWarning) as rec:
        out = model(**batch)
    msgs = [str(w.message) for w in rec if "dk.hf.patch" in str(w.message)]
    assert len(msgs) == 1
    assert "quantised layer (bitsandbytes.nn.modules.Linear8bitLt)" in msgs[0]
    assert f"[{B}, {T}, {V}] float64 logits take {B * T * V * 8} bytes" in msgs[0]
    assert "llm_int8_skip_modules" in msgs[0]
    assert out.logits is not None
    torch.testing.assert_close(out.loss, reference_loss(ref, batch), rtol=1e-7, atol=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(**batch)                                   # once per patch


def test_any_other_fallback_warns_once_too():
    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.weight = inner.weight

        def forward(self, x):
            return self.inner(x)

    model = tiny("llama")
    model.lm_head = Wrapped(model.lm_head)
    dk.hf.patch(model)
    with pytest.warns(UserWarning, match=r"Wrapped, not a plain nn.Linear.*logits take \d+ bytes"):
        model(**make_batch())
    model.eval()
    with warnings.catch_warnings():                       # eval mode: the logits path by design, no warning
        warnings.simplefilter("error")
        model(**make_batch())
