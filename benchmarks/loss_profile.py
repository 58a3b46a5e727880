"""Why is the Triton loss's forward+backward slower than its forward plus its backward? A CUDA-only diagnosis.

Issue #3: on an H100 (bf16, batch 64, ADM-256 levels) do_bench gave forward 0.425 ms, backward 0.426 ms but
forward+backward 1.328 ms. This runs the Triton fwd+bwd (the eager ``dreamteacher_loss`` path, as loss_bench's
``full()``, and the bare kernel functions without autograd) and reports, in one go:

  (a) synchronising calls: 3 iterations under ``torch.cuda.set_sync_debug_mode("warn")``, each warning with the Python
      line that caused it (pinned allocations are not flagged by it: see the API counts in (c));
  (b) per iteration, N iterations back to back: host issue time (CPU wall time until the last launch returned),
      wall time (until the GPU finished) and GPU time (CUDA events). issue ~ wall and GPU < wall: host-bound;
      a sync inside an iteration shows as issue ~ wall even with little host work;
  (c) torch.profiler over a few iterations: CUDA time per kernel, GPU busy time vs the span of the GPU work (idle
      gaps = the GPU waiting on the host), CPU-side CUDA API calls (launches, cudaHostAlloc, cudaMalloc/cudaFree,
      synchronisations, memcpy) with counts and host time;
  (d) counters per iteration of each variant: the plan cache (dtfast/kernels/_loss_meta.py: plan hits/builds, metadata
      tensors made), the caching allocator (device mallocs/frees, retries, syncs of all streams) and, where torch
      has them, the pinned host allocator's allocations.
A variant with the plan/metadata caches cleared before the forward and before the backward reproduces the pre-cache
host path (plan built and metadata copied through pinned memory by every forward and every backward): its difference
from the cached variant is what the caches bought on this GPU.

    python benchmarks/loss_profile.py                # ADM-256 levels, bf16, batch 64
    python benchmarks/loss_bench.py --device cuda --profile   # the same after loss_bench's timings
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dtfast.ops import _backends, dreamteacher_loss

WHITEN = {"channel": 0, "sample": 1}
AT_MODE = {"paper": 0, "code": 1}
API_PREFIXES = ("cuda", "cu")  # runtime (cudaLaunchKernel, cudaHostAlloc, ...) and driver (cuLaunchKernelEx, ...)
MEMORY_KEYS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")


def _variants(student, teacher, whiten: str, at_mode: str):
    kern = _backends.triton_kernels()
    wh, am = WHITEN[whiten], AT_MODE[at_mode]
    ones = torch.ones(len(student), device=student[0].device)
    opts = dict(whiten=whiten, at_mode=at_mode, backend="triton", check_finite=False)

    def clear():
        for s in student:
            s.grad = None

    def eager_full():  # loss_bench's full(), grads cleared as do_bench's grad_to_none does
        clear()
        dreamteacher_loss(student, teacher, **opts).backward()

    def eager_fwd():
        return dreamteacher_loss(student, teacher, **opts)

    meta = _backends.kernel_module("_loss_meta")

    def eager_full_uncached():  # as before the plan cache: plan, rows and metadata copy built by fwd and by bwd
        meta.clear_caches()
        clear()
        loss = dreamteacher_loss(student, teacher, **opts)
        loss.register_hook(lambda grad: meta.clear_caches())  # runs as the backward starts
        loss.backward()

    def kernels_full():  # the bare kernel functions: no validation, dispatch or autograd
        _, _, saved = kern.dreamteacher_loss_forward(student, teacher, wh, am)
        kern.dreamteacher_loss_backward(ones, ones, student, teacher, saved, wh, am, flat_grads=True)

    def kernels_fwd():
        return kern.dreamteacher_loss_forward(student, teacher, wh, am)

    return {"eager fwd+bwd": eager_full, "eager fwd": eager_fwd, "kernels fwd+bwd": kernels_full,
            "kernels fwd": kernels_fwd, "eager fwd+bwd, caches cleared": eager_full_uncached}


def _sync_warnings(fn, iters: int = 3) -> list[str]:
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(iters):
                fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    found = collections.Counter(f"{str(w.message).splitlines()[0][:100]} at {w.filename}:{w.lineno}" for w in caught)
    return [f"{n}x {text}" for text, n in found.items()]


def _issue_times(fn, iters: int) -> dict[str, float]:
    """Microseconds per iteration: host issue time, wall time, GPU time (events around the whole loop)."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    for _ in range(iters):
        fn()
    t1 = time.perf_counter()
    end.record()
    end.synchronize()
    t2 = time.perf_counter()
    return {"host_issue_us": (t1 - t0) / iters * 1e6, "wall_us": (t2 - t0) / iters * 1e6,
            "gpu_us": start.elapsed_time(end) / iters * 1e3}


def _is_device_event(evt) -> bool:
    return getattr(evt, "device_type", None) == torch.autograd.DeviceType.CUDA


def _profile(fn, iters: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernels = collections.defaultdict(lambda: [0, 0.0])
    api = collections.defaultdict(lambda: [0, 0.0])
    spans = []
    for evt in prof.events():
        dur = evt.time_range.elapsed_us()
        if _is_device_event(evt):
            kernels[evt.name][0] += 1
            kernels[evt.name][1] += dur
            spans.append((evt.time_range.start, evt.time_range.end))
        elif evt.name.startswith(API_PREFIXES):
            api[evt.name][0] += 1
            api[evt.name][1] += dur
    busy = sum(k[1] for k in kernels.values())
    span = (max(e for _, e in spans) - min(s for s, _ in spans)) if spans else 0.0
    return {
        "iters": iters,
        "wall_us_per_iter_profiled": wall / iters * 1e6,
        "gpu_busy_us_per_iter": busy / iters,
        "gpu_span_us_per_iter": span / iters,
        "gpu_idle_fraction": 1.0 - busy / span if span else None,
        "kernels": {name: {"calls_per_iter": n / iters, "us_per_iter": t / iters}
                    for name, (n, t) in sorted(kernels.items(), key=lambda kv: -kv[1][1])},
        "cuda_api": {name: {"calls_per_iter": n / iters, "host_us_per_iter": t / iters}
                     for name, (n, t) in sorted(api.items(), key=lambda kv: -kv[1][1])},
    }


def _counters() -> dict:
    meta = _backends.kernel_module("_loss_meta")
    out = {f"plan.{k}": v for k, v in meta.STATS.items()}
    stats = torch.cuda.memory_stats()
    out.update({f"alloc.{k}": stats.get(k, 0) for k in MEMORY_KEYS})
    host_stats = getattr(torch.cuda, "host_memory_stats", None)
    if host_stats is not None:
        try:
            host = host_stats()
            out.update({f"pinned.{k}": v for k, v in host.items() if k.startswith("num_") and isinstance(v, int)})
        except Exception:  # noqa: BLE001 (older torch)
            pass
    return out


def profile_triton(student, teacher, whiten: str = "channel", at_mode: str = "paper", iters: int = 20,
                   profile_iters: int = 10) -> dict:
    """The diagnosis described in the module docstring, as a dict (also printed by ``format_report``)."""
    if student[0].device.type != "cuda":
        raise RuntimeError("loss_profile: needs CUDA tensors")
    fns = _variants(student, teacher, whiten, at_mode)
    for fn in fns.values():  # compile, autotune, fill the caches
        fn()
        fn()
    torch.cuda.synchronize()
    report = {"sync_warnings": _sync_warnings(fns["eager fwd+bwd"]),
              "sync_warnings_caches_cleared": _sync_warnings(fns["eager fwd+bwd, caches cleared"])}
    report["per_iter"], report["counters_per_iter"] = {}, {}
    for name, fn in fns.items():
        before = _counters()
        report["per_iter"][name] = _issue_times(fn, iters)
        after = _counters()
        report["counters_per_iter"][name] = {k: (v - before.get(k, 0)) / iters for k, v in after.items()
                                             if v != before.get(k, 0)}
    report["profile_eager_full"] = _profile(fns["eager fwd+bwd"], profile_iters)
    report["profile_kernels_full"] = _profile(fns["kernels fwd+bwd"], profile_iters)
    report["profile_eager_full_caches_cleared"] = _profile(fns["eager fwd+bwd, caches cleared"], profile_iters)
    return report


def format_report(report: dict) -> str:
    lines = ["### Triton fwd+bwd diagnosis (loss_profile)",
             "synchronising calls under set_sync_debug_mode('warn') (3 eager fwd+bwd): "
             + ("; ".join(report["sync_warnings"]) or "none"),
             "the same with the plan/metadata caches cleared every call (the pre-cache behaviour): "
             + ("; ".join(report["sync_warnings_caches_cleared"]) or "none")]
    lines += ["", "| per iteration, back to back | host issue us | wall us | GPU us |", "|---|---|---|---|"]
    for name, row in report["per_iter"].items():
        lines.append(f"| {name} | {row['host_issue_us']:.1f} | {row['wall_us']:.1f} | {row['gpu_us']:.1f} |")
    lines += [""] + [f"counters per iteration, {name}: " + (", ".join(f"{k} {v:.2f}" for k, v in c.items()) or "none")
                     for name, c in report["counters_per_iter"].items()]
    for key in ("profile_eager_full", "profile_kernels_full", "profile_eager_full_caches_cleared"):
        prof = report[key]
        idle = prof["gpu_idle_fraction"]
        lines += ["", f"torch.profiler, {key[8:]} x{prof['iters']}: GPU busy "
                      f"{prof['gpu_busy_us_per_iter']:.1f} us/iter, span {prof['gpu_span_us_per_iter']:.1f} "
                      f"us/iter, idle "
                      f"{'n/a' if idle is None else f'{100 * idle:.0f}%'}, wall (profiled) "
                      f"{prof['wall_us_per_iter_profiled']:.1f} us/iter",
                  "| CUDA kernel / copy | calls/iter | us/iter |", "|---|---|---|"]
        lines += [f"| {name[:90]} | {k['calls_per_iter']:.1f} | {k['us_per_iter']:.1f} |"
                  for name, k in list(prof["kernels"].items())[:12]]
        lines += ["| CUDA API (host) | calls/iter | host us/iter |"]
        lines += [f"| {name} | {a['calls_per_iter']:.1f} | {a['host_us_per_iter']:.1f} |"
                  for name, a in list(prof["cuda_api"].items())[:12]]
    lines += ["", "Reading it: host issue ~ wall with GPU < wall -> host-bound (or a sync: see the first line and the "
                  "API table: cudaStreamSynchronize/cudaDeviceSynchronize/cudaEventSynchronize/cudaHostAlloc/cudaFree);"
                  " a high GPU idle fraction says the same from the GPU side."]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--levels", default="512x64x64,512x32x32,1024x16x16,1024x8x8")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--whiten", default="channel", choices=list(WHITEN))
    p.add_argument("--at-mode", default="paper", choices=list(AT_MODE))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("loss_profile: needs a CUDA device")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    student, teacher = [], []
    for spec in args.levels.split(","):
        c, h, w = (int(v) for v in spec.split("x"))
        shape = (args.batch, c, h, w)
        student.append(torch.randn(shape, device="cuda", dtype=dtype).contiguous(memory_format=fmt).requires_grad_())
        teacher.append(torch.randn(shape, device="cuda", dtype=dtype).contiguous(memory_format=fmt))
    report = profile_triton(student, teacher, args.whiten, args.at_mode)
    print(format_report(report))
    if not args.no_record:
        record_profile(report, [tuple(s.shape) for s in student], args.dtype, "python benchmarks/loss_profile.py "
                       + " ".join(argv if argv is not None else sys.argv[1:]))
    return report


def record_profile(report: dict, shapes, dtype: str, command: str, results_dir: Path | None = None) -> None:
    out = Path(results_dir or ROOT / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    from dtfast._provenance import git_commit

    row = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "machine": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "commit": git_commit(), "torch": torch.__version__,
           "command": command,
           "levels": shapes, "dtype": dtype, "report": report}
    try:
        import triton

        row["triton"] = triton.__version__
    except ImportError:
        pass
    with open(out / "loss_profile.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
