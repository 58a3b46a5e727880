"""The supervised upper bound: train a timm backbone with labels (cross-entropy), export it headless.

The exported ``backbone.safetensors`` has the same format as dtfast.pretrain's (timm naming, ``num_classes=0``),
so the same linear probe evaluates it.
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dtfast.train.checkpoint import atomic_write_text, save_safetensors_atomic
from dtfast.train.optim import build_optimizer, lr_at, set_lr

__all__ = ["train_supervised"]


def train_supervised(arch: str, dataset: Dataset, num_classes: int, out: str, *, steps: int = 300,
                     batch_size: int = 64, lr: float = 2e-3, weight_decay: float = 0.05, warmup_steps: int = 20,
                     seed: int = 0, num_workers: int = 1, device: str | torch.device = "cpu",
                     log_every: int = 50) -> str:
    """Train ``arch`` on ``dataset`` (augmented train split, items (uint8 image, label)); write
    ``out/backbone.safetensors`` (headless) and ``out/metrics.jsonl``. Returns the weights' path."""
    import timm
    import timm.data

    from dtfast.data import build_loader

    device = torch.device(device)
    torch.manual_seed(seed)
    model = timm.create_model(arch, num_classes=num_classes).to(device).train()
    config = timm.data.resolve_model_data_config(model)
    mean = torch.tensor(config["mean"], device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(config["std"], device=device).view(1, 3, 1, 1) * 255.0
    optimizer = build_optimizer(model, "adamw", lr, weight_decay, (0.9, 0.999))
    os.makedirs(out, exist_ok=True)
    metrics_path = os.path.join(out, "metrics.jsonl")
    if os.path.exists(metrics_path):
        os.remove(metrics_path)
    step, start, loader = 0, time.perf_counter(), None
    window_loss, window_correct, window_n = 0.0, 0, 0
    while step < steps:
        if loader is None:
            loader = iter(build_loader(dataset, batch_size, seed=seed, num_workers=num_workers, start_step=step))
        try:
            images, labels = next(loader)
        except StopIteration:
            loader = None
            continue
        set_lr(optimizer, lr_at(step, peak=lr, min_lr=0.0, warmup_steps=warmup_steps, max_steps=steps))
        x = (images.to(device).float() - mean) / std
        labels = labels.to(device)
        logits = model(x)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        window_loss += float(loss.detach()) * len(labels)
        window_correct += int((logits.argmax(1) == labels).sum())
        window_n += len(labels)
        if step % log_every == 0 or step == steps:
            record = {"step": step, "loss": window_loss / window_n, "train_top1": window_correct / window_n,
                      "elapsed_s": time.perf_counter() - start}
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            print(f"[dtfast.supervised] {arch} step {step}/{steps} loss {record['loss']:.4f} "
                  f"train top-1 {100 * record['train_top1']:.1f}%", flush=True)
            window_loss, window_correct, window_n = 0.0, 0, 0
    model.reset_classifier(0)
    path = os.path.join(out, "backbone.safetensors")
    metadata = {"arch": arch, "step": str(step), "kind": "supervised"}
    if getattr(dataset, "image_size", None):
        from dtfast.data.transforms import size_text

        metadata["image_size"] = size_text(dataset.image_size)
    save_safetensors_atomic(model.state_dict(), path, metadata=metadata)
    atomic_write_text(os.path.join(out, "done.json"), json.dumps({"steps": step, "seed": seed}) + "\n")
    return path
