"""Host-side caches of the Triton loss (dtfast/kernels/_loss_meta.py): cached launch plans and flat gradient buffers
must give the same results as fresh ones whatever tensors, addresses and strides come with the same shapes.

TRITON_INTERPRET=1 on CPU tensors; on a CUDA machine the same tests run on CUDA tensors.
"""

import pytest
import torch

from tests.conftest import cpu_and_cuda

pytest.importorskip("triton")

from dtfast.ops import dreamteacher_loss
from dtfast.ops._backends import kernel_module, triton_kernels
from tests.test_ops_triton import _device_or_skip, check_against_oracle, make_levels, run_kernels

LEVELS = [(2, 24, 8, 8), (2, 16, 4, 4), (2, 40, 2, 2)]


@pytest.fixture
def meta():
    module = kernel_module("_loss_meta")
    module.clear_caches()
    yield module
    module.clear_caches()


def _stats(meta):
    return dict(meta.STATS)


def _delta(meta, before):
    return {k: v - before[k] for k, v in meta.STATS.items()}


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_plan_cache_hit_on_same_buffers_with_new_values(device, meta):
    """Same addresses/shapes again (a training step reusing its buffers): the plan is reused, results follow the
    new values."""
    device = _device_or_skip(device)
    student, teacher = make_levels(LEVELS, torch.float32, device, "contiguous", seed=1)
    check_against_oracle(student, teacher, "channel", "paper", seed=1)
    new_s, new_g = make_levels(LEVELS, torch.float32, device, "contiguous", seed=2)
    for dst, src in zip(student + teacher, new_s + new_g):
        dst.copy_(src)
    before = _stats(meta)
    check_against_oracle(student, teacher, "channel", "paper", seed=2)
    delta = _delta(meta, before)
    assert delta["plan_builds"] == 0 and delta["plan_hits"] >= 2  # forward and backward both hit
    # the second run launched the autotuned NCHW kernels with the configuration memoised on the plan
    memo = {key[0] for plan in meta._PLAN_CACHE.values() for key in plan.extra}
    assert {"fwd_tuned", "bwd_tuned"} <= memo


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_plan_cache_same_shapes_other_tensors_and_strides(device, meta):
    """Same shapes with other tensors (other addresses, other offsets between levels), then the same storage seen
    through other strides (channels_last, then a non-contiguous view): each gets its own correct plan."""
    device = _device_or_skip(device)
    for seed, layout in [(3, "contiguous"), (4, "contiguous"), (5, "channels_last"), (6, "strided"),
                         (3, "contiguous")]:
        student, teacher = make_levels(LEVELS, torch.float32, device, layout, seed=seed)
        check_against_oracle(student, teacher, "sample", "code", seed=seed)
    # one storage, two layouts: identical data pointers and shapes, NCHW vs channels_last strides
    flat = [torch.randn(2 * b * c * h * w, device=device) for b, c, h, w in LEVELS]
    meta.clear_caches()
    builds = []
    for channels_last in (False, True, False):
        maps = []
        for (b, c, h, w), x in zip(LEVELS, flat):
            half = [x[: x.numel() // 2], x[x.numel() // 2:]]
            if channels_last:
                maps.append([t.view(b, h, w, c).permute(0, 3, 1, 2) for t in half])
            else:
                maps.append([t.view(b, c, h, w) for t in half])
        student, teacher = [m[0] for m in maps], [m[1] for m in maps]
        assert all(s.is_contiguous(memory_format=torch.channels_last) == channels_last for s in student)
        before = _stats(meta)
        check_against_oracle(student, teacher, "channel", "code", seed=8)
        builds.append(_delta(meta, before)["plan_builds"])
    assert builds == [1, 1, 0]  # the strides are part of the key; the NCHW plan is found again


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_plan_cache_reuses_addresses_of_freed_maps(device, meta):
    """New tensors at the addresses of freed ones (what the caching allocator does step after step)."""
    device = _device_or_skip(device)
    for seed in range(3):
        student, teacher = make_levels(LEVELS, torch.float32, device, "channels_last" if seed % 2 else "contiguous",
                                       seed=seed)
        check_against_oracle(student, teacher, "channel", "paper", seed=seed)
        del student, teacher


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_flat_grads_equal_separate_grads(device, layout, meta):
    device = _device_or_skip(device)
    kern = triton_kernels()
    student, teacher = make_levels(LEVELS, torch.float32, device, layout, seed=9)
    # two launch groups (NCHW and channels_last student maps) in one call
    s_cl, g_cl = make_levels([(2, 8, 3, 5)], torch.float32, device, "channels_last", seed=10)
    s_nc, g_nc = make_levels([(2, 12, 5, 3)], torch.float32, device, "contiguous", seed=11)
    student, teacher = student + s_cl + s_nc, teacher + g_cl + g_nc
    grad_mse = torch.rand(len(student), device=device) + 0.5
    grad_at = torch.rand(len(student), device=device) + 0.5
    _, _, saved, separate = run_kernels(student, teacher, "sample", "paper", grad_mse, grad_at)
    flat = kern.dreamteacher_loss_backward(grad_mse, grad_at, student, teacher, saved, 1, 0, flat_grads=True)
    assert len({g.untyped_storage().data_ptr() for g in flat}) == 2  # one buffer per launch group
    for a, b, s in zip(flat, separate, student):
        assert a.shape == s.shape and a.dtype == s.dtype and a.stride() == b.stride()
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the views do not overlap: each holds its own level's values after all levels are written
    spans = sorted((g.data_ptr(), g.data_ptr() + g.numel() * g.element_size()) for g in flat)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_eager_loss_repeated_steps_match_reference(device, meta):
    """The eager autograd path (flat gradient buffers, cached plans) over several steps with grads cleared between
    them, as a training loop runs it; gradients land in .grad with the maps' layout."""
    device = _device_or_skip(device)
    student, teacher = make_levels(LEVELS, torch.float32, device, "channels_last", seed=12)
    student = [s.requires_grad_() for s in student]
    ref_s = [s.detach().double().requires_grad_() for s in student]
    ref = dreamteacher_loss(ref_s, [g.double() for g in teacher], backend="torch")
    ref.backward()
    for _ in range(3):
        for s in student:
            s.grad = None
        loss = dreamteacher_loss(student, teacher, backend="triton")
        loss.backward()
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-7)
        for s, r in zip(student, ref_s):
            assert s.grad.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(s.grad.double(), r.grad, rtol=1e-4, atol=1e-6 * r.grad.abs().max().item())
    assert meta.STATS["plan_hits"] >= 4


def test_plan_cache_is_bounded_and_build_plan_takes_processed_maps(meta):
    if not torch.cuda.is_available():
        _device_or_skip("cpu")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.empty(2, 3, 4, 4, device=device)
    y = torch.empty(2, 3, 4, 4, device=device)
    for i in range(meta.PLAN_CACHE_SIZE + 5):
        s = torch.empty(2, 3, 4, 4 + i, device=device)
        meta.prepare([s], [s], 0)
    assert len(meta._PLAN_CACHE) == meta.PLAN_CACHE_SIZE
    with pytest.raises(ValueError, match="contiguous"):
        meta.build_plan([x[..., ::2]], [y[..., ::2]], 0)
