"""Time and peak memory of one online-distillation training step on CPU: ours top-k, ours dense, TRL.

A training step is forward + backward + AdamW step of a tiny Llama student against a wider tiny
Llama teacher run under no_grad.

    python -m benchmarks.online_step [--vocab 32000 --student-dim 256 --teacher-dim 512 --rounds 2 --out r.json]

Methods (same models, same batch, same optimizer; forward KL at ``--temperature``, no CE term):

- ``topk``:  what ``DFTTrainer(teacher_model=..., dft_config=DFTConfig(teacher="topk", k=K))`` does:
  the teacher's top-K from its last hidden states (``dk.teacher_topk``), then the patched
  student's fused loss on those targets.
- ``dense``: ``DFTConfig(teacher="dense")``: the two-head full-vocabulary loss
  (``dk.fused_linear_distill_loss``, ``--strategy``) on both models' last hidden states.
- ``trl``:   TRL's ``_chunked_divergence_loss`` (``trl/trainer/distillation_trainer.py``, beta=0:
  forward KL) on the same hidden states and lm_head weights, as in its ``DistillationTrainer``.

Each method runs in a fresh process, round-robin over ``--rounds``: one warm-up step, then
``--steps`` timed steps (``time.perf_counter``). Memory: growth of the process's peak RSS
(VmHWM, benchmarks/harness.py) from just before the warm-up step to the end, so it includes
the gradients and AdamW's state (the same for every method) plus each method's working memory.
The loss of the first step is reported too: ``dense`` and ``trl`` compute the same quantity.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

METHODS = ("topk", "dense", "trl")
SIZES = (("vocab", 32000), ("student_dim", 256), ("teacher_dim", 512), ("layers", 2), ("batch", 2), ("seq", 128),
         ("k", 32), ("steps", 2), ("threads", 1))


def _llama(vocab: int, dim: int, layers: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=layers,
                      num_attention_heads=max(1, dim // 64), num_key_value_heads=max(1, dim // 128),
                      max_position_embeddings=4096, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def run_one(method: str, cfg: dict) -> dict:
    """``cfg["steps"]`` timed training steps of ``method`` (after one warm-up step) in this process."""
    import torch

    import dft_kernels as dk
    from dft_kernels.hf import DFTConfig
    from dft_kernels.hf.online import OnlineTeacher

    from .harness import MiB, PeakMemory, time_calls
    torch.set_num_threads(cfg["threads"])
    tau = cfg["temperature"]
    student = _llama(cfg["vocab"], cfg["student_dim"], cfg["layers"], seed=1).train()
    teacher = _llama(cfg["vocab"], cfg["teacher_dim"], cfg["layers"], seed=0)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)

    if method in ("topk", "dense"):
        dft = DFTConfig(teacher=method, k=cfg["k"], lam=0.0, temperature=tau, impl="torch", strategy=cfg["strategy"])
        dk.hf.patch(student, dft)
        online = OnlineTeacher(teacher, method, dft.k, tau)

        def loss_fn():         # DFTTrainer.compute_loss, one process, no gradient accumulation
            if method == "topk":
                return student(**online.targets(batch, "cpu"), use_cache=False).loss
            return online.dense_loss(student, batch, None, dft.loss_kwargs())[0]
    elif method == "trl":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss
        teacher.eval().requires_grad_(False)
        mask = torch.ones(cfg["batch"], cfg["seq"] - 1)       # every next-token position, like the labels above

        def loss_fn():
            with torch.no_grad():
                h_t = teacher.model(input_ids=ids, attention_mask=batch["attention_mask"]).last_hidden_state
            h_s = student.model(input_ids=ids, attention_mask=batch["attention_mask"]).last_hidden_state
            loss, _, _ = _chunked_divergence_loss(h_s[:, :-1], h_t[:, :-1], student.lm_head.weight,
                                                  teacher.lm_head.weight, mask, 0.0, temperature=tau)
            return loss
    else:
        raise ValueError(f"method {method!r} must be one of {METHODS}")

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        return float(loss.detach())

    with PeakMemory("cpu") as mem:
        first_loss = step()                                   # warm-up (allocates gradients and AdamW state)
        times = time_calls(step, warmup=0, repeats=cfg["steps"])
    return {"method": method, "seconds": times, "first_loss": first_loss, "peak_rss_growth_mib": mem.extra / MiB}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    helps = {"layers": "decoder layers of both models", "seq": "tokens per sequence", "k": "teacher slots (topk)",
             "steps": "timed steps per process, after one warm-up step",
             "threads": "torch CPU threads (1: steadier timings when other jobs share the cores)"}
    for name, default in SIZES:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=default, help=helps.get(name))
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--strategy", choices=("auto", "lean", "fast"), default="auto", help="of the dense loss (ours)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", metavar="JSON", help="write the configuration and every measurement here")
    p.add_argument("--one", help=argparse.SUPPRESS)              # internal: one method in this (fresh) process
    p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)     # tests: no fresh processes
    return p


def _config(p: argparse.ArgumentParser, a: argparse.Namespace) -> dict:
    cfg = {name: getattr(a, name) for name, _ in SIZES}
    for name, value in cfg.items():
        if value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if cfg["seq"] < 2:
        p.error("--seq must be >= 2 (one next-token position at least)")
    if cfg["k"] > cfg["vocab"]:
        p.error(f"--k {cfg['k']} exceeds --vocab {cfg['vocab']}")
    if not a.temperature > 0:
        p.error(f"--temperature must be > 0, got {a.temperature}")
    if a.rounds < 1:
        p.error(f"--rounds must be >= 1, got {a.rounds}")
    methods = [m for m in a.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        p.error(f"--methods {a.methods!r}: choose from {', '.join(METHODS)}")
    return {**cfg, "temperature": a.temperature, "strategy": a.strategy, "methods": methods}


def _child(method: str, argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.online_step", *argv, "--one", method],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{method} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(cfg: dict, runs: dict[str, list[dict]]) -> dict:
    rows = {}
    for m, rs in runs.items():
        times = [t for r in rs for t in r["seconds"]]
        rows[m] = {"best_s": min(times), "median_s": statistics.median(times),
                   "peak_rss_growth_mib": statistics.median(r["peak_rss_growth_mib"] for r in rs),
                   "first_loss": rs[0]["first_loss"]}
    ref = rows.get("trl")
    for row in rows.values():
        row["median_vs_trl"] = row["median_s"] / ref["median_s"] if ref else None
    return rows


def table(cfg: dict, rows: dict) -> str:
    lines = [f"Online distillation, one training step (fwd + bwd + AdamW), CPU, {cfg['threads']} thread(s): "
             f"student {cfg['layers']}x{cfg['student_dim']}, teacher {cfg['layers']}x{cfg['teacher_dim']}, "
             f"V {cfg['vocab']}, batch {cfg['batch']}x{cfg['seq']}, k {cfg['k']}, "
             f"{cfg['rounds']} round(s) x {cfg['steps']} step(s)", "",
             "| method | best s/step | median s/step | median vs TRL | peak RSS growth MiB | step-1 loss |",
             "|---|---:|---:|---:|---:|---:|"]
    for m, r in rows.items():
        ratio = f"{r['median_vs_trl']:.2f}" if r["median_vs_trl"] is not None else "-"
        lines.append(f"| {m} | {r['best_s']:.3f} | {r['median_s']:.3f} | {ratio} | {r['peak_rss_growth_mib']:.1f} | "
                     f"{r['first_loss']:.6f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = _parser()
    a = p.parse_args(argv)
    cfg = _config(p, a)
    if a.one:
        if a.one not in METHODS:
            p.error(f"--one {a.one!r}: choose from {', '.join(METHODS)}")
        print(json.dumps(run_one(a.one, cfg)))
        return {}
    child_argv = [x for x in argv if x != "--in-process"]
    runs: dict[str, list[dict]] = {m: [] for m in cfg["methods"]}
    for _ in range(a.rounds):                               # round-robin: drifts of the machine hit every method
        for m in cfg["methods"]:
            runs[m].append(run_one(m, cfg) if a.in_process else _child(m, child_argv))
    cfg["rounds"] = a.rounds
    rows = summarize(cfg, runs)
    print(table(cfg, rows))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"config": cfg, "summary": rows, "runs": runs}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
