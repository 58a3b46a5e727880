"""Named teacher architectures (random weights): configs for diffusers models.

Pixel-space (`UNet2DModel`):
- ``adm256``: the ADM-256 unconditional ImageNet model of guided-diffusion (the paper's teacher): channels
  256,256,512,512,1024,1024, 2 res blocks per level, attention at 32/16/8 for a 256 input with 64-channel heads,
  scale-shift norm, resblock up/down sampling, learned sigma (6 output channels). 553M parameters. Real weights:
  convert guided-diffusion's `256x256_diffusion_uncond.pt` with `python -m dtfast.convert_adm` (same config).
- ``tiny``: the same structure with widths 32..128 and one res block per level, attention at strides 16/32;
  for tests and the demo, at 32x32 .. 256x256.

Latent (Stable-Diffusion layout: `AutoencoderKL` + `UNet2DConditionModel` + CLIP text encoder):
- ``sd15``: SD-1.5-shaped UNet and VAE (no text encoder weights needed: its empty-prompt embedding is replaced
  by a fixed random one of the right shape, as this arch only exists for benchmarking).
- ``tiny-sd``: tiny VAE / UNet / CLIP text encoder for tests.
"""

from __future__ import annotations

from typing import Any

ADM_LEVELS = ("ResnetDownsampleBlock2D",) * 3 + ("AttnDownBlock2D",) * 3
ADM_UP_LEVELS = ("AttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",) * 3

PIXEL_ARCHS: dict[str, dict[str, Any]] = {
    "adm256": {
        "sample_size": 256,
        "in_channels": 3,
        "out_channels": 6,
        "block_out_channels": (256, 256, 512, 512, 1024, 1024),
        "layers_per_block": 2,
        "down_block_types": ADM_LEVELS,
        "up_block_types": ADM_UP_LEVELS,
        "downsample_type": "resnet",
        "upsample_type": "resnet",
        "attention_head_dim": 64,
        "resnet_time_scale_shift": "scale_shift",
        "norm_num_groups": 32,
        "attn_norm_num_groups": 32,  # ADM's middle attention has a GroupNorm (diffusers drops it under scale_shift)
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    },
    "tiny": {
        "sample_size": 64,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (32, 32, 64, 64, 128, 128),
        "layers_per_block": 1,
        "down_block_types": ("ResnetDownsampleBlock2D",) * 4 + ("AttnDownBlock2D",) * 2,
        "up_block_types": ("AttnUpBlock2D",) * 2 + ("ResnetUpsampleBlock2D",) * 4,
        "downsample_type": "resnet",
        "upsample_type": "resnet",
        "attention_head_dim": 32,
        "resnet_time_scale_shift": "scale_shift",
        "norm_num_groups": 16,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    },
}

# ADM's noise schedule: linear betas, 1000 steps (guided-diffusion get_named_beta_schedule("linear", 1000)).
ADM_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}

# Stable Diffusion 1.x: scaled-linear betas 0.00085 .. 0.012, 1000 steps.
SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}

LATENT_ARCHS: dict[str, dict[str, dict[str, Any]]] = {
    "sd15": {
        "unet": {
            "sample_size": 64,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
        },
        "vae": {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "block_out_channels": (128, 256, 512, 512),
            "layers_per_block": 2,
            "latent_channels": 4,
            "sample_size": 512,
            "scaling_factor": 0.18215,
        },
        "text": {"hidden_size": 768, "max_position_embeddings": 77},
    },
    "tiny-sd": {
        "unet": {
            "sample_size": 8,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": (32, 64, 64, 64),
            "layers_per_block": 1,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "cross_attention_dim": 32,
            "attention_head_dim": 8,
            "norm_num_groups": 16,
        },
        "vae": {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "block_out_channels": (16, 16, 32, 32),
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": 8,
            "sample_size": 64,
            "scaling_factor": 0.18215,
        },
        "text": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "vocab_size": 1000,
            "max_position_embeddings": 77,
        },
    },
}


def pixel_arch(name: str) -> dict[str, Any]:
    """The UNet2DModel config of a named pixel-space architecture."""
    if name not in PIXEL_ARCHS:
        raise ValueError(
            f"unknown teacher arch {name!r}; named architectures: {sorted(PIXEL_ARCHS) + sorted(LATENT_ARCHS)}"
        )
    return dict(PIXEL_ARCHS[name])
