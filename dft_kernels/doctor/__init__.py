"""``dft-kernels doctor`` (also ``python -m dft_kernels``): does this library work, and
how fast, on the GPU this machine has (docs/design.md sec. 16)?

    dft-kernels doctor [--model DIR | --vocab V --hidden D] [--tokens N] [--dtype bf16]
                       [--json] [--save | --clear] [--skip-timing]

1. the environment: device, compute capability and the architecture the compile gate
   covers for it, driver, torch / Triton versions and whether they are supported;
2. every kernel (lse_gather, linear_lse_gather, fast, teacher_topk, two_head) through
   its public op with ``impl="triton"`` against a float64 reference, at small odd shapes
   and at the user's head (up to 256 tokens of it): its error next to the same-dtype
   chunked PyTorch path's, one verdict per kernel;
3. timings at the head (``--tokens``): naive (materialised logits), the chunked PyTorch
   path, lean, lean with cuBLAS backward products, fast; forward + backward, peak memory.

``--save`` stores the fastest choices (impl, strategy, backward products) in the per-user
cache (``doctor.cache``: ``$XDG_CACHE_HOME/dft_kernels/doctor.json``) that ``impl="auto"``
and ``strategy="auto"`` read; ``--clear`` removes it. Without a GPU the same runs under the
Triton interpreter at tiny shapes (fp32). Exit code 0 when every kernel passes, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _head_from_args(args, cuda: bool):
    from .checks import Head
    vocab, hidden = args.vocab, args.hidden
    if args.model:
        path = os.path.join(args.model, "config.json") if os.path.isdir(args.model) else args.model
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--model {args.model}: no config.json there")
        with open(path) as f:
            cfg = json.load(f)
        cfg = cfg.get("text_config", cfg)
        vocab, hidden = vocab or cfg.get("vocab_size"), hidden or cfg.get("hidden_size")
        if not vocab or not hidden:
            raise ValueError(f"--model {args.model}: config.json has no vocab_size / hidden_size")
    if cuda:
        return Head(N=args.tokens or 4096, D=hidden or 4096, V=vocab or 128256, K=32)
    # the interpreter: a tiny head whatever was asked (the CPU run proves the plumbing)
    return Head(N=min(args.tokens or 24, 24), D=min(hidden or 48, 48), V=min(vocab or 301, 301), K=4)


def run(args) -> dict:
    """Everything the doctor measures, as one JSON-able dict."""
    import torch
    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")   # before any kernel module loads
    from . import checks
    device = torch.device("cuda") if cuda else torch.device("cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if cuda else "fp32")]
    head = _head_from_args(args, cuda)
    report = dict(environment=checks.environment(device), dtype=str(dtype).removeprefix("torch."),
                  head=dict(N=head.N, D=head.D, V=head.V, K=head.K), kernels=[])
    shapes = [("small-odd", checks.SMALL_ODD if cuda else checks.TINY_ODD)]
    if cuda:
        shapes.append(("head", checks.Head(N=min(head.N, 256), D=head.D, V=head.V, K=head.K)))
    verdicts = {}
    for label, shape in shapes:
        p = checks._problem(shape, dtype, device)
        for name in checks.KERNELS:
            r = checks.check_kernel(name, p, dtype) | {"shape": label}
            report["kernels"].append(r)
            prev = verdicts.get(name)
            verdicts[name] = r if (prev is None or prev["ok"]) else prev
        del p
    report["verdicts"] = {k: v["verdict"] for k, v in verdicts.items()}
    report["ok"] = all(v["ok"] for v in verdicts.values())
    if not args.skip_timing:
        timings = checks.time_options(checks.timing_problem(head, device), dtype, reps=3 if cuda else 1)
        report["timings"] = timings
        report["choices"] = checks.fastest_choices(timings)
    return report


def format_report(r: dict) -> str:
    env = r["environment"]
    lines = [f"device   {env['name']}" + (f"  sm_{env['capability'].replace('.', '')} -> gate arch {env['arch']}"
                                            if env.get("capability") else "  (Triton interpreter)"),
             f"driver   {env.get('driver_cuda')}  CUDA runtime {env.get('cuda_runtime')}" if env.get("capability")
             else "driver   -",
             f"torch    {env['torch']}  {'ok' if env['torch_in_range'] else 'UNSUPPORTED (< 2.3)'}",
             f"triton   {env['triton']}  " + ("ok" if env["triton_tested"] else
                                               "newer than the tested range" if env["triton_in_range"] else
                                               "UNSUPPORTED") + f"  (supported {env['triton_supported']})",
             f"dtype    {r['dtype']}   head N={r['head']['N']} D={r['head']['D']} V={r['head']['V']} "
             f"K={r['head']['K']}", "", "| kernel | shape | verdict | s |", "|---|---|---|---|"]
    lines += [f"| {k['kernel']} | {k['shape']} | {k['verdict']} | {k['seconds']} |" for k in r["kernels"]]
    if "timings" in r:
        lines += ["", "| option | fwd+bwd ms | peak MiB |", "|---|---|---|"]
        for name, t in r["timings"].items():
            ms = "-" if t["seconds"] is None else f"{t['seconds'] * 1e3:.2f}"
            mib = "-" if t["peak_bytes"] is None else f"{t['peak_bytes'] / 2 ** 20:.0f}"
            lines.append(f"| {name} | {ms}{' (' + t['error'] + ')' if t.get('error') else ''} | {mib} |")
        lines += ["", f"fastest: {r['choices']}"]
    lines += ["", "verdict: " + ("every kernel passes" if r["ok"] else
                                 "FAIL: " + ", ".join(k for k, v in r["verdicts"].items() if not v.startswith("ok")))]
    return "\n".join(lines)


def _cmd_doctor(args) -> int:
    from . import cache
    if args.clear:
        print(f"{'removed' if cache.clear() else 'no cache at'} {cache.cache_path()}")
        return 0
    report = run(args)
    if args.save:
        if not report.get("choices"):
            raise ValueError("--save needs the timings: drop --skip-timing")
        import torch
        if not torch.cuda.is_available() or args.cpu:
            raise ValueError("--save stores a GPU's measured choices; there is no CUDA device here")
        report["saved_to"] = str(cache.save(report["choices"], report["timings"]))
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        print(format_report(report))
        if report.get("saved_to"):
            print(f"saved the fastest choices to {report['saved_to']}")
    return 0 if report["ok"] else 1


def add_parser(sub) -> None:
    """The ``doctor`` subcommand of ``dft-kernels``."""
    from ..workflow.inputs import positive_int
    d = sub.add_parser("doctor", help="check every kernel on this GPU against float64, time the options, "
                                      "optionally cache the fastest for impl='auto'")
    d.add_argument("--model", help="a Hugging Face model dir (or its config.json): the head to check and time")
    d.add_argument("--vocab", type=positive_int, help="vocab size of the head (default: --model's, else 128256)")
    d.add_argument("--hidden", type=positive_int, help="hidden size of the head (default: --model's, else 4096)")
    d.add_argument("--tokens", type=positive_int, help="tokens per step for the timings (default 4096)")
    d.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="input dtype (default: bf16 on a GPU, "
                                                                     "fp32 under the interpreter)")
    d.add_argument("--json", action="store_true", help="print the report as JSON")
    d.add_argument("--skip-timing", action="store_true", help="only the environment and the kernel checks")
    d.add_argument("--cpu", action="store_true", help="run under the Triton interpreter even with a GPU")
    g = d.add_mutually_exclusive_group()
    g.add_argument("--save", action="store_true", help="cache the fastest choices for impl/strategy='auto'")
    g.add_argument("--clear", action="store_true", help="remove the cache and exit")
    d.set_defaults(func=_cmd_doctor)


def main(argv=None) -> int:
    """``python -m dft_kernels [doctor options]`` (the same as ``dft-kernels doctor``)."""
    parser = argparse.ArgumentParser(prog="python -m dft_kernels", description="dft_kernels doctor")
    add_parser(parser.add_subparsers(dest="command", required=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "doctor":
        argv = ["doctor", *argv]
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return 2
