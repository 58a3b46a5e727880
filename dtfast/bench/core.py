"""The benchmark driver: rows x batch sizes measured in ONE process, so every speed-up is a ratio from one run.

Order: batch sizes outer; at each batch size every row is built (once: its Trainer is kept for the next batch
size, so ``resident_before_gb`` includes the other rows' models on GPU) and warmed up, then the timed steps
run interleaved across the rows (row A step 1, row B step 1, ...), so that the slow drifts of a shared machine
hit every row alike. Results are written after every batch size, so a run stopped by a time limit keeps what it
measured; with ``bench.time_budget_s`` a row is skipped when the time it took at the previous batch size no
longer fits (a compiled row recompiles for each batch size), so the cheap rows still get measured, and a row's
build + warm-up (torch.compile happens there) is cut off when it would leave no time for the timed steps of the
rows already warmed up (one process only: an alarm on one rank would desynchronise the others). A row that
fails (out of memory, a backend that is not available) is recorded with its error and the others go on.
Under torchrun every rank runs the same rows; only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import threading
import time
from typing import Any

import torch

from dtfast._provenance import git_commit
from dtfast.bench import flops as flop_count
from dtfast.bench import report
from dtfast.bench.rows import Row, parse_row, split_overrides, sweep_rows
from dtfast.bench.runner import Measurement, build_trainer, release
from dtfast.data.transforms import size_text
from dtfast.train.config import ConfigError, load_config
from dtfast.train.distributed import broadcast_object, resolve_device


def _check_bench(cfg) -> None:
    if cfg.bench.steps <= 0:
        raise ConfigError(f"config key 'bench.steps' must be > 0, got {cfg.bench.steps}")
    if cfg.bench.warmup < 0:
        raise ConfigError(f"config key 'bench.warmup' must be >= 0, got {cfg.bench.warmup}")
    if any(int(b) < 2 for b in cfg.bench.batch_sizes):
        raise ConfigError(f"config key 'bench.batch_sizes' must hold sizes >= 2 (images per process: the regressor's "
                          f"pooling BatchNorm needs 2 to train), got {cfg.bench.batch_sizes}")


def _flops_for_row(flops: dict[str, Any], early_exit: bool) -> tuple[int | None, int | None]:
    """(executed FLOPs per image of this row, model FLOPs per image: early-exit teacher + student)."""
    teacher = flops.get("teacher_early_exit" if early_exit else "teacher_full")
    needed, student = flops.get("teacher_early_exit"), flops.get("student_train")
    executed = teacher + student if teacher is not None and student is not None else None
    model = needed + student if needed is not None and student is not None else None
    return executed, model


def _teacher_early_exit(trainer) -> bool:
    return bool(getattr(getattr(trainer.teacher, "options", None), "early_exit", True))


def run_benchmark(config_path: str | None, overrides: list[str], out: str | None = None,
                  argv: list[str] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    cfg = load_config(config_path, overrides)
    _check_bench(cfg)
    bench = cfg.bench
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    specs = list(bench.rows) or (sweep_rows(device.type, bench.data) if bench.sweep else ["config"])
    rows: list[Row] = [parse_row(str(spec), device.type) for spec in specs]
    batch_sizes = [int(b) for b in bench.batch_sizes] or [cfg.train.batch_size]
    out_dir = out or os.path.join(cfg.out, "bench")
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"bench.{ext}") for ext in ("json", "md", "png")}
    # every batch size is compiled for its own static shape, as a training run with a fixed batch would be
    torch._dynamo.config.automatic_dynamic_shapes = False
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    peak = ({"tflops": float(bench.peak_tflops), "source": "bench.peak_tflops"} if bench.peak_tflops > 0
            else flop_count.measure_peak_tflops(device))
    command = "python -m dtfast.bench " + " ".join((argv or [])[1:]) if argv else "run_benchmark(...)"
    result: dict[str, Any] = {
        "meta": {"machine": report.machine_info(device), "commit": git_commit(), "command": command,
                 "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                 "preset": os.path.splitext(os.path.basename(config_path))[0] if config_path else "defaults",
                 "config": config_path or "", "overrides": overrides, "data": bench.data,
                 "image_size": size_text(cfg.data.crop_hw), "warmup": bench.warmup, "steps": bench.steps, "peak": peak,
                 "rows": specs, "batch_sizes": batch_sizes},
        "flops": {},
        "rows": [],
    }
    print(f"[bench] {len(rows)} row(s) x {len(batch_sizes)} batch size(s) on {result['meta']['machine']['device_name']}"
          f"; peak {peak['tflops']:.2f} TFLOP/s ({peak['source']})", flush=True)
    trainers: dict[str, Any] = {}
    # per row: (warm-up seconds, compile included; timed-steps seconds; batch size) at the previous batch size
    estimates: dict[str, tuple[float, float, int]] = {}
    for batch_size in batch_sizes:
        active = []  # (entry, measurement, seconds of build + warm-up)
        pending = 0.0  # estimated seconds of the timed steps of the rows admitted at this batch size
        for row in rows:
            entry: dict[str, Any] = {"row": row.name, "batch_size": batch_size, "switches": row.switches,
                                     "overrides": row.overrides}
            result["rows"].append(entry)
            left = bench.time_budget_s - (time.perf_counter() - started) - pending
            warm_s, steps_s = _estimate(estimates.get(row.name), batch_size)
            skip = bool(bench.time_budget_s and left < warm_s + steps_s)
            if trainers:  # under torchrun rank 0 decides for all: ranks that disagreed would wait on each other
                any_trainer = next(iter(trainers.values()))
                skip = broadcast_object(skip, any_trainer.dist)
            if skip:
                entry.update(status="skipped", error=f"time budget: {left:.0f} s left, this row needs about "
                             f"{warm_s + steps_s:.0f} s (from the previous batch size)" if left > 0 else
                             f"time budget {bench.time_budget_s:.0f} s spent")
                continue
            pending += steps_s
            t_row = time.perf_counter()
            measurement = None  # this row's (a failure before it is built must not close the previous row's)
            try:
                with _warmup_deadline(_warmup_allowance(bench.time_budget_s, started, active, bench.steps)):
                    if row.name not in trainers:
                        config_items, options = split_overrides(row.overrides)
                        row_cfg = load_config(config_path, overrides + config_items)
                        trainers[row.name] = build_trainer(row_cfg, options)
                    if not result["flops"]:
                        result["flops"] = flop_count.count_flops(trainers[row.name], cfg.data.crop_hw)
                    measurement = Measurement(trainers[row.name], batch_size, bench.data, cfg.train.seed)
                    measurement.warmup(bench.warmup)
                active.append((entry, measurement, time.perf_counter() - t_row))
                print(f"[bench] {row.name} @ {batch_size}: built and warmed up in {active[-1][2]:.0f} s", flush=True)
            except Exception as error:  # noqa: BLE001 - one failing row must not lose the others
                _fail(entry, error, trainers)
            if entry.get("status") == "failed":  # outside the except block: its traceback no longer pins tensors
                if measurement is not None:
                    measurement.close()
                measurement = None
                release(device, compiled=False)
        # timed steps, interleaved across rows: a shared machine's slow drifts hit every row alike
        for _ in range(bench.steps):
            for item in list(active):
                try:
                    item[1].step()
                except Exception as error:  # noqa: BLE001
                    _fail(item[0], error, trainers)
                    active.remove(item)
                if item[0].get("status") == "failed":
                    item[1].close()  # its data pipeline ends, and the failed row's models can go
                    release(device, compiled=False)
        for entry, measurement, setup_s in active:
            entry.update(measurement.result())
            entry["setup_s"] = setup_s
            estimates[entry["row"]] = (measurement.warmup_s, entry["step_time_s"]["total"], batch_size)
            entry["early_exit"] = _teacher_early_exit(measurement.trainer)
            measurement.close()
            executed, model = _flops_for_row(result["flops"], entry["early_exit"])
            per_device = entry["images_per_s_per_device"]
            entry["flops_per_image"], entry["model_flops_per_image"] = executed, model
            entry["achieved_tflops"] = executed * per_device / 1e12 if executed else None
            entry["mfu"] = model * per_device / 1e12 / peak["tflops"] if model else None
            entry["status"] = "ok"
            print(f"[bench] {entry['row']} @ {batch_size}: {entry['images_per_s']:.1f} img/s, step "
                  f"{1e3 * entry['step_time_s']['median']:.1f} ms median", flush=True)
        active.clear()
        _speedups(result["rows"])
        if _is_main():
            report.write_json(result, paths["json"])
    trainers.clear()
    release(device)
    return _finish(result, paths, cfg.bench.results_dir) if _is_main() else result


class WarmupTimeout(TimeoutError):
    """A row's build + warm-up ran past the time the benchmark's budget left it."""


def _warmup_allowance(budget_s: float, started: float, active: list, steps: int) -> float | None:
    """Seconds a row may spend building and warming up: what the budget leaves after the timed steps of the rows
    already warmed up (each step estimated by its warm-up's mean step, an over-estimate) and a 5 s margin; None
    without a budget or under torchrun."""
    if not budget_s or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None
    reserved = sum(m.warmup_s / max(1, m.warmup_steps) * steps for _, m, _ in active)
    return budget_s - (time.perf_counter() - started) - reserved - 5.0


@contextlib.contextmanager
def _warmup_deadline(seconds: float | None):
    """Raise WarmupTimeout in the main thread after ``seconds`` (SIGALRM; a no-op elsewhere or without a limit).
    If something on the way (a compiler's error handling) swallows the exception, it is raised again at exit:
    a row that ran out of time is never reported as measured."""
    usable = (seconds is not None and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return
    if seconds <= 0:
        raise WarmupTimeout("time budget spent before this row could be built and warmed up")
    fired = []

    def on_alarm(signum, frame):
        fired.append(True)
        raise WarmupTimeout(f"build + warm-up ran past the {seconds:.0f} s the time budget left it")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if fired:
        raise WarmupTimeout(f"build + warm-up ran past the {seconds:.0f} s the time budget left it (the timeout "
                            "was caught on the way)")


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _estimate(previous: tuple[float, float, int] | None, batch_size: int) -> tuple[float, float]:
    """(warm-up, timed steps) seconds expected at ``batch_size`` from the previous batch size (time ~ batch; a
    compiled row's warm-up is mostly its recompilation, so scaling it up errs on the safe side)."""
    if previous is None:
        return 0.0, 0.0
    warm_s, steps_s, previous_batch = previous
    scale = max(1.0, batch_size / previous_batch)
    return warm_s * scale, steps_s * scale


def _fail(entry: dict[str, Any], error: Exception, trainers: dict[str, Any]) -> None:
    entry.update(status="failed", error=f"{type(error).__name__}: {str(error)[:500]}")
    print(f"[bench] {entry['row']} @ {entry['batch_size']} FAILED: {entry['error']}", flush=True)
    trainers.pop(entry["row"], None)


def _speedups(rows: list[dict[str, Any]]) -> None:
    baselines = {r["batch_size"]: r["images_per_s"] for r in rows if r["row"] == "baseline" and r.get("status") == "ok"}
    for r in rows:
        if r.get("status") == "ok" and r["batch_size"] in baselines:
            r["speedup_vs_baseline"] = r["images_per_s"] / baselines[r["batch_size"]]


def _finish(result: dict[str, Any], paths: dict[str, str], results_dir: str) -> dict[str, Any]:
    text = report.header(result) + "\n\n" + report.table(result)
    report.write_markdown(result, paths["md"])
    has_png = report.write_png(result, paths["png"])
    result["files"] = {"json": paths["json"], "md": paths["md"], "png": paths["png"] if has_png else None}
    result["files"]["recorded"] = report.record(result, results_dir, paths["png"] if has_png else None)
    report.write_json(result, paths["json"])
    print(text, flush=True)
    print(f"[bench] wrote {paths['json']}, {paths['md']}" + (f", {paths['png']}" if has_png else "")
          + (f"; recorded in {', '.join(result['files']['recorded'])}" if result["files"]["recorded"] else ""),
          flush=True)
    return result
