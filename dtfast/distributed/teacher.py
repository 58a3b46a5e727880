"""The frozen teacher partitioned with ZeRO-3 for inference (``teacher.shard = true``).

Each rank keeps 1/world_size of every weight; a module's weights are all-gathered just before it runs and released
right after (DeepSpeed's ZeRO-3 forward hooks), so the resident teacher memory is its size / world_size plus the
largest few modules in flight. There is no optimizer, no gradient and no optimizer state: the teacher stays frozen
(``requires_grad=False``, eval mode, no_grad).

How it is built: the teacher is constructed on the CPU (``shard_teacher`` receives it there), then
``deepspeed.zero.Init(module=teacher)`` moves and partitions it one parameter at a time (the full teacher never sits
on the GPU), then ``deepspeed.initialize`` with a stage-3 config and no optimizer installs the gather/release hooks.
Features equal the replicated teacher's (tests/test_distributed_teacher.py); torch.compile and CUDA graphs are off
for a sharded teacher (the hooks run Python between modules).
"""

from __future__ import annotations

import torch
from torch import nn

from dtfast.distributed.ds_config import teacher_ds_config
from dtfast.distributed.runtime import import_deepspeed, join_process_group

# teacher options that cannot work under ZeRO-3: its per-module hooks run Python between modules (no compile, no CUDA
# graph), gathered weights are written into parameters (no inference tensors), and partitions are flat contiguous
# buffers (no channels_last weights: DeepSpeed's byte views of them fail)
SHARD_OPTIONS = {"compile": False, "cuda_graph": False, "inference_mode": False, "channels_last": False}


class ShardedTeacher(nn.Module):
    """A ZeRO-3-partitioned teacher with the teacher interface (``forward(images, generator=None)``, ``strides``,
    ``channels``, ``is_random``, ``feature_shapes``). Every rank must call ``forward`` the same number of times: the
    gathers are collectives."""

    def __init__(self, teacher: nn.Module, engine):
        super().__init__()
        self.teacher = teacher
        self._engine = [engine]  # a list keeps DeepSpeed's engine out of this module's children and state_dict
        for name in ("strides", "channels", "is_random", "size_multiple", "in_channels"):
            if hasattr(teacher, name):
                setattr(self, name, getattr(teacher, name))

    def feature_shapes(self, height: int, width: int):
        return self.teacher.feature_shapes(height, width)

    @property
    def options(self):
        return self.teacher.options

    @property
    def dtype(self) -> torch.dtype:
        return next(self.teacher.parameters()).dtype

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        with torch.no_grad():
            return self._engine[0](images, generator=generator)

    def train(self, mode: bool = True) -> ShardedTeacher:
        return super().train(False)

    def local_numel(self) -> int:
        """Elements of the teacher's weights held by this rank (its partitions)."""
        return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in self.teacher.parameters())

    def full_numel(self) -> int:
        return sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in self.teacher.parameters())


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def shard_teacher(teacher: nn.Module, device: torch.device, timeout_minutes: int = 30) -> ShardedTeacher:
    """Partition ``teacher`` (built on the CPU, frozen) across the ranks of the process group with ZeRO-3.

    Collective: every rank calls it with the same teacher (same architecture and weights)."""
    import torch.distributed as dist

    deepspeed = import_deepspeed(device.type)
    join_process_group(deepspeed, timeout_minutes)
    params = list(teacher.parameters())
    if any(p.requires_grad for p in params):
        raise ValueError("shard_teacher: the teacher must be frozen (requires_grad=False) before sharding")
    dtypes = {p.dtype for p in params}
    if len(dtypes) != 1:
        raise ValueError(f"shard_teacher: the teacher mixes parameter dtypes {sorted(map(str, dtypes))}")
    dtype = dtypes.pop()
    config = teacher_ds_config(dist.get_world_size(), _dtype_name(dtype))
    deepspeed.zero.Init(module=teacher, config_dict_or_path=config, dtype=dtype)
    for module in teacher.modules():  # buffers (timesteps, scheduler constants) are small: every rank holds them
        for name, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[name] = buf.to(device)
    engine, _, _, _ = deepspeed.initialize(model=teacher, config=config, dist_init_required=False)
    teacher.requires_grad_(False)
    return ShardedTeacher(teacher, engine)
