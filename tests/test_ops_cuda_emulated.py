"""The CUDA kernels of dtfast._C (csrc/dreamteacher_loss/cuda), run on CPU threads by a host emulation, against the
float64 oracle: CI checks their indexing, launch plans and arithmetic on a machine without a GPU.

tests/cuda_emulation/emulate.cpp compiles kernels.cuh and host.h unchanged with the host compiler (each block runs as
CPU threads, with __syncthreads and warp shuffles through barriers), so these are the same kernels and the same
launch sequences the CUDA build runs. What only a GPU shows (the CUDA compiler's code, races, speed) stays with
tests/test_ops_cuda.py. Emulated warp shuffles are slow: shapes are small except where a test needs the real plan.
"""

import os

import pytest
import torch
from test_ops_cpp import LEVEL_SHAPES, MODES, VECTOR_SHAPES, check_ops_against_oracle, make_levels
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_SHAPES = [(2, 37, 3, 5), (2, 64, 4, 4), (3, 16, 2, 2)]  # channels_last: one warp per pixel, cheap shapes


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    if not cpp_extension.is_ninja_available():  # the README's install command installs it
        pytest.skip("ninja is not installed (pip install ninja): torch builds the emulation with it")
    build = tmp_path_factory.mktemp("cuda_emulation")
    return cpp_extension.load(
        name="dtfast_cuda_emulation",
        sources=[os.path.join(ROOT, "tests", "cuda_emulation", "emulate.cpp"),
                 os.path.join(ROOT, "csrc", "dreamteacher_loss", "common.cpp")],
        extra_include_paths=[os.path.join(ROOT, "csrc")],
        extra_cflags=["-O2", "-ffp-contract=off"],  # as setup.py: no FMA contraction
        build_directory=str(build),
    )


def ops(emu):
    def fwd(student, teacher, whiten, at_mode):
        mse, at, *saved = emu.forward(student, teacher, whiten, at_mode)
        return mse, at, saved

    return fwd, emu.backward


@pytest.mark.parametrize(
    "dtype,layout,shapes,modes",
    [
        (torch.float32, "contiguous", LEVEL_SHAPES, [(0, 0), (1, 1)]),  # scalar loads
        (torch.float32, "contiguous", VECTOR_SHAPES, [(0, 1), (1, 0)]),  # 16-byte loads
        (torch.float64, "contiguous", VECTOR_SHAPES, [(0, 0)]),
        (torch.float32, "channels_last", SMALL_SHAPES, MODES),
        (torch.float32, "mixed", SMALL_SHAPES, [(0, 1)]),
        (torch.float64, "non_contiguous", LEVEL_SHAPES, [(1, 0)]),
    ],
    ids=["f32-nchw-odd", "f32-nchw-vector", "f64-nchw-vector", "f32-channels_last", "f32-mixed", "f64-strided"],
)
def test_values_and_grads(emu, dtype, layout, shapes, modes):
    fwd, bwd = ops(emu)
    for whiten, at_mode in modes:
        gen = torch.Generator().manual_seed(101 + 2 * whiten + at_mode)
        student, teacher = make_levels(dtype, layout, gen, shapes)
        check_ops_against_oracle(fwd, bwd, student, teacher, whiten, at_mode, dtype, gen)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_low_precision_matches_the_cpu_kernel(emu, dtype, layout):
    """16-bit inputs (8 per 16-byte vector) through the emulated kernels == the C++ CPU kernel (both fp32 math)."""
    pytest.importorskip("dtfast._C")
    gen = torch.Generator().manual_seed(7)
    student, teacher = make_levels(dtype, layout, gen, VECTOR_SHAPES if layout == "contiguous" else SMALL_SHAPES)
    fwd, bwd = ops(emu)
    grad_mse, grad_at = torch.rand(3, generator=gen) + 0.5, torch.rand(3, generator=gen) * 20
    for whiten, at_mode in [(0, 0), (1, 1)]:
        mse, at, saved = fwd(student, teacher, whiten, at_mode)
        mse_cpu, at_cpu, saved_cpu = torch.ops.dtfast.dreamteacher_loss_fwd(student, teacher, whiten, at_mode)
        torch.testing.assert_close(mse, mse_cpu, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(at, at_cpu, rtol=1e-4, atol=1e-7)
        grads = bwd(grad_mse, grad_at, student, teacher, saved, whiten, at_mode)
        grads_cpu = torch.ops.dtfast.dreamteacher_loss_bwd(grad_mse, grad_at, student, teacher, saved_cpu, whiten,
                                                           at_mode)
        for level, (g, g_cpu) in enumerate(zip(grads, grads_cpu)):
            assert g.dtype == dtype and g.stride() == g_cpu.stride(), f"level {level}"
            # one 16-bit rounding of the same fp32 value, up to the fp32 differences of the statistics
            torch.testing.assert_close(g.float(), g_cpu.float(), rtol=2 * torch.finfo(dtype).eps, atol=1e-6,
                                       msg=lambda m, level=level: f"grad of level {level}: {m}")


def test_more_levels_than_one_launch_and_misaligned_pointers(emu):
    gen = torch.Generator().manual_seed(23)
    shapes = [(2, 8 * (1 + i % 3), 4 + i % 4, 4) for i in range(11)]  # 11 levels: two launches of at most 8
    student, teacher = make_levels(torch.float32, "contiguous", gen, shapes)
    for maps in (student, teacher):  # level 0 one element into its storage: no 16-byte loads there
        base = torch.empty(maps[0].numel() + 1, dtype=maps[0].dtype)
        base[1:].copy_(maps[0].flatten())
        maps[0] = base[1:].view_as(maps[0])
        assert maps[0].data_ptr() % 16 != 0
    fwd, bwd = ops(emu)
    check_ops_against_oracle(fwd, bwd, student, teacher, 1, 0, torch.float32, gen)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_backward_plan_at_adm_level_shapes(emu, layout):
    """The backward at the largest ADM-256 level shapes (several tiles and chunks per sample, 16-byte loads): every
    element written once, equal to the CPU kernel's gradient from the same saved statistics."""
    pytest.importorskip("dtfast._C")
    gen = torch.Generator().manual_seed(5)
    shapes = [(2, 512, 64, 64), (1, 1024, 8, 8)] if layout == "contiguous" else [(1, 512, 32, 32), (1, 1024, 8, 8)]
    student, teacher = make_levels(torch.bfloat16, layout, gen, shapes)
    plan = emu.backward_plan(student, teacher)
    for (b, c, h, w), (lanes, tiles, chunk, chunks, vectorised) in zip(shapes, plan):
        inner, outer = (h * w, c) if layout == "contiguous" else (c, h * w)
        assert vectorised == 1
        assert lanes * tiles * 8 >= inner > lanes * (tiles - 1) * 8 and chunk * chunks >= outer > chunk * (chunks - 1)
    assert any(tiles > 1 for _, tiles, _, _, _ in plan) or layout == "channels_last"
    assert any(chunks > 1 for _, _, _, chunks, _ in plan)
    _, _, saved = torch.ops.dtfast.dreamteacher_loss_fwd(student, teacher, 0, 0)
    grad_mse, grad_at = torch.tensor([1.5, 0.5]), torch.tensor([10.0, 3.0])
    grads = emu.backward(grad_mse, grad_at, student, teacher, saved, 0, 0)
    grads_cpu = torch.ops.dtfast.dreamteacher_loss_bwd(grad_mse, grad_at, student, teacher, saved, 0, 0)
    for g, g_cpu in zip(grads, grads_cpu):
        torch.testing.assert_close(g.float(), g_cpu.float(), rtol=2 * torch.finfo(torch.bfloat16).eps, atol=1e-6)


@pytest.mark.parametrize("rounds", ["1", "3", "16"])
def test_backward_rows_per_thread_override(emu, rounds, monkeypatch):
    """DTFAST_CUDA_BWD_ROUNDS (loss_bench --cuda-bwd-rounds) changes the backward's rows per block, not its result:
    odd and large values leave partial chunks and single-chunk levels, every element still written once."""
    gen = torch.Generator().manual_seed(31)
    shapes = [(2, 37, 5, 7), (2, 64, 8, 8), (1, 200, 2, 4)]
    student, teacher = make_levels(torch.float32, "contiguous", gen, shapes)
    default_plan = emu.backward_plan(student, teacher)
    monkeypatch.setenv("DTFAST_CUDA_BWD_ROUNDS", rounds)
    plan = emu.backward_plan(student, teacher)
    for (lanes, _, chunk, chunks, _), (_, _, default_chunk, _, _), (_, c, _, _) in zip(plan, default_plan, shapes):
        assert chunk == 256 // lanes * 4 * int(rounds) == default_chunk // 2 * int(rounds)
        assert chunk * chunks >= c > chunk * (chunks - 1)
    fwd, bwd = ops(emu)
    check_ops_against_oracle(fwd, bwd, student, teacher, 0, 0, torch.float32, gen)
    # each element's arithmetic does not depend on the plan: the same bits as the default plan's
    _, _, saved = fwd(student, teacher, 0, 0)
    grad_mse, grad_at = torch.tensor([1.0, 0.5, 2.0]), torch.tensor([10.0, 3.0, 1.0])
    overridden = bwd(grad_mse, grad_at, student, teacher, saved, 0, 0)
    monkeypatch.delenv("DTFAST_CUDA_BWD_ROUNDS")
    for g, d in zip(overridden, bwd(grad_mse, grad_at, student, teacher, saved, 0, 0)):
        assert torch.equal(g, d)
    monkeypatch.setenv("DTFAST_CUDA_BWD_ROUNDS", "0")
    with pytest.raises(RuntimeError, match=r"DTFAST_CUDA_BWD_ROUNDS='0': expected an integer in 1\.\.64"):
        emu.backward_plan(student, teacher)


@pytest.mark.parametrize("whiten", [0, 1])
def test_saved_statistics_interchangeable_with_the_cpu_kernel(emu, whiten):
    """Same saved-statistics contract as the CPU kernel (common.h): each backward takes the other's forward state."""
    pytest.importorskip("dtfast._C")
    gen = torch.Generator().manual_seed(31)
    student, teacher = make_levels(torch.float64, "contiguous", gen, VECTOR_SHAPES[1:] + LEVEL_SHAPES[:1])
    gm, ga = torch.rand(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    fwd, bwd = ops(emu)
    mse, at, saved = fwd(student, teacher, whiten, 0)
    mse_cpu, at_cpu, saved_cpu = torch.ops.dtfast.dreamteacher_loss_fwd(student, teacher, whiten, 0)
    torch.testing.assert_close(mse, mse_cpu)
    torch.testing.assert_close(at, at_cpu)
    for a, b in zip(saved, saved_cpu):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    grads_cpu = torch.ops.dtfast.dreamteacher_loss_bwd(gm, ga, student, teacher, saved_cpu, whiten, 0)
    for a, b in zip(bwd(gm, ga, student, teacher, saved_cpu, whiten, 0), grads_cpu):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)

