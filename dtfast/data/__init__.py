"""Input data: the embedded procedural set, ImageNet-layout folders, sharded resumable loaders, model views.

- ``build_dataset(root, image_size, ...)``: root None/"" -> ``ProceduralImages``; else ``ImageFolder``.
- ``build_loader(dataset, batch_size, rank, world_size, seed, num_workers, drop_last, start_step)``: one epoch of
  ``(uint8 images (B, 3, H, W), int64 labels)`` from global step ``start_step``.
- ``to_views(images, mean, std)``: (teacher view in [-1, 1], student view normalised), on the batch's device.
- ``build_input_pipeline(...)``: endless ``(teacher_images, student_images, labels)`` on the device, decoded by
  ``data.backend`` = torch (PIL workers) | dali (NVIDIA DALI, GPU or CPU) | nvjpeg (torchvision GPU decode).
- DataLoader worker processes start from a fork server (never ``fork()`` of the multi-threaded trainer), persist
  across epochs and exit with the process that started them (``workers.py``); scripts that build loaders with
  workers need ``if __name__ == "__main__":``.
"""

from __future__ import annotations

from .folder import IMAGE_EXTENSIONS, DecodeError, ImageFolder
from .loader import EpochLoader, ResumableDistributedSampler, build_loader, steps_per_epoch
from .pipeline import BACKENDS, InputPipeline, build_input_pipeline, resolve_backend
from .procedural import ProceduralImages
from .transforms import to_views

__all__ = [
    "BACKENDS", "IMAGE_EXTENSIONS", "DecodeError", "EpochLoader", "ImageFolder", "InputPipeline", "ProceduralImages",
    "ResumableDistributedSampler", "build_dataset", "build_input_pipeline", "build_loader", "resolve_backend",
    "steps_per_epoch", "to_views",
]


def build_dataset(root: str | None, image_size: int | tuple[int, int], *, split: str = "train", num_images: int = 2048,
                  num_classes: int = 10, seed: int = 0, strict: bool = False, random_resized_crop: bool = False):
    """The training (or validation) data set.

    Args:
        root: None or "" for the embedded ``ProceduralImages``; else an ImageNet-layout folder
            ``root/<class>/<image>`` (``root/<split>`` is used when it exists).
        image_size: output size: S (square) or (H, W).
        split: "train" (random crops/flips) or "val" (centre crops).
        num_images, num_classes: size of the procedural set (ignored for folders).
        seed: procedural content seed / per-sample augmentation seed.
        strict: folders only: fail on the first undecodable file (default: skip with a counted warning).
        random_resized_crop: folders only: torchvision-style random-resized crops in the train split.
    """
    if not root:
        return ProceduralImages(num_images=num_images, image_size=image_size, num_classes=num_classes, seed=seed,
                                split=split)
    return ImageFolder(root, image_size, split=split, seed=seed, strict=strict,
                       random_resized_crop=random_resized_crop)
