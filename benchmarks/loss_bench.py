"""How fast is the DreamTeacher loss on each backend, and how close to the memory floor?

Times forward, backward and forward+backward of ``dtfast.ops.dreamteacher_loss`` for the PyTorch reference (eager),
``torch.compile`` of the reference, and every fused backend available here, in one run, at the ADM-256 teacher level
shapes (C x H x W: 512x64x64, 512x32x32, 1024x16x16, 1024x8x8). Also reports the bytes autograd keeps between
forward and backward ("saved", beyond the inputs), the CUDA peak memory, and the byte floor: the bytes that must
move (forward reads s and g; backward reads s and g and writes ds) divided by the copy bandwidth measured in the
same run, with each variant's achieved fraction of it (floor time / measured time).

    python benchmarks/loss_bench.py                     # CPU, float32, batch 8
    python benchmarks/loss_bench.py --device cuda       # GPU, bfloat16, batch 64, triton.testing.do_bench
    python benchmarks/loss_bench.py --quick --no-record # smoke run on tiny shapes
    python benchmarks/loss_bench.py --device cuda --profile  # + diagnosis of the Triton fwd+bwd (see profile_triton)

Appends one JSON row per run to benchmarks/results/loss_bench.jsonl and a table to loss_bench.md.
The Triton backend's host (Python) cost alone, on any machine: benchmarks/loss_host_overhead.py.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dtfast._provenance import git_commit
from dtfast.ops import (
    _backends,
    dreamteacher_loss,
)

ADM256_LEVELS = "512x64x64,512x32x32,1024x16x16,1024x8x8"
QUICK_LEVELS = "32x16x16,64x8x8,64x4x4"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", choices=list(DTYPES), help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--batch", type=int, help="default: 8 on CPU, 64 on CUDA (2 with --quick)")
    p.add_argument("--levels", default=None, help=f"comma-separated CxHxW (default {ADM256_LEVELS})")
    p.add_argument("--whiten", default="channel", choices=["channel", "sample"])
    p.add_argument("--at-mode", default="paper", choices=["paper", "code"])
    p.add_argument("--channels-last", action="store_true", help="student and teacher maps in channels_last")
    p.add_argument("--backends", default="all", help="comma list of torch,compile,triton,cpu,cuda (default: all here)")
    p.add_argument("--triton-on-cpu", action="store_true", help="also run Triton under TRITON_INTERPRET (very slow)")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions on CPU (median; default 5, quick 3)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions: a smoke run")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/results")
    p.add_argument("--profile", action="store_true",
                   help="CUDA, after the timings: diagnose the Triton fwd+bwd (synchronising calls, host issue\n"
                        "time vs GPU time per iteration, torch.profiler kernel/API summary, allocator and plan-cache\n"
                        "counters); printed and appended to benchmarks/results/loss_profile.jsonl")
    p.add_argument("--cuda-bwd-rounds", default="",
                   help="CUDA C++ backend only: extra rows with the backward's unrolled row groups per thread\n"
                        "set to each value (comma list of 1..64, e.g. 1,4,8,16, via DTFAST_CUDA_BWD_ROUNDS); the\n"
                        "plain row uses DTFAST_CUDA_BWD_ROUNDS if set, else the built-in 2")
    p.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    try:
        args.cuda_bwd_rounds = [int(v) for v in args.cuda_bwd_rounds.split(",") if v.strip()]
    except ValueError:
        p.error(f"--cuda-bwd-rounds {args.cuda_bwd_rounds!r}: expected a comma list of integers in 1..64")
    if any(not 1 <= v <= 64 for v in args.cuda_bwd_rounds):
        p.error(f"--cuda-bwd-rounds {args.cuda_bwd_rounds}: each value must be in 1..64")
    args.dtype = DTYPES[args.dtype or ("fp32" if args.device == "cpu" else "bf16")]
    args.batch = args.batch or (2 if args.quick else (8 if args.device == "cpu" else 64))
    args.levels = args.levels or (QUICK_LEVELS if args.quick else ADM256_LEVELS)
    args.repeats = args.repeats or (3 if args.quick else 5)
    return args


def make_inputs(args):
    gen = torch.Generator(device="cpu").manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    student, teacher = [], []
    for spec in args.levels.split(","):
        c, h, w = (int(v) for v in spec.lower().split("x"))
        shape = (args.batch, c, h, w)
        s = torch.randn(shape, generator=gen).to(args.device, args.dtype).contiguous(memory_format=fmt)
        g = torch.randn(shape, generator=gen).to(args.device, args.dtype).contiguous(memory_format=fmt)
        student.append(s.requires_grad_())
        teacher.append(g)
    return student, teacher


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, repeats, grad_to_none=None):
    """Median milliseconds of fn(): triton.testing.do_bench on CUDA, perf_counter on CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=10, rep=50, grad_to_none=grad_to_none, return_mode="median")
    for _ in range(2):  # warm-up
        fn()
    times = []
    for _ in range(repeats):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device, nbytes, repeats) -> float:
    """Best measured device copy bandwidth in bytes/s (bytes read + bytes written per copy)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    if device == "cuda":
        from triton.testing import do_bench

        ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="min")
    else:
        dst.copy_(src)
        ms = float("inf")
        for _ in range(max(repeats, 5)):
            start = time.perf_counter()
            dst.copy_(src)
            ms = min(ms, (time.perf_counter() - start) * 1e3)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def saved_bytes(fn, inputs) -> int:
    """Bytes autograd keeps for backward beyond (storages of) the inputs."""
    input_storages = {t.untyped_storage().data_ptr() for t in inputs}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in input_storages:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


BACKEND_NAMES = ("torch", "compile", "triton", "cpu", "cuda")


def variants(args):
    """name -> loss closure; skipped variants map to the reason."""
    chosen = None if args.backends == "all" else {b.strip() for b in args.backends.split(",") if b.strip()}
    unknown = sorted((chosen or set()) - set(BACKEND_NAMES))
    if unknown:
        raise SystemExit(f"loss_bench: --backends: unknown {unknown}; choose from {','.join(BACKEND_NAMES)} or all")
    opts = dict(whiten=args.whiten, at_mode=args.at_mode, check_finite=False)
    out = {}

    def want(name):
        return chosen is None or name in chosen

    if want("torch"):
        out["torch (eager reference)"] = lambda s, g: dreamteacher_loss(s, g, backend="torch", **opts)
    if want("compile"):
        out["torch.compile(reference)"] = torch.compile(
            lambda s, g: dreamteacher_loss(s, g, backend="torch", **opts))
    if want("triton"):
        if not _backends.triton_available():
            out["triton"] = "Triton not importable"
        elif args.device == "cpu" and not (args.triton_on_cpu and _backends.triton_interpreting()):
            out["triton"] = "skipped on CPU tensors (--triton-on-cpu with TRITON_INTERPRET=1 to force)"
        else:
            out["triton"] = lambda s, g: dreamteacher_loss(s, g, backend="triton", **opts)
    ext = args.device
    if want(ext):
        if _backends.extension_has(ext):
            out[f"{ext} (dtfast._C)"] = lambda s, g: dreamteacher_loss(s, g, backend=ext, **opts)
            if ext == "cuda":
                for rounds in args.cuda_bwd_rounds:
                    out[f"cuda (dtfast._C), bwd rounds {rounds}"] = _with_bwd_rounds(
                        rounds, lambda s, g: dreamteacher_loss(s, g, backend="cuda", **opts))
        else:
            out[f"{ext} (dtfast._C)"] = "dtfast._C not built with this kernel"
    if args.cuda_bwd_rounds and not any(name.startswith("cuda (dtfast._C), bwd rounds") for name in out):
        out["cuda (dtfast._C), bwd rounds"] = ("--cuda-bwd-rounds needs --device cuda, the cuda backend among "
                                               "--backends, and dtfast._C built with CUDA")
    return out


def _with_bwd_rounds(rounds: int, fn):
    fn.bwd_rounds = rounds  # main() sets DTFAST_CUDA_BWD_ROUNDS around this row (forward and backward)
    return fn


@contextlib.contextmanager
def cuda_bwd_rounds(rounds: int | None):
    """DTFAST_CUDA_BWD_ROUNDS=rounds inside (the CUDA host code reads it at each backward launch); restored after."""
    if rounds is None:
        yield
        return
    before = os.environ.get("DTFAST_CUDA_BWD_ROUNDS")
    os.environ["DTFAST_CUDA_BWD_ROUNDS"] = str(rounds)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("DTFAST_CUDA_BWD_ROUNDS", None)
        else:
            os.environ["DTFAST_CUDA_BWD_ROUNDS"] = before


def bench_variant(fn, student, teacher, args, floor_ms):
    device = args.device
    inputs = student + teacher

    def forward():
        return fn(student, teacher)

    def full():
        forward().backward()

    full()  # compile / autotune / warm caches
    sync(device)
    fwd_ms = time_ms(forward, device, args.repeats)
    full_ms = time_ms(full, device, args.repeats, grad_to_none=student)
    try:
        loss = forward()
        bwd_ms = time_ms(lambda: loss.backward(retain_graph=True), device, args.repeats, grad_to_none=student)
    except RuntimeError:
        bwd_ms = max(full_ms - fwd_ms, 0.0)
    row = {"fwd_ms": fwd_ms, "bwd_ms": bwd_ms, "fwd_bwd_ms": full_ms,
           "saved_MB": saved_bytes(forward, inputs) / 2**20,
           "floor_fraction_fwd": floor_ms["fwd"] / max(fwd_ms, 1e-9),
           "floor_fraction_bwd": floor_ms["bwd"] / max(bwd_ms, 1e-9),
           "floor_fraction_fwd_bwd": floor_ms["fwd_bwd"] / max(full_ms, 1e-9)}
    if device == "cuda":
        for s in student:
            s.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        full()
        torch.cuda.synchronize()
        row["peak_MB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return row


def machine_name(device) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_table(results, floor_ms) -> str:
    lines = ["| variant | fwd ms | bwd ms | fwd+bwd ms | floor fraction (fwd+bwd) | saved MiB | peak MiB |",
             "|---|---|---|---|---|---|---|",
             f"| byte floor | {floor_ms['fwd']:.3f} | {floor_ms['bwd']:.3f} | {floor_ms['fwd_bwd']:.3f} | 1.00 | | |"]
    for name, row in results.items():
        if isinstance(row, str):
            lines.append(f"| {name} | {row} | | | | | |")
            continue
        peak = f"{row['peak_MB']:.1f}" if "peak_MB" in row else "n/a"
        lines.append(f"| {name} | {row['fwd_ms']:.3f} | {row['bwd_ms']:.3f} | {row['fwd_bwd_ms']:.3f} | "
                     f"{row['floor_fraction_fwd_bwd']:.2f} | {row['saved_MB']:.1f} | {peak} |")
    return "\n".join(lines)


def target_ratios(results) -> str:
    """The fwd+bwd ratios issue #3's targets are stated in: fused vs torch.compile of the reference, CUDA C++ vs
    Triton (one line each; rows that did not run are left out)."""
    timed = {name: row["fwd_bwd_ms"] for name, row in results.items() if isinstance(row, dict)}
    lines = []
    compiled = timed.get("torch.compile(reference)")
    for name, ms in timed.items():
        if compiled and name not in ("torch (eager reference)", "torch.compile(reference)"):
            lines.append(f"- {name}: {compiled / ms:.2f}x faster than torch.compile of the reference (fwd+bwd)")
    cuda = timed.get("cuda (dtfast._C)")
    if cuda and timed.get("triton"):
        lines.append(f"- CUDA C++ fwd+bwd / Triton fwd+bwd = {cuda / timed['triton']:.2f}")
    return "\n".join(lines)


def triton_autotune_choices() -> dict:
    """{"fwd"/"bwd": [chosen configuration per autotuning key]} of the Triton NCHW kernels in this process."""
    if not _backends.triton_available():
        return {}
    kern = _backends.triton_kernels()
    out = {}
    for phase, tuner in (("fwd", kern._fwd_main_nchw), ("bwd", kern._bwd_nchw)):
        chosen = sorted({str(config) for config in getattr(tuner, "cache", {}).values()})
        if chosen:
            out[phase] = chosen
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("loss_bench: --device cuda but CUDA is not available")
    student, teacher = make_inputs(args)
    elements = sum(s.numel() for s in student)
    esize = student[0].element_size()
    moved = {"fwd": 2 * elements * esize, "bwd": 3 * elements * esize, "fwd_bwd": 5 * elements * esize}
    copy_bytes = max(2 * elements * esize, 64 << 20)
    bandwidth = copy_bandwidth(args.device, copy_bytes, args.repeats)
    floor_ms = {k: v / bandwidth * 1e3 for k, v in moved.items()}
    results = {}
    for name, fn in variants(args).items():
        if isinstance(fn, str):
            results[name] = fn
            continue
        try:
            with cuda_bwd_rounds(getattr(fn, "bwd_rounds", None)):
                results[name] = bench_variant(fn, student, teacher, args, floor_ms)
        except Exception as exc:  # a backend failing must not hide the others' figures
            results[name] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        print(f"  {name}: {results[name]}", file=sys.stderr)
    table = format_table(results, floor_ms) + "\n\n" + target_ratios(results)
    tuned = triton_autotune_choices()
    if tuned:
        table += f"\n- Triton autotuner's choices (NCHW): {tuned}"
    shapes = [tuple(s.shape) for s in student]
    header = (f"DreamTeacher loss on {machine_name(args.device)} | {str(args.dtype).replace('torch.', '')} | "
              f"levels {shapes} | whiten={args.whiten} at_mode={args.at_mode} channels_last={args.channels_last} | "
              f"copy bandwidth {bandwidth / 1e9:.1f} GB/s | bytes moved fwd+bwd {moved['fwd_bwd'] / 1e9:.3f} GB "
              f"({moved['fwd_bwd'] / 2**20:.0f} MiB)")
    print(header)
    print(table)
    record = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "machine": machine_name(args.device), "device": args.device, "commit": git_commit(),
              "command": "python benchmarks/loss_bench.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
              "torch": torch.__version__, "dtype": str(args.dtype).replace("torch.", ""), "levels": shapes,
              "whiten": args.whiten, "at_mode": args.at_mode, "channels_last": args.channels_last,
              "copy_GBps": bandwidth / 1e9, "bytes_moved": moved, "floor_ms": floor_ms, "results": results,
              "triton_autotune": tuned}
    if not args.no_record:
        out = Path(args.results_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "loss_bench.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        with open(out / "loss_bench.md", "a") as f:
            f.write(f"\n### {record['date']} commit {record['commit']}\n`{record['command']}`\n\n{header}\n\n"
                    f"{table}\n")
    if args.profile:
        run_profile(student, teacher, args, record)
    return record


def run_profile(student, teacher, args, record) -> None:
    """--profile: the Triton fwd+bwd diagnosis of benchmarks/loss_profile.py on these maps (CUDA only), after the
    timings are recorded (a failure or timeout here loses only the diagnosis)."""
    if args.device != "cuda" or not isinstance(record["results"].get("triton"), dict):
        print(f"--profile: skipped (needs --device cuda and a Triton row; got {args.device}, "
              f"triton: {record['results'].get('triton', 'not run')})")
        return
    from benchmarks.loss_profile import format_report, profile_triton, record_profile

    sys.stdout.flush()
    try:
        report = profile_triton(student, teacher, args.whiten, args.at_mode)
    except Exception as exc:  # the timings above are already recorded
        print(f"--profile failed: {type(exc).__name__}: {exc}")
        return
    print(format_report(report))
    if not args.no_record:
        record_profile(report, record["levels"], record["dtype"], record["command"] + " (profile)",
                       Path(args.results_dir))


if __name__ == "__main__":
    main()
