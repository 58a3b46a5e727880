"""Guarded loading of the optional fused backends: Triton kernels (``dtfast.kernels``) and the C++/CUDA extension.

Nothing here runs at ``import dtfast.ops``: each loader is called on first use and caches its answer, so a
machine without Triton, without CUDA or without a built extension imports and runs the reference backend.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType


class BackendUnavailable(RuntimeError):
    """A requested loss backend cannot run here; the message says why and how to get it."""


def kernel_module(name: str) -> ModuleType:
    """``dtfast.kernels.<name>`` (importing ``dtfast.kernels`` itself does not import Triton).

    The kernels live inside the package: a top-level ``kernels`` folder would shadow the ``kernels`` package of
    PyPI, which diffusers imports, whenever the repository root is on ``sys.path`` (``python -m`` from a checkout).
    """
    return importlib.import_module(f"dtfast.kernels.{name}")


@functools.cache
def _triton_kernels() -> ModuleType | str:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"Triton is not importable ({exc}); install it with `pip install triton` (Linux, CUDA GPUs)"
    return kernel_module("dreamteacher_loss")


def triton_available() -> bool:
    return not isinstance(_triton_kernels(), str)


def triton_kernels() -> ModuleType:
    """``dtfast.kernels.dreamteacher_loss`` or BackendUnavailable."""
    found = _triton_kernels()
    if isinstance(found, str):
        raise BackendUnavailable(found)
    return found


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _extension() -> str | None:
    try:
        importlib.import_module("dtfast._C")
    except ImportError as exc:
        return (f"the C++/CUDA extension dtfast._C cannot be loaded ({exc}); (re)build it with "
                "`pip install --no-build-isolation -e .` (torch installed first, DTFAST_SKIP_EXT unset)")
    import torch

    if not hasattr(torch.ops.dtfast, "dreamteacher_loss_fwd"):
        return "dtfast._C is loaded but does not register torch.ops.dtfast.dreamteacher_loss_fwd; rebuild it"
    return None


def extension_ops():
    """``(torch.ops.dtfast.dreamteacher_loss_fwd, ..._bwd)`` from dtfast._C, or BackendUnavailable."""
    why = _extension()
    if why is not None:
        raise BackendUnavailable(why)
    import torch

    return torch.ops.dtfast.dreamteacher_loss_fwd, torch.ops.dtfast.dreamteacher_loss_bwd


def extension_has(device_type: str) -> bool:
    """Whether dtfast._C registers a kernel for this dispatch key ("cpu" -> CPU, "cuda" -> CUDA)."""
    if _extension() is not None:
        return False
    import torch

    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key("dtfast::dreamteacher_loss_fwd", key)
