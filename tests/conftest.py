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
