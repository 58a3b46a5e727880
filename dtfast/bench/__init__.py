"""Throughput benchmark of the training step (``python -m dtfast.bench``): images/s, per-stage breakdown,
FLOPs per image, achieved TFLOP/s and model-FLOP utilisation, peak memory; baseline vs optimised rows."""

from dtfast.bench.core import run_benchmark
from dtfast.bench.rows import SWITCHES, parse_row, sweep_rows

__all__ = ["SWITCHES", "parse_row", "run_benchmark", "sweep_rows"]
