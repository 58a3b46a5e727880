"""Public DreamTeacher loss ops (DESIGN.md section 3): functional API and an nn.Module.

Example::

    from dtfast.ops import dreamteacher_loss
    loss = dreamteacher_loss(student_maps, teacher_maps)            # lists of (B, C_l, H_l, W_l), one per level
    parts = dreamteacher_loss(student_maps, teacher_maps, return_parts=True)  # {"loss", "mse": [L], "at": [L]}
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ._backends import BackendUnavailable
from .dreamteacher_loss import dreamteacher_loss_total, resolve_backend
from .reference import attention_map, whiten

__all__ = ["BackendUnavailable", "DreamTeacherLoss", "attention_map", "dreamteacher_loss", "resolve_backend", "whiten"]


def dreamteacher_loss(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], *, at_weight: float = 10.0,
                      whiten: str = "channel", at_mode: str = "paper", return_parts: bool = False,
                      backend: str = "auto", check_finite: bool = True) -> Tensor | dict[str, Tensor]:
    """Multi-scale DreamTeacher feature-distillation loss.

    loss = (1/L) sum_l [ mean_{b,c,h,w} (s_l - W(g_l))^2 + at_weight * AT_l ], with W the affine-free LayerNorm
    (eps 1e-6, biased variance) over C per pixel (``whiten="channel"``) or over (C, H, W) per sample
    (``"sample"``), and AT_l the attention-transfer distance between qhat(x) = q / max(||q||, 1e-12),
    q[b, hw] = sum_c x^2, of the RAW maps: mean_b ||qhat(s) - qhat(g)||_2 (``at_mode="paper"``) or
    mean_{b,hw} (qhat(s) - qhat(g))^2 (``"code"``). Gradients flow into the student maps only.

    Args:
        student_feats, teacher_feats: lists of L tensors (B, C_l, H_l, W_l), same shape, dtype and device per
            level (float32/bfloat16/float16/float64; NCHW or channels_last).
        at_weight: lambda_at. whiten, at_mode: see above.
        return_parts: return ``{"loss": scalar, "mse": Tensor[L], "at": Tensor[L]}`` instead of the scalar.
        backend: "auto", "torch", "triton", "cuda" or "cpu"; the DTFAST_BACKEND environment variable overrides
            it. See ``dtfast.ops.dreamteacher_loss.resolve_backend``.
        check_finite: raise ValueError naming the level and tensor when a term is not finite. Costs one host
            sync on 2L numbers (the maps are scanned only when something is wrong); skipped inside torch.compile.
            A training loop that checks its loss itself can pass False.

    Returns:
        The scalar loss (float32, or float64 for float64 inputs), or the dict above.
    Raises:
        ValueError: different numbers of levels, non-4-D maps, shape/dtype/device mismatch (naming the level and
            both shapes), an unsupported dtype, non-finite values, unknown options or backend names.
        BackendUnavailable (a RuntimeError): a named backend that cannot run these maps here (saying why).

    Teacher maps made under ``torch.inference_mode`` are taken as they are in eager mode; inside
    ``torch.compile`` with a fused backend, clone them first (the compiled graph saves them for backward).
    The loss value of the fused backends is computed from float32 per-pixel sums: its absolute error is about
    1e-7 times the mean square of the student map (irrelevant at training-scale losses; gradients are exact to
    float32 rounding). Use ``backend="torch"`` with float64 maps where a tiny loss must be exact.
    """
    loss, mse, at = dreamteacher_loss_total(student_feats, teacher_feats, at_weight=at_weight, whiten=whiten,
                                            at_mode=at_mode, backend=backend, check_finite=check_finite)
    if return_parts:
        return {"loss": loss, "mse": mse, "at": at}
    return loss


class DreamTeacherLoss(nn.Module):
    """``nn.Module`` wrapper of :func:`dreamteacher_loss` with fixed options; ``forward(student, teacher)``."""

    def __init__(self, at_weight: float = 10.0, whiten: str = "channel", at_mode: str = "paper",
                 return_parts: bool = False, backend: str = "auto", check_finite: bool = True) -> None:
        super().__init__()
        self.at_weight = float(at_weight)
        self.whiten = whiten
        self.at_mode = at_mode
        self.return_parts = return_parts
        self.backend = backend
        self.check_finite = check_finite

    def forward(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor | dict[str, Tensor]:
        return dreamteacher_loss(student_feats, teacher_feats, at_weight=self.at_weight, whiten=self.whiten,
                                 at_mode=self.at_mode, return_parts=self.return_parts, backend=self.backend,
                                 check_finite=self.check_finite)

    def extra_repr(self) -> str:
        return (f"at_weight={self.at_weight}, whiten={self.whiten!r}, at_mode={self.at_mode!r}, "
                f"backend={self.backend!r}")

