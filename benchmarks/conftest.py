"""pytest-benchmark suites: ``pytest benchmarks/ --benchmark-only``.

Small fp32 CPU shapes by default, lm_head shapes in bf16 when CUDA is available.
Not part of the main test run (``pytest tests``). Peak memory is measured by
``python -m benchmarks.sweep``, not here.
"""
import os

import pytest
import torch

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="session")
def peers():
    from benchmarks.common import peer_versions
    return peer_versions()


def pytest_report_header(config):
    dev = torch.cuda.get_device_name() if CUDA else "cpu"
    return [f"dft_kernels benchmarks on {dev} (torch {torch.__version__}); "
            f"torch.compile cases {'on' if CUDA or os.environ.get('DFT_BENCH_COMPILE') == '1' else 'off (DFT_BENCH_COMPILE=1)'}"]
