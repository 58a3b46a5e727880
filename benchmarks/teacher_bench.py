"""Teacher forward throughput: images/s and achieved TFLOP/s, each fast-path switch on/off side by side.

    python benchmarks/teacher_bench.py                     # --preset cpu-small (this machine: no GPU)
    python benchmarks/teacher_bench.py --device cuda       # --preset gpu-full: adm256 b64 @256, sd15 b16 @512, bf16

Rows (per architecture): `plain` is the stock PyTorch way (fp32, NCHW, whole UNet, no_grad, eager); `fast-eager`
is every default switch except compile (bf16 on GPU, channels_last on GPU, early exit, inference mode); the `-x`
rows turn one switch of fast-eager off, the `+x` rows add one. FLOPs come from torch.utils.flop_counter on the
meta device (per image, for the row's early-exit setting), TFLOP/s = FLOPs / median time per batch, and `%peak`
compares it with a large matmul measured in the same run (bf16 on GPU, fp32 on CPU).

The GPU run keeps to a time budget (--budget-s, default 75 s after imports incl. torch.compile warm-up):
rows are ordered by value
and a row whose estimated cost does not fit is reported as skipped. Each finished row is appended to
benchmarks/results/teacher_bench.jsonl at once; the table goes to teacher_bench.md at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import signal
import socket
import statistics
import sys
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dtfast._provenance import git_commit
from dtfast.teachers import DiffusionTeacher, LatentDiffusionTeacher, TeacherOptions, build_teacher
from dtfast.teachers.archs import ADM_SCHEDULER, LATENT_ARCHS, SD_SCHEDULER, pixel_arch
from dtfast.teachers.build import instantiate, load_scheduler

RESULTS = os.path.join(ROOT, "benchmarks", "results")
STRIDES = {"adm256": (4, 8, 16, 32), "tiny": (4, 8, 16, 32), "sd15": (8, 16, 32, 64), "tiny-sd": (8, 16, 32, 64)}

PRESETS = {
    # the same structures with tiny widths (ADM-256 and SD-1.5 themselves take minutes per batch on 2 CPU cores)
    "cpu-small": {"device": "cpu", "runs": {"tiny": (128, 4), "tiny-sd": (256, 2)}, "compile": False, "budget": 900.0},
    # the usual resolutions: ADM-256 at 256x256, SD-1.5 at 512x512
    "gpu-full": {"device": "cuda", "runs": {"adm256": (256, 64), "sd15": (512, 16)}, "compile": True, "budget": 75.0},
}


@dataclasses.dataclass
class Row:
    arch: str
    name: str
    dtype: torch.dtype
    options: dict
    estimate_s: float  # rough cost on the GPU (warm-up + timing), for the budget


def rows_for(arch: str, device: str, with_compile: bool) -> list[Row]:
    """Rows in order of value (the budget drops the tail)."""
    cuda = device == "cuda"
    fast_dtype = torch.bfloat16 if cuda else torch.float32
    fast = {"early_exit": True, "channels_last": cuda, "inference_mode": True, "compile": False}
    rows = [
        Row(arch, "fast-eager", fast_dtype, fast, 4),
        Row(arch, "-early_exit", fast_dtype, {**fast, "early_exit": False}, 5),
    ]
    if with_compile:
        rows.append(Row(arch, "+compile", fast_dtype, {**fast, "compile": True}, 45))
    rows.append(
        Row(
            arch,
            "plain",
            torch.float32,
            {**fast, "early_exit": False, "channels_last": False, "inference_mode": False},
            10,
        )
    )
    rows.append(
        Row(arch, "-channels_last" if cuda else "+channels_last", fast_dtype, {**fast, "channels_last": not cuda}, 4)
    )
    if cuda:
        rows.append(Row(arch, "-bf16", torch.float32, fast, 8))
        rows.append(Row(arch, "+cuda_graph", fast_dtype, {**fast, "cuda_graph": True}, 5))
    rows.append(Row(arch, "-inference_mode", fast_dtype, {**fast, "inference_mode": False}, 4))
    if with_compile:
        rows.append(Row(arch, "+compile+cuda_graph", fast_dtype, {**fast, "compile": True, "cuda_graph": True}, 40))
        # autotuned kernels (teacher.compile_mode=max-autotune-no-cudagraphs): minutes of compiling, so last
        rows.append(Row(arch, "+compile(max-autotune)", fast_dtype,
                        {**fast, "compile": True, "compile_mode": "max-autotune-no-cudagraphs"}, 300))
    return rows


class Components:
    """The models of one architecture, built once; every row wraps them in a teacher with its own switches."""

    def __init__(self, arch: str, device: torch.device):
        self.arch = arch
        if arch in LATENT_ARCHS:
            from diffusers import AutoencoderKL, UNet2DConditionModel

            spec = LATENT_ARCHS[arch]
            self.vae = instantiate(AutoencoderKL, spec["vae"], device, torch.float32, 0)
            self.unet = instantiate(UNet2DConditionModel, spec["unet"], device, torch.float32, 1)
            shape = (1, spec["text"]["max_position_embeddings"], spec["unet"]["cross_attention_dim"])
            self.text = torch.randn(shape, generator=torch.Generator().manual_seed(2))
            self.scheduler = load_scheduler(None, SD_SCHEDULER)
        else:
            from diffusers import UNet2DModel

            self.vae = None
            self.unet = instantiate(UNet2DModel, pixel_arch(arch), device, torch.float32, 0)
            self.scheduler = load_scheduler(None, ADM_SCHEDULER)

    def teacher(self, dtype: torch.dtype, options: dict) -> nn.Module:
        opts = TeacherOptions(**options)
        for module in (self.unet, self.vae):
            if module is not None:
                nn.Module.to(module, dtype=dtype)
        if self.vae is not None:
            text = self.text.to(dtype)
            return LatentDiffusionTeacher(
                self.vae, self.unet, self.scheduler, text, 150, STRIDES[self.arch], True, opts
            )
        return DiffusionTeacher(self.unet, self.scheduler, 150, STRIDES[self.arch], True, opts)


ROW_ORDER = [
    "plain",
    "fast-eager",
    "-early_exit",
    "-channels_last",
    "+channels_last",
    "-bf16",
    "-inference_mode",
    "+cuda_graph",
    "+compile",
    "+compile+cuda_graph",
    "+compile(max-autotune)",
]
CORE_ROWS = ("fast-eager", "-early_exit", "plain")
VALUE_ORDER = [
    "fast-eager",
    "-early_exit",
    "plain",
    "+compile",
    "-channels_last",
    "+channels_last",
    "-bf16",
    "+cuda_graph",
    "-inference_mode",
    "+compile+cuda_graph",
    "+compile(max-autotune)",
]


def value_order(row: Row, archs: list[str]) -> tuple[int, int, int]:
    """First arch's core rows and +compile (the throughput target), other archs' core rows, then the rest."""
    arch_index = archs.index(row.arch)
    if arch_index == 0 and (row.name in CORE_ROWS or row.name == "+compile"):
        tier = 0
    elif row.name in CORE_ROWS:
        tier = 1
    else:
        tier = 2
    return tier, arch_index, VALUE_ORDER.index(row.name)


class Setup:
    """One architecture's models, input batch and FLOP counts, built on first use."""

    def __init__(self, arch: str, device: torch.device, size: int, batch: int):
        self.size, self.batch = size, batch
        self.components = Components(arch, device)
        self.flops = {ee: flops_per_image(arch, size, ee) for ee in (True, False)}
        self.images = torch.rand(batch, 3, size, size, device=device) * 2 - 1


def run_row(row: Row, setup: Setup, record: dict, warmup: int, min_iters: int, target_s: float, peak: float,
            profile: bool = False) -> dict:
    """Time one row into `record` (status "ok" or "failed: ..."); with `profile`, also where its time goes."""
    teacher = None
    try:
        teacher = setup.components.teacher(row.dtype, row.options)
        timing = time_teacher(teacher, setup.images, warmup, min_iters, target_s)
        if profile:
            record["profile"] = profile_teacher(teacher, setup.images)
            print(format_profile(f"{row.arch} {row.name}", record["profile"]))
    except Exception as error:  # noqa: BLE001 - one broken row must not hide the others
        record["status"] = f"failed: {type(error).__name__}: {str(error)[:160]}"
        print(f"{row.arch} {row.name}: {record['status']}")
        return record
    finally:
        del teacher  # frees compiled code and CUDA-graph pools before the next row
        torch._dynamo.reset()
        if setup.images.is_cuda:
            torch.cuda.empty_cache()
    per_image = setup.flops[row.options["early_exit"]]
    record.update(
        status="ok",
        images_per_s=setup.batch / timing["batch_s"],
        tflops=per_image * setup.batch / timing["batch_s"] / 1e12,
        gflop_per_image=per_image / 1e9,
        **timing,
    )
    print(
        f"{row.arch:7s} {row.name:20s} {record['images_per_s']:9.2f} img/s {record['tflops']:8.3f} TFLOP/s "
        f"({100 * record['tflops'] / peak:.1f}% of matmul) first call {timing['first_call_s']:.1f}s"
    )
    return record


def flops_per_image(arch: str, size: int, early_exit: bool) -> int:
    teacher = build_teacher(arch, strides=STRIDES[arch], device="meta", early_exit=early_exit)
    with FlopCounterMode(display=False) as counter:
        teacher(torch.zeros(1, 3, size, size, device="meta"))
    return counter.get_total_flops()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device) -> tuple[float, str]:
    """Achieved TFLOP/s of a large square matmul (bf16 on CUDA, fp32 on CPU)."""
    n, dtype, reps = (8192, torch.bfloat16, 20) if device.type == "cuda" else (1024, torch.float32, 5)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12, f"{n}^3 {str(dtype).replace('torch.', '')}"


def time_teacher(teacher: nn.Module, images: torch.Tensor, warmup: int, min_iters: int, target_s: float) -> dict:
    """Wall time of the first call (incl. compile/capture), then >= min_iters timed batches (and >= target_s).

    `batch_s` is the median on CUDA and the minimum on CPU, where the shared 2-core machine's other load only ever
    adds time (best-of-N is the usual estimate there).
    """
    device = images.device
    start = time.perf_counter()
    teacher(images)
    sync(device)
    first = time.perf_counter() - start
    for _ in range(warmup):
        teacher(images)
    sync(device)
    times = []
    while len(times) < min_iters or (sum(times) < target_s and len(times) < 50):
        start = time.perf_counter()
        teacher(images)
        sync(device)
        times.append(time.perf_counter() - start)
    batch_s = statistics.median(times) if device.type == "cuda" else min(times)
    return {"first_call_s": first, "batch_s": batch_s, "median_s": statistics.median(times), "iters": len(times)}


# Where a teacher forward's device time goes, by kernel (CUDA) or operator (CPU) name. First match wins; names are
# lower-cased. cuDNN/CUTLASS convolutions are "*fprop*"/"*implicit_gemm*"/"*conv*"; SDPA is flash/"fmha"/efficient.
KERNEL_CATEGORIES = [
    # inductor's templates (max-autotune) are convolutions / matmuls written in Triton: before "fused (triton)"
    ("conv", ("triton_tem_fused_convolution", "triton_tem_fused__convolution")),
    ("matmul", ("triton_tem_fused_mm", "triton_tem_fused_addmm", "triton_tem_fused_bmm")),
    ("fused (triton)", ("triton",)),  # inductor's kernels are named after the ops they fuse: match them first
    ("layout", ("nchwtonhwc", "nhwctonchw", "transpose", "copy", "memcpy", "memset", "contiguous", "catarray",
                "aten::cat", "cat_batched")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
    ("conv", ("conv", "fprop", "implicit_gemm", "winograd", "cudnn", "nhwckrsc")),
    # cuBLAS's Hopper GEMMs are named nvjet_*; wgmma/sm90_xmma are CUTLASS-style names
    ("matmul", ("gemm", "matmul", "addmm", "bmm", "aten::mm", "linear", "cutlass", "xmma", "nvjet", "wgmma")),
    ("norm", ("group_norm", "groupnorm", "layer_norm", "batch_norm", "rowwisemoments", "computefusedparams",
              "native_group_norm")),
    ("elementwise", ("silu", "add", "mul", "elementwise", "vectorized", "unrolled", "interpolate", "upsample",
                     "avg_pool", "pool")),
]


def kernel_category(name: str) -> str:
    lower = name.lower()
    for category, needles in KERNEL_CATEGORIES:
        if any(n in lower for n in needles):
            return category
    return "other"


def profile_teacher(teacher: nn.Module, images: torch.Tensor, iters: int = 2, top: int = 12) -> dict:
    """torch.profiler over `iters` calls of an already warmed-up teacher: device time per category and the top
    kernels (CUDA: kernel self time; CPU: operator self time), and on CUDA how busy the GPU was over its span."""
    from torch.profiler import ProfilerActivity, profile

    cuda = images.is_cuda
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(images.device)
    with profile(activities=activities) as prof:
        for _ in range(iters):
            teacher(images)
        sync(images.device)
    kernels: dict[str, list] = {}
    spans = []
    if cuda:
        for evt in prof.events():
            if getattr(evt, "device_type", None) == torch.autograd.DeviceType.CUDA:
                entry = kernels.setdefault(evt.name, [0, 0.0])
                entry[0] += 1
                entry[1] += evt.time_range.elapsed_us()
                spans.append((evt.time_range.start, evt.time_range.end))
    else:
        for avg in prof.key_averages():
            if avg.self_cpu_time_total > 0 and avg.key.startswith("aten::"):
                kernels[avg.key] = [avg.count, avg.self_cpu_time_total]
    busy = sum(t for _, t in kernels.values())
    categories: dict[str, float] = {}
    for name, (_, t) in kernels.items():
        categories[kernel_category(name)] = categories.get(kernel_category(name), 0.0) + t
    report = {
        "iters": iters,
        "busy_ms_per_iter": busy / iters / 1e3,
        "categories_ms_per_iter": {c: t / iters / 1e3 for c, t in sorted(categories.items(), key=lambda kv: -kv[1])},
        "top": [{"name": name[:120], "category": kernel_category(name), "calls_per_iter": n / iters,
                 "ms_per_iter": t / iters / 1e3}
                for name, (n, t) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]],
    }
    if spans:
        span = max(e for _, e in spans) - min(b for b, _ in spans)
        report["span_ms_per_iter"] = span / iters / 1e3
        report["gpu_idle_fraction"] = max(0.0, 1.0 - busy / span) if span else None
    return report


def format_profile(row: str, report: dict) -> str:
    busy = report["busy_ms_per_iter"] or 1e-9
    parts = ", ".join(f"{c} {t:.2f} ms ({100 * t / busy:.0f}%)" for c, t in report["categories_ms_per_iter"].items())
    lines = [f"profile {row}: busy {report['busy_ms_per_iter']:.2f} ms/iter"
             + (f", GPU idle {100 * report['gpu_idle_fraction']:.1f}% of its span"
                if report.get("gpu_idle_fraction") is not None else "") + f": {parts}"]
    lines += [f"    {k['ms_per_iter']:8.3f} ms  x{k['calls_per_iter']:<5g} {k['category']:<14s} {k['name']}"
              for k in report["top"]]
    return "\n".join(lines)


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu} x{os.cpu_count()} ({socket.gethostname()})"


def format_table(rows: list[dict], peak: float) -> str:
    lines = [
        "| arch | row | batch x res | dtype | img/s | TFLOP/s | %peak | GFLOP/img | first call s | speed vs plain |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(
                f"| {r['arch']} | {r['row']} | {r['batch']}x{r['size']} | {r['dtype']} | {r['status']} | | | | | |"
            )
            continue
        speed = f"{r['speedup_vs_plain']:.2f}x" if r.get("speedup_vs_plain") else "-"
        lines.append(
            f"| {r['arch']} | {r['row']} | {r['batch']}x{r['size']} | {r['dtype']} | {r['images_per_s']:.2f} | "
            f"{r['tflops']:.3f} | {100 * r['tflops'] / peak:.1f}% | {r['gflop_per_image']:.1f} | "
            f"{r['first_call_s']:.1f} | {speed} |"
        )
    return "\n".join(lines)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: the preset's device")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: by --device")
    parser.add_argument(
        "--archs", default="", help="comma-separated (default: the preset's): adm256, sd15, tiny, tiny-sd"
    )
    parser.add_argument("--batch", type=int, default=None, help="override the preset's batch size")
    parser.add_argument("--size", type=int, default=None, help="override the preset's resolution")
    parser.add_argument("--rows", default="", help="comma-separated row names to run (default: all)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="add compiled rows")
    parser.add_argument("--budget-s", type=float, default=None, help="wall-clock budget (default: preset's)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--min-iters", type=int, default=None, help="timed batches per row (GPU 3, CPU 2)")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to benchmarks/results")
    parser.add_argument("--profile", action="store_true",
                        help="after timing each row, torch.profiler over 2 batches: device time by category (conv, "
                             "attention, matmul, fused Triton, norm, elementwise, layout) and the top kernels; "
                             "recorded in the row's JSON")
    args = parser.parse_args(argv)

    preset_name = args.preset or ("gpu-full" if args.device == "cuda" else "cpu-small")
    preset = PRESETS[preset_name]
    device = torch.device(args.device or preset["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    budget = args.budget_s if args.budget_s is not None else preset["budget"]
    with_compile = preset["compile"] if args.compile is None else args.compile
    min_iters = args.min_iters or 3
    target_s = 1.0 if device.type == "cuda" else 4.0
    only = {r for r in args.rows.split(",") if r}
    started = time.perf_counter()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convolutions
    signal.signal(signal.SIGTERM, _interrupt)  # `timeout` stops us: still record the rows that finished

    peak, peak_what = matmul_peak(device)
    meta = {
        "machine": machine_name(device),
        "commit": git_commit(),
        "preset": preset_name,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),  # noqa: UP017 (3.10)
        "command": "python benchmarks/teacher_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "matmul_peak_tflops": round(peak, 4),
        "matmul": peak_what,
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }
    print(f"teacher_bench {preset_name} on {meta['machine']}: matmul peak {peak:.3f} TFLOP/s ({peak_what})")
    exact = {ee: flops_per_image("adm256", 256, ee) / 1e12 for ee in (True, False)}
    meta["adm256_256_tflop_per_image"] = {"early_exit": round(exact[True], 4), "full": round(exact[False], 4)}
    print(
        f"adm256 @256 (FlopCounterMode, meta): {exact[True]:.3f} TFLOP/img with early exit, {exact[False]:.3f} full "
        f"({exact[False] / exact[True]:.2f}x)"
    )
    archs = [a for a in args.archs.split(",") if a] or list(preset["runs"])
    rows = [row for arch in archs for row in rows_for(arch, device.type, with_compile)]
    unknown = sorted(only - {row.name for row in rows})
    if unknown:
        parser.error(f"--rows: no row(s) {unknown} for {archs} on {device.type} (compile rows: --compile); the rows "
                     f"are {sorted({row.name for row in rows})}")
    rows = [row for row in rows if not only or row.name in only]
    rows.sort(key=lambda row: value_order(row, archs))  # stable: the budget drops the least valuable rows
    setups: dict[str, Setup] = {}
    results: list[dict] = []
    try:
        for row in rows:
            if row.arch not in setups:
                size, batch = preset["runs"].get(row.arch, PRESETS["gpu-full"]["runs"].get(row.arch, (128, 2)))
                setups[row.arch] = Setup(row.arch, device, args.size or size, args.batch or batch)
            setup = setups[row.arch]
            record = {
                **meta,
                "arch": row.arch,
                "row": row.name,
                "batch": setup.batch,
                "size": setup.size,
                "dtype": str(row.dtype).replace("torch.", ""),
                "options": row.options,
            }
            left = budget - (time.perf_counter() - started)
            if row.estimate_s > left:
                record["status"] = f"skipped (budget: {left:.0f}s left)"
                results.append(record)
                continue
            results.append(run_row(row, setup, record, args.warmup, min_iters, target_s, peak, args.profile))
            if not args.no_record and record["status"] == "ok":
                append_jsonl(record)
    except KeyboardInterrupt:
        print("teacher_bench: interrupted, recording what finished")
    plain = {r["arch"]: r["images_per_s"] for r in results if r["row"] == "plain" and r["status"] == "ok"}
    for record in results:
        if record["status"] == "ok" and record["arch"] in plain:
            record["speedup_vs_plain"] = record["images_per_s"] / plain[record["arch"]]
    results.sort(key=lambda r: (archs.index(r["arch"]), ROW_ORDER.index(r["row"])))
    table = format_table(results, peak)
    print(table)
    print(f"total {time.perf_counter() - started:.0f}s")
    if not args.no_record:
        append_markdown(meta, table)
    return 0


def append_jsonl(record: dict) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "teacher_bench.jsonl"), "a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")


def append_markdown(meta: dict, table: str) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "teacher_bench.md"), "a") as fh:
        fh.write(
            f"\n## {meta['date']} {meta['preset']} on {meta['machine']}\n\ncommit {meta['commit']}, torch "
            f"{meta['torch']}, matmul peak {meta['matmul_peak_tflops']} TFLOP/s ({meta['matmul']}); "
            f"adm256@256 TFLOP/img {meta['adm256_256_tflop_per_image']}; `{meta['command']}`\n\n{table}\n"
        )


if __name__ == "__main__":
    sys.exit(main())
