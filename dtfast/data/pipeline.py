"""One input pipeline, three decoders: ``data.backend = "auto" | "torch" | "dali" | "nvjpeg"``.

``build_input_pipeline(...)`` returns an endless iterator of ``(teacher_images, student_images, labels)`` on the
training device, both views derived on the device from ONE decoded uint8 batch (``to_views``): teacher in
[-1, 1], student normalised with the student's mean/std; labels int64 (-1 for an unlabelled folder).

- ``torch``: PIL decoding in DataLoader worker processes (any data set, including the procedural one).
- ``dali``: NVIDIA DALI; the GPU "mixed" decoder when ``device`` is CUDA, the CPU decoder otherwise.
- ``nvjpeg``: torchvision's batched GPU JPEG decoding; workers only read bytes.
- ``auto``: ``dali`` when DALI is importable and the data are an image folder, else ``torch``.

All backends use the same order (``DistributedSampler``: seed + epoch, sharded by rank), drop the last
partial batch so every rank takes the same number of steps, and restart at any global step (``start_step``)
with the samples that step would have seen. Epoch boundaries are crossed inside the iterator.

Processes and threads: the torch and nvjpeg backends' DataLoader worker processes come from a fork server
(``workers.py``: ``fork()`` of a process with other threads, like this pipeline's prefetch thread, can deadlock
or fail) and persist across epochs: the first batch starts them on the CALLING thread, before the prefetch
thread exists, and an epoch boundary only moves the same loader to the next epoch (``restart``), so nothing is
started from the prefetch thread. ``close()`` stops the thread and the workers.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Dataset

from .folder import ImageFolder
from .loader import build_loader
from .transforms import to_views

__all__ = ["BACKENDS", "InputPipeline", "build_input_pipeline", "resolve_backend"]

BACKENDS = ("auto", "torch", "dali", "nvjpeg")


def resolve_backend(backend: str, dataset: Dataset) -> str:
    """The concrete backend for ``backend`` (see the module docstring); errors say what to change."""
    from .dali import dali_available

    if backend not in BACKENDS:
        raise ValueError(f"data.backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "dali" if isinstance(dataset, ImageFolder) and dali_available() else "torch"
    if backend in ("dali", "nvjpeg") and not isinstance(dataset, ImageFolder):
        raise ValueError(f"data.backend={backend} decodes image files; the embedded procedural set (empty "
                         "data.root) needs data.backend=torch or auto")
    return backend


def default_threads() -> int:
    """CPU threads per rank: the machine's cores shared among the local ranks."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, (os.cpu_count() or 1) // max(1, local))


class InputPipeline:
    """Endless ``(teacher_images, student_images, labels)`` batches from global step ``start_step`` on.

    Attributes: ``backend`` (resolved), ``step`` (global step of the next batch), ``epoch``,
    ``steps_per_epoch``, ``skipped_files`` (undecodable files replaced so far on this rank), ``prefetch``
    (batches a background thread prepares ahead; default 2 on CUDA, 0 on the CPU). Call ``close()`` when done
    with a prefetching pipeline.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, mean: Sequence[float], std: Sequence[float],
                 rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu", backend: str = "auto",
                 seed: int = 0, num_workers: int = 2, start_step: int = 0, num_threads: int | None = None,
                 hw_decoder_load: float = 0.65, channels_last: bool = False, prefetch: int | None = None,
                 start_method: str | None = None) -> None:
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, int(batch_size), int(rank), int(world_size)
        self.device = torch.device(device)
        self.backend = resolve_backend(backend, dataset)
        self.mean, self.std, self.seed, self.num_workers = tuple(mean), tuple(std), int(seed), int(num_workers)
        self.num_threads = default_threads() if num_threads is None else int(num_threads)
        self.hw_decoder_load, self.channels_last = float(hw_decoder_load), bool(channels_last)
        self.start_method = start_method  # DataLoader workers' start method (workers.py); None: auto/environment
        # batches prepared ahead by a background thread (on a side CUDA stream on GPUs), so that decoding on the
        # device (nvjpeg) and the host-to-device copy overlap the training step
        self.prefetch = (2 if self.device.type == "cuda" else 0) if prefetch is None else int(prefetch)
        self.step = int(start_step)  # global step of the next batch handed out
        self._produced = int(start_step)  # global step of the next batch the loader makes
        self._skipped_before: list[str] = []  # undecodable files of the finished epochs
        self._loader = self._epoch_loader(self._produced)
        self._iterator: Iterator | None = None
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def skipped_files(self) -> list[str]:
        """Undecodable files replaced so far on this rank (all epochs)."""
        return self._skipped_before + list(self._loader.skipped_files)

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    @property
    def steps_per_epoch(self) -> int:
        return self._loader.steps_per_epoch

    def _epoch_loader(self, step: int):
        common = {"rank": self.rank, "world_size": self.world_size, "seed": self.seed, "start_step": step}
        if self.backend == "dali":
            from .dali import DaliLoader

            return DaliLoader(self.dataset, self.batch_size, device=self.device, num_threads=self.num_threads,
                              hw_decoder_load=self.hw_decoder_load, **common)
        if self.backend == "nvjpeg":
            from .nvjpeg import NvjpegLoader

            return NvjpegLoader(self.dataset, self.batch_size, device=self.device, num_workers=self.num_workers,
                                start_method=self.start_method, **common)
        return build_loader(self.dataset, self.batch_size, num_workers=self.num_workers, drop_last=True,
                            pin_memory=self.device.type == "cuda", start_method=self.start_method, **common)

    def __iter__(self) -> InputPipeline:
        return self

    def _start(self) -> None:
        """Start the loader's worker processes on the calling thread (before any prefetch thread exists)."""
        if self._iterator is None:
            if hasattr(self._loader, "start"):
                self._loader.start()
            self._iterator = iter(self._loader)

    def _produce(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._start()
        try:
            images, labels = next(self._iterator)
        except StopIteration:  # epoch boundary: the next epoch starts at the step reached
            self._skipped_before.extend(self._loader.skipped_files)
            if hasattr(self._loader, "restart"):  # same DataLoader, same worker processes: nothing is started
                self._loader.restart(self._produced)
            else:  # DALI: a new pipeline (threads inside DALI, no process)
                self._loader = self._epoch_loader(self._produced)
            self._iterator = iter(self._loader)
            images, labels = next(self._iterator)
        self._produced += 1
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        teacher_images, student_images = to_views(images, self.mean, self.std)
        return teacher_images, student_images, labels.to(self.device, non_blocking=True)

    def _worker(self) -> None:
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        try:
            while not self._stop.is_set():
                if cuda:
                    with torch.cuda.device(self.device), torch.cuda.stream(stream):
                        batch = self._produce()
                        ready = torch.cuda.Event()
                        ready.record(stream)
                else:
                    batch, ready = self._produce(), None
                while not self._stop.is_set():
                    try:
                        self._queue.put((batch, ready, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except Exception as error:  # noqa: BLE001 - handed to the consumer and re-raised there
            while not self._stop.is_set():
                try:
                    self._queue.put((None, None, error), timeout=0.1)
                    break
                except queue.Full:
                    continue

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._stop.is_set():
            raise RuntimeError("input pipeline: next() after close()")
        if self.prefetch <= 0:
            batch = self._produce()
        else:
            if self._thread is None:
                self._start()  # worker processes start here, on the calling thread, not on the prefetch thread
                self._queue = queue.Queue(maxsize=self.prefetch)
                self._thread = threading.Thread(target=self._worker, name="dtfast-input-prefetch", daemon=True)
                self._thread.start()
            batch, ready, error = self._queue.get()
            if error is not None:
                self.close()
                raise error
            if ready is not None:  # make the consumer's stream wait for the side stream, keep memory alive
                consumer = torch.cuda.current_stream(self.device)
                consumer.wait_event(ready)
                for tensor in batch:
                    tensor.record_stream(consumer)
        self.step += 1
        return batch

    @property
    def max_in_flight(self) -> int:
        """An upper bound on the batches decoded ahead of the consumer: this pipeline's prefetch queue plus the
        loader's (DataLoader workers x their default prefetch factor of 2; DALI's queue depth of 2). A benchmark
        consumes this many after its warm-up, so that its timed steps wait for batches decoded at the steady rate."""
        loader_ahead = 2 if self.backend == "dali" else 2 * self.num_workers  # 0 workers: decoded on demand
        return self.prefetch + loader_ahead + 1

    def close(self) -> None:
        """Stop the prefetch thread and the loader's worker processes (idempotent)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            while self._queue is not None and not self._queue.empty():
                self._queue.get_nowait()
            thread.join(timeout=1)  # a thread between batches sees the stop flag at once
        self._iterator = None
        loader = getattr(self, "_loader", None)
        if loader is not None and hasattr(loader, "close"):
            loader.close()  # a thread waiting on a stalled worker gets an error from the stopped loader and ends
        if thread is not None and thread.is_alive():
            thread.join(timeout=10)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown: nothing left to clean up
            pass


def build_input_pipeline(root: str | None, image_size: int | tuple[int, int], batch_size: int, *, mean: Sequence[float],
                         std: Sequence[float], rank: int = 0, world_size: int = 1,
                         device: str | torch.device = "cpu", backend: str = "auto", seed: int = 0,
                         split: str = "train", num_workers: int = 2, start_step: int = 0, strict: bool = False,
                         random_resized_crop: bool = False, num_images: int = 2048, num_threads: int | None = None,
                         hw_decoder_load: float = 0.65, channels_last: bool = False,
                         prefetch: int | None = None, start_method: str | None = None) -> InputPipeline:
    """Data set (``build_dataset``) + ``InputPipeline`` in one call; arguments as there."""
    from . import build_dataset

    dataset = build_dataset(root, image_size, split=split, num_images=num_images, seed=seed, strict=strict,
                            random_resized_crop=random_resized_crop)
    return InputPipeline(dataset, batch_size, mean=mean, std=std, rank=rank, world_size=world_size, device=device,
                         backend=backend, seed=seed, num_workers=num_workers, start_step=start_step,
                         num_threads=num_threads, hw_decoder_load=hw_decoder_load, channels_last=channels_last,
                         prefetch=prefetch, start_method=start_method)
