"""Optimizer step time for the real student: LAMB implementations side by side, AdamW as the reference.

    python benchmarks/optim_bench.py                      # CPU, ResNet-50 + UPerNet regressor, channels_last
    python benchmarks/optim_bench.py --device cuda        # GPU machine (gpu_check runs this)

The student is the one `dtfast.pretrain` builds for an ADM-256 teacher (levels of 512, 512, 1024, 1024 channels at
strides 4-32), in channels_last like the optimised training rows, with random gradients. Rows:

- ``timm Lamb, per parameter``: timm's LAMB with its Python loop over the parameters (``foreach=False``; what timm
  releases without the foreach path always do);
- ``timm Lamb, foreach``: timm's multi-tensor path, where the installed timm has it;
- ``dtfast Lamb, per parameter`` / ``dtfast Lamb, foreach``: ``dtfast.train.optim.Lamb``, what the trainer uses
  for channels_last students (its default: per parameter on CPU, foreach on CUDA);
- ``torch AdamW``: foreach on CPU, fused on CUDA (the floor an element-wise optimizer can reach).

Each row: ``--warmup`` untimed steps, then ``--steps`` timed steps (device synchronised around each); median and
p10-p90 in ms, and the number of operator calls one step dispatches (a host-overhead proxy). One JSON line per row
is appended to benchmarks/results/optim_bench.jsonl, and the table to optim_bench.md.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dtfast._provenance import git_commit
from dtfast.bench import report
from dtfast.bench.flops import OpCounter
from dtfast.bench.runner import summarize, synchronize
from dtfast.students import build_student
from dtfast.train.optim import Lamb, param_groups

RESULTS = os.path.join(ROOT, "benchmarks", "results")
ADM256_CHANNELS = (512, 512, 1024, 1024)


def optimizers(device: torch.device) -> dict:
    """name -> factory(param groups) for the rows available here."""
    from timm.optim import Lamb as TimmLamb

    lr, betas = 4e-3, (0.9, 0.95)
    rows = {}
    has_foreach = "foreach" in inspect.signature(TimmLamb.__init__).parameters
    if has_foreach:
        rows["timm Lamb, per parameter"] = lambda g: TimmLamb(g, lr=lr, betas=betas, max_grad_norm=None, foreach=False)
        rows["timm Lamb, foreach"] = lambda g: TimmLamb(g, lr=lr, betas=betas, max_grad_norm=None, foreach=True)
    else:
        rows["timm Lamb, per parameter"] = lambda g: TimmLamb(g, lr=lr, betas=betas, max_grad_norm=None)
    rows["dtfast Lamb, per parameter"] = lambda g: Lamb(g, lr=lr, betas=betas, foreach=False)  # CPU default
    rows["dtfast Lamb, foreach"] = lambda g: Lamb(g, lr=lr, betas=betas, foreach=True)  # CUDA default
    if device.type == "cuda":
        rows["torch AdamW (fused)"] = lambda g: torch.optim.AdamW(g, lr=lr, betas=betas, fused=True)
    else:
        rows["torch AdamW (foreach)"] = lambda g: torch.optim.AdamW(g, lr=lr, betas=betas, foreach=True)
    return rows


def time_row(factory, args, device: torch.device) -> dict:
    student = build_student(args.arch, ADM256_CHANNELS, width=args.width).to(device)
    student = student.to(memory_format=torch.channels_last)
    params = [p for p in student.parameters() if p.requires_grad]
    generator = torch.Generator(device=device).manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, device=device, generator=generator).to(
            memory_format=torch.channels_last if p.dim() == 4 else torch.contiguous_format) * 1e-3
    optimizer = factory(param_groups(student, 0.05))
    for _ in range(args.warmup):
        optimizer.step()
    synchronize(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        optimizer.step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    with OpCounter() as counter:
        optimizer.step()
    synchronize(device)
    timing = summarize(times)
    return {"ms_median": 1e3 * timing["median"], "ms_p10": 1e3 * timing["p10"], "ms_p90": 1e3 * timing["p90"],
            "ops_per_step": counter.count,
            "tensors": len(params), "parameters_m": sum(p.numel() for p in params) / 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--width", type=int, default=256, help="regressor width")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", default="", help="row names separated by ; (names contain commas; default: all)")
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    machine = report.machine_info(device)
    stamp = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),  # noqa: UP017
             "commit": git_commit(), "machine": machine["device_name"], "torch": torch.__version__,
             "arch": args.arch, "width": args.width, "steps": args.steps,
             "command": "python benchmarks/optim_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    try:
        import timm

        stamp["timm"] = timm.__version__
    except ImportError:
        parser.error("timm is needed (the student is a timm model)")
    wanted = {r.strip() for r in args.rows.split(";") if r.strip()}
    available = optimizers(device)
    unknown = sorted(wanted - set(available))
    if unknown:
        parser.error(f"--rows: no row(s) {unknown} here; the rows on {device.type} are {list(available)}")
    records = []
    for name, factory in available.items():
        if wanted and name not in wanted:
            continue
        try:
            row = {**stamp, "row": name, **time_row(factory, args, device)}
        except Exception as error:  # noqa: BLE001 - one optimizer that fails here must not lose the other rows
            print(f"{name:<28} FAILED: {type(error).__name__}: {str(error)[:200]}", flush=True)
            continue
        records.append(row)
        print(f"{name:<28} {row['ms_median']:8.2f} ms/step (p10-p90 {row['ms_p10']:.2f}-{row['ms_p90']:.2f}), "
              f"{row['ops_per_step']} ops/step, {row['tensors']} tensors", flush=True)
    lines = ["| row | ms/step (median) | p10-p90 | ops dispatched per step |", "|---|---|---|---|"]
    lines += [f"| {r['row']} | {r['ms_median']:.2f} | {r['ms_p10']:.2f}-{r['ms_p90']:.2f} | {r['ops_per_step']} |"
              for r in records]
    table = "\n".join(lines)
    print(table)
    if not args.no_record and records:
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, "optim_bench.jsonl"), "a") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in records))
        first = records[0]
        with open(os.path.join(RESULTS, "optim_bench.md"), "a") as fh:
            fh.write(f"\n## {stamp['date']} {stamp['machine']}\n\ncommit {stamp['commit']}, torch {stamp['torch']}, "
                     f"timm {stamp['timm']}; {args.arch} + UPerNet regressor (width {args.width}), channels_last, "
                     f"{first['tensors']} tensors, {first['parameters_m']:.1f} M parameters; `{stamp['command']}`"
                     f"\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
