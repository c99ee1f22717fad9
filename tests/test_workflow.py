"""The DFT workflow from the command line (docs/design.md sec. 7) on tiny models: presets,
blend (a real SIGKILL and resume), train (offline targets, SFT, online teacher top-k / dense,
a killed run resumed), eval, plan, and bad input -> exit code 2. Through cli.main in-process,
as a subprocess where a real process matters (kills, the entry point)."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")

import dft_kernels as dk  # noqa: E402
from dft_kernels import targets as T  # noqa: E402
from dft_kernels.cli import main  # noqa: E402
from dft_kernels.targets.store import _TMP_PREFIX  # noqa: E402
from dft_kernels.workflow.presets import set_preset  # noqa: E402

V = 64


def _cli(*args, timeout=240):
    env = dict(os.environ, TRITON_INTERPRET="1", TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "dft_kernels.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def _llama(seed, path, scale=1.0, vocab=V):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=64)
    m = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        m.lm_head.weight.mul_(scale)
    m.save_pretrained(path)
    return path


def _jsonl(path, seqs):
    path.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in seqs))
    return path


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("wf")
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, V, (int(torch.randint(3, 10, (1,), generator=g)),), generator=g).tolist()
            for _ in range(7)]
    w = {"root": root, "seqs": seqs, "data": _jsonl(root / "data.jsonl", seqs),
         "t1": _llama(1, root / "teacher1", 20.0), "t2": _llama(2, root / "teacher2", 20.0),
         "student": _llama(3, root / "student")}
    presets = root / "presets"
    for name, t, k in (("literary", w["t1"], 6), ("conversational", w["t2"], 4)):
        T.build(t, [seqs[i:i + 3] for i in range(0, 7, 3)], k, out_dir=presets / name, shard_size=3,
                progress=False)
        set_preset(presets / name, name, f"{name} style")
    w["presets"] = presets
    return w


def _load_dir(d):
    man = T.read_manifest(d)
    parts = [T.read_shard(d / e["file"])[0] for e in man["shards"]]
    return torch.cat([p["index"] for p in parts]), torch.cat([p["logprobs"] for p in parts])


def _dense(idx, lp):
    p = torch.zeros(idx.shape[0], V, dtype=torch.float64)
    ok = idx >= 0
    rows = torch.arange(idx.shape[0]).unsqueeze(1).expand_as(idx)
    p.index_put_((rows[ok], idx[ok].long()), lp[ok].double().exp(), accumulate=True)
    return p


def test_list_and_blend_by_name_then_resume(world, tmp_path, capsys):
    assert main(["targets", "list", str(world["presets"])]) == 0
    listed = capsys.readouterr().out
    assert "literary" in listed and "conversational style" in listed
    out = tmp_path / "mix"
    # in-process (test_blend_sigkill_then_resume drives blend as a subprocess)
    assert main(["targets", "blend", "literary", "conversational", "--weights", "0.7", "0.3", "--k", "5",
                 "--presets", str(world["presets"]), "--out", str(out), "--name", "mix", "--quiet"]) == 0
    man = T.read_manifest(out)
    assert man["complete"] and man["name"] == "mix" and man["k"] == 5 and len(man["shards"]) == 3
    # float64 reference: the dense mixture, its 5 largest entries per row
    ia, la = _load_dir(world["presets"] / "literary")
    ib, lb = _load_dir(world["presets"] / "conversational")
    mix = 0.7 * _dense(ia, la) + 0.3 * _dense(ib, lb)
    ref = mix.topk(5, dim=-1).values
    io, lo = _load_dir(out)
    got = torch.where(io >= 0, lo.double().exp(), torch.zeros_like(lo, dtype=torch.float64))
    torch.testing.assert_close(got.sort(-1, descending=True).values, ref, atol=2e-3, rtol=2e-3)   # fp16 storage
    ok = io >= 0
    assert torch.equal(mix.gather(1, io.clamp(min=0).long())[ok] > 0, torch.ones_like(ok[ok]))
    # a crash: the last shard truncated, a temp file left behind, the manifest not complete
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "shard-00002.safetensors").write_bytes(before["shard-00002.safetensors"][:50])
    (out / ".dft-tmp-shard-00002.safetensors.x").write_bytes(b"junk")
    m = json.loads(before["manifest.json"])
    m["complete"] = False
    (out / "manifest.json").write_text(json.dumps(m))
    # the resume in-process (a subprocess above already drove the command end to end)
    assert main(["targets", "blend", str(world["presets"] / "literary"), str(world["presets"] / "conversational"),
                 "--weights", "0.7", "0.3", "--k", "5", "--out", str(out), "--name", "mix", "--quiet"]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_blend_sigkill_then_resume(world, tmp_path):
    """A real crash: `targets blend` as a subprocess, SIGKILLed once its first output shard
    exists; the same command again keeps that shard and finishes; the result is byte for
    byte an uninterrupted blend, with no temp file left."""
    g = torch.Generator().manual_seed(7)
    seqs = torch.randint(0, V, (512, 16), generator=g)
    srcs = []
    for t in ("t1", "t2"):                      # 64 shards of 8 sequences: the blend takes seconds
        T.build(world[t], [seqs[i:i + 256] for i in range(0, 512, 256)], 16, out_dir=tmp_path / t, shard_size=8,
                progress=False)
        srcs.append(str(tmp_path / t))
    out = tmp_path / "mix"

    def argv(dest):
        return ["targets", "blend", *srcs, "--weights", "0.6", "0.4", "--k", "12", "--out", str(dest), "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "dft_kernels.cli", *argv(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = out / T.shard_name(0)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not first.exists():
        time.sleep(0.005)
    running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert running and first.exists(), f"the blend ended before it could be killed: {err.decode()[-500:]}"
    shards = sorted(p.name for p in out.glob("shard-*"))
    man = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {}
    assert not man.get("complete") and 1 <= len(shards) < 64, (len(shards), man.get("complete"))
    kept = first.stat().st_ino
    assert main(argv(out)) == 0                                     # the same command, re-run
    assert first.stat().st_ino == kept                              # the verified shard was kept, not redone
    assert main(argv(tmp_path / "ref")) == 0                        # uninterrupted
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert not [n for n in files if n.startswith(_TMP_PREFIX)]
    assert files == {p.name: p.read_bytes() for p in (tmp_path / "ref").iterdir()}
    man = T.read_manifest(out)
    assert man["complete"] and len(man["shards"]) == 64 and man["n_sequences"] == 512


def test_blend_refuses_other_examples_vocab_and_weights(world, tmp_path, capsys):
    other = tmp_path / "other"
    seqs = [s[:-1] or [1] for s in world["seqs"]]
    T.build(world["t1"], [seqs], 4, out_dir=other, shard_size=3, progress=False)
    lit = world["presets"] / "literary"
    cases = [([lit, other], "different sequences"),
             ([lit, world["presets"] / "conversational", "--weights", "0.5"], "--weights has 1 values"),
             ([lit, world["presets"] / "conversational", "--weights", "-1", "2"], "must be finite and > 0"),
             ([lit, "nosuchpreset", "--presets", world["presets"]], "neither a targets directory"),
             ([lit, world["presets"] / "conversational", "--k", str(V + 1)], "larger than the vocab")]
    capsys.readouterr()
    for extra, msg in cases:
        assert main(["targets", "blend", *map(str, extra), "--out", str(tmp_path / "o"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1 and err.startswith("error: "), (extra, err)


def test_dk_blend_names_both_sides():
    a = dk.SparseTargets(torch.tensor([[0, 1]]), torch.log(torch.tensor([[0.5, 0.25]])),
                         {"input_ids_sha256": "aa", "vocab_size": 10})
    b = dk.SparseTargets(torch.tensor([[1, 2]]), torch.log(torch.tensor([[0.5, 0.25]])),
                         {"input_ids_sha256": "bb", "vocab_size": 10})
    with pytest.raises(ValueError, match=r"targets\[0\] and targets\[1\] .*different sequences.*'aa' vs 'bb'"):
        dk.blend([a, b])
    b.metadata.update(input_ids_sha256="aa", vocab_size=12)
    with pytest.raises(ValueError, match=r"targets\[0\] and targets\[1\] .*vocab sizes.*10 vs 12"):
        dk.blend([a, b])
    b.metadata["vocab_size"] = 10
    out = dk.blend([a, b], [0.5, 0.5])
    assert out.metadata["input_ids_sha256"] == "aa"
    torch.testing.assert_close(out.logprobs[0, 0].double().exp(), torch.tensor(0.5 * 0.25 + 0.5 * 0.5,
                                                                                dtype=torch.float64))


def test_train_offline_kill_and_resume_then_eval(world, tmp_path, capsys):
    out = tmp_path / "dft"
    args = ["train", "--student", world["student"], "--data", world["data"], "--targets",
            world["presets"] / "literary", "--out", out, "--batch-size", "2", "--max-steps", "8", "--save-steps",
            "2", "--logging-steps", "2", "--lr", "1e-2", "--quiet"]
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "dft_kernels.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not (out / "checkpoint-2" / "trainer_state.json").exists():
        time.sleep(0.05)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed, "the run finished before it could be killed"
    assert not (out / "train_summary.json").exists()
    assert main([*map(str, args), "--resume"]) == 0          # the resume in-process: one interpreter start less
    assert "trained 8 steps" in capsys.readouterr().out
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 8 and "checkpoint-" in summary["resumed_from"]
    assert summary["last_divergence"] is not None and summary["last_loss"] < summary["first_loss"]

    rep = tmp_path / "report"
    r = _cli("eval", "--model", world["student"], out, "--data", world["data"], "--targets",
             world["presets"] / "literary", "--teacher", world["t1"], "--generate", "3", "--max-new-tokens", "6",
             "--out", rep)
    assert r.returncode == 0, r.stderr
    report = json.loads((rep / "report.json").read_text())
    base, tuned = report["models"]
    assert (rep / "report.png").read_bytes()[:4] == b"\x89PNG" and "| model |" in (rep / "report.md").read_text()
    for row in report["models"]:
        assert row["sparse_kl"] <= row["full_kl"] + 1e-3      # the bucket KL is a lower bound
        assert 0 <= row["distinct_2"] <= 1 and math.isclose(row["perplexity"], math.exp(row["ce"]), rel_tol=1e-9)
    assert tuned["sparse_kl"] < base["sparse_kl"]
    # float64 references of the base student: CE, and the full-vocab KL(teacher || student) per position
    m = transformers.AutoModelForCausalLM.from_pretrained(world["student"]).double()
    t = transformers.AutoModelForCausalLM.from_pretrained(world["t1"]).double()
    tot = n = kl = pos = 0
    with torch.no_grad():
        for s in world["seqs"]:
            ls = m(input_ids=torch.tensor([s])).logits[0].log_softmax(-1)
            lt = t(input_ids=torch.tensor([s])).logits[0].log_softmax(-1)
            tot += -ls[:-1].gather(1, torch.tensor(s[1:])[:, None]).sum().item()
            n += len(s) - 1
            kl += (lt.exp() * (lt - ls)).sum().item()
            pos += len(s)
    assert base["ce"] == pytest.approx(tot / n, rel=1e-4)
    assert base["full_kl"] == pytest.approx(kl / pos, rel=1e-4)


def test_train_online_teacher_topk_and_dense(world, tmp_path, capsys):
    """`train --teacher DIR --online topk|dense`: trains, writes train_summary.json, logs the loss
    parts; the teacher is really used (the student as its own teacher: divergence 0 at step 1;
    another teacher: > 0, the top-k bucket KL below the dense KL on the same first batch)."""
    first = {}
    for mode, who in (("topk", "t1"), ("dense", "t1"), ("topk", "student"), ("dense", "student")):
        out = tmp_path / f"{mode}-{who}"
        assert main(["train", "--student", str(world["student"]), "--data", str(world["data"]), "--teacher",
                     str(world[who]), "--online", mode, "--k", "8", "--lam", "0.5", "--out", str(out),
                     "--batch-size", "4", "--max-steps", "2", "--logging-steps", "1", "--lr", "1e-2", "--quiet"]) == 0
        line = capsys.readouterr().out.strip().splitlines()[-1]
        assert line.startswith("trained 2 steps") and "(divergence " in line and "n/a" not in line, line
        s = json.loads((out / "train_summary.json").read_text())
        assert s["steps"] == 2 and s["dft_config"]["teacher"] == mode
        assert s["dft_config"]["k"] == (8 if mode == "topk" else None)      # dense keeps every slot: no K
        logs = [h for h in s["log_history"] if "loss" in h]
        assert len(logs) == 2
        for h in logs:                                   # loss = divergence + lam * accuracy, each logged
            assert h["loss"] == pytest.approx(h["dft_divergence"] + 0.5 * h["dft_accuracy"], abs=2e-3)
        assert (out / "model.safetensors").exists()
        first[mode, who] = logs[0]["dft_divergence"]
    assert first["topk", "student"] < 1e-4 and first["dense", "student"] < 1e-4, first
    assert first["topk", "t1"] > 0.05 and first["dense", "t1"] >= first["topk", "t1"] - 1e-3, first
    # bad combos that need the models loaded: K beyond the vocab, a teacher with another vocab
    other = _llama(5, tmp_path / "v80", vocab=80)
    base = ["train", "--student", str(world["student"]), "--data", str(world["data"]), "--out", str(tmp_path / "x")]
    for extra, msg in ((["--teacher", str(world["t1"]), "--online", "topk", "--k", str(V + 1)],
                        f"--k {V + 1} is larger"),
                       (["--teacher", str(other), "--online", "dense"], "has vocab size 80")):
        assert main(base + extra) == 2
        last = capsys.readouterr().err.rstrip("\n").split("\n")[-1]
        assert last.startswith("error: ") and msg in last, last


def test_train_sft_from_yaml_and_hf_flags(world, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("batch_size: 4\nlr: 0.01\nhf:\n  warmup_steps: 1\n")
    out = tmp_path / "sft"
    assert main(["train", "--student", str(world["student"]), "--data", str(world["data"]), "--out", str(out),
                 "--config", str(cfg), "--max-steps", "3", "--hf-weight_decay", "0.1", "--quiet"]) == 0
    s = json.loads((out / "train_summary.json").read_text())
    assert s["steps"] == 3 and s["dft_config"]["lam"] == 1.0 and s["last_divergence"] is None
    targs = torch.load(out / "training_args.bin", weights_only=False)
    assert targs.per_device_train_batch_size == 4 and targs.learning_rate == 0.01
    assert targs.warmup_steps == 1 and targs.weight_decay == 0.1


def test_bad_input_exit_2_one_line(world, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    notjson = tmp_path / "bad.jsonl"
    notjson.write_text('{"input_ids": [1]}\n{oops\n')
    st, d = str(world["student"]), str(world["data"])
    cases = [(["targets", "build", "--teacher", str(world["t1"]), "--data", str(empty), "--out", "o"], "no examples"),
             (["targets", "build", "--teacher", str(world["t1"]), "--data", str(notjson), "--out", "o"], "bad.jsonl:2"),
             (["targets", "build", "--teacher", str(world["t1"]), "--data", d, "--k", str(V + 1), "--out",
               str(tmp_path / "o")], "--k 65 is larger"),
             (["train", "--student", st, "--data", str(tmp_path / "nope.jsonl"), "--out", "o"], "does not exist"),
             (["train", "--student", st, "--data", d, "--out", "o", "--hf-nonsense", "1"], "--hf-nonsense"),
             (["train", "--student", st, "--data", d, "--out", "o", "--bogus"], "--bogus"),
             (["train", "--student", str(tmp_path), "--data", d, "--out", "o"], "--student"),
             (["train", "--student", st, "--data", d, "--out", str(tmp_path / "fresh"), "--resume"], "--resume"),
             (["eval", "--model", st, "--data", str(empty), "--out", "o"], "no examples"),
             (["plan", "--model", "llama-9", "--tokens", "8"], "known name"),
             (["plan", "--model", "gemma-2-2b", "--tokens", "8", "--k", "300000"], "larger than the vocab")]
    for argv, msg in cases:
        assert main(argv) == 2, argv
        last = capsys.readouterr().err.rstrip("\n").split("\n")[-1]   # (model loading may draw a bar before)
        assert msg in last and last.startswith("error: "), (argv, last)
    r = _cli("plan", "--model", "llama-9", "--tokens", "8")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: --model")
