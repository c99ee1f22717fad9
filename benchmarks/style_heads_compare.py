"""Style head vs PEFT LoRA (all linear layers) vs full fine-tune, on one DFT task, on the CPU
(issue 26 item 4; docs/design.md sec. 17.2).

The task: a small Llama "base" is pre-trained briefly on a synthetic corpus A (a sparse
random bigram chain over the vocab); the teacher is the base fine-tuned on corpus B, the
same chain in another "style" (an eighth of the vocab -- the style words -- made 6x likelier
everywhere, and a quarter of the contexts continued by style words only). The student
starts from the base and learns the teacher's distribution on B from the same sparse
targets (the teacher's top-K, built once with ``dk.targets.build``) with the patched fused
loss (``dk.hf.patch``, the library's default loss options), AdamW, the same batches and
steps, in three ways, each in a fresh process:

- ``style``: ``dk.hf.add_style_head(model, rank=R)`` -- the decoder frozen and run without
  gradients, a rank-R correction of the lm_head trains;
- ``lora``:  PEFT ``LoraConfig(r=R, lora_alpha=R, target_modules="all-linear")`` (every linear
  layer of the decoder, not the lm_head);
- ``full``:  every parameter trains.

Per method: trainable parameters; the peak resident memory of the first training step beyond
the loaded model (forward + backward + AdamW step, so its gradients, AdamW state and
activations; ``harness.PeakMemory``); the median time of a training step (steps 2..N); the
held-out full-vocabulary KL(teacher || model) and CE on held-out B sequences every
``--eval-every`` steps (``dft_kernels.workflow.evaluate.score_model``); distinct-1 / distinct-2
of sampled continuations after training (``sample_continuations`` / ``lexical_diversity``, the
``eval`` workflow's), next to the base's, the teacher's and the held-out data's own.

The base, the teacher and the targets are cached under ``--work`` (keyed by the settings).

    python -m benchmarks.style_heads_compare [--steps 60 --vocab 2048 --hidden 256 --layers 4 --rank 16]

Writes ``benchmarks/results/style_heads.{json,md,png}`` (``--out`` prefix).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

METHODS = ("style", "lora", "full")
#: AdamW learning rates per method: the best held-out KL after 20 steps of a 4-value probe each (default
#: task; ``--steps 20 --lr ...``): style head 3e-3 / 1e-2 / 3e-2 / 1e-1 -> KL 1.61 / 1.36 / 1.26 / 1.54,
#: LoRA 1e-3 / 3e-3 / 1e-2 / 3e-2 -> 2.33 / 2.20 / 2.00 / 2.25, full 3e-4 / 1e-3 / 3e-3 / 1e-2 -> 1.91 / 1.18 /
#: 0.87 / 1.02 (from 2.50)
LR = {"style": 3e-2, "lora": 1e-2, "full": 3e-3}
#: bump when the task (chains, pre-training) changes: the cached base / teacher / targets are rebuilt
TASK_VERSION = 2
#: likely successors per token in the chains (a sparse bigram: learnable from a few hundred steps)
SUCCESSORS = 4
LABELS = {"style": "style head (rank {r})", "lora": "PEFT LoRA all-linear (r {r})", "full": "full fine-tune"}
ROOT = Path(__file__).resolve().parents[1]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--k", type=int, default=32, help="teacher slots of the sparse targets")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=60, help="training steps per method")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--pre-steps", type=int, default=120, help="the base's pre-training steps on corpus A")
    p.add_argument("--teacher-steps", type=int, default=80, help="the teacher's fine-tuning steps on corpus B")
    p.add_argument("--n-train", type=int, default=512, help="training sequences of corpus B (targets built for them)")
    p.add_argument("--n-heldout", type=int, default=64)
    p.add_argument("--samples", type=int, default=24, help="sampled continuations per model (distinct-n)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared CPU more threads than free cores spin and run far slower)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--lr", default=None, help="method=lr,... overrides (e.g. style=3e-3)")
    p.add_argument("--work", default=None, help="cache of the base, teacher and targets (default: a temp dir)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "style_heads"))
    p.add_argument("--one", choices=METHODS, default=None, help=argparse.SUPPRESS)
    return p


def _settings_key(args) -> str:
    keys = ("vocab", "hidden", "layers", "seq", "batch", "k", "pre_steps", "teacher_steps", "n_train", "n_heldout")
    spec = {"task": TASK_VERSION, **{k: getattr(args, k) for k in keys}}
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:12]


def _work(args) -> Path:
    return Path(args.work) if args.work else Path(tempfile.gettempdir()) / f"dft_style_heads_{_settings_key(args)}"


# --------------------------------------------------------------------------- task


def _llama(args):
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                                   num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=2 * args.seq, tie_word_embeddings=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM(cfg)


def chains(V: int, seed: int = 0):
    """The transition matrices [V, V] of corpus A and of corpus B (its style) -- module doc."""
    import torch
    g = torch.Generator().manual_seed(seed)
    unigram = (torch.arange(V, dtype=torch.float64) + 1.0) ** -1.1
    unigram = unigram[torch.randperm(V, generator=g)]
    unigram /= unigram.sum()
    succ = torch.randint(0, V, (V, SUCCESSORS), generator=g)
    w = torch.rand(V, SUCCESSORS, generator=g, dtype=torch.float64) ** 2 + 0.1
    sparse = torch.zeros(V, V, dtype=torch.float64).scatter_add_(1, succ, w / w.sum(1, keepdim=True))
    A = 0.1 * unigram + 0.9 * sparse
    style = torch.randperm(V, generator=g)[:V // 8]
    boost = torch.ones(V, dtype=torch.float64)
    boost[style] = 6.0
    B = A * boost
    rows = torch.randperm(V, generator=g)[:V // 4]                 # contexts continued by style words only
    s_succ = style[torch.randint(0, len(style), (len(rows), SUCCESSORS), generator=g)]
    s_w = torch.rand(len(rows), SUCCESSORS, generator=g, dtype=torch.float64) ** 2 + 0.1
    B[rows] = 0.1 * unigram * boost + 0.9 * torch.zeros(len(rows), V, dtype=torch.float64).scatter_add_(
        1, s_succ, s_w / s_w.sum(1, keepdim=True))
    B /= B.sum(1, keepdim=True)
    return A.float(), B.float(), unigram.float()


def sample_chain(P, unigram, n: int, T: int, seed: int):
    """``n`` sequences of ``T`` tokens of the chain ``P`` (inverse-CDF draws: one uniform per token)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    cdf = P.double().cumsum(1)
    cdf /= cdf[:, -1:].clone()
    V = P.shape[0]
    x = torch.multinomial(unigram, n, replacement=True, generator=g)
    out = [x]
    for _ in range(T - 1):
        u = torch.rand(n, 1, generator=g, dtype=torch.float64)
        x = torch.searchsorted(cdf[x], u).squeeze(1).clamp_(max=V - 1)
        out.append(x)
    return torch.stack(out, 1)


def _entropy(P, seqs) -> float:
    """The chain's mean next-token entropy over the contexts of ``seqs`` (the CE of a perfect model)."""
    p = P[seqs[:, :-1].reshape(-1)].double()
    return float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean())


def _pretrain(model, data, steps: int, batch: int, lr: float) -> list[float]:
    """Plain next-token CE training (the base and the teacher are made this way)."""
    import torch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for s in range(steps):
        ids = data[(s * batch) % len(data):][:batch]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def prepare(args) -> dict:
    """The base, the teacher, the data and the teacher's targets under the work dir (cached)."""
    import torch

    import dft_kernels as dk
    work = _work(args)
    done = work / "prep.json"
    if done.is_file():
        return json.loads(done.read_text())
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    A, B, unigram = chains(args.vocab)
    n_pre = max(args.pre_steps * args.batch, args.batch)
    corpus_a = sample_chain(A, unigram, n_pre, args.seq, seed=1)
    corpus_b = sample_chain(B, unigram, max(args.teacher_steps * args.batch, args.batch), args.seq, seed=2)
    train_b = sample_chain(B, unigram, args.n_train, args.seq, seed=3)
    heldout_b = sample_chain(B, unigram, args.n_heldout, args.seq, seed=4)
    torch.manual_seed(0)
    model = _llama(args)
    pre = _pretrain(model, corpus_a, args.pre_steps, args.batch, 5e-3)
    model.save_pretrained(work / "base")
    tune = _pretrain(model, corpus_b, args.teacher_steps, args.batch, 3e-3)
    model.save_pretrained(work / "teacher")
    model.eval()
    man = dk.targets.build(model, [train_b[i:i + 16] for i in range(0, len(train_b), 16)], args.k,
                           out_dir=work / "targets", dtype=torch.float32, progress=False, teacher_name="teacher")
    torch.save({"train": train_b, "heldout": heldout_b}, work / "data.pt")
    info = {"chain_entropy": {"A": _entropy(A, corpus_a), "B": _entropy(B, heldout_b)},
            "base_pretrain_ce": [pre[0], statistics.mean(pre[-10:])],
            "teacher_finetune_ce": [tune[0], statistics.mean(tune[-10:])],
            "targets": {"k": man["k"], "n_positions": man["n_positions"], "dir": f"{work.name}/targets"},
            "prepare_seconds": round(time.perf_counter() - t0, 1)}
    done.write_text(json.dumps(info))
    return info


def _load(work: Path, name: str):
    import transformers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM.from_pretrained(work / name).eval()


def _targets(work: Path, n: int, T: int):
    """The teacher's stored targets of the ``n`` training sequences of ``T`` tokens: [n, T, K] ids / log-probs."""
    import torch

    import dft_kernels as dk
    man = dk.targets.read_manifest(work / "targets")
    parts = [dk.SparseTargets.load(work / "targets" / e["file"]) for e in man["shards"]]
    index = torch.cat([p.index for p in parts]).reshape(n, T, -1).long()
    logprobs = torch.cat([p.logprobs for p in parts]).reshape(n, T, -1)
    return index, logprobs


def _diversity(model, seqs, args) -> dict:
    from dft_kernels.workflow.evaluate import lexical_diversity, sample_continuations
    return lexical_diversity(sample_continuations(model, seqs, n=args.samples, max_new_tokens=args.new_tokens,
                                                  seed=7))


def _score(model, teacher, seqs) -> dict:
    from dft_kernels.workflow.evaluate import score_model
    r = score_model(model, seqs, teacher=teacher, batch_size=16)
    return {"full_kl": r["full_kl"], "ce": r["ce"]}


# --------------------------------------------------------------------------- one method, in its own process


def run_one(method: str, args) -> dict:
    import torch

    import dft_kernels as dk

    from .harness import PeakMemory, malloc_release_to_os
    malloc_release_to_os()
    torch.set_num_threads(args.threads)
    work = _work(args)
    data = torch.load(work / "data.pt")
    train, heldout = data["train"], data["heldout"].tolist()
    index, logprobs = _targets(work, len(train), args.seq)
    teacher = _load(work, "teacher")
    model = _load(work, "base")
    torch.manual_seed(0)
    if method == "style":
        dk.hf.add_style_head(model, rank=args.rank)
    elif method == "lora":
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0,
                                                           target_modules="all-linear"))
    dk.hf.patch(model, impl="torch")
    params = [p for p in model.parameters() if p.requires_grad]
    lr = {**LR, **_lr_overrides(args.lr)}[method]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    curve = {0: _score(model, teacher, heldout)}
    times, peak = [], None
    for s in range(args.steps):
        model.train()
        lo = (s * args.batch) % len(train)
        ids = train[lo:lo + args.batch]
        batch = {"input_ids": ids, "labels": ids, "target_index": index[lo:lo + args.batch],
                 "target_logprobs": logprobs[lo:lo + args.batch]}
        mem = PeakMemory("cpu") if s == 0 else None
        if mem is not None:
            mem.__enter__()
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        if mem is not None:
            mem.__exit__(None, None, None)
            peak = mem.extra
        if (s + 1) % args.eval_every == 0 or s + 1 == args.steps:
            curve[s + 1] = _score(model, teacher, heldout)
    dk.hf.unpatch(model)
    model.eval()
    return {"method": method, "lr": lr, "trainable_params": sum(p.numel() for p in params),
            "total_params": sum(p.numel() for p in model.parameters()), "peak_step_bytes": peak,
            "step_seconds_median": statistics.median(times[1:] or times), "step_seconds": [round(t, 4) for t in times],
            "kl_curve": {str(k): v for k, v in curve.items()}, "kl_before": curve[0]["full_kl"],
            "kl_after": curve[args.steps]["full_kl"], "ce_after": curve[args.steps]["ce"],
            "diversity": _diversity(model, heldout, args)}


def _lr_overrides(spec) -> dict:
    if not spec:
        return {}
    out = {}
    for part in spec.split(","):
        k, _, v = part.partition("=")
        if k not in METHODS:
            raise SystemExit(f"--lr: unknown method {k!r}")
        out[k] = float(v)
    return out


# --------------------------------------------------------------------------- report


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def markdown(report: dict) -> str:
    c, r = report["config"], report["runs"]
    MiB = 2 ** 20
    lines = [f"Llama {c['layers']} layers, D {c['hidden']}, V {c['vocab']}, batch {c['batch']} x {c['seq']} tokens, "
             f"K {c['k']} teacher slots, {c['steps']} AdamW steps per method, fp32, CPU ({c['threads']} threads); "
             f"KL(teacher || model) over the full vocab on {c['n_heldout']} held-out sequences of the teacher's "
             f"corpus; distinct-n of {c['samples']} sampled continuations of {c['new_tokens']} tokens.", "",
             "| method | lr | trainable params | peak RSS of a step (MiB) | step (s, median) | KL before | KL after "
             "| CE after | distinct-1 | distinct-2 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in report["methods"]:
        x = r[m]
        lines.append(f"| {LABELS[m].format(r=c['rank'])} | {x['lr']:g} | {_fmt_params(x['trainable_params'])} | "
                     f"{x['peak_step_bytes'] / MiB:.1f} | {x['step_seconds_median']:.3f} | {x['kl_before']:.3f} | "
                     f"{x['kl_after']:.3f} | {x['ce_after']:.3f} | {x['diversity']['distinct_1']:.3f} | "
                     f"{x['diversity']['distinct_2']:.3f} |")
    for name, label in (("base", "base (every method's start)"), ("teacher", "teacher"),
                        ("held-out data", "held-out data's own continuations")):
        x = report["references"][name]
        kl = f"{x['full_kl']:.3f}" if "full_kl" in x else ""
        ce = f"{x['ce']:.3f}" if "ce" in x else ""
        lines.append(f"| {label} | | | | | {kl} | | {ce} | {x['distinct_1']:.3f} | {x['distinct_2']:.3f} |")
    p = report.get("prepare", {})
    if "chain_entropy" in p:
        lines += ["", f"The base: {c['pre_steps']} CE steps on corpus A (CE {p['base_pretrain_ce'][1]:.2f}; the chain's "
                      f"own entropy {p['chain_entropy']['A']:.2f}); the teacher: the base after {c['teacher_steps']} "
                      f"more on corpus B (CE {p['teacher_finetune_ce'][1]:.2f}; B's entropy "
                      f"{p['chain_entropy']['B']:.2f})."]
    lines += ["", "Learning rates: per method the best held-out KL after 20 steps of a 4-value probe (`LR` in the "
                  "script). Peak RSS: the first training step (forward, backward, AdamW step: its gradients, AdamW "
                  "state and activations) beyond the loaded models. Times and memory: one run on a shared CPU."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    c, runs, methods = report["config"], report["runs"], report["methods"]
    labels = [LABELS[m].format(r=c["rank"]) for m in methods]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    ax = axes[0]
    for i, m in enumerate(methods):
        pts = sorted((int(k), v["full_kl"]) for k, v in runs[m]["kl_curve"].items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{i}", label=labels[i])
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out KL(teacher || model), nats/token")
    ax.set_title("KL to the teacher")
    ax.legend(fontsize=8)
    for ax, key, title, scale in ((axes[1], "peak_step_bytes", "peak RSS of a training step (MiB)", 2 ** -20),
                                  (axes[2], "step_seconds_median", "time of a training step (s, median)", 1.0)):
        vals = [runs[m][key] * scale for m in methods]
        ax.bar(range(len(methods)), vals, color=[f"C{i}" for i in range(len(methods))])
        ax.set_xticks(range(len(methods)), [f"{lab}\n{_fmt_params(runs[m]['trainable_params'])} trained"
                                            for lab, m in zip(labels, methods)], fontsize=7)
        ax.set_title(title)
    fig.suptitle(f"style head vs LoRA vs full fine-tune: Llama {c['layers']}x{c['hidden']}, V {c['vocab']}, "
                 f"{c['steps']} steps, CPU", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    import torch
    threads = torch.get_num_threads()
    try:
        return _main(argv)
    finally:
        torch.set_num_threads(threads)


def _main(argv) -> int:
    args = _parser().parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return 0
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; choose from {list(METHODS)}")
    t0 = time.perf_counter()
    cached = (_work(args) / "prep.json").is_file()
    prep = prepare(args)
    print(f"prepared base / teacher / targets in {_work(args)} ({prep['prepare_seconds']} s when built)", flush=True)
    passthrough = list(argv if argv is not None else sys.argv[1:])
    if args.work is None:
        passthrough += ["--work", str(_work(args))]
    runs = {}
    for m in methods:
        out = subprocess.run([sys.executable, "-m", "benchmarks.style_heads_compare", *passthrough, "--one", m],
                             capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            sys.stderr.write(out.stderr)
            raise SystemExit(f"{m}: the run failed (exit {out.returncode})")
        runs[m] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{m}: KL {runs[m]['kl_before']:.3f} -> {runs[m]['kl_after']:.3f}, "
              f"step {runs[m]['step_seconds_median']:.3f} s", flush=True)

    import torch
    torch.set_num_threads(args.threads)
    from dft_kernels.workflow.evaluate import lexical_diversity, reference_continuations
    work = _work(args)
    heldout = torch.load(work / "data.pt")["heldout"].tolist()
    teacher, base = _load(work, "teacher"), _load(work, "base")
    refs = {"base": {**_score(base, teacher, heldout), **_diversity(base, heldout, args)},
            "teacher": {"ce": _score(teacher, teacher, heldout)["ce"], **_diversity(teacher, heldout, args)},
            "held-out data": lexical_diversity(reference_continuations(heldout, n=args.samples,
                                                                       max_new_tokens=args.new_tokens))}
    report = {"config": {k: v for k, v in vars(args).items() if k not in ("one", "work", "out")},
              "methods": methods, "prepare": prep, "runs": runs, "references": refs,
              "seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    md = markdown(report)
    note = (f"the base / teacher / targets cached; building them took {prep['prepare_seconds']} s" if cached
            else f"building the base / teacher / targets included ({prep['prepare_seconds']} s)")
    out.with_suffix(".md").write_text(f"# Style head vs LoRA vs full fine-tune\n\n{md}\n`python -m "
                                      f"benchmarks.style_heads_compare` ({report['seconds']} s on this machine, "
                                      f"{note}).\n")
    plot(report, out.with_suffix(".png"))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
