"""Atomic, resumable checkpoints for both engines, written by every rank and committed by one.

Layout: ``<out>/checkpoints/step_<N>/`` and ``<out>/checkpoints/latest`` (a text file naming the newest complete
folder). The commit protocol, the same for both engines:

1. every rank writes its part under ``checkpoints/.tmp_step_<N>/``:
   - engine=deepspeed: DeepSpeed's own ``save_checkpoint(tag=".tmp_step_<N>")`` (model states, and the ZeRO optimizer
     partition of each rank); engine=ddp: rank 0 writes ``model.safetensors`` and ``optimizer.pt``;
   - ``rank_<r>.pt``: that rank's RNG states (torch, CUDA, numpy, python), tensors and plain values only;
2. barrier: all parts are on disk; rank 0 writes ``meta.json`` (step, config, world size, engine, and the size of
   every file of the folder: a truncated copy is found before loading);
3. rank 0 flushes every file of the folder to disk (fsync), renames it to ``step_<N>`` (atomic on one
   filesystem), then replaces ``latest`` atomically (write + fsync + rename), then prunes to the newest
   ``keep_last`` folders. Saving a step that exists already (a damaged one being replaced) moves the old folder to
   ``.tmp_replaced_step_<N>`` first; ``read_latest`` takes that one while ``step_<N>`` is missing.
A rank whose write fails removes what it wrote and raises ``CheckpointError`` naming the folder and the free space.

``out`` must be one folder that every rank sees (on several nodes: a shared filesystem); the trainer checks that at
start-up (``dtfast.train.distributed.check_shared_folder``).

A crash at any moment leaves ``latest`` naming a complete folder (or its ``.tmp_replaced_`` copy); leftovers
``.tmp_*`` are removed by the next save and at start-up (``prepare_folder``).
Loading reads safetensors, ``torch.load(weights_only=True)`` and, for DeepSpeed, DeepSpeed's loader with the safe
checkpoint engine of ``dtfast.distributed.safe_load``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from typing import Any

import numpy as np
import torch

from dtfast.distributed.safe_load import safe_torch_load
from dtfast.train import checkpoint as ckpt

META = "meta.json"


# ---------------------------------------------------------------------------------------------------- RNG state
def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random generators, as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(int(v) for v in py_state["state"].tolist()), py_state["gauss"]))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------------------------------------------- save
def _barrier(world_size: int) -> None:
    import torch.distributed as dist

    if world_size > 1 and dist.is_initialized():
        dist.barrier()


def _commit(root: str, tmp: str, final: str, step: int, keep_last: int) -> None:
    if os.path.exists(final):  # the same step saved twice (e.g. a signal right after a periodic save)
        stale = os.path.join(root, f".tmp_replaced_step_{step}")
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
    os.replace(tmp, final)
    ckpt._fsync_dir(root)
    ckpt.atomic_write_text(os.path.join(root, ckpt.LATEST), f"step_{step}\n")
    ckpt._prune(root, keep_last)


class CheckpointError(OSError):
    """A checkpoint that cannot be written or read (disk full, damaged or truncated files); names the folder."""


def _write_failed(tmp: str, exc: BaseException) -> str:
    """Why a write failed, with the free space there (the message of the CheckpointError every rank raises)."""
    try:
        free = f"{shutil.disk_usage(os.path.dirname(tmp)).free / 2**30:.2f} GiB free there"
    except OSError:
        free = "free space unknown"
    return (f"checkpoint {tmp}: writing failed ({type(exc).__name__}: {str(exc)[:300]}; {free}); the previous "
            "checkpoint is kept")


def _first_error(error: str | None, world_size: int) -> str | None:
    """Any rank's error, on every rank (collective: also the barrier of the step it ends), so that all ranks raise
    together instead of some waiting in a collective the others never reach."""
    import torch.distributed as dist

    if world_size > 1 and dist.is_initialized():
        errors: list[str | None] = [None] * world_size
        dist.all_gather_object(errors, error)
        return next((e for e in errors if e), None)
    return error


def _manifest(folder: str) -> dict[str, int]:
    """{relative path: size in bytes} of every file under ``folder``."""
    files = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            files[os.path.relpath(path, folder)] = os.path.getsize(path)
    return files


def save(engine, out: str, step: int, meta: dict[str, Any], dist_info, keep_last: int) -> str:
    """Write ``<out>/checkpoints/step_<step>`` through ``engine`` (collective: every rank calls it)."""
    root = ckpt.checkpoint_dir(out)
    tag = f".tmp_step_{step}"
    tmp, final = os.path.join(root, tag), os.path.join(root, f"step_{step}")
    if dist_info.is_main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a write of this step killed midway
    _barrier(dist_info.world_size)
    error = None
    try:
        os.makedirs(tmp, exist_ok=True)
        if engine.name == "deepspeed":
            engine.engine.save_checkpoint(root, tag=tag, client_state={"dtfast_step": step}, save_latest=False)
        elif dist_info.is_main:
            ckpt.save_safetensors_atomic(engine.model_state_dict(), os.path.join(tmp, "model.safetensors"))
            torch.save(engine.optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(rng_state(dist_info.device), os.path.join(tmp, f"rank_{dist_info.rank}.pt"))
    except (OSError, RuntimeError) as exc:  # disk full: torch.save says "unexpected pos", naming nothing
        error = _write_failed(tmp, exc)
    error = _first_error(error, dist_info.world_size)  # every part is written (or some rank failed)
    if error is None and dist_info.is_main:
        try:
            # the parts are on disk before the folder can be named complete (a power loss), and their sizes are
            # read after that (on a shared filesystem, other nodes' writes are visible once flushed)
            _fsync_tree(tmp)
            record = {"step": step, "engine": engine.name, "world_size": dist_info.world_size,
                      "zero_stage": getattr(engine, "zero_stage", None), **meta, "files": _manifest(tmp)}
            with open(os.path.join(tmp, META), "w") as fh:
                json.dump(record, fh, indent=2, default=str)
                fh.flush()
                os.fsync(fh.fileno())
            ckpt._fsync_dir(tmp)
            _commit(root, tmp, final, step, keep_last)
        except OSError as exc:
            error = _write_failed(tmp, exc)
    if error is not None and dist_info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # a partial folder would fill the disk and block restarts
    error = _first_error(error, dist_info.world_size)
    if error is not None:
        raise CheckpointError(error)
    return final


def prepare_folder(out: str) -> None:
    """At start-up, before anything is written (main rank): delete the ``.tmp_step_*`` folders of writes that were
    killed or failed (on a full disk they would block the restart; ``.tmp_replaced_*`` copies stay until a save),
    then create ``<out>/checkpoints`` and write a file there, so that a folder that cannot take the checkpoints is
    found before the training, not at its first save."""
    root = ckpt.checkpoint_dir(out)
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(".tmp_step_"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    probe = os.path.join(root, f".tmp_write_check_{os.getpid()}")
    try:
        os.makedirs(root, exist_ok=True)
        with open(probe, "w") as fh:
            fh.write("dtfast\n")
        os.remove(probe)
    except OSError as exc:
        raise CheckpointError(f"checkpoint folder {root} cannot be written ({type(exc).__name__}: {exc})") from exc


def _fsync_tree(folder: str) -> None:
    for parent, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(parent, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        ckpt._fsync_dir(parent)


# ---------------------------------------------------------------------------------------------------- load
def read_meta(path: str) -> dict[str, Any]:
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"checkpoint {path} is incomplete or not a dtfast checkpoint: {META} is missing")
    try:
        with open(meta_path) as fh:
            meta = json.load(fh)
        int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path}: {META} is damaged ({type(exc).__name__}: {exc})") from exc
    return meta


def verify(path: str) -> dict[str, Any]:
    """``read_meta`` plus the step of a ``step_<N>`` folder and the files the meta lists, each present with its
    recorded size (checkpoints written before the manifest have none to check); CheckpointError naming the first
    that disagrees."""
    meta = read_meta(path)
    folder = os.path.basename(os.path.normpath(path)).replace(".tmp_replaced_", "")
    if folder.startswith("step_") and folder[5:].isdigit() and int(folder[5:]) != int(meta["step"]):
        raise CheckpointError(f"checkpoint {path}: its meta.json says step {meta['step']}, the folder name step "
                              f"{folder[5:]}; was it edited or copied over another?")
    for name, size in (meta.get("files") or {}).items():
        file = os.path.join(path, name)
        actual = os.path.getsize(file) if os.path.isfile(file) else None
        if actual != size:
            state = "missing" if actual is None else f"{actual} bytes, {size} were written"
            raise CheckpointError(f"checkpoint {path}: {name} is damaged ({state})")
    return meta


def check_compatible(path: str, meta: dict[str, Any], current_config: dict[str, Any], keys: list[str],
                     engine, world_size: int, weights_only: bool = False,
                     defaults: dict[str, Any] | None = None) -> None:
    """ResumeRefused naming every key in which the checkpoint and this run disagree in a way resuming (or, with
    ``weights_only``, loading the weights for an export) cannot bridge.

    Process count under DeepSpeed: resuming needs the run's count at every stage (ZeRO 1-3 partition the optimizer
    state per rank, and so does stage 0's bf16 optimizer); the weights alone load at any count below ZeRO-3, whose
    checkpoints hold only per-rank weight partitions."""
    diffs = ckpt.compare_configs(meta.get("config", {}), current_config, keys, defaults)
    if meta.get("engine") != engine.name:
        diffs.append(f"dist.engine: checkpoint has {meta.get('engine')!r}, this run has {engine.name!r}")
    if engine.name == "deepspeed":
        if meta.get("zero_stage") != engine.zero_stage:
            diffs.append(f"dist.zero_stage: checkpoint has {meta.get('zero_stage')!r}, this run has "
                         f"{engine.zero_stage!r}")
        stage = meta.get("zero_stage")
        if meta.get("world_size") != world_size and (stage == 3 or not weights_only):
            why = ("ZeRO-3 partitions the weights per rank" if stage == 3 else
                   "the optimizer state is partitioned per rank; train.export_only=true loads the weights alone at "
                   "any process count")
            diffs.append(f"world size: checkpoint has {meta.get('world_size')!r} processes, this run has "
                         f"{world_size} ({why})")
    if diffs:
        if weights_only:
            raise ResumeRefused(f"cannot export from {path}: " + "; ".join(diffs) + ". Run the export with the "
                                "checkpoint's values (the run's own command plus train.export_only=true)")
        raise ResumeRefused(f"cannot resume from {path}: " + "; ".join(diffs) + ". Set the checkpoint's values, or "
                            "start over with train.resume=never (the earlier run's checkpoints and metrics are moved "
                            "aside) or another out")


class ResumeRefused(ValueError):
    """A checkpoint this run cannot continue (another model, engine, ZeRO stage or world size)."""


@contextlib.contextmanager
def _reading(path: str, name: str):
    """Errors while reading ``name`` of the checkpoint ``path`` (truncated, damaged) become one CheckpointError
    naming both; the library's own ("PytorchStreamReader failed", "incomplete metadata") name neither."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors, zipfile, pickle and DeepSpeed raise many kinds
        raise CheckpointError(f"checkpoint {path}: {name} cannot be read ({type(exc).__name__}: {str(exc)[:300]}); "
                              "it is damaged: move the folder aside and resume from the one before it") from exc


def load(engine, path: str, dist_info, weights_only: bool = False) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG from ``path`` (collective); returns the checkpoint's meta.
    ``weights_only``: the model alone (an export); below ZeRO-3 DeepSpeed then reads only the whole-model file, at
    any process count."""
    meta = read_meta(path)
    if engine.name == "deepspeed":
        root, tag = os.path.split(os.path.abspath(path))
        module_only = weights_only and meta.get("zero_stage") != 3
        with _reading(path, "DeepSpeed's files"):
            loaded, _ = engine.engine.load_checkpoint(root, tag=tag, load_optimizer_states=not module_only,
                                                      load_lr_scheduler_states=False, load_module_strict=True,
                                                      load_module_only=module_only)
        if loaded is None:
            raise FileNotFoundError(f"DeepSpeed could not load the checkpoint in {path}")
    else:
        from safetensors.torch import load_file

        for name in ("model.safetensors", "optimizer.pt"):
            if not os.path.isfile(os.path.join(path, name)):
                raise FileNotFoundError(f"checkpoint {path} is incomplete: {name} is missing")
        with _reading(path, "model.safetensors"):
            state = load_file(os.path.join(path, "model.safetensors"))
        missing, unexpected = engine.module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"cannot resume from {path}: model keys differ (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]})")
        with _reading(path, "optimizer.pt"):
            optimizer_state = safe_torch_load(os.path.join(path, "optimizer.pt"), map_location="cpu")
        engine.optimizer.load_state_dict(optimizer_state)
    rank_file = os.path.join(path, f"rank_{dist_info.rank}.pt")
    if os.path.isfile(rank_file):
        with _reading(path, os.path.basename(rank_file)):
            rng = safe_torch_load(rank_file, map_location="cpu")
        set_rng_state(rng, dist_info.device)
    return meta
