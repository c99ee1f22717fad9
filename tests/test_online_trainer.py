"""DFTTrainer with a live teacher (docs/design.md sec. 11)."""
import copy

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


# --------------------------------------------------------------------------- PEFT, gradient accumulation, DDP

MODES = ("topk", "dense")
OPTS = dict(k=5, lam=0.3, temperature=1.5, impl="torch")


def _rows(n=4, seed=5):
    """Sequences of different lengths: the micro-batches of an optimizer step count different tokens."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(3, V, (5 + 3 * i,), generator=g)
        labels = ids.clone()
        labels[:2] = -100                                        # a prompt
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return rows


def _collate(rows):
    from dft_kernels.hf import DFTDataCollator
    return DFTDataCollator(pad_token_id=0)(rows)


def _reference_loss(student, teacher, batch, mode, k=OPTS["k"], lam=OPTS["lam"], tau=OPTS["temperature"]):
    """float64, from both models' full logits: the teacher's top-k (dense: all V) log-probs at
    temperature tau as targets of ``reference.dft_loss`` (K = V is the dense forward KL)."""
    from dft_kernels import reference
    kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        lt = (teacher(**kw).logits.double() / tau).log_softmax(-1)
    lp, idx = lt.topk(k if mode == "topk" else V, dim=-1)
    shifted = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
    return reference.dft_loss(student(**kw).logits.double(), idx, lp, shifted, lam=lam, temperature=tau)


def _args(tmp_path, **kw):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
        optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=0.0, max_steps=1, logging_steps=1, dataloader_num_workers=0, **kw)


@pytest.mark.parametrize("mode", MODES)
def test_peft_lora_student(tmp_path, mode):
    """A LoRA student: the loss and the adapters' gradients equal a float64 reference from the
    unpatched model's logits; nothing but the adapters gets a gradient; at step 0 (B = 0) the
    loss is the plain model's."""
    peft = pytest.importorskip("peft")
    teacher = _llama(0, 24).double()
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    batch = _collate(_rows())
    args = _args(tmp_path)

    # step 0 of a fresh adapter: the same model as without PEFT
    plain = _llama(1, 16).double()
    fresh = peft.get_peft_model(copy.deepcopy(plain), peft.LoraConfig(**cfg))
    losses = []
    for m in (plain, fresh):
        tr = DFTTrainer(model=m, args=args, teacher_model=teacher, dft_config=DFTConfig(teacher=mode, **OPTS))
        losses.append(tr.compute_loss(tr.model, dict(batch)))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-12, atol=1e-12)

    # trained adapters (non-zero B): against the float64 reference on an unpatched copy
    student = peft.get_peft_model(_llama(1, 16).double(), peft.LoraConfig(**cfg, init_lora_weights=False))
    ref = copy.deepcopy(student)
    tr = DFTTrainer(model=student, args=args, teacher_model=teacher, dft_config=DFTConfig(teacher=mode, **OPTS))
    loss = tr.compute_loss(tr.model, dict(batch))
    loss.backward()
    expected = _reference_loss(ref, teacher, batch, mode)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-7, atol=1e-12)     # top-k log-probs are stored in fp32
    assert abs(loss.item() - losses[0].item()) > 1e-3          # the adapters change the loss
    trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.grad is None for n, p in student.named_parameters() if n not in trainable)
    assert all(p.grad is None for p in teacher.parameters())
    ref_grads = dict(ref.named_parameters())
    for n, p in trainable.items():
        assert p.grad is not None and p.grad.abs().max() > 0, n
        g = ref_grads[n].grad
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-6 * float(g.abs().max()))


# --------------------------------------------------------------------------- low-rank heads (docs/design.md sec. 17.2)


def _low_rank_head(model, kind):
    """``model`` with a low-rank lm_head whose B is not zero (a trained adapter): a PEFT LoRA on
    the lm_head (``kind="lora"``, plus one on q_proj) or a style head (``"style"``)."""
    if kind == "lora":
        peft = pytest.importorskip("peft")
        return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                                          target_modules=["lm_head", "q_proj"]))
    dk.hf.add_style_head(model, rank=4, alpha=8)
    with torch.no_grad():
        dk.hf.get_style_head(model).lora_B.normal_(0, 0.5, generator=torch.Generator().manual_seed(7))
    return model


def _merged(model, kind):
    """A plain copy of ``model`` with its adapters folded into the weights."""
    c = copy.deepcopy(model)
    if kind == "lora":
        return c.merge_and_unload()
    dk.hf.remove_style_head(c, merge=True)
    return c


@pytest.mark.parametrize("kind", ["lora", "style"])
@pytest.mark.parametrize("mode", MODES)
def test_low_rank_teacher_head_equals_the_merged_teacher(tmp_path, mode, kind):
    """A teacher whose lm_head carries a low-rank correction (PEFT LoRA, style head): its
    targets (topk) and the dense loss are the merged teacher's and the float64 reference's
    from its own logits -- not its base head's."""
    teacher = _low_rank_head(_llama(0, 24).double(), kind)
    merged, base = _merged(teacher, kind), _llama(0, 24).double()
    batch = _collate(_rows())
    if mode == "topk":
        from dft_kernels.hf.online import OnlineTeacher
        got, want, plain = (OnlineTeacher(copy.deepcopy(t), "topk", 5, 1.5).targets(dict(batch), "cpu")
                            for t in (teacher, merged, base))
        assert torch.equal(got["target_index"], want["target_index"])
        torch.testing.assert_close(got["target_logprobs"], want["target_logprobs"], rtol=1e-6, atol=1e-6)
        assert not torch.allclose(got["target_logprobs"], plain["target_logprobs"], atol=1e-3)
    losses = {}
    for name, t in (("adapter", teacher), ("merged", merged), ("base", base)):
        tr = DFTTrainer(model=_llama(1, 16).double(), args=_args(tmp_path), teacher_model=t,
                        dft_config=DFTConfig(teacher=mode, **OPTS))
        losses[name] = tr.compute_loss(tr.model, dict(batch)).detach()
    expected = _reference_loss(_llama(1, 16).double(), teacher, batch, mode).detach()
    torch.testing.assert_close(losses["adapter"], expected, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(losses["adapter"], losses["merged"], rtol=1e-7, atol=1e-12)
    assert abs(losses["adapter"].item() - losses["base"].item()) > 1e-3       # the adapter matters


@pytest.mark.parametrize("kind", ["lora", "style"])
def test_dense_trains_a_low_rank_student_head(tmp_path, kind):
    """teacher='dense' with a LoRA / style-head student (and a LoRA'd teacher): the loss and every
    trainable gradient -- the head's A / B included -- equal the float64 reference from the
    unpatched student's own logits."""
    teacher = _low_rank_head(_llama(0, 24).double(), "lora")
    student = _low_rank_head(_llama(1, 16).double(), kind)
    ref = copy.deepcopy(student)
    batch = _collate(_rows())
    tr = DFTTrainer(model=student, args=_args(tmp_path), teacher_model=teacher,
                    dft_config=DFTConfig(teacher="dense", **OPTS))
    student.train()
    loss = tr.compute_loss(tr.model, dict(batch))
    loss.backward()
    expected = _reference_loss(ref, teacher, batch, "dense")
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)
    trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
    assert any("lm_head" in n and "lora_A" in n for n in trainable)
    assert any("lm_head" in n and "lora_B" in n for n in trainable)
    ref_grads = dict(ref.named_parameters())
    for n, p in trainable.items():
        assert p.grad is not None and p.grad.abs().max() > 0, n
        g = ref_grads[n].grad
        torch.testing.assert_close(p.grad, g, rtol=1e-7, atol=1e-7 * float(g.abs().max()), msg=lambda m: f"{n}: {m}")
    assert all(p.grad is None for p in teacher.parameters())


def _one_step(tmp_path, mode, rows, **kw):
    """Parameters after one SGD step of DFTTrainer with a live teacher (float64 models)."""
    student = _llama(1, 16).double()
    trainer = DFTTrainer(model=student, args=_args(tmp_path, **kw), train_dataset=rows,
                         teacher_model=_llama(0, 24).double(),
                         dft_config=DFTConfig(teacher=mode, **OPTS))
    out = trainer.train()
    return {n: p.detach().clone() for n, p in student.named_parameters()}, out.training_loss


@pytest.mark.parametrize("mode", MODES)
def test_gradient_accumulation_equals_one_big_batch(tmp_path, mode):
    """2 micro-batches of 2 sequences (different token counts) accumulated == one batch of 4,
    and that step == an SGD step on the float64 reference loss of the whole batch."""
    rows = _rows()
    big, big_loss = _one_step(tmp_path, mode, rows, per_device_train_batch_size=4)
    acc, acc_loss = _one_step(tmp_path, mode, rows, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    student = _llama(1, 16).double()
    init = {n: p.detach().clone() for n, p in student.named_parameters()}
    ref = _reference_loss(student, _llama(0, 24).double(), _collate(rows), mode)
    ref.backward()
    for n, p in student.named_parameters():       # compare the updates: -lr * gradient
        expected = -0.5 * p.grad
        tol = dict(rtol=1e-6, atol=1e-6 * float(p.grad.abs().max()))
        torch.testing.assert_close(big[n] - init[n], expected, **tol, msg=lambda m: f"{n}: {m}")
        torch.testing.assert_close(acc[n] - init[n], expected, **tol, msg=lambda m: f"{n}: {m}")
    assert (big["lm_head.weight"] - init["lm_head.weight"]).abs().max() > 1e-3
    assert acc_loss == pytest.approx(ref.item(), rel=1e-7) and big_loss == pytest.approx(ref.item(), rel=1e-7)


def _ddp_worker(rank, world, port, out_dir):
    """One rank of a 2-process DDP (gloo) run of DFTTrainer: per rank 1 sequence x 2 accumulated
    micro-batches per optimizer step, i.e. the 4 sequences of the single-process batch."""
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    out = {}
    try:
        for mode in MODES:
            params, loss = _one_step(out_dir, mode, _rows(), per_device_train_batch_size=1,
                                     gradient_accumulation_steps=2, ddp_backend="gloo")
            out[mode] = {"params": params, "loss": loss}
    finally:
        torch.save(out, f"{out_dir}/rank{rank}.pt")


def test_ddp_gloo_two_ranks_equals_one_process(tmp_path):
    """DDP over 2 CPU processes (gloo) with gradient accumulation: after one SGD step every rank
    holds the parameters of the single-process step on the whole batch, in both online modes."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from tests.test_distributed import _free_port
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for mode in MODES:
        assert all(mode in r for r in ranks), f"{mode}: a rank did not finish"
        ref, ref_loss = _one_step(tmp_path / "single", mode, _rows(), per_device_train_batch_size=4)
        init = dict(_llama(1, 16).double().named_parameters())
        for r in ranks:
            for n, p in r[mode]["params"].items():
                step = ref[n] - init[n].detach()
                tol = dict(rtol=1e-6, atol=1e-6 * float(step.abs().max()))
                torch.testing.assert_close(p - init[n].detach(), step, **tol, msg=lambda m: f"{mode} {n}: {m}")
        assert (ref["lm_head.weight"] - init["lm_head.weight"]).abs().max() > 1e-3
        # each rank logs its own micro-batches' loss; their mean is the whole batch's
        mean = sum(r[mode]["loss"] for r in ranks) / 2
        assert mean == pytest.approx(ref_loss, rel=1e-6)


def test_example_online_teacher_kl_falls_in_both_modes(tmp_path):
    """examples/online_teacher.py, small settings: the held-out full-vocab KL(teacher || student)
    falls by a clear margin in both online modes, and the script exits 0."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "kl.json"
    run = subprocess.run([sys.executable, str(root / "examples" / "online_teacher.py"), "--steps", "12",
                          "--teacher-steps", "30", "--eval-every", "6", "--json", str(out)],
                         capture_output=True, text=True, timeout=120, cwd=root)
    assert run.returncode == 0, run.stdout + run.stderr
    kl = json.loads(out.read_text())
    assert set(kl) == {"topk", "dense"}
    for mode, rows in kl.items():
        curve = [rows[s][1] for s in sorted(rows, key=int)]
        assert len(curve) == 3 and curve[0] > 1.0, (mode, curve)
        assert curve[2] < curve[1] < curve[0] and curve[2] < 0.6 * curve[0], (mode, curve)
    bad = subprocess.run([sys.executable, str(root / "examples" / "online_teacher.py"), "--mode", "both", "--k", "0"],
                         capture_output=True, text=True, timeout=60, cwd=root)
    assert bad.returncode == 2 and "--k must be >= 1" in bad.stderr


def test_online_step_benchmark_smoke(tmp_path, capsys):
    """benchmarks/online_step.py at tiny sizes, 1 round (in this process: the fresh processes of a
    real run only add imports): every method times its steps, ours dense and TRL's chunked loss
    compute the same first-step loss, the table and the JSON are written; bad sizes exit 2."""
    pytest.importorskip("trl")
    import json

    from benchmarks import online_step
    out = tmp_path / "step.json"
    tiny = ["--vocab", "300", "--student-dim", "32", "--teacher-dim", "64", "--layers", "1", "--batch", "2",
            "--seq", "12", "--k", "8", "--steps", "1", "--threads", "1"]
    rows = online_step.main([*tiny, "--temperature", "1.5", "--rounds", "1", "--in-process", "--out", str(out)])
    assert list(rows) == ["topk", "dense", "trl"]
    for r in rows.values():
        assert 0 < r["best_s"] <= r["median_s"] < 60 and r["first_loss"] > 0
    # ours scales by tau**2 (docs/design.md sec. 3), TRL does not
    assert rows["dense"]["first_loss"] == pytest.approx(1.5 ** 2 * rows["trl"]["first_loss"], rel=1e-4)
    assert rows["topk"]["first_loss"] != pytest.approx(rows["dense"]["first_loss"], rel=1e-3)
    saved = json.loads(out.read_text())
    assert saved["config"]["vocab"] == 300 and len(saved["runs"]["trl"]) == 1
    assert "| dense |" in capsys.readouterr().out
    for bad in (["--k", "301"], ["--methods", "topk,foo"], ["--seq", "1"]):
        with pytest.raises(SystemExit) as e:
            online_step.main([*tiny, *bad])
        assert e.value.code == 2
