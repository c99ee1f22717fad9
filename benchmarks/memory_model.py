"""Predicted peak memory of the chunked PyTorch path (dft_kernels/ops/_torch_common.py).

Derived by reading ``LSEGatherTorch`` (logits path) and ``LinearLSEGatherTorch``
(fused path) tensor by tensor, and checked against peak-RSS measurements of
single chunks. The check presets of the sweep put each prediction next to the
measurement (``measured_over_predicted``), and results JSONs record the hashes of
the sources they ran with. Which columns are gathered and at which temperatures
comes from the library itself (``dft_kernels.losses.gather_plan``), the chunk size from
``dft_kernels.memory.chunk_rows_for``. Every number is bytes *beyond the
inputs and the returned gradients*.

Notation: C = chunk rows = ``chunk_elems // V`` (``chunk_elems`` = 2**22 fp32
elements by default), s = bytes per input element, ``c32 = C*V*4`` (one fp32
chunk), ``cd = C*V*s``, S = number of softmax scales (1, or 2 with temperature
!= 1 and the CE term on), sc = 1 if a scale != 1 (``z * s`` makes a copy),
R = 1 when the student's tail log-sum-exp over the vocab outside the teacher's
slots is computed (``n_slots > 0``: tail="bucket", the default, and K > 0),
cast = 1 if s != 4 (``.to(fp32)`` copies; for fp32, ``z`` aliases the input rows
or the chunk's logits), st = 1 when there is more than one chunk (a name still
bound to the previous chunk's tensor while the next one is allocated).

Logits path, per chunk of rows:
  forward   ``logsumexp`` allocates one [C, V] temporary (``(z - max).exp()``), plus
            ``z * s``; the tail: ``pad(z, (0, 1))`` is a [C, V+1] copy and its
            ``logsumexp`` another temporary; with cast, the previous chunk's ``z``
            is still bound while the next one is made:
                fwd = c32 * max(2*cast*st, cast + max(1 + sc, 2R))
  backward  dx is the gradient (``torch.empty``, written chunk by chunk); ``softmax``
            gives dz (+ a second softmax when S = 2); the tail: the [C, V+1] copy and
            ``(copy - lse).exp_()`` alive together with dz; dz is not kept
            (``dx2[i:j] = _dz(...)``):
                bwd = c32 * max(2*cast*st, cast + max(S + sc, 1 + 2R))

Fused path, per chunk (``z = linear_fp32(h[i:j], W)``: fp32 logits, no 16-bit copy; with
cast the CPU upcasts the chunk's rows and one W slab of Vs = ``UPCAST_SLAB_ELEMS // D``
rows, ``U = (C + Vs)*D*4``):
  forward   the previous chunk's ``z`` + the new logits (+ the upcast), then z,
            the ``logsumexp`` temporary, and the tail's copy + temporary:
                fwd = max(st*c32 + c32 + cast*U, c32 * (2 + sc), 3*R*c32)
  backward  dW accumulator: an fp32 [V, D] buffer alive all along when ``accum_fp32``
            and s != 4 (extra V*D*4; the returned gradient is its cast); with s == 4
            (or accum_fp32=False) the accumulator *is* the gradient.
            phase A (dz):  z + dz + (second softmax | the tail's two [C, V+1] tensors):
                               A = c32 * max(2 + sc if S == 1 else 3 + sc, 4R)
            phase B (dW, dH): ``dzc = dz.to(dtype)`` (a copy if cast); same-dtype
                           accumulator: ``dw.addmm_(dzc.t(), h[i:j])`` in place; fp32
                           accumulator for low-precision inputs: ``h[i:j].to(fp32)``:
                               B = cast * (c32 + cd + accum_fp32*C*D*4)
            dh[i:j] is written in place (``torch.mm(..., out=)``); ``del dz, dzc`` ends
            the loop body, so nothing stays bound into the next chunk.
                bwd = dW_extra + max(A, B)

Small terms: the loss math on [N, M] fp32 tensors keeps ~``LOSS_COEF * N*M*4``
bytes for its backward during the forward (an estimate, not derived; freed
before the kernel's backward runs), and index / lse / gathered / their grads,
~``N*M*16`` bytes, live throughout.

The benchmarks report peak memory beyond the inputs *minus the gradients*; the
gradients need not be alive at the peak (the fused path makes a bf16 dW only
after its loop; the logits path's forward runs before dlogits exists), so each
predictor takes the maximum of (live bytes beyond the inputs) over the phases and
then subtracts the gradients, as the measurement does.

Peak RSS (CPU) counts a page when it is first written: ``torch.empty`` gradient
buffers fill chunk by chunk, so the RSS peak is below the allocator-level one
(by up to a few chunks of dlogits on the logits path): ``rss_expected_bytes``
replays the chunks with that rule; ``peak_bytes`` is the allocator-level figure
(what ``torch.cuda.max_memory_allocated`` would see).
"""
from __future__ import annotations

import math

import torch
from dft_kernels.losses import gather_plan
from dft_kernels.memory import UPCAST_SLAB_ELEMS
from dft_kernels.memory import chunk_rows_for
from dft_kernels.options import LOSS_DEFAULTS, needs_student_tail

from .harness import MiB

LOSS_COEF = 40


def _plan(K: int, lam: float, temperature: float, V: int) -> tuple[list, int, int]:
    """(scales, M, R) as the library chooses them for the default loss options: the
    library's own column plan on a one-row problem, and whether the divergence reads
    the student's tail (R = 1: the tail's log-sum-exp over the vocab outside the slots)."""
    index, temps = gather_plan(torch.arange(K).unsqueeze(0) if K > 0 else None,
                               torch.full((1, K), -math.log(K + 1)) if K > 0 else None,
                               torch.zeros(1, dtype=torch.int64), lam=lam, temperature=temperature,
                               ignore_index=LOSS_DEFAULTS["ignore_index"], n_rows=1, vocab=V)
    tail = needs_student_tail(LOSS_DEFAULTS["divergence"], LOSS_DEFAULTS["beta"], LOSS_DEFAULTS["tail"])
    return [1.0 / t for t in temps], int(index.shape[1]), int(K > 0 and tail)


def _small(N: int, M: int) -> tuple[int, int]:
    return LOSS_COEF * N * M * 4, N * M * 16


def _row_chunks(N: int, C: int) -> list[int]:
    return [C] * (N // C) + ([N % C] if N % C else [])


def predict_logits_torch(N: int, V: int, K: int, itemsize: int, *, lam: float = 0.2, temperature: float = 1.0,
                         chunk_elems: int | None = None) -> dict:
    """Peak memory beyond the inputs, minus the gradient dlogits (G = N*V*s, alive all
    through the backward): ``peak_bytes`` at allocator level (what
    ``torch.cuda.max_memory_allocated`` sees), ``rss_expected_bytes`` as peak RSS sees it
    (dx's pages count once written, chunk by chunk)."""
    C = chunk_rows_for("lean", V, None, chunk_elems)
    c32 = C * V * 4
    scales, M, R = _plan(K, lam, temperature, V)
    S, sc, cast = len(scales), int(any(s != 1.0 for s in scales)), int(itemsize != 4)
    st = int(N > C)
    f_fwd = max(2 * cast * st, cast + max(1 + sc, 2 * R))     # in fp32 chunks
    f_bwd = max(2 * cast * st, cast + max(S + sc, 1 + 2 * R))
    loss_math, live = _small(N, M)
    G = N * V * itemsize
    rows = _row_chunks(N, C)
    fwd = f_fwd * c32
    bwd = f_bwd * c32
    peak_alloc = max(fwd, loss_math, G + bwd) + live - G
    before, bwd_rss = 0, 0
    for r in rows:
        # while dz is formed: the rows written so far + the chunk's temporaries; then the
        # chunk's rows of dx are written while dz (one fp32 chunk) is still alive
        bwd_rss = max(bwd_rss, before * V * itemsize + f_bwd * r * V * 4, (before + r) * V * itemsize + r * V * 4)
        before += r
    peak_rss = max(fwd, loss_math, bwd_rss) + live - G
    return {"chunk_rows": C, "chunk_fp32_bytes": c32, "forward_bytes": fwd, "backward_bytes": bwd,
            "loss_math_bytes": loss_math, "live_small_bytes": live, "grads_bytes": G,
            "peak_bytes": peak_alloc, "rss_expected_bytes": peak_rss,
            "formula": (f"backward temporaries {f_bwd} x c32 = {bwd / MiB:.1f} MiB on top of dlogits (forward "
                        f"{f_fwd} x c32 = {fwd / MiB:.1f} MiB comes before dlogits exists) + {live / MiB:.1f} MiB "
                        f"live [N, M]; c32 = {c32 / MiB:.2f} MiB (C = {C} rows), S = {S}, sc = {sc}, R = {R}, "
                        f"cast = {cast}; as peak RSS sees it (dlogits filled chunk by chunk, last chunk "
                        f"{rows[-1]} rows): {peak_rss / MiB:.1f} MiB")}


def predict_fused_torch(N: int, D: int, V: int, K: int, itemsize: int, *, lam: float = 0.2,
                        temperature: float = 1.0, accum_fp32: bool = True, chunk_elems: int | None = None,
                        need_h: bool = True, need_w: bool = True) -> dict:
    """Peak memory beyond the inputs, minus the gradients dH and dW (G): the maximum
    over forward, loss math, each backward chunk (dH buffer + dW accumulator + the
    chunk's temporaries) and the final cast of a separate fp32 accumulator."""
    C = chunk_rows_for("lean", V, None, chunk_elems)
    c32, cd = C * V * 4, C * V * itemsize
    scales, M, R = _plan(K, lam, temperature, V)
    S, sc, cast = len(scales), int(any(s != 1.0 for s in scales)), int(itemsize != 4)
    rows = _row_chunks(N, C)
    st = int(len(rows) > 1)
    sep_acc = bool(need_w and accum_fp32 and cast)           # fp32 accumulator distinct from the gradient
    acc = (V * D * 4 if sep_acc else V * D * itemsize) if need_w else 0
    dh = N * D * itemsize if need_h else 0
    G = dh + (V * D * itemsize if need_w else 0)
    upcast = (C + min(V, max(1, UPCAST_SLAB_ELEMS // max(D, 1)))) * D * 4
    fwd = max(st * c32 + c32 + cast * upcast, c32 * (2 + sc), 3 * R * c32)
    f_a = max((2 + sc) if S == 1 else (3 + sc), 4 * R)        # dz phase, fp32 chunks
    b = cast * (c32 + cd + (C * D * 4 if sep_acc else 0))     # cast / dW phase
    loss_math, live = _small(N, M)
    loop_alloc = dh + acc + max(f_a * c32, b)
    end = dh + acc + (V * D * itemsize if sep_acc else 0)
    peak_alloc = max(fwd, loss_math, loop_alloc, end) + live - G
    before, loop_rss = 0, 0
    for r in rows:
        loop_rss = max(loop_rss, before * D * itemsize * need_h + acc + max(f_a * r * V * 4, b * r // C))
        before += r
    peak_rss = max(fwd, loss_math, loop_rss, end) + live - G
    return {"chunk_rows": C, "chunks": len(rows), "chunk_fp32_bytes": c32,
            "dw_accumulator_extra_bytes": V * D * 4 if sep_acc else 0, "forward_bytes": fwd,
            "backward_chunk_bytes": max(f_a * c32, b), "loss_math_bytes": loss_math, "live_small_bytes": live,
            "grads_bytes": G, "peak_bytes": peak_alloc, "rss_expected_bytes": peak_rss,
            "formula": (f"max(forward {fwd / MiB:.1f}, backward per chunk {max(f_a * c32, b) / MiB:.1f}"
                        + (f" + fp32 dW accumulator {V * D * 4 / MiB:.1f} - bf16/fp16 dW not yet made "
                           f"{V * D * itemsize / MiB:.1f}" if sep_acc else "")
                        + f") + {live / MiB:.1f} MiB live [N, M]; dz phase {f_a} x c32, c32 = {c32 / MiB:.2f} MiB "
                        f"(C = {C} rows, {len(rows)} chunks), S = {S}, R = {R}, cast = {cast}; as peak RSS sees "
                        f"it: {peak_rss / MiB:.1f} MiB")}


def triton_fused_model_doc() -> str | None:
    """The memory model written in dft_kernels/ops/linear/triton.py's docstring, if any."""
    try:
        import ast
        import importlib.util
        spec = importlib.util.find_spec("dft_kernels.ops.linear.triton")
        if spec is None or not spec.origin:
            return None
        with open(spec.origin) as f:
            doc = ast.get_docstring(ast.parse(f.read())) or ""
    except (OSError, SyntaxError, ImportError, ValueError):
        return None
    i = doc.find("Memory model")
    return doc[i:].strip() if i >= 0 else None
