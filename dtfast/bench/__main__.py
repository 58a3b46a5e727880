"""Throughput benchmark of the DreamTeacher training step: ``python -m dtfast.bench --config <preset> [key=value ...]``.

Examples::

    python -m dtfast.bench --config configs/tiny.yaml bench.warmup=2 bench.steps=5
    python -m dtfast.bench --config configs/tiny.yaml bench.sweep=true
    python -m dtfast.bench --config configs/imagenet_r50_adm256.yaml bench.rows=[baseline,optimized] \\
        bench.batch_sizes=[128,256]

Writes <out>/bench/bench.{json,md,png} (``out`` of the config, or ``--out``) and, when the folder exists, appends
to benchmarks/results/ (``bench.results_dir``). ``--help-config`` lists every ``bench.*`` key.
"""

from __future__ import annotations

import argparse
import sys

from dtfast.train.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dtfast.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="", help="YAML preset (configs/*.yaml); empty = the built-in defaults")
    parser.add_argument("--out", default="", help="folder for bench.json/md/png (default: <config out>/bench)")
    parser.add_argument("--sweep", action="store_true", help="same as bench.sweep=true")
    parser.add_argument("--help-config", action="store_true", help="list the bench.* keys and exit")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. bench.steps=20 train.batch_size=64")
    args = parser.parse_args(argv)
    if args.help_config:
        from dtfast.train.config import BenchConfig, help_text

        print(help_text(BenchConfig, prefix="bench."))
        return 0
    overrides = list(args.overrides) + (["bench.sweep=true"] if args.sweep else [])
    from dtfast import _deps

    if not _deps.require("python -m dtfast.bench"):
        return 2
    from dtfast.bench.core import run_benchmark

    try:
        result = run_benchmark(args.config or None, overrides, out=args.out or None, argv=sys.argv)
    except ConfigError as error:
        parser.error(str(error))
    return 0 if any(row.get("status") == "ok" for row in result["rows"]) else 1


if __name__ == "__main__":
    from dtfast.train.distributed import exit_process

    exit_process(main())
