"""Shared test fixtures. Never touch the GPU at import time: collection must work on a CPU machine."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run under the Triton interpreter (before any kernel module is
# imported, since triton.jit reads the variable when it decorates).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
