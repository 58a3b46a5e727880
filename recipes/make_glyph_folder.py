"""Write a labelled image folder that the project's own generator never produced (for the recipe's unseen check).

    python recipes/make_glyph_folder.py OUT [--size 32] [--train 4000] [--val 2000] [--seed 0]

Layout ``OUT/{train,val}/<class>/<n>.png``; 10 classes, the digits 0-9 drawn with Pillow's built-in scalable
font. Nuisances per image: glyph size, rotation, shear, position, stroke width, colours, a smooth
multi-sinusoid colour background, 2-6 clutter discs and bars (some in front of the glyph), blur and noise.
Nothing here shares code or statistics with ``dtfast.data.ProceduralImages`` (shapes with stripe textures).
"""

from __future__ import annotations

import argparse
import colorsys
import os
import shutil
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

CLASSES = [str(d) for d in range(10)]


def _colour(rng: np.random.Generator, lightness: tuple[float, float]) -> tuple[int, int, int]:
    r, g, b = colorsys.hls_to_rgb(rng.random(), rng.uniform(*lightness), rng.uniform(0.3, 1.0))
    return int(255 * r), int(255 * g), int(255 * b)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    field = np.zeros((size, size, 3), np.float32)
    for _ in range(3):
        fx, fy, phase = rng.uniform(-3, 3), rng.uniform(-3, 3), rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)[..., None]
        field += wave * rng.uniform(-0.25, 0.25, 3)
    field += rng.uniform(0.2, 0.8, 3)
    return Image.fromarray((np.clip(field, 0, 1) * 255).astype(np.uint8))


def _clutter(rng: np.random.Generator, draw: ImageDraw.ImageDraw, size: int, count: int) -> None:
    for _ in range(count):
        colour = _colour(rng, (0.1, 0.9))
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(0.03, 0.12) * size
        if rng.random() < 0.5:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
        else:
            dx, dy = rng.uniform(-0.4, 0.4, 2) * size
            draw.line([x, y, x + dx, y + dy], fill=colour, width=max(1, int(rng.uniform(0.01, 0.04) * size)))


def render(label: int, rng: np.random.Generator, size: int) -> Image.Image:
    big = 4 * size  # draw at 4x, then downsample (anti-aliasing)
    image = _background(rng, big)
    draw = ImageDraw.Draw(image)
    _clutter(rng, draw, big, int(rng.integers(1, 4)))
    glyph = Image.new("L", (big, big), 0)
    font = ImageFont.load_default(size=int(rng.uniform(0.45, 0.8) * big))
    ImageDraw.Draw(glyph).text((big / 2, big / 2), CLASSES[label], fill=255, font=font, anchor="mm",
                               stroke_width=int(rng.integers(0, max(1, big // 40) + 1)), stroke_fill=255)
    shear = rng.uniform(-0.3, 0.3)
    glyph = glyph.transform((big, big), Image.AFFINE, (1, shear, -shear * big / 2, 0, 1, 0), Image.BILINEAR)
    glyph = glyph.rotate(rng.uniform(-30, 30), Image.BILINEAR,
                         translate=tuple(int(t) for t in rng.uniform(-0.18, 0.18, 2) * big))
    image.paste(Image.new("RGB", (big, big), _colour(rng, (0.05, 0.95))), (0, 0), glyph)
    _clutter(rng, ImageDraw.Draw(image), big, int(rng.integers(1, 4)))
    image = image.resize((size, size), Image.BOX).filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.6)))
    pixels = np.asarray(image, np.float32) + rng.normal(0, rng.uniform(2, 10), (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write(out: str, size: int = 32, num_train: int = 4000, num_val: int = 2000, seed: int = 0) -> None:
    for split, count, salt in (("train", num_train, 1), ("val", num_val, 2)):
        for name in CLASSES:
            os.makedirs(os.path.join(out, split, name), exist_ok=True)
        for index in range(count):
            label = index % len(CLASSES)
            rng = np.random.default_rng([seed, salt, index])
            render(label, rng, size).save(os.path.join(out, split, CLASSES[label], f"{index:06d}.png"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--val", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="empty OUT/train and OUT/val first (else a folder that "
                                                            "holds images is refused: old and new would mix)")
    a = p.parse_args(argv)
    splits = [os.path.join(a.out, split) for split in ("train", "val")]
    if any(os.path.isdir(s) and os.listdir(s) for s in splits):
        if not a.overwrite:
            print(f"make_glyph_folder.py: {a.out} already holds train/ or val/ images; pass --overwrite to replace "
                  "them, or another folder", file=sys.stderr)
            return 2
        for split in splits:
            shutil.rmtree(split, ignore_errors=True)
    write(a.out, a.size, a.train, a.val, a.seed)
    print(f"wrote {a.train} train and {a.val} val images of {len(CLASSES)} classes to {os.path.abspath(a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
