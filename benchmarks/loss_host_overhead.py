"""Host (Python) cost of the Triton DreamTeacher loss, measured on the CPU with every Triton launch replaced by a no-op.

What it times is everything the Triton backend does on the host around its kernels: validation, dispatch, the
autograd.Function / custom-op wrappers, the launch plan (``dtfast/kernels/_loss_meta.py``), the metadata tensor, output
allocation and argument packing -- but NOT Triton's own launcher (argument binding, autotuner lookup, driver
launch: several microseconds per launch on a GPU machine) and no CUDA-specific costs (caching allocator, pinned
host memory, H2D copies). The figures are CPU host times on CPU tensors, not GPU timings: they say how much Python
work the loss adds per step, which must stay well below the GPU time (ADM-256, bf16, batch 64 on an H100: ~0.85 ms
of kernels) for forward+backward not to become host-bound. ``loss_bench.py --device cuda --profile`` measures the
real thing on a GPU.

    python benchmarks/loss_host_overhead.py                  # ADM-256 level shapes, bf16, batch 2, NCHW
    python benchmarks/loss_host_overhead.py --channels-last  # channels_last maps (another launch path)
    python benchmarks/loss_host_overhead.py --record         # also append a row to benchmarks/results/

Rows (microseconds per call: median and best of --repeats rounds of --iters calls):
  kernels fwd / bwd          dtfast.kernels.dreamteacher_loss forward / backward host functions alone
  loss fwd / bwd / fwd+bwd   dtfast.ops.dreamteacher_loss(backend="triton") eager path as loss_bench times it:
                             forward (scalar loss), loss.backward(retain_graph=True), forward().backward()
  custom op fwd+bwd          the torch.library custom ops (what torch.compile calls) with their autograd formula
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton backend accepts CPU tensors only when interpreting

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.loss_bench import ADM256_LEVELS, DTYPES, machine_name
from dtfast._provenance import git_commit
from dtfast.ops import _backends, dreamteacher_loss


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` does nothing (counts the launches)."""

    def __init__(self, name: str):
        self.name = name
        self.launches = 0

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        self.launches += 1

    def run(self, *args, **kwargs):  # what an autotuner calls
        self.launches += 1


class _EveryKey(dict):
    """An autotuner cache that has every key (the first configuration): no benchmarking, the per-call key building
    and config lookup of a tuned kernel still run."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    def __contains__(self, key):
        return True

    def __getitem__(self, key):
        return self.config


def _stub_autotuner(tuner, name: str):
    """A copy of a Triton Autotuner whose kernel is a _NoLaunch: its own host work (argument dict, key, config
    lookup) is measured as on the GPU, where it has several configurations (under the interpreter the kernel module
    builds single-config autotuners, which skip the key: the copy gets the configuration four times)."""
    stub = copy.copy(tuner)
    stub.fn = _NoLaunch(name)
    if len(stub.configs) == 1:
        stub.configs = stub.configs * 4
    stub.cache = _EveryKey(stub.configs[0])
    return stub


def patch_launches(module) -> dict:
    """Replace every launched Triton kernel of ``module`` (``*_kernel`` JITFunctions, ``*_nchw`` autotuners) by a
    no-op: JITFunctions by a _NoLaunch, autotuners by a copy around a _NoLaunch (the kernel module looks its kernels
    up at call time). Returns {name: original} so ``unpatch_launches`` can restore them.
    """
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import KernelInterface

    originals = {}
    for name, value in list(vars(module).items()):
        # launched kernels only (helpers such as _offs_2d are inlined into them, never launched)
        if isinstance(value, KernelInterface) and name.endswith(("_kernel", "_nchw")):
            originals[name] = value
            setattr(module, name, _stub_autotuner(value, name) if isinstance(value, Autotuner) else _NoLaunch(name))
    if not originals:
        raise RuntimeError(f"loss_host_overhead: no Triton kernels found in {module.__name__}")
    return originals


def launch_counts(module) -> dict[str, int]:
    out = {}
    for name, value in vars(module).items():
        if isinstance(value, _NoLaunch):
            out[name] = value.launches
        elif isinstance(getattr(value, "fn", None), _NoLaunch):
            out[name] = value.fn.launches
    return out


def unpatch_launches(module, originals: dict) -> None:
    for name, value in originals.items():
        setattr(module, name, value)


def make_maps(levels: str, batch: int, dtype, channels_last: bool):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    student, teacher = [], []
    for spec in levels.split(","):
        c, h, w = (int(v) for v in spec.lower().split("x"))
        # values do not matter (no kernel runs): empty maps, no page faults
        student.append(torch.empty(batch, c, h, w, dtype=dtype).contiguous(memory_format=fmt).requires_grad_())
        teacher.append(torch.empty(batch, c, h, w, dtype=dtype).contiguous(memory_format=fmt))
    return student, teacher


def per_call_us(fn, iters: int, repeats: int, before=None) -> tuple[float, float]:
    """(median, best) over ``repeats`` rounds of the mean microseconds of one ``fn()`` call (``before()`` untimed).

    The best round is the less noisy figure on a shared machine (other processes only ever add time)."""
    for _ in range(max(iters // 10, 3)):  # warm caches
        if before:
            before()
        fn()
    rounds = []
    for _ in range(repeats):
        total = 0.0
        for _ in range(iters):
            if before:
                before()
            start = time.perf_counter()
            fn()
            total += time.perf_counter() - start
        rounds.append(total / iters * 1e6)
    return statistics.median(rounds), min(rounds)


def measure(args) -> dict[str, float]:
    kern = _backends.triton_kernels()
    from dtfast.ops.dreamteacher_loss import AT_MODE_CODE, WHITEN_CODE, fused_forward

    student, teacher = make_maps(args.levels, args.batch, DTYPES[args.dtype], args.channels_last)
    whiten, at_mode = WHITEN_CODE[args.whiten], AT_MODE_CODE[args.at_mode]
    opts = dict(whiten=args.whiten, at_mode=args.at_mode, backend="triton", check_finite=False)
    L = len(student)
    ones = torch.ones(L)

    def clear_grads():
        for s in student:
            s.grad = None

    rows = {}
    saved_holder = {}

    def kernels_fwd():
        saved_holder["saved"] = kern.dreamteacher_loss_forward(student, teacher, whiten, at_mode)[2]

    rows["kernels fwd"] = per_call_us(kernels_fwd, args.iters, args.repeats)
    saved = saved_holder["saved"]
    rows["kernels bwd"] = per_call_us(
        lambda: kern.dreamteacher_loss_backward(ones, ones, student, teacher, saved, whiten, at_mode),
        args.iters, args.repeats)

    rows["loss fwd"] = per_call_us(lambda: dreamteacher_loss(student, teacher, **opts), args.iters, args.repeats)
    loss = dreamteacher_loss(student, teacher, **opts)
    rows["loss bwd"] = per_call_us(lambda: loss.backward(retain_graph=True), args.iters, args.repeats,
                                   before=clear_grads)
    loss = None
    rows["loss fwd+bwd"] = per_call_us(lambda: dreamteacher_loss(student, teacher, **opts).backward(),
                                       args.iters, args.repeats, before=clear_grads)

    def custom_op():
        mse, at, _ = fused_forward(student, teacher, whiten, at_mode, "triton")
        (mse + 10.0 * at).mean().backward()

    rows["custom op fwd+bwd"] = per_call_us(custom_op, args.iters, args.repeats, before=clear_grads)
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--levels", default=ADM256_LEVELS, help="comma-separated CxHxW (default: ADM-256 levels)")
    p.add_argument("--batch", type=int, default=2, help="batch size (host cost does not depend on it; default 2)")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--whiten", default="channel", choices=["channel", "sample"])
    p.add_argument("--at-mode", default="paper", choices=["paper", "code"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--iters", type=int, default=200, help="calls per round")
    p.add_argument("--repeats", type=int, default=7, help="rounds (median)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: host work is serial)")
    p.add_argument("--record", action="store_true", help="append a row to benchmarks/results/loss_host_overhead.jsonl")
    p.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not _backends.triton_available():
        raise SystemExit("loss_host_overhead: Triton is not importable")
    kern = _backends.triton_kernels()
    originals = patch_launches(kern)
    try:
        rows = measure(args)
        launches = launch_counts(kern)
    finally:
        unpatch_launches(kern, originals)
    shapes = [f"{args.batch}x{spec}" for spec in args.levels.split(",")]
    print(f"Triton loss host overhead (CPU, launches stubbed) on {machine_name('cpu')} | {args.dtype} | "
          f"{'channels_last' if args.channels_last else 'NCHW'} | levels {shapes} | whiten={args.whiten} "
          f"at_mode={args.at_mode} | torch {torch.__version__}")
    print("| path | us per call (median round) | us per call (best round) |\n|---|---|---|")
    for name, (median, best) in rows.items():
        print(f"| {name} | {median:.1f} | {best:.1f} |")
    record = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "machine": machine_name("cpu"), "commit": git_commit(), "torch": torch.__version__,
              "command": "python benchmarks/loss_host_overhead.py " + " ".join(argv if argv is not None
                                                                               else sys.argv[1:]),
              "dtype": args.dtype, "channels_last": args.channels_last, "levels": shapes, "whiten": args.whiten,
              "at_mode": args.at_mode, "iters": args.iters, "repeats": args.repeats,
              "us_per_call_median": {k: v[0] for k, v in rows.items()},
              "us_per_call_best": {k: v[1] for k, v in rows.items()}, "stubbed_launches": launches}
    if args.record:
        out = Path(args.results_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "loss_host_overhead.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    return record


if __name__ == "__main__":
    main()
