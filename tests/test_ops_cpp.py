"""The C++ CPU kernels of torch.ops.dtfast.dreamteacher_loss_{fwd,bwd} against an independent float64 oracle.

Every CPU instruction-set build this machine can run (``dtfast._C.cpu_isas()``) is tested, forced through
``DTFAST_CPU_ISA``. Set ``DTFAST_REQUIRE_EXT=1`` to make a missing extension an error instead of a skip.
"""

import os
import zlib

import pytest
import torch

if os.environ.get("DTFAST_REQUIRE_EXT") == "1":
    import dtfast._C as native
else:
    native = pytest.importorskip("dtfast._C", reason="dtfast._C is not built (pip install --no-build-isolation -e .)")

fwd_op = torch.ops.dtfast.dreamteacher_loss_fwd
bwd_op = torch.ops.dtfast.dreamteacher_loss_bwd

LEVEL_SHAPES = [(3, 37, 13, 13), (3, 20, 7, 5), (3, 64, 4, 4), (2, 5, 1, 3)]
VECTOR_SHAPES = [(4, 64, 16, 16), (2, 128, 8, 8), (3, 32, 4, 4)]  # 16-byte loads along every contiguous extent
MODES = [(whiten, at_mode) for whiten in (0, 1) for at_mode in (0, 1)]
# Tolerances against the float64 oracle: (relative, absolute), one table for the whole file.
TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 1e-6)}


def oracle(student, teacher, whiten, at_mode):
    """float64 DreamTeacher loss parts per level, written from DESIGN.md section 3 (not from the kernels)."""
    mse, at = [], []
    for s, g in zip(student, teacher):
        s, g = s.double(), g.double()
        dims = (1,) if whiten == 0 else (1, 2, 3)
        mean = g.mean(dims, keepdim=True)
        var = ((g - mean) ** 2).mean(dims, keepdim=True)
        mse.append(((s - (g - mean) / torch.sqrt(var + 1e-6)) ** 2).mean())
        q_s, q_g = s.pow(2).sum(1).flatten(1), g.pow(2).sum(1).flatten(1)
        diff = q_s / q_s.norm(dim=1, keepdim=True).clamp_min(1e-12) - q_g / q_g.norm(dim=1, keepdim=True).clamp_min(
            1e-12
        )
        at.append(torch.linalg.vector_norm(diff, dim=1).mean() if at_mode == 0 else diff.pow(2).mean())
    return torch.stack(mse), torch.stack(at)


def oracle_grads(student, teacher, whiten, at_mode, grad_mse, grad_at):
    leaves = [s.detach().double().requires_grad_() for s in student]
    mse, at = oracle(leaves, [g.double() for g in teacher], whiten, at_mode)
    grads = torch.autograd.grad((mse * grad_mse.double()).sum() + (at * grad_at.double()).sum(), leaves)
    return mse.detach(), at.detach(), grads


def make_levels(dtype, layout, generator, shapes=LEVEL_SHAPES):
    """Student/teacher lists; teacher with an offset mean so the whitening does real work."""
    student, teacher = [], []
    for shape in shapes:
        b, c, h, w = shape
        s = torch.randn(b, 2 * c, h, w, generator=generator, dtype=torch.float64)
        g = torch.randn(b, 2 * c, h, w, generator=generator, dtype=torch.float64) * 1.7 + 0.8
        s, g = s[:, :c].clone(), g[:, :c].clone()
        if layout == "channels_last":
            s, g = s.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
        elif layout == "mixed":  # student channels_last, teacher NCHW
            s = s.to(memory_format=torch.channels_last)
        elif layout == "non_contiguous":  # channel-strided views
            s = torch.cat([s, s], 1)[:, ::2]
            g = torch.cat([g, g], 1)[:, ::2]
            assert not s.is_contiguous() and not s.is_contiguous(memory_format=torch.channels_last)
        student.append(s.to(dtype))
        teacher.append(g.to(dtype))
    return student, teacher


def check_ops_against_oracle(fwd, bwd, student, teacher, whiten, at_mode, dtype, gen):
    """Forward values and backward gradients of an implementation of the op pair (CPU, CUDA, or the emulated CUDA
    kernels) against the float64 oracle, with random grad_output scales; returns the saved statistics."""
    device = student[0].device
    grad_mse = torch.rand(len(student), generator=gen, dtype=torch.float64) * 3 + 0.1
    grad_at = torch.rand(len(student), generator=gen, dtype=torch.float64) * 30 + 0.1
    mse_ref, at_ref, grads_ref = oracle_grads(student, teacher, whiten, at_mode, grad_mse.to(device),
                                              grad_at.to(device))
    mse, at, saved = fwd(student, teacher, whiten, at_mode)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert mse.dtype == at.dtype == acc and mse.shape == at.shape == (len(student),)
    assert [tuple(t.shape) for t in saved] == [(s.shape[0], 3, s.shape[2] * s.shape[3]) for s in student]
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(mse.double(), mse_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(at.double(), at_ref, rtol=rtol, atol=atol)
    grads = bwd(grad_mse.to(device, acc), grad_at.to(device, acc), student, teacher, saved, whiten, at_mode)
    for level, (g, g_ref, s) in enumerate(zip(grads, grads_ref, student)):
        assert g.shape == s.shape and g.dtype == s.dtype and g.device == device
        if s.is_contiguous(memory_format=torch.channels_last) and not s.is_contiguous():  # processed channels_last
            assert g.is_contiguous(memory_format=torch.channels_last), f"level {level}: grad lost channels_last"
        else:
            assert g.is_contiguous(), f"level {level}: grad is not contiguous"
        torch.testing.assert_close(
            g.double(),
            g_ref,
            rtol=rtol,
            atol=atol * g_ref.abs().max().item() + atol,
            msg=lambda m, level=level: f"grad of level {level}: {m}",
        )
    return saved


@pytest.fixture(params=native.cpu_isas())
def isa(request, monkeypatch):
    monkeypatch.setenv("DTFAST_CPU_ISA", request.param)
    assert native.cpu_isa() == request.param
    return request.param


def assert_close(actual, expected, dtype, what):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "mixed", "non_contiguous"])
@pytest.mark.parametrize("whiten,at_mode", MODES)
def test_values_and_grads(isa, dtype, layout, whiten, at_mode):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{isa}-{dtype}-{layout}-{whiten}-{at_mode}".encode()))
    student, teacher = make_levels(dtype, layout, gen)
    check_ops_against_oracle(fwd_op, bwd_op, student, teacher, whiten, at_mode, dtype, gen)


@pytest.mark.parametrize("whiten", [0, 1])
def test_saved_statistics_contract(whiten):
    """saved[l] rows: teacher whitening mean, rstd (documented in csrc/dreamteacher_loss/common.h)."""
    student, teacher = make_levels(torch.float64, "channels_last", torch.Generator().manual_seed(5))
    _, _, saved = fwd_op(student, teacher, whiten, 0)
    for g, st in zip(teacher, saved):
        dims = (1,) if whiten == 0 else (1, 2, 3)
        mean = g.mean(dims, keepdim=True).expand(-1, 1, *g.shape[2:]).flatten(1)
        var = g.var(dims, unbiased=False, keepdim=True).expand(-1, 1, *g.shape[2:]).flatten(1)
        torch.testing.assert_close(st[:, 0], mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(st[:, 1], (var + 1e-6).rsqrt(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("whiten,at_mode", MODES)
def test_low_precision_rule(isa, dtype, whiten, at_mode):
    """Error vs float64 at most ~2x that of the same-dtype PyTorch computation (flash-attention's rule)."""
    gen = torch.Generator().manual_seed(11 + whiten + 2 * at_mode)
    student, teacher = make_levels(dtype, "contiguous", gen)
    grad_mse, grad_at = torch.tensor([1.0, 0.5, 2.0, 1.5]), torch.tensor([10.0, 10.0, 5.0, 20.0])
    mse64, at64, grads64 = oracle_grads(student, teacher, whiten, at_mode, grad_mse, grad_at)
    # Same-dtype PyTorch: the oracle's formulas evaluated in `dtype`.
    leaves = [s.detach().clone().requires_grad_() for s in student]
    mse_lp, at_lp = same_dtype_reference(leaves, teacher, whiten, at_mode)
    grads_lp = torch.autograd.grad((mse_lp * grad_mse.to(dtype)).sum() + (at_lp * grad_at.to(dtype)).sum(), leaves)

    mse, at, saved = fwd_op(student, teacher, whiten, at_mode)
    grads = bwd_op(grad_mse, grad_at, student, teacher, saved, whiten, at_mode)
    floor = torch.finfo(dtype).eps * 1e-3  # avoids a 0 <= 0 comparison when both are exact
    for name, got, low, exact in [("mse", mse, mse_lp, mse64), ("at", at, at_lp, at64)]:
        err, err_lp = (got.double() - exact).abs().max(), (low.double() - exact).abs().max()
        assert err <= 2 * err_lp + floor * exact.abs().max(), f"{name}: error {err:.3e}, {dtype} reference {err_lp:.3e}"
    for level, (got, low, exact) in enumerate(zip(grads, grads_lp, grads64)):
        assert got.dtype == dtype
        err, err_lp = (got.double() - exact).abs().max(), (low.double() - exact).abs().max()
        assert err <= 2 * err_lp + floor * exact.abs().max(), (
            f"grad of level {level}: error {err:.3e}, {dtype} reference {err_lp:.3e}"
        )


def same_dtype_reference(student, teacher, whiten, at_mode):
    mse, at = [], []
    for s, g in zip(student, teacher):
        dims = (1,) if whiten == 0 else (1, 2, 3)
        mean = g.mean(dims, keepdim=True)
        var = ((g - mean) ** 2).mean(dims, keepdim=True)
        mse.append(((s - (g - mean) / torch.sqrt(var + 1e-6)) ** 2).mean())
        q_s, q_g = s.pow(2).sum(1).flatten(1), g.pow(2).sum(1).flatten(1)
        diff = q_s / q_s.norm(dim=1, keepdim=True).clamp_min(1e-12) - q_g / q_g.norm(dim=1, keepdim=True).clamp_min(
            1e-12
        )
        at.append(torch.linalg.vector_norm(diff, dim=1).mean() if at_mode == 0 else diff.pow(2).mean())
    return torch.stack(mse), torch.stack(at)


class _NativeLoss(torch.autograd.Function):
    """(mse, at) of all levels through the two native ops; the student maps get gradients."""

    @staticmethod
    def forward(ctx, whiten, at_mode, num_levels, *maps):
        student, teacher = list(maps[:num_levels]), list(maps[num_levels:])
        mse, at, saved = fwd_op(student, teacher, whiten, at_mode)
        ctx.save_for_backward(*student, *teacher, *saved)
        ctx.config = (whiten, at_mode, num_levels)
        return mse, at

    @staticmethod
    def backward(ctx, grad_mse, grad_at):
        whiten, at_mode, n = ctx.config
        tensors = ctx.saved_tensors
        student, teacher, saved = list(tensors[:n]), list(tensors[n : 2 * n]), list(tensors[2 * n :])
        grads = bwd_op(grad_mse.contiguous(), grad_at.contiguous(), student, teacher, saved, whiten, at_mode)
        return (None, None, None, *grads, *([None] * n))


@pytest.mark.parametrize("whiten,at_mode", MODES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck(whiten, at_mode, layout):
    gen = torch.Generator().manual_seed(3)
    student, teacher = make_levels(torch.float64, layout, gen, shapes=[(2, 5, 3, 4), (2, 3, 2, 2)])
    student = [s.requires_grad_() for s in student]
    assert torch.autograd.gradcheck(
        lambda *s: _NativeLoss.apply(whiten, at_mode, len(student), *s, *teacher), student, eps=1e-6, atol=1e-6
    )


def test_degenerate_inputs_match_the_oracle():
    """Zero student (clamped attention norm) and student == teacher (zero AT distance: gradient 0)."""
    gen = torch.Generator().manual_seed(8)
    teacher = [torch.randn(2, 6, 3, 3, generator=gen, dtype=torch.float64) for _ in range(2)]
    for student in ([torch.zeros_like(teacher[0]), teacher[1].clone()], [t.clone() for t in teacher]):
        for at_mode in (0, 1):
            gm, ga = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([3.0, 4.0], dtype=torch.float64)
            mse_ref, at_ref, grads_ref = oracle_grads(student, teacher, 0, at_mode, gm, ga)
            mse, at, saved = fwd_op(student, teacher, 0, at_mode)
            grads = bwd_op(gm, ga, student, teacher, saved, 0, at_mode)
            torch.testing.assert_close(mse, mse_ref)
            torch.testing.assert_close(at, at_ref, atol=1e-12, rtol=1e-10)
            for g, g_ref in zip(grads, grads_ref):
                assert torch.isfinite(g).all()
                torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=1e-8)


def test_results_do_not_depend_on_thread_count():
    student, teacher = make_levels(torch.float32, "contiguous", torch.Generator().manual_seed(4))
    threads = torch.get_num_threads()
    try:
        outputs = []
        for n in (1, 3):
            torch.set_num_threads(n)
            mse, at, saved = fwd_op(student, teacher, 1, 0)
            grads = bwd_op(torch.ones(4), torch.ones(4), student, teacher, saved, 1, 0)
            outputs.append([mse, at, *saved, *grads])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*outputs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("whiten,at_mode", [(0, 0), (1, 1)])
def test_opcheck(whiten, at_mode):
    student, teacher = make_levels(torch.float32, "channels_last", torch.Generator().manual_seed(6))
    torch.library.opcheck(fwd_op.default, (student, teacher, whiten, at_mode))
    _, _, saved = fwd_op(student, teacher, whiten, at_mode)
    grads = (torch.rand(4), torch.rand(4))
    torch.library.opcheck(bwd_op.default, (*grads, student, teacher, saved, whiten, at_mode))


def test_errors_name_level_shape_and_dtype():
    student, teacher = make_levels(torch.float32, "contiguous", torch.Generator().manual_seed(7))
    with pytest.raises(RuntimeError, match=r"level 1: student shape \[3, 20, 7, 5\] != teacher shape"):
        fwd_op(student, [teacher[0], teacher[1][:, :4], *teacher[2:]], 0, 0)
    with pytest.raises(RuntimeError, match="level 2: student dtype Float != teacher dtype Double"):
        fwd_op(student, [*teacher[:2], teacher[2].double(), teacher[3]], 0, 0)
    with pytest.raises(RuntimeError, match="whiten must be 0"):
        fwd_op(student, teacher, 2, 0)
    with pytest.raises(RuntimeError, match="at_mode must be 0"):
        fwd_op(student, teacher, 0, 5)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        fwd_op([s.int() for s in student], [g.int() for g in teacher], 0, 0)
    with pytest.raises(RuntimeError, match="4 student levels but 3 teacher levels"):
        fwd_op(student, teacher[:3], 0, 0)
    _, _, saved = fwd_op(student, teacher, 0, 0)
    with pytest.raises(RuntimeError, match=r"grad_at must have shape \(4,\)"):
        bwd_op(torch.ones(4), torch.ones(3), student, teacher, saved, 0, 0)
    with pytest.raises(RuntimeError, match=r"level 1: saved statistics must have shape \(3, 3, 35\)"):
        bwd_op(torch.ones(4), torch.ones(4), student, teacher, [saved[0], saved[0], *saved[2:]], 0, 0)


def test_gradient_buffers_are_reused_only_when_free(monkeypatch):
    """Backward hands out a large gradient buffer again only once nobody (tensor, view, storage) holds it."""
    monkeypatch.delenv("DTFAST_CPU_GRAD_CACHE", raising=False)
    native.release_cpu_grad_buffers()
    student, teacher = make_levels(torch.float32, "contiguous", torch.Generator().manual_seed(9), [(2, 64, 48, 48)])
    assert student[0].numel() * 4 >= 1 << 20  # large enough to be cached
    _, _, saved = fwd_op(student, teacher, 0, 0)
    one = torch.ones(1)

    def grad(scale=1.0):
        return bwd_op(one * scale, one, student, teacher, saved, 0, 0)[0]

    held = grad()
    expected = held.clone()
    second = grad(2.0)
    assert second.data_ptr() != held.data_ptr(), "a buffer still in use was handed out again"
    assert torch.equal(held, expected), "a held gradient was overwritten"
    freed_ptr = second.data_ptr()
    del second
    third = grad()
    assert third.data_ptr() == freed_ptr, "a free buffer was not reused"
    assert torch.equal(third, expected)
    for keep in (lambda t: t[:, :1], lambda t: t.untyped_storage()):  # a view or the storage keeps it in use
        kept = keep(third)
        ptr = third.data_ptr()
        del third
        third = grad()
        assert third.data_ptr() != ptr
        del kept
    monkeypatch.setenv("DTFAST_CPU_GRAD_CACHE", "0")
    assert torch.equal(grad(), expected)
    native.release_cpu_grad_buffers()


@pytest.mark.parametrize("aten,expected", [("default", "default"), ("avx2", "avx2")])
def test_aten_cpu_capability_caps_the_automatic_choice(aten, expected):
    # ATEN_CPU_CAPABILITY limited torch's kernels but not dtfast's: the CPU kernel still ran AVX-512
    import subprocess
    import sys

    if expected not in native.cpu_isas():
        pytest.skip(f"this CPU cannot run {expected}")
    env = {k: v for k, v in os.environ.items() if k != "DTFAST_CPU_ISA"}
    env["ATEN_CPU_CAPABILITY"] = aten
    code = "import torch, dtfast._C as n; print(torch.backends.cpu.get_cpu_capability(), n.cpu_isa())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [aten.upper(), expected]
