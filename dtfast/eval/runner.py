"""``evaluate(cfg)``: load a backbone and labelled data, extract frozen features once, linear probe + k-NN."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from dtfast.data.folder import DecodeError
from dtfast.data.transforms import size_text
from dtfast.eval.config import ConfigError, EvalConfig, check_out, out_path, to_dict, validate
from dtfast.eval.features import (BackboneError, load_backbone, load_images, pooled_features, probe_datasets,
                                  stage_indices)
from dtfast.eval.probe import knn_top1, linear_probe, min_train_images

__all__ = ["ProbeData", "ProbeDataError", "count_shared_images", "default_out", "evaluate", "evaluate_model",
           "load_probe_data", "resolve_device"]


class ProbeDataError(ValueError):
    """Labelled data the probe cannot use (missing folders, too few images or classes, an undecodable file); the
    message names the folder or file."""


@dataclass
class ProbeData:
    """Decoded, non-augmented labelled images: uint8 (N, 3, S, S) and int64 labels, per split."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    description: str
    shared_images: int = 0  # val images byte-identical to a train image (count_shared_images)

    @property
    def num_classes(self) -> int:
        return int(max(self.train_labels.max(), self.val_labels.max())) + 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _split_name(root: str, split: str) -> str:
    return os.path.join(root, split) if root else f"the procedural {split} split (data.num_{split})"


def load_probe_data(cfg: EvalConfig) -> ProbeData:
    d = cfg.data
    try:
        train, val = probe_datasets(d.root, d.crop_hw, d.num_train, d.num_val, d.num_classes, d.seed)
    except (ValueError, FileNotFoundError) as exc:  # missing split or class folders, no images, ...
        raise ProbeDataError(str(exc)) from exc
    needed = min_train_images(cfg.probe.holdout)
    if len(train) < needed:  # checked before decoding anything
        images = "1 image" if len(train) == 1 else f"{len(train)} images"
        raise ProbeDataError(f"{_split_name(d.root, 'train')} has {images}; the linear probe needs at "
                             f"least {needed} (probe.holdout={cfg.probe.holdout:g} holds some out to pick the L2 "
                             "strength, and 2 or more are fitted)")
    if len(val) == 0:
        raise ProbeDataError(f"{_split_name(d.root, 'val')} has no images; the probe is scored on them")
    try:
        train_images, train_labels = load_images(train, d.num_workers)
        val_images, val_labels = load_images(val, d.num_workers)
    except DecodeError as exc:  # from a worker, the message holds its traceback: keep the line naming the file
        found = re.search(r"data: cannot decode [\"'].*?(?= \(data\.strict|$)", str(exc), flags=re.MULTILINE)
        raise ProbeDataError(f"{found.group(0) if found else exc}; dtfast.evaluate does not skip undecodable files "
                             "(another image would be scored in its place): fix or remove it") from exc
    what = d.root or f"procedural(seed={d.seed}, classes={d.num_classes})"
    data = ProbeData(train_images, train_labels, val_images, val_labels, f"{what} at {size_text(d.crop_hw)}px",
                     shared_images=count_shared_images(train_images, val_images))
    if data.shared_images:
        warnings.warn(f"dtfast.evaluate: {data.shared_images} val image(s) of {_split_name(d.root, 'val')} are "
                      f"pixel-identical to train images (after the {size_text(d.crop_hw)}px centre crop): the val "
                      "score overstates generalisation", stacklevel=2)
    return data


def count_shared_images(train: torch.Tensor, val: torch.Tensor) -> int:
    """How many val images (uint8, N x 3 x H x W) are byte-identical to some train image."""
    seen = {hashlib.blake2b(image.numpy().tobytes(), digest_size=16).digest() for image in train}
    return sum(hashlib.blake2b(image.numpy().tobytes(), digest_size=16).digest() in seen for image in val)


def evaluate_model(model: nn.Module, data: ProbeData, cfg: EvalConfig) -> dict:
    """Linear-probe and k-NN top-1 of a headless timm model's frozen pooled features on ``data``."""
    device = resolve_device(cfg.device)
    start = time.perf_counter()
    train_x = pooled_features(model, data.train_images, cfg.probe.features, cfg.batch_size, device)
    val_x = pooled_features(model, data.val_images, cfg.probe.features, cfg.batch_size, device)
    extracted = time.perf_counter()
    if not (torch.isfinite(train_x).all() and torch.isfinite(val_x).all()):
        raise BackboneError("backbone features are not finite (the weights are finite): the model overflows on "
                            "these images")
    p = cfg.probe
    result = linear_probe(train_x, data.train_labels, val_x, data.val_labels, p.weight_decays, p.holdout,
                          p.max_iter, p.seed)
    result = {"linear_top1": result.pop("top1"), **{f"linear_{k}": v for k, v in result.items()}}
    if p.knn_k > 0:
        result["knn_top1"] = knn_top1(train_x, data.train_labels, val_x, data.val_labels, p.knn_k,
                                      p.knn_temperature)
    result.update({"feature_dim": int(train_x.shape[1]), "num_train": int(train_x.shape[0]),
                   "num_val": int(val_x.shape[0]), "num_classes": data.num_classes, "data": data.description,
                   "val_images_in_train": data.shared_images,
                   "extract_s": extracted - start, "probe_s": time.perf_counter() - extracted})
    return result


def default_out(cfg: EvalConfig) -> str:
    """The results file ``evaluate`` writes (see ``EvalConfig.out``)."""
    return out_path(cfg)


def evaluate(cfg: EvalConfig, data: ProbeData | None = None, write: bool = True) -> dict:
    """Evaluate ``cfg.backbone``; print a summary and (``write``) save the JSON. ``data`` may be reused.

    ``cfg`` is validated first (``arch`` filled in from the backbone file when empty), and the backbone is loaded
    before the data is decoded, so that a wrong file or output path fails before any long work.
    """
    validate(cfg)
    if write:
        check_out(cfg)
    model = load_backbone(cfg.arch, cfg.backbone, cfg.seed)
    try:
        stage_indices(model, cfg.probe.features)  # before decoding the data
    except ValueError as exc:
        raise ConfigError(f"config key 'arch' = {cfg.arch!r}: {exc}; the probe pools the stride-32 map "
                          "(and the stride 4-16 ones for probe.features=all)") from exc
    data = data or load_probe_data(cfg)
    result = {"backbone": cfg.backbone, "arch": cfg.arch, **evaluate_model(model, data, cfg), "config": to_dict(cfg)}
    knn = f", k-NN (k={cfg.probe.knn_k}) top-1 {100 * result['knn_top1']:.2f}%" if "knn_top1" in result else ""
    print(f"[dtfast.evaluate] {cfg.arch} ({cfg.backbone}) on {data.description}: linear-probe top-1 "
          f"{100 * result['linear_top1']:.2f}% (features {cfg.probe.features}, dim {result['feature_dim']}, "
          f"L2 {result['linear_weight_decay']:g}){knn}", flush=True)
    if write:
        from dtfast.train.checkpoint import atomic_write_text

        path = default_out(cfg)
        text = json.dumps(result, indent=2, default=str) + "\n"
        try:
            atomic_write_text(path, text)
        except OSError:  # keep the results of a long evaluation: print them before giving up
            print(f"[dtfast.evaluate] could not write {path}; the results were:\n{text}", end="", flush=True)
            raise
        print(f"[dtfast.evaluate] results: {os.path.abspath(path)}", flush=True)
    return result
