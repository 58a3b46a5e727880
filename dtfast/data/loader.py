"""Sharded, resumable batches over a map-style data set (the ``torch`` backend's loader).

``build_loader(..., start_step=N)`` returns the batches of ONE epoch, starting at global step N: the epoch is
``N // steps_per_epoch`` and the first batch is the one that step N of an uninterrupted run would see (same
seed, same order, same crops). When it is exhausted, build the next one with the step reached (the trainer
does this at every epoch boundary).

Sharding: ``DistributedSampler`` semantics (a permutation seeded with ``seed + epoch``, then every
``world_size``-th index from ``rank``), so the ranks' shards are disjoint and cover the data set once per
epoch. With ``drop_last=True`` (training) the tail that does not fill a batch on every rank is dropped, so
every rank takes exactly ``steps_per_epoch`` steps.

Worker processes: started from a fork server, never by ``fork()`` of the (multi-threaded) training process, and
kept for the life of the loader (``persistent_workers``): ``EpochLoader.restart(step)`` moves the same
DataLoader (and its workers) to the next epoch, so an epoch boundary starts no process. ``start()`` starts the
workers on the calling thread (the pipeline calls it before its prefetch thread exists). See ``workers.py``
for why and what it costs.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .workers import loader_options, shutdown_workers

__all__ = ["EpochLoader", "ResumableDistributedSampler", "build_loader", "shard_indices", "steps_per_epoch"]


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` that starts ``start_index`` samples into this rank's shard of the epoch."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True, start_index: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        if not 0 <= start_index <= self.num_samples:
            raise ValueError(f"sampler: start_index {start_index} outside 0..{self.num_samples}")
        self.start_index = int(start_index)

    def restart(self, epoch: int, start_index: int) -> None:
        """Move to ``epoch``, ``start_index`` samples into this rank's shard (a persistent loader's next epoch)."""
        if not 0 <= start_index <= self.num_samples:
            raise ValueError(f"sampler: start_index {start_index} outside 0..{self.num_samples}")
        self.set_epoch(epoch)
        self.start_index = int(start_index)

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start_index:])

    def __len__(self) -> int:
        return self.num_samples - self.start_index


def steps_per_epoch(num_items: int, batch_size: int, world_size: int, drop_last: bool = True) -> int:
    """Batches per rank and epoch under ``DistributedSampler`` sharding."""
    per_rank = num_items // world_size if drop_last else -(-num_items // world_size)
    return per_rank // batch_size if drop_last else -(-per_rank // batch_size)


def shard_indices(num_items: int, rank: int, world_size: int, seed: int, epoch: int, shuffle: bool = True,
                  drop_last: bool = True) -> list[int]:
    """This rank's data-set indices for ``epoch``, in order: exactly what ``ResumableDistributedSampler`` yields
    (the DALI and nvJPEG backends use it, so every backend sees the same order)."""
    sampler = DistributedSampler(range(num_items), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                 drop_last=drop_last)
    sampler.set_epoch(epoch)
    return list(sampler)


class _EpochTagged(Sampler):
    """Yields ``(epoch, index)``: persistent workers hold their own copy of the data set, so the epoch (which
    seeds the per-sample crops and flips) travels with each index instead of through ``set_epoch`` before the
    workers start."""

    def __init__(self, sampler: ResumableDistributedSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.sampler.epoch
        return ((epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class _WithSkips(Dataset):
    """Worker-side view: items (image, label, undecodable files skipped to produce the item); keys are indices
    or ``(epoch, index)`` (``_EpochTagged``)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            epoch, index = key
            if hasattr(self.dataset, "set_epoch") and getattr(self.dataset, "epoch", None) != epoch:
                self.dataset.set_epoch(epoch)
        else:
            index = key
        if hasattr(self.dataset, "load"):
            return self.dataset.load(index)
        image, label = self.dataset[index]
        return image, label, []


def _collate(items) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    images = torch.stack([item[0] for item in items])
    labels = torch.tensor([int(item[1]) for item in items], dtype=torch.int64)
    return images, labels, [path for item in items for path in item[2]]


class EpochLoader:
    """The batches ``(uint8 images (B, 3, H, W), int64 labels (B,))`` of one epoch from a start step.

    Attributes: ``epoch``, ``first_step`` (global step of the first batch), ``steps_per_epoch``,
    ``skipped_files`` (undecodable files replaced so far, in this rank's order).
    ``restart(step)`` moves the loader, with its persistent worker processes, to the epoch of ``step``;
    ``start()`` starts the workers now (on the calling thread); ``close()`` stops them.
    ``start_method``: how workers start (``workers.worker_start_method``: auto = forkserver).
    """

    def __init__(self, dataset: Dataset, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 num_workers: int = 2, drop_last: bool = True, start_step: int = 0, shuffle: bool = True,
                 pin_memory: bool | None = None, start_method: str | None = None) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or start_step < 0:
            raise ValueError(f"loader: bad batch_size={batch_size}, rank={rank}, world_size={world_size} or "
                             f"start_step={start_step}")
        self.steps_per_epoch = steps_per_epoch(len(dataset), batch_size, world_size, drop_last)
        if self.steps_per_epoch == 0:
            raise ValueError(f"loader: {len(dataset)} images cannot fill one batch of {batch_size} on each of "
                             f"{world_size} rank(s); use a smaller batch or more images")
        self.dataset, self.batch_size, self.drop_last = dataset, int(batch_size), bool(drop_last)
        self.epoch, offset = divmod(int(start_step), self.steps_per_epoch)
        self.first_step = int(start_step)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.epoch)  # before the workers copy the data set
        self.sampler = ResumableDistributedSampler(dataset, world_size, rank, shuffle=shuffle, seed=seed,
                                                   drop_last=drop_last, start_index=offset * batch_size)
        self.sampler.set_epoch(self.epoch)
        self.skipped_files: list[str] = []
        workers = loader_options(num_workers, start_method)  # fork server, persistent, parent watch
        self.loader = DataLoader(
            _WithSkips(dataset), batch_size=batch_size, sampler=_EpochTagged(self.sampler), num_workers=num_workers,
            collate_fn=_collate, drop_last=drop_last,
            pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
            # workers' base seed from a private generator: building a loader never moves the global RNG
            generator=torch.Generator().manual_seed(seed + self.epoch), **workers,
        )
        self._started: Iterator | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def start(self) -> None:
        """Start the worker processes (and queue the first indices) now, on the calling thread."""
        if self._started is None:
            self._started = iter(self.loader)

    def restart(self, start_step: int) -> None:
        """The batches of the epoch containing global step ``start_step``, from there on, with the SAME worker
        processes (nothing is started); ``skipped_files`` starts empty."""
        if start_step < 0:
            raise ValueError(f"loader: bad start_step={start_step}")
        self.epoch, offset = divmod(int(start_step), self.steps_per_epoch)
        self.first_step = int(start_step)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)  # this process's copy (num_workers=0); workers get it per index
        self.sampler.restart(self.epoch, offset * self.batch_size)
        self.skipped_files = []
        self._started = None  # its queued indices are the old epoch's: the next iter() resets the workers

    def close(self) -> None:
        """Stop the worker processes (idempotent; a later iteration starts new ones)."""
        self._started = None
        shutdown_workers(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self._started if self._started is not None else iter(self.loader)
        self._started = None
        for images, labels, skipped in batches:
            if skipped:
                self.skipped_files.extend(skipped)
                warnings.warn(f"data: replaced {len(skipped)} undecodable file(s) {skipped[:3]} with the next "
                              f"decodable ones ({len(self.skipped_files)} this epoch on this rank)", stacklevel=2)
            yield images, labels


def build_loader(dataset: Dataset, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 num_workers: int = 2, drop_last: bool = True, start_step: int = 0, shuffle: bool = True,
                 pin_memory: bool | None = None, start_method: str | None = None) -> EpochLoader:
    """The batches of the epoch that contains global step ``start_step``, from that step on (see module doc)."""
    return EpochLoader(dataset, batch_size, rank=rank, world_size=world_size, seed=seed, num_workers=num_workers,
                       drop_last=drop_last, start_step=start_step, shuffle=shuffle, pin_memory=pin_memory,
                       start_method=start_method)
