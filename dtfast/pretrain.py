"""DreamTeacher pretraining entry point.

    python -m dtfast.pretrain [--config configs/<preset>.yaml] [key.sub=value ...]
    torchrun --nproc_per_node 8 -m dtfast.pretrain --config configs/imagenet_r50_adm256.yaml out=runs/r50

With no arguments it runs the embedded demo (procedural images, small teacher, ResNet-18) on CPU or GPU.
``train.export_only=true`` writes the backbone of a checkpoint (the latest, or ``train.resume=<folder>``) as
``<out>/backbone_step_<N>.safetensors`` without training.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback


def parse_args(argv: list[str] | None = None) -> tuple[str | None, list[str]]:
    from dtfast.train.config import PretrainConfig, parse_cli

    return parse_cli("python -m dtfast.pretrain", "DreamTeacher pretraining: distil a frozen diffusion model's "
                     "features into a timm backbone.", PretrainConfig, argv)


def main(argv: list[str] | None = None) -> int:
    from dtfast.train.config import ConfigError, load_config

    config_path, overrides = parse_args(argv)
    from dtfast import _deps

    if not _deps.require("python -m dtfast.pretrain"):
        return 2
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as exc:
        print(f"dtfast.pretrain: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from dtfast.distributed.checkpoint import CheckpointError, ResumeRefused
    from dtfast.train.lifecycle import RunLocked
    from dtfast.train.trainer import Trainer

    try:
        trainer = Trainer(cfg)
    except (ValueError, OSError) as exc:  # set-up: a teacher folder, student arch or data that cannot be used
        if os.environ.get("DTFAST_TRACEBACK") == "1":
            raise
        where = traceback.extract_tb(exc.__traceback__)[-1]
        print(f"dtfast.pretrain: {type(exc).__name__}: {exc} (raised at {where.filename}:{where.lineno}; "
              "DTFAST_TRACEBACK=1 shows the whole traceback)", file=sys.stderr)
        return 2
    try:
        if cfg.train.export_only:
            trainer.export_checkpoint()
        else:
            trainer.train()
    # no checkpoint where one is named, one of another run, a damaged or unwritable one, another job in this out
    except (FileNotFoundError, ResumeRefused, CheckpointError, RunLocked) as exc:
        print(f"dtfast.pretrain: {exc}", file=sys.stderr)
        return 2
    finally:
        trainer.close()
    # 128 + signal number after a preemption stop: torchrun --max-restarts and schedulers then restart the job,
    # which resumes from the checkpoint the stop wrote (train.resume=auto)
    return trainer.exit_code


if __name__ == "__main__":
    from dtfast.train.distributed import exit_process

    exit_process(main())
