"""Triton helpers used by more than one op file (no loss knowledge)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    """tanh in fp32 from one exp (numerically safe for large |x|)."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _online_lse(m, s, x):
    """One step of a running log-sum-exp ``m + log(s)`` over the values ``x`` (a 1-D
    block; ``-inf`` entries are ignored). Returns the updated ``(m, s)``."""
    new_m = tl.maximum(m, tl.max(x, axis=0))
    safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)
    s = s * tl.exp(m - safe_m) + tl.sum(tl.exp(x - safe_m), axis=0)
    return new_m, s
