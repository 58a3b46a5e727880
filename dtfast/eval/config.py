"""Typed configuration of backbone evaluation (``python -m dtfast.evaluate``): linear probe and k-NN."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

from dtfast.train.config import ConfigError, CropSize, _f, build_config, get_key, help_text, to_dict

__all__ = ["ConfigError", "EvalConfig", "backbone_metadata", "check_out", "default_out_name", "help_text",
           "load_eval_config", "out_path", "resolve_arch", "resolve_crop_size", "to_dict", "validate"]

MAX_PROCEDURAL_CLASSES = 20  # dtfast.data.procedural's limit (checked there too)
DEFAULT_ARCH = "resnet18"
DEFAULT_IMAGE_SIZE = 32  # the embedded data's resolution


@dataclass
class EvalDataConfig(CropSize):
    root: str = _f("", "labelled folder with root/train/<class>/<image> and root/val/<class>/<image>; "
                       "empty = the embedded procedural set's train and val splits")
    image_size: int = _f(0, "probe crop height, and width unless data.image_width is set: images are resized to "
                            "cover the crop (aspect ratio kept) and centre-cropped, no augmentation; 0 = the training "
                            "resolution the backbone file records (dtfast.pretrain's export, \"S\" or \"HxW\"), "
                            f"else {DEFAULT_IMAGE_SIZE}")
    image_width: int = _f(0, "probe crop width for non-square crops (e.g. 128x256: data.image_size=128 "
                             "data.image_width=256); 0 = data.image_size (square), or with data.image_size=0 the "
                             "recorded width")
    num_train: int = _f(5000, "procedural set only: images in the train split")
    num_val: int = _f(2000, "procedural set only: images in the val split")
    num_classes: int = _f(10, f"procedural set only: number of classes (2..{MAX_PROCEDURAL_CLASSES})")
    seed: int = _f(0, "procedural set only: content seed of both splits")
    num_workers: int = _f(1, "data-loader workers for decoding / rendering (0 = in the main process)")


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
    arch: str = _f("", "timm architecture of the backbone; empty = the arch a backbone file records in its "
                       "metadata (dtfast.pretrain's export does), else resnet18. A set arch that differs from the "
                       "file's is refused")
    seed: int = _f(0, "seed of the random init (backbone=random)")
    out: str = _f("", "JSON file for the results, or a folder (existing, or ending in /) to write the default "
                      "name into; empty = <backbone stem>.eval.json next to the backbone file (backbone_step_10"
                      ".safetensors -> backbone_step_10.eval.json), or random-<arch>-seed<seed>.eval.json / "
                      "timm-<arch>.eval.json in the current folder")
    overwrite: bool = _f(False, "replace a results file that an evaluation with other data or probe settings "
                                "wrote (a rerun with the same settings always replaces it)")
    device: str = _f("auto", "auto (cuda when available) | cpu | cuda")
    batch_size: int = _f(250, "feature-extraction batch size")
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)


_CHOICES = {"device": ("auto", "cpu", "cuda"), "probe.features": ("last", "all")}


def backbone_metadata(cfg: EvalConfig) -> dict[str, str]:
    """The safetensors metadata of ``cfg.backbone`` ({} for random/timm); ConfigError for a file that cannot be
    evaluated (not safetensors, or a training checkpoint)."""
    if cfg.backbone in ("random", "timm"):
        return {}
    from dtfast.eval.features import BackboneError, backbone_file_info

    try:
        metadata, _ = backbone_file_info(cfg.backbone)
    except (BackboneError, FileNotFoundError) as exc:
        raise ConfigError(f"config key 'backbone': {exc}") from exc
    return metadata


def resolve_arch(cfg: EvalConfig, metadata: dict[str, str] | None = None) -> str:
    """``cfg.arch``, or when empty the arch the backbone file records (dtfast.pretrain's export), else resnet18.

    Raises ConfigError when a set ``arch`` differs from the file's, and for a file that cannot be evaluated (not
    safetensors, or a training checkpoint).
    """
    if cfg.backbone in ("random", "timm"):
        return cfg.arch or DEFAULT_ARCH
    from dtfast.eval.features import BackboneError, check_arch

    metadata = backbone_metadata(cfg) if metadata is None else metadata
    try:
        check_arch(cfg.backbone, cfg.arch, metadata)
    except BackboneError as exc:
        raise ConfigError(f"config key 'arch': {exc}") from exc
    return cfg.arch or metadata.get("arch") or DEFAULT_ARCH


def resolve_crop_size(cfg: EvalConfig, metadata: dict[str, str]) -> tuple[int, int]:
    """The probe's (height, width): ``data.image_size`` (and ``data.image_width``), or when both are 0 the training
    crop the backbone file records ("S" or "HxW"), else 32x32; warns when a set size differs from the recorded one
    (features at another resolution than the distillation's)."""
    from dtfast.data.transforms import parse_size_text, size_text

    recorded = metadata.get("image_size", "").strip()
    try:
        trained = parse_size_text(recorded)
    except ValueError:
        trained = None
    if cfg.data.image_size == 0:
        if cfg.data.image_width:
            raise ConfigError(f"config key 'data.image_width' = {cfg.data.image_width} needs data.image_size (the "
                              "crop height) too; leave both 0 to use the backbone's training crop")
        return trained or (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
    if trained and cfg.data.crop_hw != trained:
        keys = f"data.image_size={cfg.data.image_size}" + (f" data.image_width={cfg.data.image_width}"
                                                             if cfg.data.image_width else "")
        warnings.warn(f"dtfast.evaluate: {cfg.backbone} was trained at {recorded}px (its metadata), evaluated at "
                      f"{size_text(cfg.data.crop_hw)}px ({keys}); leave data.image_size and data.image_width unset "
                      f"(0) to use {recorded}", stacklevel=2)
    return cfg.data.crop_hw


def default_out_name(cfg: EvalConfig) -> str:
    """The results file's name: ``<backbone stem>.eval.json``, or one naming the arch (and seed) of random/timm."""
    if cfg.backbone == "random":
        return f"random-{_file_safe(cfg.arch or DEFAULT_ARCH)}-seed{cfg.seed}.eval.json"
    if cfg.backbone == "timm":
        return f"timm-{_file_safe(cfg.arch or DEFAULT_ARCH)}.eval.json"
    return os.path.splitext(os.path.basename(cfg.backbone))[0] + ".eval.json"


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def out_path(cfg: EvalConfig) -> str:
    """Where the results go: ``out`` as a file, or ``default_out_name`` in the folder ``out`` names (an existing
    folder, or a path ending in a separator), or next to the backbone file (the current folder for random/timm)."""
    name = default_out_name(cfg)
    if not cfg.out:
        if cfg.backbone in ("random", "timm"):
            return name
        return os.path.join(os.path.dirname(os.path.abspath(cfg.backbone)), name)
    if cfg.out.endswith(("/", os.sep)) or os.path.isdir(cfg.out):
        return os.path.join(cfg.out, name)
    return cfg.out


def check_out(cfg: EvalConfig) -> None:
    """Refuse a results path that cannot be written (a folder, under a file, read-only), before any work."""
    path = os.path.abspath(out_path(cfg))
    where = f"config key 'out' = {cfg.out!r}" if cfg.out else f"the default results file {path}"
    if os.path.isdir(path):
        raise ConfigError(f"{where}: {path} is a folder; name a file or a folder to write "
                          f"{default_out_name(cfg)} into")
    parent = os.path.dirname(path)
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"{where}: cannot write {path}, {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: cannot write {path}, {parent} is not writable")
    if os.path.isfile(path) and not cfg.overwrite:
        changed = _changed_settings(path, cfg)
        if changed:
            raise ConfigError(f"{where}: {path} holds the results of an evaluation with other settings ("
                              f"{'; '.join(changed)}); pass out=<another file> to keep both, or overwrite=true")


def _changed_settings(path: str, cfg: EvalConfig) -> list[str]:
    """The data/probe keys whose value in the results file at ``path`` differs from ``cfg``'s (or why it cannot
    be compared); [] for a rerun with the same settings."""
    import json

    try:
        with open(path) as fh:
            recorded = json.load(fh)["config"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"not a dtfast.evaluate results file: {type(exc).__name__}"]
    now, defaults = to_dict(cfg), to_dict(EvalConfig())
    changed = []
    for section in ("data", "probe"):
        old, new = recorded.get(section) or {}, now[section]
        # a key the file predates (e.g. data.image_width) had its default's meaning then
        changed += [f"{section}.{key}: {old.get(key, defaults[section][key])!r} -> {value!r}"
                    for key, value in new.items()
                    if key != "num_workers" and old.get(key, defaults[section][key]) != value]
    return changed


def validate(cfg: EvalConfig) -> None:
    """Check every key before any work; fills in ``arch`` when it is empty (see ``resolve_arch``)."""
    for key, choices in _CHOICES.items():
        if get_key(cfg, key) not in choices:
            raise ConfigError(f"config key '{key}' = {get_key(cfg, key)!r}; expected one of {', '.join(choices)}")
    for key, zero in (("data.image_size", "the backbone's crop"), ("data.image_width", "data.image_size")):
        if get_key(cfg, key) < 0:
            raise ConfigError(f"config key '{key}' must be >= 0 (0 = {zero}), got {get_key(cfg, key)}")
    for key in ("data.num_train", "data.num_val", "batch_size", "probe.max_iter"):
        if get_key(cfg, key) <= 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {get_key(cfg, key)}")
    if not 2 <= cfg.data.num_classes <= MAX_PROCEDURAL_CLASSES:
        raise ConfigError(f"config key 'data.num_classes' must be in 2..{MAX_PROCEDURAL_CLASSES} (with one class "
                          f"every prediction is right), got {cfg.data.num_classes}")
    for key in ("data.num_workers", "probe.knn_k"):
        if get_key(cfg, key) < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {get_key(cfg, key)}")
    if not cfg.probe.knn_temperature > 0:
        raise ConfigError(f"config key 'probe.knn_temperature' must be > 0, got {cfg.probe.knn_temperature}")
    if not 0.0 < cfg.probe.holdout < 1.0:
        raise ConfigError(f"config key 'probe.holdout' must be in (0, 1), got {cfg.probe.holdout}")
    if not cfg.probe.weight_decays or any(not float(w) >= 0 for w in cfg.probe.weight_decays):
        raise ConfigError(f"config key 'probe.weight_decays' needs values >= 0, got {cfg.probe.weight_decays}")
    from dtfast.eval.probe import min_train_images

    needed = min_train_images(cfg.probe.holdout)
    if not cfg.data.root and cfg.data.num_train < needed:
        raise ConfigError(f"config key 'data.num_train' = {cfg.data.num_train}: the linear probe needs at least "
                          f"{needed} train images (probe.holdout={cfg.probe.holdout:g})")
    if cfg.backbone not in ("random", "timm") and not os.path.isfile(cfg.backbone):
        raise ConfigError(f"config key 'backbone' = {cfg.backbone!r}: not 'random', 'timm' or an existing file")
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("config key 'device' = 'cuda', but no CUDA device is available; use device=cpu "
                              "or device=auto")
    metadata = backbone_metadata(cfg)
    cfg.arch = resolve_arch(cfg, metadata)
    cfg.data.image_size, cfg.data.image_width = resolve_crop_size(cfg, metadata)
    cfg.data.canonical_width()
    if cfg.out:  # the default path is checked by evaluate() when it is to write it (not by library users)
        check_out(cfg)


def load_eval_config(path: str | None = None, overrides: list[str] | None = None) -> EvalConfig:
    """Defaults, then the YAML file at ``path``, then ``key.sub=value`` overrides, then validation."""
    return build_config(EvalConfig, path, overrides, validate)
