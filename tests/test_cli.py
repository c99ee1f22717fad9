"""The `dft-kernels` command: targets build / inspect, through main([...])."""
import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dft_kernels import targets as dkt  # noqa: E402
from dft_kernels.cli import main  # noqa: E402
from dft_kernels.data import DFTTargetsDataset  # noqa: E402

V = 300


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
