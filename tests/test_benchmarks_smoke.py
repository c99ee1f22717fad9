"""The benchmark code must keep working: a tiny CPU sweep end to end.

Runs ``python -m benchmarks.sweep --shapes cpu-small --quick`` into a temporary
folder and checks the results JSON, the loss agreement, the reporting of missing
peers, the markdown and the PNG plots. Speed and memory targets are checked by the
benchmarks themselves, never here.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PEER_METHODS = {"liger-kernel": ("liger-flce", "liger-jsd"), "cut-cross-entropy": ("cce",)}


def _run(args, timeout=480):
    env = {k: v for k, v in os.environ.items() if k != "DFT_KERNELS_IMPL"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    _run(["-m", "benchmarks.sweep", "--shapes", "cpu-small", "--device", "cpu", "--quick", "--out", str(out),
          "--name", "smoke"])
    return out, json.loads((out / "smoke.json").read_text())


def test_results_json_fields(smoke_run):
    out, data = smoke_run
    for key in ("run", "date", "command", "argv", "preset", "device", "versions", "ceilings", "memory_method",
                "timing_method", "rows", "all_losses_agree", "plots"):
        assert key in data, key
    assert data["preset"] == "cpu-small" and data["quick"] is True
    assert data["command"].startswith("python -m benchmarks.sweep") and "--quick" in data["command"]
    assert data["device"]["type"] == "cpu" and data["device"]["name"]
    v = data["versions"]
    assert v["torch"] == torch.__version__ and v["triton"] and v["python"]
    for name in ("liger-kernel", "cut-cross-entropy", "torch.nn.functional.linear_cross_entropy"):
        assert isinstance(v["peers"].get(name), str) and v["peers"][name], name
    c = data["ceilings"]
    assert c["matmul_tflops"] > 0 and c["copy_gbps"] > 0
    ok = [r for r in data["rows"] if r["status"] == "ok"]
    assert {"reference", "ours-logits", "ours-fused"} <= {r["method"] for r in ok}
    for r in ok:
        t, m = r["time"], r["memory"]
        assert t["fwd_ms"] > 0 and t["bwd_ms"] > 0 and t["fwd_bwd_ms"] > 0 and t["runs"] >= 1
        for k in ("baseline_bytes", "peak_bytes", "peak_extra_bytes", "grads_bytes", "extra_minus_grads_bytes"):
            assert isinstance(m[k], int), k
        assert m["grads_bytes"] > 0
        assert r["floor"]["bytes"] > 0 and r["floor"]["t_floor_ms"] > 0
        if r["path"] == "fused":
            assert r["floor"]["flops"] == 8 * r["N"] * r["D"] * r["V"] and r["achieved_tflops"] > 0
    # no method crashed: every row is measured, a missing peer, or a documented skip
    for r in data["rows"]:
        assert r["status"] == "ok" or r["status"].startswith(("missing", "skipped")), r["status"]
    assert not (out / "LATEST.md").exists(), "--quick runs must not update LATEST.md"


def test_losses_agree_with_reference(smoke_run):
    _, data = smoke_run
    assert data["all_losses_agree"]
    for r in data["rows"]:
        if r["status"] == "ok" and r["method"] not in ("liger-jsd", "trl-distill"):   # dense teachers
            assert r["agree"] is True, (r["label"], r["N"], r["K"], r.get("loss_rel_diff"))
            assert r["loss_rel_diff"] <= r["loss_rtol"]
    measured = {r["method"] for r in data["rows"] if r["status"] == "ok"}
    if not data["versions"]["peers"]["trl"].startswith("missing"):      # TRL runs on the CPU too
        assert {"trl-chunked", "trl-distill"} <= measured
    assert "ours-fused-fast" in measured


def test_missing_peers_are_listed(smoke_run):
    _, data = smoke_run
    peers = data["versions"]["peers"]
    for dist, methods in PEER_METHODS.items():
        if peers[dist].startswith("missing"):
            for m in methods:
                rows = [r for r in data["rows"] if r["method"] == m]
                assert rows, f"{m} ({dist} missing) has no row"
                assert all(r["status"].startswith("missing") for r in rows)
    md = (Path(smoke_run[0]) / "smoke.md").read_text()
    for dist, st in peers.items():
        assert f"{dist}: {st}" in md


def _importable():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def _cpu_small_cases(peers: dict):
    """The cases and fixed rows of the cpu-small preset on CPU, given the peers' versions."""
    _importable()
    from benchmarks import sweep
    args = sweep.parse_args(["--shapes", "cpu-small", "--quick", "--device", "cpu"])
    return sweep.build_cases(args, sweep.PRESETS["cpu-small"], "cpu", "fp32", {"peers": peers})


def test_missing_peer_becomes_row_without_install():
    """Whatever is installed here: a peer reported missing yields rows saying so."""
    cases, fixed = _cpu_small_cases({"liger-kernel": "missing: ImportError: test",
                                     "cut-cross-entropy": "missing: ImportError: x",
                                     "torch.nn.functional.linear_cross_entropy": "missing: no",
                                     "torch.compile": "torch"})
    by = {}
    for r in fixed:
        by.setdefault(r["method"], set()).add(r["status"])
    assert by["cce"] == {"missing: ImportError: x"}
    assert by["liger-flce"] == by["liger-jsd"] == {"missing: ImportError: test"}
    assert by["torch-lce"] == {"missing: no"}
    assert all(c.method not in ("cce", "liger-flce", "liger-jsd", "torch-lce") for c in cases)


def test_pngs_and_standalone_plot(smoke_run, tmp_path):
    out, data = smoke_run
    pngs = [out / p for p in data["plots"]]
    assert pngs and all(p.read_bytes()[:8] == PNG_MAGIC for p in pngs)
    _run(["-m", "benchmarks.plot", str(out / "smoke.json"), "--out", str(tmp_path / "again")], timeout=120)
    again = sorted(p.name for p in (tmp_path / "again").glob("*.png"))
    assert again == sorted(p.name for p in pngs)


def test_gpu_only_peers_are_skipped_on_cpu():
    """An installed peer whose kernels need CUDA is a skipped row on CPU, not an error."""
    cases, fixed = _cpu_small_cases({"liger-kernel": "0.0", "cut-cross-entropy": "0.0",
                                     "torch.nn.functional.linear_cross_entropy": "torch",
                                     "torch.compile": "torch"})
    assert {"cce", "liger-flce", "liger-jsd"} <= {r["method"] for r in fixed}
    for r in fixed:
        if r["method"] in ("cce", "liger-flce", "liger-jsd"):
            assert r["status"].startswith("skipped"), r["status"]
    assert all(c.method not in ("cce", "liger-flce", "liger-jsd") for c in cases)


def test_memory_model_plans_with_the_library():
    """The memory model takes its columns and temperatures from dft_kernels, not a copy."""
    _importable()
    from benchmarks import memory_model as mm
    assert mm._plan(0, 1.0, 1.0, 1000) == ([1.0], 1, 0)          # pure CE: the label column
    assert mm._plan(8, 0.2, 1.0, 1000) == ([1.0], 9, 1)          # K slots + label, student tail
    assert mm._plan(8, 0.2, 2.0, 1000) == ([1.0, 0.5], 9, 1)     # CE at 1, divergence at tau = 2
    assert mm._plan(8, 0.0, 2.0, 1000) == ([0.5], 8, 1)          # no CE term
    pred = mm.predict_logits_torch(4096, 32000, 32, 4, lam=0.2)
    assert pred["peak_bytes"] > 0 and pred["rss_expected_bytes"] > 0


def test_harness_times_phases_and_rounds():
    """The shared harness: one list per phase, warm-up untimed, the budget cuts repeats after
    the minimum, round-robin interleaves (alternating order when asked)."""
    _importable()
    from benchmarks import harness
    calls = []
    fwd, bwd = harness.time_phases([lambda: calls.append("f") or 2, lambda x: calls.append(("b", x))], warmup=2,
                                   repeats=4, setup=lambda: calls.append("s"))
    assert len(fwd) == len(bwd) == 4 and min(fwd + bwd) >= 0
    assert calls[:3] == ["s", "f", ("b", 2)] and len(calls) == 3 * 6
    assert len(harness.time_calls(lambda: None, repeats=50, budget_s=0.0, min_repeats=3)) == 3
    order = []
    t = harness.round_robin({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 3, warmup=0,
                            alternate=True)
    assert order == ["a", "b", "b", "a", "a", "b"] and [len(v) for v in t.values()] == [3, 3]
    s = harness.summary([3.0, 1.0, 2.0])
    assert s == {"median": 2.0, "best": 1.0, "runs": 3}


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="RSS from /proc (Linux)")
def test_harness_peak_memory_cpu():
    """The CPU peak (RSS) of a block sees a 64 MiB buffer written inside it."""
    _importable()
    from benchmarks import harness
    with harness.PeakMemory("cpu") as pm:
        buf = torch.ones(16 * harness.MiB)      # 64 MiB, written
        del buf
    assert pm.extra >= 60 * harness.MiB


def test_harness_cuda_path(monkeypatch):
    """The GPU path of the harness (CUDA events, synchronize, max_memory_allocated beyond the
    baseline) against a fake torch.cuda: runs anywhere."""
    _importable()
    from benchmarks import harness
    clock, log = [0.0], []

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self):
            clock[0] += 1.0
            self.t = clock[0]

        def synchronize(self):
            log.append("event sync")

        def elapsed_time(self, other):
            return (other.t - self.t) * 1e3            # ms

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("sync"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 100)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: log.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 350)
    with harness.PeakMemory("cuda") as pm:
        times = harness.time_calls(lambda: None, "cuda", warmup=1, repeats=2)
    assert times == [1.0, 1.0] and (pm.base, pm.peak, pm.extra) == (100, 350, 250)
    assert log[:2] == ["sync", "reset"] and log[-1] == "sync" and log.count("event sync") == 2


def test_style_heads_compare_smoke(tmp_path, capsys):
    """benchmarks/style_heads_compare.py at tiny sizes: the task is prepared (and cached), each
    method trains in its own process and reports its parameters, memory, time and KL curve,
    and the JSON / markdown / PNG are written."""
    pytest.importorskip("peft")
    pytest.importorskip("matplotlib")
    from benchmarks import style_heads_compare as shc
    out = tmp_path / "style_heads"
    tiny = ["--vocab", "96", "--hidden", "32", "--layers", "1", "--seq", "12", "--batch", "4", "--k", "4", "--rank",
            "2", "--steps", "3", "--eval-every", "2", "--pre-steps", "3", "--teacher-steps", "3", "--n-train", "16",
            "--n-heldout", "4", "--samples", "2", "--new-tokens", "4", "--work", str(tmp_path / "work"),
            "--out", str(out)]
    assert shc.main(tiny) == 0
    rep = json.loads(out.with_suffix(".json").read_text())
    runs = rep["runs"]
    assert list(runs) == ["style", "lora", "full"]
    assert runs["style"]["trainable_params"] == 2 * (32 + 96)            # A [r, D] + B [V, r]
    assert runs["style"]["trainable_params"] < runs["lora"]["trainable_params"] < runs["full"]["trainable_params"]
    for r in runs.values():
        assert sorted(map(int, r["kl_curve"])) == [0, 2, 3] and r["kl_before"] > 0 and r["step_seconds_median"] > 0
        assert r["peak_step_bytes"] is not None and 0 <= r["diversity"]["distinct_1"] <= 1
    assert rep["runs"]["style"]["kl_before"] == pytest.approx(rep["references"]["base"]["full_kl"])
    assert "| style head (rank 2) |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "work" / "prep.json").is_file()
    with pytest.raises(SystemExit):
        shc.main([*tiny, "--methods", "style,foo"])
