"""The pixel-space diffusion teacher: a frozen diffusers `UNet2DModel` read out at several decoder strides."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from .base import FrozenDiffusionTeacher, TeacherOptions, check_sdpa, sorted_strides
from .unet_walk import check_supported, feature_blocks, total_down_factor, up_block_channels, walk_unet


def noise_coefficients(scheduler, timestep: int) -> tuple[float, float]:
    """(sqrt(abar_t), sqrt(1 - abar_t)) of `scheduler` at `timestep`, as its `add_noise` computes them."""
    num_steps = int(scheduler.config.num_train_timesteps)
    if not 0 <= int(timestep) < num_steps:
        raise ValueError(f"teacher timestep must be in [0, {num_steps}), got {timestep}")
    alpha_bar = scheduler.alphas_cumprod[int(timestep)].to(torch.float32)
    return float(alpha_bar.sqrt()), float((1 - alpha_bar).sqrt())


class DiffusionTeacher(FrozenDiffusionTeacher):
    """Frozen pixel-space diffusion UNet as a DreamTeacher teacher.

    forward(x0 in [-1, 1]): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with fresh eps ~ N(0, I) (the scheduler's
    `add_noise`), then one UNet pass at timestep t, stopped after the last decoder level needed (early exit).
    The feature at stride s is the output of the last resnet/attention of the decoder level at stride s, before
    its upsampler. Features are returned in ascending stride order.

    Attributes: `unet`, `scheduler`, `timestep`, `strides`, `channels`, `is_random`, `options`.
    """

    def __init__(
        self,
        unet: nn.Module,
        scheduler,
        timestep: int = 150,
        strides: Sequence[int] = (4, 8, 16, 32),
        is_random: bool = False,
        options: TeacherOptions | None = None,
    ):
        super().__init__(options or TeacherOptions())
        check_supported(unet)
        check_sdpa(unet)
        self.unet = unet
        self.scheduler = scheduler
        self.timestep = int(timestep)
        self.strides = sorted_strides(strides)
        self.blocks = tuple(feature_blocks(unet, self.strides))
        all_channels = up_block_channels(unet)
        self.channels = tuple(all_channels[b] for b in self.blocks)
        self.is_random = bool(is_random)
        self.size_multiple = total_down_factor(unet)
        self.in_channels = int(unet.config.in_channels)
        self.noise_scale = noise_coefficients(scheduler, self.timestep)
        device = next(unet.parameters()).device
        self.register_buffer("timesteps", torch.tensor([self.timestep], dtype=torch.long, device=device), False)
        self._setup_runtime(device)

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    def _noise_shape(self, images: torch.Tensor) -> tuple[int, ...]:
        return tuple(images.shape)

    def _encode(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, ...]:
        signal_scale, noise_scale = self.noise_scale
        noisy = (signal_scale * images.float() + noise_scale * noise).to(self.unet.conv_in.weight.dtype)
        features, _ = walk_unet(self.unet, noisy, self.timesteps, self.blocks, early_exit=self.options.early_exit)
        return tuple(features)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write `unet/` and `scheduler/` into `folder` (loadable with build_teacher(pretrained=folder))."""
        self.unet.save_pretrained(os.path.join(folder, "unet"))
        self.scheduler.save_pretrained(os.path.join(folder, "scheduler"))

    def extra_repr(self) -> str:
        return (
            f"timestep={self.timestep}, strides={self.strides}, channels={self.channels}, blocks={self.blocks}, "
            f"random={self.is_random}, early_exit={self.options.early_exit}"
        )
