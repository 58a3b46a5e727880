"""Input checks for the DreamTeacher loss: errors name the level and both shapes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from .reference import AT_MODES, WHITEN_MODES

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _shapes(feats: Sequence[Tensor]) -> list[tuple[int, ...]]:
    return [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in feats]


def check_options(whiten: str, at_mode: str) -> None:
    if whiten not in WHITEN_MODES:
        raise ValueError(f"dreamteacher_loss: whiten must be one of {WHITEN_MODES}, got {whiten!r}")
    if at_mode not in AT_MODES:
        raise ValueError(f"dreamteacher_loss: at_mode must be one of {AT_MODES}, got {at_mode!r}")


def _well_formed(student_feats, teacher_feats) -> bool:
    """True when check_feature_lists has nothing to report (it then only runs the detailed checks on failure)."""
    if isinstance(student_feats, Tensor) or isinstance(teacher_feats, Tensor) or not student_feats \
            or len(student_feats) != len(teacher_feats):
        return False
    device = None
    for s, g in zip(student_feats, teacher_feats):
        if not isinstance(s, Tensor) or not isinstance(g, Tensor):
            return False
        shape = s.shape
        if len(shape) != 4 or shape != g.shape or not s.numel() or s.dtype != g.dtype or s.dtype not in DTYPES:
            return False
        if device is None:
            device = s.device
        if s.device != device or g.device != device:
            return False
    return True


def check_feature_lists(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> None:
    """Raise ValueError for a level-count, rank, shape, dtype or device mismatch (naming level and shapes)."""
    if _well_formed(student_feats, teacher_feats):  # the common case, in one pass (host cost of every loss call)
        return
    if isinstance(student_feats, Tensor) or isinstance(teacher_feats, Tensor):
        raise ValueError("dreamteacher_loss: pass lists of (B, C, H, W) maps, one per level (wrap a single map "
                         "in a list)")
    if len(student_feats) != len(teacher_feats):
        raise ValueError(f"dreamteacher_loss: {len(student_feats)} student levels {_shapes(student_feats)} but "
                         f"{len(teacher_feats)} teacher levels {_shapes(teacher_feats)}")
    if len(student_feats) == 0:
        raise ValueError("dreamteacher_loss: got no feature levels")
    for level, (s, g) in enumerate(zip(student_feats, teacher_feats)):
        if not isinstance(s, Tensor) or not isinstance(g, Tensor):
            raise ValueError(f"dreamteacher_loss: level {level}: expected tensors, got student "
                             f"{type(s).__name__} and teacher {type(g).__name__}")
        where = f"dreamteacher_loss: level {level}: student {tuple(s.shape)} vs teacher {tuple(g.shape)}"
        if s.dim() != 4 or g.dim() != 4:
            raise ValueError(f"{where}: both must be 4-D (B, C, H, W)")
        if s.shape != g.shape:
            raise ValueError(f"{where}: shapes differ")
        if s.numel() == 0:
            raise ValueError(f"{where}: empty maps")
        if s.dtype != g.dtype:
            raise ValueError(f"{where}: dtypes differ ({s.dtype} vs {g.dtype})")
        if s.dtype not in DTYPES:
            raise ValueError(f"{where}: expected maps in one of {DTYPES}, got {s.dtype}")
        if s.device != g.device:
            raise ValueError(f"{where}: devices differ ({s.device} vs {g.device})")
        if level and s.device != student_feats[0].device:
            raise ValueError(f"{where}: on {s.device} but level 0 is on {student_feats[0].device}")


def check_finite(mse: Tensor, at: Tensor, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> None:
    """Raise ValueError if a per-level term is not finite, naming the level and the offending tensor.

    Cheap by construction: a non-finite input value always makes that level's mse non-finite (inf/nan in s
    enters (s - W(g))^2 directly; in g it poisons the whitening statistics), so the common case costs one
    ``isfinite`` over the 2L per-level terms and one host sync. Only on failure are the maps scanned (one
    fused ``isfinite().all()`` per tensor) to say which one holds the bad values.
    """
    if mse.device.type == "meta" or is_fake(mse):
        return  # shape inference (meta device, FakeTensorMode): there are no values to check
    terms = torch.cat([mse.detach().reshape(-1), at.detach().reshape(-1)])
    if bool(torch.isfinite(terms).all()):
        return
    bad = []
    for level, (s, g) in enumerate(zip(student_feats, teacher_feats)):
        flags = torch.stack([torch.isfinite(s).all(), torch.isfinite(g).all()]).tolist()
        for name, ok in zip(("student", "teacher"), flags):
            if not ok:
                bad.append(f"level {level}: {name} map {tuple(s.shape)} holds non-finite values")
    if not bad:
        levels = [i for i, ok in enumerate(torch.isfinite(mse.detach()) & torch.isfinite(at.detach())) if not ok]
        bad.append(f"levels {levels}: the inputs are finite but a term overflowed (values too large for float32?)")
    raise ValueError("dreamteacher_loss: non-finite loss terms: " + "; ".join(bad)
                     + " (pass check_finite=False to skip this check)")
