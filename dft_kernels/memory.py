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

#: Byte budgets of the Triton kernels' buffers (the launchers read them from here):
#: a forward's per-tile partials (rows go through the kernel in blocks that fit it), the
#: backward's dz slab ([rows, cols] in the input dtype) and its fp32 dH accumulator.
PARTIAL_BYTES = 64 << 20
SLAB_BYTES = 64 << 20
ACC_BYTES = 128 << 20
#: Byte budget of a forward block's rows of ``h`` gathered in the kernels' row order.
GATHER_BYTES = 64 << 20

#: Bytes per row and teacher slot live at the peak of the targets' slot merge, which the loss
#: runs on every row's K slots before any logits when K > 1 (``merge_duplicate_slots``: a
#: stable sort of the ids and float64 prefix sums of the masses): six float64 [N, K, 2], six
#: 8-byte [N, K] and five bool [N, K] tensors, 6*16 + 6*8 + 5 (measured op by op on the CPU,
#: benchmarks/results/long_context_cpu.md). At long context it is the torch path's peak.
MERGE_SLOT_BYTES = 149

#: The two-head (dense distillation) loss's chunked PyTorch path, ops/two_head/torch.py:
#: fp32 elements of one lean [C, Cv] tile per head, and its vocab columns Cv.
TWO_HEAD_TILE_ELEMS = 1 << 21
TWO_HEAD_TILE_VOCAB = 8192
#: fp32 [rows, V] (fast, naive) or [C, Cv] (lean) buffers of the two-head loss alive at
#: its peak, per strategy: (forward / reverse KL, JSD). Counted op by op on the CPU (the
#: logits of both heads, their log-probs, exp and the divergence's products; JSD adds
#: log m and its terms): ``tests/test_distill_memory.py`` holds the model to the measurement.
TWO_HEAD_BUFFERS = {"naive": (5, 9), "lean": (8, 10), "fast": (7, 9)}
#: Vocab columns per tile of the Triton two-head forward (its per-tile partials, 5 fp32
#: statistics a row and tile, and the reductions over them: 9/5 of the partials).
TWO_HEAD_BLOCK_V = 128

#: fp32 elements of one slab of W upcast to form 16-bit logits in fp32 where torch has
#: no fp32-output 16-bit matmul (the CPU; ``ops._torch_common.linear_fp32``): rows = this // D
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


def target_merge_bytes(n_rows: int, k: int) -> int:
    """Bytes of the targets' slot merge at its peak (:data:`MERGE_SLOT_BYTES` a row and
    slot; none for K <= 1): freed before the first chunk of logits, so it adds to nothing."""
    return n_rows * k * MERGE_SLOT_BYTES if k > 1 else 0


def backward_chunking(N: int, V: int, D: int, elt: int, sep_h: bool, sep_w: bool, *, slab_bytes: int = SLAB_BYTES,
                      acc_bytes: int = ACC_BYTES, align: int = 256) -> tuple[int, int]:
    """Rows per chunk and columns per slab of the Triton backward's dz slab (docs/fused_path.md).

    Args:
        N, V, D: rows, vocab, hidden; elt: bytes per input element.
        sep_h: dH accumulates in a separate fp32 [rows, D] buffer (16-bit inputs, fp32 accumulation).
        sep_w: dW accumulates in fp32 (then one chunk of all N rows when N <= V).
        slab_bytes, acc_bytes: the budgets; align: rows and columns are multiples of it.
    Returns:
        ``(n_chunk, n_slab)``.
    """
    budget_rows = acc_bytes // (4 * D) if sep_h else slab_bytes // (elt * 4 * align)
    budget_rows = max(align, budget_rows // align * align)
    n_chunk = N if (N <= budget_rows or (sep_w and N <= V)) else budget_rows
    v_round = -(-V // align) * align
    n_slab = slab_bytes // (elt * max(n_chunk, 1)) // align * align
    return n_chunk, min(max(n_slab, align), v_round)


def triton_lean_bytes(*, n_rows: int, hidden: int, vocab: int, k: int, dtype_bytes: int,
                      head_trains: bool = True) -> int:
    """Bytes of one forward + backward of the lean strategy on the Triton fused path (a GPU)
    beyond its inputs and the gradients it returns (docs/design.md sec. 10):

    - per row, ``48*M`` (M = K + 1) held through the backward's slab loop (the ids in the
      kernels' row order, the sorted slots, lse, gathered, the merged sparse gradient, the
      row order), and ``150*M`` for a moment before it (the sort and prefix sums that merge
      a row's repeated ids in the sparse gradient, float64);
    - bounded, whatever N: the forward's per-tile partials (at most ``PARTIAL_BYTES``) and
      one block of rows of ``h`` gathered in the kernels' row order (``GATHER_BYTES``); the
      backward's dz slab (about ``SLAB_BYTES``), one row chunk of ``h`` and of dH (fp32 for
      16-bit inputs: ``ACC_BYTES``; a single chunk of all rows while N <= V with a trained
      16-bit head) and the fp32 dW accumulator ``V*D*4`` when a 16-bit head trains over
      several row chunks (:func:`backward_chunking`).

    Nothing grows with N * V or N * D. Args as in :func:`loss_extra_bytes`; returns bytes."""
    N, D, V, e = n_rows, hidden, vocab, dtype_bytes
    M = k + 1
    block = max(1, min(N, GATHER_BYTES // max(D * e, 1)))
    forward = min(N * 3 * -(-V // 64) * 4, PARTIAL_BYTES) + block * D * e
    backward, n_chunk = _slab_backward_bytes(N, D, V, e, head_trains)
    # the chunk's rows of h in the kernels' row order, and of dH scattered back from it
    backward += n_chunk * D * e * (1 if e < 4 else 2)
    return max(N * 150 * M, N * 48 * M + max(forward, backward))


def _slab_backward_bytes(N: int, D: int, V: int, e: int, head_trains: bool) -> tuple[int, int]:
    """``(bytes, rows per chunk)`` of the Triton backward's slab driver
    (``ops/linear/backward.py``): the dz slab, for 16-bit inputs the fp32 dH accumulator of
    one row chunk and, when the head trains over several row chunks, fp32 dW."""
    low = e < 4
    n_chunk, n_slab = backward_chunking(N, V, D, e, low, low and head_trains)
    out = n_chunk * n_slab * e + (n_chunk * D * 4 if low else 0)
    if low and head_trains and n_chunk < N:
        out += V * D * 4
    return out, n_chunk


def two_head_extra_bytes(strategy: str, *, n_rows: int, hidden: int, teacher_hidden: int, vocab: int,
                         dtype_bytes: int, head_trains: bool = True, divergence: str = "forward_kl",
                         chunk_rows: int | None = None, upcast: bool = False, kernels: str = "torch") -> int:
    """Bytes of one forward + backward of the dense distillation loss
    (``fused_linear_distill_loss``, docs/design.md sec. 11) beyond its inputs and the
    gradients it returns, for N counted rows, student hidden D, teacher hidden Dt, vocab V:

    - every strategy: the counted rows of both hidden states, gathered and held to the
      backward, ``N*(D + Dt)*e``, and ``N*32`` of per-row statistics;
    - "naive" (``impl="reference"``: both heads' [N, V] logits): ``B*N*V*4`` with B from
      :data:`TWO_HEAD_BUFFERS` (5 for forward / reverse KL, 9 for JSD);
    - "lean", chunked PyTorch: B [C, Cv] fp32 tiles (B 8 or 10; Cv = min(V, 8192), C =
      ``TWO_HEAD_TILE_ELEMS // Cv`` rows), dH of the gathered rows in fp32 ``N*D*c``
      (c = max(e, 4)) and, with a trained 16-bit head, its fp32 dW ``V*D*4``;
    - "lean", Triton (``kernels="triton"``): the larger of the forward's per-tile partials
      and their reductions (``9/5`` of ``min(N*ceil(V/128)*20, PARTIAL_BYTES)``) and the
      backward's slab driver (dz slab, fp32 dH of a row chunk, fp32 dW over several chunks);
    - "fast" (chunked PyTorch whatever ``kernels``): B [C, V] fp32 chunks (B 7 or 9; C =
      ``FAST_CHUNK_ELEMS // V``) and the gradients held from the forward, ``N*D*c`` and,
      when the head trains, ``V*D*c``.

    With ``upcast`` (the CPU) and e < 4 the torch paths add one upcast slab of W and the
    chunk's rows (as :func:`loss_extra_bytes`). The accuracy term (``lam > 0``) is a
    separate cross-entropy, :func:`loss_extra_bytes` with ``k=0``, after this one's forward.

    Args:
        strategy: "naive", "lean" or "fast"; divergence: "forward_kl", "reverse_kl" or "jsd";
        the others as in :func:`loss_extra_bytes` (``hidden``: the student's D).
    Returns:
        The predicted bytes (int).
    """
    if divergence not in ("forward_kl", "reverse_kl", "jsd"):
        raise ValueError(f"divergence={divergence!r} must be 'forward_kl', 'reverse_kl' or 'jsd'")
    N, D, Dt, V, e = n_rows, hidden, teacher_hidden, vocab, dtype_bytes
    c = max(e, 4)
    base = N * (D + Dt) * e + N * 32
    buffers = TWO_HEAD_BUFFERS[strategy][divergence == "jsd"]
    if strategy == "naive":
        return base + buffers * N * V * 4
    if strategy == "lean" and kernels == "triton":
        forward = min(N * -(-V // TWO_HEAD_BLOCK_V) * 20, PARTIAL_BYTES) * 9 // 5
        return base + max(forward, _slab_backward_bytes(N, D, V, e, head_trains)[0])
    if strategy == "lean":
        cv = min(V, TWO_HEAD_TILE_VOCAB)
        rows = min(N, max(1, TWO_HEAD_TILE_ELEMS // max(cv, 1)))
        work = buffers * rows * cv * c + N * D * c + (V * D * 4 if e < 4 and head_trains else 0)
    else:
        rows = min(N, chunk_rows or max(1, FAST_CHUNK_ELEMS // max(V, 1)))
        work = buffers * rows * V * c + N * D * c + (V * D * c if head_trains else 0)
    if upcast and e < 4:
        work += (rows + min(V, max(1, UPCAST_SLAB_ELEMS // max(D, Dt, 1)))) * max(D, Dt) * 4
    return base + work


def loss_extra_bytes(strategy: str, *, n_rows: int, hidden: int, vocab: int, k: int, dtype_bytes: int,
                     head_trains: bool = True, chunk_rows: int | None = None, upcast: bool = False,
                     kernels: str = "torch", teacher_hidden: int | None = None,
                     divergence: str = "forward_kl") -> int:
    """Bytes of one forward + backward of the loss beyond its inputs.

    With ``teacher_hidden`` (the teacher's D_t) the loss is the dense two-head distillation
    loss (``fused_linear_distill_loss``): :func:`two_head_extra_bytes` (``k`` is not used,
    ``divergence`` picks its buffers). Otherwise the sparse-target loss
    (``fused_linear_dft_loss``), as follows.

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
    ``N*M*64``. "lean" and "fast" (either kernels) are the larger of that sum and
    the targets' slot merge before it, :func:`target_merge_bytes` (``N*K*149`` for K > 1:
    the peak at long context, e.g. N 262144, K 32). Gradients every strategy returns (dH,
    dW) are not counted, except the ones "fast" holds from the forward on; a benchmark that
    reads the peak beyond inputs *and* returned gradients compares it with this value
    minus ``V*D*4*head_trains + N*D*e`` for "fast" (fp32), or with ``target_merge_bytes``
    where that is larger (the merge runs before the gradients exist).

    Args:
        strategy: "naive", "lean" or "fast".
        n_rows: N, positions that count (rows that do not count are never projected).
        hidden: D. vocab: V. k: K teacher slots (0 for a plain cross-entropy).
        dtype_bytes: bytes per element of hidden / weight (2 for bf16, 4 for fp32).
        head_trains: whether the lm_head weight needs a gradient.
        chunk_rows: C, rows per chunk (None: the strategy's default).
        upcast: the device has no fp32-output 16-bit matmul (the CPU: ``not weight.is_cuda``).
        kernels: "torch" (the chunked PyTorch path: the CPU, ``impl="torch"``) or "triton"
            (a GPU: lean is :func:`triton_lean_bytes`; fast's chunk holds its logits and
            the logits-path kernel's gradient, ``2*C*V*4``, instead of the tail chunks).
        teacher_hidden: the teacher's hidden size for the two-head loss, or None.
        divergence: the two-head loss's divergence ("forward_kl", "reverse_kl", "jsd").
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
    if kernels not in ("torch", "triton"):
        raise ValueError(f"kernels={kernels!r} must be 'torch' or 'triton'")
    if teacher_hidden is not None:
        if not isinstance(teacher_hidden, int) or teacher_hidden < 1:
            raise ValueError(f"teacher_hidden={teacher_hidden!r} must be None or an int >= 1")
        return two_head_extra_bytes(strategy, n_rows=n_rows, hidden=hidden, teacher_hidden=teacher_hidden,
                                    vocab=vocab, dtype_bytes=dtype_bytes, head_trains=head_trains,
                                    divergence=divergence, chunk_rows=chunk_rows, upcast=upcast, kernels=kernels)
    N, D, V, e = n_rows, hidden, vocab, dtype_bytes
    small = N * (k + 1) * 64
    if strategy == "naive":
        return N * V * (e + (4 if e != 4 else 0) + 8 + (8 if k > 0 else 0)) + small
    merge = target_merge_bytes(N, k)         # before any logits, whatever the kernels
    if strategy == "lean" and kernels == "triton":
        return max(triton_lean_bytes(n_rows=N, hidden=D, vocab=V, k=k, dtype_bytes=e, head_trains=head_trains), merge)
    C = chunk_rows or chunk_rows_for(strategy, V, N)
    C = min(C, max(N, 1))
    if kernels == "triton":
        chunk = 2 * C * V * max(e, 4)
    else:
        chunk = C * V * max(e, 4) * (1 + (3 if k > 0 else 0))
    if upcast and e < 4:
        chunk += (C + min(V, max(1, UPCAST_SLAB_ELEMS // max(D, 1)))) * D * 4
    held = (V * D * 4 if head_trains else 0) + N * D * e if strategy == "fast" else 0
    return max(chunk + held + small, merge)
