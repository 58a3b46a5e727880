"""Importing DeepSpeed for the device the run uses, and joining its communication layer to torch's process group."""

from __future__ import annotations

import os


def import_deepspeed(device_type: str):
    """``import deepspeed`` with its accelerator matching ``device_type`` ("cuda" or "cpu").

    DeepSpeed picks its accelerator once, at import, from ``DS_ACCELERATOR`` or by probing; a CPU run on a GPU machine
    (``device=cpu``) must therefore set it before the first import. On CPU, DeepSpeed's optional shared-memory
    collective op (``deepspeed_shm_comm``, used only for inference all-reduce) is switched off: it is a JIT C++ build
    that takes minutes on a small machine and waits forever on a stale build lock; training collectives go through
    torch.distributed (gloo) either way.
    """
    wanted = "cpu" if device_type == "cpu" else "cuda"
    if "deepspeed" not in __import__("sys").modules:
        os.environ.setdefault("DS_ACCELERATOR", wanted)
    try:
        import deepspeed
    except ImportError as exc:
        raise ImportError("dist.engine=deepspeed needs DeepSpeed: pip install deepspeed (or install dtfast with the "
                          "[train] extra), or set dist.engine=ddp") from exc
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    if name != wanted:
        raise RuntimeError(f"DeepSpeed was imported with accelerator {name!r} "
                           f"but this run uses device {device_type!r}; "
                           f"set DS_ACCELERATOR={wanted} before starting the run")
    if wanted == "cpu":
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def join_process_group(deepspeed, timeout_minutes: int) -> None:
    """Let DeepSpeed's comm layer use the torch process group dtfast already created (never a second one)."""
    import datetime

    import torch.distributed as dist

    for key, value in (("LOCAL_RANK", "0"), ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)  # DeepSpeed reads these; torchrun sets them, a plain `python -m` does not
    if not dist.is_initialized():
        # a single process (python -m dtfast.pretrain): DeepSpeed still needs a process group; a one-rank group in
        # memory needs no rendezvous address
        from deepspeed.accelerator import get_accelerator

        backend = "nccl" if get_accelerator().device_name() == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False,
                               timeout=datetime.timedelta(minutes=timeout_minutes))
