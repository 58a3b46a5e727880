"""Image folders in the ImageNet layout, decoded with PIL.

Layout: ``root/<class>/<image>``; classes are the sorted sub-folder names, labels their positions. If
``root/<split>`` exists (``root/train``, ``root/val``) it is used for that split, so both an ImageNet root and
its ``train`` folder work. A folder with images directly in it and no class folders is one unlabelled set
(label -1). ``root`` may also be a file list (``path label`` per line, see ``scan_file_list``).

Start-up check (cheap: one directory walk, no file opened): a missing or empty root, or class folders with
no images, raise ``ValueError``/``FileNotFoundError`` naming them; files without an image extension and
empty files are skipped with one counted warning. Files that fail to decode are found while training: by
default each is replaced by the next decodable file of the data set (so every rank keeps the same number of
steps) and counted in a warning naming it; with ``strict=True`` the first one raises naming the file.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from torch.utils.data import Dataset

from .transforms import Crop, image_hw, plan_crop, sample_rng

__all__ = ["IMAGE_EXTENSIONS", "DecodeError", "ImageFolder", "resolve_split_root", "scan_file_list",
           "scan_image_folder"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
_MAX_CONSECUTIVE_BAD = 16


class DecodeError(RuntimeError):
    """An image file could not be decoded (``strict=True``, or too many bad files in a row)."""


SPLIT_NAMES = ("train", "val", "valid", "validation", "test")


def resolve_split_root(root: str, split: str | None) -> str:
    """``root/split`` when that folder is a split of the data set, else ``root`` (a folder or a file list); errors
    name a missing root.

    ``root/split`` is a split unless it is a class folder that happens to have the split's name: it holds images
    and no sub-folders while ``root`` has other folders that are not split names (PASCAL VOC and COCO have a class
    "train"; such a folder used to become the whole data set, unlabelled)."""
    if not root:
        raise ValueError("data root is empty")
    if os.path.isfile(root):
        return root
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data root {root!r} does not exist (expected an image folder or a file list)")
    candidate = os.path.join(root, split) if split else ""
    if not candidate or not os.path.isdir(candidate):
        return root
    others = [e.name for e in os.scandir(root)
              if e.is_dir() and not e.name.startswith(".") and e.name != split]
    inner = list(os.scandir(candidate))
    if (others and not all(name.lower() in SPLIT_NAMES for name in others)
            and not any(e.is_dir() and not e.name.startswith(".") for e in inner)
            and any(e.is_file() and _is_image(e.name) for e in inner)):
        return root  # root/<split> is a class folder among others (ImageNet layout without split folders)
    return candidate


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def scan_image_folder(root: str) -> tuple[list[str], list[str], list[int], list[str]]:
    """Walk ``root`` once: (classes, files, labels, skipped). Raises on an empty root or empty classes."""
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    class_dirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
    top_files = [e for e in entries if e.is_file() and not e.name.startswith(".")]
    files: list[str] = []
    labels: list[int] = []
    skipped: list[str] = []

    def collect(folder_entries, label: int) -> int:
        found = 0
        for entry in folder_entries:
            if entry.name.startswith("."):
                continue
            if not entry.is_file():
                if label >= 0 or entry.is_symlink():  # a folder inside a class (not read), a dangling link
                    skipped.append(entry.path + ("/" if entry.is_dir() else ""))
                continue
            if not _is_image(entry.name) or entry.stat().st_size == 0:
                skipped.append(entry.path)
                continue
            files.append(entry.path)
            labels.append(label)
            found += 1
        return found

    if not class_dirs:
        if not top_files:
            raise ValueError(f"data root {root!r} is empty: expected root/<class>/<image> (ImageNet layout)")
        if collect(top_files, -1) == 0:
            raise ValueError(f"data root {root!r} has no image files ({len(skipped)} non-image or empty files, "
                             f"e.g. {skipped[:3]}); extensions: {', '.join(IMAGE_EXTENSIONS)}")
        return [], files, labels, skipped

    classes = [d.name for d in class_dirs]
    empty = []
    for label, folder in enumerate(class_dirs):
        if collect(sorted(os.scandir(folder.path), key=lambda e: e.name), label) == 0:
            empty.append(folder.name)
    if empty:
        raise ValueError(f"data root {root!r}: {len(empty)} class folder(s) without image files: {empty[:10]}"
                         f"{' ...' if len(empty) > 10 else ''}; remove them or add images (labels are the "
                         f"positions of the sorted class folders, so they cannot be skipped silently)")
    skipped.extend(e.path for e in top_files)  # loose files next to class folders belong to no class
    return classes, files, labels, skipped


def scan_file_list(list_path: str) -> tuple[list[str], list[str], list[int], list[str]]:
    """A text file with one ``relative/or/absolute/path [integer label]`` per line (DALI's file_list format;
    relative paths are relative to the list's folder; no label = -1; blank lines and ``#`` comments are
    ignored): (classes=[], files, labels, skipped). Missing, non-image and empty files are skipped."""
    base = os.path.dirname(os.path.abspath(list_path))
    files: list[str] = []
    labels: list[int] = []
    skipped: list[str] = []
    with open(list_path) as handle:
        for number, line in enumerate(handle, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            path, _, label = line.rpartition(" ") if " " in line else (line, "", "-1")
            try:
                label_value = int(label)
            except ValueError:
                raise ValueError(f"file list {list_path!r} line {number}: expected 'path label', "
                                 f"got {line!r}") from None
            path = path.strip() if os.path.isabs(path.strip()) else os.path.join(base, path.strip())
            if not _is_image(path) or not os.path.isfile(path) or os.path.getsize(path) == 0:
                skipped.append(path)
                continue
            files.append(path)
            labels.append(label_value)
    if not files:
        raise ValueError(f"file list {list_path!r} names no existing image files ({len(skipped)} skipped, e.g. "
                         f"{skipped[:3]})")
    return [], files, labels, skipped


def to_rgb(image):
    """A PIL image as 8-bit RGB. 16-bit (and 32-bit integer) grey images are scaled to 8 bits (value / 257, as
    decoders of 16-bit PNGs do); PIL's own ``convert("RGB")`` clips them, which turns most of the image white."""
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def decode_crop(path: str, crop_fn, size: int | tuple[int, int]) -> np.ndarray:
    """Decode ``path`` with PIL (RGB), crop/resize/flip as ``crop_fn(height, width) -> Crop`` says.

    Returns uint8 (H, W, 3) for ``size`` S (H = W = S) or (H, W). Raises on any decoding problem (truncated,
    corrupt, not an image).
    """
    from PIL import Image

    with Image.open(path) as image:
        image = to_rgb(image)  # forces a full decode: truncation raises here
        crop: Crop = crop_fn(image.height, image.width)
        box = (crop.left, crop.top, crop.left + crop.width, crop.top + crop.height)
        out_h, out_w = image_hw(size)
        image = image.resize((out_w, out_h), Image.BILINEAR, box=box)
        if crop.flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(image, dtype=np.uint8)


class ImageFolder(Dataset):
    """Items: (uint8 tensor (3, H, W), int label), PIL decode and the recipe's crop/flip.

    Args:
        root: folder (see the module docstring for the layout and ``split``).
        image_size: S (square crops, H = W = S) or (H, W); kept as the (H, W) tuple.
        split: "train" (random crops + flips) or "val" (centre crops); also picks ``root/<split>`` if present.
        seed: seed of the per-sample crops/flips (with the epoch, see ``set_epoch``).
        strict: raise ``DecodeError`` on the first undecodable file instead of skipping it.
        random_resized_crop: torchvision-style random-resized crops (train split only).
        train: override the augmentation choice of ``split``.
    """

    def __init__(self, root: str, image_size: int | tuple[int, int], split: str = "train", seed: int = 0,
                 strict: bool = False, random_resized_crop: bool = False, train: bool | None = None) -> None:
        self.root = resolve_split_root(root, split)
        self.image_size, self.split, self.seed, self.strict = image_hw(image_size), split, int(seed), bool(strict)
        self.train = (split == "train") if train is None else bool(train)
        self.random_resized_crop = bool(random_resized_crop)
        scan = scan_file_list if os.path.isfile(self.root) else scan_image_folder
        self.classes, self.files, self.labels, skipped = scan(self.root)
        self.skipped_at_scan = skipped
        if skipped:
            warnings.warn(f"data: skipped {len(skipped)} missing, non-image or empty file(s), dangling link(s) or "
                          f"folder(s) inside a class folder (not read) in {self.root!r}, e.g. {skipped[:3]}",
                          stacklevel=2)
        self.epoch = 0
        self.bad_files: list[str] = []  # decode failures seen by THIS process (workers keep their own)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.files)

    def crop_for(self, index: int, height: int, width: int) -> Crop:
        rng = sample_rng(self.seed, self.epoch, index) if self.train else None
        return plan_crop(rng, height, width, self.image_size, self.train, self.random_resized_crop)

    def load(self, index: int) -> tuple[torch.Tensor, int, list[str]]:
        """(image, label, undecodable files skipped to produce it). Deterministic in (seed, epoch, index)."""
        skipped: list[str] = []
        for attempt in range(_MAX_CONSECUTIVE_BAD):
            current = (index + attempt) % len(self.files)
            path = self.files[current]
            try:
                pixels = decode_crop(path, lambda h, w, i=current: self.crop_for(i, h, w), self.image_size)
            except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
                if self.strict:
                    raise DecodeError(f"data: cannot decode {path!r}: {type(err).__name__}: {err} "
                                      f"(data.strict=true; set it false to skip such files)") from err
                skipped.append(path)
                self.bad_files.append(path)
                continue
            return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))), self.labels[current], skipped
        raise DecodeError(f"data: {_MAX_CONSECUTIVE_BAD} undecodable files in a row from {self.files[index]!r}: "
                          f"{skipped}; is {self.root!r} an image folder?")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label, skipped = self.load(int(index))
        if skipped:
            warnings.warn(f"data: skipped {len(skipped)} undecodable file(s) {skipped} "
                          f"({len(self.bad_files)} so far in this process)", stacklevel=2)
        return image, label
