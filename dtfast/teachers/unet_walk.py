"""An early-exit forward pass through a diffusers UNet that records decoder features.

`walk_unet` mirrors `UNet2DModel.forward` and `UNet2DConditionModel.forward` (diffusers 0.30 .. 0.42) for the
configurations a teacher uses (no class / addition embeddings, no ControlNet / adapter residuals), but runs each
up block in two halves so that a feature can be taken after the block's last resnet/attention and BEFORE its
upsampler, and so that the pass can stop right after the last block that is needed.

Strides are computed from the structure (which down/up blocks resample), never from hard-coded indices:
the up block ``i`` works at stride ``up_block_strides(unet)[i]`` of the UNet's input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# Up blocks whose body (resnets [+ attentions]) and upsampler we know how to run separately.
_PLAIN_UP = {"UpBlock2D", "ResnetUpsampleBlock2D"}
_SELF_ATTN_UP = {"AttnUpBlock2D"}
_CROSS_ATTN_UP = {"CrossAttnUpBlock2D"}
_SKIP_UP = {"SkipUpBlock2D", "AttnSkipUpBlock2D"}
SUPPORTED_UP_BLOCKS = _PLAIN_UP | _SELF_ATTN_UP | _CROSS_ATTN_UP | _SKIP_UP


def _down_factor(block: nn.Module) -> int:
    return 2 if getattr(block, "downsamplers", None) is not None else 1


def _up_factor(block: nn.Module) -> int:
    if type(block).__name__ in _SKIP_UP:  # `upsampler` there only resamples the skip image, not the features
        return 2 if block.resnet_up is not None else 1
    return 2 if getattr(block, "upsamplers", None) is not None else 1


def check_supported(unet: nn.Module) -> None:
    """Raise ValueError when the UNet uses a feature the early-exit walk does not reproduce."""
    config = unet.config
    name = type(unet).__name__
    unsupported = [type(b).__name__ for b in unet.up_blocks if type(b).__name__ not in SUPPORTED_UP_BLOCKS]
    if unsupported:
        raise ValueError(
            f"{name}: up block types {unsupported} are not supported by the teacher's early-exit forward "
            f"(supported: {sorted(SUPPORTED_UP_BLOCKS)})"
        )
    problems = []
    if getattr(unet, "class_embedding", None) is not None:
        problems.append("class conditioning (class_embed_type/num_class_embeds)")
    if config.get("addition_embed_type") is not None:
        problems.append(f"addition_embed_type={config.get('addition_embed_type')!r}")
    if config.get("encoder_hid_dim_type") is not None:
        problems.append(f"encoder_hid_dim_type={config.get('encoder_hid_dim_type')!r}")
    if config.get("time_cond_proj_dim") is not None:
        problems.append("time_cond_proj_dim")
    if config.get("time_embedding_type") == "fourier":
        # score-SDE / NCSN++ models take continuous noise levels, not a DDPM timestep (noised with a DDPM
        # schedule they gave NaN features at t=0)
        problems.append("time_embedding_type='fourier' (continuous-noise score model, not a DDPM)")
    if problems:
        raise ValueError(f"{name}: a teacher UNet must be unconditional apart from text; unsupported: {problems}")


def total_down_factor(unet: nn.Module) -> int:
    """Product of the down blocks' resampling factors: input sizes must be multiples of it."""
    factor = 1
    for block in unet.down_blocks:
        factor *= _down_factor(block)
    return factor


def up_block_strides(unet: nn.Module) -> list[int]:
    """Stride (relative to the UNet input) at which each up block's body runs, in up-block order."""
    stride = total_down_factor(unet)
    strides = []
    for block in unet.up_blocks:
        strides.append(stride)
        stride //= _up_factor(block)
    return strides


def up_block_channels(unet: nn.Module) -> list[int]:
    """Output channels of each up block's body (its last resnet's output; attention keeps the width)."""
    return [int(block.resnets[-1].out_channels) for block in unet.up_blocks]


def feature_blocks(unet: nn.Module, strides: Sequence[int], input_stride: int = 1) -> list[int]:
    """Index of the up block that gives each requested stride (of the IMAGE; the UNet input is at `input_stride`).

    A decoder level is the last up block at a given stride (the one that owns the upsampler).
    """
    by_stride: dict[int, int] = {}
    for index, stride in enumerate(up_block_strides(unet)):
        by_stride[stride * input_stride] = index  # later blocks at the same stride win
    missing = [s for s in strides if s not in by_stride]
    if missing:
        raise ValueError(
            f"{type(unet).__name__}: this teacher cannot give features at stride(s) {missing}; "
            f"its decoder levels are at strides {sorted(by_stride)} of the input image"
            + (f" (the UNet runs on latents at stride {input_stride})" if input_stride > 1 else "")
        )
    return [by_stride[s] for s in strides]


def _time_embedding(unet: nn.Module, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    timesteps = timesteps.expand(sample.shape[0])
    t_emb = unet.time_proj(timesteps).to(dtype=sample.dtype)  # Timesteps returns fp32; the sample has the weights'
    if type(unet).__name__ == "UNet2DModel":
        return unet.time_embedding(t_emb)
    emb = unet.time_embedding(t_emb, None)
    if getattr(unet, "time_embed_act", None) is not None:
        emb = unet.time_embed_act(emb)
    return emb


def _up_body(
    block: nn.Module,
    hidden: torch.Tensor,
    res_samples: tuple[torch.Tensor, ...],
    temb: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
) -> torch.Tensor:
    """The up block up to (not including) its upsampler: resnets with skip concatenation, and attentions."""
    kind = type(block).__name__
    for index, resnet in enumerate(block.resnets):
        hidden = torch.cat([hidden, res_samples[-1 - index]], dim=1)
        hidden = resnet(hidden, temb)
        if kind in _SELF_ATTN_UP:
            hidden = block.attentions[index](hidden)
        elif kind in _CROSS_ATTN_UP:
            hidden = block.attentions[index](hidden, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
    if kind == "AttnSkipUpBlock2D":
        hidden = block.attentions[0](hidden)
    return hidden


def _up_sample(
    block: nn.Module, hidden: torch.Tensor, temb: torch.Tensor, skip_sample: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The up block's upsampler (and, for Skip blocks, the skip-image path)."""
    kind = type(block).__name__
    if kind in _SKIP_UP:
        skip = block.upsampler(skip_sample) if skip_sample is not None else 0
        if block.resnet_up is not None:
            skip = skip + block.skip_conv(block.act(block.skip_norm(hidden)))
            hidden = block.resnet_up(hidden, temb)
        return hidden, skip
    if block.upsamplers is not None:
        for upsampler in block.upsamplers:
            if kind == "ResnetUpsampleBlock2D" or getattr(block, "upsample_type", None) == "resnet":
                hidden = upsampler(hidden, temb)
            else:
                hidden = upsampler(hidden)
    return hidden, skip_sample


def walk_unet(
    unet: nn.Module,
    sample: torch.Tensor,
    timesteps: torch.Tensor,
    blocks: Sequence[int],
    encoder_hidden_states: torch.Tensor | None = None,
    early_exit: bool = True,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Run `unet` on `sample` at `timesteps`, recording the body output of the up blocks `blocks`.

    Returns (features in the order of `blocks`, the UNet's output `sample` or None when the pass exited early).
    With `early_exit`, nothing after the body of the last block in `blocks` is computed.
    """
    is_conditional = type(unet).__name__ != "UNet2DModel"
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    emb = _time_embedding(unet, sample, timesteps)

    skip_sample: torch.Tensor | None = sample
    sample = unet.conv_in(sample)
    down_res: tuple[torch.Tensor, ...] = (sample,)
    for block in unet.down_blocks:
        if hasattr(block, "skip_conv"):
            sample, res, skip_sample = block(hidden_states=sample, temb=emb, skip_sample=skip_sample)
        elif getattr(block, "has_cross_attention", False):
            sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            sample, res = block(hidden_states=sample, temb=emb)
        down_res += res

    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            sample = unet.mid_block(sample, emb, encoder_hidden_states=encoder_hidden_states)
        else:
            sample = unet.mid_block(sample, emb)

    last = max(blocks) if blocks else -1
    recorded: dict[int, torch.Tensor] = {}
    skip_sample = None
    for index, block in enumerate(unet.up_blocks):
        count = len(block.resnets)
        res, down_res = down_res[-count:], down_res[:-count]
        sample = _up_body(block, sample, res, emb, encoder_hidden_states)
        if index in blocks:
            recorded[index] = sample
        if early_exit and index == last:
            return [recorded[i] for i in blocks], None
        sample, skip_sample = _up_sample(block, sample, emb, skip_sample)

    if is_conditional:
        if unet.conv_norm_out is not None:
            sample = unet.conv_act(unet.conv_norm_out(sample))
        sample = unet.conv_out(sample)
    else:
        sample = unet.conv_out(unet.conv_act(unet.conv_norm_out(sample)))
        if skip_sample is not None:
            sample = sample + skip_sample
        if unet.config.time_embedding_type == "fourier":
            sample = sample / timesteps.expand(sample.shape[0]).reshape(-1, 1, 1, 1)
    return [recorded[i] for i in blocks], sample
