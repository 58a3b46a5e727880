"""UPerNet-like feature regressor: backbone pyramid C2..C5 -> regressed teacher features R2..R5.

DESIGN.md section 2. A pyramid pooling module (PPM, pool scales 1, 2, 3, 6) on the coarsest map, then an
FPN top-down path: lateral 1x1 convs, bilinear upsampling of the coarser level added to the finer lateral,
3x3 output convs. Every conv is followed by BatchNorm + ReLU and has width ``width``. At the end of each
level a 1x1 conv (with bias, no norm, no activation: the targets are whitened features of any sign) maps
``width`` channels to the teacher's channel count of that level.

The only resampling is the FPN's internal upsampling of the top-down path (and of the PPM's pooled maps to
the C5 size). Output maps have exactly the spatial size of the backbone maps they come from, so a size
mismatch with the teacher is a configuration error, reported by ``check_feature_shapes``.

The PPM's scale-1 branch applies BatchNorm to a 1x1 map: in training mode this needs a per-process batch
of at least 2 (PyTorch raises otherwise), as in mmseg's UPerHead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvBNReLU", "PyramidPooling", "UPerRegressor"]


class ConvBNReLU(nn.Sequential):
    """``kernel_size`` conv (no bias) -> BatchNorm2d -> ReLU, 'same' padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class PyramidPooling(nn.Module):
    """PSPNet pyramid pooling on one map (B, C_in, H, W) -> (B, width, H, W).

    For each scale s: adaptive average pool to s x s, 1x1 ConvBNReLU to ``width``, bilinear upsample back to
    (H, W). The input and the upsampled branches are concatenated and fused by a 3x3 ConvBNReLU.
    """

    def __init__(self, in_channels: int, width: int, pool_scales: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.pool_scales = tuple(int(s) for s in pool_scales)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvBNReLU(in_channels, width, 1)) for scale in self.pool_scales
        )
        self.bottleneck = ConvBNReLU(in_channels + len(self.pool_scales) * width, width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(branch(x), size=size, mode="bilinear", align_corners=False) for branch in self.branches]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class UPerRegressor(nn.Module):
    """Regress the teacher's multi-scale features from the backbone's pyramid.

    Args:
        in_channels: channels of the backbone maps C2..C5 (ascending stride).
        out_channels: the teacher's channels at the same levels.
        width: FPN / PPM width (256 in the paper).
        pool_scales: PPM pool scales.

    ``forward(features)``: list of L maps (B, in_channels[l], H_l, W_l) -> list of L maps
    (B, out_channels[l], H_l, W_l), same order, same spatial sizes.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: Sequence[int],
        width: int = 256,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
    ) -> None:
        super().__init__()
        in_channels, out_channels = [int(c) for c in in_channels], [int(c) for c in out_channels]
        if len(in_channels) != len(out_channels) or not in_channels:
            raise ValueError(
                f"regressor: {len(in_channels)} backbone levels {in_channels} but {len(out_channels)} teacher "
                f"levels {out_channels}; they must be equal and non-empty"
            )
        if width < 1:
            raise ValueError(f"regressor: width must be >= 1, got {width}")
        self.in_channels, self.out_channels, self.width = tuple(in_channels), tuple(out_channels), int(width)
        self.ppm = PyramidPooling(in_channels[-1], width, pool_scales)
        # Laterals and 3x3 output convs for all but the coarsest level; the coarsest level's map is the PPM
        # output (itself a 3x3 ConvBNReLU), as in UPerNet.
        self.lateral_convs = nn.ModuleList(ConvBNReLU(c, width, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvBNReLU(width, width, 3) for _ in in_channels[:-1])
        self.heads = nn.ModuleList(nn.Conv2d(width, c, 1) for c in out_channels)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != len(self.in_channels):
            raise ValueError(f"regressor: expected {len(self.in_channels)} feature maps, got {len(features)}")
        for level, (feature, channels) in enumerate(zip(features, self.in_channels)):
            if feature.dim() != 4 or feature.shape[1] != channels:
                raise ValueError(
                    f"regressor: level {level} expects (B, {channels}, H, W), got {tuple(feature.shape)}"
                )
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features[:-1])]
        laterals.append(self.ppm(features[-1]))
        for level in range(len(laterals) - 1, 0, -1):  # top-down: coarse -> fine
            finer = laterals[level - 1]
            laterals[level - 1] = finer + F.interpolate(
                laterals[level], size=finer.shape[-2:], mode="bilinear", align_corners=False
            )
        outputs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])]
        outputs.append(laterals[-1])
        return [head(x) for head, x in zip(self.heads, outputs)]
