"""``dft-kernels doctor`` (docs/design.md sec. 16): on the CPU it runs every kernel under
the interpreter at tiny shapes against float64, times the options and prints a verdict
per kernel; its per-user cache holds the fastest choices that "auto" reads."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dft_kernels import cli
from dft_kernels.doctor import cache, checks

KERNELS = {"lse_gather", "linear_lse_gather", "fast", "teacher_topk", "two_head"}


@pytest.fixture
def xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache._MEMO.clear()
    yield tmp_path
    cache._MEMO.clear()


def _doctor(*args, xdg_dir, timeout=300):
    env = dict(os.environ, XDG_CACHE_HOME=str(xdg_dir), TRITON_INTERPRET="1")
    env.pop("DFT_KERNELS_IMPL", None)
    return subprocess.run([sys.executable, "-m", "dft_kernels", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run is benchmarks/gpu_session.sh's")
def test_doctor_json_has_a_verdict_per_kernel(tmp_path):
    out = _doctor("doctor", "--json", "--vocab", "300", "--hidden", "40", "--tokens", "20", xdg_dir=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    assert set(r["verdicts"]) == KERNELS
    assert all(v.startswith("ok") for v in r["verdicts"].values()), r["verdicts"]
    assert r["ok"] and r["environment"]["interpreter"] and r["environment"]["triton_in_range"]
    assert set(r["timings"]) == set(checks.OPTIONS)
    assert all(t["seconds"] > 0 for t in r["timings"].values())
    assert set(r["choices"]) == {"impl", "strategy", "backward_gemm"}
    assert r["head"] == dict(N=20, D=40, V=300, K=4)
    assert not (tmp_path / "dft_kernels").exists()     # nothing saved without --save


def test_doctor_model_dir_and_errors(tmp_path, xdg, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 257, "hidden_size": 32}))
    from dft_kernels.doctor import _head_from_args
    args = cli.make_parser().parse_args(["doctor", "--model", str(tmp_path), "--tokens", "9"])
    assert _head_from_args(args, cuda=True) == checks.Head(N=9, D=32, V=257, K=32)
    assert _head_from_args(args, cuda=False) == checks.Head(N=9, D=32, V=257, K=4)
    assert cli.main(["doctor", "--model", str(tmp_path / "missing")]) == 2
    assert "no config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ex:
        cli.main(["doctor", "--save", "--clear"])
    assert ex.value.code == 2


def test_cache_roundtrip(xdg, capsys):
    path = cache.save({"impl": "torch", "strategy": "lean"}, {"lean": {"seconds": 1.0}}, torch.device("cpu"))
    assert path == xdg / "dft_kernels" / "doctor.json"
    data = json.loads(path.read_text())
    assert data[cache.device_key(torch.device("cpu"))]["choices"] == {"impl": "torch", "strategy": "lean"}
    assert "torch " + torch.__version__ in cache.device_key(torch.device("cpu"))
    assert cache.cached_choice("impl", torch.device("cpu")) is None     # only CUDA devices read it
    with pytest.raises(ValueError, match="unknown doctor choices"):
        cache.save({"impl": "cublas"}, {}, torch.device("cpu"))
    assert cli.main(["doctor", "--clear"]) == 0
    assert "removed" in capsys.readouterr().out and not path.exists()
    assert cache.clear() is False


def test_cached_choice_on_a_cuda_key(xdg, monkeypatch):
    monkeypatch.setattr(cache, "device_key", lambda device=None: "GPU X | sm_89 | versions")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cache.save({"impl": "torch", "backward_gemm": "torch", "strategy": "fast"}, {})
    cuda = torch.device("cuda")
    assert cache.cached_choice("impl", cuda) == "torch"
    assert cache.cached_choice("backward_gemm") == "torch"
    assert cache.cached_choice("strategy", cuda) == "fast"
    # the fused path's backward products read it (an explicit environment variable wins)
    from dft_kernels.ops.linear.config import fused_config
    monkeypatch.delenv("DFT_KERNELS_BACKWARD_GEMM", raising=False)
    assert fused_config((8, 9), torch.bfloat16, 8).backward_gemm == "torch"
    monkeypatch.setenv("DFT_KERNELS_BACKWARD_GEMM", "triton")
    assert fused_config((8, 9), torch.bfloat16, 8).backward_gemm == "triton"


def test_fastest_choices():
    t = {"naive": 5.0, "torch": 3.0, "lean": 2.0, "lean+cublas_bwd": 1.5, "fast": 2.5}
    got = checks.fastest_choices({k: {"seconds": v} for k, v in t.items()})
    assert got == {"impl": "triton", "strategy": "lean", "backward_gemm": "torch"}
    t["torch"] = 1.0
    t["lean"] = None
    got = checks.fastest_choices({k: {"seconds": v} for k, v in t.items()})
    assert got == {"impl": "torch"}
