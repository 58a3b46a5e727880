"""Typed configuration of backbone evaluation (``python -m dtfast.evaluate``): linear probe and k-NN."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from dtfast.train.config import ConfigError, _f, build_config, get_key, help_text, to_dict

__all__ = ["ConfigError", "EvalConfig", "help_text", "load_eval_config", "to_dict"]


@dataclass
class EvalDataConfig:
    root: str = _f("", "labelled folder with root/train/<class>/<image> and root/val/<class>/<image>; "
                       "empty = the embedded procedural set's train and val splits")
    image_size: int = _f(32, "images are resized (shorter side) and centre-cropped to this size; no augmentation")
    num_train: int = _f(5000, "procedural set only: images in the train split")
    num_val: int = _f(2000, "procedural set only: images in the val split")
    num_classes: int = _f(10, "procedural set only: number of classes (1..20)")
    seed: int = _f(0, "procedural set only: content seed of both splits")
    num_workers: int = _f(1, "data-loader workers for decoding / rendering")


@dataclass
class ProbeConfig:
    features: str = _f("last", "pooled features: last (global average pool of the last stage, C5) | "
                               "all (C2..C5 pooled and concatenated)")
    weight_decays: list = _f([1e-4, 1e-3, 1e-2, 1e-1], "L2 strengths tried; the best on a held-out part of the "
                                                         "train split is refit on the whole train split")
    holdout: float = _f(0.2, "fraction of the train split held out to pick the L2 strength")
    max_iter: int = _f(200, "L-BFGS iterations (full batch, strong-Wolfe line search)")
    knn_k: int = _f(20, "k of the k-NN classifier (cosine similarity, weighted vote exp(sim / T)); 0 = skip")
    knn_temperature: float = _f(0.07, "temperature T of the k-NN vote")
    seed: int = _f(0, "seed of the held-out split (the probe itself is deterministic)")


@dataclass
class EvalConfig:
    backbone: str = _f("random", "random (timm init with `seed`) | path to a backbone.safetensors (timm naming, "
                                 "headless, as dtfast.pretrain exports) | timm (timm's own pretrained weights)")
    arch: str = _f("resnet18", "timm architecture of the backbone")
    seed: int = _f(0, "seed of the random init (backbone=random)")
    out: str = _f("", "JSON file for the results; empty = <backbone folder>/eval.json, or eval.json for random")
    device: str = _f("auto", "auto (cuda when available) | cpu | cuda")
    batch_size: int = _f(250, "feature-extraction batch size")
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)


_CHOICES = {"device": ("auto", "cpu", "cuda"), "probe.features": ("last", "all")}


def validate(cfg: EvalConfig) -> None:
    for key, choices in _CHOICES.items():
        if get_key(cfg, key) not in choices:
            raise ConfigError(f"config key '{key}' = {get_key(cfg, key)!r}; expected one of {', '.join(choices)}")
    for key in ("data.image_size", "data.num_train", "data.num_val", "batch_size", "probe.max_iter"):
        if get_key(cfg, key) <= 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {get_key(cfg, key)}")
    if not 0.0 < cfg.probe.holdout < 1.0:
        raise ConfigError(f"config key 'probe.holdout' must be in (0, 1), got {cfg.probe.holdout}")
    if not cfg.probe.weight_decays or any(float(w) < 0 for w in cfg.probe.weight_decays):
        raise ConfigError(f"config key 'probe.weight_decays' needs values >= 0, got {cfg.probe.weight_decays}")
    if cfg.backbone not in ("random", "timm") and not os.path.isfile(cfg.backbone):
        raise ConfigError(f"config key 'backbone' = {cfg.backbone!r}: not 'random', 'timm' or an existing file")


def load_eval_config(path: str | None = None, overrides: list[str] | None = None) -> EvalConfig:
    """Defaults, then the YAML file at ``path``, then ``key.sub=value`` overrides, then validation."""
    return build_config(EvalConfig, path, overrides, validate)
