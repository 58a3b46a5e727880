"""Smoke test of benchmarks/teacher_bench.py (the GPU check's teacher stage) on a tiny CPU config, and its profile."""

import functools
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "teacher_bench.py"


@functools.cache
def load_bench():
    spec = importlib.util.spec_from_file_location("teacher_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_teacher_bench_runs_rows_and_profiles(capsys):
    bench = load_bench()
    assert bench.main(["--archs", "tiny", "--size", "32", "--batch", "2", "--rows", "plain,fast-eager",
                       "--min-iters", "1", "--warmup", "0", "--no-record", "--profile"]) == 0
    out = capsys.readouterr().out
    assert "| tiny | plain | 2x32 | float32 |" in out and "| tiny | fast-eager | 2x32 | float32 |" in out
    assert "profile tiny fast-eager: busy" in out and "conv" in out
    with pytest.raises(SystemExit):  # a misspelt row is an error, not an empty table
        bench.main(["--archs", "tiny", "--rows", "fast_eager", "--no-record"])
    assert "no row(s) ['fast_eager']" in capsys.readouterr().err


def test_profile_categories_add_up():
    bench = load_bench()
    from dtfast.teachers import build_teacher

    teacher = build_teacher("tiny", strides=(4, 8, 16, 32))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    teacher(images)
    report = bench.profile_teacher(teacher, images, iters=1, top=5)
    assert report["busy_ms_per_iter"] > 0 and len(report["top"]) == 5
    assert sum(report["categories_ms_per_iter"].values()) == pytest.approx(report["busy_ms_per_iter"])
    assert report["categories_ms_per_iter"].get("conv", 0) > 0


@pytest.mark.parametrize("name,category", [
    ("triton_poi_fused__to_copy_add_convolution_silu_0", "fused (triton)"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "conv"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1", "matmul"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>", "attention"),
    ("void cudnn::ops::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false>", "layout"),
    ("aten::native_group_norm", "norm"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel>", "elementwise"),
    # names a review found filed as "other" or in the wrong place: cuBLAS's Hopper GEMMs, GroupNorm's statistics
    # pass, inductor's convolution template, and "cat" inside "scatter"
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "matmul"),
    ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::BFloat16>", "norm"),
    ("void at::native::(anonymous namespace)::ComputeFusedParamsCUDAKernel<float>", "norm"),
    ("triton_tem_fused_convolution_12", "conv"),
    ("aten::scatter_add_", "elementwise"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<float, unsigned int, 4, 64, 64>", "layout"),
])
def test_kernel_categories(name, category):
    assert load_bench().kernel_category(name) == category
