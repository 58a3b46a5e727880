"""The latent diffusion (Stable Diffusion layout) teacher: VAE encoder -> noised latent -> conditional UNet walk.

Strides: the VAE encoder downsamples by 2 ** (VAE levels - 1) (8 for Stable Diffusion), so the UNet's decoder levels
sit at strides 8 * (8, 4, 2, 1) = 64, 32, 16, 8 of the input image for an SD-1.x/2.x UNet. A latent teacher can give
exactly those strides; stride 4 (and anything else) is refused with an error listing the available ones.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .archs import LATENT_ARCHS, SD_SCHEDULER
from .base import FrozenDiffusionTeacher, TeacherOptions, check_sdpa, sorted_strides, warn_random
from .pixel import noise_coefficients
from .unet_walk import check_supported, feature_blocks, total_down_factor, up_block_channels, walk_unet

logger = logging.getLogger("dtfast.teachers")


class LatentDiffusionTeacher(FrozenDiffusionTeacher):
    """Frozen Stable-Diffusion-like teacher.

    forward(x0 in [-1, 1]): z0 = (E(x0) - shift) * scaling_factor with E the VAE encoder's posterior mean
    (`latent_mode="mean"`, default: the diffusion noise is the only randomness) or a posterior sample
    (`latent_mode="sample"`); z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps with fresh eps; one
    `UNet2DConditionModel` pass at t conditioned on the cached empty-prompt text embedding, with early exit.
    Only the VAE encoder is kept (the decoder is never needed); the text encoder is freed after start-up.
    """

    def __init__(
        self,
        vae: nn.Module,
        unet: nn.Module,
        scheduler,
        text_embedding: torch.Tensor,
        timestep: int = 150,
        strides: Sequence[int] = (8, 16, 32, 64),
        is_random: bool = False,
        options: TeacherOptions | None = None,
    ):
        super().__init__(options or TeacherOptions())
        check_supported(unet)
        check_sdpa(unet)
        check_sdpa(vae)
        if text_embedding.dim() != 3 or text_embedding.shape[-1] != unet.config.cross_attention_dim:
            raise ValueError(
                f"text embedding of shape {tuple(text_embedding.shape)} does not fit the UNet "
                f"(expected (1, tokens, {unet.config.cross_attention_dim}))"
            )
        if int(unet.config.in_channels) != int(vae.config.latent_channels):
            raise ValueError(
                f"the UNet takes {unet.config.in_channels} input channels but the VAE gives "
                f"{vae.config.latent_channels} latent channels: a teacher needs a text-to-image UNet on this VAE's "
                "latents (inpainting, depth and instruct-pix2pix UNets take extra input channels)"
            )
        self.vae_encoder = vae.encoder
        self.quant_conv = getattr(vae, "quant_conv", None)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(vae.config.get("shift_factor") or 0.0)
        self.latent_channels = int(vae.config.latent_channels)
        # SDXL-family VAEs may normalise latents per channel: (z - latents_mean) * scaling_factor / latents_std
        latents_mean, latents_std = vae.config.get("latents_mean"), vae.config.get("latents_std")
        if (latents_mean is None) != (latents_std is None) or (latents_mean is not None and self.shift_factor):
            raise ValueError("the VAE config must give both latents_mean and latents_std, and not with shift_factor")
        # buffers (not persistent): they follow the teacher's device, no copy per call
        shape, unet_device = (1, self.latent_channels, 1, 1), next(unet.parameters()).device
        for name, values in (("latents_mean", latents_mean), ("latents_std", latents_std)):
            value = None if values is None else torch.tensor(values, dtype=torch.float32, device=unet_device)
            self.register_buffer(name, None if value is None else value.reshape(shape), persistent=False)
        self.latent_stride = 2 ** (len(vae.config.block_out_channels) - 1)
        self.unet = unet
        self.scheduler = scheduler
        self.timestep = int(timestep)
        self.strides = sorted_strides(strides)
        self.blocks = tuple(feature_blocks(unet, self.strides, input_stride=self.latent_stride))
        self.channels = tuple(up_block_channels(unet)[b] for b in self.blocks)
        self.is_random = bool(is_random)
        self.size_multiple = self.latent_stride * total_down_factor(unet)
        self.in_channels = int(vae.config.in_channels)
        self.noise_scale = noise_coefficients(scheduler, self.timestep)
        device = next(unet.parameters()).device
        self.register_buffer("timesteps", torch.tensor([self.timestep], dtype=torch.long, device=device), False)
        dtype = unet.conv_in.weight.dtype
        self.register_buffer("text_embedding", text_embedding.to(device=device, dtype=dtype), False)
        self._setup_runtime(device)

    def _noise_shape(self, images: torch.Tensor) -> tuple[int, ...]:
        # diffusion noise, plus the posterior's noise in "sample" mode
        channels = self.latent_channels * (2 if self.options.latent_mode == "sample" else 1)
        return (images.shape[0], channels, images.shape[2] // self.latent_stride, images.shape[3] // self.latent_stride)

    def encode_latents(self, images: torch.Tensor, posterior_noise: torch.Tensor | None = None) -> torch.Tensor:
        """(E(x) - shift) * scaling_factor, or (E(x) - latents_mean) * scaling_factor / latents_std where the VAE
        config gives those: E(x) the posterior mean, or mean + std * posterior_noise."""
        moments = self.vae_encoder(images.to(self.unet.conv_in.weight.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        latents = mean
        if posterior_noise is not None:  # as diffusers' DiagonalGaussianDistribution.sample
            latents = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * posterior_noise.to(mean.dtype)
        if self.latents_mean is not None:
            return ((latents - self.latents_mean) * self.scaling_factor / self.latents_std).to(latents.dtype)
        return (latents - self.shift_factor) * self.scaling_factor

    def _encode(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, ...]:
        diffusion_noise, posterior_noise = noise[:, : self.latent_channels], None
        if self.options.latent_mode == "sample":
            posterior_noise = noise[:, self.latent_channels :]
        latents = self.encode_latents(images, posterior_noise)
        signal_scale, noise_scale = self.noise_scale
        noisy = (signal_scale * latents.float() + noise_scale * diffusion_noise).to(latents.dtype)
        context = self.text_embedding.expand(images.shape[0], -1, -1)
        features, _ = walk_unet(
            self.unet,
            noisy,
            self.timesteps,
            self.blocks,
            encoder_hidden_states=context,
            early_exit=self.options.early_exit,
        )
        return tuple(features)

    def extra_repr(self) -> str:
        return (
            f"timestep={self.timestep}, strides={self.strides}, channels={self.channels}, blocks={self.blocks}, "
            f"latent_stride={self.latent_stride}, random={self.is_random}, latent_mode={self.options.latent_mode}"
        )


def empty_prompt_embedding(text_encoder: nn.Module, tokenizer) -> torch.Tensor:
    """(1, tokens, D) last hidden state of the text encoder for the empty prompt, as the SD pipelines compute it."""
    tokens = tokenizer(
        [""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    device = next(text_encoder.parameters()).device
    use_mask = getattr(text_encoder.config, "use_attention_mask", False)
    mask = tokens.attention_mask.to(device) if use_mask else None
    with torch.no_grad():
        return text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]


def _load_text_embedding(folder: Path) -> torch.Tensor:
    missing = [p for p in ("text_encoder", "tokenizer") if not (folder / p).is_dir()]
    if missing:
        raise ValueError(
            f"{folder}: the latent teacher needs {missing} to compute the empty-prompt text embedding "
            "(a Stable Diffusion layout has vae/ unet/ scheduler/ text_encoder/ tokenizer/)"
        )
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            "a latent (Stable Diffusion) teacher needs `transformers`: pip install transformers"
        ) from error
    config = json.loads((folder / "text_encoder" / "config.json").read_text())
    model_class = getattr(transformers, (config.get("architectures") or ["CLIPTextModel"])[0], None)
    model_class = model_class or transformers.CLIPTextModel
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder / "tokenizer")
        text_encoder = model_class.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise ValueError(f"{folder}: could not load text_encoder/ or tokenizer/: {error}") from error
    embedding = empty_prompt_embedding(text_encoder.eval(), tokenizer)
    del text_encoder  # only the (1, 77, D) embedding is kept
    return embedding


def _meta_text_embedding(folder: Path, unet: nn.Module) -> torch.Tensor:
    tokens = 77
    tokenizer_config = folder / "tokenizer" / "tokenizer_config.json"
    if tokenizer_config.is_file():
        tokens = int(json.loads(tokenizer_config.read_text()).get("model_max_length", tokens))
    return torch.empty(1, tokens, unet.config.cross_attention_dim, device="meta")


def load_latent_teacher(
    folder: Path, timestep: int, strides: Sequence[int], device: torch.device, dtype: torch.dtype, opts: TeacherOptions
) -> LatentDiffusionTeacher:
    """A latent teacher from a Stable-Diffusion-layout folder (vae/ unet/ scheduler/ text_encoder/ tokenizer/)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from .build import load_model, load_scheduler

    vae = load_model(AutoencoderKL, folder / "vae", device, dtype)
    unet = load_model(UNet2DConditionModel, folder / "unet", device, dtype)
    scheduler = load_scheduler(folder, SD_SCHEDULER)
    text = _meta_text_embedding(folder, unet) if device.type == "meta" else _load_text_embedding(folder)
    return LatentDiffusionTeacher(vae, unet, scheduler, text, timestep, strides, is_random=False, options=opts)


def build_latent_arch(
    arch: str, timestep: int, strides: Sequence[int], device: torch.device, dtype: torch.dtype, opts: TeacherOptions
) -> LatentDiffusionTeacher:
    """A named latent architecture with random weights; its text embedding is a seeded random (1, 77, D) tensor."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from .build import instantiate, load_scheduler

    spec = LATENT_ARCHS[arch]
    vae = instantiate(AutoencoderKL, spec["vae"], device, dtype, opts.seed)
    unet = instantiate(UNet2DConditionModel, spec["unet"], device, dtype, opts.seed + 1)
    shape = (1, spec["text"]["max_position_embeddings"], spec["unet"]["cross_attention_dim"])
    if device.type == "meta":
        text = torch.empty(shape, device="meta")
    else:
        text = torch.randn(shape, generator=torch.Generator().manual_seed(opts.seed + 2))
    teacher = LatentDiffusionTeacher(vae, unet, load_scheduler(None, SD_SCHEDULER), text, timestep, strides, True, opts)
    if device.type != "meta":
        warn_random(arch)
    return teacher
