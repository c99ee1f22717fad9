"""Benchmarks of dft_kernels against the naive reference and the peers.

Entry points:

    python -m benchmarks.sweep --shapes cpu-small --quick     # time / memory sweep -> benchmarks/results/
    python -m benchmarks.plot benchmarks/results/<run>.json   # redraw the plots of a run

``harness`` is the one timing and peak-memory helper every benchmark script uses
(warm-up, repeats, median / best; CUDA events and synchronize on GPU,
``time.perf_counter`` on CPU; ``max_memory_allocated`` or peak RSS beyond a
baseline). The sweep: ``cases`` holds shapes, inputs and floors, ``methods`` the
methods compared and the peers, ``presets`` the sweep's presets, ``measure`` runs
one measurement, ``runner`` runs them (a fresh process each on CPU), ``analysis`` compares rows with the reference, the floors and the
targets, ``memory_model`` predicts the chunked PyTorch path's peak memory,
``runinfo`` records versions and sources, ``report`` and ``plot`` turn a results
JSON into markdown and PNGs.
"""
