"""DreamTeacher loss: validation, backend dispatch (one place) and the scalar composition.

Backends: "torch" (the reference in ``dtfast.ops.reference``). Fused backends arrive behind the same argument.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _validate
from .reference import dreamteacher_loss_parts

BACKENDS = ("auto", "torch")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend for ``backend`` (or the DTFAST_BACKEND environment override) on this device."""
    requested = os.environ.get("DTFAST_BACKEND", "") or backend
    if requested not in BACKENDS:
        raise ValueError(f"dreamteacher_loss: unknown backend {requested!r}; choose one of {BACKENDS}")
    return "torch"


def dreamteacher_loss_terms(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], *,
                            whiten: str = "channel", at_mode: str = "paper", backend: str = "auto",
                            check_finite: bool = True) -> tuple[Tensor, Tensor]:
    """Validated per-level terms (mse: Tensor[L], at: Tensor[L]) from the chosen backend."""
    _validate.check_options(whiten, at_mode)
    _validate.check_feature_lists(student_feats, teacher_feats)
    teacher_feats = [g.detach() for g in teacher_feats]
    resolve_backend(backend, student_feats[0].device, student_feats[0].dtype)
    mse, at = dreamteacher_loss_parts(list(student_feats), teacher_feats, whiten, at_mode)
    if check_finite and not torch.compiler.is_compiling():
        _validate.check_finite(mse, at, student_feats, teacher_feats)
    return mse, at
