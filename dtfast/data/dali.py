"""NVIDIA DALI backend: read, decode (GPU "mixed" decoder or CPU), resize, crop and flip in a DALI pipeline.

One ``DaliLoader`` is one epoch from a start step, like ``EpochLoader``; batches are ``(uint8 images
(B, 3, H, W), int64 labels (B,))`` on the pipeline's device (the GPU for "mixed", else the CPU).

- Order and sharding: the epoch's order is the one ``DistributedSampler`` gives the torch backend (seed +
  epoch). Each rank computes its own shard only and gives ``fn.readers.file`` the remaining part of it, in
  order, with no reader shuffling. Shards hold whole batches only (the tail is dropped,
  ``LastBatchPolicy.DROP``), so every rank takes the same number of steps, and a restart at step N reads exactly
  the samples step N would have read. Labels travel through DALI as positions in the shard and are looked up
  in the data set's int64 labels afterwards (DALI's reader keeps int32).
- Crops/flips (plain recipe): per-sample positions and flips come in through ``fn.external_source`` from the
  same per-sample generator as the torch backend, so both backends crop the same window of the same file. The
  window (``plan_crop``'s, from the size in the file's header, in float64) is the only part that is resized
  (``fn.resize``'s ROI), as the torch backend does: a 1x3000 strip is not first resized to 256x768000.
  Random-resized crops use DALI's fused ``decoders.image_random_crop``, driven by DALI's own generator seeded
  per (seed, epoch, step at which the pipeline starts, rank): every rank crops its own windows, and the order is
  the same after a restart, but not the windows (nor the torch backend's).
- Bad files: DALI 2.4's CPU decoder often crashes the process (a segfault, not an exception) when a file fails
  to decode in a batch of 32 or more, so files are screened before DALI reads them, once per data set object:
  a JPEG must start with SOI and hold the EOI marker near its end, a PNG must hold its IEND chunk (reads of
  a few bytes per file, in threads). Any other file (a truncated download, an HTML page, a GIF or WebP named
  .jpg) is decoded by PIL: if PIL decodes it, DALI reads a lossless PNG of PIL's decoding (the torch backend's
  pixels); if not, it is replaced by the next decodable file, as the torch backend does, with a warning per
  epoch, or with ``strict=True`` a ``DecodeError`` names the file and PIL's reason. A file that passes the
  screen and still fails in DALI (corrupt entropy data) stops the pipeline with an exception at small
  batches; the loader then finds it with PIL in the failing batches and repairs it in the same ways, and
  rebuilds the pipeline at the same step.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .folder import DecodeError, ImageFolder, to_rgb
from .loader import shard_indices, steps_per_epoch
from .transforms import sample_rng

__all__ = ["DaliLoader", "dali_available"]


@functools.lru_cache(maxsize=None)
def dali_available() -> bool:
    """True when ``nvidia.dali`` (e.g. the ``nvidia-dali-cuda130`` wheel) imports, with its ``fn`` operators and
    PyTorch plugin (an install that is found but fails to import counts as missing: ``auto`` then takes torch)."""
    try:
        import nvidia.dali.fn  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or whatever a broken install raises on import
        return False
    return True


def _png_copy(dataset, path: str) -> str:
    """A lossless PNG of PIL's RGB decoding of ``path``, in a temporary folder that lives as long as ``dataset``."""
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


def _pil_decode(path: str) -> tuple[str | None, str | None]:
    """(PIL's format name, None) when PIL decodes ``path`` completely (the arbiter), else (None, PIL's reason, e.g.
    "OSError: image file is truncated ...")."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            to_rgb(image)
            return image.format or "", None
    except Exception as error:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBomb...
        return None, f"{type(error).__name__}: {error}"


def _undecodable(path: str) -> str | None:
    """None when PIL decodes ``path`` completely, else PIL's reason."""
    return _pil_decode(path)[1]


_TAIL = 64  # bytes read at the end of a file: the EOI / IEND there, after padding (zeros, whitespace)
_PNG_END = b"IEND\xaeB`\x82"  # PNG's IEND chunk type and its (constant) CRC


def _intact(path: str) -> bool:
    """Whether DALI may read ``path`` as it is: a JPEG that starts with SOI and ends with EOI, or a PNG that ends
    with its IEND chunk (trailing zeros or whitespace allowed). Reads a few bytes; False for anything else,
    including a truncated camera JPEG (whose embedded thumbnail's EOI comes earlier) and a complete JPEG with data
    appended (a phone's motion photo): PIL then decides (see ``_fix``)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - _TAIL))
            tail = fh.read(_TAIL).rstrip(b"\x00 \t\r\n")
    except OSError:
        return False
    if head[:3] == b"\xff\xd8\xff":
        return tail.endswith(b"\xff\xd9")
    if head == b"\x89PNG\r\n\x1a\n":
        return tail.endswith(_PNG_END)
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
        self._shard = shard_indices(len(dataset), self.rank, world_size, self.seed, self.epoch, shuffle)[:usable]
        # index -> decodable replacement, index -> PNG copy of a file only PIL decodes, and the screened indices;
        # shared by the epochs of this data set object
        self._replacements: dict[int, int] = dataset.__dict__.setdefault("_dali_replacements", {})
        self._transcoded: dict[int, str] = dataset.__dict__.setdefault("_dali_transcoded", {})
        self._screened: set[int] = dataset.__dict__.setdefault("_dali_screened", set())
        self._label_table: torch.Tensor | None = None  # int64 labels of the built pipeline's files, by position
        self.skipped_files: list[str] = []
        self._screen(self._shard[self._offset * self.batch_size:])

    def __len__(self) -> int:
        return self.steps_per_epoch - self._offset

    # ------------------------------------------------------------------ pipeline
    def _resolve(self, index: int) -> int:
        """The entry read for ``index``: its replacement, followed along the chain (a stand-in that failed later
        was replaced in turn)."""
        for _ in range(len(self._replacements) + 1):
            if index not in self._replacements:
                return index
            index = self._replacements[index]
        raise RuntimeError("data: DALI replacement table has a cycle")  # _fix never makes one

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
            return np.float64(0.5), np.float64(0.5), np.int32(0)
        rng = sample_rng(data.seed, self.epoch, index)
        if data.random_resized_crop:
            return np.float64(0.5), np.float64(0.5), np.int32(rng.random() < 0.5)
        pos_y, pos_x = rng.random(), rng.random()
        return np.float64(pos_x), np.float64(pos_y), np.int32(rng.random() < 0.5)

    @staticmethod
    def _window(shape, pos_x, pos_y, size: tuple[int, int]):
        """DALI nodes (roi_start, roi_end) of ``plan_crop``'s window for the plain recipe: the (H, W) = ``size`` crop
        at relative position (pos_y, pos_x) of the image resized to cover it (``resized_cover_size``), mapped back
        to source pixels. ``shape``: the source's (height, width, channels) as float64."""
        from nvidia.dali import fn, types
        from nvidia.dali import math as dmath

        def half_up(x):
            return dmath.floor(x + 0.5)

        out_h, out_w = size
        height, width = shape[0], shape[1]
        resized_h = dmath.max(out_h, half_up(height * out_w / width))
        resized_w = dmath.max(out_w, half_up(width * out_h / height))
        top, left = half_up(pos_y * (resized_h - out_h)), half_up(pos_x * (resized_w - out_w))
        scale_y, scale_x = height / resized_h, width / resized_w
        return (fn.cast(fn.stack(top * scale_y, left * scale_x), dtype=types.FLOAT),
                fn.cast(fn.stack((top + out_h) * scale_y, (left + out_w) * scale_x), dtype=types.FLOAT))

    def _build(self, step: int):
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        data, size, batch = self.dataset, self.dataset.image_size, self.batch_size  # size: (H, W)
        mine = [self._resolve(i) for i in self._shard[step * batch:]]
        files = [self._source(i) for i in mine]
        # DALI's reader keeps labels as int32: it carries positions, looked up in the int64 labels afterwards
        gpu = self.device.type == "cuda"
        self._label_table = torch.tensor([data.labels[i] for i in mine], dtype=torch.int64,
                                         device=self.device if gpu else "cpu")

        random_resized = data.train and data.random_resized_crop
        fields = [2] if random_resized else [0, 1, 2]  # random-resized windows are DALI's: only the flip comes in

        def draws(info):
            first = (info.iteration * batch) % len(mine)  # DALI may prefetch past the end: wrap harmlessly
            columns = [self._draws(mine[(first + j) % len(mine)]) for j in range(batch)]
            return [np.array([c[k] for c in columns]) for k in fields]

        device_id = self._device_id()
        # DALI's own generator drives the random-resized windows: seeded per (seed, epoch, step, RANK), so that the
        # ranks crop different windows; the same start step draws the same ones, but a restart's pipeline starts at
        # another step than the interrupted run's, so its windows differ (the order does not)
        pipe_seed = int(np.random.SeedSequence([self.seed & 0xFFFFFFFF, self.epoch, step, self.rank])
                        .generate_state(1)[0]) & 0x7FFFFFFF
        pipe = Pipeline(batch_size=batch, num_threads=self.num_threads, device_id=device_id, seed=pipe_seed,
                        prefetch_queue_depth=self.prefetch)
        with pipe:
            encoded, label = fn.readers.file(files=files, labels=list(range(len(files))), random_shuffle=False,
                                             pad_last_batch=False, name="Reader")
            *position, flip = fn.external_source(source=draws, num_outputs=len(fields), batch=True, batch_info=True,
                                                 dtype=[[types.FLOAT64, types.FLOAT64, types.INT32][k] for k in fields])
            # EXIF orientation is ignored, as by PIL's Image.open and torchvision's decode_jpeg (same pixels)
            decoder = {"device": "mixed", "hw_decoder_load": self.hw_decoder_load} if gpu else {"device": "cpu"}
            decoder["adjust_orientation"] = False
            if random_resized:
                images = fn.decoders.image_random_crop(encoded, output_type=types.RGB, random_area=[0.08, 1.0],
                                                       random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10,
                                                       **decoder)
                images = fn.resize(images, size=list(size), interp_type=types.INTERP_LINEAR, antialias=True)
                images = fn.crop_mirror_normalize(images, mirror=flip, dtype=types.UINT8, output_layout="CHW")
            else:
                images = fn.decoders.image(encoded, output_type=types.RGB, **decoder)
                # resize only the window that the crop keeps (a 1x3000 image would become 256x768000 first):
                # plan_crop's window in source pixels, in float64 from the header's size, resized to (H, W)
                start, end = self._window(fn.peek_image_shape(encoded, adjust_orientation=False,
                                                              dtype=types.FLOAT64), *position, size)
                images = fn.resize(images, size=list(size), roi_start=start, roi_end=end, roi_relative=False,
                                   interp_type=types.INTERP_LINEAR, antialias=True)
                images = fn.crop_mirror_normalize(images, mirror=flip, dtype=types.UINT8, output_layout="CHW")
            pipe.set_outputs(images, label.gpu() if gpu else label)
        iterator = DALIGenericIterator(pipe, ["images", "labels"], reader_name="Reader", auto_reset=False,
                                       last_batch_policy=LastBatchPolicy.DROP)
        return iterator, mine

    # ------------------------------------------------------------------ bad files
    def _screen(self, indices: list[int]) -> None:
        """Make every entry of ``indices`` safe for DALI before it reads them (see the module docstring): files
        not yet screened are checked with ``_intact`` (a few bytes each, in threads); the others go to
        ``_fix``. Counts and warns about this epoch's replaced files, as the torch backend does."""
        todo = [i for i in dict.fromkeys(indices) if i not in self._screened]
        if todo:
            files = self.dataset.files
            # chunks of files per thread: threads overlap the reads of a slow (network) disk; one future per file
            # cost more than the check itself (2-vCPU VM, files in the page cache: 17 us per file in one thread, 35 us
            # in these 8 threads, 80 us with a future per file)
            chunks = [todo[i: i + 256] for i in range(0, len(todo), 256)]
            with ThreadPoolExecutor(max_workers=8, thread_name_prefix="dtfast_dali_screen") as pool:
                intact = [ok for part in pool.map(lambda chunk: [_intact(files[i]) for i in chunk], chunks)
                          for ok in part]
            self._fix([i for i, ok in zip(todo, intact) if not ok])
            self._screened.update(todo)
        self._count_replaced([self.dataset.files[i] for i in indices if i in self._replacements])

    def _count_replaced(self, files: list[str]) -> None:
        """Count and warn about this epoch's replaced files (as the torch backend does, every epoch)."""
        if files:
            self.skipped_files.extend(files)
            warnings.warn(f"data: replaced {len(files)} undecodable file(s) {files[:3]} with the next decodable ones "
                          f"({len(self.skipped_files)} this epoch on this rank)", stacklevel=4)

    def _fix(self, indices: list[int], dali_error: Exception | None = None) -> list[int]:
        """Decide each entry of ``indices`` with PIL: a JPEG or PNG that PIL decodes is read as it is; another file
        PIL decodes (GIF, WebP, ... named .jpg) from a lossless PNG of PIL's decoding; one it cannot decode is
        replaced by the next decodable file (``strict``: ``DecodeError`` naming the file and PIL's reason). Returns
        the replaced (undecodable) ones."""
        bad, copied = [], []
        for index in indices:
            path = self.dataset.files[index]
            image_format, reason = _pil_decode(path)
            if reason is None:
                if self._copy_unless_jpeg_or_png(index, image_format):
                    copied.append(path)
                continue
            if self.dataset.strict:
                raise DecodeError(f"data: cannot decode {path!r}: {reason[:300]} (data.strict=true; set it false to "
                                  "skip such files)") from dali_error
            bad.append(index)
        for index in bad:
            for step_ahead in range(1, 17):
                candidate = (index + step_ahead) % len(self.dataset.files)
                if candidate not in bad and self._usable(candidate):
                    self._replacements[index] = candidate
                    break
            else:
                raise DecodeError(f"data: 16 undecodable files in a row after {self.dataset.files[index]!r}") \
                    from dali_error
        if copied:
            warnings.warn(f"data: {len(copied)} file(s) {copied[:3]} are neither JPEG nor PNG files; PIL decodes "
                          "them, and DALI reads lossless PNG copies of them", stacklevel=4)
        return bad

    def _usable(self, index: int) -> bool:
        """Whether entry ``index`` can stand in for an undecodable file: not replaced itself, and decoded by PIL
        (a stand-in is rare, so it gets the full check, not just the screen's); read from a PNG copy unless it is a
        JPEG or PNG file."""
        if index in self._replacements:
            return False
        path = self.dataset.files[index]
        image_format, reason = _pil_decode(path)
        if reason is not None:
            return False
        self._copy_unless_jpeg_or_png(index, image_format)
        self._screened.add(index)
        return True

    def _copy_unless_jpeg_or_png(self, index: int, image_format: str) -> bool:
        """For a file PIL decodes as ``image_format``: DALI reads a JPEG or PNG as it is, anything else (GIF, WebP,
        ... named .jpg) from a lossless PNG of PIL's decoding, made once. Whether a copy was made now."""
        if image_format in ("JPEG", "PNG") or index in self._transcoded:
            return False
        self._transcoded[index] = _png_copy(self.dataset, self.dataset.files[index])
        return True

    def _repair(self, step: int, mine: list[int], error: Exception) -> None:
        """DALI failed at ``step`` of the epoch although the files passed the screen; ``mine``: this rank's whole
        (resolved) shard of the epoch. Finds the files PIL cannot decode in the batches DALI may have been working
        on and replaces them, or else the files DALI alone cannot decode and gives it PNG copies."""
        start = step * self.batch_size
        window = list(dict.fromkeys(mine[start: start + (self.prefetch + 1) * self.batch_size]))
        bad = [i for i in window if _undecodable(self.dataset.files[i]) is not None]
        if bad:
            self._fix(bad, error)
            self._count_replaced([self.dataset.files[i] for i in bad])
            return
        # PIL decodes them all, so DALI cannot decode some file PIL can (an unusual JPEG): give DALI a lossless PNG
        # of PIL's decoding instead: the same pixels the torch backend sees
        failing = self._dali_undecodable([i for i in window if i not in self._transcoded])
        if not failing:
            raise RuntimeError(f"DALI pipeline failed at step {step} of epoch {self.epoch}, and every one of the "
                               f"{len(window)} upcoming files decodes alone: {error}") from error
        for index in failing:
            self._transcoded[index] = _png_copy(self.dataset, self.dataset.files[index])
        warnings.warn(f"data: DALI cannot decode {[self.dataset.files[i] for i in failing][:3]} "
                      f"({len(failing)} file(s)), which PIL decodes; it reads lossless PNG copies of them",
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
                self._repair(step, [self._resolve(i) for i in self._shard], error)
                continue
            step, attempts = step + 1, 0
            yield out["images"], self._label_table[out["labels"].view(-1).to(torch.int64)]
