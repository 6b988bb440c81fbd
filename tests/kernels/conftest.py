"""Kernel tests: Triton runs compiled on a CUDA device, interpreted on CPU otherwise.

TRITON_INTERPRET must be set before our kernels are decorated by `triton.jit`, i.e. before
the test modules import kernels.sgmv_*; conftest is imported first. The interpreter has no
bf16, so bf16 and CUDA-graph cases carry the `gpu` marker and are skipped without CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _skip_gpu_without_cuda(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("gpu") is not None and not HAS_CUDA:
        pytest.skip("needs a CUDA device")


@pytest.fixture
def device() -> torch.device:
    """Where the kernels run: the GPU if there is one, else the CPU under the interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
