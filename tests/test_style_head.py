"""Style heads (docs/design.md sec. 17.2): a trainable low-rank correction of a frozen lm_head --
training through the fused path with the decoder run without gradients, save / load with the base
model's fingerprint, blending, merging, tied embeddings."""
import copy
import json
import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import dft_kernels as dk  # noqa: E402
from dft_kernels.hf import DFTConfig, DFTTrainer  # noqa: E402
from dft_kernels.lm_head import resolve_head  # noqa: E402

from .test_hf import V, make_batch, reference_loss, tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class ShapeRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the shape of every tensor an op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out

    def vocab_sized(self, n_rows, vocab=V):
        return [(f, s) for f, s in self.shapes if s and s[-1] == vocab and math.prod(s) >= n_rows * vocab]


def styled(seed=0, rank=4, dtype=torch.float64, family="llama", random_B=True, **kw):
    model = tiny(family, seed=seed, dtype=dtype, **{k: v for k, v in kw.items() if k != "alpha"})
    dk.hf.add_style_head(model, rank=rank, alpha=kw.get("alpha"))
    if random_B:                               # B starts at 0: give the correction something to say
        with torch.no_grad():
            dk.hf.get_style_head(model).lora_B.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed + 7))
    return model


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# --------------------------------------------------------------------------- training


def test_style_head_trains_only_its_correction():
    model = tiny("llama", dtype=torch.float32)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    dk.hf.add_style_head(model, rank=4, alpha=8)
    sh = dk.hf.get_style_head(model)
    assert model.get_output_embeddings() is sh and sh.scaling == 2.0 and not sh.lora_B.any()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["lm_head.lora_A", "lm_head.lora_B"]
    dk.hf.patch(model, impl="torch", lam=0.5)
    opt = torch.optim.Adam([sh.lora_A, sh.lora_B], lr=3e-2)
    batch = make_batch()
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == (n in trainable), n
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.05, losses
    for n, p in model.named_parameters():
        if n.startswith("lm_head.base_layer."):
            n = n.replace("base_layer.", "")
        if n in base:
            assert torch.equal(p, base[n]), n


def test_the_decoder_runs_without_gradients():
    model = styled(dtype=torch.float32)
    modes, seen = {}, {}

    def in_decoder(module, args, output):
        modes.setdefault("decoder", torch.is_grad_enabled())

    def at_head(module, args):
        modes.setdefault("head", torch.is_grad_enabled())
        seen.setdefault("h_grad", args[0].requires_grad)

    model.model.layers[0].register_forward_hook(in_decoder)
    model.lm_head.register_forward_pre_hook(at_head)
    model.enable_input_require_grads()       # would make the decoder record a graph, were it under grad
    dk.hf.patch(model, impl="torch")
    out = model(**make_batch())
    assert modes == {"decoder": False, "head": True} and seen["h_grad"] is False
    out.loss.backward()
    assert torch.is_grad_enabled()
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"'layers.1.mlp.up_proj.weight' requires grad.*train_decoder=True"):
        model(**make_batch())
    assert torch.is_grad_enabled()           # restored after the refusal


def test_fused_equals_logits_path_and_no_vocab_sized_tensor():
    model = styled()
    ref = copy.deepcopy(model)
    batch = make_batch()
    dk.hf.patch(model, impl="torch", chunk_elems=4 * V, strategy="lean")
    with ShapeRecorder() as rec:
        out = model(**batch)
        out.loss.backward()
    assert out.logits is None and rec.vocab_sized(3 * 11) == []
    expected = reference_loss(ref, batch)        # the unpatched style head's own logits
    expected.backward()
    torch.testing.assert_close(out.loss, expected, rtol=1e-7, atol=1e-9)
    for name in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(model.lm_head, name).grad, getattr(ref.lm_head, name).grad,
                                   rtol=1e-6, atol=1e-10)


def two_step_trainer(model, tmp_path) -> DFTTrainer:
    """A ``DFTTrainer`` of two steps (batch 2, lr 1e-2, lam 0.3, torch path) on 4 rows of
    :func:`make_batch` (shared with tests/test_peft_head.py)."""
    bt = make_batch(B=4, T=9, seed=10)
    rows = [{k: v[i] for k, v in bt.items() if k != "attention_mask"} for i in range(4)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no",
                                          disable_tqdm=True, max_steps=2, per_device_train_batch_size=2,
                                          logging_steps=1, learning_rate=1e-2)
    return DFTTrainer(model=model, args=args, train_dataset=rows, dft_config=DFTConfig(lam=0.3, impl="torch"))


def test_dft_trainer_trains_a_style_head(tmp_path):
    model = tiny("llama", dtype=torch.float32)
    dk.hf.add_style_head(model, rank=4)
    tr = two_step_trainer(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        tr.train()
    assert tr.state.global_step == 2 and model.lm_head.lora_B.abs().max() > 0


# --------------------------------------------------------------------------- save / load


def test_save_load_same_logits_and_metadata(tmp_path):
    model = styled()
    batch = make_batch()
    expected = logits(model, batch)
    path = dk.hf.save_style_head(model, tmp_path / "head", targets="targets/poems", description="poems")
    assert sorted(p.name for p in path.iterdir()) == ["style_head.json", "style_head.safetensors"]   # no temp left
    meta = json.loads((path / "style_head.json").read_text())
    assert meta["rank"] == 4 and meta["scaling"] == 1.0 and meta["targets"] == "targets/poems"
    assert meta["base"]["vocab_size"] == V and meta["base"]["hidden_size"] == 32 and meta["base"]["lm_head_sha256"]
    fresh = tiny("llama", seed=0)                     # the same base, loaded again
    dk.hf.load_style_head(fresh, path)
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == ["lm_head.lora_A", "lm_head.lora_B"]
    torch.testing.assert_close(logits(fresh, batch), expected, rtol=0, atol=0)
    dk.hf.load_style_head(fresh, path)               # replaces the head it has
    torch.testing.assert_close(logits(fresh, batch), expected, rtol=0, atol=0)


def test_load_refuses_another_base(tmp_path):
    path = dk.hf.save_style_head(styled(), tmp_path / "head")
    with pytest.raises(ValueError, match=r"different base models \(lm_head_sha256: the head's \w+, the model's \w+"):
        dk.hf.load_style_head(tiny("llama", seed=1), path)
    with pytest.raises(ValueError, match=r"different base models \(vocab_size: the head's 257, the model's 300"):
        dk.hf.load_style_head(tiny("llama", vocab_size=300), path)
    with pytest.raises(ValueError, match=r"hidden_size: the head's 32, the model's 48"):
        dk.hf.load_style_head(tiny("llama", hidden_size=48), path)
    bf16 = tiny("llama", seed=0, dtype=torch.bfloat16)   # the same base in another dtype loads
    dk.hf.load_style_head(bf16, path)
    assert dk.hf.get_style_head(bf16).lora_A.dtype == torch.float32
    data = bytearray((path / "style_head.safetensors").read_bytes())
    data[-1] ^= 1
    (path / "style_head.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match style_head.json"):
        dk.hf.read_style_head(path)


# --------------------------------------------------------------------------- blend


def test_blend(tmp_path):
    a_model, b_model = styled(seed=0), styled(seed=0, rank=3, alpha=6)
    with torch.no_grad():
        dk.hf.get_style_head(b_model).lora_B.normal_(0, 0.5, generator=torch.Generator().manual_seed(99))
    a = dk.hf.save_style_head(a_model, tmp_path / "a")
    b = dk.hf.save_style_head(b_model, tmp_path / "b")
    batch = make_batch()
    base = logits(tiny("llama", seed=0), batch)
    corr_a, corr_b = logits(a_model, batch) - base, logits(b_model, batch) - base
    assert corr_a.abs().max() > 0.1 and corr_b.abs().max() > 0.1

    only_a = dk.hf.blend_style_heads({a: 1.0})
    torch.testing.assert_close(only_a.delta_weight(), dk.hf.read_style_head(a).delta_weight())
    mix = dk.hf.blend_style_heads({a: 0.5, b: 0.5}, out=tmp_path / "mix")
    assert mix.rank == 7 and mix.scaling == 1.0 and [x["weight"] for x in mix.meta["blend"]] == [0.5, 0.5]
    model = tiny("llama", seed=0)
    dk.hf.load_style_head(model, tmp_path / "mix")
    torch.testing.assert_close(logits(model, batch) - base, 0.5 * (corr_a + corr_b), rtol=1e-9, atol=1e-9)

    other = dk.hf.save_style_head(styled(seed=3), tmp_path / "other")
    with pytest.raises(ValueError, match=r"cannot blend style heads .*a and .*other: different base models "
                                         r"\(lm_head_sha256"):
        dk.hf.blend_style_heads({a: 0.5, other: 0.5})
    with pytest.raises(ValueError, match="weights are finite numbers"):
        dk.hf.blend_style_heads({a: float("nan")})


# --------------------------------------------------------------------------- merge, tied embeddings


def test_merge_and_unmerge():
    model = styled(dtype=torch.float32)
    batch = make_batch()
    w0 = model.lm_head.weight.detach().clone()
    expected = logits(model, batch)
    dk.hf.patch(model, impl="torch")
    model.train()
    loss_unmerged = model(**batch).loss.detach()
    dk.hf.merge_style_head(model)
    assert dk.hf.get_style_head(model).merged
    assert not resolve_head(model.lm_head).has_lora                      # the fused path sees a plain head
    model.train()
    torch.testing.assert_close(model(**batch).loss.detach(), loss_unmerged, rtol=1e-5, atol=1e-6)
    dk.hf.unpatch(model)
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-5, atol=1e-5)
    dk.hf.unmerge_style_head(model)
    torch.testing.assert_close(model.lm_head.weight, w0, rtol=0, atol=4 * torch.finfo(torch.float32).eps *
                               float(w0.abs().max() + dk.hf.get_style_head(model).delta_weight().abs().max()))
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-5, atol=1e-5)


def test_tied_embeddings():
    model = styled(tie_word_embeddings=True)
    emb = model.model.embed_tokens.weight
    assert model.lm_head.weight is emb
    before = emb.detach().clone()
    ref = copy.deepcopy(model)
    dk.hf.patch(model, impl="torch")
    batch = make_batch()
    out = model(**batch)
    out.loss.backward()
    expected = reference_loss(ref, batch)
    torch.testing.assert_close(out.loss, expected, rtol=1e-7, atol=1e-9)
    assert emb.grad is None and model.lm_head.lora_A.grad is not None
    model.tie_weights()                               # transformers re-ties lm_head.weight: lands on the base layer
    assert model.lm_head.weight is model.model.embed_tokens.weight
    dk.hf.unpatch(model)
    expected_logits = logits(model, batch)
    with pytest.raises(ValueError, match="tied to the input embeddings.*untie=True"):
        dk.hf.merge_style_head(model)
    dk.hf.merge_style_head(model, untie=True)
    assert model.lm_head.weight is not model.model.embed_tokens.weight and not model.config.tie_word_embeddings
    assert torch.equal(model.model.embed_tokens.weight, before)          # the input embeddings did not move
    torch.testing.assert_close(logits(model, batch), expected_logits, rtol=1e-9, atol=1e-9)


def test_remove_restores_the_plain_head():
    model = tiny("llama")
    head = model.lm_head
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    dk.hf.add_style_head(model, rank=2)
    with pytest.raises(ValueError, match="has a style head already"):
        dk.hf.add_style_head(model, rank=2)
    dk.hf.remove_style_head(model)
    assert model.lm_head is head and dk.hf.get_style_head(model) is None
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not model.model._forward_pre_hooks and not model.model._forward_hooks
    with pytest.raises(ValueError, match="no style head"):
        dk.hf.save_style_head(model, "unused")


# --------------------------------------------------------------------------- command line


def test_cli_train_and_eval_a_style_head(tmp_path, capsys):
    from dft_kernels import targets as T
    from dft_kernels.cli import main
    from dft_kernels.workflow.presets import set_preset

    from .test_workflow import _llama as llama       # vocab 64, 16 hidden, one layer, saved to path

    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 64, (8,), generator=g).tolist() for _ in range(8)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in seqs))
    student, teacher = llama(3, tmp_path / "student"), llama(1, tmp_path / "teacher", 20.0)
    T.build(teacher, [seqs[:4], seqs[4:]], 6, out_dir=tmp_path / "poems", shard_size=4, progress=False)
    set_preset(tmp_path / "poems", "poems", "a style")
    out = tmp_path / "run"
    assert main(["train", "--student", str(student), "--data", str(data), "--targets", str(tmp_path / "poems"),
                 "--out", str(out), "--style-head", "4", "--max-steps", "4", "--save-steps", "2", "--batch-size", "4",
                 "--lr", "5e-2", "--logging-steps", "1", "--quiet"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("trained 4 steps") and f"style head (rank 4) saved to {out}" in line, line
    meta = json.loads((out / "style_head.json").read_text())
    assert meta["name"] == "poems" and meta["rank"] == 4 and meta["targets"] == str(tmp_path / "poems")
    assert not (out / "model.safetensors").exists() and (out / "checkpoint-2").is_dir()
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["style_head"]["rank"] == 4 and summary["last_loss"] < summary["first_loss"]

    rep = tmp_path / "report"
    assert main(["eval", "--model", str(student), "--data", str(data), "--targets", str(tmp_path / "poems"),
                 "--style-head", "poems", "--presets", str(tmp_path), "--out", str(rep)]) == 0
    base, styled_row = json.loads((rep / "report.json").read_text())["models"]
    assert styled_row["model"] == f"{student} + {out}"
    assert styled_row["sparse_kl"] < base["sparse_kl"]          # trained towards those targets

    other = llama(5, tmp_path / "other")
    for argv, msg in ((["eval", "--model", str(other), "--data", str(data), "--style-head", str(out), "--out",
                        str(rep)], "different base models (lm_head_sha256"),
                      (["eval", "--model", str(student), "--data", str(data), "--style-head", "nope", "--presets",
                        str(tmp_path), "--out", str(rep)], "known: poems"),
                      (["eval", "--model", str(student), str(other), "--data", str(data), "--style-head", str(out),
                        "--out", str(rep)], "needs exactly one --model"),
                      (["train", "--student", str(student), "--data", str(data), "--out", str(tmp_path / "x"),
                        "--style-alpha", "2"], "--style-alpha needs --style-head")):
        assert main(argv) == 2
        last = capsys.readouterr().err.rstrip("\n").split("\n")[-1]
        assert last.startswith("error: ") and msg in last, last

    dense = tmp_path / "dense"            # the dense two-head loss trains the head's correction too
    assert main(["train", "--student", str(student), "--data", str(data), "--teacher", str(teacher), "--online",
                 "dense", "--out", str(dense), "--style-head", "4", "--style-name", "dense", "--max-steps", "4",
                 "--batch-size", "4", "--lr", "5e-2", "--logging-steps", "1", "--quiet"]) == 0
    capsys.readouterr()
    summary = json.loads((dense / "train_summary.json").read_text())
    assert summary["style_head"]["rank"] == 4 and summary["last_loss"] < summary["first_loss"]


def test_public_names():
    from dft_kernels.hf import _STYLE, _STYLE_IO
    assert set(_STYLE + _STYLE_IO) <= set(dk.hf.__all__)
    for name in dk.hf.__all__:
        assert getattr(dk.hf, name) is not None, name
    assert callable(dk.hf.get_style_head)           # not shadowed by the submodule style_head
