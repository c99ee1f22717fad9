"""Benchmarks of dft_kernels against the naive reference and the peers.

Entry points:

    python -m benchmarks.sweep --shapes cpu-small --quick     # time / memory sweep -> benchmarks/results/
    python -m benchmarks.plot benchmarks/results/<run>.json   # redraw the plots of a run
    pytest benchmarks/ --benchmark-only                       # pytest-benchmark suites

``common`` holds shapes, inputs and methods, ``measure`` runs one measurement,
``memory_model`` predicts the chunked PyTorch path's peak memory, ``report`` and
``plot`` turn a results JSON into markdown and PNGs.
"""
