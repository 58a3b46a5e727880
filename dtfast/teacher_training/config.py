"""Typed configuration of DDPM teacher training (``python -m dtfast.train_teacher``).

Same system as pretraining (dtfast.train.config): nested dataclasses with a help text per field, a YAML file,
then dotted ``key.sub=value`` overrides, then validation. ``python -m dtfast.train_teacher --help`` lists all.
The defaults train the ``tiny`` UNet on the embedded procedural set at 32x32, a few minutes on a laptop CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dtfast.train.config import (ConfigError, CropSize, _f, build_config, get_key, help_text, to_dict,
                                 validate_schedule, warn_long_warmup)

__all__ = ["ConfigError", "TeacherTrainConfig", "help_text", "load_teacher_config", "to_dict"]


@dataclass
class TeacherDataConfig(CropSize):
    root: str = _f("", "image folder root/<class>/<image> (labels unused); empty = the embedded procedural set")
    image_size: int = _f(32, "training resolution: crop height, and width unless data.image_width is set; a multiple "
                         "of the UNet's downsampling factor 2**(levels - 1): 32 for model.arch=tiny and adm256")
    image_width: int = _f(0, "crop width for non-square crops (a BDD100K teacher: data.image_size=128 "
                          "data.image_width=256), the same multiple; 0 = data.image_size (square)")
    num_workers: int = _f(1, "data-loader worker processes per rank")
    num_images: int = _f(4096, "size of the embedded procedural set (only when root is empty)")
    seed: int = _f(0, "seed of the embedded procedural set (only when root is empty)")


@dataclass
class TeacherModelConfig:
    arch: str = _f("tiny", "named UNet2DModel architecture of dtfast.teachers (tiny | adm256)")
    block_out_channels: list = _f([], "override the arch's channels per level (same number of levels); empty = keep")
    layers_per_block: int = _f(0, "override the arch's res blocks per level; 0 = keep")
    attention_head_dim: int = _f(0, "override the arch's attention head width (must divide the attention widths)")
    norm_num_groups: int = _f(0, "override the arch's GroupNorm groups (must divide every width); 0 = keep")
    dropout: float = _f(0.0, "dropout in the res blocks")


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = _f(1000, "diffusion steps T")
    beta_schedule: str = _f("linear", "linear (ADM / DDPM) | scaled_linear | squaredcos_cap_v2")
    beta_start: float = _f(1e-4, "first beta (linear schedules)")
    beta_end: float = _f(0.02, "last beta (linear schedules)")


@dataclass
class TeacherOptimConfig:
    batch_size: int = _f(32, "images per process and step")
    max_steps: int = _f(1000, "optimizer steps in total")
    lr: float = _f(1e-3, "peak learning rate (AdamW)")
    min_lr: float = _f(1e-4, "learning rate at the end of the cosine schedule")
    warmup_steps: int = _f(50, "linear warm-up steps")
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay (kernels only)")
    betas: list = _f([0.9, 0.999], "AdamW betas")
    grad_clip: float = _f(1.0, "clip the global gradient norm; 0 = off")
    ema_decay: float = _f(0.999, "EMA decay of the exported weights (with the 1+n/10+n warm-up of the paper's EMA)")
    seed: int = _f(0, "seed of initialisation, data order, timesteps and noise")
    log_every: int = _f(10, "log a metrics line every N steps")
    save_every: int = _f(200, "checkpoint every N steps (and at the end); 0 = only at the end")
    keep_last: int = _f(2, "checkpoints to keep")
    resume: str = _f("auto", "auto (latest checkpoint in out/ if any) | never | path to a checkpoint folder")
    max_minutes: float = _f(0.0, "stop (checkpoint + export) after this wall-clock time; 0 = run max_steps")


@dataclass
class TeacherTrainConfig:
    out: str = _f("runs/teacher", "run folder: config.yaml, metrics.jsonl, checkpoints/, teacher/ (diffusers)")
    device: str = _f("auto", "auto (cuda when available) | cpu | cuda")
    data: TeacherDataConfig = field(default_factory=TeacherDataConfig)
    model: TeacherModelConfig = field(default_factory=TeacherModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TeacherOptimConfig = field(default_factory=TeacherOptimConfig)


_CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "diffusion.beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
}


def validate(cfg: TeacherTrainConfig) -> None:
    for key, choices in _CHOICES.items():
        if get_key(cfg, key) not in choices:
            raise ConfigError(f"config key '{key}' = {get_key(cfg, key)!r}; expected one of {', '.join(choices)}")
    for key in ("data.image_size", "train.batch_size", "train.max_steps", "train.log_every",
                "diffusion.num_train_timesteps"):
        if get_key(cfg, key) <= 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {get_key(cfg, key)}")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise ConfigError(f"config key 'train.ema_decay' must be in [0, 1), got {cfg.train.ema_decay}")
    validate_schedule(cfg, ["train.min_lr", "train.weight_decay", "train.grad_clip", "train.max_minutes",
                            "train.warmup_steps", "train.save_every", "data.num_workers", "data.image_width"])
    warn_long_warmup(f"'train.warmup_steps' = {cfg.train.warmup_steps}", cfg.train.warmup_steps,
                     f"'train.max_steps' = {cfg.train.max_steps}", cfg.train.max_steps)
    # the model keys (arch, widths, groups, head width) and data.image_size against the arch's downsampling
    from dtfast.teacher_training.trainer import unet_config

    unet_config(cfg)
    cfg.data.canonical_width()


def load_teacher_config(path: str | None = None, overrides: list[str] | None = None) -> TeacherTrainConfig:
    """Defaults, then the YAML file at ``path``, then ``key.sub=value`` overrides, then validation."""
    return build_config(TeacherTrainConfig, path, overrides, validate)
