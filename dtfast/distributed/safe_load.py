"""Safe loading of DeepSpeed checkpoints: ``torch.load(weights_only=True)`` instead of DeepSpeed's full unpickling.

DeepSpeed 0.19's ``TorchCheckpointEngine.load`` calls ``torch.load(path, weights_only=False)``, which runs arbitrary
code from a crafted file. Every file ``DeepSpeedEngine.load_checkpoint`` reads for a dtfast checkpoint (the model
states, the ZeRO optimizer partitions, the non-ZeRO optimizer state) goes through ``engine.checkpoint_engine.load``,
so dtfast replaces that engine with ``SafeTorchCheckpointEngine``: the restricted unpickler of
``weights_only=True``, with an allow-list of the few plain DeepSpeed classes its state dicts hold (enums and the
loss-scaler record, no code). Loading a file that needs anything else fails with the class named.

Not covered (dtfast never calls them): DeepSpeed's universal-checkpoint and ``zero_to_fp32`` tools, and
``load_checkpoint(load_universal=True)``, which call ``torch.load(weights_only=False)`` directly.
"""

from __future__ import annotations

import contextlib
import importlib
import logging

import torch

log = logging.getLogger("dtfast.distributed")

# plain-data classes that appear inside DeepSpeed's model/optimizer state dicts (module, qualified name)
_ALLOWED = (
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ("deepspeed.checkpoint.constants", "PARAM_SHAPES"),
)


def allowed_globals() -> list:
    found = []
    for module_name, name in _ALLOWED:
        try:
            obj = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError):
            continue
        if isinstance(obj, type):
            found.append(obj)
    return found


def safe_torch_load(path: str, map_location=None):
    """``torch.load(path, weights_only=True)`` with DeepSpeed's plain-data classes allowed."""
    context = torch.serialization.safe_globals(allowed_globals()) if hasattr(torch.serialization, "safe_globals") \
        else contextlib.nullcontext()
    with context:
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:
            if "weights_only" in str(exc) or "Unsupported global" in str(exc):
                raise RuntimeError(f"refusing to load {path}: it holds objects outside the safe set that "
                                   f"torch.load(weights_only=True) accepts ({exc})") from exc
            raise


def _engine_class():
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True``."""

        def load(self, path: str, map_location=None):
            return safe_torch_load(path, map_location=map_location)

    return SafeTorchCheckpointEngine


def install_safe_checkpoint_engine(engine) -> None:
    """Make ``engine.load_checkpoint`` read its files with the restricted unpickler (see the module docstring)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    current = getattr(engine, "checkpoint_engine", None)
    if current is None:  # an engine without an optimizer (the sharded teacher) never loads checkpoints
        return
    if type(current) is not TorchCheckpointEngine:
        raise RuntimeError(f"dtfast expects DeepSpeed's TorchCheckpointEngine, found {type(current).__name__}; "
                           "remove the checkpoint-engine settings (nebula, fast, decoupled) from dist.deepspeed_config")
    safe = _engine_class()(None)
    safe.zipfile_serialization = current.zipfile_serialization
    engine.checkpoint_engine = safe
