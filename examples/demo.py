"""dft_kernels demo: the whole DFT workflow from the command line, then the loss itself.

Part 1, the workflow (every step is a ``dft-kernels`` command, run in-process through
``dft_kernels.cli.main``; everything tiny and generated, nothing downloaded):

  1. two small generated corpora in two styles (literary, conversational), byte-level
     token ids (vocab 257 = 256 bytes + BOS), written as jsonl;
  2. ``train`` (no targets: plain cross-entropy) -> one tiny Llama teacher per style;
  3. ``targets build --name --description`` -> the two style presets, each teacher
     labelling the same student data (and the same held-out data);
  4. ``targets list`` and ``targets blend literary conversational --weights 0.7 0.3``;
  5. ``train`` twice from one student init: SFT (cross-entropy) and DFT (the blend);
  6. ``eval`` -> report.json / report.md / report.png, the table printed.

Part 2, the loss: a random problem of realistic shape for the device (the Llama-3-8B
head on a GPU, a smaller head on a CPU) is run through
  * the naive PyTorch reference (materialises the [N, V] logits and log-softmax),
  * dft_kernels' fused path (hidden @ lm_head, logits never materialised),
  * dft_kernels' logits path (on logits computed beforehand),
and for each the loss, its agreement with the reference, the time of forward +
backward and the peak memory beyond the inputs are printed.

    python examples/demo.py [--workdir DIR] [--skip-workflow] [--skip-loss] [--n N] [--k 32]

Peak memory: CUDA's allocator statistics on a GPU; on a CPU each method runs in a
fresh process (one thread, glibc returning freed blocks to the OS) and its peak resident
set beyond the one before the measured steps is reported.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

import dft_kernels as dk

# --------------------------------------------------------------------------- part 1: the workflow

BOS, VOCAB = 256, 257

#: two styles of generated sentences: word lists per slot, one sentence = one choice per slot
STYLES = {
    "literary": ("long, descriptive sentences in a storybook voice",
                 [["the old captain", "a weary traveller", "the silent widow", "a pale young poet"],
                  ["watched", "remembered", "wandered beside", "dreamed of"],
                  ["the quiet river", "the distant hills", "a forgotten garden", "the grey harbour"],
                  ["beneath a silver moon.", "as the evening fell.", "in the fading autumn light.",
                   "while the bells rang far away."]]),
    "conversational": ("short, chatty lines of everyday talk",
                       [["hey,", "so,", "honestly,", "wait,"],
                        ["did you see", "i love", "can we get", "you missed"],
                        ["the game", "that pizza", "the new phone", "my cat"],
                        ["?", "!", "lol.", "right?"]]),
}


def style_sentences(style: str, n: int, seed: int) -> list[str]:
    """``n`` generated sentences of ``style`` (one random choice per word slot)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(slot) for slot in STYLES[style][1]) for _ in range(n)]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    """Byte-level token ids (BOS + UTF-8 bytes), one ``{"input_ids": [...]}`` per line."""
    path.write_text("".join(json.dumps({"input_ids": [BOS, *t.encode("utf-8")]}) + "\n" for t in texts))
    return path


def save_tiny_llama(path: Path, seed: int, hidden: int = 32) -> Path:
    """A randomly initialised 2-layer Llama over the byte vocab, saved to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=BOS,
                      eos_token_id=ord("."), pad_token_id=0, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def cli(*argv) -> None:
    """Run one ``dft-kernels`` command in this process, echoing it; stop the demo if it fails."""
    from dft_kernels.cli import main as cli_main
    argv = [str(a) for a in argv]
    print(f"\n$ dft-kernels {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    rc = cli_main(argv)
    if rc != 0:
        raise SystemExit(f"dft-kernels {argv[0]} failed with exit code {rc}")
    print(f"  ({time.perf_counter() - t0:.1f}s)")


def workflow(work: Path, steps: int) -> None:
    """Part 1 of the demo in ``work``: corpora, teachers, presets, blend, SFT and DFT students, eval."""
    work.mkdir(parents=True, exist_ok=True)
    print(f"== part 1: the workflow, in {work}")
    # tiny models: each op is too small to split; a second thread only adds OpenMP hand-offs,
    # which stall for tens of milliseconds per op when other work shares the cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    quiet = ["--quiet"]
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()        # no "Loading weights" bars between the commands
    student_texts, held_texts = [], []
    for i, style in enumerate(STYLES):
        corpus = write_jsonl(work / f"{style}.jsonl", style_sentences(style, 256, seed=10 + i))
        save_tiny_llama(work / f"{style}-init", seed=20 + i)
        cli("train", "--student", work / f"{style}-init", "--data", corpus, "--out", work / f"teacher-{style}",
            "--max-steps", steps, "--batch-size", 16, "--lr", 1e-2, "--save-steps", 10_000,
            "--logging-steps", max(1, steps // 3), *quiet)
        student_texts += style_sentences(style, 48, seed=30 + i)
        held_texts += style_sentences(style, 16, seed=40 + i)
    rng = random.Random(0)
    rng.shuffle(student_texts)
    data = {"train": write_jsonl(work / "student.jsonl", student_texts),
            "held": write_jsonl(work / "held_out.jsonl", held_texts)}
    presets = work / "presets"
    for split, path in data.items():
        for style, (description, _) in STYLES.items():
            name = f"{style}-{split}"
            cli("targets", "build", "--teacher", work / f"teacher-{style}", "--data", path, "--k", 16,
                "--out", presets / name, "--name", name, "--description", f"{description} ({split})", *quiet)
        cli("targets", "blend", f"literary-{split}", f"conversational-{split}", "--weights", 0.7, 0.3,
            "--presets", presets, "--name", f"house-{split}", "--description", "70% literary, 30% conversational",
            "--out", presets / f"house-{split}", *quiet)
    cli("targets", "list", presets)
    save_tiny_llama(work / "student-init", seed=3, hidden=24)
    common = ["--student", work / "student-init", "--data", data["train"], "--max-steps", steps,
              "--batch-size", 8, "--lr", 1e-2, "--save-steps", 10_000, "--logging-steps", max(1, steps // 3), *quiet]
    cli("train", *common, "--out", work / "student-sft")
    cli("train", *common, "--targets", presets / "house-train", "--lam", 0.2, "--out", work / "student-dft")
    report = work / "report"
    cli("eval", "--model", work / "student-init", work / "student-sft", work / "student-dft", "--data", data["held"],
        "--targets", presets / "house-held", "--generate", 3, "--max-new-tokens", 16, "--out", report)
    print(f"\n{(report / 'report.md').read_text()}")
    rows = json.loads((report / "report.json").read_text())["models"]
    for row in rows[1:]:
        text = bytes(t for t in row["samples"][0] if t < 256).decode("utf-8", errors="replace")
        print(f"  {Path(row['model']).name:<13} sample: {text!r}")
    sft, dft = rows[1], rows[2]
    print(f"DFT vs SFT on held-out data: sparse KL to the blended teachers {dft['sparse_kl']:.3f} vs "
          f"{sft['sparse_kl']:.3f}, mass on the teachers' top-k {dft['student_mass']:.3f} vs "
          f"{sft['student_mass']:.3f}, CE {dft['ce']:.3f} vs {sft['ce']:.3f}")
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- part 2: the loss


def make_inputs(n, d, v, k, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = (torch.randn(n, d, generator=g) * 0.5).to(dtype).to(device)
    weight = (torch.randn(v, d, generator=g) / d ** 0.5).to(dtype).to(device)
    teacher = torch.randn(n, v, generator=g) * 2.0 if n * v <= 2**27 else None
    if teacher is not None:
        lp, idx = torch.log_softmax(teacher, -1).topk(k, dim=-1)
    else:  # very large heads: random ids with a plausible mass profile
        idx = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
        lp = torch.log_softmax(torch.randn(n, k, generator=g) * 2, -1) + torch.log(torch.tensor(0.9))
    labels = torch.where(torch.rand(n, generator=g) < 0.5, idx[:, 0], torch.randint(0, v, (n,), generator=g))
    labels[: n // 16] = -100  # a prompt that is not trained on
    return hidden, weight, idx.to(device), lp.to(device), labels.to(device)


def run_method(method, n, d, v, k, dtype, device, repeats):
    hidden, weight, idx, lp, labels = make_inputs(n, d, v, k, dtype, device)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    kw = dict(lam=0.2, divergence="forward_kl")

    def step():
        h.grad = w.grad = None
        if method == "reference":
            loss = dk.reference.fused_linear_dft_loss(h, w, idx, lp, labels, **kw)
        elif method == "fused":
            loss = dk.fused_linear_dft_loss(h, w, idx, lp, labels, **kw)
        else:  # logits path: logits are an input here, like in an ordinary training loop
            logits = h @ w.t()
            loss = dk.dft_loss(logits, idx, lp, labels, **kw)
        loss.backward()
        return loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    step()  # warm-up (compiles the kernels on a GPU)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_now()
        _reset_rss_peak()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss_peak() - base
    return loss.item(), sorted(times)[len(times) // 2], max(peak, 0)


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_rss_peak() -> None:
    """Linux: the peak resident set (VmHWM) restarts from the current one."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass      # elsewhere the peak since the process start is reported


def _rss_peak() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == "darwin" else r * 1024


def _child(q, *args):
    # one thread: the methods compare alike, and their times do not swing with OpenMP
    # hand-offs when other work shares the cores
    torch.set_num_threads(1)
    try:  # glibc: blocks >= 64 KiB are mmaps, returned to the OS when freed, so the resident set follows the tensors
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)        # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
    q.put(run_method(*args))


def loss_comparison(args) -> None:
    """Part 2 of the demo: the naive reference vs the fused and logits paths (loss, time, memory)."""
    print("\n== part 2: the loss, naive reference vs dft_kernels")
    if args.device == "cuda":
        n, d, v, dtype = args.n or 8192, 4096, 128256, torch.bfloat16
    else:
        n, d, v, dtype = args.n or 2048, 128, 8192, torch.float32
    print(f"device={args.device}  N={n}  D={d}  V={v}  K={args.k}  dtype={str(dtype).split('.')[-1]}  "
          f"torch={torch.__version__}")
    print(f"{'method':<11}{'loss':>12}{'|diff| vs ref':>15}{'fwd+bwd ms':>12}{'peak extra MB':>15}")
    results = {}
    for method in ["reference", "fused", "logits"]:
        a = (method, n, d, v, args.k, dtype, args.device, args.repeats)
        if args.device == "cpu":  # a fresh process per method: its peak RSS is its own
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            p = ctx.Process(target=_child, args=(q, *a))
            p.start()
            res = q.get()
            p.join()
        else:
            res = run_method(*a)
            torch.cuda.empty_cache()
        results[method] = res
        loss, t, peak = res
        diff = abs(loss - results["reference"][0])
        print(f"{method:<11}{loss:>12.6f}{diff:>15.2e}{t * 1e3:>12.1f}{peak / 2**20:>15.1f}")
    ref_peak = results["reference"][2]
    for m in ["fused", "logits"]:
        print(f"{m}: {results['reference'][1] / results[m][1]:.2f}x the reference's speed, "
              f"{results[m][2] / max(ref_peak, 1):.3f}x its peak extra memory")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None, help="folder of part 1's files (default: a fresh temp folder)")
    ap.add_argument("--steps", type=int, default=30, help="training steps of each teacher and student")
    ap.add_argument("--skip-workflow", action="store_true", help="only part 2")
    ap.add_argument("--skip-loss", action="store_true", help="only part 1")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=None, help="positions (batch * sequence)")
    ap.add_argument("--k", type=int, default=32, help="teacher slots per position")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    t0 = time.perf_counter()
    if not args.skip_workflow:
        workflow(Path(args.workdir or tempfile.mkdtemp(prefix="dft-demo-")), args.steps)
    if not args.skip_loss:
        loss_comparison(args)
    print(f"\ndemo done in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
