"""Runs the measurements of a sweep: a fresh process per measurement (CPU, where
peak RSS is the memory measure) or this process (GPU), and pools the timing rounds."""
from __future__ import annotations

import multiprocessing as mp

from .cases import Case


class Runner:
    """Runs measurements in fresh processes (CPU) or in this process (GPU)."""

    def __init__(self, isolation: str, timeout: float, preload: tuple = ()):
        self.isolation = isolation
        self.timeout = timeout
        self.ctx = None
        if isolation == "subprocess":
            method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
            self.ctx = mp.get_context(method)
            if method == "forkserver":
                # the server imports torch once; each measurement is a fork of it: a fresh
                # process (fresh heap, no earlier measurement in it) that starts in milliseconds
                # (torch._dynamo too when a method imports it on first use: ~3 s per process otherwise)
                self.ctx.set_forkserver_preload(["torch", "dft_kernels", "benchmarks.measure", *preload])
            self.start_method = method

    def run(self, case: Case, mode: str) -> dict:
        from .measure import child_main, run_case
        if self.ctx is None:
            return run_case(case, mode)
        rx, tx = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=child_main, args=(case.to_dict(), mode, tx), daemon=True)
        proc.start()
        tx.close()
        try:
            if rx.poll(self.timeout):
                res = rx.recv()
            else:
                proc.kill()
                res = {"status": f"error: timeout after {self.timeout:.0f} s"}
        except EOFError:
            res = None
        proc.join(10)
        if res is None:
            code = proc.exitcode
            why = "killed (out of memory?)" if code in (-9, 137) else f"exit code {code}"
            res = {"status": f"error: measurement process died: {why}"}
        rx.close()
        return res


def _merge_times(parts: list[dict]) -> dict:
    """Pool the per-iteration samples of several timing processes; medians of the pool."""
    from .measure import time_record
    if len(parts) == 1:
        return parts[0]
    fwd, bwd, tot = ([x for p in parts for x in p[f"samples_{k}_ms"]] for k in ("fwd", "bwd", "fwd_bwd"))
    return time_record(fwd, bwd, tot, parts[0]["clock"], rounds=len(parts),
                       round_medians_fwd_bwd_ms=[p["fwd_bwd_ms"] for p in parts])


def measure_group(runner: Runner, cases: list[Case], rounds: int, report) -> list[dict]:
    """All methods of one shape: memory first (one process each), then ``rounds`` timing
    processes per method, interleaved (A B A B ...) so that a change in background load
    hits every method alike. In-process (GPU): one pass that measures both."""
    results = []
    if runner.ctx is None:
        for c in cases:
            res = runner.run(c, "both")
            results.append(res)
            report(c, res)
        return results
    for c in cases:
        results.append(runner.run(c, "memory"))
    times: list[list[dict]] = [[] for _ in cases]
    for _ in range(max(1, rounds)):
        for i, c in enumerate(cases):
            if results[i].get("status") != "ok" or (times[i] and times[i][-1] is None):
                continue
            tim = runner.run(c, "time")
            if tim.get("status") == "ok":
                times[i].append(tim["time"])
            else:
                results[i]["status"] = "time " + tim.get("status", "error")
                if "traceback" in tim:
                    results[i]["traceback"] = tim["traceback"]
                times[i].append(None)
    for i, c in enumerate(cases):
        parts = [t for t in times[i] if t is not None]
        if parts and results[i].get("status") == "ok":
            results[i]["time"] = _merge_times(parts)
        report(c, results[i])
    return results
