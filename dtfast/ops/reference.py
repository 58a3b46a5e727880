"""Pure-PyTorch definition of the DreamTeacher feature-distillation loss (DESIGN.md section 3).

This is the readable definition, the test oracle of every fused backend and the fallback where no kernel
applies. It makes several passes over the data and lets autograd save (B, C, H, W)-sized intermediates; the
fused backends (``dtfast.kernels``, ``dtfast._C``) compute the same numbers in one read per phase.

Per level l, with s = student map and g = teacher map, both (B, C, H, W):

- whitening W(g): LayerNorm without affine parameters, biased variance, eps = 1e-6, over C at each
  (b, h, w) (``whiten="channel"``) or over (C, H, W) per sample (``whiten="sample"``);
- ``mse_l = mean_{b,c,h,w} (s - W(g))^2``;
- attention map q(x)[b, hw] = sum_c x[b, c, hw]^2 on the RAW features, qhat = q / max(||q||_2, 1e-12);
- ``at_l`` = mean_b ||qhat(s)_b - qhat(g)_b||_2 (``at_mode="paper"``, gradient 0 at a zero difference) or
  mean_{b,hw} (qhat(s) - qhat(g))^2 (``at_mode="code"``);
- loss = mean_l (mse_l + at_weight * at_l). The teacher is a constant (no gradient flows into it).

Arithmetic runs in float32 at least (float64 inputs stay float64); gradients come back in the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

WHITEN_EPS = 1e-6
NORM_EPS = 1e-12
WHITEN_MODES = ("channel", "sample")
AT_MODES = ("paper", "code")


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def whiten(x: Tensor, mode: str = "channel", eps: float = WHITEN_EPS) -> Tensor:
    """LayerNorm without affine parameters: (x - mean) / sqrt(var + eps), biased variance.

    ``mode="channel"`` normalises over C at each (b, h, w); ``mode="sample"`` over (C, H, W) per b.
    x: (B, C, H, W) -> same shape, float32 or wider.
    """
    if mode not in WHITEN_MODES:
        raise ValueError(f"whiten must be one of {WHITEN_MODES}, got {mode!r}")
    if x.dim() != 4:
        raise ValueError(f"whiten expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    x = x.to(_compute_dtype(x))
    dims = (1,) if mode == "channel" else (1, 2, 3)
    mean = x.mean(dim=dims, keepdim=True)
    var = (x - mean).square().mean(dim=dims, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


def attention_map(x: Tensor) -> Tensor:
    """Spatial attention map with p = 2, L2-normalised per sample.

    q[b, hw] = sum_c x[b, c, hw]^2; returns q / max(||q[b]||_2, 1e-12). x: (B, C, H, W) -> (B, H*W), float32 or
    wider. Computed on raw (not whitened) features.
    """
    if x.dim() != 4:
        raise ValueError(f"attention_map expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    x = x.to(_compute_dtype(x))
    q = x.square().sum(dim=1).flatten(1)
    return q / torch.linalg.vector_norm(q, dim=1, keepdim=True).clamp_min(NORM_EPS)


class _SafeNorm(torch.autograd.Function):
    """||d||_2 over the last dim with gradient d / ||d|| and, by definition, 0 where ||d|| = 0."""

    @staticmethod
    def forward(ctx, d: Tensor) -> Tensor:
        norm = torch.linalg.vector_norm(d, dim=-1)
        ctx.save_for_backward(d, norm)
        return norm

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        d, norm = ctx.saved_tensors
        scale = torch.where(norm > 0, grad / torch.where(norm > 0, norm, torch.ones_like(norm)), 0.0)
        return d * scale.unsqueeze(-1)


def attention_transfer(student: Tensor, teacher: Tensor, at_mode: str = "paper") -> Tensor:
    """AT term of one level (scalar): see the module docstring. The teacher map is treated as a constant."""
    if at_mode not in AT_MODES:
        raise ValueError(f"at_mode must be one of {AT_MODES}, got {at_mode!r}")
    diff = attention_map(student) - attention_map(teacher.detach())
    if at_mode == "paper":
        return _SafeNorm.apply(diff).mean()
    return diff.square().mean()


def level_terms(student: Tensor, teacher: Tensor, whiten_mode: str = "channel",
                at_mode: str = "paper") -> tuple[Tensor, Tensor]:
    """(mse_l, at_l) of one level, both 0-d tensors in float32 or wider."""
    target = whiten(teacher.detach(), whiten_mode)
    mse = (student.to(target.dtype) - target).square().mean()
    return mse, attention_transfer(student, teacher, at_mode)


def dreamteacher_loss_parts(student_feats: list[Tensor], teacher_feats: list[Tensor], whiten: str = "channel",
                            at_mode: str = "paper") -> tuple[Tensor, Tensor]:
    """Per-level terms (mse: Tensor[L], at: Tensor[L]) of the reference loss. No input validation here."""
    terms = [level_terms(s, g, whiten, at_mode) for s, g in zip(student_feats, teacher_feats)]
    dtype = torch.float32
    for m, _ in terms:
        dtype = torch.promote_types(dtype, m.dtype)
    mse = torch.stack([m.to(dtype) for m, _ in terms])
    at = torch.stack([a.to(dtype) for _, a in terms])
    return mse, at


def dreamteacher_loss_reference(student_feats: list[Tensor], teacher_feats: list[Tensor], at_weight: float = 10.0,
                                whiten: str = "channel", at_mode: str = "paper") -> Tensor:
    """Scalar reference loss: mean over levels of mse_l + at_weight * at_l."""
    mse, at = dreamteacher_loss_parts(student_feats, teacher_feats, whiten, at_mode)
    return (mse + at_weight * at).mean()
