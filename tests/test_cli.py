"""The `dft-kernels` command through main([...]): targets build / inspect / list, bad input
(exit code 2, one line), and `plan`'s loss-path bytes against measured CPU peaks."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dft_kernels import targets as dkt  # noqa: E402
from dft_kernels.cli import main  # noqa: E402
from dft_kernels.data import DFTTargetsDataset  # noqa: E402

V = 300


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny random Llama with a word-level tokenizer ("w0" .. "w298", "[UNK]")."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    path = tmp_path_factory.mktemp("cli") / "teacher"
    model.save_pretrained(path)
    vocab = {f"w{i}": i for i in range(V - 1)}
    vocab["[UNK]"] = V - 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    return path


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _examples(n=7):
    g = torch.Generator().manual_seed(5)
    return [{"input_ids": torch.randint(0, V, (int(torch.randint(2, 12, (1,), generator=g)),),
                                        generator=g).tolist()} for _ in range(n)]


def test_cli_build_and_inspect(teacher_dir, tmp_path, capsys):
    examples = _examples()
    data = _write_jsonl(tmp_path / "data.jsonl", examples)
    out = tmp_path / "targets"
    rc = main(["targets", "build", "--teacher", str(teacher_dir), "--data", str(data), "--k", "8",
               "--out", str(out), "--batch-size", "3", "--shard-size", "4", "--max-length", "10",
               "--temperature", "1.5", "--quiet"])
    assert rc == 0
    assert "wrote 2 shard(s), 7 sequences" in capsys.readouterr().out
    man = json.loads((out / "manifest.json").read_text())
    assert man["k"] == 8 and man["temperature"] == 1.5 and man["teacher"] == str(teacher_dir)
    truncated = [{"input_ids": e["input_ids"][:10]} for e in examples]
    ds = DFTTargetsDataset(truncated, out, vocab_size=V)          # --max-length truncated the sequences
    assert ds[0]["target_index"].shape == (len(truncated[0]["input_ids"]), 8)

    # the same as the library call
    dkt.build(teacher_dir, [truncated[i:i + 3] for i in range(0, 7, 3)], 8, 1.5, out_dir=tmp_path / "lib",
            shard_size=4, teacher_name=str(teacher_dir), progress=False)
    for name in ("shard-00000.safetensors", "shard-00001.safetensors", "manifest.json"):
        assert (out / name).read_bytes() == (tmp_path / "lib" / name).read_bytes()

    assert main(["targets", "inspect", str(out)]) == 0
    text = capsys.readouterr().out
    info = dkt.inspect(out)
    n_pos = sum(len(e["input_ids"]) for e in truncated)
    assert info["n_positions"] == n_pos and info["k"] == 8 and info["vocab_size"] == V
    assert f"positions:    {n_pos}" in text
    assert "k:            8" in text and f"vocab:        {V}" in text and "temperature:  1.5" in text
    mass = torch.cat([ds[i]["target_logprobs"].exp().sum(-1) for i in range(len(ds))]).double()
    assert info["mass_mean"] == pytest.approx(float(mass.mean()), abs=1e-4)
    p5 = float(mass.sort().values[math.ceil(0.05 * n_pos) - 1])     # inverse-CDF 5th percentile
    assert p5 <= info["mass_p5"] <= p5 + 1e-4 + 1e-6                   # to the histogram's 1e-4
    assert f"mean {info['mass_mean']:.4f}, 5th percentile {info['mass_p5']:.4f}" in text

    assert main(["targets", "inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_positions"] == n_pos


def test_cli_build_from_text(teacher_dir, tmp_path, capsys):
    data = _write_jsonl(tmp_path / "text.jsonl", [{"text": "w1 w2 w3 w250"}, {"text": "w7 w8"}])
    out = tmp_path / "t"
    assert main(["targets", "build", "--teacher", str(teacher_dir), "--data", str(data), "--k", "4",
                 "--out", str(out), "--quiet"]) == 0
    ds = DFTTargetsDataset([{"input_ids": [1, 2, 3, 250]}, {"input_ids": [7, 8]}], out)
    assert ds[0]["target_index"].shape == (4, 4)


def test_cli_errors(teacher_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["targets"])
    assert e.value.code == 2
    assert main(["targets", "build", "--teacher", str(teacher_dir), "--data", str(tmp_path / "nope.jsonl"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"tokens": [1, 2]}])
    assert main(["targets", "build", "--teacher", str(teacher_dir), "--data", str(bad), "--out", str(tmp_path / "o"),
                 "--quiet"]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    try:
        rc = main(["targets", "build", "--teacher", str(teacher_dir), "--data", str(bad), "--out", "o", "--k", "-1"])
    except SystemExit as e:
        rc = e.code
    assert rc == 2 and "--k" in capsys.readouterr().err
    assert main(["targets", "inspect", str(tmp_path)]) == 2
    assert "manifest.json" in capsys.readouterr().err


# --------------------------------------------------------------------------- plan vs measured peaks

#: one loss step in a fresh process; prints the peak resident memory beyond the inputs and the
#: bytes of the returned gradients. glibc serves blocks >= 64 KiB by mmap (freed memory goes back
#: to the OS at once, torch's CPU allocator caches nothing), so the resident set follows the live
#: tensors; VmHWM is reset after the inputs exist (clear_refs 5), so it is the step's own peak.
_PEAK_CHILD = r"""
import ctypes, gc, json, sys
ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)
import torch
import dft_kernels as dk

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

strategy, N, D, V, K = sys.argv[1], *map(int, sys.argv[2:6])
kw = dict(impl="reference") if strategy == "naive" else dict(impl="torch", strategy=strategy)

def inputs(n):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, D, generator=g).requires_grad_()
    w = (torch.randn(V, D, generator=g) * D ** -0.5).requires_grad_()
    idx = torch.randint(0, V, (n, K), generator=g)
    lp = torch.log_softmax(torch.randn(n, K, generator=g), -1) + torch.log(torch.tensor(0.9))
    return h, w, idx, lp, torch.randint(0, V, (n,), generator=g)

def step(h, w, idx, lp, labels):
    dk.fused_linear_dft_loss(h, w, idx, lp, labels, lam=0.2, **kw).backward()
    return (h.grad.numel() + w.grad.numel()) * 4

step(*inputs(64))        # warm-up on a few rows: lazy imports, the thread pool
x = inputs(N)
gc.collect()
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
grads = step(*x)
print(json.dumps({"extra": status("VmHWM") - base, "grads": grads}))
"""


def _measure_peaks(strategies, dims):
    """Each strategy in its own fresh process, all at once (memory is per process: the
    processes do not disturb each other's figures, only each other's time)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("DFT_KERNELS_IMPL", None)
    procs = {s: subprocess.Popen([sys.executable, "-c", _PEAK_CHILD, s, *map(str, dims)], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in strategies}
    out = {}
    for s, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-2000:]
        out[s] = json.loads(stdout.strip().splitlines()[-1])
    return out


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs") or not sys.platform.startswith("linux"),
                    reason="needs Linux's resettable peak RSS (/proc/self/clear_refs)")
def test_plan_loss_path_matches_measured_cpu_peaks(tmp_path, capsys):
    """`plan`'s loss-path bytes (naive / lean / fast) within 20% of the measured CPU peak of
    one fp32 forward + backward of the loss at a shape where the loss path dominates."""
    from dft_kernels.workflow.plan import memory_plan
    N, D, V, K = 2048, 256, 16384, 32
    cfg = dict(vocab_size=V, hidden_size=D, intermediate_size=4 * D, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, tie_word_embeddings=False)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert main(["plan", "--model", str(tmp_path), "--tokens", str(N), "--k", str(K), "--dtype", "fp32",
                 "--kernels", "torch", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["loss_path"] == memory_plan(dict(cfg, name=str(tmp_path)), tokens=N, k=K, dtype="fp32",
                                            kernels="torch")["loss_path"]
    # the measurement returns dH and dW, which the plan counts as gradients, except the fp32 ones
    # "fast" holds from the forward on (its loss path includes them): compare without them
    predicted = dict(plan["loss_path"])
    predicted["fast"] -= V * D * 4 + N * D * 4
    assert predicted["naive"] > 4 * predicted["fast"] > 4 * 2 ** 20      # the three are far apart
    ratio, measured = {}, {}
    for attempt in range(2):                  # memory does not depend on the load; one retry at most
        todo = [s for s in ("naive", "lean", "fast") if not 0.8 <= ratio.get(s, 0) <= 1.2]
        if not todo:
            break
        for s, r in _measure_peaks(todo, (N, D, V, K)).items():
            measured[s] = r["extra"] - r["grads"]
            ratio[s] = measured[s] / predicted[s]
    for s in ("naive", "lean", "fast"):
        print(f"{s}: plan {predicted[s] / 2 ** 20:.1f} MiB, measured {measured[s] / 2 ** 20:.1f} MiB, "
              f"measured / plan = {ratio[s]:.3f}")
    assert all(0.8 <= r <= 1.2 for r in ratio.values()), ratio


# --------------------------------------------------------------------------- list, bad input


def _run(argv) -> int:
    """main(argv)'s exit code, also when argparse ends it with SystemExit."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_targets_list_table_aligns(teacher_dir, tmp_path, capsys):
    seqs = [[1, 2, 3], [4, 5]]
    short = tmp_path / "a"
    long = tmp_path / ("a-much-longer-directory-name-" * 3) / "house-style"
    dkt.build(teacher_dir, [seqs], 4, out_dir=short, progress=False, name="s", description="short one")
    dkt.build(teacher_dir, [seqs], 8, out_dir=long, progress=False, name="house-style-with-a-long-name",
              description="the long one")
    man = json.loads((long / "manifest.json").read_text())
    man["complete"] = False
    (long / "manifest.json").write_text(json.dumps(man))
    assert main(["targets", "list", str(short), str(long)]) == 0
    head, *rows = capsys.readouterr().out.splitlines()
    want = [["s", "topk", "4", str(V), "2", str(short), "short one"],
            ["house-style-with-a-long-name", "topk", "8", str(V), "2", str(long), "the long one  (INCOMPLETE)"]]
    titles = [(m.group(), m.start(), m.end()) for m in re.finditer(r"\S+", head)]
    assert [t for t, _, _ in titles] == ["name", "kind", "k", "vocab", "seqs", "path", "description"]
    for row, cells in zip(rows, want, strict=True):
        for (title, start, end), cell in zip(titles, cells):
            if title in ("k", "vocab", "seqs"):           # numbers end where their header ends
                assert row[:end].endswith(" " + cell) and row[end] == " ", (title, row)
            else:                                         # text starts where its header starts
                assert row[start:].startswith(cell) and row[start - 2:start] in ("  ", ""), (title, row)
    # the long path and name pushed the later columns right, in every row alike
    assert titles[-1][1] >= len(str(long)) + len("house-style-with-a-long-name")


def test_bad_input_every_command_one_line(teacher_dir, tmp_path, capsys):
    """Bad input of each command: exit code 2, exactly one line on stderr naming the
    argument (argparse's own errors included), before any model is loaded."""
    data = _write_jsonl(tmp_path / "data.jsonl", _examples(3))
    notjson = tmp_path / "bad.jsonl"
    notjson.write_text('{"input_ids": [1, 2]}\n\n{"input_ids": [3\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    tg = tmp_path / "tg"
    dkt.build(teacher_dir, [[[1, 2, 3]]], 4, out_dir=tg, progress=False)
    badcfg = tmp_path / "cfg" / "config.json"
    badcfg.parent.mkdir()
    badcfg.write_text("{nope")
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"vocab_size": 10, "hidden_size": 8}))
    st, o = str(teacher_dir), str(tmp_path / "o")
    cases = [
        (["targets", "build", "--teacher", st, "--data", str(data), "--out", o, "--k", "-1"], "argument --k"),
        (["targets", "build", "--teacher", str(tmp_path / "nope"), "--data", str(data), "--out", o], "--teacher"),
        (["targets", "list", str(tmp_path / "nodir")], "is not a directory"),
        (["targets", "blend", str(tg), str(tg), "--weights", "0", "0", "--out", o], "--weights 0.0 0.0"),
        (["targets", "blend", str(tg), str(tg), "--weights", "nan", "1", "--out", o], "finite and > 0"),
        (["targets", "blend", str(tg), str(tg), "--weights", "1", "2", "3", "--out", o], "--weights has 3 values"),
        (["targets", "blend", str(tg), "--out", o], "two or more"),
        (["train", "--student", st, "--data", str(data), "--online", "topk", "--out", o],
         "--online topk needs --teacher"),
        (["train", "--student", st, "--data", str(data), "--teacher", st, "--online", "sparse", "--out", o],
         "argument --online: invalid choice: 'sparse'"),
        (["train", "--student", st, "--data", str(data), "--targets", str(tg), "--teacher", st, "--online", "topk",
          "--out", o], "not both"),
        (["train", "--student", st, "--data", str(data), "--teacher", st, "--out", o], "--teacher needs --online"),
        (["train", "--student", st, "--data", str(data), "--targets", str(tmp_path / "nodir"), "--out", o],
         "--targets"),
        (["train", "--student", st, "--data", str(data), "--out", o, "--max-steps"], "argument --max-steps"),
        (["eval", "--model", st, "--data", str(data), "--targets", str(tmp_path / "nodir"), "--out", o],
         "--targets"),
        (["eval", "--model", st, "--data", str(notjson), "--out", o], "bad.jsonl:3 is not JSON"),
        (["eval", "--model", st, "--data", str(tmp_path / "none.jsonl"), "--out", o], "does not exist"),
        (["eval", "--model", st, "--data", str(empty), "--out", o], "no examples"),
        (["eval", "--model", str(tmp_path / "nope"), "--data", str(data), "--out", o], "--model"),
        (["plan", "--model", "llama-3-8b", "--tokens", "0"], "argument --tokens"),
        (["plan", "--model", str(badcfg.parent), "--tokens", "8"], "is not JSON"),
        (["plan", "--model", str(partial), "--tokens", "8"], "lacks intermediate_size"),
        (["plan", "--model", "llama-3-8b", "--tokens", "8", "--gpu", "tpu"], "argument --gpu"),
    ]
    capsys.readouterr()
    for argv, msg in cases:
        assert _run(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and msg in err, (argv, err)
    # the data errors reach train too (the student is loaded first there: only the last line is ours)
    for bad, msg in ((notjson, "bad.jsonl:3 is not JSON"), (empty, "no examples")):
        assert _run(["train", "--student", st, "--data", str(bad), "--out", o]) == 2
        last = capsys.readouterr().err.rstrip("\n").split("\n")[-1]
        assert last.startswith("error: --data ") and msg in last, last
