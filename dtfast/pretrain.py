"""DreamTeacher pretraining entry point.

    python -m dtfast.pretrain [--config configs/<preset>.yaml] [key.sub=value ...]
    torchrun --nproc_per_node 8 -m dtfast.pretrain --config configs/imagenet_r50_adm256.yaml out=runs/r50

With no arguments it runs the embedded demo (procedural images, small teacher, ResNet-18) on CPU or GPU.
"""

from __future__ import annotations

import argparse
import logging
import sys


def parse_args(argv: list[str] | None = None) -> tuple[str | None, list[str]]:
    from dtfast.train.config import help_text

    parser = argparse.ArgumentParser(
        prog="python -m dtfast.pretrain",
        description="DreamTeacher pretraining: distil a frozen diffusion model's features into a timm backbone.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (override any with key.sub=value):\n" + help_text(),
    )
    parser.add_argument("--config", default=None, help="YAML preset, e.g. configs/imagenet_r50_adm256.yaml")
    parser.add_argument("--resume", default=None, help="shorthand for train.resume=VALUE (auto | never | path)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, applied after the YAML file")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"train.resume={args.resume}")
    return args.config, overrides


def main(argv: list[str] | None = None) -> int:
    from dtfast.train.config import ConfigError, load_config

    config_path, overrides = parse_args(argv)
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as exc:
        print(f"dtfast.pretrain: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from dtfast.train.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    # 128 + signal number after a preemption stop: torchrun --max-restarts and schedulers then restart the job,
    # which resumes from the checkpoint the stop wrote (train.resume=auto)
    return trainer.exit_code


if __name__ == "__main__":
    sys.exit(main())
