"""A teacher's top-k from hidden states (docs/design.md sec. 11). ``triton.py``: the kernel;
``torch.py``: chunked PyTorch; ``naive.py``: the float64 reference. Entry point:
``ops.teacher_topk_apply``."""
