"""The distillation student: a timm CNN backbone (C2..C5) + the UPerNet-like regressor (DESIGN.md section 2).

The backbone is the *full* timm model created with ``num_classes=0`` and run through its
``forward_intermediates`` at the requested strides, so its parameter names are timm's own: the exported
state dict loads into ``timm.create_model(arch, pretrained=True, num_classes=0,
pretrained_cfg_overlay=dict(file=path))`` without a name map. Parts of the headless model that the pyramid
never uses (ConvNeXt's final ``head.norm``, EfficientNet's ``conv_head``/``bn2``, ...) are pruned from the
trainable module, so that DDP sees no unused parameters, and are put back, with their initial (or
pretrained) values, by ``backbone_state_dict()``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from dtfast.data.transforms import image_hw

from .regressor import UPerRegressor

__all__ = ["DistillStudent", "build_student", "check_feature_shapes"]

Shape = Sequence[int]


def check_feature_shapes(
    student_shapes: Sequence[Shape],
    teacher_shapes: Sequence[Shape],
    strides: Sequence[int] | None = None,
    arch: str | None = None,
    image_size: int | tuple[int, int] | None = None,
) -> None:
    """Raise ``ValueError`` unless the student's regressed maps have exactly the teacher's shapes.

    Args:
        student_shapes, teacher_shapes: per level (ascending stride) shapes, ``(C, H, W)`` or ``(B, C, H, W)``.
        strides: the levels' strides, for the message (default 4, 8, 16, 32, ...).
        arch, image_size: the student's timm name and the input size (S or (H, W)), for the message.

    The message names every mismatched level with its stride and both shapes. No interpolation is part of
    the method, so a size mismatch is a configuration error (image size, strides or channels).
    """
    student_shapes = [tuple(int(d) for d in s) for s in student_shapes]
    teacher_shapes = [tuple(int(d) for d in s) for s in teacher_shapes]
    if strides is None:
        strides = [4 * 2**level for level in range(max(len(student_shapes), len(teacher_shapes)))]
    if len(student_shapes) != len(teacher_shapes):
        raise ValueError(
            f"student gives {len(student_shapes)} feature levels {student_shapes} but the teacher gives "
            f"{len(teacher_shapes)} {teacher_shapes}: student.strides and teacher.strides must be equal"
        )
    problems = [
        f"level {level} (stride {stride}): student {s} vs teacher {t}"
        for level, (s, t, stride) in enumerate(zip(student_shapes, teacher_shapes, strides))
        if s != t
    ]
    if problems:
        spatial_ok = all(s[-2:] == t[-2:] for s, t in zip(student_shapes, teacher_shapes))
        height, width = image_hw(image_size) if image_size else (0, 0)
        if arch and height and width and height % max(strides) == 0 and width % max(strides) == 0 and not spatial_ok:
            # the teacher's maps are exactly size / stride here: the backbone itself rounds (valid padding)
            extent = str(height) if height == width else f"({height}, {width})"
            hint = (f" student.arch={arch} does not give maps of exactly {extent} / stride at a "
                    f"{height}x{width} input (valid-padding convolutions, as in Inception or legacy "
                    "Xception): use another backbone.")
        else:
            hint = (" Check the image size (a multiple of the largest stride avoids rounding differences), "
                    "the strides and the teacher channels given to build_student.")
        raise ValueError(
            "student/teacher feature shape mismatch (a configuration error; no interpolation is applied): "
            + "; ".join(problems) + "." + hint
        )


class DistillStudent(nn.Module):
    """Backbone + regressor. ``forward(x)``: x (B, 3, H, W) normalised with ``mean``/``std`` -> list of
    regressed maps (B, C_l, H_l, W_l), ascending stride.

    Attributes: ``arch``, ``backbone`` (timm model, pruned to the pyramid), ``regressor``, ``strides``,
    ``backbone_channels`` and ``teacher_channels`` per level, ``mean``/``std`` (tuples, timm data config).
    """

    def __init__(
        self,
        arch: str,
        backbone: nn.Module,
        feature_indices: Sequence[int],
        strides: Sequence[int],
        backbone_channels: Sequence[int],
        regressor: UPerRegressor,
        mean: Sequence[float],
        std: Sequence[float],
        export_keys: Sequence[str],
        pruned_state: dict[str, torch.Tensor],
    ) -> None:
        super().__init__()
        self.arch = arch
        self.backbone = backbone
        self.regressor = regressor
        self.feature_indices = tuple(int(i) for i in feature_indices)
        self.strides = tuple(int(s) for s in strides)
        self.backbone_channels = tuple(int(c) for c in backbone_channels)
        self.teacher_channels = tuple(regressor.out_channels)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        # Not a buffer: these are not trained, must not be broadcast by DDP, and stay on the CPU.
        self._export_keys = list(export_keys)
        self._pruned_state = pruned_state

    def forward_backbone(self, x: torch.Tensor) -> list[torch.Tensor]:
        """C2..C5 (or the requested strides) of the backbone, ascending stride."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"student {self.arch}: expected images (B, 3, H, W), got {tuple(x.shape)}")
        return list(self.backbone.forward_intermediates(x, indices=list(self.feature_indices), intermediates_only=True))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.regressor(self.forward_backbone(x))

    @torch.no_grad()
    def feature_shapes(self, height: int, width: int) -> list[tuple[int, int, int]]:
        """Shapes (C, H, W) of the regressed maps for an input of (height, width), computed on the meta device
        (no FLOPs, no memory)."""
        meta = {
            name: torch.empty_like(t, device="meta")
            for name, t in [*self.named_parameters(), *self.named_buffers()]
        }
        x = torch.empty(2, 3, int(height), int(width), device="meta")
        outputs = torch.func.functional_call(self, meta, (x,))
        return [tuple(int(d) for d in o.shape[1:]) for o in outputs]

    def backbone_state_dict(self) -> OrderedDict[str, torch.Tensor]:
        """The backbone's weights in timm naming for ``timm.create_model(arch, num_classes=0)`` (headless),
        detached CPU tensors. Loadable with ``pretrained=True, pretrained_cfg_overlay=dict(file=path)``
        after saving with ``safetensors.torch.save_file``."""
        live = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.backbone.state_dict().items()}
        state: OrderedDict[str, torch.Tensor] = OrderedDict()
        for key in self._export_keys:
            if key in live:
                state[key] = live.pop(key)
            else:
                state[key] = self._pruned_state[key].clone()
        if live:  # pruning never adds parameters; this would be a timm change worth knowing about
            raise RuntimeError(f"student {self.arch}: backbone keys missing from timm's headless model: {sorted(live)}")
        return state


def _create_timm_model(arch: str, pretrained: bool | str) -> nn.Module:
    import timm

    kwargs: dict = {"num_classes": 0}
    if isinstance(pretrained, str) and pretrained:
        kwargs["pretrained_cfg_overlay"] = {"file": pretrained}
        pretrained = True
    try:
        return timm.create_model(arch, pretrained=bool(pretrained), **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            import difflib

            close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else " (timm.list_models() lists them)"
            raise ValueError(f"student.arch={arch!r} is not a timm model{hint}") from err
        raise


def build_student(
    arch: str,
    teacher_channels: Sequence[int],
    strides: Sequence[int] = (4, 8, 16, 32),
    width: int = 256,
    pretrained: bool | str = False,
    pool_scales: Sequence[int] = (1, 2, 3, 6),
    channels_last: bool = False,
) -> DistillStudent:
    """Build the student for a teacher with ``teacher_channels`` at ``strides`` (ascending).

    Args:
        arch: a timm CNN name with ``forward_intermediates`` (resnet18/50, convnext_tiny, ...).
        teacher_channels: the teacher's channel count per level, same order as ``strides``.
        strides: the feature strides to distil (must exist in the model's ``feature_info``).
        width: regressor width (256 in the paper).
        pretrained: False (random init), True (timm's pretrained weights; needs the hub or cache) or a path to
            a weights file (loaded through ``pretrained_cfg_overlay=dict(file=...)``).
        pool_scales: PPM pool scales.
        channels_last: convert the whole student to channels_last memory format.
    """
    strides = [int(s) for s in strides]
    teacher_channels = [int(c) for c in teacher_channels]
    if len(teacher_channels) != len(strides):
        raise ValueError(f"build_student: {len(teacher_channels)} teacher channels {teacher_channels} "
                         f"for {len(strides)} strides {strides}")
    if strides != sorted(set(strides)):
        raise ValueError(f"build_student: strides must be strictly ascending, got {strides}")

    model = _create_timm_model(arch, pretrained)
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "prune_intermediate_layers"):
        raise ValueError(f"student.arch={arch!r}: this timm model has no forward_intermediates; use a timm CNN "
                         "such as resnet50 or convnext_tiny")
    info = [(int(f["reduction"]), int(f["num_chs"])) for f in model.feature_info]
    indices, channels = [], []
    for stride in strides:
        # the last feature at a stride is the stage output (some models list several taps per stride)
        matches = [i for i, (reduction, _) in enumerate(info) if reduction == stride]
        if not matches:
            raise ValueError(f"student.arch={arch!r} has no feature map at stride {stride}; "
                             f"available strides: {sorted({r for r, _ in info})}")
        indices.append(matches[-1])
        channels.append(info[matches[-1]][1])

    mean, std = _data_config(model)
    full_state = model.state_dict()
    export_keys = list(full_state)
    model.prune_intermediate_layers(indices, prune_norm=True, prune_head=True)
    kept = set(model.state_dict())
    pruned_state = {k: v.detach().to("cpu", copy=True) for k, v in full_state.items() if k not in kept}
    del full_state

    regressor = UPerRegressor(channels, teacher_channels, width=width, pool_scales=pool_scales)
    student = DistillStudent(arch, model, indices, strides, channels, regressor, mean, std, export_keys, pruned_state)
    if channels_last:
        student = student.to(memory_format=torch.channels_last)
    return student


def _data_config(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    import timm.data

    config = timm.data.resolve_model_data_config(model)
    return tuple(config["mean"]), tuple(config["std"])
