"""Optimizers (AdamW, LAMB) with no weight decay on norms and biases, and the warm-up + cosine schedule."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

log = logging.getLogger("dtfast.train")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only weights of dimension >= 2 (conv/linear kernels); norms, biases and scalars are not decayed."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, betas) -> torch.optim.Optimizer:
    """AdamW (fused on GPU) or LAMB (DeepSpeed's fused LAMB on GPU when its op builds, timm's LAMB otherwise), over
    ``param_groups`` (no decay on norms and biases). Clipping is the engine's job (``train.grad_clip``), never the
    optimizer's: timm's LAMB would otherwise clip the global norm at 1.0 on its own."""
    groups = param_groups(model, weight_decay)
    betas = tuple(float(b) for b in betas)
    on_cuda = any(p.is_cuda for g in groups for p in g["params"])
    if name == "adamw":
        # fused AdamW is native PyTorch (no apex): one kernel for all parameters on GPU
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=on_cuda or None)
    if name == "lamb":
        if on_cuda:
            import os

            # The op is JIT-built. DeepSpeed parses TORCH_CUDA_ARCH_LIST with int() and fails on "9.0a" entries
            # (seen on an H100 image), and torch's fallback parse fails on "sm_90a" (pytorch#144037): give it the
            # plain capability of this device when the list is unset or has such entries.
            arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
            if not arch_list or any(a.strip().endswith("a") for a in arch_list.replace(",", ";").split(";")):
                major, minor = torch.cuda.get_device_capability()
                os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
            try:
                from deepspeed.ops.lamb import FusedLamb
            except Exception:  # noqa: BLE001 - a broken DeepSpeed install must not stop training: fall back
                FusedLamb = None
            # DeepSpeed's fused LAMB asserts contiguous parameters: channels_last conv weights are not (seen on an
            # H100), so those students take timm's LAMB
            contiguous = all(p.is_contiguous() for g in groups for p in g["params"])
            if FusedLamb is not None and not contiguous:
                log.info("optimizer: parameters are not contiguous (channels_last); DeepSpeed's FusedLamb needs them "
                         "contiguous, using timm's Lamb")
            elif FusedLamb is not None:
                try:
                    optimizer = FusedLamb(groups, lr=lr, betas=betas, max_grad_norm=0.0)
                    log.info("optimizer: DeepSpeed FusedLamb")
                    return optimizer
                except Exception as exc:  # noqa: BLE001 - a JIT build (nvcc, ninja) or CUDA error: fall back
                    log.warning("optimizer: DeepSpeed's FusedLamb op is unavailable (%s); using timm's Lamb", exc)
        from timm.optim import Lamb

        log.info("optimizer: timm Lamb")
        return Lamb(groups, lr=lr, betas=betas, max_grad_norm=None)
    raise ValueError(f"train.optimizer: unknown optimizer {name!r} (expected adamw or lamb)")


def lr_at(step: int, *, peak: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``max_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
