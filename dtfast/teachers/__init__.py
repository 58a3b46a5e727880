"""Frozen diffusion teachers: `build_teacher(...)(images in [-1, 1]) -> feature maps, ascending stride`.

- `DiffusionTeacher`: pixel-space diffusers `UNet2DModel` (ADM-like), stochastic encoding at one timestep.
- Named random architectures: `adm256`, `tiny` (see `dtfast.teachers.archs`).
- Early exit: the UNet stops after the last decoder level that gives a requested feature.
"""

from .archs import LATENT_ARCHS, PIXEL_ARCHS
from .base import FrozenDiffusionTeacher, TeacherOptions
from .build import build_teacher
from .pixel import DiffusionTeacher

__all__ = [
    "LATENT_ARCHS",
    "PIXEL_ARCHS",
    "DiffusionTeacher",
    "FrozenDiffusionTeacher",
    "TeacherOptions",
    "build_teacher",
]
