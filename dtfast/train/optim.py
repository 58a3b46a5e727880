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
    """AdamW (fused on GPU) or LAMB (``Lamb`` below, multi-tensor on GPU), over ``param_groups`` (no decay on norms
    and biases). Clipping is the engine's job (``train.grad_clip``), never the optimizer's."""
    groups = param_groups(model, weight_decay)
    betas = tuple(float(b) for b in betas)
    on_cuda = any(p.is_cuda for g in groups for p in g["params"])
    if name == "adamw":
        # fused AdamW is native PyTorch (no apex): one kernel for all parameters on GPU
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=on_cuda or None)
    if name == "lamb":
        # one LAMB on every device: DeepSpeed's FusedLamb (used before on GPU for contiguous weights) is another
        # variant (trust ratio also on norms/biases, clamped to [0.01, 10], other bias correction and eps), so the
        # same config trained differently on a GPU and its checkpoints did not resume under this class
        log.info("optimizer: dtfast Lamb (multi-tensor)")
        return Lamb(groups, lr=lr, betas=betas)
    raise ValueError(f"train.optimizer: unknown optimizer {name!r} (expected adamw or lamb)")


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al., 2019) in the NVLAMB form that apex, DeepSpeed and timm implement: Adam moments with bias
    correction, weight decay added to the update, and the layer-wise trust ratio ||w|| / ||update|| (1 where either
    norm is 0) on groups with weight decay. No gradient clipping here: the engine clips (``train.grad_clip``). apex's
    and timm's LAMB clip the global gradient norm to 1.0 by default (DeepSpeed's FusedLamb does not), so the LAMB
    presets set ``train.grad_clip: 1.0``; with it, the update is timm's ``Lamb(max_grad_norm=1.0)`` (tested).

    ``foreach`` (default: on when every parameter is on a CUDA device): each step is a fixed number of
    ``torch._foreach_*`` calls per parameter group, plus one small per-tensor multiply for the trust ratios, with no
    host synchronisation, for any memory layout (channels_last included). Without it the same update runs one
    parameter at a time, which is faster on a CPU: there each foreach op streams all the state through memory
    once, while one parameter's whole update stays in cache (`benchmarks/optim_bench.py`, ResNet-50 + regressor,
    2-vCPU VM, 2026-11-27: 108 ms per step per parameter, 192 ms foreach; timm's per-parameter Lamb 115 ms).

    timm's Lamb does the same math. Its releases before the foreach path loop over the parameters in Python on
    every device (about a dozen kernel launches per parameter), and the GPU image's timm took 18 ms per step for a
    ResNet-50 + regressor on an H200 (2026-11-27, dtfast.bench, 5% of the step; its version was not recorded). This
    class's time on a GPU is not measured yet. The state (``exp_avg``, ``exp_avg_sq``, the group's ``step``) has
    timm's layout, so checkpoints written with timm's Lamb load.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, foreach: bool | None = None):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lamb: bad hyper-parameters lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                                  "foreach": foreach})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("Lamb does not support sparse gradients")
            step = int(group.get("step", 0)) + 1
            group["step"] = step
            states = [self.state[p] for p in params]
            for p, state in zip(params, states):
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            foreach = group.get("foreach")
            if foreach is None:
                foreach = all(p.is_cuda for p in params)
            chunks = [range(len(params))] if foreach else [range(i, i + 1) for i in range(len(params))]
            for chunk in chunks:
                _lamb_update([params[i] for i in chunk], [states[i] for i in chunk], group, step)
        return loss


def _lamb_update(params: list[torch.Tensor], states: list[dict], group: dict, step: int) -> None:
    """One LAMB step for ``params`` (a whole group, or one parameter), with foreach ops."""
    beta1, beta2 = group["betas"]
    grads = [p.grad for p in params]
    exp_avgs = [state["exp_avg"] for state in states]
    exp_avg_sqs = [state["exp_avg_sq"] for state in states]
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)  # m = beta1 m + (1 - beta1) g
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)  # v = beta2 v + (1 - beta2) g^2
    # update = m_hat / (sqrt(v_hat) + eps) with m_hat = m / bc1, v_hat = v / bc2
    bias_correction1, bias_correction2 = 1.0 - beta1**step, 1.0 - beta2**step
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, math.sqrt(bias_correction2))
    torch._foreach_add_(denom, group["eps"])
    updates = torch._foreach_div(exp_avgs, denom)
    torch._foreach_div_(updates, bias_correction1)
    if group["weight_decay"] == 0:
        torch._foreach_add_(params, updates, alpha=-group["lr"])
        return
    torch._foreach_add_(updates, params, alpha=group["weight_decay"])
    # stacked in one dtype (float32, or float64 when some parameter is): the casts are no-ops normally
    norm_dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    weight_norms = torch.stack([n.to(norm_dtype) for n in torch._foreach_norm(params)])
    update_norms = torch.stack([n.to(norm_dtype) for n in torch._foreach_norm(updates)])
    ratios = torch.where((weight_norms > 0) & (update_norms > 0),
                         weight_norms / update_norms.clamp_min(torch.finfo(update_norms.dtype).tiny),
                         torch.ones_like(weight_norms))
    torch._foreach_mul_(updates, list((ratios * -group["lr"]).unbind()))
    torch._foreach_add_(params, updates)


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


def set_hyperparameters(optimizer: torch.optim.Optimizer, weight_decay: float, betas) -> None:
    """The config's weight decay and betas on ``param_groups``' groups (decay group first, then the no-decay one):
    a resumed optimizer state brings the checkpoint's values back with it. DeepSpeed's wrapper exposes the same
    groups."""
    for index, group in enumerate(optimizer.param_groups):
        group["weight_decay"] = float(weight_decay) if index == 0 else 0.0
        if "betas" in group:
            group["betas"] = tuple(float(b) for b in betas)
