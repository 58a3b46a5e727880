"""The teacher's fast path: torch.compile as one graph (early exit included), inference mode, channels_last, bf16,
CUDA graphs, SDPA attention."""

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers.models.attention_processor import AttnProcessor2_0

from dtfast.teachers import TeacherOptions, build_teacher
from dtfast.teachers.base import attention_processors


def images(batch=2, size=64, seed=0, device="cpu"):
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return x.to(device)


def assert_features_close(got, want, dtype):
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        scale = b.float().abs().max().clamp_min(1.0)
        assert (a.float() - b.float()).abs().max() <= tolerance * scale


def test_options_resolve_per_device():
    cpu = TeacherOptions().resolved(torch.device("cpu"))
    assert (cpu.compile, cpu.channels_last, cpu.early_exit, cpu.inference_mode) == (False, False, True, True)
    cuda = TeacherOptions().resolved(torch.device("cuda"))
    assert (cuda.compile, cuda.channels_last) == (True, True)
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        TeacherOptions(cuda_graph=True).resolved(torch.device("cpu"))
    with pytest.raises(ValueError, match="pick one"):
        TeacherOptions(cuda_graph=True, compile=True, compile_mode="reduce-overhead").resolved(torch.device("cuda"))
    with pytest.raises(ValueError, match="latent_mode"):
        TeacherOptions(latent_mode="median").resolved(torch.device("cpu"))


def test_compiled_teacher_is_one_graph_and_matches_eager():
    """fullgraph=True: a graph break anywhere in the walk (early exit included) raises instead of splitting.

    Strides 16 and 32: the walk leaves after the second of six up blocks (the full set is in the slow test)."""
    eager = build_teacher("tiny", seed=0, strides=(16, 32))
    compiled = build_teacher("tiny", seed=0, strides=(16, 32), compile=True, compile_backend="eager", fullgraph=True)
    torch._dynamo.reset()
    x = images()
    want = eager(x, generator=torch.Generator().manual_seed(1))
    got = compiled(x, generator=torch.Generator().manual_seed(1))
    assert_features_close(got, want, torch.float32)
    assert not any(f.is_inference() for f in got)


@pytest.mark.slow
@pytest.mark.parametrize("arch,strides", [("tiny", (4, 8, 16, 32)), ("tiny-sd", (8, 16, 32, 64))])
def test_inductor_on_cpu_matches_eager(arch, strides):
    eager = build_teacher(arch, strides=strides)
    compiled = build_teacher(arch, strides=strides, compile=True)
    torch._dynamo.reset()
    x = images()
    explanation = torch._dynamo.explain(compiled._encode)(x, torch.randn(compiled._noise_shape(x)))
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
    assert_features_close(
        compiled(x, torch.Generator().manual_seed(2)), eager(x, torch.Generator().manual_seed(2)), torch.float32
    )


@pytest.mark.parametrize("inference_mode", [True, False])
def test_channels_last_and_grad_modes_match(inference_mode):
    plain = build_teacher("tiny", seed=0, channels_last=False)
    fast = build_teacher("tiny", seed=0, channels_last=True, inference_mode=inference_mode)
    assert fast.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    x = images()
    got = fast(x, torch.Generator().manual_seed(3))
    assert_features_close(got, plain(x, torch.Generator().manual_seed(3)), torch.float32)
    assert not any(f.is_inference() or f.requires_grad for f in got)


def test_outer_autocast_does_not_change_teacher_dtype():
    teacher = build_teacher("tiny", seed=0, strides=(32,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = teacher(images(1))
    assert features[0].dtype == torch.float32


def test_sdpa_processor_is_restored():
    from diffusers.models.attention_processor import AttnProcessor

    teacher = build_teacher("tiny", seed=0)
    for module in teacher.unet.modules():
        if hasattr(module, "set_processor"):
            module.set_processor(AttnProcessor())
    from dtfast.teachers.base import check_sdpa

    check_sdpa(teacher.unet)
    processors = attention_processors(teacher.unet)
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors.values())


# ----- CUDA (run by the GPU check script) ---------------------------------------------------------------------------
# Kept to one inductor compile (tiny): the GPU check runs every needs_cuda test of the project in ~2 minutes.
@pytest.mark.needs_cuda
@pytest.mark.parametrize(
    "arch,strides,size,compile", [("tiny", (4, 8, 16, 32), 64, True), ("tiny-sd", (8, 16, 32, 64), 128, False)]
)
def test_cuda_defaults_bf16_match_eager(arch, strides, size, compile):
    """The fast path's error against fp32 is at most ~2x that of plain eager bf16 (flash-attention's rule)."""
    common = {"strides": strides, "device": "cuda", "channels_last": False, "compile": False}
    reference = build_teacher(arch, dtype=torch.float32, **common)
    eager_bf16 = build_teacher(arch, **common)
    fast = build_teacher(arch, strides=strides, device="cuda", compile=compile)  # bf16 + channels_last by default
    assert fast.options.compile == compile and fast.options.channels_last
    assert fast.unet.conv_in.weight.dtype == torch.bfloat16
    processors = attention_processors(fast.unet)
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors.values())
    x = images(4, size, device="cuda")
    want, base, got = (t(x, torch.Generator("cuda").manual_seed(0)) for t in (reference, eager_bf16, fast))
    for w, b, g in zip(want, base, got):
        assert g.dtype == torch.bfloat16 and g.shape == w.shape
        scale = w.abs().max()
        base_error = (b.float() - w).abs().max() / scale
        fast_error = (g.float() - w).abs().max() / scale
        assert fast_error <= 2 * base_error + 1e-3, (fast_error, base_error)


@pytest.mark.needs_cuda
def test_cuda_graph_replay_matches_and_other_shapes_fall_back():
    eager = build_teacher("tiny", device="cuda", compile=False)
    graphed = build_teacher("tiny", device="cuda", compile=False, cuda_graph=True)
    for seed in (0, 1):  # capture, then replay with new inputs
        x = images(4, 64, seed=seed, device="cuda")
        got = graphed(x, torch.Generator("cuda").manual_seed(seed))
        assert_features_close(got, eager(x, torch.Generator("cuda").manual_seed(seed)), torch.bfloat16)
    first = graphed(images(4, 64, seed=5, device="cuda"))
    second = graphed(images(4, 64, seed=6, device="cuda"))
    assert not torch.equal(first[0], second[0])  # outputs are copies, not the graph's static buffers
    other = graphed(images(2, 64, device="cuda"))  # a different batch shape runs without the graph
    assert other[0].shape[0] == 2
