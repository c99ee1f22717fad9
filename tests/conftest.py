"""Run the Triton kernels under the interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is imported; importing torch does not
import triton, and dft_kernels imports its Triton modules lazily."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one torch thread for the module (a second only adds OpenMP hand-offs,
    which stall on shared cores), restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
