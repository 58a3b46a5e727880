"""FLOPs per image (``torch.utils.flop_counter``) and the device's measured peak matrix throughput.

- Teacher forward: counted on a weight-less copy of the teacher built on the meta device from the same
  config (``build_teacher(device="meta")``, same architecture and strides), with early exit on and off.
- Student forward + backward (backbone + regressor): counted on the trainer's actual student with fake
  tensors (``FakeTensorMode``: shapes only, no compute, no weight copy) at batch 1, in eval mode so that no
  BatchNorm statistic moves; the backward is ``torch.autograd.grad`` of the outputs w.r.t. the parameters.
- The loss and optimizer are elementwise: flop_counter counts matrix products and convolutions only, which is
  also what the peak below measures.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


class OpCounter(TorchDispatchMode):
    """``with OpCounter() as ops: ...``; ``ops.count``: the operator calls dispatched inside (a host-overhead proxy:
    on a GPU, roughly the kernel launches)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _custom_mapping() -> dict:
    """flop_counter knows the CUDA attention kernels but not the CPU flash kernel: count it the same way."""
    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op.default] = _cpu_sdpa_flop
    return mapping


def flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=_custom_mapping())


def teacher_forward_flops(cfg, image_size: int | tuple[int, int], early_exit: bool) -> int:
    """FLOPs of one teacher forward for one image at ``image_size`` (S or (H, W)), counted on a meta-device build."""
    from dtfast.data.transforms import image_hw
    from dtfast.teachers import build_teacher

    teacher = build_teacher(arch=cfg.teacher.arch or None, pretrained=cfg.teacher.pretrained or None,
                            timestep=cfg.teacher.timestep, strides=tuple(cfg.teacher.strides), device="meta",
                            dtype=torch.float32, compile=False, early_exit=early_exit)
    images = torch.zeros(1, 3, *image_hw(image_size), device="meta")
    with flop_counter() as counter:
        teacher(images)
    return int(counter.get_total_flops())


def student_train_flops(student: nn.Module, image_size: int | tuple[int, int]) -> int:
    """FLOPs of the student's forward + backward (input gradient not needed) for one image."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dtfast.data.transforms import image_hw

    was_training = student.training
    device = next(student.parameters()).device
    params = [p for p in student.parameters() if p.requires_grad]
    student.eval()
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            images = torch.empty(1, 3, *image_hw(image_size), device=device)
            with flop_counter() as counter:
                outputs = student(images)
                total = sum(o.float().square().mean() for o in outputs)
                torch.autograd.grad(total, params, allow_unused=True)
    finally:
        student.train(was_training)
    return int(counter.get_total_flops())


def count_flops(trainer, image_size: int | tuple[int, int]) -> dict[str, Any]:
    """FLOPs per image: teacher forward (early exit on / off), student fwd+bwd; {} entries that failed say why."""
    result: dict[str, Any] = {}
    for key, early_exit in (("teacher_early_exit", True), ("teacher_full", False)):
        try:
            result[key] = teacher_forward_flops(trainer.cfg, image_size, early_exit)
        except Exception as error:  # noqa: BLE001 - a teacher without a meta build: report, do not abort the benchmark
            result[key] = None
            result.setdefault("errors", []).append(f"{key}: {type(error).__name__}: {error}")
    try:
        result["student_train"] = student_train_flops(trainer.student, image_size)
    except Exception as error:  # noqa: BLE001
        result["student_train"] = None
        result.setdefault("errors", []).append(f"student_train: {type(error).__name__}: {error}")
    return result


def measure_peak_tflops(device: torch.device, size: int | None = None, repeats: int = 10) -> dict[str, Any]:
    """Best-of-``repeats`` dense matmul throughput: bf16 on CUDA (n=8192), fp32 on CPU (n=2048)."""
    if device.type == "cuda":
        n, dtype = size or 8192, torch.bfloat16
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        best = float("inf")
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
    else:
        n, dtype = size or 2048, torch.float32
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        best = float("inf")
        for _ in range(max(3, repeats // 2)):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    return {"tflops": 2 * n**3 / best / 1e12, "matmul": f"{n}x{n}x{n} {str(dtype).replace('torch.', '')}",
            "source": "measured"}
