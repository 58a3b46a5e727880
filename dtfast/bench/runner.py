"""Measuring one row at one batch size: W warm-up + N timed real training steps of a `Trainer`.

A step is ``trainer.optimizer_step(micro_batches, timer)``: data -> teacher -> student + regressor -> loss ->
backward -> optimizer, exactly the training loop's step. Step times are host wall clocks with the device
synchronised at every step boundary; the per-stage breakdown comes from the trainer's own ``timer.section``
hooks (CUDA events on GPU, synchronised perf_counter on CPU). "other" is the step time the sections do not
cover (uint8 -> float views, learning-rate bookkeeping, launch gaps).
"""

from __future__ import annotations

import contextlib
import gc
import resource
import signal
import statistics
import sys
import time
from typing import Any
from unittest import mock

import torch

from dtfast.train.timing import STAGES, StageTimer


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def teacher_options(options: dict[str, Any]):
    """Pass extra `build_teacher` options (early_exit) while the Trainer builds its teacher."""
    if not options:
        yield
        return
    from dtfast import teachers

    original = teachers.build_teacher

    def build_teacher(*args, **kwargs):
        return original(*args, **{**kwargs, **options})

    with mock.patch.object(teachers, "build_teacher", build_teacher):
        yield


def build_trainer(cfg, options: dict[str, Any]):
    from dtfast.train.trainer import Trainer

    if "early_exit" in options and hasattr(cfg.teacher, "early_exit"):  # the config grew the key: use it
        cfg.teacher.early_exit = options.pop("early_exit")
    # the Trainer turns SIGTERM/SIGINT into "checkpoint and stop" for train(); a benchmark must stop at once
    # (Ctrl-C, or a `timeout` around it), so the handlers it had before are put back
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with teacher_options(options):
            return Trainer(cfg)
    finally:
        for sig, handler in handlers.items():
            with contextlib.suppress(ValueError, TypeError):  # not the main thread / a handler set outside Python
                signal.signal(sig, handler)


class SyntheticBatches:
    """Random uint8 images already on the device (a few distinct batches, cycled): compute only."""

    def __init__(self, batch_size: int, image_size: int | tuple[int, int], device: torch.device, distinct: int = 2,
                 seed: int = 0):
        from dtfast.data.transforms import image_hw

        generator = torch.Generator(device="cpu").manual_seed(seed)
        self.batches = [
            (torch.randint(0, 256, (batch_size, 3, *image_hw(image_size)), dtype=torch.uint8,
                           generator=generator).to(device),
             torch.zeros(batch_size, dtype=torch.long, device=device))
            for _ in range(distinct)
        ]
        self.index = 0

    def __next__(self):
        batch = self.batches[self.index % len(self.batches)]
        self.index += 1
        return batch


class RealBatches:
    """Training's own input at this batch size: ``Trainer.build_pipeline`` (the configured ``data.backend``,
    prefetch and on-device views; endless). ``close()`` ends its workers."""

    def __init__(self, trainer, batch_size: int):
        trainer.cfg.train.batch_size = batch_size
        self.pipeline = trainer.build_pipeline(0)
        self.backend = self.pipeline.backend

    def __next__(self):
        return next(self.pipeline)

    def drain(self) -> int:
        """Take (and drop) the batches decoded ahead, e.g. during a long compiling warm-up: otherwise the timed steps
        would be served from them and the data wait would not show whether decoding keeps up. Returns the count."""
        count = self.pipeline.max_in_flight
        for _ in range(count):
            next(self.pipeline)
        return count

    def close(self) -> None:
        if self.pipeline is not None:
            self.pipeline.close()
            self.pipeline = None


def _micro_batches(source, count: int, timer):
    for _ in range(count):
        with timer.section("data"):
            batch = next(source)
        yield batch


def _peak_memory_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_gb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda max_memory_allocated"
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30, "process peak RSS (whole run)"


def summarize(step_times: list[float]) -> dict[str, float]:
    ordered = sorted(step_times)

    def quantile(q: float) -> float:
        position = q * (len(ordered) - 1)
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    return {
        "median": statistics.median(ordered),
        "mean": statistics.fmean(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "p10": quantile(0.1),
        "p90": quantile(0.9),
        "stdev": statistics.stdev(ordered) if len(ordered) > 1 else 0.0,
        "total": sum(ordered),
    }


class Measurement:
    """One row at one batch size: ``warmup()`` once, then ``step()`` N times (interleaved with other rows'
    steps by the driver, so that slow drifts of a shared machine hit every row alike), then ``result()``.

    Communication: with DDP on several processes each ``step()`` also times one step without the gradient
    all-reduce (``DDPEngine.sync_gradients = False``); the exposed communication is the difference of the mean
    step times, and it is taken out of "backward", where DDP waits for its all-reduce. One process has none (0).
    DeepSpeed's communication is not separated (None): it stays inside backward and optimizer.
    """

    def __init__(self, trainer, batch_size: int, data: str, seed: int = 0):
        self.trainer, self.batch_size, self.device = trainer, batch_size, trainer.device
        self.grad_accum = trainer.cfg.train.grad_accum
        if data == "synthetic":
            self.source = SyntheticBatches(batch_size, trainer.cfg.data.crop_hw, self.device, seed=seed)
        else:
            self.source = RealBatches(trainer, batch_size)
        self.timer = StageTimer(self.device)
        self.step_times: list[float] = []
        self.peak_gb = 0.0
        self.resident_gb: float | None = None
        self.parts = None
        self.warmup_steps = 0
        self.warmup_s = 0.0
        self.peak_kind = ""
        world = trainer.dist.world_size
        self.comm = "none" if world == 1 else "ddp" if getattr(trainer.engine, "name", "") == "ddp" else "unmeasured"
        self.nosync_times: list[float] = []
        self.drained = 0

    def close(self) -> None:
        """End the row's data pipeline (real data) and let go of its trainer."""
        close = getattr(self.source, "close", None)
        if close is not None:
            close()
        self.trainer = self.source = None

    def _step(self, timer) -> None:
        self.trainer.apply_backend_flags()  # rows interleave in one process: each step under its own row's flags
        self.parts = self.trainer.optimizer_step(_micro_batches(self.source, self.grad_accum, timer), timer)

    def warmup(self, steps: int) -> None:
        self.trainer.model.train()
        timer = StageTimer(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self._step(timer)
        if self.comm == "ddp" and steps:
            self._step_without_sync(timer)  # a compiled model traces the no-sync variant here, not in a timed step
        synchronize(self.device)
        if hasattr(self.source, "drain"):
            self.drained = self.source.drain()
        self.warmup_steps = steps
        self.warmup_s = time.perf_counter() - t0

    def _step_without_sync(self, timer) -> None:
        engine = self.trainer.engine
        engine.sync_gradients = False
        try:
            self._step(timer)
        finally:
            engine.sync_gradients = True

    def step(self) -> None:
        """One timed step, the device synchronised before and after it."""
        if self.device.type == "cuda":
            self.resident_gb = torch.cuda.memory_allocated(self.device) / 2**30  # all rows' models
        synchronize(self.device)
        _peak_memory_reset(self.device)
        t0 = time.perf_counter()
        self._step(self.timer)
        synchronize(self.device)
        self.step_times.append(time.perf_counter() - t0)
        peak_gb, self.peak_kind = _peak_memory_gb(self.device)
        self.peak_gb = max(self.peak_gb, peak_gb)
        if self.comm == "ddp":
            t0 = time.perf_counter()
            self._step_without_sync(StageTimer(self.device))
            synchronize(self.device)
            self.nosync_times.append(time.perf_counter() - t0)

    def result(self) -> dict[str, Any]:
        steps = len(self.step_times)
        totals = self.timer.totals()
        world = self.trainer.dist.world_size
        images_per_step = self.batch_size * self.grad_accum * world
        timing = summarize(self.step_times)
        stages: dict[str, float | None] = {name: totals.get(name, 0.0) / steps for name in STAGES}
        communication: float | None = 0.0 if self.comm == "none" else None
        if self.comm == "ddp" and self.nosync_times:
            communication = max(0.0, timing["mean"] - statistics.fmean(self.nosync_times))
            communication = min(communication, stages["backward"])
            stages["backward"] -= communication
        stages["communication"] = communication
        stages["other"] = max(0.0, timing["mean"] - sum(v for v in stages.values() if v is not None))
        return {
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "world_size": world,
            "images_per_step": images_per_step,
            "warmup": self.warmup_steps,
            "steps": steps,
            "step_time_s": timing,
            "step_times_s": list(self.step_times),
            "images_per_s": images_per_step * steps / timing["total"],
            "images_per_s_per_device": images_per_step * steps / timing["total"] / world,
            "stage_s_per_step": stages,
            "peak_memory_gb": self.peak_gb,
            "peak_memory_kind": self.peak_kind,
            "resident_before_gb": self.resident_gb,
            "loss": float(self.parts["loss"].detach().float()) if self.parts is not None else None,
            "data_backend": getattr(self.source, "backend", "synthetic"),
            "data_drained_before_timing": self.drained,
            "communication": {"none": "one process: none", "unmeasured": "not separated (DeepSpeed): inside "
                              "backward and optimizer", "ddp": "exposed gradient all-reduce: mean step minus mean "
                              "step without it (DDP no_sync), interleaved"}[self.comm],
            "step_times_without_sync_s": list(self.nosync_times),
        }


def measure(trainer, batch_size: int, warmup: int, steps: int, data: str, seed: int = 0) -> dict[str, Any]:
    """One row alone: ``warmup`` + ``steps`` optimizer steps; timings, breakdown and memory of the timed steps."""
    measurement = Measurement(trainer, batch_size, data, seed)
    try:
        measurement.warmup(warmup)
        for _ in range(steps):
            measurement.step()
        return measurement.result()
    finally:
        measurement.close()


def release(device: torch.device, compiled: bool = True) -> None:
    """Free what dropped rows left behind (the caller drops its references first) and, with ``compiled``, the
    compiled graphs. A row that fails while others are warmed up must keep theirs (``compiled=False``): a reset
    there made the compiled rows recompile inside their timed steps."""
    gc.collect()
    if compiled:
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
