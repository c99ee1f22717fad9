"""What a sweep makes of its rows: loss agreement with the reference, the floors,
the memory model's prediction, and the targets of the check-* presets."""
from __future__ import annotations

import statistics

import torch

from .cases import DTYPES, Case, floors
from .harness import round_robin
from .methods import DENSE_TEACHER_METHODS

#: relative loss difference allowed against the reference, by dtype
LOSS_RTOL = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 5e-3}


def _rel(a, b) -> float | None:
    if a is None or b is None:
        return None
    return abs(a - b) / max(abs(b), 1e-30)


def annotate(rows: list[dict], ceilings: dict) -> None:
    """Loss agreement with the reference of the same shape, and the floors."""
    ref = {(r["path"], r["head"], r["N"], r["K"]): r for r in rows
           if r["method"] == "reference" and r["status"] == "ok"}
    peak = ceilings["matmul_tflops"] * 1e12
    bw = ceilings["copy_gbps"] * 1e9
    for r in rows:
        if r["status"] != "ok":
            continue
        key = (r["path"], r["head"], r["N"], r["K"])
        rr = ref.get(key)
        comparable = r["method"] not in DENSE_TEACHER_METHODS
        if rr is not None and comparable:
            r["loss_rel_diff"] = _rel(r.get("loss"), rr.get("loss"))
            gn, gr = r.get("grad_norms") or [], rr.get("grad_norms") or []
            diffs = [_rel(a, b) for a, b in zip(gn, gr) if a is not None and b is not None]
            r["grad_norm_rel_diff"] = max(diffs) if diffs else None
            tol = LOSS_RTOL.get(r["dtype"], 1e-2)
            r["loss_rtol"] = tol
            r["agree"] = bool(r["loss_rel_diff"] is not None and r["loss_rel_diff"] <= tol and r.get("finite", True))
        else:
            r["loss_rel_diff"] = None
            r["agree"] = None
            r["agree_note"] = ("different loss (dense teacher JSD)" if not comparable
                               else "no reference row at this shape")
        pr = predict(r)
        if pr is not None:
            r["predicted_extra_bytes"] = pr["peak_bytes"]
            r["predicted_rss_extra_bytes"] = pr["rss_expected_bytes"]
        fl = floors(row_case(r))
        t = r.get("time", {})
        fb = t.get("fwd_bwd_ms")
        fl["t_flops_ms"] = fl["flops"] / peak * 1e3 if peak else None
        fl["t_bytes_ms"] = fl["bytes"] / bw * 1e3 if bw else None
        fl["t_floor_ms"] = max(fl["t_flops_ms"] or 0.0, fl["t_bytes_ms"] or 0.0)
        r["floor"] = fl
        if fb:
            r["achieved_tflops"] = fl["flops"] / (fb * 1e-3) / 1e12 if fl["flops"] else None
            r["pct_matmul_peak"] = 100.0 * r["achieved_tflops"] * 1e12 / peak if fl["flops"] else None
            r["x_floor"] = fb / fl["t_floor_ms"] if fl["t_floor_ms"] else None
            if fl["flops"] and t.get("fwd_ms") and t.get("bwd_ms"):
                r["achieved_tflops_fwd"] = fl["flops_fwd"] / (t["fwd_ms"] * 1e-3) / 1e12
                r["achieved_tflops_bwd"] = fl["flops_bwd"] / (t["bwd_ms"] * 1e-3) / 1e12


def _find(rows, path, method):
    for r in rows:
        if r["path"] == path and r["method"] == method and r["status"] == "ok":
            return r
    return None


def row_case(r: dict) -> Case:
    """The case a result row was measured for."""
    return Case(**{k: r[k] for k in Case.__dataclass_fields__})


def predict(r: dict) -> dict | None:
    """Predicted extra memory (memory_model) of an ours-* row on the chunked PyTorch path."""
    from .memory_model import predict_fused_torch, predict_logits_torch
    if r.get("impl") != "torch" or not r["method"].startswith("ours-"):
        return None
    lam = row_case(r).lam
    itemsize = torch.tensor([], dtype=DTYPES[r["dtype"]]).element_size()
    if r["path"] == "logits":
        return predict_logits_torch(r["N"], r["V"], r["K"], itemsize, lam=lam)
    return predict_fused_torch(r["N"], r["D"], r["V"], r["K"], itemsize, lam=lam)


def _lse_via_log_softmax(z: torch.Tensor) -> torch.Tensor:
    j = z.argmax(dim=-1, keepdim=True)
    return (z.gather(1, j) - torch.log_softmax(z, dim=-1).gather(1, j)).squeeze(1)


def lse_micro_benchmark(C: int, V: int, reps: int = 7) -> dict:
    """Per-chunk row log-sum-exp on this CPU: ``torch.logsumexp`` (what the chunked path
    uses) against the same value read off ``torch.log_softmax`` (one fused kernel):
    ``lse = z[r, j] - log_softmax(z)[r, j]`` at each row's max column j (finite even where
    other entries are -inf). Interleaved, medians of ``reps``."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(C, V, generator=g) * 2.0
    fns = {"torch.logsumexp": lambda: torch.logsumexp(z, dim=-1),
           "log_softmax-derived": lambda: _lse_via_log_softmax(z)}
    err = float((fns["torch.logsumexp"]() - fns["log_softmax-derived"]()).abs().max())
    ts = round_robin(fns, reps, warmup=0)
    med = {k: statistics.median(v) * 1e3 for k, v in ts.items()}
    return {"chunk": [C, V], "median_ms": med, "speedup": med["torch.logsumexp"] / med["log_softmax-derived"],
            "max_abs_diff": err}


def evaluate_check(kind: str, rows: list[dict]) -> dict:
    """The targets of the check-logits / check-fused presets."""
    path = "logits" if kind == "logits" else "fused"
    ours_m = "ours-logits" if kind == "logits" else "ours-fused"
    ref, ours = _find(rows, path, "reference"), _find(rows, path, ours_m)
    out = {"kind": kind}
    if ref is None or ours is None:
        out.update(passed=False, verdict="FAIL (a measurement is missing: "
                   + ", ".join(f"{r['label']}: {r['status']}" for r in rows if r["path"] == path) + ")")
        return out
    em_ref = ref["memory"]["extra_minus_grads_bytes"]
    em_ours = ours["memory"]["extra_minus_grads_bytes"]
    mem_ratio = em_ours / em_ref if em_ref > 0 else float("inf")
    tr, to = ref["time"], ours["time"]
    time_ratio = to["fwd_bwd_ms"] / tr["fwd_bwd_ms"]
    out.update(shape={k: ours[k] for k in ("head", "D", "V", "N", "K", "dtype", "device")},
               ours=ours["label"], ours_impl=ours.get("impl"),
               ref_extra_minus_grads_bytes=em_ref, ours_extra_minus_grads_bytes=em_ours,
               ref_peak_extra_bytes=ref["memory"]["peak_extra_bytes"],
               ours_peak_extra_bytes=ours["memory"]["peak_extra_bytes"],
               grads_bytes=ours["memory"]["grads_bytes"],
               mem_ratio=mem_ratio,
               time_ratio=time_ratio, fwd_ratio=to["fwd_ms"] / tr["fwd_ms"], bwd_ratio=to["bwd_ms"] / tr["bwd_ms"],
               ref_time=tr, ours_time=to, loss_rel_diff=ours.get("loss_rel_diff"))
    if kind == "logits":
        mem_lim, time_lim = 1 / 8, 1.1
        out["criterion"] = ("ours extra (beyond logits and dlogits) <= 1/8 of the reference's, "
                            "and fwd+bwd time <= 1.1x the reference's")
        out["mem_limit"], out["time_limit"] = mem_lim, time_lim
        out["mem_pass"] = mem_ratio <= mem_lim
        out["time_pass"] = time_ratio <= time_lim
        out["passed"] = out["mem_pass"] and out["time_pass"]
    else:
        mem_lim = 1 / 16
        out["criterion"] = "ours peak memory beyond inputs and gradients < 1/16 of the reference's"
        out["mem_limit"] = mem_lim
        out["mem_pass"] = mem_ratio < mem_lim
        out["passed"] = out["mem_pass"]
    pred = predict(ours)
    if pred is not None:
        out["predicted"] = pred
        key = "rss_expected_bytes" if ours["device"] == "cpu" else "peak_bytes"
        out["predicted_compared"] = key
        out["measured_over_predicted"] = em_ours / pred[key] if pred[key] else None
    slow = [f"{ph} {r_:.2f}x" for ph, r_ in (("forward", out["fwd_ratio"]), ("backward", out["bwd_ratio"]))
            if r_ > 1.1]
    if kind == "logits" and (slow or not out["time_pass"]):
        # reported even when the total passes: a phase slower than the reference's is worth fixing
        out["speed_diagnosis"] = {"slow_phases": slow or ["neither phase alone; the sum is over the limit"]}
        if ours.get("impl") == "torch" and ours["device"] == "cpu":
            from .memory_model import chunk_rows
            out["speed_diagnosis"]["lse_micro_benchmark"] = lse_micro_benchmark(chunk_rows(ours["V"]), ours["V"])
    if pred is None and kind == "fused" and ours.get("impl") == "triton":
        from .memory_model import triton_fused_model_doc
        out["predicted"] = {"formula": triton_fused_model_doc() or "no memory model in linear_lse_gather.py"}
    parts = [f"memory {mem_ratio:.4f} (1/{1 / mem_ratio:.1f}) vs limit 1/{1 / mem_lim:.0f}: "
             f"{'PASS' if out['mem_pass'] else 'FAIL'}"] if mem_ratio > 0 else [
             f"memory ratio {mem_ratio:.4f}: {'PASS' if out['mem_pass'] else 'FAIL'}"]
    if kind == "logits":
        parts.append(f"time {time_ratio:.3f}x vs limit 1.1x: {'PASS' if out['time_pass'] else 'FAIL'} "
                     f"(fwd {out['fwd_ratio']:.3f}x, bwd {out['bwd_ratio']:.3f}x)")
    else:
        parts.append(f"time {time_ratio:.3f}x the reference (fwd {out['fwd_ratio']:.3f}x, "
                     f"bwd {out['bwd_ratio']:.3f}x; no target)")
    out["verdict"] = ("PASS" if out["passed"] else "FAIL") + ": " + "; ".join(parts)
    return out
