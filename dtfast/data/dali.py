"""NVIDIA DALI backend: read, decode (GPU "mixed" decoder or CPU), resize, crop and flip in a DALI pipeline.

One ``DaliLoader`` is one epoch from a start step, like ``EpochLoader``; batches are ``(uint8 images
(B, 3, S, S), int64 labels (B,))`` on the pipeline's device (the GPU for "mixed", else the CPU).

- Order and sharding: the epoch's order is the one ``DistributedSampler`` gives the torch backend (seed +
  epoch). Every rank lists all ranks' remaining shards (equal lengths) for ``fn.readers.file``, whose
  ``shard_id``/``num_shards`` (= rank/world size) then pick this rank's, in order, with no reader shuffling.
  Shards hold whole batches only (the tail is dropped, ``LastBatchPolicy.DROP``), so every rank takes the
  same number of steps, and a restart at step N reads exactly the samples step N would have read.
- Crops/flips (plain recipe): per-sample positions and flips come in through ``fn.external_source`` from the
  same per-sample generator as the torch backend, so both backends crop the same window of the same file.
  Random-resized crops use DALI's fused ``decoders.image_random_crop``, driven by DALI's own generator seeded
  per (seed, epoch, step at which the pipeline starts, rank): every rank crops its own windows, and the order is
  the same after a restart, but not the windows (nor the torch backend's).
- Bad files: the start-up scan is the folder scan (extensions, empty files). A file DALI cannot decode stops
  the pipeline; the loader then finds the undecodable file(s) of the failing batches with PIL, replaces each
  by the next decodable file (as the torch backend does), warns with a count and rebuilds the pipeline at the
  same step. ``strict=True`` raises ``DecodeError`` naming the file instead. Any number of such repairs per
  epoch; only repeated failures at one step give up. A file PIL decodes but DALI cannot (a GIF named .JPEG)
  is found by decoding the window's files one by one in DALI and read as a lossless PNG of PIL's decoding
  (the torch backend's pixels), with a warning.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Iterator

import numpy as np
import torch

from .folder import DecodeError, ImageFolder, to_rgb
from .loader import shard_indices, steps_per_epoch
from .transforms import sample_rng

__all__ = ["DaliLoader", "dali_available"]


def dali_available() -> bool:
    """True when ``nvidia.dali`` (e.g. the ``nvidia-dali-cuda130`` wheel) is importable."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        return False


def _png_copy(dataset, path: str) -> str:
    """A lossless PNG of PIL's RGB decoding of ``path``, in a temporary folder that lives as long as ``dataset``."""
    import os
    import tempfile

    from PIL import Image

    folder = dataset.__dict__.get("_dali_png_folder")
    if folder is None:
        folder = tempfile.TemporaryDirectory(prefix="dtfast_dali_png_")  # removed with the data set object
        dataset.__dict__["_dali_png_folder"] = folder
    target = os.path.join(folder.name, f"{len(os.listdir(folder.name)):08d}.png")
    with Image.open(path) as image:
        to_rgb(image).save(target, "PNG")
    return target


def _decodable(path: str) -> bool:
    """Whether PIL decodes ``path`` completely (the arbiter when DALI fails)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            to_rgb(image)
        return True
    except Exception:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return False


class DaliLoader:
    """The batches of one epoch from global step ``start_step`` (see the module docstring).

    Args:
        dataset: an ``ImageFolder`` (its files, labels, split, seed, image size, crop mode, strictness).
        batch_size, rank, world_size, seed, start_step, shuffle: as ``build_loader``.
        device: "cuda[:i]" decodes with the "mixed" decoder on that GPU; "cpu" decodes on the CPU
            (``device_id=None``).
        num_threads: DALI CPU threads per rank.
        hw_decoder_load: share of JPEG decoding given to the GPU's hardware decoder (A100/H100), 0..1.
        prefetch_queue_depth: batches DALI prepares ahead.
    """

    def __init__(self, dataset: ImageFolder, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 start_step: int = 0, device: str | torch.device = "cpu", num_threads: int = 2,
                 hw_decoder_load: float = 0.65, prefetch_queue_depth: int = 2, shuffle: bool = True) -> None:
        if not isinstance(dataset, ImageFolder):
            raise TypeError("data.backend=dali reads image files: set data.root to an image folder "
                             f"(got a {type(dataset).__name__})")
        if not dali_available():
            raise ImportError("data.backend=dali needs NVIDIA DALI: pip install nvidia-dali-cuda130 "
                              "(or use data.backend=torch / nvjpeg)")
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, int(batch_size), int(rank), int(world_size)
        self.seed, self.num_threads, self.prefetch = int(seed), int(num_threads), int(prefetch_queue_depth)
        self.hw_decoder_load = float(hw_decoder_load)
        self.device = torch.device(device)
        self.steps_per_epoch = steps_per_epoch(len(dataset), batch_size, world_size, drop_last=True)
        if self.steps_per_epoch == 0:
            raise ValueError(f"loader: {len(dataset)} images cannot fill one batch of {batch_size} on each of "
                             f"{world_size} rank(s); use a smaller batch or more images")
        self.first_step = int(start_step)
        self.epoch, self._offset = divmod(self.first_step, self.steps_per_epoch)
        usable = self.steps_per_epoch * self.batch_size
        self._shards = [shard_indices(len(dataset), r, world_size, self.seed, self.epoch, shuffle)[:usable]
                        for r in range(world_size)]
        # index -> decodable replacement, and index -> PNG copy of a file only PIL decodes; shared by the epochs of
        # this data set object
        self._replacements: dict[int, int] = dataset.__dict__.setdefault("_dali_replacements", {})
        self._transcoded: dict[int, str] = dataset.__dict__.setdefault("_dali_transcoded", {})
        self.skipped_files: list[str] = []

    def __len__(self) -> int:
        return self.steps_per_epoch - self._offset

    # ------------------------------------------------------------------ pipeline
    def _resolve(self, index: int) -> int:
        return self._replacements.get(index, index)

    def _source(self, index: int) -> str:
        """The file DALI reads for data set entry ``index``: the file itself, or its lossless PNG copy when DALI
        cannot decode a file that PIL can (see ``_repair``)."""
        return self._transcoded.get(index) or self.dataset.files[index]

    def _device_id(self) -> int | None:
        """DALI's ``device_id``: this loader's GPU ("mixed" decoding), or None for a CPU-only pipeline."""
        if self.device.type != "cuda":
            return None
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def _draws(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(pos_x, pos_y, flip) of one sample: the draws of ``plan_resize_crop`` in the same order."""
        data = self.dataset
        if not data.train:
            return np.float32(0.5), np.float32(0.5), np.int32(0)
        rng = sample_rng(data.seed, self.epoch, index)
        if data.random_resized_crop:
            return np.float32(0.5), np.float32(0.5), np.int32(rng.random() < 0.5)
        pos_y, pos_x = rng.random(), rng.random()
        return np.float32(pos_x), np.float32(pos_y), np.int32(rng.random() < 0.5)

    def _build(self, step: int):
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        data, size, batch = self.dataset, self.dataset.image_size, self.batch_size
        start = step * batch
        files, labels = [], []
        for shard in self._shards:  # all ranks' remaining shards, equal lengths: shard_id picks ours
            for index in shard[start:]:
                resolved = self._resolve(index)
                files.append(self._source(resolved))
                labels.append(data.labels[resolved])
        mine = [self._resolve(i) for i in self._shards[self.rank][start:]]

        def draws(info):
            first = (info.iteration * batch) % len(mine)  # DALI may prefetch past the end: wrap harmlessly
            columns = [self._draws(mine[(first + j) % len(mine)]) for j in range(batch)]
            return [np.array([c[k] for c in columns]) for k in range(3)]

        gpu = self.device.type == "cuda"
        device_id = self._device_id()
        # DALI's own generator drives the random-resized windows: seeded per (seed, epoch, step, RANK), so that the
        # ranks crop different windows and a restart at a step draws the same ones again
        pipe_seed = int(np.random.SeedSequence([self.seed & 0xFFFFFFFF, self.epoch, step, self.rank])
                        .generate_state(1)[0]) & 0x7FFFFFFF
        pipe = Pipeline(batch_size=batch, num_threads=self.num_threads, device_id=device_id, seed=pipe_seed,
                        prefetch_queue_depth=self.prefetch)
        with pipe:
            encoded, label = fn.readers.file(files=files, labels=labels, shard_id=self.rank,
                                             num_shards=self.world_size, random_shuffle=False, stick_to_shard=True,
                                             pad_last_batch=False, name="Reader")
            pos_x, pos_y, flip = fn.external_source(source=draws, num_outputs=3, batch=True, batch_info=True,
                                                    dtype=[types.FLOAT, types.FLOAT, types.INT32])
            # EXIF orientation is ignored, as by PIL's Image.open and torchvision's decode_jpeg (same pixels)
            decoder = {"device": "mixed", "hw_decoder_load": self.hw_decoder_load} if gpu else {"device": "cpu"}
            decoder["adjust_orientation"] = False
            if data.train and data.random_resized_crop:
                images = fn.decoders.image_random_crop(encoded, output_type=types.RGB, random_area=[0.08, 1.0],
                                                       random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10,
                                                       **decoder)
                images = fn.resize(images, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True)
                images = fn.crop_mirror_normalize(images, mirror=flip, dtype=types.UINT8, output_layout="CHW")
            else:
                images = fn.decoders.image(encoded, output_type=types.RGB, **decoder)
                # subpixel_scale=False: scale = input / rounded output size per axis, as PIL and torch resize
                images = fn.resize(images, resize_shorter=size, interp_type=types.INTERP_LINEAR, antialias=True,
                                   subpixel_scale=False)
                images = fn.crop_mirror_normalize(images, crop=(size, size), crop_pos_x=pos_x, crop_pos_y=pos_y,
                                                  mirror=flip, dtype=types.UINT8, output_layout="CHW")
            pipe.set_outputs(images, label.gpu() if gpu else label)
        iterator = DALIGenericIterator(pipe, ["images", "labels"], reader_name="Reader", auto_reset=False,
                                       last_batch_policy=LastBatchPolicy.DROP)
        return iterator, mine

    # ------------------------------------------------------------------ bad files
    def _repair(self, step: int, mine: list[int], error: Exception) -> None:
        """``mine``: this rank's whole (resolved) shard of the epoch; ``step``: the failing step in the epoch."""
        """Find undecodable files in the batches DALI may have been working on; replace or raise."""
        start = step * self.batch_size
        window = mine[start: start + (self.prefetch + 1) * self.batch_size]
        bad = [i for i in dict.fromkeys(window) if not _decodable(self.dataset.files[i])]
        if not bad:
            # PIL decodes them all, so DALI cannot decode some file PIL can (a GIF named .JPEG, an unusual JPEG):
            # give DALI a lossless PNG of PIL's decoding instead: the same pixels the torch backend sees
            failing = self._dali_undecodable([i for i in dict.fromkeys(window) if i not in self._transcoded])
            if not failing:
                raise RuntimeError(f"DALI pipeline failed at step {step} of epoch {self.epoch}, and every one of the "
                                   f"{len(window)} upcoming files decodes alone: {error}") from error
            for index in failing:
                self._transcoded[index] = _png_copy(self.dataset, self.dataset.files[index])
            warnings.warn(f"data: DALI cannot decode {[self.dataset.files[i] for i in failing][:3]} "
                          f"({len(failing)} file(s)), which PIL decodes; it reads lossless PNG copies of them",
                          stacklevel=3)
            return
        for index in bad:
            path = self.dataset.files[index]
            if self.dataset.strict:
                raise DecodeError(f"data: cannot decode {path!r} (DALI: {str(error).splitlines()[0][:200]}) "
                                  "(data.strict=true; set it false to skip such files)") from error
            for step_ahead in range(1, 17):
                candidate = (index + step_ahead) % len(self.dataset.files)
                if candidate not in bad and _decodable(self.dataset.files[candidate]):
                    self._replacements[index] = candidate
                    break
            else:
                raise DecodeError(f"data: 16 undecodable files in a row after {path!r}") from error
            self.skipped_files.append(path)
        warnings.warn(f"data: replaced {len(bad)} undecodable file(s) {[self.dataset.files[i] for i in bad][:3]} "
                      f"with the next decodable ones ({len(self.skipped_files)} this epoch on this rank)",
                      stacklevel=3)

    def _dali_undecodable(self, indices: list[int]) -> list[int]:
        """The entries among ``indices`` that DALI's decoder (this loader's device) fails on, one file at a time."""
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        gpu = self.device.type == "cuda"
        device_id = self._device_id()
        failing, position = [], 0
        while position < len(indices):
            files = [self._source(i) for i in indices[position:]]
            pipe = Pipeline(batch_size=1, num_threads=1, device_id=device_id, prefetch_queue_depth=1,
                            exec_pipelined=False, exec_async=False)
            with pipe:
                encoded, _ = fn.readers.file(files=files, random_shuffle=False)
                pipe.set_outputs(fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB))
            pipe.build()
            for offset in range(len(files)):
                try:
                    pipe.run()
                except Exception:  # noqa: BLE001 - DALI's decode error; the pipeline is unusable after it
                    failing.append(indices[position + offset])
                    position += offset + 1
                    break
            else:
                position = len(indices)
            del pipe
        return failing

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        step, iterator, attempts = self._offset, None, 0
        while step < self.steps_per_epoch:
            try:
                if iterator is None:
                    iterator, _ = self._build(step)  # DALI's iterator runs the first batch already
                out = next(iterator)[0]
            except StopIteration:
                return
            except Exception as error:  # DALI raises RuntimeError with the operator's message
                # each repair fixes the files it found; only repairs that do not get past this step are a loop
                attempts += 1
                if attempts > 8:
                    raise
                iterator = None
                self._repair(step, [self._resolve(i) for i in self._shards[self.rank]], error)
                continue
            step, attempts = step + 1, 0
            yield out["images"], out["labels"].view(-1).to(torch.int64)
