"""The DeepSpeed JSON, generated from the one dtfast config (``PretrainConfig``), optionally merged with a user file.

dtfast owns the optimizer (built by ``dtfast.train.optim``, handed to DeepSpeed as a client optimizer) and the
learning-rate schedule (set every step from ``train.*``), so the generated config has no ``optimizer`` or
``scheduler`` section. What it sets: micro-batch, accumulation and global batch, gradient clipping, the ZeRO stage,
the precision (``train.bf16`` and ``dist.bf16_mode``) and quiet logging.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

# keys whose value dtfast derives from train.*: a user file may repeat them, but only with the same value
_DERIVED_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                 "gradient_clipping")
# sections a user file may not add: dtfast owns the optimizer and the learning-rate schedule
_FORBIDDEN_KEYS = ("optimizer", "scheduler")


class DeepSpeedConfigError(ValueError):
    """The DeepSpeed configuration cannot work with this dtfast config; the message names the keys."""


def _bf16_section(bf16: bool, bf16_mode: str) -> dict[str, Any]:
    if not bf16:
        return {"bf16": {"enabled": False}}
    if bf16_mode == "params":
        # bf16 weights and gradients, fp32 master weights inside DeepSpeed's optimizer wrapper
        return {"bf16": {"enabled": True}}
    # torch.autocast around the forward, fp32 weights: the same numerics as the ddp engine. DeepSpeed's default
    # lower-precision list (Linear/Conv) sends those gradients through the collectives in bf16.
    return {"bf16": {"enabled": False}, "torch_autocast": {"enabled": True, "dtype": "bfloat16"}}


def build_ds_config(cfg, world_size: int, device_type: str) -> dict[str, Any]:
    """The DeepSpeed config for the student + regressor engine of ``cfg`` (a ``PretrainConfig``).

    bf16 applies on GPU only (CPU runs stay fp32, as with the ddp engine). ``dist.deepspeed_config`` (JSON or YAML)
    is merged over the result; see ``merge_user_config``.
    """
    train, dist = cfg.train, cfg.dist
    on_gpu = device_type == "cuda"
    zero: dict[str, Any] = {"stage": int(dist.zero_stage)}
    if dist.zero_stage > 0:
        zero.update({"contiguous_gradients": True, "overlap_comm": on_gpu})
    if dist.zero_stage == 3:
        # small tensors (norms, biases) stay whole on every rank: gathering them costs more than it saves
        zero.update({"stage3_param_persistence_threshold": 10_000, "stage3_gather_16bit_weights_on_model_save": False})
    generated: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(train.batch_size),
        "gradient_accumulation_steps": int(train.grad_accum),
        "train_batch_size": int(train.batch_size) * int(train.grad_accum) * int(world_size),
        "gradient_clipping": float(train.grad_clip),
        "zero_optimization": zero,
        # the client optimizer is torch AdamW or LAMB; AdamW is elementwise, so ZeRO's flat shards are exact
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "checkpoint": {"tag_validation": "FAIL"},
        **_bf16_section(bool(train.bf16) and on_gpu, dist.bf16_mode),
    }
    if dist.deepspeed_config:
        generated = merge_user_config(generated, load_user_config(dist.deepspeed_config))
    return generated


def teacher_ds_config(world_size: int, dtype: str = "fp32") -> dict[str, Any]:
    """ZeRO-3 inference config for the frozen teacher (``dtype``: bf16 | fp16 | fp32, the teacher's weights):
    partitioned weights, gathered module by module, no optimizer."""
    if dtype not in ("bf16", "fp16", "fp32"):
        raise DeepSpeedConfigError(f"teacher dtype {dtype!r}: expected bf16, fp16 or fp32")
    return {
        "train_micro_batch_size_per_gpu": 1,
        "train_batch_size": int(world_size),
        # every parameter is partitioned (threshold 0): a sharded teacher is one too large to replicate
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "overlap_comm": False},
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def load_user_config(path: str) -> dict[str, Any]:
    """A DeepSpeed config file: JSON, or YAML for files ending in .yaml/.yml."""
    if not os.path.isfile(path):
        raise DeepSpeedConfigError(f"dist.deepspeed_config: file not found: {path}")
    with open(path) as fh:
        text = fh.read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # the parser's message is the useful part
        raise DeepSpeedConfigError(f"dist.deepspeed_config: {path} is not valid JSON/YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise DeepSpeedConfigError(f"dist.deepspeed_config: {path} must hold a mapping at the top level")
    return data


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def merge_user_config(generated: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    """``user`` merged over ``generated`` (nested sections merge key by key; the user's values win).

    The batch geometry and clipping come from ``train.*`` and the ZeRO stage from ``dist.zero_stage``: a user file
    may repeat them only with equal values ("auto" counts as equal), so that the dtfast config stays the one truth
    that checkpoints are compared against. ``optimizer``/``scheduler`` sections are refused (dtfast owns both).
    """
    forbidden = [k for k in _FORBIDDEN_KEYS if k in user]
    if forbidden:
        raise DeepSpeedConfigError(
            f"dist.deepspeed_config must not contain {', '.join(forbidden)}: dtfast builds the optimizer from "
            "train.optimizer/lr/betas/weight_decay and sets the learning rate every step")
    conflicts = []
    for key in _DERIVED_KEYS:
        if key in user and user[key] != "auto" and user[key] != generated[key]:
            conflicts.append(f"{key}: file has {user[key]!r}, dtfast config gives {generated[key]!r}")
    user_stage = user.get("zero_optimization", {}).get("stage")
    if user_stage is not None and user_stage != generated["zero_optimization"]["stage"]:
        conflicts.append(f"zero_optimization.stage: file has {user_stage!r}, dist.zero_stage gives "
                         f"{generated['zero_optimization']['stage']!r}")
    if conflicts:
        raise DeepSpeedConfigError("dist.deepspeed_config disagrees with the dtfast config (set these through "
                                   "train.batch_size, train.grad_accum, train.grad_clip, dist.zero_stage): "
                                   + "; ".join(conflicts))
    user = {k: v for k, v in user.items() if not (k in _DERIVED_KEYS and v == "auto")}
    return _merge(generated, user)
