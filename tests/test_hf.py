"""dft_kernels.hf: the generic adapter, the collator and the Trainer, on tiny random models (CPU).

The ground truth is always the *unpatched* model: its own logits, with labels
shifted like transformers' ForCausalLMLoss, run through dft_kernels.reference.
"""
import copy
import inspect
import math
import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import dft_kernels as dk  # noqa: E402
from dft_kernels import reference  # noqa: E402

V = 257
IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
COMMON = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, max_position_embeddings=64, **IDS)

# name -> (config class, model class, config keywords); every family the adapter must get exactly right
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", COMMON),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", COMMON),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**COMMON, "sliding_window": None}),
    # softcap small enough to bite on a random model's logits; Gemma-2 ties its embeddings
    "gemma2_softcap": ("Gemma2Config", "Gemma2ForCausalLM",
                       {**COMMON, "head_dim": 8, "final_logit_softcapping": 2.0, "query_pre_attn_scalar": 8}),
    "gpt2_tied": ("GPT2Config", "GPT2LMHeadModel",
                  dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                       embd_pdrop=0.0, attn_pdrop=0.0, **IDS)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", COMMON),
    "cohere_logit_scale": ("CohereConfig", "CohereForCausalLM", {**COMMON, "logit_scale": 0.25}),
    "granite_logits_scaling": ("GraniteConfig", "GraniteForCausalLM", {**COMMON, "logits_scaling": 4.0}),
    "phi_lm_head_bias": ("PhiConfig", "PhiForCausalLM",
                         {**COMMON, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "partial_rotary_factor": 0.5}),
}


def tiny(name="llama", seed=0, dtype=torch.float64, **overrides):
    cfg_cls, model_cls, kw = FAMILIES[name]
    cfg_cls, model_cls = getattr(transformers, cfg_cls), getattr(transformers, model_cls)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model_cls(cfg_cls(**{**kw, **overrides}))
    return model.to(dtype).train()


def make_batch(B=3, T=11, K=6, seed=1, vocab=V):
    """Right-padded batch with a masked prompt, an empty and a partly empty target row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.long)
    am[1, -3:] = 0
    ids[am == 0] = 0
    labels = ids.clone()
    labels[:, :3] = -100
    labels[am == 0] = -100
    teacher = (torch.randn(B, T, vocab, generator=g, dtype=torch.float64) * 3).log_softmax(-1)
    lp, ti = teacher.topk(K, dim=-1)
    ti[0, 5, -2:] = -1
    lp[0, 5, -2:] = -math.inf
    ti[2, 4, :] = -1
    lp[2, 4, :] = -math.inf
    ti[am == 0] = -1
    lp[am == 0] = -math.inf
    return dict(input_ids=ids, attention_mask=am, labels=labels, target_index=ti, target_logprobs=lp.float())


def shift(labels, ignore_index=-100):
    return torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def reference_loss(model, batch, **kw):
    """Unpatched model -> its logits -> reference DFT loss with shifted labels, aligned targets."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    labels = batch.get("labels")
    return reference.dft_loss(out.logits, batch.get("target_index"), batch.get("target_logprobs"),
                              None if labels is None else shift(labels, kw.get("ignore_index", -100)), **kw)


def assert_grads_close(patched, ref, rtol=1e-6):
    n = 0
    for (name, p), (_, q) in zip(patched.named_parameters(), ref.named_parameters()):
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        assert p.grad is not None, f"{name}: no gradient"
        scale = q.grad.abs().max().clamp(min=1e-12)
        err = (p.grad - q.grad).abs().max() / scale
        assert err < rtol, f"{name}: relative gradient error {float(err):.3g}"
        n += 1
    assert n > 0


# --------------------------------------------------------------------------- exactness per family


@pytest.mark.parametrize("family", list(FAMILIES), ids=list(FAMILIES))
def test_patched_loss_and_grads_equal_reference(family):
    model = tiny(family)
    ref = copy.deepcopy(model)
    batch = make_batch()
    dk.hf.patch(model)
    out = model(**batch)
    assert out.logits is None, "training mode must not return logits"
    out.loss.backward()
    expected = reference_loss(ref, batch)
    expected.backward()
    torch.testing.assert_close(out.loss, expected, rtol=1e-7, atol=1e-9)
    assert_grads_close(model, ref)
    comps = out.loss_components
    assert comps is dk.hf.last_loss_components(model)
    torch.testing.assert_close(comps.divergence + 0.2 * comps.accuracy, out.loss.detach(), rtol=1e-6, atol=1e-9)
    assert int(comps.n_tokens) == int((shift(batch["labels"]) != -100).sum())


LOSS_OPTIONS = [
    pytest.param(dict(divergence="jsd", beta=0.3, temperature=2.0, accuracy="dft", lam=0.5), id="jsd-tau2-dftacc"),
    pytest.param(dict(divergence="reverse_kl", lam=0.0), id="reverse_kl-lam0"),
    pytest.param(dict(tail="renorm", lam=1.0, ignore_index=-1), id="renorm-ignore-1"),
]


@pytest.mark.parametrize("options", LOSS_OPTIONS)
def test_loss_options_pass_through(options):
    model = tiny("gemma2_softcap")
    ref = copy.deepcopy(model)
    batch = make_batch()
    ii = options.get("ignore_index", -100)
    batch["labels"] = torch.where(batch["labels"] == -100, torch.full_like(batch["labels"], ii), batch["labels"])
    dk.hf.patch(model, **options)
    loss = model(**batch).loss
    loss.backward()
    expected = reference_loss(ref, batch, **options)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-7, atol=1e-9)
    assert_grads_close(model, ref)


def test_eval_mode_returns_logits_and_same_loss():
    model = tiny("gpt2_tied")
    ref = copy.deepcopy(model)
    batch = make_batch()
    dk.hf.patch(model)
    model.eval(), ref.eval()
    with torch.no_grad():
        out = model(**batch)
        logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = reference_loss(ref, batch)
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, expected, rtol=1e-7, atol=1e-9)


def test_skip_logits_false_uses_model_logits_in_training():
    model = tiny("cohere_logit_scale")
    ref = copy.deepcopy(model)
    batch = make_batch()
    dk.hf.patch(model, skip_logits=False)
    out = model(**batch)
    assert out.logits is not None and out.logits.shape == (3, 11, V)
    out.loss.backward()
    expected = reference_loss(ref, batch)
    expected.backward()
    torch.testing.assert_close(out.loss, expected, rtol=1e-7, atol=1e-9)
    assert_grads_close(model, ref)


def test_gradient_accumulation_with_num_items_in_batch_equals_big_batch():
    model = tiny("qwen2")
    big = copy.deepcopy(model)
    dk.hf.patch(model)
    dk.hf.patch(big)
    batch = make_batch(B=8, T=10, seed=3)
    batch["labels"][5, :8] = -100                       # unequal label counts per micro-batch
    n_items = (shift(batch["labels"]) != -100).sum()
    total = 0.0
    for i in range(4):
        micro = {k: v[2 * i:2 * i + 2] for k, v in batch.items()}
        loss = model(**micro, num_items_in_batch=n_items).loss
        loss.backward()
        total = total + loss.detach()
    loss_big = big(**batch).loss
    loss_big.backward()
    torch.testing.assert_close(total, loss_big.detach(), rtol=1e-9, atol=1e-12)
    assert_grads_close(model, big, rtol=1e-9)


def test_targets_without_labels_drop_the_last_position():
    model = tiny("llama")
    ref = copy.deepcopy(model)
    batch = make_batch()
    del batch["labels"]
    dk.hf.patch(model)
    loss = model(**batch).loss
    ti = batch["target_index"].clone()
    ti[:, -1] = -1
    expected = reference_loss(ref, {**batch, "target_index": ti})
    torch.testing.assert_close(loss, expected, rtol=1e-7, atol=1e-9)


def test_shift_labels_kwarg_and_return_dict_false():
    model = tiny("mistral")
    batch = make_batch()
    dk.hf.patch(model)
    a = model(**batch).loss
    pre = {k: v for k, v in batch.items() if k != "labels"}
    b = model(**pre, shift_labels=shift(batch["labels"])).loss
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    tup = model(**batch, return_dict=False)
    assert isinstance(tup, tuple)
    torch.testing.assert_close(tup[0], a, rtol=0, atol=0)
    # positional arguments are mapped like the original forward's
    c = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
              target_index=batch["target_index"], target_logprobs=batch["target_logprobs"]).loss
    torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_cpu_autocast_bf16_matches_model_logits():
    model = tiny("llama", dtype=torch.float32)
    ref = copy.deepcopy(model)
    batch = make_batch()
    dk.hf.patch(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
        expected = reference_loss(ref, batch)
    torch.testing.assert_close(loss.float(), expected.float(), rtol=2e-2, atol=2e-2)


# --------------------------------------------------------------------------- generation, unpatch, signature


def test_generate_on_patched_model_is_unchanged():
    model = tiny("llama", dtype=torch.float32).eval()
    ref = copy.deepcopy(model)
    dk.hf.patch(model)
    prompt = torch.randint(3, V, (2, 5))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, **kw), ref.generate(prompt, **kw))
    model.train()        # generate() in training mode too (no labels: original forward)
    assert torch.equal(model.generate(prompt, **kw), ref.generate(prompt, **kw))


def test_unpatch_restores_the_original_forward():
    model = tiny("phi3")
    batch = make_batch()
    plain = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    assert "forward" not in model.__dict__
    dk.hf.patch(model, lam=1.0)
    assert dk.hf.is_patched(model) and "forward" in model.__dict__
    dk.hf.patch(model, lam=0.5)                      # re-patch: new options, one wrapper
    assert model(**batch).loss_components is not None
    assert dk.hf.unpatch(model) is True
    assert "forward" not in model.__dict__ and not dk.hf.is_patched(model)
    assert not hasattr(model, "_dft_kernels_patch")
    torch.testing.assert_close(model(input_ids=batch["input_ids"], labels=batch["labels"]).loss, plain)
    assert dk.hf.unpatch(model) is False
    # transformers' own forward swallows unknown keywords: the targets are ignored, plain CE again
    torch.testing.assert_close(model(**batch).loss, plain)


def test_signature_keeps_model_arguments_and_adds_targets():
    model = tiny("gpt2_tied")
    before = list(inspect.signature(model.forward).parameters)
    dk.hf.patch(model)
    after = inspect.signature(model.forward).parameters
    assert list(after)[:len(before) - 1] == before[:-1]
    for name in ("target_index", "target_logprobs", "shift_labels", "num_items_in_batch"):
        assert name in after
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in after.values())


def test_deepcopy_of_patched_model_uses_its_own_weights():
    model = tiny("llama")
    dk.hf.patch(model)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(1.5)
    batch = make_batch()
    assert not torch.allclose(model(**batch).loss, clone(**batch).loss)
    assert dk.hf.last_loss_components(clone) is not dk.hf.last_loss_components(model)


def test_importing_dft_kernels_does_not_import_transformers():
    code = "import sys, dft_kernels, dft_kernels.hf; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- bad input


def test_target_ids_beyond_vocab_with_validate():
    model = tiny("llama")
    batch = make_batch()
    batch["target_index"][0, 4, 0] = V + 10
    dk.hf.patch(model, validate=True)
    with pytest.raises(ValueError, match="vocab"):
        model(**batch)


def test_targets_with_wrong_sequence_length():
    model = tiny("llama")
    batch = make_batch()
    dk.hf.patch(model)
    for key in ("target_index", "target_logprobs"):
        bad = dict(batch)
        bad[key] = batch[key][:, 1:]
        with pytest.raises(ValueError, match=r"target_(index|logprobs).*one row per\s+input position"):
            model(**bad)
    with pytest.raises(ValueError, match="target_index and target_logprobs go together"):
        model(**{k: v for k, v in batch.items() if k != "target_index"})
    with pytest.raises(ValueError, match=r"\[batch, seq_len, K\]"):
        model(**{**batch, "target_index": batch["target_index"][0], "target_logprobs": batch["target_logprobs"][0]})


def test_model_without_output_embeddings():
    bare = transformers.LlamaModel(transformers.LlamaConfig(**COMMON))
    with pytest.raises(ValueError, match=r"LlamaModel has no output embeddings.*get_output_embeddings"):
        dk.hf.patch(bare)
    with pytest.raises(TypeError, match="ForCausalLM"):
        dk.hf.patch(object())


def test_encoder_decoder_is_rejected():
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match="T5ForConditionalGeneration is an encoder-decoder"):
        dk.hf.patch(t5)


def test_bad_patch_keywords():
    model = tiny("llama")
    with pytest.raises(TypeError, match="softcap"):
        dk.hf.patch(model, softcap=30.0)
    with pytest.raises(TypeError, match="unknown keyword 'lamda'"):
        dk.hf.patch(model, lamda=0.1)
    with pytest.raises(ValueError, match="divergence"):
        dk.hf.patch(model, divergence="kl")
    with pytest.raises(ValueError, match="skip_logits"):
        dk.hf.patch(model, skip_logits="yes")
    assert not dk.hf.is_patched(model)


def test_unknown_logit_transform_is_detected():
    model = tiny("llama")
    ref = copy.deepcopy(model)
    for m in (model, ref):        # a transform after the lm_head that no config field announces
        m.lm_head.register_forward_hook(lambda mod, args, out: out * 2.0)
    batch = make_batch()
    dk.hf.patch(model)
    with pytest.raises(ValueError, match="LlamaForCausalLM transforms the output of its lm_head"):
        model(**batch)
    dk.hf.patch(model, skip_logits=False)     # the way out the message gives
    torch.testing.assert_close(model(**batch).loss, reference_loss(ref, batch), rtol=1e-7, atol=1e-9)


# --------------------------------------------------------------------------- gradient checkpointing, PEFT


def enable_checkpointing(model, use_reentrant):
    # transformers 5 renamed gradient_checkpointing_enable to activation_checkpointing_enable
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})


def test_gradient_checkpointing():
    model = tiny("qwen2")
    ref = copy.deepcopy(model)
    enable_checkpointing(model, use_reentrant=False)
    assert getattr(model, "is_activation_checkpointing", getattr(model, "is_gradient_checkpointing", None))
    dk.hf.patch(model)
    batch = make_batch()
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    expected = reference_loss(ref, batch)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-7, atol=1e-9)
    assert_grads_close(model, ref)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-ckpt-reentrant"])
def test_peft_lora_frozen_lm_head(checkpointing):
    peft = pytest.importorskip("peft")
    base = tiny("llama")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                          init_lora_weights=False)
    model = peft.get_peft_model(base, cfg)
    ref = copy.deepcopy(model)
    if checkpointing:
        enable_checkpointing(model, use_reentrant=True)
        model.enable_input_require_grads()
    dk.hf.patch(model)                     # a PeftModel: the transformers model inside is patched
    assert dk.hf.is_patched(base)
    batch = make_batch()
    out = model(**batch, use_cache=False)
    assert out.logits is None
    out.loss.backward()
    expected = reference_loss(ref, batch)
    expected.backward()
    torch.testing.assert_close(out.loss, expected, rtol=1e-7, atol=1e-9)
    head = model.get_base_model().lm_head
    assert not head.weight.requires_grad and head.weight.grad is None     # frozen lm_head: no dW
    lora = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    lora_ref = dict((n, p) for n, p in ref.named_parameters() if p.requires_grad)
    assert lora and all("lora_" in n for n, _ in lora)
    for n, p in lora:
        torch.testing.assert_close(p.grad, lora_ref[n].grad, rtol=1e-6, atol=1e-10)


def test_peft_lora_on_lm_head_keeps_the_fused_path():
    """A LoRA on the lm_head goes to the fused loss as lora_A / lora_B (tests/test_peft_head.py has the rest)."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny("llama"), peft.LoraConfig(
        r=4, target_modules=["lm_head"], lora_dropout=0.0, init_lora_weights=False))
    ref = copy.deepcopy(model)
    dk.hf.patch(model)
    batch = make_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        out = model(**batch)
    assert out.logits is None
    torch.testing.assert_close(out.loss, reference_loss(ref, batch), rtol=1e-7, atol=1e-9)


def test_accelerate_device_hook_on_lm_head_keeps_the_fused_path():
    hooks = pytest.importorskip("accelerate.hooks")
    model = tiny("llama")
    ref = copy.deepcopy(model)
    hooks.add_hook_to_module(model.lm_head, hooks.AlignDevicesHook(execution_device="cpu", io_same_device=True))
    assert "forward" in model.lm_head.__dict__          # what device_map="auto" does to every module
    dk.hf.patch(model)
    batch = make_batch()
    out = model(**batch)
    assert out.logits is None
    torch.testing.assert_close(out.loss, reference_loss(ref, batch), rtol=1e-7, atol=1e-9)


# --------------------------------------------------------------------------- collator


def test_collator_pads_everything_together():
    feats = [
        dict(input_ids=[5, 6, 7], attention_mask=[1, 1, 1], labels=[-100, 6, 7],
             target_index=[[1, 2], [3, -1], [4, 5]], target_logprobs=[[-0.2, -2.0], [-0.5, -math.inf], [-1., -1.]]),
        dict(input_ids=torch.tensor([8, 9]), attention_mask=torch.tensor([1, 1]), labels=torch.tensor([8, 9]),
             target_index=torch.tensor([[1, 2, 3], [4, 5, 6]]), target_logprobs=torch.full((2, 3), -1.5)),
        dict(input_ids=[10], labels=[10]),           # plain SFT example: no targets, no mask
    ]
    b = dk.hf.DFTDataCollator(pad_token_id=99)(feats)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 9, 99], [10, 99, 99]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, 9, -100], [10, -100, -100]]
    assert b["target_index"].shape == (3, 3, 3) and b["target_index"].dtype == torch.int64
    assert b["target_logprobs"].dtype == torch.float32
    assert b["target_index"][0].tolist() == [[1, 2, -1], [3, -1, -1], [4, 5, -1]]
    assert b["target_index"][1, 2].tolist() == [-1, -1, -1] and (b["target_index"][2] == -1).all()
    assert torch.isinf(b["target_logprobs"][1, 2]).all() and (b["target_logprobs"][1, :2] == -1.5).all()
    left = dk.hf.DFTDataCollator(padding_side="left", pad_to_multiple_of=4)(feats)
    assert left["input_ids"].shape == (3, 4)
    # the first token's label is dropped: no position predicts it, unpadded or padded on the right
    assert left["labels"][1].tolist() == [-100, -100, -100, 9]
    assert left["target_index"][1, 2:, :].tolist() == [[1, 2, 3], [4, 5, 6]]


def test_collator_rejects_misaligned_targets():
    coll = dk.hf.DFTDataCollator()
    with pytest.raises(ValueError, match="feature 1: the targets have 2 rows but input_ids has 3"):
        coll([dict(input_ids=[1], target_index=[[1]], target_logprobs=[[-1.0]]),
              dict(input_ids=[1, 2, 3], target_index=[[1], [2]], target_logprobs=[[-1.0], [-1.0]])])
    with pytest.raises(ValueError, match="go together"):
        coll([dict(input_ids=[1], target_index=[[1]])])
    with pytest.raises(ValueError, match="labels has length 1"):
        coll([dict(input_ids=[1, 2], labels=[1])])


def test_collated_batch_feeds_the_patched_model():
    model = tiny("llama")
    ref = copy.deepcopy(model)
    dk.hf.patch(model)
    g = torch.Generator().manual_seed(0)
    feats = []
    for T in (7, 4, 9):
        ids = torch.randint(3, V, (T,), generator=g)
        lp, ti = torch.randn(T, V, generator=g).log_softmax(-1).topk(4, -1)
        feats.append(dict(input_ids=ids, attention_mask=torch.ones(T, dtype=torch.long), labels=ids,
                          target_index=ti, target_logprobs=lp))
    batch = dk.hf.DFTDataCollator()(feats)
    torch.testing.assert_close(model(**batch).loss, reference_loss(ref, batch), rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------- Trainer


class _TeacherData(torch.utils.data.Dataset):
    """Token sequences from a bigram teacher over a small part of the vocab;
    targets = top-K of the teacher's next-token log-probs at each position."""

    def __init__(self, n=32, T=12, K=8, used=24, seed=7):
        g = torch.Generator().manual_seed(seed)
        table = torch.full((V, V), -30.0)
        table[:, 3:3 + used] = 2.0 * torch.randn(V, used, generator=torch.Generator().manual_seed(0))
        logp = table.log_softmax(-1)
        ids = torch.empty(n, T, dtype=torch.long)
        ids[:, 0] = torch.randint(3, 3 + used, (n,), generator=g)
        for t in range(1, T):
            ids[:, t] = torch.multinomial(logp[ids[:, t - 1]].exp(), 1, generator=g).squeeze(1)
        lps, idx = logp[ids].topk(K, dim=-1)
        self.rows = [dict(input_ids=ids[i], attention_mask=torch.ones(T, dtype=torch.long), labels=ids[i],
                          target_index=idx[i], target_logprobs=lps[i]) for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def test_dft_trainer_30_steps_loss_goes_down(tmp_path):
    pytest.importorskip("accelerate")
    from dft_kernels.hf import DFTConfig, DFTTrainer
    model = tiny("gpt2_tied", seed=5, dtype=torch.float32)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=30,
        learning_rate=1e-2, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    trainer = DFTTrainer(model=model, args=args, train_dataset=_TeacherData(),
                         dft_config=DFTConfig(lam=0.5, divergence="forward_kl"))
    assert dk.hf.is_patched(model) and trainer.model_accepts_loss_kwargs
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 30
    losses = [h["loss"] for h in logs]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    for h in logs:   # the logged parts add up to the logged loss
        assert {"dft_divergence", "dft_accuracy", "dft_student_mass"} <= set(h)
        assert h["loss"] == pytest.approx(h["dft_divergence"] + 0.5 * h["dft_accuracy"], rel=1e-4, abs=1e-5)
    assert logs[-1]["dft_student_mass"] > logs[0]["dft_student_mass"]
    metrics = trainer.evaluate(_TeacherData(n=8, seed=8))
    assert "eval_loss" in metrics and "eval_dft_divergence" in metrics


def test_dft_trainer_bad_options(tmp_path):
    pytest.importorskip("accelerate")
    from dft_kernels.hf import DFTConfig, DFTTrainer
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="ignore_index"):
        DFTTrainer(model=tiny("llama"), args=args, dft_config=DFTConfig(ignore_index=-1))
    with pytest.raises(ValueError, match="divergence"):
        DFTConfig(divergence="kl")
    with pytest.raises(TypeError, match="dft_config"):
        DFTTrainer(model=tiny("llama"), args=args, dft_config="forward_kl")


def test_dft_trainer_patches_models_from_model_init(tmp_path):
    pytest.importorskip("accelerate")
    from dft_kernels.hf import DFTConfig, DFTTrainer
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1,
                                          per_device_train_batch_size=2, save_strategy="no", disable_tqdm=True)
    trainer = DFTTrainer(model_init=lambda: tiny("qwen2", dtype=torch.float32), args=args,
                         train_dataset=_TeacherData(n=4), dft_config=DFTConfig(lam=0.3))
    assert dk.hf.is_patched(trainer.model)
    trainer.train()
    assert dk.hf.is_patched(trainer.model)
    assert dk.hf.last_loss_components(trainer.model) is not None


def test_mixin_with_trl_sft_trainer(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    tokenizers = pytest.importorskip("tokenizers")
    from dft_kernels.hf import DFTConfig, DFTTrainerMixin

    class DFTSFTTrainer(DFTTrainerMixin, trl.SFTTrainer):
        pass

    words = tokenizers.models.WordLevel({str(i): i for i in range(V)}, unk_token="0")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer(words), pad_token="0",
                                               eos_token="2")
    rows = [{k: v.tolist() for k, v in r.items()} for r in _TeacherData(n=16).rows]
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                         logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                         dataset_kwargs={"skip_prepare_dataset": True})
    trainer = DFTSFTTrainer(model=tiny("llama", dtype=torch.float32), args=args, processing_class=tok,
                            train_dataset=datasets.Dataset.from_list(rows), dft_config=DFTConfig(lam=0.5))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 6 and all(h["dft_divergence"] > 0 for h in logs)    # the targets reached the loss
    assert logs[-1]["loss"] < logs[0]["loss"]
