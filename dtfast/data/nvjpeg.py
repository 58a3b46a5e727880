"""nvJPEG backend: worker processes read the files' bytes, the GPU decodes them in batches
(``torchvision.io.decode_jpeg(device="cuda")``) and resizes/crops/flips them on the device.

For machines where DALI is not installed (its wheel is large). Same batch contract, order, sharding, resume
and crops as the torch backend (``plan_resize_crop`` with the per-sample generator; resizing is bilinear
with antialiasing in ``torch.nn.functional.interpolate``, so pixels match the PIL path to resampling
rounding). Where resizing the whole image would take more than ``FULL_RESIZE_MAX_AREA`` times the crop's pixels
(a 1x3000 strip would become 256x768000 for a 256 crop), only the crop's window is resized, by PIL's own
bilinear weights applied as two float64 matrix products (``resize_window``).

Non-JPEG files are decoded on the CPU (``decode_image``) and moved to the device. A batch that fails to decode
is decoded file by file; an undecodable file is replaced by the next decodable file of the data set with a
counted warning, or raises ``DecodeError`` naming it with ``strict=True``.

``device="cpu"`` runs the same code with the CPU decoder (tests, machines without a GPU).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .folder import DecodeError, ImageFolder, to_rgb
from .loader import ResumableDistributedSampler, steps_per_epoch
from .transforms import Crop, bilinear_window_weights, image_hw, plan_resize_crop, sample_rng, source_window
from .workers import loader_options, shutdown_workers

__all__ = ["FULL_RESIZE_MAX_AREA", "NvjpegLoader", "resize_window"]

_JPEG_MAGIC = (0xFF, 0xD8)
# the plain recipe resizes the whole image (one interpolate kernel) while that takes at most this many times the
# crop's pixels (photos: 1-2x); beyond it (strips, panoramas) only the crop's window is resized
FULL_RESIZE_MAX_AREA = 4


def resize_window(image: torch.Tensor, crop: Crop, size: int | tuple[int, int]) -> torch.Tensor:
    """The window ``crop`` (source pixels, fractional) of a (C, H, W) image resized to ``size`` (S or (H, W)) as
    PIL's ``resize(BILINEAR, box=...)`` does (without its 8-bit intermediate rounding): float64 (C, out_h, out_w),
    not flipped. Reads only the source rows and columns the window's filters touch; the weights are built on the
    host (``bilinear_window_weights``) and applied on the image's device."""
    out_h, out_w = image_hw(size)
    height, width = image.shape[-2:]
    rows, top = bilinear_window_weights(height, crop.top, crop.height, out_h)
    cols, left = bilinear_window_weights(width, crop.left, crop.width, out_w)
    x = image[:, top:top + rows.shape[1], left:left + cols.shape[1]].to(torch.float64)
    rows_t = torch.from_numpy(rows).to(image.device)
    cols_t = torch.from_numpy(cols).to(image.device)
    return rows_t @ x @ cols_t.T


class _EncodedFiles(Dataset):
    """Worker side: (file bytes as a uint8 tensor, label, index)."""

    def __init__(self, dataset: ImageFolder) -> None:
        self.files, self.labels = dataset.files, dataset.labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        return read_bytes(self.files[index]), self.labels[index], index


def read_bytes(path: str) -> torch.Tensor:
    """A file's bytes as a uint8 tensor; empty when it cannot be read (gone since the scan, no permission, an I/O
    error): the decoder then treats it as undecodable (skipped with a counted warning, or named under strict)."""
    try:
        with open(path, "rb") as handle:
            return torch.frombuffer(bytearray(handle.read()), dtype=torch.uint8)
    except OSError:
        return torch.empty(0, dtype=torch.uint8)


def _collate(items):
    return [item[0] for item in items], torch.tensor([item[1] for item in items], dtype=torch.int64), [
        item[2] for item in items]


@contextlib.contextmanager
def _quiet_torchvision_io():
    """torchvision 0.29 deprecates its image codecs in favour of TorchCodec; they are what this backend is for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities",
                                category=DeprecationWarning)
        yield


def _is_jpeg(data: torch.Tensor) -> bool:
    return data.numel() > 2 and int(data[0]) == _JPEG_MAGIC[0] and int(data[1]) == _JPEG_MAGIC[1]


class NvjpegLoader:
    """The batches of one epoch from global step ``start_step``: ``(uint8 (B, 3, H, W), int64 (B,))`` on
    ``device``. Arguments as ``build_loader``; ``num_workers`` processes read files (no decoding), started as
    ``EpochLoader``'s (fork server, persistent: ``restart``/``start``/``close`` as there)."""

    def __init__(self, dataset: ImageFolder, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 start_step: int = 0, device: str | torch.device = "cuda", num_workers: int = 2,
                 shuffle: bool = True, start_method: str | None = None) -> None:
        if not isinstance(dataset, ImageFolder):
            raise TypeError("data.backend=nvjpeg decodes image files: set data.root to an image folder "
                            f"(got a {type(dataset).__name__})")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("data.backend=nvjpeg needs a CUDA device (use data.backend=torch on this machine)")
        self.dataset, self.batch_size = dataset, int(batch_size)
        self.steps_per_epoch = steps_per_epoch(len(dataset), batch_size, world_size, drop_last=True)
        if self.steps_per_epoch == 0:
            raise ValueError(f"loader: {len(dataset)} images cannot fill one batch of {batch_size} on each of "
                             f"{world_size} rank(s); use a smaller batch or more images")
        self.first_step = int(start_step)
        self.epoch, offset = divmod(self.first_step, self.steps_per_epoch)
        self.sampler = ResumableDistributedSampler(dataset, world_size, rank, shuffle=shuffle, seed=seed,
                                                   drop_last=True, start_index=offset * batch_size)
        self.sampler.set_epoch(self.epoch)
        self.skipped_files: list[str] = []
        workers = loader_options(num_workers, start_method)  # fork server, persistent, parent watch
        self.loader = DataLoader(_EncodedFiles(dataset), batch_size=batch_size, sampler=self.sampler,
                                 num_workers=num_workers, collate_fn=_collate, drop_last=True,
                                 generator=torch.Generator().manual_seed(seed + self.epoch), **workers)
        self._started: Iterator | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def start(self) -> None:
        """Start the file-reading worker processes now, on the calling thread."""
        if self._started is None:
            self._started = iter(self.loader)

    def restart(self, start_step: int) -> None:
        """Move to the epoch containing global step ``start_step`` with the same worker processes."""
        if start_step < 0:
            raise ValueError(f"loader: bad start_step={start_step}")
        self.first_step = int(start_step)
        self.epoch, offset = divmod(self.first_step, self.steps_per_epoch)
        self.sampler.restart(self.epoch, offset * self.batch_size)
        self.skipped_files = []
        self._started = None

    def close(self) -> None:
        """Stop the worker processes (idempotent)."""
        self._started = None
        shutdown_workers(self.loader)

    # ------------------------------------------------------------------ decoding
    def _decode_one(self, data: torch.Tensor, path: str) -> torch.Tensor:
        """One file: the device decoder, then torchvision's CPU decoder, then PIL (CMYK and other JPEGs that
        nvJPEG rejects are valid images); raises only when all fail."""
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg

        errors = []
        with _quiet_torchvision_io():
            if _is_jpeg(data) and self.device.type == "cuda":
                try:
                    return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
                except (RuntimeError, ValueError) as err:
                    errors.append(f"nvJPEG: {err}")
            try:
                pixels = decode_image(data, mode=ImageReadMode.RGB)
                if pixels.dim() == 4:  # an animated GIF: its first frame, as PIL gives it
                    pixels = pixels[0]
                if pixels.dim() != 3 or pixels.shape[0] != 3:
                    raise ValueError(f"decoded to shape {tuple(pixels.shape)}, not (3, H, W)")
                if pixels.dtype == torch.uint16:  # a 16-bit PNG: 8 bits as the other backends give them
                    pixels = (pixels.float() / 257.0).round_().to(torch.uint8)
                return pixels.to(self.device, non_blocking=True)
            except (RuntimeError, ValueError) as err:
                errors.append(f"torchvision: {err}")
        from PIL import Image

        try:
            with Image.open(path) as image:
                pixels = torch.from_numpy(np.asarray(to_rgb(image)).copy()).permute(2, 0, 1).contiguous()
            return pixels.to(self.device, non_blocking=True)
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
            errors.append(f"PIL: {type(err).__name__}: {err}")
            raise DecodeError("; ".join(errors)) from err

    def _decode_batch(self, datas: list[torch.Tensor], indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """Decoded (3, H, W) uint8 images on the device with the data-set index each came from."""
        from torchvision.io import ImageReadMode, decode_jpeg

        jpeg_positions = [i for i, data in enumerate(datas) if _is_jpeg(data)]
        decoded: list[torch.Tensor | None] = [None] * len(datas)
        try:
            if jpeg_positions:
                with _quiet_torchvision_io():
                    images = decode_jpeg([datas[i] for i in jpeg_positions], mode=ImageReadMode.RGB,
                                         device=self.device)
                for position, image in zip(jpeg_positions, images):
                    decoded[position] = image
        except (RuntimeError, ValueError):
            pass  # one bad file fails the batched call: decode one by one below to find it
        result = []
        for position, (data, index) in enumerate(zip(datas, indices)):
            image = decoded[position]
            if image is None:
                image, index = self._decode_or_replace(data, index)
            result.append((image, index))
        return result

    def _decode_or_replace(self, data: torch.Tensor, index: int) -> tuple[torch.Tensor, int]:
        files = self.dataset.files
        for attempt in range(16):
            current = (index + attempt) % len(files)
            if attempt:
                data = read_bytes(files[current])
            try:
                return self._decode_one(data, files[current]), current
            except DecodeError as err:
                if self.dataset.strict:
                    raise DecodeError(f"data: cannot decode {files[current]!r}: {err} "
                                      "(data.strict=true; set it false to skip such files)") from err
                self.skipped_files.append(files[current])
                warnings.warn(f"data: replaced undecodable file {files[current]!r} with the next decodable one "
                              f"({len(self.skipped_files)} this epoch on this rank)", stacklevel=4)
        raise DecodeError(f"data: 16 undecodable files in a row from {files[index]!r}")

    def _crop(self, image: torch.Tensor, index: int) -> torch.Tensor:
        data, size = self.dataset, self.dataset.image_size  # (H, W)
        rng = sample_rng(data.seed, self.epoch, index) if data.train else None
        height, width = image.shape[-2:]
        plan = plan_resize_crop(rng, height, width, size, data.train, data.random_resized_crop)
        whole = plan.resized_height * plan.resized_width
        if not plan.random_resized and whole > FULL_RESIZE_MAX_AREA * size[0] * size[1]:
            x = resize_window(image, source_window(plan, height, width), size).unsqueeze(0)
        elif plan.random_resized:
            x = image.unsqueeze(0)[..., plan.top:plan.top + plan.height, plan.left:plan.left + plan.width].float()
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        else:
            x = image.unsqueeze(0).float()
            if (plan.resized_height, plan.resized_width) != (height, width):
                x = F.interpolate(x, size=(plan.resized_height, plan.resized_width), mode="bilinear",
                                  antialias=True, align_corners=False)
            x = x[..., plan.top:plan.top + plan.height, plan.left:plan.left + plan.width]
        if plan.flip:
            x = x.flip(-1)
        return x.round_().clamp_(0, 255).to(torch.uint8)[0]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        labels_of = self.dataset.labels
        batches = self._started if self._started is not None else iter(self.loader)
        self._started = None
        for datas, labels, indices in batches:
            decoded = self._decode_batch(datas, indices)
            images = torch.stack([self._crop(image, index) for image, index in decoded])
            if any(index != original for (_, index), original in zip(decoded, indices)):
                labels = torch.tensor([labels_of[index] for _, index in decoded], dtype=torch.int64)
            yield images, labels.to(self.device, non_blocking=True)
