"""The dense divergence between two heads' softmaxes (docs/design.md sec. 11). ``triton.py``:
the lean strategy's kernels; ``torch.py``: chunked PyTorch (lean and fast); ``naive.py``:
the float64 reference. Entry point: ``ops.two_head_divergence_apply``."""
