"""What every diffusion teacher shares: freezing, input checks, the fast-path runtime (compile, CUDA graphs).

A teacher's forward is split in two:
- outside the hot region: argument checks and drawing the fresh Gaussian noise (with an optional generator);
- `_encode(images, noise) -> tuple[Tensor, ...]`: pure tensor code (noising, VAE, UNet walk with early exit),
  the part that `torch.compile` compiles as ONE graph and that a CUDA graph captures.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from torch import nn

logger = logging.getLogger("dtfast.teachers")

EncodeFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]


@dataclasses.dataclass
class TeacherOptions:
    """Switches of the teacher's fast path (`build_teacher(**options)`); None = automatic (on for CUDA).

    Attributes:
        early_exit: stop the UNet after the last decoder block that gives a requested feature.
        channels_last: NHWC weights and activations (auto: on CUDA).
        compile: `torch.compile` the encode step as one graph (auto: on CUDA).
        compile_mode: passed to torch.compile (e.g. "max-autotune-no-cudagraphs", "reduce-overhead").
        compile_backend: torch.compile backend ("inductor"; "eager"/"aot_eager" check graph capture only).
        fullgraph: compile with fullgraph=True, i.e. fail instead of breaking the graph.
        cuda_graph: capture the encode step in a CUDA graph for the first batch shape seen (CUDA only).
        inference_mode: run under torch.inference_mode (else torch.no_grad); features come back as normal tensors.
        seed: seed of the random initialisation of a named architecture (same weights on every rank).
        latent_mode: latent teachers only: "mean" (the VAE posterior mean) or "sample" (mean + std * noise).
    """

    early_exit: bool = True
    channels_last: bool | None = None
    compile: bool | None = None
    compile_mode: str | None = None
    compile_backend: str = "inductor"
    fullgraph: bool = True
    cuda_graph: bool = False
    inference_mode: bool = True
    seed: int = 0
    latent_mode: str = "mean"

    @classmethod
    def from_kwargs(cls, **kwargs) -> TeacherOptions:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"build_teacher: unknown option(s) {unknown}; options are {sorted(names)}")
        return cls(**kwargs)

    def resolved(self, device: torch.device) -> TeacherOptions:
        """Fill the automatic switches for `device`; refuse combinations that cannot work."""
        is_cuda = device.type == "cuda"
        out = dataclasses.replace(
            self,
            channels_last=is_cuda if self.channels_last is None else self.channels_last,
            compile=is_cuda if self.compile is None else self.compile,
        )
        if device.type == "meta":
            out.compile, out.cuda_graph = False, False
        if out.cuda_graph and not is_cuda:
            raise ValueError(f"teacher option cuda_graph=True needs a CUDA device, the teacher is on {device}")
        if out.cuda_graph and out.compile and out.compile_mode == "reduce-overhead":
            raise ValueError("cuda_graph=True and compile_mode='reduce-overhead' both capture CUDA graphs: pick one")
        if out.latent_mode not in ("mean", "sample"):
            raise ValueError(f"latent_mode must be 'mean' or 'sample', got {out.latent_mode!r}")
        return out


def warn_random(name: str) -> None:
    """The loud warning of a teacher with random weights."""
    bar = "!" * 100
    logger.warning(
        "\n%s\n!! dtfast teacher %r has RANDOM weights: it teaches nothing. Distilling it only tests the pipeline.\n"
        "!! Pass teacher.pretrained=<diffusers folder or hub id> to pretrain for real.\n%s",
        bar,
        name,
        bar,
    )


class _CudaGraphRunner:
    """Captures `fn` for the first (shape, dtype) it sees and replays it; other shapes run `fn` directly."""

    def __init__(self, fn: EncodeFn, warmup: int = 3):
        self.fn = fn
        self.warmup = warmup
        self.key: tuple | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warned = False

    def __call__(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key = (tuple(images.shape), images.dtype, images.device, tuple(noise.shape), noise.dtype)
        if self.key is None:
            self._capture(images, noise, key)
        if key != self.key:
            if not self.warned:
                logger.warning("teacher CUDA graph was captured for %s; batch %s runs without it", self.key, key)
                self.warned = True
            return self.fn(images, noise)
        self.static_images.copy_(images)
        self.static_noise.copy_(noise)
        self.graph.replay()
        return self.static_out

    def _capture(self, images: torch.Tensor, noise: torch.Tensor, key: tuple) -> None:
        self.static_images = images.clone()
        self.static_noise = noise.clone()
        side = torch.cuda.Stream(device=images.device)
        side.wait_stream(torch.cuda.current_stream(images.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):  # also triggers torch.compile before capture
                self.fn(self.static_images, self.static_noise)
        torch.cuda.current_stream(images.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = self.fn(self.static_images, self.static_noise)
        self.key = key


class FrozenDiffusionTeacher(nn.Module):
    """Base of the diffusion teachers: frozen, eval mode, forward under no_grad / inference mode.

    Subclasses set `strides`, `channels`, `is_random`, `size_multiple`, implement `_encode` and `_noise_shape`,
    and call `_setup_runtime()` at the end of their __init__.
    """

    strides: tuple[int, ...]
    channels: tuple[int, ...]
    is_random: bool
    size_multiple: int
    in_channels: int = 3

    def __init__(self, options: TeacherOptions):
        super().__init__()
        self.options = options
        self._encode_fn: EncodeFn | None = None

    # ----- public API -------------------------------------------------------------------------------------------
    def feature_shapes(self, height: int, width: int) -> list[tuple[int, int, int]]:
        """(C, H, W) of each feature map for a (height, width) input, ascending stride."""
        self._check_size(height, width)
        return [(c, height // s, width // s) for c, s in zip(self.channels, self.strides)]

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """images (B, 3, H, W) float in [-1, 1] -> feature maps (B, C_l, H / s_l, W / s_l), ascending stride s_l.

        Fresh Gaussian noise is drawn at every call (from `generator` if given).
        """
        if images.dim() != 4 or images.shape[1] != self.in_channels or not images.is_floating_point():
            raise ValueError(
                f"teacher input must be float (B, {self.in_channels}, H, W) in [-1, 1], got "
                f"{tuple(images.shape)} {images.dtype}"
            )
        self._check_size(images.shape[-2], images.shape[-1])
        grad_context = torch.inference_mode() if self.options.inference_mode else torch.no_grad()
        device_type = images.device.type
        # the teacher runs in its own dtype: an outer autocast would upcast its GroupNorms to fp32
        no_autocast = torch.autocast(device_type, enabled=False) if device_type in ("cuda", "cpu") else nullcontext()
        with grad_context, no_autocast:
            if self.options.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            noise = torch.randn(
                self._noise_shape(images), generator=generator, device=images.device, dtype=torch.float32
            )
            features = self._encode_fn(images, noise)
        if self.options.inference_mode or self.options.cuda_graph:
            # inference tensors cannot be saved for backward, CUDA-graph outputs are overwritten by the next replay
            features = tuple(f.clone() for f in features)
        return list(features)

    def train(self, mode: bool = True) -> FrozenDiffusionTeacher:
        """A teacher stays in eval mode whatever its owner asks."""
        return super().train(False)

    # ----- for subclasses ---------------------------------------------------------------------------------------
    def _encode(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def _noise_shape(self, images: torch.Tensor) -> tuple[int, ...]:
        raise NotImplementedError

    def _check_size(self, height: int, width: int) -> None:
        if height % self.size_multiple or width % self.size_multiple:
            raise ValueError(
                f"teacher input size {height}x{width} must be a multiple of {self.size_multiple} "
                f"(the teacher's total downsampling factor)"
            )

    def _freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def _setup_runtime(self, device: torch.device) -> None:
        """Freeze, resolve the automatic switches for `device`, go channels_last, wrap `_encode` (compile/graph)."""
        self._freeze()
        self.options = self.options.resolved(device)
        # the option owns the memory format of the 4-D weights, either way
        memory_format = torch.channels_last if self.options.channels_last else torch.contiguous_format
        nn.Module.to(self, memory_format=memory_format)
        fn: EncodeFn = self._encode
        if self.options.compile:
            fn = torch.compile(
                fn,
                fullgraph=self.options.fullgraph,
                dynamic=False,
                mode=self.options.compile_mode,
                backend=self.options.compile_backend,
            )
        if self.options.cuda_graph:
            fn = _CudaGraphRunner(fn)
        self._encode_fn = fn


def attention_processors(module: nn.Module) -> dict[str, object]:
    """Name -> processor of every diffusers attention layer inside `module`."""
    return {
        name: sub.processor
        for name, sub in module.named_modules()
        if hasattr(sub, "set_processor") and hasattr(sub, "processor")
    }


def check_sdpa(module: nn.Module) -> None:
    """Make every attention layer of `module` use diffusers' SDPA processor (AttnProcessor2_0)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    for sub in module.modules():
        is_attention = hasattr(sub, "set_processor") and hasattr(sub, "processor")
        if is_attention and not isinstance(sub.processor, AttnProcessor2_0):
            logger.info("teacher: %s used %s; switching to SDPA", type(sub).__name__, type(sub.processor).__name__)
            sub.set_processor(AttnProcessor2_0())


def sorted_strides(strides: Sequence[int]) -> tuple[int, ...]:
    """Requested strides, ascending, without duplicates; ValueError on non-positive values."""
    strides = tuple(int(s) for s in strides)
    if not strides or any(s <= 0 for s in strides) or len(set(strides)) != len(strides):
        raise ValueError(f"teacher strides must be distinct positive integers, got {strides}")
    return tuple(sorted(strides))
