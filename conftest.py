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


@pytest.fixture(autouse=True)
def _kernel_tests_on_cuda(request):
    """The files that call the Triton kernels with tensors made on the default device (module attribute
    ``KERNEL_TESTS_ON_CUDA = True``) run their unmarked tests on the GPU where there is one and the
    interpreter is off: the odd shapes, poisoned outputs and bit-equality checks then hold on the real
    kernels too (``scripts/gpu_plan.sh tests-generic``). On a CPU machine nothing changes."""
    on_cuda = (getattr(request.module, "KERNEL_TESTS_ON_CUDA", False) and "gpu" not in request.node.keywords
               and torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1")
    if not on_cuda:
        yield
        return
    torch.set_default_device("cuda")
    try:
        yield
    finally:
        torch.set_default_device(None)
