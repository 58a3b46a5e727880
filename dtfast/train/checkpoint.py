"""Atomic, resumable checkpoints and the backbone export.

Layout: ``<out>/checkpoints/step_<N>/{model.safetensors, state.pt, meta.json}`` and ``<out>/checkpoints/latest``
(a text file naming the newest complete folder). A checkpoint folder is written under a temporary name and
renamed into place only when complete; ``latest`` is replaced atomically after that, so a crash at any moment
leaves the previous checkpoint usable. Only safe formats are read: safetensors and ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from typing import Any

import torch

from dtfast import _files

LATEST = "latest"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = _files.mkstemp(dir=folder, prefix=".tmp_", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:  # a failed write or replace (disk full, `path` is a folder, ...) leaves no temporary file behind
        if os.path.lexists(tmp):
            os.remove(tmp)
    _fsync_dir(folder)


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str,
                            metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = _files.mkstemp(dir=folder, prefix=".tmp_", suffix=".safetensors")
    os.close(fd)
    try:
        clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(clean, tmp, metadata=metadata)
        _files.set_default_mode(tmp)  # safetensors writes the file anew, with 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(folder)


def checkpoint_dir(out: str) -> str:
    return os.path.join(out, "checkpoints")


def save_checkpoint(
    out: str,
    step: int,
    model_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int = 2,
) -> str:
    """Write ``checkpoints/step_<step>`` atomically, move ``latest`` to it, prune to ``keep_last``."""
    root = checkpoint_dir(out)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step_{step}")
    tmp = _files.mkdtemp(dir=root, prefix=f".tmp_step_{step}_")
    try:
        save_safetensors_atomic(model_state, os.path.join(tmp, "model.safetensors"))
        torch.save(train_state, os.path.join(tmp, "state.pt"))
        with open(os.path.join(tmp, "meta.json"), "w") as fh:
            json.dump({"step": step, **meta}, fh, indent=2, default=str)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(root)
    atomic_write_text(os.path.join(root, LATEST), f"step_{step}\n")
    _prune(root, keep_last)
    return final


def _steps(root: str) -> list[int]:
    steps = []
    for name in os.listdir(root):
        if name.startswith("step_") and name[5:].isdigit():
            steps.append(int(name[5:]))
    return sorted(steps)


def _prune(root: str, keep_last: int) -> None:
    if keep_last <= 0:
        return
    latest = read_latest(os.path.dirname(root))
    for step in _steps(root)[:-keep_last]:
        path = os.path.join(root, f"step_{step}")
        if latest and os.path.abspath(path) == os.path.abspath(latest):
            continue
        shutil.rmtree(path, ignore_errors=True)
    for name in os.listdir(root):  # leftovers of writes that were killed midway
        if name.startswith(".tmp_"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def read_latest(out: str, check=None, skipped: list[str] | None = None) -> str | None:
    """The newest complete checkpoint folder under ``out``, or None.

    The one ``latest`` names (a name ``step_<N>`` inside ``checkpoints/``; while ``step_<N>`` is being replaced by a
    save of the same step, its copy ``.tmp_replaced_step_<N>``), else the highest-numbered complete one. ``check``
    (path -> None, raising OSError/ValueError for a damaged folder) is applied to each candidate in that order: a
    damaged checkpoint is skipped, with a warning that names it and why, for the one before it (and listed in
    ``skipped``: when every one is damaged the caller must not take "None" for "no checkpoint")."""
    root = checkpoint_dir(out)
    if not os.path.isdir(root):
        return None
    candidates = []
    pointer = os.path.join(root, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as fh:
            name = fh.read().strip()
        if name.startswith("step_") and name[5:].isdigit():  # never a path outside checkpoints/
            candidates += [os.path.join(root, name), os.path.join(root, ".tmp_replaced_" + name)]
    candidates += [os.path.join(root, f"step_{step}") for step in reversed(_steps(root))]
    for path in dict.fromkeys(candidates):
        if not os.path.isfile(os.path.join(path, "meta.json")):
            continue
        if check is not None:
            try:
                check(path)
            except (OSError, ValueError) as exc:
                warnings.warn(f"checkpoint {path} is skipped: {exc}; resuming from the one before it, if any",
                              stacklevel=2)
                if skipped is not None:
                    skipped.append(str(exc))
                continue
        return path
    return None


def load_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    from safetensors.torch import load_file

    for name in ("model.safetensors", "state.pt", "meta.json"):
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"checkpoint {path} is incomplete: {name} is missing")
    model_state = load_file(os.path.join(path, "model.safetensors"))
    train_state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
    with open(os.path.join(path, "meta.json")) as fh:
        meta = json.load(fh)
    return model_state, train_state, meta


def compare_configs(saved: dict[str, Any], current: dict[str, Any], keys: list[str],
                    defaults: dict[str, Any] | None = None) -> list[str]:
    """Dotted keys among ``keys`` whose values differ between two config dicts. A key the saved config does not
    have (a checkpoint of a version before the key existed) takes its value from ``defaults`` (the config class's
    defaults: a new key's default keeps the old behaviour, e.g. data.image_width 0 = square), else is skipped."""
    diffs = []
    missing = object()

    def get(config: Any, key: str) -> Any:
        for part in key.split("."):
            config = config.get(part, missing) if isinstance(config, dict) else missing
        return config

    for key in keys:
        a, b = get(saved, key), get(current, key)
        if a is missing and defaults is not None:
            a = get(defaults, key)
        b = None if b is missing else b
        if a is not missing and a != b:
            diffs.append(f"{key}: checkpoint has {a!r}, this run has {b!r}")
    return diffs


def _metric_step(line: str) -> int | None:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, TypeError, AttributeError):  # a line cut short by a crash, disk full, ...
        return None


def truncate_metrics(path: str, step: int) -> None:
    """Drop the lines of a metrics.jsonl logged after ``step`` (a resumed run logs them again), and lines that are
    not complete JSON records (cut short by a crash), atomically."""
    if not os.path.isfile(path):
        return
    with open(path) as fh:
        lines = [line for line in fh if line.strip()]
    kept = []
    for line in lines:
        logged = _metric_step(line)
        if logged is not None and logged <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if kept != lines:
        atomic_write_text(path, "".join(kept))


def set_aside_earlier_run(out: str, resume_mode: str) -> list[str]:
    """A start from step 0 in a used folder (``train.resume=never``, or a crash before the first checkpoint): the
    earlier attempt's metrics.jsonl goes to ``metrics.<n>.jsonl``, and with ``train.resume=never`` its
    ``checkpoints/`` to ``checkpoints.<n>/`` (the metrics' number when free). Moved, not deleted (renames): never is a
    request to start over, not to lose the earlier run; and left in place, the earlier run's checkpoints would be
    pruned among, and resumed instead of, this run's (read_latest falls back to the highest step when the `latest`
    pointer is gone). Returns what was moved, as messages. Main rank only; the caller holds the others back."""
    messages = []
    moved = set_aside_metrics(os.path.join(out, "metrics.jsonl"))
    if moved:
        messages.append(f"starting from step 0: the metrics of an earlier attempt went to {moved}")
    root = checkpoint_dir(out)
    if resume_mode not in ("never", "") or not os.path.isdir(root) or not os.listdir(root):
        return messages
    n = int(os.path.basename(moved).split(".")[1]) if moved else 1
    while os.path.exists(f"{root}.{n}"):
        n += 1
    os.replace(root, f"{root}.{n}")
    messages.append(f"train.resume=never: the checkpoints of an earlier run went to {root}.{n}")
    return messages


def set_aside_metrics(path: str) -> str | None:
    """Move a non-empty metrics.jsonl to ``metrics.<n>.jsonl`` (the first free n) before a run starts from step 0;
    the new name, or None when there was nothing to move."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return None
    stem, ext = os.path.splitext(path)
    n = 1
    while os.path.exists(f"{stem}.{n}{ext}"):
        n += 1
    os.replace(path, f"{stem}.{n}{ext}")
    return f"{stem}.{n}{ext}"
