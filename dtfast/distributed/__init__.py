"""Distributed training: the DDP / DeepSpeed engines, DeepSpeed config generation, the ZeRO-3 sharded teacher,
atomic checkpoints for both engines, and preemption handling.

Imports of DeepSpeed happen inside the functions that need it, so ``dtfast.distributed`` imports without it.
"""

from dtfast.distributed.ds_config import DeepSpeedConfigError, build_ds_config, teacher_ds_config
from dtfast.distributed.engine import DDPEngine, DeepSpeedEngine, build_engine

__all__ = [
    "DDPEngine",
    "DeepSpeedConfigError",
    "DeepSpeedEngine",
    "build_ds_config",
    "build_engine",
    "teacher_ds_config",
]
