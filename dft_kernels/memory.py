"""The library's memory model of the loss on the fused path (docs/design.md sec. 10).

One function, :func:`loss_extra_bytes`, predicts the bytes a loss call needs beyond
its inputs, for the naive reference and the two strategies of the fused path.
``strategy="auto"`` compares it with ``memory_budget``; benchmarks check it against
measured peaks.
"""
from __future__ import annotations

#: strategies the model knows: the naive reference and the two of the fused path
MODELLED = ("naive", "lean", "fast")

#: fp32 elements of one lean chunk of logits in the torch path (rows = this // V)
LEAN_CHUNK_ELEMS = 1 << 22

#: fp32 elements of one fast chunk of logits (rows = this // V): big enough that
#: the rank-C updates of dW run near matmul speed, small next to the naive [N, V]
FAST_CHUNK_ELEMS = 1 << 23

#: fp32 elements of one slab of W upcast to form 16-bit logits in fp32 where torch has
#: no fp32-output 16-bit matmul (the CPU; ``ops.torch_chunked.linear_fp32``): rows = this // D
UPCAST_SLAB_ELEMS = 1 << 20


def chunk_rows_for(strategy: str, vocab: int, n_rows: int | None = None, chunk_elems: int | None = None) -> int:
    """Rows per chunk of ``strategy`` ("lean" or "fast") at vocab size ``vocab``.

    Args:
        strategy: "lean" or "fast".
        vocab: V, the vocab size.
        n_rows: N, caps the result (None: no cap).
        chunk_elems: elements per chunk (None: the strategy's default).
    Returns:
        C >= 1, the rows of one chunk.
    """
    elems = chunk_elems or (FAST_CHUNK_ELEMS if strategy == "fast" else LEAN_CHUNK_ELEMS)
    rows = max(1, elems // max(vocab, 1))
    return min(rows, n_rows) if n_rows else rows


def loss_extra_bytes(strategy: str, *, n_rows: int, hidden: int, vocab: int, k: int, dtype_bytes: int,
                     head_trains: bool = True, chunk_rows: int | None = None, upcast: bool = False) -> int:
    """Bytes of one forward + backward of the loss beyond its inputs.

    With e = ``dtype_bytes``, N rows, D hidden, V vocab, M = K + 1 gathered columns and
    C rows per chunk (``chunk_rows`` or :func:`chunk_rows_for`), every intermediate in fp32:

    - "naive" (logits materialised, autograd through ``log_softmax``): the logits, their
      fp32 copy when e != 4, the log-probs, and in the backward the gradient of the
      log-probs next to the gradient of the logits, and with teacher slots (K > 0) two more
      fp32 [N, V] tensors (the tail masking): ``N*V*(e + 4*[e != 4] + 8 + 8*[K > 0])``.
    - "lean" and "fast" hold one chunk of logits at a time, formed in fp32 straight from
      16-bit operands (an fp32-output matmul; never a 16-bit copy): the softmax and its
      gradient are formed in that storage, and with teacher slots (K > 0: the tail
      log-sum-exp over the vocab outside the slots, its gradient) three more fp32 chunks:
      ``C*V*c*(1 + 3*[K > 0])``, c = max(e, 4) (float64 inputs compute in float64).
      With ``upcast`` (a device without an fp32-output 16-bit matmul: the CPU) and e < 4,
      the chunk's rows and one slab of Vs = ``UPCAST_SLAB_ELEMS // D`` rows of W are
      upcast to fp32 to form them: ``(C + min(V, Vs))*D*4`` more.
      Lean's chunk is C = ``LEAN_CHUNK_ELEMS // V`` rows (the Triton kernels need less:
      tiles only), fast's C = ``FAST_CHUNK_ELEMS // V`` (with ``impl="triton"`` the
      logits-path kernels write the chunk's gradient to a second fp32 chunk, ``C*V*4``
      more, not counted here).
    - "fast" adds the gradients held from the forward to the backward: dW accumulated in
      fp32 ``V*D*4`` when the head trains (``head_trains``) and dH ``N*D*e``.

    All three add the small per-row tensors (ids, lse, gathered, the loss math on them):
    ``N*M*64``. Gradients every strategy returns (dH, dW) are not counted, except the ones
    "fast" holds from the forward on; a benchmark that reads the peak beyond inputs *and*
    returned gradients compares it with this value minus ``V*D*4*head_trains + N*D*e``
    for "fast" (fp32).

    Args:
        strategy: "naive", "lean" or "fast".
        n_rows: N, positions that count (rows that do not count are never projected).
        hidden: D. vocab: V. k: K teacher slots (0 for a plain cross-entropy).
        dtype_bytes: bytes per element of hidden / weight (2 for bf16, 4 for fp32).
        head_trains: whether the lm_head weight needs a gradient.
        chunk_rows: C, rows per chunk (None: the strategy's default).
        upcast: the device has no fp32-output 16-bit matmul (the CPU: ``not weight.is_cuda``).
    Returns:
        The predicted bytes (int).
    """
    if strategy not in MODELLED:
        raise ValueError(f"strategy={strategy!r} is not one of {MODELLED}")
    for name, v in (("n_rows", n_rows), ("hidden", hidden), ("vocab", vocab), ("k", k)):
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"{name}={v!r} must be an int >= 0")
    if dtype_bytes not in (1, 2, 4, 8):
        raise ValueError(f"dtype_bytes={dtype_bytes!r} must be 1, 2, 4 or 8 (bytes per element)")
    N, D, V, e = n_rows, hidden, vocab, dtype_bytes
    small = N * (k + 1) * 64
    if strategy == "naive":
        return N * V * (e + (4 if e != 4 else 0) + 8 + (8 if k > 0 else 0)) + small
    C = chunk_rows or chunk_rows_for(strategy, V, N)
    C = min(C, max(N, 1))
    chunk = C * V * max(e, 4) * (1 + (3 if k > 0 else 0))
    if upcast and e < 4:
        chunk += (C + min(V, max(1, UPCAST_SLAB_ELEMS // max(D, 1)))) * D * 4
    held = (V * D * 4 if head_trains else 0) + N * D * e if strategy == "fast" else 0
    return chunk + held + small
