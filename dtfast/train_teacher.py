"""Train a small pixel-space diffusion teacher (DDPM, EMA) for DreamTeacher distillation.

    python -m dtfast.train_teacher out=runs/teacher [data.root=/data/images] [train.max_steps=2000] [key=value ...]
    torchrun --nproc_per_node 2 -m dtfast.train_teacher out=runs/teacher

Writes ``<out>/teacher/`` (diffusers UNet2DModel + DDPMScheduler, EMA weights): pass it as
``python -m dtfast.pretrain teacher.pretrained=<out>/teacher``. Exit status: 0 when the teacher is exported, 2 for a
configuration error (refused resume included), 128 + signal after SIGTERM/SIGINT stopped it (checkpoint written;
rerun with ``train.resume=auto`` to continue).
"""

from __future__ import annotations

import logging
import sys


def parse_args(argv: list[str] | None = None) -> tuple[str | None, list[str]]:
    from dtfast.teacher_training.config import TeacherTrainConfig
    from dtfast.train.config import parse_cli

    return parse_cli("python -m dtfast.train_teacher", "DDPM training of a diffusers UNet2DModel teacher on an image "
                     "folder or the embedded set.", TeacherTrainConfig, argv)


def main(argv: list[str] | None = None) -> int:
    from dtfast.teacher_training.config import ConfigError, load_teacher_config

    config_path, overrides = parse_args(argv)
    from dtfast import _deps

    if not _deps.require("python -m dtfast.train_teacher"):
        return 2
    try:
        cfg = load_teacher_config(config_path, overrides)
    except ConfigError as exc:
        print(f"dtfast.train_teacher: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from dtfast.teacher_training.trainer import TeacherTrainer
    from dtfast.train.lifecycle import RunLocked

    trainer = None
    try:
        trainer = TeacherTrainer(cfg)
        trainer.train()
    except (ConfigError, FileNotFoundError, RunLocked) as exc:
        # another job in this out folder, too few images for a batch, a refused resume (another model or size
        # than the checkpoint's; the run's files are left as they were), train.resume=<missing folder>
        print(f"dtfast.train_teacher: {exc}", file=sys.stderr)
        return 2
    finally:
        if trainer is not None:
            trainer.close()
    # 128 + signal number after a preemption stop: torchrun --max-restarts and schedulers then restart the job,
    # which resumes from the checkpoint the stop wrote (train.resume=auto)
    return trainer.exit_code


if __name__ == "__main__":
    from dtfast.train.distributed import exit_process

    exit_process(main())
