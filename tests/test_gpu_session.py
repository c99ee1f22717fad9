"""The one-call GPU session's dry run (tiny shapes, CPU, Triton interpreter) writes
its report with every step passed (benchmarks/gpu_session.py)."""
from __future__ import annotations

import json

from benchmarks import gpu_session


def test_gpu_session_dry_run(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rc = gpu_session.main(["--dry-run", "--out", str(tmp_path), "--name", "dry"])
    report = json.loads((tmp_path / "dry.json").read_text())
    assert [s["exit"] for s in report["steps"]] == [0] * 6, [s["log_tail"] for s in report["steps"]]
    assert rc == 0
    assert report["dry_run"] and report["device"] and report["versions"]
    assert (tmp_path / "dry.md").read_text().startswith("# GPU session dry")
    for backend in ("triton", "torch"):            # each backward backend's sweep wrote its results
        assert (tmp_path / f"dry_sweep-{backend}-gemm.json").exists()
    assert (tmp_path / "dry_sweep-more.json").exists()
    ignored = json.loads((tmp_path / "dry_ignored-rows.json").read_text())
    assert ignored["median_ratio"] > 0 and ignored["args"]["impl"] == "triton"
    distill = json.loads((tmp_path / "dry_distill.json").read_text())
    assert set(distill["results"]) == {"trl", "fast", "lean"}


def test_gpu_session_plan_covers_the_issue():
    steps = gpu_session.plan(False, "x", gpu_session.DEFAULT_OUT)
    sweeps = [s for s in steps if "benchmarks.sweep" in s["argv"]]
    assert {s["env"][gpu_session.GEMM_ENV] for s in sweeps} == {"triton", "torch"}
    argv = " ".join(sweeps[0]["argv"])
    assert "llama3-8b,qwen2.5-7b,gemma2-2b" in argv and "--k 0,32" in argv
    assert all(m in argv for m in ("reference", "torch-lce", "liger-flce", "cce", "ours-fused:triton"))
    more = " ".join(sweeps[1]["argv"])
    assert all(m in more for m in ("ours-fused-fast:triton", "trl-chunked", "liger-jsd", "trl-distill"))
    ignored = next(s for s in steps if "benchmarks.ignored_rows" in s["argv"])
    assert "--impl triton" in " ".join(ignored["argv"]) and "--device cuda" in " ".join(ignored["argv"])
    assert sum(s["timeout_s"] for s in steps) <= 8 * 60 - 20        # the session's 8 minutes, install included
