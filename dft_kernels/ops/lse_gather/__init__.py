"""The logits path: per-row log-sum-exp and gathered logits of given ``[N, V]`` logits
(docs/design.md sec. 6). ``triton.py``: the kernels; ``torch.py``: chunked PyTorch;
``naive.py``: the float64 reference the tests use. Entry point: ``ops.lse_gather_apply``."""
