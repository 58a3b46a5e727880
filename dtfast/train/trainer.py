"""The DreamTeacher pretraining loop: data -> frozen teacher -> student + regressor -> loss -> optimizer.

Models are built first; parallelism, precision and the optimizer's distribution are applied afterwards, in one
place: ``dtfast.distributed.build_engine`` (``dist.engine`` = deepspeed: ZeRO 0-3; ddp: torch DDP). The teacher is
frozen and never wrapped: replicated, or partitioned with ZeRO-3 (``teacher.shard``). Checkpoints are atomic and
resumable (``dtfast.distributed.checkpoint``); SIGTERM/SIGINT on any rank write a checkpoint and stop every rank
cleanly, after which ``exit_code`` is 128 + the signal number so that ``torchrun --max-restarts`` or a scheduler
restarts the job, which resumes with ``train.resume=auto``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import time

import numpy as np
import torch

from dtfast.distributed import checkpoint as dist_ckpt
from dtfast.distributed.engine import build_engine
from dtfast.train import checkpoint as ckpt
from dtfast.train.config import ConfigError, PretrainConfig, schedule_steps, to_dict
from dtfast.train.distributed import (
    DistInfo,
    all_reduce_mean,
    any_rank,
    barrier,
    broadcast_object,
    check_shared_folder,
    init_distributed,
    main_rank_check,
    shutdown,
)
from dtfast.train.optim import build_optimizer, lr_at, set_hyperparameters
from dtfast.train.lifecycle import RunLifecycle
from dtfast.train.timing import NullTimer

log = logging.getLogger("dtfast.train")

# keys that decide which samples a step reads: a resume with other values warns (the data position is not exact)
DATA_POSITION_KEYS = ["data.root", "data.num_images", "train.batch_size", "train.grad_accum", "train.seed"]
# keys that must agree between a checkpoint and the run resuming from it
RESUME_KEYS = ["teacher.arch", "teacher.pretrained", "teacher.strides", "student.arch", "student.width",
               "data.image_size", "data.image_width", "train.optimizer"]
# keys that change the objective or the schedule: a resume takes the new values, with a warning naming them
CHANGED_OBJECTIVE_KEYS = ["teacher.timestep", "teacher.latent_mode", "loss.at_weight", "loss.whiten", "loss.at_mode",
                          "train.max_steps", "train.epochs", "train.lr", "train.min_lr", "train.warmup_steps",
                          "train.warmup_epochs", "train.grad_clip",
                          "train.weight_decay", "train.betas"]

# the loss's parts that the metrics log (all-reduced over ranks, averaged over a step's micro-batches)
LOGGED_PARTS = ("loss", "mse", "at")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def format_duration(seconds: float) -> str:
    """'2d 03h', '4h 05m', '12m 30s', '45s': the time left at the current speed, for the progress line."""
    seconds = max(0, int(round(seconds)))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def _rank_seed(seed: int, rank: int, step: int) -> int:
    """The noise seed of one micro-batch: a hash of (seed, rank, micro-batch). A linear mix repeated itself across
    ranks (rank r at micro-batch m + 10007 drew rank r+1's noise of micro-batch m)."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, rank, step]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class Trainer(RunLifecycle):
    def __init__(self, cfg: PretrainConfig, dist_info: DistInfo | None = None):
        self.cfg = cfg
        self._init_stop_state()
        self._resumed_from: str | None = None  # the checkpoint folder this run continued from
        self._install_signal_handlers()  # before the (slow) set-up: a signal then still ends in a clean stop
        self.dist = dist_info or init_distributed(cfg.device, cfg.dist.backend, cfg.dist.timeout_minutes)
        self.device = self.dist.device
        self._micro_index = 0
        self._set_threads()
        self.apply_backend_flags()
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        self.step = 0
        self._build()

    # ------------------------------------------------------------------ set-up
    def _set_threads(self) -> None:
        if self.device.type == "cpu" and self.dist.enabled and "OMP_NUM_THREADS" not in os.environ:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", self.dist.world_size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))

    def apply_backend_flags(self) -> None:
        """Process-wide backend settings of this run (GPU: cuDNN's autotuner). The benchmark runner calls it again
        before each step, because it interleaves trainers with different settings in one process."""
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = bool(self.cfg.train.cudnn_benchmark)

    def _teacher_dtype(self) -> torch.dtype:
        if self.cfg.teacher.dtype == "auto":
            return torch.bfloat16 if self.device.type == "cuda" else torch.float32
        return _DTYPES[self.cfg.teacher.dtype]

    def _build(self) -> None:
        from dtfast.data import build_dataset, build_loader, resolve_backend
        from dtfast.ops import DreamTeacherLoss
        from dtfast.students import build_student, check_feature_shapes
        from dtfast.teachers import build_teacher

        cfg = self.cfg
        size = height, width = cfg.data.crop_hw
        options = {"compile": cfg.teacher.compile, "channels_last": cfg.teacher.channels_last,
                   "early_exit": cfg.teacher.early_exit,
                   "compile_mode": None if cfg.teacher.compile_mode == "default" else cfg.teacher.compile_mode,
                   "inference_mode": cfg.teacher.inference_mode, "cuda_graph": cfg.teacher.cuda_graph,
                   "latent_mode": cfg.teacher.latent_mode}
        if cfg.teacher.shard:
            from dtfast.distributed.teacher import SHARD_OPTIONS

            options.update(SHARD_OPTIONS)
        self.teacher = build_teacher(
            arch=cfg.teacher.arch or None,
            pretrained=cfg.teacher.pretrained or None,
            timestep=cfg.teacher.timestep,
            strides=tuple(cfg.teacher.strides),
            # a sharded teacher is built on the CPU and partitioned onto the device one parameter at a time
            device=torch.device("cpu") if cfg.teacher.shard else self.device,
            dtype=self._teacher_dtype(),
            **options,
        )
        if cfg.teacher.shard:
            from dtfast.distributed.teacher import shard_teacher

            self.teacher = shard_teacher(self.teacher, self.device, cfg.dist.timeout_minutes)
        # the crop against the teacher's total downsampling, naming the key (the teacher's own check cannot)
        multiple = int(getattr(self.teacher, "size_multiple", 1) or 1)
        for key, value in (("data.image_size", height), ("data.image_width", cfg.data.image_width)):
            if value % multiple:
                raise ConfigError(f"config key '{key}' = {value} must be a multiple of {multiple} for this teacher "
                                  f"(its total downsampling factor)")
        self.student = build_student(cfg.student.arch, self.teacher.channels, strides=tuple(cfg.teacher.strides),
                                     width=cfg.student.width, pretrained=cfg.student.pretrained).to(self.device)
        # shapes are checked once, before the first step: a mismatch is a configuration error
        self.student.eval()
        with torch.no_grad():
            probe = torch.zeros(2, 3, height, width, device=self.device)
            try:
                student_shapes = [tuple(f.shape[1:]) for f in self.student(probe)]
            except (RuntimeError, AssertionError, ValueError) as exc:
                raise ValueError(
                    f"student.arch={cfg.student.arch} cannot run a {height}x{width} input (data.image_size"
                    f"{', data.image_width' if cfg.data.image_width else ''}): "
                    f"{type(exc).__name__}: {str(exc)[:300]}. Models built for one input size (Swin, Hiera, CoAtNet, "
                    "GCViT, EfficientFormerV2, ...) are not supported as students; use a convolutional backbone"
                ) from exc
        self.student.train()
        check_feature_shapes(student_shapes, [tuple(s) for s in self.teacher.feature_shapes(height, width)],
                             strides=tuple(cfg.teacher.strides), arch=cfg.student.arch, image_size=size)
        if cfg.student.channels_last:
            self.student = self.student.to(memory_format=torch.channels_last)

        self.loss_fn = DreamTeacherLoss(at_weight=cfg.loss.at_weight, whiten=cfg.loss.whiten,
                                        at_mode=cfg.loss.at_mode, backend=cfg.loss.backend,
                                        return_parts=True, check_finite=False)
        self.optimizer = build_optimizer(self.student, cfg.train.optimizer, cfg.train.lr, cfg.train.weight_decay,
                                         cfg.train.betas)
        # the one place where parallelism, precision and the optimizer's distribution are applied
        self.engine = build_engine(self.student, self.optimizer, cfg, self.dist)
        self.optimizer = self.engine.optimizer
        self.model = self.engine.model if cfg.dist.engine == "ddp" else self.engine.engine
        self.dataset = build_dataset(cfg.data.root or None, size, num_images=cfg.data.num_images,
                                     seed=cfg.train.seed, strict=cfg.data.strict,
                                     random_resized_crop=cfg.data.random_resized_crop)
        # the run's length and warm-up in steps (train.epochs / warmup_epochs count passes over these data)
        self.max_steps, self.warmup_steps = schedule_steps(cfg, len(self.dataset), self.dist.world_size)
        # the concrete decoder now: a backend that cannot read these data fails at set-up, not at the first step
        self.data_backend = resolve_backend(cfg.data.backend, self.dataset)
        self.pipeline = None  # the InputPipeline of train(), closed when it ends (signals and errors included)
        # one epoch of raw (uint8 images, labels) batches, torch backend (dtfast.bench's real data, tests)
        self._build_loader = lambda start_step: build_loader(
            self.dataset, cfg.train.batch_size, rank=self.dist.rank, world_size=self.dist.world_size,
            seed=cfg.train.seed, num_workers=cfg.data.num_workers, drop_last=True, start_step=start_step)

    def build_pipeline(self, start_step: int):
        """The training input from global micro-batch ``start_step`` on: ``InputPipeline`` with ``data.backend``,
        endless (epochs crossed inside), ``(teacher view, student view, labels)`` on the device. Close it."""
        from dtfast.data import InputPipeline

        cfg = self.cfg
        return InputPipeline(
            self.dataset, cfg.train.batch_size, mean=self.student.mean, std=self.student.std, rank=self.dist.rank,
            world_size=self.dist.world_size, device=self.device, backend=self.data_backend, seed=cfg.train.seed,
            num_workers=cfg.data.num_workers, start_step=start_step, hw_decoder_load=cfg.data.hw_decoder_load,
            num_threads=cfg.data.num_threads or None, channels_last=cfg.student.channels_last,
            prefetch=None if cfg.data.prefetch < 0 else cfg.data.prefetch)

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> str:
        """Checkpoint ``step_<N>`` (collective: every rank writes its part; see dtfast.distributed.checkpoint)."""
        path = dist_ckpt.save(self.engine, self.cfg.out, self.step,
                              {"config": to_dict(self.cfg), "schedule": self._schedule()}, self.dist,
                              keep_last=self.cfg.train.keep_last)
        self._print(f"checkpoint: {path}")
        return path

    def _load_checkpoint(self, weights_only: bool = False) -> str | None:
        """Load the checkpoint train.resume names (auto: the latest in out/, if any) into the engine and set the step;
        its path, or None when there is none to load. ``weights_only``: the model alone, for an export."""
        mode = self.cfg.train.resume
        if mode in ("never", ""):
            return None
        # rank 0 decides, so that every rank loads the same checkpoint (or none); damaged ones are skipped there
        path, error = None, None
        if self.dist.is_main:
            path = mode
            if mode == "auto":
                skipped: list[str] = []
                path = ckpt.read_latest(self.cfg.out, check=dist_ckpt.verify, skipped=skipped)
                if path is None and skipped:  # not "no checkpoint": a fresh start would replace them all
                    error = (f"every checkpoint in {ckpt.checkpoint_dir(self.cfg.out)} is damaged ("
                             f"{'; '.join(skipped)[:800]}): nothing to resume from. Restore a copy, or start over "
                             "with train.resume=never (which moves them aside)")
        path, error = broadcast_object((path, error), self.dist)
        if error:
            raise dist_ckpt.CheckpointError(error)
        if path is None:
            return None
        if not os.path.isdir(path):
            raise FileNotFoundError(f"train.resume={mode}: no checkpoint folder at {path}")
        meta = dist_ckpt.verify(path)
        current = to_dict(self.cfg)
        defaults = to_dict(PretrainConfig())  # what a checkpoint's config from before a key existed meant
        dist_ckpt.check_compatible(path, meta, current, RESUME_KEYS, self.engine, self.dist.world_size,
                                   weights_only=weights_only, defaults=defaults)
        dist_ckpt.load(self.engine, path, self.dist, weights_only=weights_only)
        self.step = int(meta["step"])
        self._resumed_from = path
        if weights_only:  # an export: no training follows, so no data order or schedule to warn about
            return path
        # the optimizer state brings the checkpoint's weight decay and betas back: the config's values apply
        set_hyperparameters(self.engine.optimizer, self.cfg.train.weight_decay, self.cfg.train.betas)
        changed = ckpt.compare_configs(meta.get("config", {}), current, DATA_POSITION_KEYS, defaults)
        if meta.get("world_size") not in (None, self.dist.world_size):
            changed.append(f"world size: checkpoint has {meta.get('world_size')}, this run has {self.dist.world_size}")
        if changed and self.dist.is_main:
            log.warning("resuming %s with a different data order or batch (%s): the run continues from step %d, but "
                        "the rest of this epoch is not the samples an uninterrupted run would have seen (some are "
                        "repeated or skipped)", path, "; ".join(changed), self.step)
        changed = ckpt.compare_configs(meta.get("config", {}), current, CHANGED_OBJECTIVE_KEYS, defaults)
        if meta.get("schedule", self._schedule()) != self._schedule():  # epochs at another world size or dataset
            changed.append(f"schedule in steps: checkpoint has {meta['schedule']}, this run has {self._schedule()}")
        if changed and self.dist.is_main:
            log.warning("resuming %s with a changed objective or schedule (%s): the run continues from step %d with "
                        "this run's values (a longer train.max_steps, for one, moves the learning-rate schedule)",
                        path, "; ".join(changed), self.step)
        return path

    def _schedule(self) -> dict[str, int]:
        return {"max_steps": self.max_steps, "warmup_steps": self.warmup_steps}

    # ------------------------------------------------------------------ loop
    def _print(self, msg: str) -> None:
        if self.dist.is_main:
            print(f"[dtfast] {msg}", flush=True)

    @property
    def global_batch(self) -> int:
        """Images per optimizer step, all ranks and micro-batches."""
        return self.cfg.train.batch_size * self.dist.world_size * self.cfg.train.grad_accum

    def forward_backward(self, batch, timer=None) -> dict[str, torch.Tensor]:
        """One micro-batch: teacher features, student features, loss, backward (gradients accumulate).

        ``batch``: ``(teacher view, student view, labels)`` from ``InputPipeline`` (views made on the device by the
        pipeline), or ``(uint8 images (B, 3, H, W), labels)`` anywhere (dtfast.bench, ``_build_loader``): copied
        to the device and turned into the two views here."""
        from dtfast.data import to_views

        cfg = self.cfg
        timer = timer or NullTimer()
        with timer.section("data"):  # raw batches: host-to-device copy and the two normalised views
            if len(batch) == 3 and batch[0].is_floating_point():
                teacher_images, student_images = batch[0], batch[1]
            else:
                images = batch[0].to(self.device, non_blocking=True)
                teacher_images, student_images = to_views(images, self.student.mean, self.student.std)
            if cfg.student.channels_last:
                student_images = student_images.contiguous(memory_format=torch.channels_last)
        # noise depends only on (seed, rank, micro-batch): a resumed run draws the same noise as an uninterrupted one
        generator = torch.Generator(device=self.device).manual_seed(
            _rank_seed(cfg.train.seed, self.dist.rank, self.step * cfg.train.grad_accum + self._micro_index))
        self._micro_index += 1
        with timer.section("teacher"), torch.no_grad():
            # the teacher noises the fp32 image and only then casts to its own dtype (no bf16 rounding of x0)
            teacher_feats = self.teacher(teacher_images, generator=generator)
        with timer.section("student"):  # the engine applies the precision (autocast or bf16 weights)
            student_feats = self.engine.forward(student_images)
        with timer.section("loss"):
            # the loss runs in the student's output dtype (bf16 under autocast, fp32 on CPU), accumulating in fp32
            teacher_feats = [t.to(s.dtype) for s, t in zip(student_feats, teacher_feats)]
            parts = self.loss_fn(student_feats, teacher_feats)
        with timer.section("backward"):
            self.engine.backward(parts["loss"])  # the engine divides by train.grad_accum
        return parts

    def optimizer_step(self, batches, timer=None) -> dict[str, torch.Tensor]:
        """One optimizer step over ``grad_accum`` micro-batches (an iterable of batches)."""
        timer = timer or NullTimer()
        cfg = self.cfg
        lr = lr_at(self.step, peak=cfg.train.lr, min_lr=cfg.train.min_lr, warmup_steps=self.warmup_steps,
                   max_steps=self.max_steps)
        self.engine.set_lr(lr)
        self.engine.zero_grad()
        self._micro_index = 0
        sums, count = None, 0
        for batch in batches:
            parts = self.forward_backward(batch, timer)
            # the logged values cover the step's whole batch: the mean over its micro-batches (as the gradient is)
            logged = {key: parts[key].detach() for key in LOGGED_PARTS}
            sums = logged if sums is None else {key: sums[key] + logged[key] for key in LOGGED_PARTS}
            count += 1
        if count > 1:
            parts = {**parts, **{key: value / count for key, value in sums.items()}}
        with timer.section("optimizer"):  # gradient reduction (ZeRO/DDP), clipping, optimizer step
            self.engine.step()
        self.step += 1
        parts["lr"] = lr
        if self.engine.last_grad_norm is not None:
            parts["grad_norm"] = self.engine.last_grad_norm
        return parts

    def _micro_batches(self, state: dict):
        """Yields ``grad_accum`` batches from ``state["loader"]`` (the endless pipeline, or a ``_build_loader``
        epoch that is restarted at its end); counts the time spent waiting for them."""
        for micro in range(self.cfg.train.grad_accum):
            t0 = time.perf_counter()
            try:
                batch = next(state["loader"])
            except StopIteration:
                state["loader"] = iter(self._build_loader(self.step * self.cfg.train.grad_accum + micro))
                batch = next(state["loader"])
            state["data_wait"] += time.perf_counter() - t0
            yield batch

    def train(self) -> str | None:
        cfg = self.cfg
        if self.dist.is_main:
            os.makedirs(cfg.out, exist_ok=True)
        self.lock_out_folder()  # one run per folder: two would interleave their metrics and overwrite checkpoints
        main_rank_check(lambda: dist_ckpt.prepare_folder(cfg.out), self.dist, dist_ckpt.CheckpointError)
        check_shared_folder(cfg.out, self.dist)
        self.maybe_resume()
        if self.dist.is_main:  # after the resume check: a refused resume leaves the run's config as it was
            import yaml

            ckpt.atomic_write_text(os.path.join(cfg.out, "config.yaml"), yaml.safe_dump(to_dict(cfg), sort_keys=False))
        global_batch = self.global_batch
        self._print(f"teacher {cfg.teacher.pretrained or cfg.teacher.arch} (t={cfg.teacher.timestep}), student "
                    f"{cfg.student.arch}, {len(self.dataset)} images, global batch {global_batch}, "
                    f"{self.dist.world_size} process(es) on {self.device.type}, "
                    f"steps {self.step}->{self.max_steps}{self._epochs_note()}")
        metrics_path = os.path.join(cfg.out, "metrics.jsonl")
        # exact resume: the pipeline starts with the micro-batch the next step of an uninterrupted run would take
        self.pipeline = self.build_pipeline(self.step * cfg.train.grad_accum)
        self._print(f"data: {self.pipeline.backend} backend, {self.pipeline.steps_per_epoch} steps per epoch, "
                    f"prefetch {self.pipeline.prefetch}")
        state = {"loader": self.pipeline, "data_wait": 0.0}
        self.model.train()
        window_start, window_images = time.perf_counter(), 0
        self._in_loop = True
        try:
            stopped = self._loop(state, metrics_path, global_batch, window_start, window_images)
        finally:
            self._in_loop = False
            self._close_pipeline()
        if stopped:
            return None
        self._stop_signal = None  # a signal after the last step's check has nothing left to stop: the run is done
        final = os.path.join(ckpt.checkpoint_dir(cfg.out), f"step_{self.step}")
        saved = (cfg.train.save_every and self.step % cfg.train.save_every == 0) or (
            self._resumed_from is not None and os.path.abspath(self._resumed_from) == os.path.abspath(final))
        if not saved:  # not when resumed at the end: re-saving the checkpoint it was resumed from adds nothing
            try:
                self.save()
            except Exception:
                self.export()  # the trained weights are not lost with the checkpoint (full disk, ...)
                raise
        return self.export()

    def _epochs_note(self) -> str:
        """' (200 epochs, 30 warm-up epochs of 1281167 images at global batch 2048)' where the config counts in
        epochs, else ''."""
        t = self.cfg.train
        parts = ([f"{t.epochs:g} epochs"] if t.epochs > 0 else []) + (
            [f"{t.warmup_epochs:g} warm-up epochs"] if t.warmup_epochs > 0 else [])
        if not parts:
            return ""
        return f" ({', '.join(parts)} of {len(self.dataset)} images at global batch {self.global_batch})"

    def _loop(self, state, metrics_path, global_batch, window_start, window_images) -> bool:
        """Optimizer steps to the run's length; True when a signal stopped them (after a checkpoint)."""
        cfg = self.cfg
        while self.step < self.max_steps:
            parts = self.optimizer_step(self._micro_batches(state))
            window_images += global_batch
            if self.step % cfg.train.log_every == 0 or self.step == self.max_steps:
                self._log(parts, parts["lr"], metrics_path, window_start, window_images, state["data_wait"])
                window_start, window_images, state["data_wait"] = time.perf_counter(), 0, 0.0
            stop = any_rank(self._stop_signal is not None, self.dist)
            if stop or (cfg.train.save_every and self.step % cfg.train.save_every == 0):
                self.save()
            if stop:
                if self._stop_signal is None:  # another rank got the signal: this one stops for the same reason
                    self._stop_signal = signal.SIGTERM
                self._print(f"stopped by signal at step {self.step}; resume with train.resume=auto")
                return True
        return False

    def _log(self, parts, lr, metrics_path, window_start, window_images, window_data) -> None:
        values = torch.stack([parts["loss"].detach().float(), parts["mse"].detach().float().mean(),
                              parts["at"].detach().float().mean()])
        values = all_reduce_mean(values, self.dist)
        loss, mse, at = (float(v) for v in values.tolist())
        if not np.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {self.step}: lower train.lr or check the data/teacher")
        elapsed = max(time.perf_counter() - window_start, 1e-9)
        record = {"step": self.step, "loss": loss, "mse": mse, "at": at, "lr": lr,
                  "img_per_s": window_images / elapsed, "data_wait_frac": min(1.0, window_data / elapsed),
                  "mse_per_level": [float(v) for v in parts["mse"].detach().float().tolist()],
                  "at_per_level": [float(v) for v in parts["at"].detach().float().tolist()]}
        if "grad_norm" in parts:
            record["grad_norm"] = float(parts["grad_norm"])  # all-reduced gradients: the same on every rank
        if self.pipeline is not None and self.pipeline.skipped_files:
            record["data_skipped_files"] = len(self.pipeline.skipped_files)  # this rank, all epochs so far
        record["eta_s"] = (self.max_steps - self.step) * self.global_batch / max(record["img_per_s"], 1e-9)
        if self.dist.is_main:
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            print(f"[dtfast] step {self.step:>6}/{self.max_steps}  loss {loss:.4f}  mse {mse:.4f}  "
                  f"at {at:.4f}  lr {lr:.2e}  {record['img_per_s']:.1f} img/s  "
                  f"data {100 * record['data_wait_frac']:.0f}%  eta {format_duration(record['eta_s'])}", flush=True)

    def export_checkpoint(self) -> str:
        """train.export_only: the backbone of the checkpoint train.resume names, as out/backbone_step_<N>.safetensors
        (a checkpoint of a run in progress or preempted, e.g. to evaluate it), without training or touching the
        run's config.yaml, metrics or checkpoints."""
        check_shared_folder(self.cfg.out, self.dist)
        path = self._load_checkpoint(weights_only=True)
        if path is None:
            raise FileNotFoundError(f"train.export_only: no checkpoint to export (train.resume="
                                    f"{self.cfg.train.resume!r}, {ckpt.checkpoint_dir(self.cfg.out)} has none); point "
                                    "train.resume at a checkpoint folder")
        self._print(f"loaded {path} (step {self.step})")
        return self.export(os.path.join(self.cfg.out, f"backbone_step_{self.step}.safetensors"))

    def export(self, path: str | None = None) -> str | None:
        from dtfast.data.transforms import size_text

        path = path or os.path.join(self.cfg.out, "backbone.safetensors")
        state = self.engine.backbone_state_dict()  # collective under ZeRO-3: gathers the shards on every rank
        if self.dist.is_main:
            ckpt.save_safetensors_atomic(state, path,
                                         metadata={"arch": self.cfg.student.arch, "step": str(self.step),
                                                   "image_size": size_text(self.cfg.data.crop_hw)})
            self._print(f"backbone weights ({self.cfg.student.arch}, timm naming): {os.path.abspath(path)}")
            self._print(f"load with timm.create_model('{self.cfg.student.arch}', num_classes=0).load_state_dict("
                        f"safetensors.torch.load_file('{os.path.abspath(path)}'), strict=True); the trained part is "
                        "the stride 4-32 feature pyramid (README: loading the backbone)")
        barrier(self.dist)
        return path

    def _close_pipeline(self) -> None:
        pipeline, self.pipeline = self.pipeline, None
        if pipeline is not None:
            pipeline.close()  # prefetch thread and worker processes

    def close(self) -> None:
        self._close_pipeline()
        self.release_out_folder()
        shutdown(self.dist)
