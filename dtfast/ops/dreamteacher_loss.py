"""DreamTeacher loss: validation, backend dispatch (in one place) and the fused ops as torch custom ops.

Backends (``backend=`` argument):

- ``"torch"``: the pure-PyTorch reference (``dtfast.ops.reference``), any device and dtype.
- ``"triton"``: ``dtfast.kernels.dreamteacher_loss`` on CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``),
  float32/bfloat16/float16.
- ``"cuda"`` / ``"cpu"``: ``torch.ops.dtfast.dreamteacher_loss_fwd/_bwd`` from the ``dtfast._C`` extension.
- ``"auto"`` (default): Triton on CUDA tensors (the CUDA C++ kernel where Triton is unavailable), the C++ kernel
  on CPU tensors, the reference otherwise (and for dtypes a fused kernel does not take). The environment variable
  ``DTFAST_BACKEND`` replaces ``"auto"``; an explicitly named backend wins over it.

The fused backends run behind two custom ops, ``dtfast_ops::dreamteacher_loss_fwd`` (-> mse[L], at[L], saved) and
``dtfast_ops::dreamteacher_loss_bwd``, with fake implementations and a registered autograd formula, so
``torch.compile(fullgraph=True)`` sees through them and the backward saves only the inputs plus the O(B*H*W)
per-level statistics the kernels return.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _backends, _validate
from ._backends import BackendUnavailable
from .reference import dreamteacher_loss_parts

BACKENDS = ("auto", "torch", "triton", "cuda", "cpu")
WHITEN_CODE = {"channel": 0, "sample": 1}
AT_MODE_CODE = {"paper": 0, "code": 1}
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EXTENSION_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@torch.compiler.assume_constant_result
def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend ("torch", "triton", "cuda" or "cpu") for maps of this device and dtype.

    Raises ValueError for an unknown name and BackendUnavailable (a RuntimeError saying why and how to get it)
    for a named backend that cannot run these maps here. Under torch.compile it runs once at trace time.
    """
    requested = requested_backend(backend)
    if requested != backend:
        try:
            return _resolve(requested, device, dtype)
        except (ValueError, RuntimeError) as e:
            raise type(e)(f"{e} (the backend was set by the environment: DTFAST_BACKEND={requested!r})") from None
    return _resolve(backend, device, dtype)


def requested_backend(backend: str) -> str:
    """``backend``, or for "auto" the ``DTFAST_BACKEND`` environment variable's choice when it names one."""
    if backend == "auto":
        return os.environ.get("DTFAST_BACKEND", "").strip().lower() or "auto"
    return backend


def _resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"dreamteacher_loss: unknown backend {backend!r}; choose one of {BACKENDS} "
                         "(DTFAST_BACKEND takes the same names)")
    device = torch.device(device)
    if backend == "auto":
        if device.type == "cuda":
            if dtype in TRITON_DTYPES and _backends.triton_available():
                return "triton"
            if dtype in EXTENSION_DTYPES and _backends.extension_has("cuda"):
                return "cuda"
        elif device.type == "cpu" and dtype in EXTENSION_DTYPES and _backends.extension_has("cpu"):
            return "cpu"
        return "torch"
    if backend == "triton":
        _backends.triton_kernels()
        if device.type != "cuda" and not (device.type == "cpu" and _backends.triton_interpreting()):
            raise BackendUnavailable(f"dreamteacher_loss: the Triton backend needs CUDA tensors (got {device}); "
                                     "CPU tensors run only under TRITON_INTERPRET=1 (slow, for tests)")
        if dtype not in TRITON_DTYPES:
            raise BackendUnavailable(f"dreamteacher_loss: the Triton backend takes {TRITON_DTYPES}, got {dtype}; "
                                     "use backend='torch' (or 'cpu'/'cuda') for it")
    elif backend in ("cpu", "cuda"):
        _backends.extension_ops()
        if device.type != backend:
            raise BackendUnavailable(f"dreamteacher_loss: backend {backend!r} needs {backend} tensors, got {device}")
        if not _backends.extension_has(backend):
            raise BackendUnavailable(f"dreamteacher_loss: dtfast._C was built without its {backend.upper()} kernel; "
                                     + ("rebuild where nvcc is found (or DTFAST_FORCE_CUDA=1)" if backend == "cuda"
                                        else "rebuild it with `pip install --no-build-isolation -e .`"))
        if dtype not in EXTENSION_DTYPES:
            raise BackendUnavailable(f"dreamteacher_loss: backend {backend!r} takes {EXTENSION_DTYPES}, got {dtype}")
    return backend


# ----------------------------------------------------------------------------------------------------------------
# Fused backends as custom ops


def _grad_like(s: Tensor) -> Tensor:
    """Gradient buffer in the layout the Triton kernels process a map in (NCHW or channels_last, else NCHW)."""
    if s.is_contiguous() or s.is_contiguous(memory_format=torch.channels_last):
        return torch.empty_like(s)
    return s.new_empty(s.shape)


@torch.library.custom_op("dtfast_ops::dreamteacher_loss_fwd", mutates_args=())
def fused_forward(student: list[Tensor], teacher: list[Tensor], whiten: int, at_mode: int,
                  backend: str) -> tuple[Tensor, Tensor, list[Tensor]]:
    """(mse[L], at[L], saved) of a fused backend ("triton", "cpu" or "cuda"); see docs/ARCHITECTURE.md."""
    mse, at, saved = _kernel_forward(student, teacher, whiten, at_mode, backend)
    return mse, at, list(saved)


@fused_forward.register_fake
def _fused_forward_fake(student, teacher, whiten, at_mode, backend):
    if backend == "triton":
        pix, samp = _backends.kernel_module("_loss_meta").saved_sizes([tuple(s.shape) for s in student], whiten)
        new = student[0].new_empty
        f32 = torch.float32
        return (new(len(student), dtype=f32), new(len(student), dtype=f32),
                [new(pix, dtype=f32), new(samp, dtype=f32)])
    # dtfast._C registers Meta kernels for its ops: they give the exact output shapes and layouts
    fwd, _ = _backends.extension_ops()
    mse, at, saved = fwd(student, teacher, whiten, at_mode)
    return mse, at, list(saved)


@torch.library.custom_op("dtfast_ops::dreamteacher_loss_bwd", mutates_args=())
def fused_backward(grad_mse: Tensor, grad_at: Tensor, student: list[Tensor], teacher: list[Tensor],
                   saved: list[Tensor], whiten: int, at_mode: int, backend: str) -> list[Tensor]:
    """Gradient of sum_l grad_mse[l] * mse_l + grad_at[l] * at_l w.r.t. each student map (fused backend)."""
    return list(_kernel_backward(grad_mse, grad_at, student, teacher, saved, whiten, at_mode, backend))


@fused_backward.register_fake
def _fused_backward_fake(grad_mse, grad_at, student, teacher, saved, whiten, at_mode, backend):
    if backend == "triton":
        return [_grad_like(s) for s in student]
    _, bwd = _backends.extension_ops()
    return list(bwd(grad_mse, grad_at, student, teacher, saved, whiten, at_mode))


def _setup_context(ctx, inputs, output) -> None:
    student, teacher, whiten, at_mode, backend = inputs
    _, _, saved = output
    ctx.mark_non_differentiable(*saved)
    _save_maps(ctx, student, teacher, saved)
    ctx.options = (len(student), whiten, at_mode, backend)


def _save_maps(ctx, student: list[Tensor], teacher: list[Tensor], saved: list[Tensor]) -> None:
    """Save the maps for backward. A teacher map made under torch.inference_mode cannot go through
    save_for_backward; it is kept on ctx instead (it cannot be changed in place outside inference mode, which is
    what save_for_backward's version check guards against)."""
    if any(g.is_inference() for g in teacher):
        ctx.save_for_backward(*student, *saved)
        ctx.inference_teacher = teacher
    else:
        ctx.save_for_backward(*student, *teacher, *saved)
        ctx.inference_teacher = None


def _saved_maps(ctx, num_levels: int) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """(student, teacher, saved) as stored by _save_maps."""
    tensors = ctx.saved_tensors
    student = list(tensors[:num_levels])
    if ctx.inference_teacher is not None:
        return student, list(ctx.inference_teacher), list(tensors[num_levels:])
    return student, list(tensors[num_levels:2 * num_levels]), list(tensors[2 * num_levels:])


def _refuse_double_backward(backend: str) -> None:
    # autograd runs a backward with grad mode on only under create_graph=True: the kernels have no derivative of
    # their own, so the second-order term would be silently dropped (e.g. a gradient penalty)
    if torch.is_grad_enabled():
        raise RuntimeError(f"dreamteacher_loss: backend={backend!r} computes gradients with fused kernels that cannot "
                           "be differentiated again (backward with create_graph=True); use backend='torch' for "
                           "double backward")


def _backward(ctx, grad_mse: Tensor | None, grad_at: Tensor | None, _grad_saved):
    num_levels, whiten, at_mode, backend = ctx.options
    _refuse_double_backward(backend)
    student, teacher, saved = _saved_maps(ctx, num_levels)
    ref = saved[0]
    if grad_mse is None:
        grad_mse = ref.new_zeros(num_levels)
    if grad_at is None:
        grad_at = ref.new_zeros(num_levels)
    grads = fused_backward(grad_mse.contiguous(), grad_at.contiguous(), student, teacher, saved, whiten, at_mode,
                           backend)
    return list(grads), [None] * num_levels, None, None, None


fused_forward.register_autograd(_backward, setup_context=_setup_context)


def _kernel_forward(student, teacher, whiten, at_mode, backend):
    if backend == "triton":
        return _backends.triton_kernels().dreamteacher_loss_forward(student, teacher, whiten, at_mode)
    fwd, _ = _backends.extension_ops()
    return fwd(student, teacher, whiten, at_mode)


def _kernel_backward(grad_mse, grad_at, student, teacher, saved, whiten, at_mode, backend, flat_grads=False):
    if backend == "triton":
        return _backends.triton_kernels().dreamteacher_loss_backward(grad_mse, grad_at, student, teacher, saved,
                                                                     whiten, at_mode, flat_grads=flat_grads)
    _, bwd = _backends.extension_ops()
    return bwd(grad_mse, grad_at, student, teacher, saved, whiten, at_mode)


class _EagerFusedLoss(torch.autograd.Function):
    """The eager path of the fused ops: same kernels and autograd formula as the custom ops, without their
    per-call Python overhead (the custom ops are what torch.compile traces). Returns (loss, mse, at) with
    loss = mean_l(mse_l + at_weight * at_l): the Triton kernels compute the total and, in backward, scale the scalar
    loss gradient themselves, so the usual step (backward from the loss only) runs no composing ops."""

    @staticmethod
    def forward(ctx, whiten: int, at_mode: int, backend: str, num_levels: int, at_weight: float, *maps: Tensor):
        student, teacher = list(maps[:num_levels]), list(maps[num_levels:])
        if backend == "triton":
            loss, mse, at, saved = _backends.triton_kernels().dreamteacher_loss_forward_total(
                student, teacher, whiten, at_mode, at_weight)
        else:
            mse, at, saved = _kernel_forward(student, teacher, whiten, at_mode, backend)
            loss = torch.add(mse, at, alpha=at_weight).mean()
        _save_maps(ctx, student, teacher, saved)
        ctx.options = (num_levels, whiten, at_mode, backend, at_weight)
        ctx.set_materialize_grads(False)  # unused outputs (the parts, usually) get None, not zeros
        return loss, mse, at

    @staticmethod
    def backward(ctx, grad_loss: Tensor | None, grad_mse: Tensor | None, grad_at: Tensor | None):
        num_levels, whiten, at_mode, backend, at_weight = ctx.options
        _refuse_double_backward(backend)
        student, teacher, saved = _saved_maps(ctx, num_levels)
        none = (None,) * (5 + 2 * num_levels)
        if grad_loss is None and grad_mse is None and grad_at is None:
            return none
        # flat_grads: Triton's gradients as views into one buffer per launch group, whose metadata is the forward's
        # (custom ops may not return aliasing outputs, so the custom-op path above allocates them one by one)
        if backend == "triton" and grad_mse is None and grad_at is None:
            grads = _backends.triton_kernels().dreamteacher_loss_backward_total(
                grad_loss, at_weight, student, teacher, saved, whiten, at_mode, flat_grads=True)
        else:
            grad_mse, grad_at = _level_grads(grad_loss, grad_mse, grad_at, num_levels, at_weight, saved[0])
            grads = _kernel_backward(grad_mse, grad_at, student, teacher, saved, whiten, at_mode, backend,
                                     flat_grads=True)
        return (None,) * 5 + tuple(grads) + (None,) * num_levels


def _level_grads(grad_loss, grad_mse, grad_at, num_levels, at_weight, like):
    """Per-level gradients of mse and at from those of loss = mean_l(mse_l + at_weight * at_l) and of the parts."""
    if grad_loss is None:
        gm = ga = like.new_zeros(num_levels)
    else:
        scale = grad_loss.reshape(1) / num_levels
        gm, ga = scale.expand(num_levels), (scale * at_weight).expand(num_levels)
    gm = gm if grad_mse is None else gm + grad_mse
    ga = ga if grad_at is None else ga + grad_at
    return gm.contiguous(), ga.contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Entry point used by dtfast.ops.dreamteacher_loss


def dreamteacher_loss_terms(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], *,
                            whiten: str = "channel", at_mode: str = "paper", backend: str = "auto",
                            check_finite: bool = True) -> tuple[Tensor, Tensor]:
    """Validated per-level terms (mse: Tensor[L], at: Tensor[L]) from the chosen backend."""
    _, mse, at = dreamteacher_loss_total(student_feats, teacher_feats, whiten=whiten, at_mode=at_mode,
                                         backend=backend, check_finite=check_finite)
    return mse, at


def dreamteacher_loss_total(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], *,
                            at_weight: float = 10.0, whiten: str = "channel", at_mode: str = "paper",
                            backend: str = "auto", check_finite: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Validated (loss, mse: Tensor[L], at: Tensor[L]) from the chosen backend, loss = mean_l(mse_l + at_weight * at_l).
    Gradients flow from all three (the eager fused path is cheapest when only the loss is differentiated)."""
    _validate.check_options(whiten, at_mode)
    if not isinstance(student_feats, (list, tuple, Tensor)):
        student_feats = list(student_feats)  # e.g. a generator
    if not isinstance(teacher_feats, (list, tuple, Tensor)):
        teacher_feats = list(teacher_feats)
    _validate.check_feature_lists(student_feats, teacher_feats)
    student = list(student_feats)
    teacher = [g.detach() for g in teacher_feats]
    dtype = student[0].dtype
    if any(s.dtype != dtype for s in student):
        requested = requested_backend(backend)
        chosen = "torch" if requested == "auto" else resolve_backend(requested, student[0].device, dtype)
        if chosen != "torch":
            raise ValueError(f"dreamteacher_loss: backend {chosen!r} needs one dtype for all levels, got "
                             f"{[s.dtype for s in student]}")
    else:
        chosen = resolve_backend(backend, student[0].device, dtype)
    # a learnable at_weight (a tensor that requires grad) gets its gradient from the composed sum below
    weight_has_grad = isinstance(at_weight, Tensor) and at_weight.requires_grad
    if chosen != "torch" and not torch.compiler.is_compiling() and not weight_has_grad:
        loss, mse, at = _EagerFusedLoss.apply(WHITEN_CODE[whiten], AT_MODE_CODE[at_mode], chosen, len(student),
                                              float(at_weight), *student, *teacher)
    else:
        if chosen == "torch":
            mse, at = dreamteacher_loss_parts(student, teacher, whiten, at_mode)
        else:
            mse, at, _ = fused_forward(student, teacher, WHITEN_CODE[whiten], AT_MODE_CODE[at_mode], chosen)
        loss = (mse + at_weight * at).mean()
    if check_finite and not torch.compiler.is_compiling():
        _validate.check_finite(mse, at, student, teacher)
    return loss, mse, at
