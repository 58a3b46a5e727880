"""Crop/flip geometry shared by every backend, and the on-device teacher/student views.

The recipe (DESIGN.md sections 1 and 5): resize the shorter side to the training size, crop a square of that size
(random for training, centred for validation: section 1's "center/random crops") and flip horizontally with
probability 1/2; section 5's "horizontal flip only" rules out other augmentation (colour, blur, ...). Optionally
random-resized crops (torchvision's parameters: scale (0.08, 1), ratio (3/4, 4/3)).

A non-square output (H, W) (BDD100K's 128x256) generalises "resize the shorter side": the image is resized,
keeping its aspect ratio, to the smallest size that covers (H, W), then cropped to (H, W). A square S is (S, S).

All randomness is drawn from a per-sample generator seeded by (seed, epoch, index): the same sample in the
same epoch gets the same crop on every backend, in every worker, after a restart.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Crop", "bilinear_window_weights", "image_hw", "parse_size_text", "plan_crop", "resized_cover_size",
           "sample_rng", "size_text", "source_window", "to_views"]


def sample_rng(seed: int, epoch: int, index: int, salt: int = 0) -> np.random.Generator:
    """A generator that depends only on (seed, epoch, index, salt)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index, salt])))


def image_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) of an output size given as S (a square) or (H, W); both > 0."""
    if isinstance(size, (int, np.integer)):
        height = width = int(size)
    else:
        if len(size) != 2:
            raise ValueError(f"image size must be S or (H, W), got {size!r}")
        height, width = (int(s) for s in size)
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {size!r}")
    return height, width


def size_text(size: int | Sequence[int]) -> str:
    """"S" for a square size, "HxW" otherwise (file metadata, messages)."""
    height, width = image_hw(size)
    return str(height) if height == width else f"{height}x{width}"


def parse_size_text(text: str | int) -> tuple[int, int]:
    """(H, W) of a ``size_text`` ("S" or "HxW", or an int); ValueError names the text otherwise."""
    height, sep, width = str(text).strip().partition("x")
    if not height.isdigit() or (sep and not width.isdigit()):
        raise ValueError(f"image size {text!r}: expected S or HxW")
    return image_hw((int(height), int(width or height)))


def resized_cover_size(height: int, width: int, size: int | Sequence[int]) -> tuple[int, int]:
    """(H', W') of a (height, width) image resized, keeping its aspect ratio, to the smallest size that covers the
    output ``size`` (S or (H, W)); for a square S: the shorter side becomes S. The other side is rounded half up, as
    DALI's ``resize_shorter`` does (the side that fits exactly comes out exact: h * out_w / w <= out_h there)."""
    out_h, out_w = image_hw(size)
    return (max(out_h, math.floor(height * out_w / width + 0.5)),
            max(out_w, math.floor(width * out_h / height + 0.5)))


@dataclass(frozen=True)
class ResizeCrop:
    """Integer plan for backends that resize first: resize to (resized_height, resized_width) (plain recipe) or
    take the source window (top, left, height, width) (random-resized crops), then crop / resize to the output
    size and flip."""

    resized_height: int
    resized_width: int
    top: int
    left: int
    height: int
    width: int
    flip: bool
    random_resized: bool


def plan_resize_crop(rng: np.random.Generator | None, src_height: int, src_width: int, size: int | Sequence[int],
                     train: bool, random_resized_crop: bool = False, flip: bool = True) -> ResizeCrop:
    """Draw the crop of one image for the output ``size`` (S or (H, W)). Draw order (shared with the DALI
    pipeline's per-sample inputs): plain recipe: pos_y, pos_x, flip; random-resized: torchvision's window draws
    (independent of the output's shape, as in torchvision), then flip."""
    augment = train and rng is not None
    if augment and random_resized_crop:
        top, left, height, width = _random_resized_window(rng, src_height, src_width)
        resized_h, resized_w = src_height, src_width
    else:
        height, width = image_hw(size)
        resized_h, resized_w = resized_cover_size(src_height, src_width, size)
        # relative positions in [0, 1], anchor = round(pos * (extent - size)): DALI's crop_pos_x/y convention
        pos_y, pos_x = (float(rng.random()), float(rng.random())) if augment else (0.5, 0.5)
        top = math.floor(pos_y * (resized_h - height) + 0.5)
        left = math.floor(pos_x * (resized_w - width) + 0.5)
    do_flip = bool(augment and flip and rng.random() < 0.5)
    return ResizeCrop(resized_h, resized_w, top, left, height, width, do_flip, bool(augment and random_resized_crop))


@dataclass(frozen=True)
class Crop:
    """Where to crop in the SOURCE image (pixels, possibly fractional) and whether to flip.

    The output is the window (top, left, height, width) of the source resized to (size, size), then flipped.
    For the plain recipe the window has the output's aspect ratio and spans the source's full height or full width,
    whichever limits it (for a square output: the shorter side, and resize-shorter-then-crop is the same map); for
    random-resized crops it is any window.
    """

    top: float
    left: float
    height: float
    width: float
    flip: bool


def plan_crop(
    rng: np.random.Generator | None,
    src_height: int,
    src_width: int,
    size: int | Sequence[int],
    train: bool,
    random_resized_crop: bool = False,
    flip: bool = True,
) -> Crop:
    """The window in SOURCE pixels of ``plan_resize_crop``'s plan (``rng=None`` or ``train=False``: centre).

    Plain recipe: the resized image's integer crop mapped back to the source, so resizing the window directly
    to the output size (S or (H, W)) gives the pixels of resize-then-crop.
    """
    return source_window(plan_resize_crop(rng, src_height, src_width, size, train, random_resized_crop, flip),
                         src_height, src_width)


def source_window(plan: ResizeCrop, src_height: int, src_width: int) -> Crop:
    """``plan`` as a window in the (src_height, src_width) source: a random-resized window as it is, the plain
    recipe's crop of the resized image mapped back to source pixels."""
    if plan.random_resized:
        return Crop(plan.top, plan.left, plan.height, plan.width, plan.flip)
    scale_y, scale_x = src_height / plan.resized_height, src_width / plan.resized_width
    return Crop(plan.top * scale_y, plan.left * scale_x, plan.height * scale_y, plan.width * scale_x, plan.flip)


def bilinear_window_weights(in_size: int, start: float, length: float, out_size: int) -> tuple[np.ndarray, int]:
    """PIL's bilinear resampling along one axis (``Image.resize(..., BILINEAR, box=...)``; Resample.c's
    ``precompute_coeffs``, antialiased: the triangle widens by the scale when shrinking): the source window
    [start, start + length) of an axis of ``in_size`` pixels resized to ``out_size``. Returns float64 weights
    (out_size, n) over the source pixels [first, first + n), rows summing to 1, and ``first``."""
    scale = length / out_size
    filter_scale = max(scale, 1.0)  # bilinear's support is 1 source pixel, widened when shrinking
    centre = start + (np.arange(out_size) + 0.5) * scale
    lo = np.clip(np.trunc(centre - filter_scale + 0.5), 0, in_size).astype(np.int64)  # C's (int) truncates
    hi = np.clip(np.trunc(centre + filter_scale + 0.5), 0, in_size).astype(np.int64)
    first, last = int(lo.min()), int(max(hi.max(), lo.min() + 1))
    j = np.arange(first, last)
    weights = np.clip(1.0 - np.abs((j[None, :] - centre[:, None] + 0.5) / filter_scale), 0.0, None)
    weights[(j[None, :] < lo[:, None]) | (j[None, :] >= hi[:, None])] = 0.0
    total = weights.sum(axis=1, keepdims=True)
    return np.divide(weights, total, out=np.zeros_like(weights), where=total != 0), first


def _random_resized_window(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawn from ``rng``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def to_views(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Derive both model inputs from one decoded uint8 batch, on the batch's device, in float32.

    Args:
        images: uint8 (B, 3, H, W), values 0..255 (any memory format; it is kept).
        mean, std: the student's normalisation (timm data config, in [0, 1] units).

    Returns:
        ``teacher_images = x / 127.5 - 1`` in [-1, 1] and ``student_images = (x / 255 - mean) / std``.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"to_views: expected a uint8 batch (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"to_views: mean and std need 3 values, got {tuple(mean)} and {tuple(std)}")
    x = images.float()
    teacher_images = x / 127.5 - 1.0
    mean_t = torch.tensor([m * 255.0 for m in mean], dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    inv_std = torch.tensor([1.0 / (s * 255.0) for s in std], dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    student_images = (x - mean_t) * inv_std
    return teacher_images, student_images
