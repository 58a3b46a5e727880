"""The CUDA kernels of torch.ops.dtfast.dreamteacher_loss_{fwd,bwd} against the float64 oracle (on the GPU).

Shapes cover both load paths of every kernel: odd shapes (C=37, H=W=13: scalar loads) and vector-friendly ones
(16-byte loads), channels_last and NCHW, misaligned data pointers, and more levels than one launch takes.
"""

import os

import pytest
import torch
from test_ops_cpp import (
    LEVEL_SHAPES,
    MODES,
    check_ops_against_oracle,
    make_levels,
    oracle_grads,
    same_dtype_reference,
    VECTOR_SHAPES,
)

pytestmark = pytest.mark.needs_cuda

if os.environ.get("DTFAST_REQUIRE_EXT") == "1":
    import dtfast._C as native
else:
    native = pytest.importorskip("dtfast._C", reason="dtfast._C is not built (pip install --no-build-isolation -e .)")

fwd_op = torch.ops.dtfast.dreamteacher_loss_fwd
bwd_op = torch.ops.dtfast.dreamteacher_loss_bwd



@pytest.fixture(autouse=True)
def _needs_cuda_kernels():
    if not native.with_cuda():
        if os.environ.get("DTFAST_REQUIRE_EXT") == "1":
            pytest.fail("dtfast._C was built without its CUDA kernels")
        pytest.skip("dtfast._C was built without its CUDA kernels")


def to_cuda(tensors):
    """Same values on the GPU; .cuda() keeps channels_last but densifies strided views, so rebuild those."""
    out = []
    for t in tensors:
        if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
            out.append(t.cuda())
        else:
            b, c, h, w = t.shape
            wide = torch.zeros(b, 2 * c, h, w, dtype=t.dtype, device="cuda")
            wide[:, ::2] = t.cuda()
            out.append(wide[:, ::2])
    return out


def check_against_oracle(student, teacher, whiten, at_mode, dtype, gen):
    return check_ops_against_oracle(fwd_op, bwd_op, student, teacher, whiten, at_mode, dtype, gen)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "mixed", "non_contiguous"])
@pytest.mark.parametrize("shapes", ["odd", "vector"])
@pytest.mark.parametrize("whiten,at_mode", MODES)
def test_values_and_grads(dtype, layout, shapes, whiten, at_mode):
    gen = torch.Generator().manual_seed(17 + 2 * whiten + at_mode)
    student, teacher = make_levels(dtype, layout, gen, LEVEL_SHAPES if shapes == "odd" else VECTOR_SHAPES)
    check_against_oracle(to_cuda(student), to_cuda(teacher), whiten, at_mode, dtype, gen)


@pytest.mark.parametrize("whiten,at_mode", MODES)
def test_more_levels_than_one_launch_and_misaligned_pointers(whiten, at_mode):
    gen = torch.Generator().manual_seed(23)
    shapes = [(2, 8 * (1 + i % 3), 4 + i, 4) for i in range(11)]  # 11 levels: two launches of at most 8
    student, teacher = make_levels(torch.float32, "contiguous", gen, shapes)
    student, teacher = to_cuda(student), to_cuda(teacher)
    # Level 0 through a storage offset of one element: 16-byte loads are illegal there (scalar path).
    for maps in (student, teacher):
        base = torch.empty(maps[0].numel() + 1, device="cuda", dtype=maps[0].dtype)
        base[1:].copy_(maps[0].flatten())
        maps[0] = base[1:].view_as(maps[0])
        assert maps[0].data_ptr() % 16 != 0
    check_against_oracle(student, teacher, whiten, at_mode, torch.float32, gen)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("whiten,at_mode", MODES)
def test_low_precision_rule(dtype, layout, whiten, at_mode):
    """Error vs float64 at most ~2x that of the same-dtype PyTorch computation, at ADM-like level shapes."""
    gen = torch.Generator().manual_seed(29 + whiten + 2 * at_mode)
    shapes = [(2, 512, 32, 32), (2, 1024, 16, 16), (2, 1024, 8, 8), (3, 37, 13, 13)]
    student, teacher = make_levels(dtype, layout, gen, shapes)
    student, teacher = to_cuda(student), to_cuda(teacher)
    grad_mse = torch.tensor([1.0, 0.5, 2.0, 1.5], device="cuda")
    grad_at = torch.tensor([10.0, 10.0, 5.0, 20.0], device="cuda")
    mse64, at64, grads64 = oracle_grads(student, teacher, whiten, at_mode, grad_mse, grad_at)
    leaves = [s.detach().clone().requires_grad_() for s in student]
    mse_lp, at_lp = same_dtype_reference(leaves, teacher, whiten, at_mode)
    grads_lp = torch.autograd.grad((mse_lp * grad_mse.to(dtype)).sum() + (at_lp * grad_at.to(dtype)).sum(), leaves)
    mse, at, saved = fwd_op(student, teacher, whiten, at_mode)
    grads = bwd_op(grad_mse, grad_at, student, teacher, saved, whiten, at_mode)
    floor = torch.finfo(dtype).eps * 1e-3
    for name, got, low, exact in [("mse", mse, mse_lp, mse64), ("at", at, at_lp, at64)]:
        err, err_lp = (got.double() - exact).abs().max(), (low.double() - exact).abs().max()
        assert err <= 2 * err_lp + floor * exact.abs().max(), f"{name}: error {err:.3e}, {dtype} reference {err_lp:.3e}"
    for level, (got, low, exact) in enumerate(zip(grads, grads_lp, grads64)):
        err, err_lp = (got.double() - exact).abs().max(), (low.double() - exact).abs().max()
        assert err <= 2 * err_lp + floor * exact.abs().max(), (
            f"grad of level {level}: error {err:.3e}, {dtype} reference {err_lp:.3e}"
        )


@pytest.mark.parametrize("whiten", [0, 1])
def test_saved_statistics_interchangeable_with_cpu(whiten):
    """Same saved-statistics contract as the CPU kernel: CUDA forward + CPU backward == CPU forward + backward."""
    gen = torch.Generator().manual_seed(31)
    student, teacher = make_levels(torch.float64, "channels_last", gen, VECTOR_SHAPES + LEVEL_SHAPES[:1])
    gm, ga = torch.rand(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    mse_cpu, at_cpu, saved_cpu = fwd_op(student, teacher, whiten, 0)
    mse_gpu, at_gpu, saved_gpu = fwd_op(to_cuda(student), to_cuda(teacher), whiten, 0)
    torch.testing.assert_close(mse_gpu.cpu(), mse_cpu)
    torch.testing.assert_close(at_gpu.cpu(), at_cpu)
    for a, b in zip(saved_gpu, saved_cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-12)
    grads_cpu = bwd_op(gm, ga, student, teacher, saved_cpu, whiten, 0)
    grads_mixed = bwd_op(gm, ga, student, teacher, [s.cpu() for s in saved_gpu], whiten, 0)
    for a, b in zip(grads_mixed, grads_cpu):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_deterministic():
    gen = torch.Generator().manual_seed(37)
    student, teacher = make_levels(torch.bfloat16, "channels_last", gen, VECTOR_SHAPES + LEVEL_SHAPES)
    student, teacher = to_cuda(student), to_cuda(teacher)
    runs = []
    for _ in range(2):
        mse, at, saved = fwd_op(student, teacher, 1, 0)
        grads = bwd_op(torch.ones(7, device="cuda"), torch.ones(7, device="cuda"), student, teacher, saved, 1, 0)
        runs.append([mse, at, *saved, *grads])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_backward_rows_per_thread_override_gives_the_same_bits(layout, monkeypatch):
    """DTFAST_CUDA_BWD_ROUNDS (loss_bench --cuda-bwd-rounds) only regroups the backward's elements: each element's
    arithmetic is the same, so the gradients are bitwise those of the default plan."""
    monkeypatch.delenv("DTFAST_CUDA_BWD_ROUNDS", raising=False)  # the default plan, whatever the caller's environment
    gen = torch.Generator().manual_seed(41)
    student, teacher = make_levels(torch.bfloat16, layout, gen, VECTOR_SHAPES + LEVEL_SHAPES)
    student, teacher = to_cuda(student), to_cuda(teacher)
    ones = torch.ones(len(student), device="cuda")
    _, _, saved = fwd_op(student, teacher, 0, 0)
    default = bwd_op(ones, ones * 10, student, teacher, saved, 0, 0)
    for rounds in ("1", "7", "64"):
        monkeypatch.setenv("DTFAST_CUDA_BWD_ROUNDS", rounds)
        for g, d in zip(bwd_op(ones, ones * 10, student, teacher, saved, 0, 0), default):
            assert torch.equal(g, d), rounds


def test_gradcheck_cuda():
    from test_ops_cpp import _NativeLoss

    gen = torch.Generator().manual_seed(41)
    student, teacher = make_levels(torch.float64, "channels_last", gen, [(2, 8, 3, 4), (2, 3, 2, 2)])
    student = [s.cuda().requires_grad_() for s in student]
    teacher = to_cuda(teacher)
    for whiten, at_mode in MODES:
        assert torch.autograd.gradcheck(
            lambda *s, w=whiten, a=at_mode: _NativeLoss.apply(w, a, len(student), *s, *teacher),
            student,
            eps=1e-6,
            atol=1e-6,
        )


def test_opcheck_cuda():
    student, teacher = make_levels(torch.float32, "channels_last", torch.Generator().manual_seed(43), VECTOR_SHAPES)
    student, teacher = to_cuda(student), to_cuda(teacher)
    torch.library.opcheck(fwd_op.default, (student, teacher, 0, 0))
    _, _, saved = fwd_op(student, teacher, 0, 0)
    grads = (torch.rand(3, device="cuda"), torch.rand(3, device="cuda"))
    torch.library.opcheck(bwd_op.default, (*grads, student, teacher, saved, 0, 0))


# flushed markers (and faulthandler in the child): a crash shows whether it came during the call or after it, e.g.
# at interpreter exit, where an unflushed "ERROR:" line would otherwise be lost with the process
# Two raw-op errors in one child, each between flushed markers (and faulthandler on): (a) a shape mismatch with every
# tensor on the GPU, (b) the device mismatch. If (a) crashes too, errors thrown by the CUDA extension's host code are
# not caught at all on that machine; if only (b) does, it is specific to mixed devices. A crash at interpreter exit
# shows as every marker printed and a non-zero exit.
_ERRORS_SCRIPT = """
import torch
import dtfast._C
print("IMPORTED", flush=True)
cases = {
    "shape": ([torch.randn(2, 8, 4, 4, device="cuda")], [torch.randn(2, 8, 4, 5, device="cuda")]),
    "device": ([torch.randn(2, 8, 4, 4, device="cuda")], [torch.randn(2, 8, 4, 4)]),
}
for name, (student, teacher) in cases.items():
    print("CALLING", name, flush=True)
    try:
        torch.ops.dtfast.dreamteacher_loss_fwd(student, teacher, 0, 0)
        print("NO ERROR", name, flush=True)
    except RuntimeError as error:
        print("ERROR", name, str(error).splitlines()[0], flush=True)
print("RETURNED", flush=True)
"""


def test_raw_op_errors_on_cuda_are_clear():
    # In a child process: on an H100 and again on an H200 (torch 2.11, 2026-11-27) the device-mismatch call crashed
    # the interpreter with a segmentation fault (exit -11, nothing printed) instead of raising, which took the rest
    # of the CUDA test session down with it. Unresolved. Ruled out on the CPU machine (torch 2.14): a TORCH_CHECK
    # thrown from nvcc-compiled host code and registered as an op is caught as a RuntimeError there. Keep it
    # isolated; the public API checks devices in Python first (dtfast/ops/_validate.py).
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _ERRORS_SCRIPT], capture_output=True,
                          text=True, timeout=120, env=env)
    report = f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert "ERROR shape" in proc.stdout and "student shape [2, 8, 4, 4] != teacher shape" in proc.stdout, report
    assert "level 0: student on cuda:0, teacher on cpu" in proc.stdout, report
    assert proc.returncode == 0, report
