"""The fused linear path: the primitive of docs/design.md sec. 6 for logits ``h @ W.T + b``
that are never materialised. ``triton.py``: forward kernels and the backward's dz tile;
``backward.py``: the backward's slab loop and its two products; ``gemm.py``: those
products in Triton; ``config.py``: every launch configuration; ``torch.py``: chunked
PyTorch (strategy "lean"); ``fast.py``: strategy "fast"; ``naive.py``: the float64
reference. Entry points: ``ops.linear_lse_gather_apply``, ``ops.linear_fast_loss_apply``."""
