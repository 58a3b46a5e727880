"""`build_teacher`: one entry point for named (random) and pretrained diffusion teachers."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dtfast import _files

from .archs import ADM_SCHEDULER, LATENT_ARCHS, PIXEL_ARCHS, pixel_arch
from .base import FrozenDiffusionTeacher, TeacherOptions, warn_random
from .loading import EMBEDDED_PREFIX, TEACHER_INFO, detect_layout, resolve_pretrained, scheduler_folder
from .pixel import DiffusionTeacher

logger = logging.getLogger("dtfast.teachers")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 weights and activations on CUDA, fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def instantiate(model_class: type, config: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int):
    """A diffusers model from a config with seeded random weights (or none, on meta).

    CPU: seeded CPU init. CUDA: seeded init directly on the device (seconds instead of a minute for 0.5-1B
    parameters; the same weights on every rank of one card type, not the CPU init's values).
    """
    if device.type == "meta":
        with torch.device("meta"):
            model = model_class(**config)
        return nn.Module.to(model, dtype=dtype)
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices, device_type=device.type), torch.device(device):
        torch.manual_seed(seed)
        model = model_class(**config)
    # nn.Module.to: diffusers' override warns about fp32-pinned modules, which a freshly built model has none of
    return nn.Module.to(model, device=device, dtype=dtype)


def load_model(model_class: type, folder: Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """`model_class.from_pretrained(folder)` (config only on meta), with an error that says what was expected."""
    try:
        if device.type == "meta":
            config = model_class.load_config(folder)
            with torch.device("meta"):
                return nn.Module.to(model_class.from_config(config), dtype=dtype)
        # without accelerate, diffusers falls back to a full-memory load anyway, after printing a long notice
        low_memory = importlib.util.find_spec("accelerate") is not None
        model, info = model_class.from_pretrained(folder, torch_dtype=dtype, low_cpu_mem_usage=low_memory,
                                                  output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ValueError(
            f"could not load a {model_class.__name__} from {folder}: {error}. Expected a diffusers folder with "
            "config.json and diffusion_pytorch_model.safetensors (as written by save_pretrained)."
        ) from error
    # diffusers fills missing weights with random values and only logs it: a teacher must not be partly random
    problems = {kind: list(info.get(kind) or []) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems:
        summary = "; ".join(f"{kind.replace('_', ' ')} ({len(keys)}): {keys[:4]}" for kind, keys in problems.items())
        raise ValueError(f"{folder}: the weights do not match the {model_class.__name__} its config.json describes: "
                         f"{summary}. The folder is incomplete or its config and weights come from different models.")
    return model.to(device)


def load_scheduler(root: Path | None, defaults: dict[str, Any]):
    """DDPM noising of the folder's scheduler config (any diffusers scheduler with betas), else `defaults`."""
    from diffusers import DDPMScheduler

    folder = scheduler_folder(root) if root is not None else None
    if folder is None:
        if root is not None:
            logger.info("teacher: %s has no scheduler config; using %s", root, defaults)
        return DDPMScheduler(**defaults)
    config = DDPMScheduler.load_config(folder)
    if config.get("beta_schedule") is None and config.get("trained_betas") is None:
        # a variance-exploding / EDM / consistency scheduler (sigmas, no betas): its UNet takes noise levels, not
        # DDPM timesteps, and a DDPM schedule in its place would give wrong features without any error
        raise ValueError(f"{folder}: the scheduler {config.get('_class_name', '?')} has no DDPM beta schedule "
                         "(beta_schedule or trained_betas); dtfast's teachers noise images as DDPM does "
                         "(x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps), which such a model was not trained for")
    return DDPMScheduler.from_config(config)


def build_teacher(
    arch: str | None = None,
    pretrained: str | os.PathLike | None = None,
    timestep: int = 150,
    strides: Sequence[int] = (4, 8, 16, 32),
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **options: Any,
) -> FrozenDiffusionTeacher:
    """Build a frozen diffusion teacher.

    Args:
        arch: a named architecture with random weights (`adm256`, `tiny`; latent: `sd15`, `tiny-sd`), or
            `embedded:<name>`, a trained teacher shipped in the package (`dtfast/assets/<name>`).
            Ignored when `pretrained` is given.
        pretrained: a local diffusers folder (a UNet2DModel at the root or in `unet/`, optional `scheduler/`; or a
            Stable Diffusion layout `vae/ unet/ scheduler/ text_encoder/ tokenizer/`) or a hub id.
        timestep: the diffusion timestep t of the stochastic encoding (DreamTeacher: 150 ImageNet, 50 in-domain).
        strides: feature strides of the INPUT image; returned in ascending order.
        device: where the teacher lives (None: CPU; "meta" builds without weights, for FLOP counting).
        dtype: weight/activation dtype (None: bf16 on CUDA, fp32 elsewhere).
        **options: fast-path switches, see `TeacherOptions` (early_exit, channels_last, compile, cuda_graph, ...).

    Returns:
        A frozen teacher: `teacher(images in [-1, 1]) -> list of (B, C, H/s, W/s)` in ascending stride.
    """
    device = torch.device(device if device is not None else "cpu")
    dtype = dtype or default_dtype(device)
    opts = TeacherOptions.from_kwargs(**options).resolved(device)
    if (pretrained is None or str(pretrained) == "") and arch and arch.startswith(EMBEDDED_PREFIX):
        pretrained, arch = arch, None  # a shipped, trained teacher named like an architecture
    if pretrained is not None and str(pretrained) != "":
        if arch:
            logger.info("teacher: pretrained=%s given, arch=%r ignored", pretrained, arch)
        root = resolve_pretrained(pretrained)
        layout, folder = detect_layout(root)
        if layout == "latent":
            from .latent import load_latent_teacher

            return load_latent_teacher(folder, timestep, strides, device, dtype, opts)
        from diffusers import UNet2DModel

        unet = load_model(UNet2DModel, folder, device, dtype)
        scheduler = load_scheduler(root, ADM_SCHEDULER)
        return DiffusionTeacher(unet, scheduler, timestep, strides, is_random=False, options=opts)
    if not arch:
        raise ValueError(
            "build_teacher needs teacher.pretrained (a diffusers folder or hub id) or teacher.arch "
            f"(one of {sorted(PIXEL_ARCHS) + sorted(LATENT_ARCHS)})"
        )
    if arch in LATENT_ARCHS:
        from .latent import build_latent_arch

        return build_latent_arch(arch, timestep, strides, device, dtype, opts)
    from diffusers import UNet2DModel

    unet = instantiate(UNet2DModel, pixel_arch(arch), device, dtype, opts.seed)
    teacher = DiffusionTeacher(unet, load_scheduler(None, ADM_SCHEDULER), timestep, strides, True, opts)
    if device.type != "meta":
        warn_random(arch)
    return teacher


def export_teacher(unet: nn.Module, scheduler, folder: str | os.PathLike, info: dict[str, Any],
                   strides: Sequence[int] = (4, 8, 16, 32)) -> None:
    """Write a pixel teacher as ``folder/unet`` (safetensors), ``folder/scheduler`` and ``folder/dtfast_teacher.json``
    (``info``, which names the ``image_size`` to check at). The folder is built under a temporary name next to
    ``folder``, loaded back with ``build_teacher`` (features at ``strides`` for an ``image_size`` input) and only then
    moved into place, replacing an older ``folder``: an interrupted export leaves the old folder or none, never half
    of one."""
    folder = os.fspath(folder)
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = _files.mkdtemp(dir=parent, prefix=".tmp_teacher_")
    try:
        unet.save_pretrained(os.path.join(tmp, "unet"), safe_serialization=True)
        scheduler.save_pretrained(os.path.join(tmp, "scheduler"))
        with open(os.path.join(tmp, TEACHER_INFO), "w") as fh:
            json.dump(info, fh, indent=2, default=str)
        _files.set_default_modes(tmp)
        teacher = build_teacher(pretrained=tmp, timestep=0, strides=strides)
        from dtfast.data.transforms import parse_size_text

        teacher.feature_shapes(*parse_size_text(info["image_size"]))  # raises if not a usable teacher at this size
        _files.replace_folder(tmp, folder)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
