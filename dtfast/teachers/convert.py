"""Convert an OpenAI guided-diffusion (ADM) checkpoint into the diffusers teacher folder dtfast loads.

The paper's ImageNet teacher is guided-diffusion's unconditional 256x256 model (`256x256_diffusion_uncond.pt`),
published as a plain PyTorch state dict of guided-diffusion's own `UNetModel`, not as a diffusers model.
`convert_state_dict` maps it onto a diffusers `UNet2DModel` of the same architecture (ResNet up/down-sampling
blocks, attention at the levels the checkpoint has it, scale-shift norm); `convert_checkpoint` writes
`<out>/unet`, `<out>/scheduler` and `<out>/dtfast_teacher.json`, the folder `teacher.pretrained=` reads.

The architecture is read from the tensors (widths, levels, blocks per level, attention levels, scale-shift norm,
learned sigma); what the tensors cannot tell is an argument: the attention head width (`num_head_channels`, 64 in
the unconditional ImageNet and LSUN models), the order of the fused qkv projection (`attention_order`: "legacy",
the default of guided-diffusion and of those checkpoints, splits heads before q/k/v; "new" is
`use_new_attention_order`) and the noise schedule (`--noise-schedule`, `--diffusion-steps`).

Checked against an independent float64 implementation of guided-diffusion's UNet (tests/guided_diffusion_ref.py):
the converted UNet2DModel gives the same output for every supported variant.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .archs import ADM_SCHEDULER

ATTENTION_ORDERS = ("legacy", "new")
NOISE_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}  # guided-diffusion name -> diffusers name


class ConversionError(ValueError):
    """The checkpoint is not a guided-diffusion UNet this converter understands; the message says why."""


@dataclass(frozen=True)
class AdmLayout:
    """What the state dict says about the guided-diffusion UNet that wrote it."""

    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]  # model_channels * channel_mult
    layers_per_block: int  # num_res_blocks
    attention: tuple[bool, ...]  # per level, from the highest resolution down
    scale_shift: bool  # use_scale_shift_norm


WRAPPER_KEYS = ("ema", "state_dict", "model")  # the EMA weights first: those are the ones a diffusion model samples


def _holds_unet(state: dict) -> bool:
    return any(isinstance(k, str) and k.endswith("input_blocks.0.0.weight") for k in state)  # "module." too


def wrapped_weights(state: dict) -> str:
    """Which entry of a training wrapper holds the weights, or "" for a bare state dict (the released files): the
    first of ``ema``, ``state_dict``, ``model`` that holds the UNet's tensors (an ``ema`` entry with only EMA
    bookkeeping does not), else the first that is a dict (a wrapper inside a wrapper)."""
    if _holds_unet(state):
        return ""
    dicts = [key for key in WRAPPER_KEYS if isinstance(state.get(key), dict)]
    return next((key for key in dicts if _holds_unet(state[key])), dicts[0] if dicts else "")


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for _ in range(2):  # e.g. {"state_dict": {"ema": {...}}}
        key = wrapped_weights(state)
        if key:
            state = state[key]
    if all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _get(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise ConversionError(f"the checkpoint has no tensor {key!r}; a guided-diffusion UNetModel "
                              f"(resblock_updown=True) would have it")
    return state[key]


def read_layout(state: dict[str, torch.Tensor]) -> AdmLayout:
    """The architecture of the guided-diffusion UNetModel whose state dict this is (ConversionError otherwise)."""
    if "input_blocks.0.0.weight" not in state or "out.2.weight" not in state:
        sample = sorted(state)[:8]
        raise ConversionError("not a guided-diffusion UNetModel state dict: expected tensors 'input_blocks.0.0.weight'"
                              f" and 'out.2.weight' (OpenAI's ADM checkpoints, e.g. 256x256_diffusion_uncond.pt); "
                              f"found keys like {sample}")
    if "label_emb.weight" in state:
        raise ConversionError("class-conditional checkpoint (it has 'label_emb.weight'): a DreamTeacher teacher "
                              "encodes images without labels; use the unconditional model "
                              "(256x256_diffusion_uncond.pt)")
    first = state["input_blocks.0.0.weight"]
    in_channels, model_channels = int(first.shape[1]), int(first.shape[0])
    out_channels = int(state["out.2.weight"].shape[0])

    def index_set(prefix: str) -> set[int]:
        return {int(m.group(1)) for k in state if (m := re.match(rf"{prefix}\.(\d+)\.", k))}

    inputs, outputs = index_set("input_blocks"), index_set("output_blocks")
    if inputs != set(range(len(inputs))) or outputs != set(range(len(outputs))) or not outputs:
        raise ConversionError(f"input/output blocks are not numbered 0..n-1 (input {sorted(inputs)}, output "
                              f"{sorted(outputs)})")
    # The decoder's first level ends with its upsampler: blocks per level = the index of that block + 1.
    per_level = None
    for k in sorted(outputs):
        attn = f"output_blocks.{k}.1.qkv.weight" in state
        upsampler = f"output_blocks.{k}.{2 if attn else 1}"
        if f"{upsampler}.conv.weight" in state:
            raise ConversionError(f"{upsampler} is a convolution upsampler: the checkpoint was trained with "
                                  "resblock_updown=False, which this converter does not map (ADM uses resblock_updown="
                                  "True)")
        if f"{upsampler}.in_layers.0.weight" in state:
            per_level = k + 1
            break
    if per_level is None:
        per_level = len(outputs)  # one level, no resampling
    if per_level < 2 or len(outputs) % per_level:
        raise ConversionError(f"{len(outputs)} output blocks do not split into levels of num_res_blocks + 1 = "
                              f"{per_level} blocks")
    levels, n = len(outputs) // per_level, per_level - 1
    if len(inputs) != 1 + levels * n + (levels - 1):
        raise ConversionError(f"{len(inputs)} input blocks, but {levels} levels of {n} res blocks need "
                              f"{1 + levels * n + levels - 1}")
    channels, attention = [], []
    for level in range(levels):
        k = 1 + level * (n + 1)
        channels.append(int(_get(state, f"input_blocks.{k}.0.out_layers.3.weight").shape[0]))
        attention.append(f"input_blocks.{k}.1.qkv.weight" in state)
        if f"input_blocks.{k + n}.0.op.weight" in state:
            raise ConversionError(f"input_blocks.{k + n} is a convolution downsampler: resblock_updown=False "
                                  "checkpoints are not supported")
    if channels[0] != model_channels:
        raise ConversionError(f"channel_mult[0] = {channels[0] / model_channels} != 1: diffusers sizes the timestep "
                              "embedding by the first level's width, guided-diffusion by model_channels")
    emb = _get(state, "input_blocks.1.0.emb_layers.1.weight")
    scale_shift = int(emb.shape[0]) == 2 * channels[0]
    return AdmLayout(in_channels, out_channels, tuple(channels), n, tuple(attention), scale_shift)


def diffusers_config(layout: AdmLayout, num_head_channels: int = 64, image_size: int = 256) -> dict[str, Any]:
    """The `UNet2DModel` config of the same architecture (`dtfast.teachers.archs.PIXEL_ARCHS["adm256"]` for ADM-256)."""
    widths = [c for c, a in zip(layout.block_out_channels, layout.attention) if a] + [layout.block_out_channels[-1]]
    if num_head_channels <= 0 or any(c % num_head_channels for c in widths):
        raise ConversionError(f"num_head_channels={num_head_channels} does not divide the attention widths {widths}")
    down = tuple("AttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in layout.attention)
    up = tuple("AttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(layout.attention))
    return {
        "sample_size": int(image_size),
        "in_channels": layout.in_channels,
        "out_channels": layout.out_channels,
        "block_out_channels": layout.block_out_channels,
        "layers_per_block": layout.layers_per_block,
        "down_block_types": down,
        "up_block_types": up,
        "downsample_type": "resnet",
        "upsample_type": "resnet",
        "attention_head_dim": int(num_head_channels),
        "resnet_time_scale_shift": "scale_shift" if layout.scale_shift else "default",
        "norm_num_groups": 32,
        # guided-diffusion's middle attention has a GroupNorm; diffusers leaves it out under scale_shift unless set
        "attn_norm_num_groups": 32,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,  # guided-diffusion's timestep embedding is [cos, sin]
        "freq_shift": 0,
    }


def convert_state_dict(state: dict[str, torch.Tensor], num_head_channels: int = 64, attention_order: str = "legacy",
                       image_size: int = 256) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(UNet2DModel config, its state dict) for a guided-diffusion UNetModel state dict. Every source tensor is used
    exactly once (ConversionError naming the ones left over otherwise)."""
    if attention_order not in ATTENTION_ORDERS:
        raise ConversionError(f"attention_order must be one of {ATTENTION_ORDERS}, got {attention_order!r}")
    state = _strip_prefix(dict(state))
    layout = read_layout(state)
    config = diffusers_config(layout, num_head_channels, image_size)
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}  # diffusers key -> the checkpoint's key it came from

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return _get(state, key)

    def copy(new: str, old: str) -> None:
        for suffix in ("weight", "bias"):
            out[f"{new}.{suffix}"] = take(f"{old}.{suffix}")
            source[f"{new}.{suffix}"] = f"{old}.{suffix}"

    def resnet(new: str, old: str) -> None:
        copy(f"{new}.norm1", f"{old}.in_layers.0")
        copy(f"{new}.conv1", f"{old}.in_layers.2")
        copy(f"{new}.time_emb_proj", f"{old}.emb_layers.1")
        copy(f"{new}.norm2", f"{old}.out_layers.0")
        copy(f"{new}.conv2", f"{old}.out_layers.3")
        if f"{old}.skip_connection.weight" in state:
            copy(f"{new}.conv_shortcut", f"{old}.skip_connection")

    def attention(new: str, old: str) -> None:
        copy(f"{new}.group_norm", f"{old}.norm")
        weight, bias = take(f"{old}.qkv.weight"), take(f"{old}.qkv.bias")  # (3C, C, 1), (3C,)
        channels = weight.shape[1]
        heads = channels // num_head_channels
        proj = _get(state, f"{old}.proj_out.weight")
        for key, tensor, shape in ((f"{old}.qkv.weight", weight, (3 * channels, channels, 1)),
                                   (f"{old}.qkv.bias", bias, (3 * channels,)),
                                   (f"{old}.proj_out.weight", proj, (channels, channels, 1))):
            if tensor.numel() != math.prod(shape) or channels % num_head_channels:
                raise ConversionError(f"checkpoint tensor {key!r} has shape {tuple(tensor.shape)}; an attention "
                                      f"block of {channels} channels with {num_head_channels}-channel heads needs "
                                      f"{shape}")
        if attention_order == "legacy":  # output channels ordered (head, q|k|v, ch)
            weight = weight.reshape(heads, 3, num_head_channels, channels).transpose(0, 1)
            bias = bias.reshape(heads, 3, num_head_channels).transpose(0, 1)
        else:  # (q|k|v, head, ch)
            weight = weight.reshape(3, heads, num_head_channels, channels)
            bias = bias.reshape(3, heads, num_head_channels)
        for i, name in enumerate(("to_q", "to_k", "to_v")):
            out[f"{new}.{name}.weight"] = weight[i].reshape(channels, channels).contiguous()
            out[f"{new}.{name}.bias"] = bias[i].reshape(channels).contiguous()
        out[f"{new}.to_out.0.weight"] = take(f"{old}.proj_out.weight").reshape(channels, channels)
        out[f"{new}.to_out.0.bias"] = take(f"{old}.proj_out.bias")

    copy("time_embedding.linear_1", "time_embed.0")
    copy("time_embedding.linear_2", "time_embed.2")
    copy("conv_in", "input_blocks.0.0")
    levels, n = len(layout.block_out_channels), layout.layers_per_block
    k = 1
    for level in range(levels):
        for j in range(n):
            resnet(f"down_blocks.{level}.resnets.{j}", f"input_blocks.{k}.0")
            if layout.attention[level]:
                attention(f"down_blocks.{level}.attentions.{j}", f"input_blocks.{k}.1")
            k += 1
        if level < levels - 1:
            resnet(f"down_blocks.{level}.downsamplers.0", f"input_blocks.{k}.0")
            k += 1
    resnet("mid_block.resnets.0", "middle_block.0")
    attention("mid_block.attentions.0", "middle_block.1")
    resnet("mid_block.resnets.1", "middle_block.2")
    k = 0
    for i in range(levels):
        has_attn = layout.attention[levels - 1 - i]
        for j in range(n + 1):
            resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{k}.0")
            if has_attn:
                attention(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{k}.1")
            if j == n and i < levels - 1:
                resnet(f"up_blocks.{i}.upsamplers.0", f"output_blocks.{k}.{2 if has_attn else 1}")
            k += 1
    copy("conv_norm_out", "out.0")
    copy("conv_out", "out.2")
    left = sorted(set(state) - used)
    if left:
        raise ConversionError(f"{len(left)} checkpoint tensors have no place in the converted model, e.g. {left[:6]}: "
                              "not an architecture this converter maps")
    from diffusers import UNet2DModel

    with torch.device("meta"):  # the shapes the architecture read from the checkpoint needs
        expected = UNet2DModel(**config).state_dict()
    for key, tensor in out.items():
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape):
            raise ConversionError(f"checkpoint tensor {source.get(key, key)!r} has shape {tuple(tensor.shape)}; the "
                                  f"UNet its other tensors describe needs {tuple(expected[key].shape)} there "
                                  f"(diffusers {key!r})")
    return config, out


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A guided-diffusion checkpoint (a torch.save'd state dict) as tensors, without running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file (e.g. 256x256_diffusion_uncond.pt from "
                                "https://github.com/openai/guided-diffusion)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - corrupt, truncated, or not a PyTorch file: one clear message
        raise ConversionError(f"{path}: not a readable PyTorch state dict ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''})") from error
    if not isinstance(state, dict):
        raise ConversionError(f"{path}: expected a state dict (name -> tensor), got a {type(state).__name__}")
    odd = [k for k, v in state.items() if not isinstance(v, (torch.Tensor, dict))]
    if odd:
        raise ConversionError(f"{path}: expected a state dict (name -> tensor); {odd[0]!r} is of type "
                              f"{type(state[odd[0]]).__name__}, not a tensor")
    return state


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, *, num_head_channels: int = 64,
                       attention_order: str = "legacy", image_size: int = 256, noise_schedule: str = "linear",
                       diffusion_steps: int = 1000, dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write the diffusers teacher folder for a guided-diffusion checkpoint; return its path.

    The folder (`unet/`, `scheduler/`, `dtfast_teacher.json` with the source file's name, size and sha256) is
    written under a temporary name, loaded back as a teacher, and only then moved to `out`.
    """
    from diffusers import DDPMScheduler, UNet2DModel

    from .build import export_teacher

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    if noise_schedule not in NOISE_SCHEDULES:
        raise ConversionError(f"noise_schedule must be one of {sorted(NOISE_SCHEDULES)}, got {noise_schedule!r}")
    if int(diffusion_steps) <= 0:
        raise ConversionError(f"diffusion_steps must be > 0, got {diffusion_steps}")
    state = load_checkpoint(checkpoint)
    config, converted = convert_state_dict(state, num_head_channels, attention_order, image_size)
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    if int(image_size) <= 0 or int(image_size) % factor:
        raise ConversionError(f"image_size={image_size}: this UNet downsamples {factor}x, so the size must be a "
                              f"positive multiple of {factor}")
    with torch.device("meta"):  # no random initialisation of weights that are replaced right away
        unet = UNet2DModel(**config)
    missing, unexpected = unet.load_state_dict(converted, strict=False, assign=True)
    if missing or unexpected:
        raise ConversionError(f"the converted tensors do not fit UNet2DModel({config}): missing {missing[:6]}, "
                              f"unexpected {unexpected[:6]}")
    if dtype is not None:
        unet.to(dtype)
    unet.eval()
    scheduler = DDPMScheduler(**{**ADM_SCHEDULER, "num_train_timesteps": int(diffusion_steps),
                                 "beta_schedule": NOISE_SCHEDULES[noise_schedule]})
    if noise_schedule == "linear":  # guided-diffusion scales the linear betas to the number of steps
        scale = 1000 / int(diffusion_steps)
        scheduler = DDPMScheduler.from_config(scheduler.config, beta_start=scale * 1e-4, beta_end=scale * 0.02)
    source = Path(checkpoint)
    info = {"source": "guided-diffusion checkpoint", "file": source.name, "bytes": source.stat().st_size,
            "weights": wrapped_weights(state) or "the state dict",
            "sha256": _sha256(source), "num_head_channels": num_head_channels, "attention_order": attention_order,
            "noise_schedule": noise_schedule, "diffusion_steps": int(diffusion_steps), "image_size": int(image_size),
            "converted_by": "python -m dtfast.convert_adm"}
    strides = [2 ** level for level in range(len(config["block_out_channels"]))]
    export_teacher(unet, scheduler, out, info, strides=strides)
    return out
