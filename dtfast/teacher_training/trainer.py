"""DDPM training of a diffusers ``UNet2DModel`` teacher, with EMA weights, atomic checkpoints and resume.

epsilon-prediction objective (Ho et al. 2020): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with t ~ U{0..T-1}
and eps ~ N(0, I); loss = mean (eps_theta(x_t, t) - eps)^2. The exported model is the EMA of the weights,
written with ``save_pretrained`` as ``<out>/teacher/{unet,scheduler}/`` (the layout that
``dtfast.teachers.build_teacher(pretrained=...)`` and ``teacher.pretrained=`` read).

Timesteps and noise of step n come from a generator seeded by (seed, rank, n), so a resumed run draws exactly
what an uninterrupted one would. One process or ``torchrun`` (DDP, gloo on CPU / nccl on GPU). SIGTERM/SIGINT
on any rank finish the step, write a checkpoint and stop every rank, after which ``exit_code`` is 128 + the signal
number (as in ``dtfast.pretrain``), so that ``torchrun --max-restarts`` or a scheduler restarts the job, which resumes
with ``train.resume=auto``. ``train.resume=never`` in a used folder moves the earlier run's ``metrics.jsonl`` and
``checkpoints/`` aside (``metrics.<n>.jsonl``, ``checkpoints.<n>/``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import signal
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from dtfast.teacher_training.config import ConfigError, TeacherTrainConfig, to_dict
from dtfast.teachers.build import export_teacher
from dtfast.train import checkpoint as ckpt
from dtfast.train.distributed import DistInfo, all_reduce_mean, any_rank, barrier, init_distributed, shutdown
from dtfast.train.optim import build_optimizer, lr_at, set_hyperparameters, set_lr
from dtfast.train.lifecycle import RunLifecycle

log = logging.getLogger("dtfast.train_teacher")

# keys that must agree between a checkpoint and the run resuming from it
RESUME_KEYS = ["model", "diffusion", "data.image_size", "data.image_width"]
# keys a resume takes from this run, with a warning naming them; recorded in the teacher's dtfast_teacher.json
CHANGED_KEYS = ["data.root", "data.num_images", "data.seed", "train.seed", "train.batch_size", "train.ema_decay",
                "train.max_steps", "train.lr", "train.min_lr", "train.warmup_steps", "train.weight_decay",
                "train.betas", "train.grad_clip"]
EXPORT_DIR = "teacher"


def unet_config(cfg: TeacherTrainConfig) -> dict[str, Any]:
    """The UNet2DModel config: the named arch, at the training size, with the overrides of ``cfg.model``."""
    from dtfast.teachers.archs import PIXEL_ARCHS, pixel_arch

    if cfg.model.arch not in PIXEL_ARCHS:
        raise ConfigError(f"config key 'model.arch' = {cfg.model.arch!r}; expected one of {', '.join(PIXEL_ARCHS)}")
    config = pixel_arch(cfg.model.arch)
    height, width = cfg.data.crop_hw
    config["sample_size"] = height if height == width else [height, width]
    if cfg.model.block_out_channels:
        if len(cfg.model.block_out_channels) != len(config["block_out_channels"]):
            raise ConfigError(f"config key 'model.block_out_channels' needs {len(config['block_out_channels'])} "
                              f"values for arch {cfg.model.arch!r}, got {cfg.model.block_out_channels}")
        config["block_out_channels"] = tuple(int(c) for c in cfg.model.block_out_channels)
    if cfg.model.layers_per_block > 0:
        config["layers_per_block"] = cfg.model.layers_per_block
    if cfg.model.norm_num_groups > 0:
        config["norm_num_groups"] = cfg.model.norm_num_groups
        if "attn_norm_num_groups" in config:
            config["attn_norm_num_groups"] = cfg.model.norm_num_groups
    if cfg.model.attention_head_dim > 0:
        config["attention_head_dim"] = cfg.model.attention_head_dim
    attention = [c for c, kind in zip(config["block_out_channels"], config["down_block_types"]) if "Attn" in kind]
    if any(c % config["attention_head_dim"] for c in attention):
        raise ConfigError(f"config key 'model.attention_head_dim' = {config['attention_head_dim']} does not divide "
                          f"the attention widths {attention}")
    bad = [c for c in config["block_out_channels"] if c % config["norm_num_groups"]]
    if bad:
        raise ConfigError(f"config key 'model.norm_num_groups' = {config['norm_num_groups']} does not divide the "
                          f"widths {bad}")
    # every level but the last halves the resolution; an odd size there breaks the skip connections at step 1
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    for key, value in (("data.image_size", cfg.data.image_size), ("data.image_width", cfg.data.image_width)):
        if value % factor:
            raise ConfigError(f"config key '{key}' = {value} must be a multiple of {factor} for "
                              f"model.arch={cfg.model.arch} ({len(config['block_out_channels'])} levels, "
                              f"{len(config['block_out_channels']) - 1} downsamplings)")
    config["dropout"] = cfg.model.dropout
    return config


def build_scheduler(cfg: TeacherTrainConfig):
    from diffusers import DDPMScheduler

    d = cfg.diffusion
    return DDPMScheduler(num_train_timesteps=d.num_train_timesteps, beta_schedule=d.beta_schedule,
                         beta_start=d.beta_start, beta_end=d.beta_end, prediction_type="epsilon")


class EMA:
    """Exponential moving average of a model's parameters and buffers, decay min(decay, (1 + n) / (10 + n))."""

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = float(decay)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for shadow, live in zip(self.model.parameters(), model.parameters()):
            shadow.lerp_(live.detach(), 1.0 - decay)
        for shadow, live in zip(self.model.buffers(), model.buffers()):
            shadow.copy_(live)


def _rank_seed(seed: int, rank: int, step: int) -> int:
    return (seed * 1_000_003 + rank * 10_007 + step + 7) % (2**63 - 1)


class TeacherTrainer(RunLifecycle):
    _signal_tag = b"[dtfast.train_teacher]"

    def __init__(self, cfg: TeacherTrainConfig, dist_info: DistInfo | None = None):
        from diffusers import UNet2DModel

        from dtfast.data import build_dataset, build_loader
        from dtfast.data.loader import steps_per_epoch

        self.cfg = cfg
        self.dist = dist_info or init_distributed(cfg.device)
        self.device = self.dist.device
        self._init_stop_state()
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        self.step = 0
        self.resume_history: list[dict[str, Any]] = []  # the resumes that changed CHANGED_KEYS: step, what
        self.unet = UNet2DModel(**unet_config(cfg)).to(self.device)
        self.scheduler = build_scheduler(cfg)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.ema = EMA(self.unet, cfg.train.ema_decay)
        self.optimizer = build_optimizer(self.unet, "adamw", cfg.train.lr, cfg.train.weight_decay, cfg.train.betas)
        self.model: nn.Module = self.unet
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.unet, device_ids=ids)
        self.dataset = build_dataset(cfg.data.root or None, cfg.data.crop_hw, split="train",
                                     num_images=cfg.data.num_images, seed=cfg.data.seed)
        self._build_loader = lambda start_step: build_loader(
            self.dataset, cfg.train.batch_size, rank=self.dist.rank, world_size=self.dist.world_size,
            seed=cfg.train.seed, num_workers=cfg.data.num_workers, drop_last=True, start_step=start_step)
        if steps_per_epoch(len(self.dataset), cfg.train.batch_size, self.dist.world_size) == 0:
            source = f"data.root={cfg.data.root}" if cfg.data.root else f"data.num_images={cfg.data.num_images}"
            raise ConfigError(f"config key 'train.batch_size' = {cfg.train.batch_size}: {source} has "
                              f"{len(self.dataset)} images, fewer than one batch on each of {self.dist.world_size} "
                              "rank(s); lower train.batch_size or add images")

    # ------------------------------------------------------------------ checkpoints
    def _model_state(self) -> dict[str, torch.Tensor]:
        state = {f"unet.{k}": v for k, v in self.unet.state_dict().items()}
        state.update({f"ema.{k}": v for k, v in self.ema.model.state_dict().items()})
        return state

    def save(self) -> None:
        if self.dist.is_main:
            train_state = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                           "ema_updates": self.ema.num_updates, "torch_rng": torch.get_rng_state()}
            path = ckpt.save_checkpoint(self.cfg.out, self.step, self._model_state(), train_state,
                                        {"config": to_dict(self.cfg), "kind": "teacher",
                                         "resume_history": self.resume_history},
                                        keep_last=self.cfg.train.keep_last)
            self._print(f"checkpoint: {path}")
        barrier(self.dist)

    def _load_checkpoint(self) -> str | None:
        """Load the checkpoint train.resume names (auto: the latest in out/, if any) and set the step; its path, or
        None when there is none to load. A checkpoint of another model, schedule or size is refused (ConfigError)
        before anything is loaded or written."""
        mode = self.cfg.train.resume
        if mode in ("never", ""):
            return None
        path = ckpt.read_latest(self.cfg.out) if mode == "auto" else mode
        if path is None:
            return None
        if not os.path.isdir(path):
            raise FileNotFoundError(f"train.resume={mode}: no checkpoint folder at {path}")
        model_state, train_state, meta = ckpt.load_checkpoint(path)
        defaults = to_dict(TeacherTrainConfig())  # what a checkpoint's config from before a key existed meant
        diffs = ckpt.compare_configs(meta.get("config", {}), to_dict(self.cfg), RESUME_KEYS, defaults)
        if diffs:
            raise ConfigError(f"cannot resume from {path}: its config differs in " + "; ".join(diffs) + ". Set the "
                              "checkpoint's values, or start over with train.resume=never (the earlier run's "
                              "checkpoints and metrics are moved aside) or another out")
        for prefix, module in (("unet.", self.unet), ("ema.", self.ema.model)):
            part = {k[len(prefix):]: v for k, v in model_state.items() if k.startswith(prefix)}
            module.load_state_dict(part, strict=True)
        self.optimizer.load_state_dict(train_state["optimizer"])
        # the optimizer state brought the checkpoint's weight decay and betas back: this run's values apply
        set_hyperparameters(self.optimizer, self.cfg.train.weight_decay, self.cfg.train.betas)
        self.ema.num_updates = int(train_state["ema_updates"])
        torch.set_rng_state(train_state["torch_rng"])
        self.step = int(train_state["step"])
        self.resume_history = list(meta.get("resume_history") or [])
        changed = ckpt.compare_configs(meta.get("config", {}), to_dict(self.cfg), CHANGED_KEYS, defaults)
        if changed:
            self.resume_history.append({"step": self.step, "changed": changed})
            if self.dist.is_main:
                log.warning("resuming %s with changed settings (%s): the run continues from step %d with this run's "
                            "values; the exported teacher records the change", path, "; ".join(changed), self.step)
        return path

    # ------------------------------------------------------------------ loop
    def _print(self, msg: str) -> None:
        if self.dist.is_main:
            print(f"[dtfast.train_teacher] {msg}", flush=True)

    def diffusion_loss(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Epsilon-prediction MSE of a uint8 batch (B, 3, H, W) at uniformly drawn timesteps."""
        x0 = images.to(self.device).float() / 127.5 - 1.0
        steps = torch.randint(0, len(self.alphas_cumprod), (x0.shape[0],), generator=generator, device=self.device)
        noise = torch.randn(x0.shape, generator=generator, device=self.device)
        abar = self.alphas_cumprod[steps].view(-1, 1, 1, 1)
        noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        prediction = self.model(noisy, steps).sample
        return torch.mean((prediction.float() - noise) ** 2)

    def train(self) -> str | None:
        """Steps to train.max_steps, then the export; the export folder, or None when a signal stopped the run
        (``exit_code`` then says which)."""
        cfg = self.cfg
        self._install_signal_handlers()
        if self.dist.is_main:
            os.makedirs(cfg.out, exist_ok=True)
        self.lock_out_folder()
        self.maybe_resume()
        if self.dist.is_main:  # after the resume check: a refused resume leaves the run's config as it was
            import yaml

            ckpt.atomic_write_text(os.path.join(cfg.out, "config.yaml"), yaml.safe_dump(to_dict(cfg), sort_keys=False))
        params = sum(p.numel() for p in self.unet.parameters())
        global_batch = cfg.train.batch_size * self.dist.world_size
        self._print(f"UNet2DModel {cfg.model.arch} ({params / 1e6:.2f}M parameters) at {self._size_text()}px, "
                    f"{len(self.dataset)} images ({cfg.data.root or 'embedded procedural set'}), global batch "
                    f"{global_batch}, {self.dist.world_size} process(es) on {self.device.type}, "
                    f"steps {self.step}->{cfg.train.max_steps}")
        self._in_loop = True
        try:
            stopped = self._loop(global_batch)
        finally:
            self._in_loop = False
        if stopped:
            return None
        self._stop_signal = None  # a signal after the last step's check has nothing left to stop: the run is done
        if ckpt.read_latest(cfg.out) != os.path.join(ckpt.checkpoint_dir(cfg.out), f"step_{self.step}"):
            self.save()
        return self.export()

    def _loop(self, global_batch: int) -> bool:
        """Optimizer steps to train.max_steps (or train.max_minutes); True when a signal stopped them, after a
        checkpoint."""
        cfg = self.cfg
        metrics_path = os.path.join(cfg.out, "metrics.jsonl")
        loader = iter(self._build_loader(self.step))
        start = window_start = time.perf_counter()
        window_images, window_loss, window_n = 0, torch.zeros((), device=self.device), 0
        self.model.train()
        while self.step < cfg.train.max_steps:
            try:
                images, _ = next(loader)
            except StopIteration:
                loader = iter(self._build_loader(self.step))
                images, _ = next(loader)
            lr = lr_at(self.step, peak=cfg.train.lr, min_lr=cfg.train.min_lr, warmup_steps=cfg.train.warmup_steps,
                       max_steps=cfg.train.max_steps)
            set_lr(self.optimizer, lr)
            generator = torch.Generator(device=self.device).manual_seed(
                _rank_seed(cfg.train.seed, self.dist.rank, self.step))
            loss = self.diffusion_loss(images, generator)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.unet.parameters(), cfg.train.grad_clip)
            self.optimizer.step()
            self.ema.update(self.unet)
            self.step += 1
            window_images += global_batch
            window_loss += loss.detach()
            window_n += 1
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                mean_loss = float(all_reduce_mean(window_loss / window_n, self.dist))
                if not np.isfinite(mean_loss):
                    raise FloatingPointError(f"loss is {mean_loss} at step {self.step}: lower train.lr")
                now = time.perf_counter()
                rate = window_images / max(now - window_start, 1e-9)
                eta = (cfg.train.max_steps - self.step) * global_batch / max(rate, 1e-9)
                record = {"step": self.step, "loss": mean_loss, "lr": lr, "img_per_s": rate,
                          "elapsed_s": now - start}
                if self.dist.is_main:
                    with open(metrics_path, "a") as fh:
                        fh.write(json.dumps(record) + "\n")
                self._print(f"step {self.step:>6}/{cfg.train.max_steps}  loss {mean_loss:.4f}  lr {lr:.2e}  "
                            f"{rate:.1f} img/s  eta {eta / 60:.1f} min")
                window_start, window_images, window_loss, window_n = now, 0, torch.zeros((), device=self.device), 0
            # reduced apart: every rank must know whether it stops for a signal (exit 128 + signal, no export) or
            # for the time limit (export)
            signalled = any_rank(self._stop_signal is not None, self.dist)
            out_of_time = cfg.train.max_minutes > 0 and any_rank(
                time.perf_counter() - start > 60 * cfg.train.max_minutes, self.dist)
            if signalled or out_of_time or (cfg.train.save_every and self.step % cfg.train.save_every == 0):
                self.save()
            if signalled:
                if self._stop_signal is None:  # another rank got the signal: this one stops for the same reason
                    self._stop_signal = signal.SIGTERM
                self._print(f"stopped by signal at step {self.step}; resume with train.resume=auto")
                return True
            if out_of_time:
                self._print(f"train.max_minutes={cfg.train.max_minutes} reached at step {self.step}; exporting")
                break
        return False

    def _size_text(self) -> str:
        from dtfast.data.transforms import size_text

        return size_text(self.cfg.data.crop_hw)

    def export(self) -> str | None:
        """Write the EMA UNet + scheduler as a diffusers folder ``<out>/teacher`` (atomically) and check it loads."""
        folder = os.path.join(self.cfg.out, EXPORT_DIR)
        if self.dist.is_main:
            export_teacher(self.ema.model, self.scheduler, folder, info={
                "arch": self.cfg.model.arch, "steps": self.step,
                "image_size": self.cfg.data.image_size if not self.cfg.data.image_width else self._size_text(),
                "data": self.cfg.data.root or "embedded procedural set", "config": to_dict(self.cfg),
                **({"resume_history": self.resume_history} if self.resume_history else {})})
            self._print(f"teacher (EMA weights, diffusers layout): {os.path.abspath(folder)}")
            width = f" data.image_width={self.cfg.data.image_width}" if self.cfg.data.image_width else ""
            self._print(f"use it with: python -m dtfast.pretrain teacher.pretrained={os.path.abspath(folder)} "
                        f"data.image_size={self.cfg.data.image_size}{width}")
        barrier(self.dist)
        return folder

    def close(self) -> None:
        self._restore_signal_handlers()
        self.release_out_folder()
        shutdown(self.dist)
