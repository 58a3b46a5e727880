"""Input-pipeline throughput: images/s of each data backend on a folder of ImageNet-sized JPEGs, one run.

Generates (unless --root is given) a folder of photo-like JPEGs of about 500x375 at quality 90, then times the
full ``InputPipeline`` of every backend (decode, resize, random crop, flip, both model views on the device)
at the same number of CPU threads (torch: DataLoader worker processes; DALI: pipeline threads; nvjpeg:
file-reading workers, decoding on the GPU). Prints a table and appends one JSON line per backend, with the
machine, commit and date, to benchmarks/results/data_bench.jsonl.

    python benchmarks/data_bench.py                    # CPU: torch vs DALI CPU (vs torchvision CPU decode)
    python benchmarks/data_bench.py --device cuda      # GPU machine: nvJPEG (and DALI mixed if installed)

``share_at_target`` = target rate / measured rate: the share of step time a synchronous pipeline would spend
producing data at the target training rate (400 images/s per H100). On CUDA, ``step_share`` is measured: a
simulated training step of batch/target-rate seconds (bf16 matmuls) with the pipeline's batches versus with
one synthetic batch; the pipeline prefetches on a side stream, so this is the share of step time lost to data
(the issue's target: <= 0.02).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dtfast._provenance import git_commit
from dtfast.data import ImageFolder, InputPipeline
from dtfast.data.dali import dali_available

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _write_jpeg(job: tuple[str, int, int, tuple[int, int]]) -> int:
    """One photo-like JPEG (smooth structure + texture + noise), W x H or (one in five) H x W, q90; returns its
    size."""
    from PIL import Image

    path, index, seed, (width, height) = job
    rng = np.random.default_rng([seed, index])
    width, height = (width, height) if rng.random() < 0.8 else (height, width)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) / 500
    channels = []
    for _ in range(3):
        field = sum(rng.uniform(20, 60) * np.sin(2 * np.pi * (rng.uniform(0.5, 12) * xx + rng.uniform(0.5, 12) * yy)
                                                 + rng.uniform(0, 6.3)) for _ in range(4))
        channels.append(128 + field)
    pixels = np.stack(channels, -1) + rng.normal(0, 14, (height, width, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
    return os.path.getsize(path)


def make_folder(root: str, num_images: int, num_classes: int = 8, seed: int = 0,
                shape: tuple[int, int] = (500, 375)) -> float:
    """``num_images`` JPEGs of ``shape`` (width, height) in ``num_classes`` class folders, written by all cores;
    returns the mean KiB."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = []
    for index in range(num_images):
        folder = os.path.join(root, f"class{index % num_classes:02d}")
        os.makedirs(folder, exist_ok=True)
        jobs.append((os.path.join(folder, f"{index:05d}.jpg"), index, seed, shape))
    with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        sizes = list(pool.map(_write_jpeg, jobs, chunksize=8))
    return float(np.mean(sizes)) / 1024


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu} ({os.cpu_count()} logical CPUs)"
    if device == "cuda":
        text += f", {torch.cuda.get_device_name()}"
    return text


def time_backend(dataset: ImageFolder, backend: str, args: argparse.Namespace, device: str) -> dict:
    pipeline = InputPipeline(dataset, args.batch_size, mean=MEAN, std=STD, device=device, backend=backend,
                             seed=0, num_workers=args.threads, num_threads=args.threads)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    start_build = time.perf_counter()
    for _ in range(args.warmup):
        next(pipeline)
    sync()
    first = time.perf_counter() - start_build
    start = time.perf_counter()
    steps = 0
    while steps < args.steps and time.perf_counter() - start < args.max_seconds:
        next(pipeline)
        steps += 1
    sync()
    elapsed = time.perf_counter() - start
    pipeline.close()
    rate = steps * args.batch_size / elapsed
    return {"backend": backend if device == "cpu" or backend != "dali" else "dali-mixed", "device": device,
            "threads": args.threads, "batch_size": args.batch_size, "image_size": args.image_size,
            **({"image_width": args.image_width} if args.image_width else {}),
            "steps": steps, "images_per_s": round(rate, 1), "warmup_s": round(first, 2),
            "share_at_target": round(args.target_rate / rate, 4)}


def step_share(dataset: ImageFolder, backend: str, args: argparse.Namespace) -> float:
    """GPU only: share of wall time lost to data when a simulated training step of batch/target_rate seconds
    (a chain of bf16 matmuls) runs on the default stream: 1 - T(synthetic batches) / T(pipeline batches)."""
    weights = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):  # cuBLAS handle, workspace and kernel loading: the first matmul took ~50x a warm one
        weights @ weights
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        weights @ weights
    torch.cuda.synchronize()
    per_matmul = (time.perf_counter() - start) / 10
    matmuls = max(1, round(args.batch_size / args.target_rate / per_matmul))

    def training_step(teacher_images: torch.Tensor) -> None:
        out = weights
        for _ in range(matmuls):
            out = weights @ weights
        out.add_(teacher_images.mean())  # the step reads the batch

    pipeline = InputPipeline(dataset, args.batch_size, mean=MEAN, std=STD, device="cuda", backend=backend, seed=1,
                             num_workers=args.threads, num_threads=args.threads)
    synthetic = next(pipeline)[0]
    for _ in range(2):
        training_step(next(pipeline)[0])
    steps = max(4, min(args.steps, len(dataset) // args.batch_size - 3))
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        training_step(synthetic)
    torch.cuda.synchronize()
    without_data = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        training_step(next(pipeline)[0])
    torch.cuda.synchronize()
    with_data = time.perf_counter() - start
    pipeline.close()
    return max(0.0, 1.0 - without_data / with_data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="", help="existing image folder (default: generate one in a temp dir)")
    parser.add_argument("--num-images", type=int, default=384)
    parser.add_argument("--shape", default="500x375", help="WxH of the generated JPEGs (one in five turned HxW); "
                        "e.g. 3000x1 for the strips that cost a resize-first pipeline a 256x768000 image")
    parser.add_argument("--image-size", type=int, default=256, help="crop height (and width)")
    parser.add_argument("--image-width", type=int, default=0, help="crop width; 0 = --image-size (square)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="CPU threads per backend")
    parser.add_argument("--steps", type=int, default=8, help="timed batches per backend")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=20.0, help="time cap per backend")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--backends", default="", help="comma list (default: all that run on --device)")
    parser.add_argument("--target-rate", type=float, default=400.0, help="training images/s per device")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "data_bench.jsonl"))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device")

    with tempfile.TemporaryDirectory(prefix="dtfast_data_bench_") as tmp:
        root = args.root
        mean_kib = None
        if not root:
            root = tmp
            t0 = time.perf_counter()
            shape = tuple(int(v) for v in args.shape.lower().split("x"))
            mean_kib = make_folder(root, args.num_images, shape=shape)
            print(f"generated {args.num_images} {args.shape} JPEGs ({mean_kib:.0f} KiB mean) in "
                  f"{time.perf_counter() - t0:.1f} s")
        dataset = ImageFolder(root, (args.image_size, args.image_width or args.image_size), split="train")
        if args.backends:
            backends = args.backends.split(",")
        elif args.device == "cuda":
            backends = ["torch", "nvjpeg"] + (["dali"] if dali_available() else [])
        else:
            backends = ["torch"] + (["dali"] if dali_available() else []) + ["nvjpeg"]
        rows = []
        for backend in backends:
            row = time_backend(dataset, backend, args, args.device)
            if backend == "nvjpeg" and args.device == "cpu":
                row["backend"] = "torchvision-cpu"  # the nvjpeg backend's code path with the CPU decoder
            if args.device == "cuda":
                row["step_share"] = round(step_share(dataset, backend, args), 4)
            rows.append(row)
            print(f"{row['backend']:>16} {row['device']:>5}  threads {row['threads']}  "
                  f"{row['images_per_s']:8.1f} images/s  share of step time at {args.target_rate:.0f} img/s: "
                  f"{row['share_at_target']:.3f}" + (f", measured with overlap: {row['step_share']:.3f}"
                                                       if "step_share" in row else ""))

    stamp = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "commit": git_commit(), "machine": machine(args.device), "torch": torch.__version__,
             "mean_jpeg_kib": None if mean_kib is None else round(mean_kib, 1), "num_images": len(dataset),
             "shape": None if args.root else args.shape,
             "load_avg_1m": round(os.getloadavg()[0], 2)}  # other work on the machine skews CPU figures
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "a") as handle:
        for row in rows:
            handle.write(json.dumps({**stamp, **row}) + "\n")
    print(f"appended {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
