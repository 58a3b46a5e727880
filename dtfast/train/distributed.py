"""Process-group set-up for ``torchrun`` (one machine or many) and the single-process case."""

from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str, local_rank: int) -> torch.device:
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but torch sees no CUDA device; use device=cpu or auto")
    if device in ("cuda", "auto") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(device: str = "auto", backend: str = "auto", timeout_minutes: int = 30) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (or run alone)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        timeout = datetime.timedelta(minutes=timeout_minutes)
        store = _restart_store(world_size, timeout)
        if store is not None:
            kwargs.update(store=store, rank=rank, world_size=world_size)
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def _restart_store(world_size: int, timeout: datetime.timedelta):
    """Under torchrun's agent store: that store, with keys private to this restart attempt.

    After ``torchrun --max-restarts`` restarts the workers, the agent may serve the same store as in the attempt
    before; the previous attempt's gloo/NCCL addresses are still in it, and a new group that reads them waits for
    a dead peer. A prefix per attempt (``TORCHELASTIC_RESTART_COUNT``) keeps every attempt's rendezvous clean.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_ADDR" not in os.environ:
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"dtfast/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled and dist.is_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= info.world_size
    return tensor


def broadcast_object(obj, info: DistInfo, src: int = 0):
    """Rank ``src``'s ``obj`` (picklable, small) on every rank: decisions one rank makes for all (e.g. which
    checkpoint to resume from)."""
    if not (info.enabled and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=info.device if dist.get_backend() == "nccl" else None)
    return box[0]


def main_rank_check(check, info: DistInfo, error_type: type[Exception]) -> None:
    """Run ``check()`` on the main rank only; when it raises ``error_type``, every rank raises it, with its message
    (the other ranks would otherwise wait in the next collective for a rank that has left)."""
    message = None
    if info.is_main:
        try:
            check()
        except error_type as exc:
            message = str(exc)
    message = broadcast_object(message, info)
    if message:
        raise error_type(message)


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if ``flag`` is true on any rank (used for preemption signals)."""
    if not (info.enabled and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def check_shared_folder(folder: str, info: DistInfo, timeout_s: float = 60.0) -> None:
    """Raise on every rank unless every rank sees ``folder`` as one shared folder.

    Checkpoints are written by several ranks (DeepSpeed's partitions, each rank's RNG state) and read by all, so a
    multi-node run needs ``out`` on a filesystem every node mounts. Rank 0 writes a marker file; a rank that does
    not see it within ``timeout_s`` (NFS may cache a directory listing for a while) makes every rank raise, at
    start-up instead of at the first resume.
    """
    if not (info.enabled and dist.is_initialized()):
        return
    import socket
    import time
    import uuid

    token = broadcast_object(uuid.uuid4().hex if info.is_main else None, info)
    marker = os.path.join(folder, f".dtfast_shared_{token}")
    if info.is_main:
        os.makedirs(folder, exist_ok=True)
        with open(marker, "w") as fh:
            fh.write(socket.gethostname() + "\n")
    barrier(info)
    deadline = time.monotonic() + timeout_s
    seen = os.path.exists(marker)
    while not seen and time.monotonic() < deadline:
        time.sleep(0.5)
        seen = os.path.exists(marker)
    blind = any_rank(not seen, info)
    barrier(info)
    if info.is_main:
        os.remove(marker)
    if blind:
        who = (f"this rank ({info.rank}, on {socket.gethostname()})" if not seen
               else "a rank on another node")
        raise RuntimeError(f"out={folder!r} is not one folder shared by every rank: {who} cannot see a file rank 0 "
                           f"wrote there within {timeout_s:.0f} s. Checkpoints are written by several ranks and read "
                           "by all: put 'out' on a filesystem that every node mounts (NFS, Lustre, GPFS, ...).")


def exit_process(code: int | None) -> None:
    """End a command-line run with ``code``. Under torchrun with several ranks the process leaves without
    finalising the interpreter (``os._exit`` once output is flushed): a gloo worker thread can drop the last
    reference to a collective's tensor just after the main thread starts finalising, and then aborts the process
    (SIGABRT, "terminate called without an active exception", seen in about 1 of 12 preemption stops under DeepSpeed
    on CPU), which would replace the exit code (128 + signal after a preemption stop) that schedulers and
    ``torchrun --max-restarts`` read. Everything the run writes is on disk by then (atomic writes, closed files)."""
    code = 0 if code is None else int(code)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be written anyway
            pass
    os._exit(code)


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
