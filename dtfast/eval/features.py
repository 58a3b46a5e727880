"""Backbones to evaluate and their frozen, pooled features on labelled, non-augmented images."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["BackboneError", "backbone_file_info", "check_arch", "load_backbone", "load_images", "pooled_features",
           "probe_datasets", "stage_indices"]

STRIDES = (4, 8, 16, 32)


class BackboneError(ValueError):
    """A backbone file that cannot be evaluated as asked; the message names the file and what to do."""


def backbone_file_info(path: str) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """(safetensors metadata, {key: shape}) of a backbone file, read from its header only (no tensor data).

    Raises FileNotFoundError for a missing file and ``BackboneError`` for a file that is not safetensors or that is
    a training checkpoint (keys ``backbone.*``) rather than an exported backbone.
    """
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone weights {path!r}: no such file")
    try:
        with safe_open(path, framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            shapes = {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BackboneError(f"backbone weights {path!r} are not a safetensors file ({exc}); dtfast.evaluate reads "
                            "a headless backbone in timm naming, as dtfast.pretrain exports (backbone.safetensors)"
                            ) from exc
    tops = {key.split(".", 1)[0] for key in shapes}
    if "backbone" in tops and tops <= {"backbone", "regressor"}:  # dtfast.pretrain's model.safetensors
        raise BackboneError(f"backbone weights {path!r} look like a training checkpoint (keys 'backbone.*'), not "
                            "an exported backbone: export one with the run's own command plus "
                            "train.export_only=true (writes <out>/backbone_step_<N>.safetensors) and evaluate that")
    return metadata, shapes


def check_arch(path: str, arch: str, metadata: dict[str, str]) -> None:
    """Refuse ``arch`` when the file records another one (dtfast.pretrain's export stores ``arch`` in metadata)."""
    stored = metadata.get("arch")
    if stored and arch and stored != arch:
        raise BackboneError(f"backbone weights {path!r} were exported for arch {stored!r} (safetensors metadata), "
                            f"but arch={arch!r} was asked for: leave arch unset to use the file's, or pass "
                            f"arch={stored}")


def load_backbone(arch: str, weights: str = "random", seed: int = 0) -> nn.Module:
    """A headless timm model (``num_classes=0``) in eval mode.

    weights: "random" (timm's init under ``torch.manual_seed(seed)``), "timm" (timm's pretrained weights, from
    the hub or its cache) or a safetensors file in timm naming (what dtfast.pretrain exports); every key must match
    in name and shape. An ``arch`` that differs from the one the file's metadata records is refused, and so is a
    training checkpoint (``checkpoints/step_<N>/model.safetensors``). Errors about the file are ``BackboneError``.
    """
    import timm

    if weights == "timm":
        return timm.create_model(arch, pretrained=True, num_classes=0).eval()
    shapes: dict[str, tuple[int, ...]] = {}
    if weights != "random":
        metadata, shapes = backbone_file_info(weights)  # before building the model: a wrong file fails fast
        check_arch(weights, arch, metadata)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    if weights != "random":
        from safetensors.torch import load_file

        hint = "was it exported for another arch?"
        expected = model.state_dict()
        for key, shape in shapes.items():
            if key in expected and tuple(expected[key].shape) != shape:
                raise BackboneError(f"backbone weights {weights!r} do not fit timm {arch!r} (num_classes=0): "
                                    f"{key} has shape {list(shape)} in the file, {list(expected[key].shape)} in "
                                    f"the model; {hint}")
        state = load_file(weights)
        broken = [key for key, value in state.items() if value.is_floating_point() and not value.isfinite().all()]
        if broken:
            raise BackboneError(f"backbone weights {weights!r}: {len(broken)} tensor(s) hold NaN or inf, e.g. "
                                f"{broken[:5]}; the run that wrote them diverged")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise BackboneError(f"backbone weights {weights!r} do not fit timm {arch!r} (num_classes=0): missing "
                                f"{missing[:5]}, unexpected {unexpected[:5]}; {hint}")
    return model.eval()


def stage_indices(model: nn.Module, which: str) -> list[int]:
    """Indices for ``forward_intermediates``: the last tap at each stride 4..32 ("all") or only stride 32 ("last")."""
    info = [int(f["reduction"]) for f in model.feature_info]
    strides = STRIDES if which == "all" else STRIDES[-1:]
    indices = []
    for stride in strides:
        matches = [i for i, reduction in enumerate(info) if reduction == stride]
        if not matches:
            raise ValueError(f"{type(model).__name__} has no feature map at stride {stride} (has {sorted(set(info))})")
        indices.append(matches[-1])
    return indices


@torch.no_grad()
def pooled_features(model: nn.Module, images: torch.Tensor, which: str = "last", batch_size: int = 250,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """Global-average-pooled stage outputs of uint8 images (N, 3, H, W), normalised with the model's mean/std.

    Returns float32 (N, D): D = channels of the last stage ("last") or the sum over C2..C5 ("all").
    """
    import timm.data

    config = timm.data.resolve_model_data_config(model)
    mean = torch.tensor(config["mean"], device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(config["std"], device=device).view(1, 3, 1, 1) * 255.0
    was_training = model.training
    model = model.to(device).eval()
    indices = stage_indices(model, which)
    out = []
    try:
        for start in range(0, images.shape[0], batch_size):
            x = (images[start:start + batch_size].to(device).float() - mean) / std
            maps = model.forward_intermediates(x, indices=indices, intermediates_only=True)
            out.append(torch.cat([m.float().mean(dim=(2, 3)) for m in maps], dim=1).cpu())
    finally:
        model.train(was_training)  # a caller monitoring training gets its model back in the mode it gave
    return torch.cat(out)


def probe_datasets(root: str, image_size: int | tuple[int, int], num_train: int = 5000, num_val: int = 2000,
                   num_classes: int = 10, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(train, val) without augmentation at ``image_size`` (S or (H, W)): ``root/train`` and ``root/val`` (centre
    crops), or the procedural splits."""
    from dtfast.data import ImageFolder, ProceduralImages

    if not root:
        train = ProceduralImages(num_train, image_size, num_classes=num_classes, seed=seed, split="train")
        train.train = False  # the probe sees the images as rendered: no flips
        return train, ProceduralImages(num_val, image_size, num_classes=num_classes, seed=seed, split="val")
    missing = [s for s in ("train", "val") if not os.path.isdir(os.path.join(root, s))]
    if missing:
        raise FileNotFoundError(f"evaluation data {root!r} needs {root}/train/<class>/ and {root}/val/<class>/; "
                                f"missing: {missing}")
    # strict: an undecodable file is an error naming it; training's skip-and-take-the-next would score a duplicate
    # of another image, perhaps under another class's label
    train = ImageFolder(root, image_size, split="train", train=False, strict=True)
    val = ImageFolder(root, image_size, split="val", train=False, strict=True)
    if train.classes != val.classes:
        raise ValueError(f"{root}: train and val have different classes ({train.classes[:5]} vs {val.classes[:5]})")
    if len(train.classes) < 2:
        raise ValueError(f"{root}/train has {len(train.classes)} class folder(s) ({train.classes}): a probe needs "
                         "2 or more classes (with one, every prediction is right)")
    return train, val


def load_images(dataset: Dataset, num_workers: int = 1, batch_size: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """All items of a data set as one uint8 tensor (N, 3, H, W) and int64 labels (N,), in index order."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_collate)
    images, labels = [], []
    for x, y in loader:
        images.append(x)
        labels.append(y)
    return torch.cat(images), torch.cat(labels)


def _collate(items: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([i[0] for i in items]), torch.tensor([int(i[1]) for i in items], dtype=torch.int64)
