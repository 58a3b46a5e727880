"""Typed pretraining configuration: nested dataclasses, YAML files and dotted command-line overrides.

Every field carries its help text in ``metadata["help"]``; ``python -m dtfast.pretrain --help`` lists them all.
The defaults are the embedded demo (a small teacher, the procedural image set, a ResNet-18 student at 64x64),
which runs on a CPU in minutes; the presets in ``configs/`` set the paper's recipes.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any


def _f(default: Any, help: str, **kwargs: Any) -> Any:  # noqa: A002 - "help" reads best at the call sites
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


class CropSize:
    """For data sections with ``image_size`` (crop height, and width when square) and ``image_width`` (0 = square)."""

    @property
    def crop_hw(self) -> tuple[int, int]:
        """(height, width) of the training crops."""
        return self.image_size, self.image_width or self.image_size

    def canonical_width(self) -> None:
        """One spelling of a square crop (width 0), so that resume checks, which compare keys, see the same crop."""
        if self.image_width == self.image_size:
            self.image_width = 0


@dataclass
class DataConfig(CropSize):
    root: str = _f("", "image folder root/<class>/<image> (ImageNet layout); empty = the embedded procedural set")
    image_size: int = _f(32, "training resolution: crop height, and width unless data.image_width is set, e.g. 256 "
                         "for ImageNet; 32 = the embedded teacher's")
    image_width: int = _f(0, "crop width for non-square crops, e.g. BDD100K's 128x256: data.image_size=128 "
                          "data.image_width=256; 0 = data.image_size (square)")
    backend: str = _f("auto", "decoder: auto | torch | dali | nvjpeg (auto: DALI when importable, else torch)")
    num_workers: int = _f(2, "data-loader worker processes per rank (torch: decoding; nvjpeg: file reading); started "
                          "from a fork server once per run (see dtfast/data/workers.py)")
    num_threads: int = _f(0, "dali: CPU threads per rank; 0 = the machine's cores shared among the local ranks")
    prefetch: int = _f(-1, "batches a background thread prepares ahead (on a side CUDA stream); -1 = auto (2 on GPU, "
                       "0 on CPU)")
    hw_decoder_load: float = _f(0.65, "dali on GPU: share of JPEG decoding given to the hardware decoder (A100/H100) "
                                "instead of CUDA nvJPEG, 0..1")
    num_images: int = _f(2048, "size of the embedded procedural set (only when root is empty)")
    random_resized_crop: bool = _f(False, "random-resized crops instead of the paper's plain random crops")
    strict: bool = _f(False, "fail on the first undecodable file instead of skipping it with a counted warning")


@dataclass
class TeacherConfig:
    pretrained: str = _f("", "diffusers folder or hub id of the frozen teacher; empty = `arch`")
    arch: str = _f("embedded:teacher_tiny32", "used when `pretrained` is empty: embedded:teacher_tiny32 (the small "
                   "DDPM trained on the procedural set that ships with dtfast, 32x32) | tiny | adm256 | sd15 (named "
                   "architectures with RANDOM weights: speed tests and controls only)")
    timestep: int = _f(50, "diffusion timestep t of the stochastic encoding (paper: 150 ImageNet, 50 in-domain)")
    strides: list = _f([4, 8, 16, 32], "feature strides of the input image, ascending")
    compile: bool = _f(False, "torch.compile the teacher (early exit compiled in)")
    compile_mode: str = _f("default", "torch.compile mode of the teacher: default | max-autotune-no-cudagraphs "
                           "(autotuned kernels, minutes of compiling) | max-autotune | reduce-overhead")
    early_exit: bool = _f(True, "stop the UNet after the last decoder level that gives a feature (about 2.3x fewer "
                          "FLOPs for ADM-256); false runs the full forward (benchmark baselines only)")
    channels_last: bool = _f(True, "run the teacher in channels_last memory format")
    inference_mode: bool = _f(True, "run the teacher under torch.inference_mode (false: torch.no_grad)")
    cuda_graph: bool = _f(False, "capture the teacher's forward in a CUDA graph for the fixed batch shape (GPU only; "
                          "with compile it captures the compiled code; not with compile_mode=reduce-overhead)")
    dtype: str = _f("auto", "teacher weights/activations: auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32")
    latent_mode: str = _f("mean", "latent (Stable Diffusion) teachers: mean (the VAE posterior mean) | sample (mean + "
                          "std * noise); pixel teachers ignore it")
    shard: bool = _f(False, "partition the frozen teacher's weights across ranks with ZeRO-3 (inference only, no "
                     "optimizer state); for teachers too large to replicate. Needs dist.engine=deepspeed")


@dataclass
class StudentConfig:
    arch: str = _f("resnet18", "timm CNN backbone (resnet50, convnext_base, ...)")
    width: int = _f(64, "regressor (UPerNet-like FPN) width; the paper uses 256")
    pretrained: bool = _f(False, "start the backbone from timm's pretrained weights (needs them locally)")
    channels_last: bool = _f(True, "run the student in channels_last memory format")


@dataclass
class LossConfig:
    at_weight: float = _f(10.0, "lambda_at: weight of the attention-transfer term")
    whiten: str = _f("channel", "teacher whitening: channel (LayerNorm over C per pixel) | sample (over C,H,W)")
    at_mode: str = _f("paper", "attention-transfer distance: paper (L2 norm per sample) | code (mean squared)")
    backend: str = _f("auto", "loss kernel: auto | torch | triton | cuda | cpu")


@dataclass
class TrainConfig:
    batch_size: int = _f(16, "images per process and step (global batch = batch_size * world size * grad_accum)")
    max_steps: int = _f(100, "optimizer steps to run in total; 0 = set by train.epochs")
    epochs: float = _f(0.0, "passes over the training data (the recipe's unit): > 0 sets the run's length at start-up "
                            "to round(epochs * images / global batch) steps, so it holds on any number of processes; "
                            "train.max_steps must be 0 then")
    lr: float = _f(2e-3, "peak learning rate (absolute: not scaled with the global batch)")
    min_lr: float = _f(0.0, "learning rate at the end of the cosine schedule")
    warmup_steps: int = _f(10, "linear warm-up steps before the cosine decay")
    warmup_epochs: float = _f(0.0, "the warm-up in passes over the data (> 0 sets it in steps at start-up, as "
                                   "train.epochs does; train.warmup_steps must be 0 then)")
    weight_decay: float = _f(0.05, "decoupled weight decay (not applied to norms and biases)")
    betas: list = _f([0.9, 0.95], "optimizer betas")
    optimizer: str = _f("adamw", "adamw | lamb")
    grad_clip: float = _f(0.0, "clip the global gradient norm to this value; 0 = off")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    seed: int = _f(0, "seed of data order, noise and initialisation")
    log_every: int = _f(5, "log a metrics line every N steps")
    save_every: int = _f(50, "write a checkpoint every N steps (and at the end); 0 = only at the end")
    keep_last: int = _f(2, "checkpoints to keep")
    resume: str = _f("auto", "auto (latest checkpoint in out/ if any) | never | path to a checkpoint folder")
    export_only: bool = _f(False, "do not train: load the checkpoint train.resume names (auto: the latest in out/), "
                                  "write out/backbone_step_<N>.safetensors and exit (the run's engine; any process "
                                  "count, but the run's own under ZeRO-3)")
    bf16: bool = _f(True, "bf16 autocast for the student on GPU (CPU runs stay fp32)")
    compile: bool = _f(False, "torch.compile the student and regressor")
    cudnn_benchmark: bool = _f(True, "GPU: let cuDNN time its convolution algorithms once per input shape (the "
                                     "shapes are fixed in pretraining); false = its heuristics")


@dataclass
class DistConfig:
    engine: str = _f("deepspeed", "distributed engine: deepspeed (ZeRO, owns student + regressor) | ddp (plain "
                     "torch DDP)")
    backend: str = _f("auto", "process-group backend: auto (nccl on GPU, gloo on CPU) | nccl | gloo")
    zero_stage: int = _f(0, "DeepSpeed ZeRO stage (engine=deepspeed): 0 = replicated like DDP, 1 = optimizer state "
                         "sharded, 2 = + gradients, 3 = + parameters. LAMB needs 0 (its per-layer trust ratio needs "
                         "whole tensors)")
    bf16_mode: str = _f("autocast", "how train.bf16 runs under DeepSpeed on GPU: autocast (torch.autocast, fp32 "
                        "weights, as with ddp) | params (DeepSpeed bf16: bf16 weights and grads, fp32 master copy)")
    deepspeed_config: str = _f("", "optional DeepSpeed JSON/YAML merged over the one generated from this config "
                               "(its values win; batch size, accumulation and clipping must agree with train.*)")
    timeout_minutes: int = _f(30, "collective timeout: a rank that waits longer on its peers fails instead of hanging")


@dataclass
class BenchConfig:
    """Settings of ``python -m dtfast.bench`` (the training loop ignores them)."""

    warmup: int = _f(3, "untimed warm-up steps per row and batch size (torch.compile happens here)")
    steps: int = _f(10, "timed training steps per row and batch size")
    data: str = _f("synthetic", "synthetic (random uint8 batches already on the device: compute only) | real "
                   "(the configured data pipeline, data wait included)")
    batch_sizes: list = _f([], "batch sizes per process to measure; empty = train.batch_size")
    rows: list = _f([], "rows: baseline | optimized | config, each optionally with +switch / -switch (e.g. "
                    "optimized-compile); switches: early_exit bf16 channels_last compile fused_loss data_backend; "
                    "empty = [config], or the sweep rows with bench.sweep=true")
    sweep: bool = _f(False, "measure baseline, optimized and optimized-minus-each-switch at every batch size")
    peak_tflops: float = _f(0.0, "the device's peak TFLOP/s for model-FLOP utilisation; 0 = measure it at start-up "
                            "(a large bf16 matmul on GPU, fp32 on CPU)")
    time_budget_s: float = _f(0.0, "seconds for the whole benchmark: a row whose expected time (from the previous "
                              "batch size) no longer fits is skipped and marked so; 0 = no limit")
    results_dir: str = _f("benchmarks/results", "append one line per row to <dir>/bench_results.jsonl and write "
                          "<dir>/bench_<device>_<preset>.{md,png} (only when the folder exists); empty = do not")


@dataclass
class PretrainConfig:
    out: str = _f("runs/pretrain", "run folder: config.yaml, metrics.jsonl, checkpoints/, backbone.safetensors")
    device: str = _f("auto", "auto (cuda when available) | cpu | cuda")
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the key."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value: Any, expected: Any) -> Any:
    if dataclasses.is_dataclass(expected):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' is a section; expected a mapping, got {value!r}")
        return value
    if expected is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif expected is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
            return number
    elif expected is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif expected is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        if isinstance(value, str):
            return [_parse_scalar(v) for v in value.strip("[]()").split(",") if v.strip()]
    else:
        return value
    raise ConfigError(f"config key '{key}' expects {expected.__name__}, got {value!r} ({type(value).__name__})")


def _key_type(cls: type, parts: list[str]) -> Any:
    """The declared type of dotted key ``parts`` in config class ``cls`` (None for an unknown key: _apply names it)."""
    expected: Any = cls
    for part in parts:
        if not dataclasses.is_dataclass(expected):
            return None
        expected = _field_types(expected).get(part)
    return expected


def _parse_scalar(text: str) -> Any:
    import yaml

    return yaml.safe_load(text.strip())


def _unknown_key(key: str, cls: type) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], names, n=3)
    hint = f"; did you mean {', '.join(key.rsplit('.', 1)[0] + '.' + c if '.' in key else c for c in close)}?" \
        if close else f"; valid keys here: {', '.join(names)}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _apply(obj: Any, mapping: dict[str, Any], prefix: str = "") -> None:
    types = _field_types(type(obj))
    for name, value in mapping.items():
        key = f"{prefix}{name}"
        if name not in types:
            raise _unknown_key(key, type(obj))
        expected = types[name]
        if dataclasses.is_dataclass(expected):
            _apply(getattr(obj, name), _coerce(key, value, expected), prefix=f"{key}.")
        else:
            setattr(obj, name, _coerce(key, value, expected))


def build_config(cls: type, path: str | None = None, overrides: list[str] | None = None,
                 validate_fn: Any = None) -> Any:
    """``cls()`` defaults, then the YAML file at ``path``, then ``key.sub=value`` overrides, then ``validate_fn``.

    Shared by every entry point (pretraining, teacher training, evaluation): one parser, one set of error messages.
    """
    import yaml

    cfg = cls()
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path) as fh:
            try:
                data = yaml.safe_load(fh) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        _apply(cfg, data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        key, text = item.split("=", 1)
        nested: dict[str, Any] = {}
        cursor = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        # a text key takes the text as written: YAML would read "a #b" as "a", "1.10" as 1.1, "2024-06-01" as a date
        cursor[parts[-1]] = text if _key_type(cls, parts) is str else _parse_scalar(text) if text.strip() else ""
        _apply(cfg, nested)
    if validate_fn is not None:
        validate_fn(cfg)
    return cfg


def load_config(path: str | None = None, overrides: list[str] | None = None) -> PretrainConfig:
    """Defaults, then the YAML file at ``path``, then ``key.sub=value`` overrides, then validation."""
    return build_config(PretrainConfig, path, overrides, validate)


_CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "data.backend": ("auto", "torch", "dali", "nvjpeg"),
    "teacher.dtype": ("auto", "bf16", "fp16", "fp32"),
    "teacher.latent_mode": ("mean", "sample"),
    "teacher.compile_mode": ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"),
    "loss.whiten": ("channel", "sample"),
    "loss.at_mode": ("paper", "code"),
    "loss.backend": ("auto", "torch", "triton", "cuda", "cpu"),
    "train.optimizer": ("adamw", "lamb"),
    "dist.engine": ("ddp", "deepspeed"),
    "dist.backend": ("auto", "nccl", "gloo"),
    "dist.bf16_mode": ("autocast", "params"),
    "bench.data": ("synthetic", "real"),
}


def get_key(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: PretrainConfig) -> None:
    for key, choices in _CHOICES.items():
        value = get_key(cfg, key)
        if value not in choices:
            raise ConfigError(f"config key '{key}' = {value!r}; expected one of {', '.join(choices)}")
    positive = ["data.image_size", "train.batch_size", "train.grad_accum", "train.log_every"]
    for key in positive:
        if get_key(cfg, key) <= 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {get_key(cfg, key)}")
    if cfg.train.batch_size < 2:
        raise ConfigError(f"config key 'train.batch_size' must be >= 2 (images per process): the regressor's "
                          f"pooling branch has a BatchNorm over a 1x1 map, which needs 2 images to train; "
                          f"got {cfg.train.batch_size}")
    strides = cfg.teacher.strides
    if not strides or sorted(strides) != list(strides) or len(set(strides)) != len(strides):
        raise ConfigError(f"config key 'teacher.strides' must be strictly ascending, got {strides}")
    if cfg.teacher.cuda_graph and cfg.device == "cpu":
        raise ConfigError("config key 'teacher.cuda_graph' = true needs a GPU, but 'device' = cpu")
    if cfg.teacher.cuda_graph and cfg.teacher.compile and cfg.teacher.compile_mode == "reduce-overhead":
        raise ConfigError("config keys 'teacher.cuda_graph' = true and 'teacher.compile_mode' = reduce-overhead both "
                          "capture CUDA graphs: set one of them")
    _validate_dist(cfg)
    validate_schedule(cfg, ["train.min_lr", "train.max_steps", "train.warmup_steps", "train.epochs",
                            "train.warmup_epochs", "train.weight_decay", "train.grad_clip", "train.save_every",
                            "loss.at_weight", "data.num_workers", "data.num_threads", "data.image_width",
                            "teacher.timestep"])
    if not 0.0 <= cfg.data.hw_decoder_load <= 1.0:
        raise ConfigError(f"config key 'data.hw_decoder_load' must be in [0, 1] (the share of JPEG decoding given to "
                          f"the GPU's hardware decoder), got {cfg.data.hw_decoder_load}")
    _validate_length(cfg)
    cfg.data.canonical_width()


def _validate_length(cfg: PretrainConfig) -> None:
    """The run's length and warm-up: each in steps or in epochs, not both (``schedule_steps`` compares the two in
    steps, once the data set's size is known)."""
    t = cfg.train
    for steps_key, epochs_key in (("max_steps", "epochs"), ("warmup_steps", "warmup_epochs")):
        if getattr(t, steps_key) > 0 and getattr(t, epochs_key) > 0:
            raise ConfigError(f"config keys 'train.{steps_key}' = {getattr(t, steps_key)} and 'train.{epochs_key}' = "
                              f"{getattr(t, epochs_key)} both set it: set one, the other to 0 (e.g. "
                              f"train.{epochs_key}=0 train.{steps_key}=N to count in steps)")
    if t.max_steps <= 0 and t.epochs <= 0:
        raise ConfigError("the run has no length: set config key 'train.max_steps' (optimizer steps) or "
                          "'train.epochs' (passes over the data) > 0")


def warn_long_warmup(warmup: str, warmup_steps: int, length: str, max_steps: int) -> None:
    """A warm-up longer than the run is allowed (smoke runs of a few steps), with a warning that names the keys and
    says what it does. ``warmup``/``length``: the keys and values as the message shows them."""
    if 0 < max_steps < warmup_steps:
        warnings.warn(f"config key {warmup} is longer than the run ({length}): the learning rate stops at "
                      f"{max_steps / warmup_steps:.0%} of train.lr, before its peak", stacklevel=3)


def schedule_steps(cfg: PretrainConfig, num_images: int, world_size: int) -> tuple[int, int]:
    """(max_steps, warmup_steps) of the run: the configured steps, or epochs x the optimizer steps of one pass over
    ``num_images`` (each rank's whole micro-batches of its ``DistributedSampler`` shard, as the loaders read them;
    rounded half up, at least one step). Warns when the warm-up is longer than the run, in whichever units."""
    from dtfast.data.loader import steps_per_epoch

    t = cfg.train
    per_epoch = steps_per_epoch(num_images, t.batch_size, world_size) / t.grad_accum

    def steps(epochs: float) -> int:
        return max(1, math.floor(epochs * per_epoch + 0.5))

    max_steps = t.max_steps if t.max_steps > 0 else steps(t.epochs)
    warmup = t.warmup_steps if t.warmup_epochs <= 0 else steps(t.warmup_epochs)
    warn_long_warmup(f"'train.warmup_steps' = {warmup}" if t.warmup_epochs <= 0 else
                     f"'train.warmup_epochs' = {t.warmup_epochs:g} ({warmup} steps)", warmup,
                     f"'train.max_steps' = {max_steps}" if t.max_steps > 0 else
                     f"'train.epochs' = {t.epochs:g} ({max_steps} steps)", max_steps)
    return max_steps, warmup


def validate_schedule(cfg: Any, non_negative: list[str]) -> None:
    """The optimizer and schedule keys every trainer shares (``train.lr``, ``min_lr``, ``betas``, ``keep_last``) and
    the ``non_negative`` keys: values that would run without an error and train wrongly (an LR that rises or goes
    negative, a schedule that starts mid-cosine, weight growth, odd saving). Errors name the key."""
    # "not x > 0": nan passes every plain comparison (overrides refuse non-finite numbers; YAML files may not)
    if not (math.isfinite(cfg.train.lr) and cfg.train.lr > 0):
        raise ConfigError(f"config key 'train.lr' must be finite and > 0, got {cfg.train.lr}")
    for key in non_negative:
        value = get_key(cfg, key)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"config key '{key}' must be finite and >= 0, got {value}")
    if cfg.train.keep_last < 1:
        raise ConfigError(f"config key 'train.keep_last' must be >= 1 (the checkpoint a resume needs), got "
                          f"{cfg.train.keep_last}")
    if cfg.train.min_lr > cfg.train.lr:
        raise ConfigError(f"config key 'train.min_lr' = {cfg.train.min_lr} is above 'train.lr' = {cfg.train.lr}: "
                          "the cosine schedule would raise the learning rate; lower train.min_lr too")
    if len(cfg.train.betas) != 2:
        raise ConfigError(f"config key 'train.betas' needs two values, got {cfg.train.betas}")
    if not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in cfg.train.betas):
        raise ConfigError(f"config key 'train.betas' must be two numbers in [0, 1), got {cfg.train.betas}")


def _validate_dist(cfg: PretrainConfig) -> None:
    """The dist.* and teacher.shard keys, and the combinations DeepSpeed cannot run correctly."""
    if not 0 <= cfg.dist.zero_stage <= 3:
        raise ConfigError(f"config key 'dist.zero_stage' must be 0..3, got {cfg.dist.zero_stage}")
    if cfg.dist.timeout_minutes <= 0:
        raise ConfigError(f"config key 'dist.timeout_minutes' must be > 0, got {cfg.dist.timeout_minutes}")
    if cfg.dist.deepspeed_config and not os.path.isfile(cfg.dist.deepspeed_config):
        raise ConfigError(f"config key 'dist.deepspeed_config': file not found: {cfg.dist.deepspeed_config}")
    if cfg.dist.engine != "deepspeed":
        if cfg.teacher.shard:
            raise ConfigError("config key 'teacher.shard' = true needs 'dist.engine' = deepspeed (ZeRO-3 partitions "
                              f"the teacher), got dist.engine={cfg.dist.engine!r}")
        if cfg.dist.deepspeed_config:
            raise ConfigError("config key 'dist.deepspeed_config' is set but 'dist.engine' is "
                              f"{cfg.dist.engine!r}; set dist.engine=deepspeed")
        return
    if cfg.train.optimizer == "lamb" and cfg.dist.zero_stage > 0:
        raise ConfigError(f"config keys 'train.optimizer' = lamb and 'dist.zero_stage' = {cfg.dist.zero_stage}: ZeRO "
                          "hands the optimizer flattened shards, so LAMB's per-layer trust ratio would be computed "
                          "over whole shards; use dist.zero_stage=0 with lamb, or train.optimizer=adamw")
    if cfg.train.optimizer == "lamb" and cfg.train.bf16 and cfg.dist.bf16_mode == "params":
        raise ConfigError("config keys 'train.optimizer' = lamb and 'dist.bf16_mode' = params: DeepSpeed's bf16 "
                          "optimizer flattens the parameters, which breaks LAMB's per-layer trust ratio; use "
                          "dist.bf16_mode=autocast")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def help_text(cls: type = PretrainConfig, prefix: str = "") -> str:
    """One line per field: dotted key, type, default, help."""
    lines = []
    default_obj = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        ftype = _field_types(cls)[f.name]
        if dataclasses.is_dataclass(ftype):
            lines.append(f"\n[{key}]")
            lines.append(help_text(ftype, prefix=f"{key}."))
            continue
        default = getattr(default_obj, f.name)
        lines.append(f"  {key:<28} {ftype.__name__:<6} default={default!r:<16} {f.metadata.get('help', '')}")
    return "\n".join(lines)


def parse_cli(prog: str, description: str, cls: type, argv: list[str] | None = None) -> tuple[str | None, list[str]]:
    """``--config FILE``, ``--resume VALUE`` and ``key.sub=value`` overrides; ``--help`` lists every key of ``cls``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (override any with key.sub=value):\n" + help_text(cls),
    )
    parser.add_argument("--config", default=None, help="YAML file with any of the keys below")
    parser.add_argument("--resume", default=None, help="shorthand for train.resume=VALUE (auto | never | path)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, applied after the YAML file")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"train.resume={args.resume}")
    return args.config, overrides
