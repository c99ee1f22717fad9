"""Markdown report of a sweep's results JSON."""
from __future__ import annotations

import json
from itertools import groupby
from pathlib import Path

MiB = 2 ** 20


def _f(x, fmt=".2f", none="-"):
    if x is None:
        return none
    try:
        return format(x, fmt)
    except (TypeError, ValueError):
        return str(x)


def _pred(r: dict, device_type: str) -> str:
    if r.get("predicted_extra_bytes") is None:
        return "-"
    if device_type == "cpu":
        return f"{r['predicted_extra_bytes'] / MiB:.1f} (RSS {r['predicted_rss_extra_bytes'] / MiB:.1f})"
    return f"{r['predicted_extra_bytes'] / MiB:.1f}"


def _group_key(r):
    return (r["path"], r["head"], r["K"])


def table(rows: list[dict], device_type: str) -> list[str]:
    """One markdown table per (path, head, K); missing / skipped methods listed under it."""
    rate = "GPU bf16 matmul" if device_type == "cuda" else "CPU fp32 matmul"
    out = []
    paths = ("logits", "fused")
    rows = sorted(rows, key=lambda r: (paths.index(r["path"]) if r["path"] in paths else 9, r["head"], r["K"],
                                       r["N"]))
    for (path, head, K), grp in groupby(rows, key=_group_key):
        grp = list(grp)
        r0 = grp[0]
        what = "logits [N, V] given" if path == "logits" else "hidden [N, D] + weight [V, D] given"
        dims = f"V={r0['V']}" if path == "logits" else f"D={r0['D']}, V={r0['V']}"
        out += ["", f"### {path} path, {head} ({dims}), K={K}, {r0['dtype']} — {what}", ""]
        out.append("| N | method | impl | fwd ms | bwd ms | fwd+bwd ms | peak extra MiB | extra − grads MiB | predicted MiB "
                   f"| TFLOP/s | % of {rate} | × floor | loss rel diff |")
        out.append("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        absent = {}
        for r in grp:
            if r["status"].startswith(("missing", "skipped")):
                absent.setdefault(r["label"], r["status"])
                continue
            if r["status"] != "ok":
                out.append(f"| {r['N']} | {r['label']} | {r.get('impl') or ''} | {r['status'][:80]} "
                           "| | | | | | | | | |")
                continue
            t, m = r.get("time", {}), r.get("memory", {})
            diff = r.get("loss_rel_diff")
            if diff is None:
                dtxt = r.get("agree_note", "-")
            else:
                dtxt = f"{diff:.1e}" + ("" if r.get("agree") else " **MISMATCH**")
            out.append(
                f"| {r['N']} | {r['label']} | {r.get('impl') or ''} | {_f(t.get('fwd_ms'))} | {_f(t.get('bwd_ms'))} "
                f"| {_f(t.get('fwd_bwd_ms'))} | {_f(m.get('peak_extra_bytes', 0) / MiB, '.1f')} "
                f"| {_f(m.get('extra_minus_grads_bytes', 0) / MiB, '.1f')} "
                f"| {_pred(r, device_type)} "
                f"| {_f(r.get('achieved_tflops'), '.3g')} | {_f(r.get('pct_matmul_peak'), '.1f')} "
                f"| {_f(r.get('x_floor'), '.1f')} | {dtxt} |")
        for label, st in absent.items():
            out.append(f"\n*{label}*: {st}")
    return out


def markdown(data: dict) -> str:
    dev = data["device"]
    ceil = data["ceilings"]
    v = data["versions"]
    lines = [f"# DFT loss benchmark: `{data['run']}`", "",
             f"- command: `{data['command']}`",
             f"- date: {data['date']}",
             f"- device: {dev['name']} ({dev['type']}"
             + (f", {dev.get('torch_threads')} torch threads" if dev["type"] == "cpu" else "") + ")",
             f"- versions: python {v['python']}, torch {v['torch']}, triton {v['triton']}, "
             f"dft_kernels {v['dft_kernels']}",
             "- peers: " + "; ".join(f"{k}: {s}" for k, s in v["peers"].items()),
             f"- ceilings (measured in this run): {ceil['matmul_tflops']:.3f} TFLOP/s ({ceil['matmul_label']}, "
             f"{'x'.join(map(str, ceil['matmul_shape']))}); copy {ceil['copy_gbps']:.1f} GB/s ({ceil['copy_label']})"
             + (f"; the larger of start ({ceil['start']['matmul_tflops']:.3f} TFLOP/s, {ceil['start']['copy_gbps']:.1f} "
                f"GB/s) and end ({ceil['end']['matmul_tflops']:.3f}, {ceil['end']['copy_gbps']:.1f})"
                if "start" in ceil else ""),
             f"- memory: {data['memory_method']}",
             f"- load average (1/5/15 min) at start {data.get('load_average', {}).get('start')}, end "
             f"{data.get('load_average', {}).get('end')}"
             + (f" on {dev.get('cores')} cores" if dev["type"] == "cpu" else ""),
             f"- time: {data['timing_method']}",
             f"- loss: forward KL (tail bucket) + {data['loss']['lam']}; "
             f"{data['loss']['ignored_fraction']:.0%} of labels ignored; mean reduction",
             f"- losses agree with the reference (rtol {data['loss_rtol']}): "
             f"{'yes' if data['all_losses_agree'] else '**NO**'}",
             ""]
    if data.get("quick"):
        lines += ["*Quick run: few repeats, not a measurement to quote.*", ""]
    for ch in data.get("checks", []):
        lines += [f"## Check ({ch['kind']} path): {ch['verdict']}", ""]
        if "criterion" in ch:
            lines.append(f"- target: {ch['criterion']}")
            s = ch["shape"]
            dims = f"V={s['V']}" if ch["kind"] == "logits" else f"D={s['D']}, V={s['V']}"
            lines.append(f"- shape: N={s['N']}, {dims}, K={s['K']}, {s['dtype']} on {s['device']}; "
                         f"ours = `{ch['ours']}` (impl {ch['ours_impl']})")
            lines.append(f"- extra memory beyond inputs and gradients: reference "
                         f"{ch['ref_extra_minus_grads_bytes'] / MiB:.1f} MiB, ours "
                         f"{ch['ours_extra_minus_grads_bytes'] / MiB:.1f} MiB -> ratio {ch['mem_ratio']:.4f} "
                         f"(limit {ch['mem_limit']:.4f}); gradients {ch['grads_bytes'] / MiB:.1f} MiB; peak extra "
                         f"incl. gradients: reference {ch['ref_peak_extra_bytes'] / MiB:.1f}, ours "
                         f"{ch['ours_peak_extra_bytes'] / MiB:.1f} MiB")
            rt, ot = ch["ref_time"], ch["ours_time"]
            lines.append(f"- time (median ms): reference fwd {rt['fwd_ms']:.1f} / bwd {rt['bwd_ms']:.1f} / total "
                         f"{rt['fwd_bwd_ms']:.1f}; ours fwd {ot['fwd_ms']:.1f} / bwd {ot['bwd_ms']:.1f} / total "
                         f"{ot['fwd_bwd_ms']:.1f} -> ratios fwd {ch['fwd_ratio']:.3f}, bwd {ch['bwd_ratio']:.3f}, "
                         f"total {ch['time_ratio']:.3f}")
            lines += [f"- {line}" for line in check_details(ch)]
            lines.append(f"- loss rel diff vs reference: {_f(ch.get('loss_rel_diff'), '.1e')}")
        lines.append("")
    lines += ["## Results", "",
              "Times are medians; *peak extra* is the peak memory beyond the inputs (it includes the gradients); "
              "*extra − grads* subtracts the gradients every method returns; *predicted* is "
              "benchmarks/memory_model.py's figure for the chunked PyTorch path. TFLOP/s counts the matmul floor "
              "8·N·D·V (fused path only); *× floor* = time / max(FLOPs / matmul rate, bytes / copy bandwidth) "
              "with the ceilings above. *loss rel diff* is |loss − reference| / |reference|."]
    lines += table(data["rows"], dev["type"])
    if data.get("plots"):
        lines += ["", "## Plots", ""]
        for p in data["plots"]:
            lines.append(f"![{p}]({p})")
    lines += ["", "## Methods", ""] + [f"- **{k}**: {v}" for k, v in data["methods"].items()]
    return "\n".join(lines) + "\n"


def fmt_row(r: dict) -> str:
    s = f"{r['path']:6s} {r['head']:13s} N={r['N']:<6d} K={r['K']:<4d} {r['label']:18s} "
    if r["status"] != "ok":
        return s + r["status"]
    t = r.get("time", {})
    m = r.get("memory", {})
    return (s + f"fwd {t.get('fwd_ms', float('nan')):9.2f} ms  bwd {t.get('bwd_ms', float('nan')):9.2f} ms  "
            f"extra {m.get('peak_extra_bytes', 0) / MiB:9.1f} MiB  (-grads {m.get('extra_minus_grads_bytes', 0) / MiB:8.1f})"
            f"  loss {r.get('loss', float('nan')):.6g}")


def check_details(ch: dict) -> list[str]:
    """The memory model's prediction and the speed diagnosis of a check, one line each."""
    out = []
    p = ch.get("predicted", {})
    if "peak_bytes" in p:
        out.append(f"predicted (benchmarks/memory_model.py): {p['peak_bytes'] / MiB:.1f} MiB at allocator level, "
                   f"{p['rss_expected_bytes'] / MiB:.1f} MiB as peak RSS sees it = {p['formula']}; measured "
                   f"{ch['ours_extra_minus_grads_bytes'] / MiB:.1f} MiB, measured / predicted "
                   f"({ch['predicted_compared']}) = {_f(ch.get('measured_over_predicted'))}")
    elif p:
        out.append(f"predicted: {p.get('formula')}")
    sd = ch.get("speed_diagnosis")
    if sd:
        out.append(f"phase slower than the reference's: {', '.join(sd['slow_phases'])}")
        mb = sd.get("lse_micro_benchmark")
        if mb:
            out.append(f"per-chunk row log-sum-exp on [{mb['chunk'][0]}, {mb['chunk'][1]}] fp32, median ms: "
                       + ", ".join(f"{k} {v:.2f}" for k, v in mb["median_ms"].items())
                       + f" ({mb['speedup']:.1f}x; max |diff| {mb['max_abs_diff']:.1e})")
    return out


def check_console_lines(ch: dict) -> list[str]:
    """A check's verdict and figures, for the console."""
    return [f"check {ch['kind']}: {ch['verdict']}"] + [f"  {line}" for line in check_details(ch)]


def update_latest(out_dir: Path, data: dict, md_path: Path) -> None:
    idx_path = out_dir / "index.json"
    try:
        idx = json.loads(idx_path.read_text())
    except (OSError, ValueError):
        idx = {}
    key = f"{data['device']['type']}:{data['preset']}"
    idx[key] = {"run": data["run"], "date": data["date"], "md": md_path.name, "device": data["device"]["name"],
                "preset": data["preset"], "command": data["command"],
                "checks": [c.get("verdict") for c in data.get("checks", [])]}
    idx_path.write_text(json.dumps(idx, indent=1, sort_keys=True) + "\n")
    lines = ["# Latest benchmark runs", "",
             "Updated by every non-quick `python -m benchmarks.sweep` run; one line per (device, preset).", "",
             "| device | preset | run | date | checks |", "|---|---|---|---|---|"]
    for k in sorted(idx):
        e = idx[k]
        checks = "; ".join(c for c in e.get("checks") or [] if c) or "-"
        lines.append(f"| {k.split(':')[0]} ({e['device']}) | {e['preset']} | [{e['run']}]({e['md']}) | "
                     f"{e['date'][:19]} | {checks} |")
    (out_dir / "LATEST.md").write_text("\n".join(lines) + "\n")
