"""Frozen diffusion teachers: `build_teacher(...)(images in [-1, 1]) -> feature maps, ascending stride`.

- `DiffusionTeacher`: pixel-space diffusers `UNet2DModel` (ADM-like), stochastic encoding at one timestep.
- `LatentDiffusionTeacher`: Stable-Diffusion layout (VAE encoder + UNet2DConditionModel, empty-prompt embedding).
- Named random architectures: `adm256`, `tiny`; latent `sd15`, `tiny-sd` (see `dtfast.teachers.archs`).
- Early exit: the UNet stops after the last decoder level that gives a requested feature.
"""

from .archs import LATENT_ARCHS, PIXEL_ARCHS
from .base import FrozenDiffusionTeacher, TeacherOptions
from .build import build_teacher
from .latent import LatentDiffusionTeacher
from .pixel import DiffusionTeacher

__all__ = [
    "LATENT_ARCHS",
    "PIXEL_ARCHS",
    "DiffusionTeacher",
    "FrozenDiffusionTeacher",
    "LatentDiffusionTeacher",
    "TeacherOptions",
    "build_teacher",
]
