"""The command line refuses what would be silently wrong and warns on what is legal but
surprising (docs/design.md sec. 7): a resumed run of other settings, teacher and student
tokenizers with other ids, eval's sparse and full KL from two teachers, --lam on the SFT
path, sequences past a model's positions, devices that are not there, and the smaller
confusions (ignored --k, flags vs --hf-KEY, logging, --quiet, targets list, plan units,
the eval plot). Tiny models, through cli.main in-process."""
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dft_kernels import targets as T  # noqa: E402
from dft_kernels.cli import _parse, main  # noqa: E402

V = 64
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _llama(seed, path, vocab=V, max_pos=64, tokenizer_perm=None):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=max_pos)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    if tokenizer_perm is not None:        # a word-level tokenizer "w0".."w62", "[UNK]" with ids permuted
        from tokenizers import Tokenizer, models, pre_tokenizers
        words = [f"w{i}" for i in range(vocab - 1)] + ["[UNK]"]
        tok = Tokenizer(models.WordLevel(vocab={w: int(tokenizer_perm[i]) for i, w in enumerate(words)},
                                         unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    return path


def _gpt2(path, n_positions=16):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=1, n_head=2, n_positions=n_positions,
                                  bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def _jsonl(path, seqs):
    path.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in seqs))
    return path


def _seqs(seed, n=6, lo=3, hi=10):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    root = tmp_path_factory.mktemp("guards")
    seqs = _seqs(1)
    ident = list(range(V))
    perm = list(range(V))
    perm[1], perm[2] = perm[2], perm[1]               # the same words and size, two ids swapped
    d = {"root": root, "seqs": seqs, "data": _jsonl(root / "data.jsonl", seqs),
         "data2": _jsonl(root / "data2.jsonl", _seqs(2)),
         "student": _llama(3, root / "student", tokenizer_perm=ident),
         "teacher": _llama(1, root / "teacher", tokenizer_perm=ident),
         "teacher_perm": _llama(1, root / "teacher_perm", tokenizer_perm=perm),
         "teacher2": _llama(2, root / "teacher2", tokenizer_perm=ident)}
    for name, t, k in (("tA", "teacher", 6), ("tB", "teacher2", 4)):
        T.build(str(d[t]), [seqs], k, out_dir=root / name, progress=False)
        d[name] = root / name
    return d


def _err_line(capsys):
    err = capsys.readouterr().err.rstrip("\n").split("\n")
    return err[-1]


def _train(w, out, *extra, steps=2):
    return ["train", "--student", str(w["student"]), "--data", str(w["data"]), "--out", str(out), "--batch-size",
            "3", "--max-steps", str(steps), "--save-steps", "1", "--logging-steps", "1", "--quiet",
            *map(str, extra)]


# --------------------------------------------------------------------------- 1. resume only the same run


def test_train_resumes_only_the_same_run(w, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train(w, out, "--targets", w["tA"], "--lam", "0.2")) == 0
    assert (out / "checkpoint-2").is_dir()
    capsys.readouterr()
    # the same run, longer: resumed
    assert main(_train(w, out, "--targets", w["tA"], "--lam", "0.2", steps=3)) == 0
    assert "resuming from" in capsys.readouterr().out
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 3
    # other targets, lam, data, student, divergence: refused, naming what changed and the fix
    cases = [(["--targets", w["tB"], "--lam", "0.2"], "--targets"),
             (["--targets", w["tA"], "--lam", "0.5"], "lam 0.2 -> 0.5"),
             (["--targets", w["tA"], "--lam", "0.2", "--divergence", "reverse_kl"],
              "divergence forward_kl -> reverse_kl")]
    for extra, what in cases:
        assert main(_train(w, out, *extra, steps=4)) == 2, extra
        last = _err_line(capsys)
        assert last.startswith("error: --out") and what in last and "--overwrite" in last and "new --out" in last, last
    assert (out / "run_fingerprint.json").is_file()                 # written before training, atomically
    argv = _train(w, out, "--targets", w["tA"], steps=4)
    argv[argv.index("--data") + 1] = str(w["data2"])
    argv += ["--overwrite"]
    # --overwrite still needs targets that match the data: a new run on data2 with tA is refused by the dataset
    assert main(argv) == 2
    argv = _train(w, out, steps=1) + ["--overwrite"]      # SFT, started over
    assert main(argv) == 0
    s = json.loads((out / "train_summary.json").read_text())
    assert s["resumed_from"] is None and s["steps"] == 1
    other = _train(w, out, steps=2)
    other[other.index("--student") + 1] = str(w["teacher"])
    assert main(other) == 2
    assert "the --student weights" in _err_line(capsys)
    assert main(_train(w, out, steps=2) + ["--resume", "--overwrite"]) == 2
    assert "contradict" in _err_line(capsys)


def test_train_refuses_a_foreign_run_without_fingerprint(w, tmp_path, capsys):
    out = tmp_path / "old"
    (out / "checkpoint-5").mkdir(parents=True)
    (out / "checkpoint-5" / "trainer_state.json").write_text("{}")
    assert main(_train(w, out)) == 2
    last = _err_line(capsys)
    assert "run_fingerprint.json" in last and "--overwrite" in last, last


# --------------------------------------------------------------------------- 2. online tokenizers


@pytest.mark.parametrize("mode", ["topk", "dense"])
def test_online_teacher_with_other_token_ids_is_refused(w, tmp_path, capsys, mode):
    argv = _train(w, tmp_path / "o", "--teacher", w["teacher_perm"], "--online", mode)
    assert main(argv) == 2
    last = _err_line(capsys)
    assert "different tokenizers" in last and "same vocab size 64" in last and "--teacher" in last, last


def test_eval_teacher_with_other_token_ids_is_refused(w, tmp_path, capsys):
    assert main(["eval", "--model", str(w["student"]), "--data", str(w["data"]), "--teacher",
                 str(w["teacher_perm"]), "--out", str(tmp_path / "r")]) == 2
    last = _err_line(capsys)
    assert "different tokenizers" in last and "--model" in last and "--teacher" in last, last


# --------------------------------------------------------------------------- 7. eval: one teacher


def test_eval_targets_and_teacher_must_be_one_teacher(w, tmp_path, capsys):
    base = ["eval", "--model", str(w["student"]), "--data", str(w["data"])]
    assert main(base + ["--targets", str(w["tA"]), "--teacher", str(w["teacher2"]), "--out", str(tmp_path / "a")]) == 2
    last = _err_line(capsys)
    assert "--targets" in last and "--teacher" in last and "different teachers" in last, last
    assert main(base + ["--targets", str(w["tA"]), "--teacher", str(w["teacher"]), "--out", str(tmp_path / "b")]) == 0
    row = json.loads((tmp_path / "b" / "report.json").read_text())["models"][0]
    assert row["sparse_kl"] <= row["full_kl"] + 1e-3


# --------------------------------------------------------------------------- 4. SFT and --lam


def test_sft_warns_on_lam_and_records_weight_one(w, tmp_path, capsys):
    assert main(_train(w, tmp_path / "sft", "--lam", "0.3", steps=1)) == 0
    err = capsys.readouterr().err
    assert err.count("warning: --lam") == 1 and "does not apply" in err, err
    s = json.loads((tmp_path / "sft" / "train_summary.json").read_text())
    assert s["accuracy_weight"] == 1.0 and s["dft_config"]["lam"] == 1.0 and s["dft_config"]["k"] is None
    assert main(_train(w, tmp_path / "sft2", steps=1)) == 0
    assert "warning" not in capsys.readouterr().err


# --------------------------------------------------------------------------- crashes -> exit 2


def test_positions_past_the_model(w, tmp_path, capsys):
    gpt2 = _gpt2(tmp_path / "gpt2", n_positions=16)
    long = _jsonl(tmp_path / "long.jsonl", [list(range(20)), [1, 2, 3]])
    assert main(["targets", "build", "--teacher", str(gpt2), "--data", str(long), "--k", "4", "--out",
                 str(tmp_path / "t"), "--quiet"]) == 2
    last = _err_line(capsys)
    assert "has 20 tokens" in last and "--max-length 16" in last and "--teacher" in last, last
    assert main(["train", "--student", str(gpt2), "--data", str(long), "--out", str(tmp_path / "g"), "--quiet"]) == 2
    assert "--max-length 16" in _err_line(capsys)
    assert main(["eval", "--model", str(gpt2), "--data", str(long), "--out", str(tmp_path / "e"), "--quiet"]) == 2
    assert "--max-length 16" in _err_line(capsys)
    # --max-length 16 fixes it
    assert main(["targets", "build", "--teacher", str(gpt2), "--data", str(long), "--k", "4", "--out",
                 str(tmp_path / "t"), "--max-length", "16", "--quiet"]) == 0
    # a rotary model past max_position_embeddings runs, with one warning
    rope = _llama(4, tmp_path / "rope", max_pos=8)
    assert main(["train", "--student", str(rope), "--data", str(long), "--out", str(tmp_path / "r"), "--max-steps",
                 "1", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "past the 8 positions" in err, err


def test_devices_that_are_not_there(w, tmp_path, capsys):
    base = ["targets", "build", "--teacher", str(w["teacher"]), "--data", str(w["data"]), "--out",
            str(tmp_path / "t"), "--quiet", "--device"]
    cases = [("meta", "--device meta")] + ([] if torch.cuda.is_available() else [("cuda", "CUDA is not available")])
    cases.append(("nonsense", "is not a device"))
    for dev, msg in cases:
        assert main(base + [dev]) == 2, dev
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err, err


def test_eval_missing_model_names_the_model(w, tmp_path, capsys):
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "w1 w2 w3"}\n')
    assert main(["eval", "--model", str(tmp_path / "nosuch"), "--data", str(text), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model" in err and "nosuch" in err and "tokenizer" not in err, err


# --------------------------------------------------------------------------- confusions


def test_k_ignored_warns_and_summary_records_the_targets_k(w, tmp_path, capsys):
    assert main(_train(w, tmp_path / "a", "--targets", w["tA"], "--k", "16", steps=1)) == 0
    err = capsys.readouterr().err
    assert "warning: --k 16 is ignored with --targets" in err and "K (6)" in err, err
    assert json.loads((tmp_path / "a" / "train_summary.json").read_text())["dft_config"]["k"] == 6
    assert main(_train(w, tmp_path / "b", "--teacher", w["teacher"], "--online", "dense", "--k", "8", steps=1)) == 0
    assert "warning: --k 8 is ignored with --online dense" in capsys.readouterr().err
    assert json.loads((tmp_path / "b" / "train_summary.json").read_text())["dft_config"]["k"] is None


def test_eval_data_with_targets_refused_up_front_and_documented(w, tmp_path, capsys):
    assert main(_train(w, tmp_path / "x", "--targets", w["tA"], "--eval-data", w["data"])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dft-kernels eval --targets" in err, err     # before any model is loaded
    from dft_kernels.cli import make_parser
    sub = next(a for a in make_parser()._actions if a.dest == "command").choices["train"]
    assert "without --targets only" in " ".join(sub.format_help().split())


def test_logging_past_max_steps_still_reports_a_loss(w, tmp_path, capsys):
    argv = _train(w, tmp_path / "l", steps=2)
    argv[argv.index("--logging-steps") + 1] = "10"
    assert main(argv) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "n/a" not in line and "loss" in line, line


def test_quiet_hides_the_weight_loading_bar(w, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TQDM_DISABLE", None)
    r = subprocess.run([sys.executable, "-m", "dft_kernels.cli", *_train(w, tmp_path / "q", steps=1)],
                       capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Loading" not in r.stderr and "it/s" not in r.stderr, r.stderr[-1000:]


def test_hf_field_wins_over_flag_with_a_warning(w, tmp_path, capsys):
    from dft_kernels.workflow.train import training_arguments
    args = _parse(["train", "--student", "s", "--data", "d", "--out", str(tmp_path / "o"), "--batch-size", "8",
                   "--hf-per_device_train_batch_size", "4"])
    targs = training_arguments(args, args.hf_overrides)
    assert targs.per_device_train_batch_size == 4
    assert "--hf-per_device_train_batch_size 4 wins over --batch-size 8" in capsys.readouterr().err
    args = _parse(["train", "--student", "s", "--data", "d", "--out", str(tmp_path / "o"),
                   "--hf-per_device_train_batch_size", "4"])
    assert training_arguments(args, args.hf_overrides).per_device_train_batch_size == 4
    assert "warning" not in capsys.readouterr().err                   # only one of the two given: no warning
    from dft_kernels.cli import make_parser
    sub = next(a for a in make_parser()._actions if a.dest == "command").choices["train"]
    assert "--hf-per_device_train_batch_size wins" in next(a.help for a in sub._actions if a.dest == "batch_size")


def test_targets_list_recurses(w, tmp_path, capsys):
    deep = tmp_path / "presets" / "team" / "2024"
    deep.mkdir(parents=True)
    shutil.copytree(w["tA"], deep / "tA")
    shutil.copytree(w["tB"], tmp_path / "presets" / "tB")
    assert main(["targets", "list", str(tmp_path / "presets"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(Path(r["path"]).name for r in rows) == ["tA", "tB"]


def test_gpu_session_script_uses_the_venv(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(ROOT / "benchmarks" / "gpu_session.sh", tmp_path / "benchmarks" / "gpu_session.sh")
    fake = tmp_path / ".venv" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/bin/sh\necho "venv python $*"\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    r = subprocess.run(["bash", str(tmp_path / "benchmarks" / "gpu_session.sh"), "--dry-run"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "venv python -m benchmarks.gpu_session --dry-run", r


def test_plan_k0_units_and_master_weights(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                               "num_attention_heads": 2}))
    assert main(["plan", "--model", str(cfg), "--tokens", "64", "--k", "0"]) == 0
    text = capsys.readouterr().out
    assert "K=0 (plain cross-entropy)" in text and "4.66 K parameters" in text and " 0.00 " not in text, text
    assert "updating the bf16 weights directly" in text and "--master-weights" in text
    assert main(["plan", "--model", "llama-3-8b", "--tokens", "8", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["plan", "--model", "llama-3-8b", "--tokens", "8", "--json", "--master-weights"]) == 0
    master = json.loads(capsys.readouterr().out)
    assert master["bytes"]["optimizer"] - plain["bytes"]["optimizer"] == 4 * plain["trained_params"]
    assert plain["optimizer_bytes_per_param"] == 8 and master["optimizer_bytes_per_param"] == 12


def _png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_eval_plot_is_a_grid_with_a_reference(tmp_path):
    from dft_kernels.workflow.evaluate import markdown_table, write_report
    rows = [{"model": f"runs/m{i}", "ce": 4.0 - i, "perplexity": [60.0, 9.0, 8.0][i], "sparse_kl": 1.0 - 0.3 * i,
             "full_kl": 1.5 - 0.3 * i, "student_mass": 0.2 + 0.2 * i, "distinct_1": 0.9 - 0.2 * i,
             "distinct_2": 0.95 - 0.2 * i, "type_token_ratio": 0.9 - 0.1 * i} for i in range(3)]
    report = {"data": "d.jsonl", "n_sequences": 3, "models": rows,
              "reference": {"distinct_1": 0.5, "distinct_2": 0.6, "type_token_ratio": 0.7}}
    write_report(report, tmp_path)
    width, height = _png_size(tmp_path / "report.png")
    assert width <= 2.5 * height, (width, height)                   # a grid, not one long row
    md = (tmp_path / "report.md").read_text()
    assert "closer to the reference" in md and "reference: the held-out data" in markdown_table(report)
