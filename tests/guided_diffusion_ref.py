"""An independent, compact implementation of OpenAI guided-diffusion's `UNetModel` (the ADM architecture), written
for tests: same module tree and parameter names as guided-diffusion (so its state dict looks like a released
checkpoint) and the same forward semantics (resblock up/down sampling, scale-shift norm, legacy or new qkv order,
float32 group norms, [cos, sin] timestep embedding). Unconditional, resblock_updown=True only: what
`dtfast.teachers.convert` maps. It shares no code with diffusers or dtfast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in at least float32 (guided-diffusion upcasts its fp16 activations here)."""

    def forward(self, x):
        return super().forward(x if x.dtype == torch.float64 else x.float()).type(x.dtype)


def norm(channels: int) -> nn.Module:
    return GroupNorm32(32, channels)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[cos, sin] of t * 10000^(-i/half), computed in float32 as guided-diffusion does."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, channels, emb_channels, out_channels=None, scale_shift=True, up=False, down=False):
        super().__init__()
        out_channels = out_channels or channels
        self.scale_shift, self.up, self.down = scale_shift, up, down
        self.in_layers = nn.Sequential(norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, (2 if scale_shift else 1) * out_channels))
        self.out_layers = nn.Sequential(norm(out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def _resample(self, x):
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2, 2)
        return x

    def forward(self, x, emb):
        h = self.in_layers[1](self.in_layers[0](x))
        h = self.in_layers[2](self._resample(h))
        x = self._resample(x)
        e = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    def __init__(self, channels, head_channels, new_order=False):
        super().__init__()
        self.heads, self.new_order = channels // head_channels, new_order
        self.norm = norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x, emb=None):
        b, c, hh, ww = x.shape
        flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(flat))
        ch, length = c // self.heads, flat.shape[-1]
        if self.new_order:  # q, k, v first, then heads
            q, k, v = (t.reshape(b * self.heads, ch, length) for t in qkv.chunk(3, dim=1))
        else:  # heads first, then q, k, v inside each head
            q, k, v = qkv.reshape(b * self.heads, 3 * ch, length).split(ch, dim=1)
        scale = ch ** -0.25
        weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale).float(), dim=-1).type(q.dtype)
        a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, length)
        return (flat + self.proj_out(a)).reshape(b, c, hh, ww)


class Step(nn.ModuleList):
    """guided-diffusion's TimestepEmbedSequential: layers that take (x, emb) or x."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, (ResBlock, AttentionBlock)) else layer(x)
        return x


class UNetModel(nn.Module):
    """guided-diffusion UNetModel(resblock_updown=True), unconditional."""

    def __init__(self, in_channels=3, model_channels=256, out_channels=6, num_res_blocks=2,
                 attention_resolutions=(8, 16, 32), channel_mult=(1, 1, 2, 2, 4, 4), num_head_channels=64,
                 use_scale_shift_norm=True, use_new_attention_order=False):
        super().__init__()
        self.model_channels = model_channels
        emb = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        ss, new = use_scale_shift_norm, use_new_attention_order
        ch = model_channels * channel_mult[0]
        self.input_blocks = nn.ModuleList([Step([nn.Conv2d(in_channels, ch, 3, padding=1)])])
        skips, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, emb, mult * model_channels, ss)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_head_channels, new))
                self.input_blocks.append(Step(layers))
                skips.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(Step([ResBlock(ch, emb, ch, ss, down=True)]))
                skips.append(ch)
                ds *= 2
        self.middle_block = Step([ResBlock(ch, emb, ch, ss), AttentionBlock(ch, num_head_channels, new),
                                  ResBlock(ch, emb, ch, ss)])
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), emb, model_channels * mult, ss)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_head_channels, new))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, emb, ch, ss, up=True))
                    ds //= 2
                self.output_blocks.append(Step(layers))
        self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))

    def forward(self, x, timesteps, features: bool = False):
        """The model output; with `features`, also each decoder level's output before its upsampler (DESIGN.md's
        teacher features: output blocks 3, 6, 9, ... without their last, upsampling ResBlock), lowest resolution
        first."""
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        hs, h, levels = [], x, []
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            for layer in block:
                if isinstance(layer, ResBlock) and layer.up:
                    levels.append(h)
                h = layer(h, emb)
        levels.append(h)
        out = self.out(h)
        return (out, levels) if features else out
