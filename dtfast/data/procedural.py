"""A deterministic, procedurally generated, class-conditional image set (no download).

Each class is a combination of three factors of one foreground object:
- shape (5): disk, square, triangle, ring, cross;
- texture frequency (2): low (0.5-1.0 cycles per object radius) or high (2.0-3.0) sinusoidal stripes;
- colour layout (2, used only beyond 10 classes): the stripes alternate between two colours of contrasting
  hue, or between two shades of one hue (below 11 classes the layout is drawn at random: a nuisance).
Class k is (shape k % 5, texture (k // 5) % 2, layout (k // 10) % 2), so 1..20 classes are available.

Nuisances, drawn per image: position (centre in the middle 40 % of the side), scale (radius 26-42 % of the side),
rotation, stripe orientation and phase, colours, a background colour gradient, background clutter (0-2 lines and
blobs, plus 0-1 drawn over the object) and Gaussian noise. Large objects can touch or cross the border.
Calibration (2026-11-27, 32x32, 4000 train / 2000 val images, 10 classes; recipes/RESULTS.md): a linear probe on
a random-init ResNet-18 gets 10-11 % (chance) from its pooled last stage and ~32 % from its pooled C2..C5, while
the same ResNet-18 trained with labels for 400 steps of 64 reaches ~61 %: far from perfect at random init,
learnable in minutes. (The nuisance ranges are class attributes, so a harder variant is a subclass away; the
first version, with more clutter and noise and smaller objects, left even the supervised ResNet near chance
within the recipe's CPU budget.)

Item i of split s with seed k is a pure function of (k, s, i): images are generated on the fly in any worker.
"""

from __future__ import annotations

import colorsys

import numpy as np
import torch
from torch.utils.data import Dataset

from .transforms import image_hw, sample_rng

__all__ = ["SHAPES", "ProceduralImages", "class_factors"]

SHAPES = ("disk", "square", "triangle", "ring", "cross")
_SPLITS = {"train": 1, "val": 2}
_MAX_CLASSES = len(SHAPES) * 2 * 2


def class_factors(label: int) -> tuple[str, str, str]:
    """(shape, texture, colour layout) of a class index."""
    return (SHAPES[label % 5], ("low", "high")[(label // 5) % 2], ("contrast", "shade")[(label // 10) % 2])


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-mask of a unit-size shape in object coordinates (u, v)."""
    if shape == "disk":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    if shape == "triangle":  # equilateral, circumradius 1
        inside = np.ones_like(u, dtype=bool)
        for angle in (-np.pi / 2, np.pi / 6, 5 * np.pi / 6):
            inside &= u * np.cos(angle) + v * np.sin(angle) <= 0.5
        return inside
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.45)
    if shape == "cross":
        return ((np.abs(u) <= 0.32) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.32) & (np.abs(u) <= 1.0))
    raise ValueError(f"unknown shape {shape!r}")


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


class ProceduralImages(Dataset):
    """Procedural classification images. Items: (uint8 tensor (3, H, W), int label).

    Args:
        num_images: number of items.
        image_size: side S in pixels (>= 16), or (H, W) (each >= 16): the centre (H, W) of the image drawn at
            S = max(H, W); kept as the (H, W) tuple.
        num_classes: 1..20 (default 10: shape x texture).
        seed: base seed; the "train" and "val" splits use disjoint random streams of it.
        split: "train" (random horizontal flip per epoch, see ``set_epoch``) or "val" (no augmentation).
    Labels are balanced: label = index % num_classes.
    """

    def __init__(self, num_images: int = 2048, image_size: int = 64, num_classes: int = 10, seed: int = 0,
                 split: str = "train") -> None:
        if split not in _SPLITS:
            raise ValueError(f"ProceduralImages: split must be one of {sorted(_SPLITS)}, got {split!r}")
        if not 1 <= num_classes <= _MAX_CLASSES:
            raise ValueError(f"ProceduralImages: num_classes must be in 1..{_MAX_CLASSES}, got {num_classes}")
        hw = image_hw(image_size)
        if num_images < 1 or min(hw) < 16:
            raise ValueError(f"ProceduralImages: need num_images >= 1 and image_size >= 16, got "
                             f"{num_images} and {image_size}")
        self.num_images, self.image_size, self.num_classes = int(num_images), hw, int(num_classes)
        self.seed, self.split, self.train = int(seed), split, split == "train"
        self.classes = [f"{i:02d}_" + "_".join(class_factors(i)) for i in range(self.num_classes)]
        self.epoch = 0

    # nuisance ranges (class attributes so that a harder or easier variant is a subclass away)
    CLUTTER = (0, 3)  # background lines/blobs drawn before the object: integers in [lo, hi)
    OCCLUDERS = (0, 2)  # lines/blobs drawn over it
    RADIUS = (0.26, 0.42)  # object radius, fraction of the side
    CENTRE = (0.3, 0.7)  # object centre, fraction of the side (large objects may touch or cross the border)
    NOISE = (0.01, 0.04)  # std of the additive Gaussian noise

    def set_epoch(self, epoch: int) -> None:
        """The epoch decides the flips of the train split (the images themselves never change)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_images

    def label(self, index: int) -> int:
        return index % self.num_classes

    def render(self, index: int) -> np.ndarray:
        """The image of item ``index`` as float32 (H, W, 3) in [0, 1], before augmentation."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"ProceduralImages: index {index} out of range 0..{self.num_images - 1}")
        rng = sample_rng(self.seed, 0, index, salt=_SPLITS[self.split])
        label = self.label(index)
        shape, texture, layout = class_factors(label)
        if self.num_classes <= 10:
            layout = ("contrast", "shade")[int(rng.integers(0, 2))]
        # a non-square (H, W) is the centre of the square drawing of side max(H, W): only its pixels are computed
        height, width = self.image_size
        size = max(height, width)
        top, left = (size - height) // 2, (size - width) // 2
        coords = (np.arange(size, dtype=np.float32) + 0.5) / size
        yy, xx = np.meshgrid(coords[top:top + height], coords[left:left + width], indexing="ij")

        # background: a linear gradient between two random colours
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5) + 0.5)[..., None]
        bg0, bg1 = _hsv(rng.random(), rng.uniform(0.1, 0.7), rng.uniform(0.2, 0.9)), _hsv(
            rng.random(), rng.uniform(0.1, 0.7), rng.uniform(0.2, 0.9))
        image = bg0 * (1 - ramp) + bg1 * ramp
        self._clutter(rng, image, xx, yy, count=int(rng.integers(*self.CLUTTER)))

        # the object: shape mask filled with stripes of the class's frequency band
        radius = rng.uniform(*self.RADIUS)
        cx, cy = rng.uniform(*self.CENTRE), rng.uniform(*self.CENTRE)
        rot = rng.uniform(0, 2 * np.pi)
        du, dv = (xx - cx) / radius, (yy - cy) / radius
        u = np.cos(rot) * du + np.sin(rot) * dv
        v = -np.sin(rot) * du + np.cos(rot) * dv
        mask = _shape_mask(shape, u, v)
        freq = rng.uniform(0.5, 1.0) if texture == "low" else rng.uniform(2.0, 3.0)
        phi = rng.uniform(0, np.pi)
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (np.cos(phi) * u + np.sin(phi) * v) + rng.uniform(0, 6.3))
        hue = rng.random()
        if layout == "contrast":
            fg0, fg1 = _hsv(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)), _hsv(
                hue + rng.uniform(0.35, 0.65), rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
        else:
            fg0, fg1 = _hsv(hue, rng.uniform(0.5, 1.0), rng.uniform(0.75, 1.0)), _hsv(
                hue, rng.uniform(0.5, 1.0), rng.uniform(0.1, 0.35))
        fill = fg0 * stripes[..., None] + fg1 * (1 - stripes[..., None])
        image = np.where(mask[..., None], fill, image)

        self._clutter(rng, image, xx, yy, count=int(rng.integers(*self.OCCLUDERS)))  # occluders
        noise = rng.normal(0.0, rng.uniform(*self.NOISE), size=(size, size, 3))  # the square's draws
        image += noise[top:top + height, left:left + width].astype(np.float32)
        return np.clip(image, 0.0, 1.0)

    @staticmethod
    def _clutter(rng: np.random.Generator, image: np.ndarray, xx: np.ndarray, yy: np.ndarray, count: int) -> None:
        """Draw ``count`` semi-transparent lines and small blobs into ``image`` in place."""
        for _ in range(count):
            colour = _hsv(rng.random(), rng.uniform(0.0, 1.0), rng.uniform(0.1, 1.0))
            alpha = rng.uniform(0.4, 0.9)
            if rng.random() < 0.5:  # a line of random width
                p0, p1 = rng.uniform(0, 1, 2), rng.uniform(0, 1, 2)
                d = p1 - p0
                t = np.clip(((xx - p0[0]) * d[0] + (yy - p0[1]) * d[1]) / max(float(d @ d), 1e-6), 0, 1)
                dist = np.hypot(xx - (p0[0] + t * d[0]), yy - (p0[1] + t * d[1]))
                mask = dist <= rng.uniform(0.005, 0.02)
            else:  # an ellipse blob
                c = rng.uniform(0, 1, 2)
                ax = rng.uniform(0.02, 0.09, 2)
                mask = ((xx - c[0]) / ax[0]) ** 2 + ((yy - c[1]) / ax[1]) ** 2 <= 1.0
            image[mask] = (1 - alpha) * image[mask] + alpha * colour

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.render(int(index))
        if self.train and sample_rng(self.seed, self.epoch, int(index), salt=7).random() < 0.5:
            image = image[:, ::-1]
        pixels = np.ascontiguousarray((image * 255.0 + 0.5).astype(np.uint8).transpose(2, 0, 1))
        return torch.from_numpy(pixels), self.label(int(index))
