"""Triton 3.6's interpreter under NumPy >= 2.5: a loop bound that is a kernel value fails.

The interpreter holds every scalar (``tl.program_id``, a loaded scalar, a reduction) as a one-element NumPy array, and
turns it into a Python int for ``range`` with ``int(array)``. NumPy 2.5 no longer converts arrays of one or more
dimensions that way ("only 0-dimensional arrays can be converted to Python scalars"; 2.0-2.4 warn that it will), so
every kernel with a loop over a runtime count fails there. Triton 3.7 and later squeeze the array first; this applies
the same fix to the interpreters that do not (triton 3.6, the GPU machine's version). Only the interpreter is touched,
and only when ``TRITON_INTERPRET=1``: compiled kernels never take this path.
"""
from __future__ import annotations

import warnings

import numpy as np


def needs_patch(interpreter) -> bool:
    """True where ``interpreter._patch_lang_tensor`` makes an ``__index__`` that fails on one-element arrays."""
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_dtfast_compat", False):
        return False

    class _Handle:
        data = np.array([1])

    class _Tensor:
        handle = _Handle()

    class _Scope:
        def set_attr(self, obj, name, value):
            setattr(obj, name, value)

    patch(_Tensor, _Scope())
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # NumPy 2.0-2.4 only warn that this will fail
        try:
            _Tensor().__index__()
        except (TypeError, DeprecationWarning):
            return True
    return False


def apply() -> bool:
    """Patch the interpreter if it needs it; True if it was patched."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    try:
        if not needs_patch(interpreter):
            return False
    except Exception:  # noqa: BLE001 - another interpreter layout: leave it as it is
        return False
    original = interpreter._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        # .item(): one element, whatever the shape; more than one still fails, as in triton 3.8
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).item()))

    _patch_lang_tensor._dtfast_compat = True
    interpreter._patch_lang_tensor = _patch_lang_tensor
    return True
