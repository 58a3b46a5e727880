import os

import pytest
import torch

# Triton kernels are tested on CPU tensors through the interpreter (set before triton is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip_cuda)


def cpu_and_cuda():
    """Parametrize helper: 'cpu' always, 'cuda' marked needs_cuda."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)]
