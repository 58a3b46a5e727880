"""Guarded loading of the optional fused backends: Triton kernels (``dtfast.kernels``) and the C++/CUDA extension.

Nothing here runs at ``import dtfast.ops``: each loader is called on first use and caches its answer, so a
machine without Triton, without CUDA or without a built extension imports and runs the reference backend.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType


class BackendUnavailable(RuntimeError):
    """A requested loss backend cannot run here; the message says why and how to get it."""


def kernel_module(name: str) -> ModuleType:
    """``dtfast.kernels.<name>``; in a source checkout used through PYTHONPATH, ``<repo>/kernels/<name>.py``.

    setup.py maps the repository's ``kernels/`` folder to ``dtfast.kernels`` on install; without an install the
    folder is mapped here the same way. Importing ``dtfast.kernels`` itself does not import Triton.
    """
    if "dtfast.kernels" not in sys.modules:
        try:
            importlib.import_module("dtfast.kernels")
        except ModuleNotFoundError as exc:
            if exc.name != "dtfast.kernels":
                raise
            root = Path(__file__).resolve().parents[2] / "kernels"
            if not (root / "__init__.py").exists():
                raise BackendUnavailable("dtfast.kernels is missing from this installation; reinstall dtfast "
                                         "(`pip install -e .`)") from exc
            spec = importlib.util.spec_from_file_location("dtfast.kernels", root / "__init__.py",
                                                          submodule_search_locations=[str(root)])
            module = importlib.util.module_from_spec(spec)
            sys.modules["dtfast.kernels"] = module
            spec.loader.exec_module(module)
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
