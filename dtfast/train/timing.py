"""Per-stage step timing: CUDA events on GPU, synchronised wall clocks on CPU.

The trainer wraps each stage of a step in ``timer.section(name)``; the default ``NullTimer`` costs nothing.
The benchmark passes a ``StageTimer`` and reads ``timer.totals()`` (seconds per stage).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Iterator

import torch

# Timed sections of a step. Gradient communication is not a section: DDP all-reduces gradient buckets while backward
# runs, DeepSpeed reduces and gathers inside backward and optimizer. dtfast.bench derives the exposed part for DDP
# from steps without the all-reduce (see dtfast.bench.runner.Measurement).
STAGES = ("data", "teacher", "student", "loss", "backward", "optimizer")


class NullTimer:
    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:  # noqa: ARG002
        yield


class StageTimer:
    def __init__(self, device: torch.device):
        self.device = device
        self._cuda = device.type == "cuda"
        self._events: dict[str, list] = defaultdict(list)
        self._seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        if self._cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events[name].append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._seconds[name] += time.perf_counter() - t0

    def totals(self) -> dict[str, float]:
        if self._cuda:
            torch.cuda.synchronize(self.device)
            for name, pairs in self._events.items():
                self._seconds[name] += sum(s.elapsed_time(e) for s, e in pairs) / 1e3
            self._events.clear()
        return dict(self._seconds)

    def reset(self) -> None:
        self.totals()
        self._seconds.clear()
