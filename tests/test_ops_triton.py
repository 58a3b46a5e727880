"""Triton kernels of the DreamTeacher loss against the float64 reference (TRITON_INTERPRET=1 on CPU tensors).

On a CUDA machine the same tests run on CUDA tensors (the CPU variants need the interpreter and skip there).
"""

import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from dtfast.ops.reference import dreamteacher_loss_parts
from tests.conftest import cpu_and_cuda

pytest.importorskip("triton")

from dtfast.ops._backends import triton_kernels

WHITEN = {"channel": 0, "sample": 1}
AT_MODE = {"paper": 0, "code": 1}
COMBOS = [(w, a) for w in WHITEN for a in AT_MODE]
LEVELS = [(3, 37, 13, 13), (3, 16, 8, 8), (3, 5, 3, 7)]
# error rule per dtype: err(kernel vs float64) <= FACTOR * err(same-dtype reference vs float64) + FLOOR,
# errors measured relative to the largest float64 magnitude of each compared quantity
TOLERANCE = {torch.float32: (2.0, 1e-6), torch.bfloat16: (2.0, 1e-5), torch.float16: (2.0, 1e-5)}


def _device_or_skip(device):
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton runs CPU tensors only under TRITON_INTERPRET=1")
    return device


def make_levels(shapes, dtype, device, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    student, teacher = [], []
    for shape in shapes:
        s = torch.randn(shape, generator=gen, dtype=torch.float64)
        g = 1.5 + 2.0 * torch.randn(shape, generator=gen, dtype=torch.float64) * torch.rand(shape[1], 1, 1,
                                                                                          generator=gen)
        pair = []
        for x in (s, g):
            x = x.to(device=device, dtype=dtype)
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            elif layout == "strided":  # a non-contiguous view: every other column of a wider map
                B, C, H, W = shape
                wide = torch.zeros(B, C, H, 2 * W, dtype=dtype, device=device)
                wide[..., ::2] = x
                x = wide[..., ::2]
            pair.append(x)
        student.append(pair[0])
        teacher.append(pair[1])
    return student, teacher


def reference_terms(student, teacher, whiten, at_mode, grad_mse, grad_at, dtype=torch.float64):
    """(mse, at, grads) of the reference with inputs cast to ``dtype`` (float64 = the oracle)."""
    s = [x.detach().to(dtype).requires_grad_() for x in student]
    g = [x.detach().to(dtype) for x in teacher]
    mse, at = dreamteacher_loss_parts(s, g, whiten, at_mode)
    ((mse * grad_mse.to(mse.dtype)).sum() + (at * grad_at.to(at.dtype)).sum()).backward()
    return mse.detach(), at.detach(), [x.grad for x in s]


def rel_err(x, oracle):
    return ((x.double() - oracle).abs().max() / oracle.abs().max().clamp_min(1e-30)).item()


def run_kernels(student, teacher, whiten, at_mode, grad_mse, grad_at):
    kern = triton_kernels()
    mse, at, saved = kern.dreamteacher_loss_forward(student, teacher, WHITEN[whiten], AT_MODE[at_mode])
    grads = kern.dreamteacher_loss_backward(grad_mse, grad_at, student, teacher, saved, WHITEN[whiten],
                                            AT_MODE[at_mode])
    return mse, at, saved, grads


def check_against_oracle(student, teacher, whiten, at_mode, seed):
    dtype = student[0].dtype
    gen = torch.Generator().manual_seed(seed + 100)
    L = len(student)
    grad_mse = (torch.rand(L, generator=gen) * 3).to(student[0].device)  # random grad_output per level
    grad_at = (torch.rand(L, generator=gen) * 3).to(student[0].device)
    mse, at, saved, grads = run_kernels(student, teacher, whiten, at_mode, grad_mse, grad_at)
    o_mse, o_at, o_grads = reference_terms(student, teacher, whiten, at_mode, grad_mse, grad_at)
    r_mse, r_at, r_grads = reference_terms(student, teacher, whiten, at_mode, grad_mse, grad_at, dtype)
    factor, floor = TOLERANCE[dtype]
    assert mse.dtype == at.dtype == torch.float32 and mse.shape == at.shape == (L,)
    for name, got, ref, oracle in [("mse", mse, r_mse, o_mse), ("at", at, r_at, o_at)]:
        err, ref_err = rel_err(got, oracle), rel_err(ref, oracle)
        assert err <= factor * ref_err + floor, f"{name}: kernel error {err:.3g} vs reference error {ref_err:.3g}"
    for lvl, (got, ref, oracle, s) in enumerate(zip(grads, r_grads, o_grads, student)):
        assert got.shape == s.shape and got.dtype == s.dtype
        err, ref_err = rel_err(got, oracle), rel_err(ref, oracle)
        assert err <= factor * ref_err + floor, f"grad {lvl}: kernel error {err:.3g} vs reference {ref_err:.3g}"
    return saved


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("whiten,at_mode", COMBOS)
def test_fp32_matches_float64_reference(device, layout, whiten, at_mode):
    device = _device_or_skip(device)
    student, teacher = make_levels(LEVELS, torch.float32, device, layout, seed=hash((layout, whiten, at_mode)) % 997)
    check_against_oracle(student, teacher, whiten, at_mode, seed=3)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("whiten,at_mode", [("channel", "paper"), ("sample", "code")])
def test_low_precision_within_twice_reference_error(device, dtype, whiten, at_mode):
    device = _device_or_skip(device)
    student, teacher = make_levels(LEVELS, dtype, device, "channels_last" if dtype == torch.float16 else "contiguous",
                                   seed=11)
    check_against_oracle(student, teacher, whiten, at_mode, seed=5)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_mixed_layouts_and_batch_sizes_in_one_call(device):
    """Levels in different memory formats form separate launch groups; batch may differ per level."""
    device = _device_or_skip(device)
    s1, g1 = make_levels([(2, 24, 6, 6)], torch.float32, device, "channels_last", seed=1)
    s2, g2 = make_levels([(4, 9, 5, 3)], torch.float32, device, "contiguous", seed=2)
    s3, _ = make_levels([(2, 8, 4, 4)], torch.float32, device, "channels_last", seed=3)
    _, g3 = make_levels([(2, 8, 4, 4)], torch.float32, device, "contiguous", seed=4)
    for whiten, at_mode in COMBOS:
        check_against_oracle(s1 + s2 + s3, g1 + g2 + g3, whiten, at_mode, seed=7)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("whiten,at_mode", [("channel", "paper"), ("sample", "code")])
def test_many_channels_split_over_backward_programs(device, whiten, at_mode):
    """C above the backward's channel chunk (several programs per pixel tile), C not a multiple of the forward's
    channel tile, and a teacher whose channel means sit far from any single channel (shifted sums stay exact)."""
    device = _device_or_skip(device)
    student, teacher = make_levels([(2, 261, 5, 7), (2, 133, 12, 12)], torch.float32, device, "contiguous", seed=13)
    teacher = [g + 40.0 * torch.arange(g.shape[1], device=device, dtype=g.dtype).remainder(3).view(1, -1, 1, 1)
               for g in teacher]
    check_against_oracle(student, teacher, whiten, at_mode, seed=2)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("whiten", list(WHITEN))
def test_saved_statistics_are_per_pixel_sized(device, whiten):
    device = _device_or_skip(device)
    student, teacher = make_levels(LEVELS, torch.float32, device, "contiguous", seed=9)
    saved = check_against_oracle(student, teacher, whiten, "paper", seed=1)
    pixels = sum(b * h * w for b, _, h, w in LEVELS)
    samples = sum(b for b, *_ in LEVELS)
    assert sum(t.numel() for t in saved) <= 4 * pixels + 8 * samples


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_paper_gradient_is_zero_at_zero_difference_and_zero_maps_are_safe(device):
    device = _device_or_skip(device)
    g = torch.randn(2, 6, 5, 5, device=device)
    student, teacher = [2.0 * g, torch.zeros(2, 4, 3, 3, device=device)], [g, torch.zeros(2, 4, 3, 3, device=device)]
    ones = torch.ones(2, device=device)
    _, at, _, grads = run_kernels(student, teacher, "channel", "paper", torch.zeros(2, device=device), ones)
    assert at.abs().max().item() < 1e-6
    assert all(torch.isfinite(x).all() for x in grads)
    assert grads[1].abs().max().item() == 0.0  # all-zero maps: exactly zero gradient, no 0/0
    if device == "cpu":
        # ||qhat(2g) - qhat(g)||_2 is not differentiable at 0 and the kernel takes the zero subgradient there. The
        # interpreter's correctly rounded sqrt/div give an exact 0 difference for these power-of-2-scaled maps; on a
        # GPU (H200, 2026-11-27) the compiled kernel left a rounding-level difference (presumably Triton's approximate
        # sqrt/div), and at any nonzero difference the gradient of a norm has full size (max 0.018 here). Only exact
        # zeros are portable, so the exact-zero subgradient is checked where the difference is exactly zero.
        assert grads[0].abs().max().item() < 1e-6



@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("whiten,at_mode", COMBOS)
def test_one_by_one_and_spatially_uniform_maps(device, whiten, at_mode):
    # the AT difference is exactly zero for 1x1 maps (every qhat is 1) and for uniform ones: the forward's ||d||
    # and the backward's d must be computed alike, or rounding / ||d|| became an O(1) gradient (found in review,
    # 2026-11-27: relative gradient error 2.8-4.9 before, the reference's 6e-8 after)
    device = _device_or_skip(device)
    gen = torch.Generator().manual_seed(5)
    uniform = [torch.randn(4, 32, 1, 1, generator=gen).expand(4, 32, 4, 4).contiguous() for _ in range(2)]
    student = [torch.randn(8, 64, 1, 1, generator=gen).to(device), uniform[0].to(device)]
    teacher = [torch.randn(8, 64, 1, 1, generator=gen).to(device), uniform[1].to(device)]
    check_against_oracle(student, teacher, whiten, at_mode, seed=7)


ROOT = Path(__file__).resolve().parents[1]


def _run_aot_check(extra_path: str | None = None) -> subprocess.CompletedProcess:
    """``aot_check.py --quick`` in a subprocess without TRITON_INTERPRET (``extra_path`` first on PYTHONPATH);
    skips the test where this Triton has another ahead-of-time API (exit status 3)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join([extra_path, str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    res = subprocess.run([sys.executable, str(ROOT / "dtfast" / "kernels" / "aot_check.py"), "--quick"], check=False,
                         env=env, capture_output=True, text=True, timeout=600)
    if res.returncode == 3:
        pytest.skip(res.stdout.strip())
    return res


def test_kernels_compile_for_cuda_sm90():
    """The kernels must build for real GPUs, not only run in the interpreter, with vectorised loads where aligned.

    Compiles ahead of time for sm_90 (no GPU needed) in a subprocess without TRITON_INTERPRET."""
    pytest.importorskip("triton.backends.nvidia")
    res = _run_aot_check()
    assert res.returncode == 0, res.stdout + res.stderr


# The lent GPU machine's Triton (../shared/device/README.md: torch 2.11, triton 3.6), which is not this machine's.
GPU_MACHINE_TRITON = "3.6.0"


def test_kernels_vectorise_with_the_gpu_machines_triton():
    """The same ahead-of-time check with the GPU machine's Triton release, fetched from the package index.

    Triton's alignment analysis differs between releases: a [ALIGN, 1] hint on a [BLOCK_C, 1] row offset vectorised
    the NCHW loads under triton 3.8 but left every one of them scalar under 3.6 (2026-12-07). Only triton is swapped
    (in front of the installed one on PYTHONPATH); torch stays. Skips where the index cannot be reached."""
    pytest.importorskip("triton.backends.nvidia")
    import triton

    if triton.__version__ == GPU_MACHINE_TRITON:
        pytest.skip(f"the installed triton is {GPU_MACHINE_TRITON}: test_kernels_compile_for_cuda_sm90 covers it")
    with tempfile.TemporaryDirectory(prefix="dtfast_triton_") as target:
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
               "--retries", "1", "--timeout", "20"]  # offline (a lent GPU machine): skip soon, not after minutes
        fetch = subprocess.run(pip + ["--target", target, f"triton=={GPU_MACHINE_TRITON}"], check=False,
                               capture_output=True, text=True, timeout=600)
        if fetch.returncode != 0:
            pytest.skip(f"cannot install triton=={GPU_MACHINE_TRITON} from the package index: "
                        f"{(fetch.stderr.strip().splitlines() or ['?'])[-1][:200]}")
        probe = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"], check=False,
                               env={**os.environ, "PYTHONPATH": target}, capture_output=True, text=True, timeout=120)
        assert probe.stdout.strip() == GPU_MACHINE_TRITON, probe.stdout + probe.stderr
        res = _run_aot_check(extra_path=target)
    assert res.returncode == 0, f"triton {GPU_MACHINE_TRITON}:\n" + res.stdout + res.stderr


def _fake_interpreter(squeeze: bool):
    """A stand-in for triton.runtime.interpreter whose _patch_lang_tensor is triton 3.6's (``int(array)``, which NumPy
    >= 2.5 refuses for the one-element arrays the interpreter holds scalars in) or 3.8's (squeezes first)."""
    import types

    import numpy as np

    def index_36(self):
        data = np.asarray(self.handle.data)
        if data.ndim:  # what NumPy >= 2.5's int(array) does (2.4 only warns)
            raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
        return int(data)

    def _patch_lang_tensor(tensor, scope):
        scope.set_attr(tensor, "__index__", (lambda self: int(self.handle.data.squeeze())) if squeeze else index_36)

    return types.SimpleNamespace(_patch_lang_tensor=_patch_lang_tensor)


@pytest.mark.parametrize("squeeze", [False, True], ids=["triton-3.6", "triton-3.8"])
def test_interpreter_compat_patches_only_the_interpreters_that_need_it(monkeypatch, squeeze):
    import numpy as np

    from dtfast.kernels import _interpreter_compat

    fake = _fake_interpreter(squeeze)
    original = fake._patch_lang_tensor
    assert _interpreter_compat.needs_patch(fake) is (not squeeze)
    import triton.runtime

    monkeypatch.setattr(triton.runtime, "interpreter", fake, raising=False)
    monkeypatch.setitem(sys.modules, "triton.runtime.interpreter", fake)
    assert _interpreter_compat.apply() is (not squeeze)
    assert (fake._patch_lang_tensor is original) is squeeze
    assert not _interpreter_compat.needs_patch(fake)  # applying twice changes nothing
    assert _interpreter_compat.apply() is False

    class Tensor:
        def __init__(self, data):
            self.handle = type("Handle", (), {"data": data})()

    class Scope:
        def set_attr(self, obj, name, value):
            setattr(obj, name, value)

    fake._patch_lang_tensor(Tensor, Scope())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # patched: neither NumPy 2.5's error nor 2.0-2.4's deprecation warning
        assert list(range(Tensor(np.array([3], dtype=np.int32)))) == [0, 1, 2]
    assert list(range(1, Tensor(np.array(3, dtype=np.int64)))) == [1, 2]


def _fixed_configuration(monkeypatch, fwd=None, bwd=None):
    """Launch the NCHW kernels with one autotuning configuration instead of the autotuner (the interpreter runs only
    the first one otherwise; the GPU's autotuner may pick any of them)."""
    kern = triton_kernels()

    def launch(tuner, kernel, grid, args, opts, memo, key):
        if tuner is kern._fwd_main_nchw and fwd is not None:
            block_c, unroll, warps = fwd
            return kernel[grid](*args, **dict(opts, BLOCK_C=block_c, UNROLL=unroll, num_warps=warps))
        if tuner is kern._bwd_nchw and bwd is not None:
            rows, warps = bwd
            return kernel[grid](*args, **dict(opts, BWD_ROWS=rows, num_warps=warps))
        return kernel[grid](*args, **dict(opts, **_first_config(kern, tuner)))

    monkeypatch.setattr(kern, "_launch_tuned", launch)


def _first_config(kern, tuner):
    if tuner is kern._fwd_main_nchw:
        block_c, unroll, warps = kern.FWD_NCHW_CONFIGS[0]
        return dict(BLOCK_C=block_c, UNROLL=unroll, num_warps=warps)
    rows, warps = kern.BWD_NCHW_CONFIGS[0]
    return dict(BWD_ROWS=rows, num_warps=warps)


_NCHW_CONFIGS = max(len(triton_kernels().FWD_NCHW_CONFIGS), len(triton_kernels().BWD_NCHW_CONFIGS))


@pytest.mark.parametrize("config", range(_NCHW_CONFIGS))
def test_every_nchw_autotuning_configuration_matches_the_oracle(monkeypatch, config):
    """Each forward and backward tile configuration the GPU autotuner may choose, with C not a multiple of the
    unrolled tile (main loop + tail): float32 against the float64 oracle, bfloat16 against the default configuration
    (same fp32 math in another order: equal up to one bf16 rounding step)."""
    device = _device_or_skip("cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda")
    kern = triton_kernels()
    fwd = kern.FWD_NCHW_CONFIGS[config % len(kern.FWD_NCHW_CONFIGS)]
    bwd = kern.BWD_NCHW_CONFIGS[config % len(kern.BWD_NCHW_CONFIGS)]
    shapes = [(2, 8 * fwd[0] * fwd[1] // 4 + 3 * fwd[0] + 5, 4, 8), (2, 37, 5, 5)]
    for whiten, at_mode in (("channel", "paper"), ("sample", "code")):
        with monkeypatch.context() as patch:
            _fixed_configuration(patch, fwd, bwd)
            student, teacher = make_levels(shapes, torch.float32, device, "contiguous", seed=config)
            check_against_oracle(student, teacher, whiten, at_mode, seed=config)
            student, teacher = make_levels(shapes, torch.bfloat16, device, "contiguous", seed=config)
            grad_mse, grad_at = torch.rand(2).to(device) + 0.5, torch.rand(2).to(device) * 5
            got = run_kernels(student, teacher, whiten, at_mode, grad_mse, grad_at)
        default = run_kernels(student, teacher, whiten, at_mode, grad_mse, grad_at)
        for name, a, b in [("mse", got[0], default[0]), ("at", got[1], default[1])]:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{fwd} {name}: {m}")
        for lvl, (a, b) in enumerate(zip(got[3], default[3])):
            assert (a.float() - b.float()).abs().max() <= 2**-7 * b.float().abs().max(), f"{fwd}/{bwd} grad {lvl}"
