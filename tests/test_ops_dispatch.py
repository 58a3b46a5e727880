"""Backend dispatch of dtfast.ops.dreamteacher_loss: choice, errors, every available fused backend through the
public API, torch.compile(fullgraph=True), torch.library.opcheck and the memory the backward keeps."""

import os

import pytest
import torch
from torch import nn

from dtfast.ops import DreamTeacherLoss, _backends, dreamteacher_loss
from dtfast.ops.dreamteacher_loss import BackendUnavailable, fused_backward, fused_forward, resolve_backend
from dtfast.ops.reference import dreamteacher_loss_parts
from tests.conftest import cpu_and_cuda

HAS_CPU_EXT = _backends.extension_has("cpu")
NO_EXT = "dtfast._C (C++ kernels) not built or not loadable: `pip install --no-build-isolation -e .` builds it"
COMBOS = [(w, a) for w in ("channel", "sample") for a in ("paper", "code")]
SHAPES = [(3, 37, 13, 13), (3, 16, 8, 8), (3, 8, 3, 5)]


def fused_backends(device):
    """(backend, device) params for every fused backend, skipped with the reason where it cannot run."""
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    triton_ok = _backends.triton_available() and (device == "cuda" or interp)
    ext_ok = _backends.extension_has(device) if device in ("cpu", "cuda") else False
    return [
        pytest.param("triton",
                     marks=pytest.mark.skipif(not triton_ok, reason="Triton needs CUDA or TRITON_INTERPRET=1")),
        pytest.param(device, marks=pytest.mark.skipif(not ext_ok, reason=NO_EXT + f" (with its {device} kernel)")),
    ]


def make_levels(device, dtype=torch.float32, seed=0, channels_last=False, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    student, teacher = [], []
    for shape in shapes:
        s = torch.randn(shape, generator=gen, dtype=torch.float64)
        g = 2.0 + 3.0 * torch.randn(shape, generator=gen, dtype=torch.float64)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        student.append(s.to(device, dtype).contiguous(memory_format=fmt).requires_grad_())
        teacher.append(g.to(device, dtype).contiguous(memory_format=fmt))
    return student, teacher


def test_resolve_backend_choices_and_errors(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, torch.float32) == ("cpu" if HAS_CPU_EXT else "torch")
    assert resolve_backend("torch", cpu, torch.float32) == "torch"
    monkeypatch.setenv("DTFAST_BACKEND", "torch")
    assert resolve_backend("auto", cpu, torch.float32) == "torch"  # the environment replaces "auto"
    monkeypatch.setenv("DTFAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend 'nonsense'"):
        resolve_backend("auto", cpu, torch.float32)
    assert resolve_backend("torch", cpu, torch.float32) == "torch"  # an explicit argument wins
    monkeypatch.delenv("DTFAST_BACKEND")
    with pytest.raises(BackendUnavailable, match="needs cuda tensors|cannot be loaded|without its CUDA"):
        resolve_backend("cuda", cpu, torch.float32)
    if _backends.triton_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(BackendUnavailable, match="needs CUDA tensors"):
            resolve_backend("triton", cpu, torch.float32)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        with pytest.raises(BackendUnavailable, match="takes"):
            resolve_backend("triton", cpu, torch.float64)


def test_missing_extension_is_a_clear_error(monkeypatch):
    # runs where the extension is built too: the import of dtfast._C is made to fail as on an ops-only install
    import functools
    import importlib

    from dtfast.ops import _backends

    real_import = importlib.import_module

    def failing_import(name, *args, **kwargs):
        if name == "dtfast._C":
            raise ImportError("No module named 'dtfast._C'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(_backends.importlib, "import_module", failing_import)
    monkeypatch.setattr(_backends, "_extension", functools.cache(_backends._extension.__wrapped__))
    with pytest.raises(BackendUnavailable, match="pip install --no-build-isolation"):
        dreamteacher_loss(*make_levels("cpu"), backend="cpu")


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("whiten,at_mode", COMBOS)
def test_fused_backends_match_float64_reference(device, whiten, at_mode):
    for param in fused_backends(device):
        backend = param.values[0]
        if any(m.args and m.args[0] for m in param.marks):
            continue
        student, teacher = make_levels(device, seed=hash((whiten, at_mode)) % 100, channels_last=at_mode == "code")
        out = dreamteacher_loss(student, teacher, at_weight=4.0, whiten=whiten, at_mode=at_mode, backend=backend,
                                return_parts=True)
        scale = 0.731
        (out["loss"] * scale).backward()
        s64 = [s.detach().double().requires_grad_() for s in student]
        mse, at = dreamteacher_loss_parts(s64, [g.double() for g in teacher], whiten, at_mode)
        ((mse + 4.0 * at).mean() * scale).backward()
        torch.testing.assert_close(out["mse"].double(), mse, rtol=2e-5, atol=1e-7)
        torch.testing.assert_close(out["at"].double(), at, rtol=2e-4, atol=1e-6)
        torch.testing.assert_close(out["loss"].double(), (mse + 4.0 * at).mean(), rtol=2e-5, atol=1e-7)
        for a, b in zip(student, s64):
            torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-3, atol=1e-5 * b.grad.abs().max().item())


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("use", ["loss+parts", "parts only"])
def test_gradients_flow_through_the_returned_parts(device, use):
    """return_parts: mse[L] and at[L] are differentiable too, alone or together with the loss (the fused eager
    path folds the loss gradient into the kernels only when the parts carry none)."""
    w_mse, w_at = torch.tensor([0.3, 1.7, 0.9]), torch.tensor([2.0, 0.0, 5.0])
    for param in fused_backends(device):
        backend = param.values[0]
        if any(m.args and m.args[0] for m in param.marks):
            continue
        student, teacher = make_levels(device, seed=11)
        out = dreamteacher_loss(student, teacher, at_weight=3.0, backend=backend, return_parts=True)
        objective = (out["mse"] * w_mse.to(device)).sum() + (out["at"] * w_at.to(device)).sum()
        (objective + 0.5 * out["loss"] if use == "loss+parts" else objective).backward()
        s64 = [s.detach().double().requires_grad_() for s in student]
        mse, at = dreamteacher_loss_parts(s64, [g.double() for g in teacher], "channel", "paper")
        ref = (mse * w_mse.double()).sum() + (at * w_at.double()).sum()
        (ref + 0.5 * (mse + 3.0 * at).mean() if use == "loss+parts" else ref).backward()
        for a, b in zip(student, s64):
            torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-3, atol=1e-5 * b.grad.abs().max().item(),
                                       msg=lambda m, backend=backend: f"{backend}: {m}")


@pytest.mark.skipif(not HAS_CPU_EXT, reason=NO_EXT)
def test_cpu_backend_float64_to_1e10():
    student, teacher = make_levels("cpu", dtype=torch.float64, seed=4)
    out = dreamteacher_loss(student, teacher, backend="cpu", return_parts=True)
    out["loss"].backward()
    s64 = [s.detach().clone().requires_grad_() for s in student]
    ref = dreamteacher_loss(s64, teacher, backend="torch", return_parts=True)
    ref["loss"].backward()
    torch.testing.assert_close(out["loss"], ref["loss"], rtol=1e-10, atol=1e-12)
    for a, b in zip(student, s64):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


class TinyStudent(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.loss = DreamTeacherLoss(at_weight=2.0)

    def forward(self, x, teacher_feats, backend: str):
        a = torch.relu(self.stem(x))
        b = self.down(a)
        self.loss.backend = backend
        return self.loss([a, b], teacher_feats)


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("backend,device", [
    ("torch", "cpu"), ("cpu", "cpu"), ("triton", "cpu"),
    pytest.param("triton", "cuda", marks=pytest.mark.needs_cuda),
    pytest.param("cuda", "cuda", marks=pytest.mark.needs_cuda)])
def test_torch_compile_fullgraph_with_the_loss(backend, device, compiler):
    """fullgraph capture + AOT autograd through the custom ops (aot_eager in CI; inductor behind -m slow)."""
    if backend in ("cpu", "cuda") and not _backends.extension_has(backend):
        pytest.skip(NO_EXT + f" (with its {backend} kernel)")
    if backend == "triton" and not (_backends.triton_available() and (
            device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")):
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    torch.manual_seed(0)
    model = TinyStudent().to(device)
    x = torch.randn(2, 3, 10, 10, device=device)
    teacher = [torch.randn(2, 8, 10, 10, device=device), torch.randn(2, 12, 5, 5, device=device)]
    eager = model(x, teacher, backend)
    eager.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    loss = compiled(x, teacher, backend)
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck_fused_ops(backend):
    if backend == "cpu" and not HAS_CPU_EXT:
        pytest.skip(NO_EXT)
    if backend == "triton" and not (_backends.triton_available() and os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    student, teacher = make_levels("cpu", seed=2, shapes=[(2, 5, 3, 3), (2, 4, 2, 3)])
    teacher = [g.detach() for g in teacher]
    for whiten, at_mode in [(0, 0), (1, 1)]:
        torch.library.opcheck(fused_forward, (student, teacher, whiten, at_mode, backend))
        _, _, saved = fused_forward(student, teacher, whiten, at_mode, backend)
        args = (torch.rand(2), torch.rand(2), [s.detach() for s in student], teacher, saved, whiten, at_mode, backend)
        torch.library.opcheck(fused_backward, args)


def saved_bytes_beyond_inputs(fn, inputs):
    """Bytes that autograd keeps for backward, not counting tensors that share storage with ``inputs``."""
    input_storages = {t.untyped_storage().data_ptr() for t in inputs}
    total = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in input_storages:
            total.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(total)


@pytest.mark.parametrize("whiten", ["channel", "sample"])
def test_fused_backward_keeps_only_per_pixel_statistics(whiten):
    backends = [b for b in ("cpu", "triton") if (b == "cpu" and HAS_CPU_EXT) or (
        b == "triton" and _backends.triton_available() and os.environ.get("TRITON_INTERPRET") == "1")]
    if not backends:
        pytest.skip("no fused backend runs on CPU tensors here")
    student, teacher = make_levels("cpu", seed=5)
    pixels = sum(b * h * w for b, _, h, w in SHAPES)
    samples = sum(b for b, *_ in SHAPES)
    inputs = student + teacher
    ref = saved_bytes_beyond_inputs(lambda: dreamteacher_loss(student, teacher, whiten=whiten, backend="torch"),
                                    inputs)
    for backend in backends:
        fused = saved_bytes_beyond_inputs(
            lambda b=backend: dreamteacher_loss(student, teacher, whiten=whiten, backend=b), inputs)
        # at most 4 floats per pixel and 8 per sample, i.e. O(B*H*W), against the reference's (B, C, H, W) maps
        assert fused <= 4 * (4 * pixels + 8 * samples), (backend, fused)
        assert ref > 5 * fused, (backend, ref, fused)


def test_fused_path_reports_non_finite_inputs():
    backend = "cpu" if HAS_CPU_EXT else None
    if backend is None and _backends.triton_available() and os.environ.get("TRITON_INTERPRET") == "1":
        backend = "triton"
    if backend is None:
        pytest.skip("no fused backend runs on CPU tensors here")
    student, teacher = make_levels("cpu", seed=6)
    with torch.no_grad():
        teacher[2][0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="level 2: teacher map"):
        dreamteacher_loss(student, teacher, backend=backend)


def test_mixed_dtypes_across_levels_use_the_reference():
    student, teacher = make_levels("cpu", seed=7)
    student[1], teacher[1] = student[1].detach().double().requires_grad_(), teacher[1].double()
    loss = dreamteacher_loss(student, teacher)
    loss.backward()
    assert student[1].grad.dtype == torch.float64


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_double_backward_is_an_error_on_fused_backends(backend):
    # a gradient penalty differentiates the loss's gradient; the fused kernels have no derivative of their own, so
    # that must fail loudly instead of silently dropping the second-order term (the reference supports it)
    student, teacher = make_levels("cpu")
    student = [s.detach().requires_grad_(True) for s in student]
    loss = dreamteacher_loss(student, teacher, backend="torch")
    grads = torch.autograd.grad(loss, student, create_graph=True)
    torch.autograd.grad(sum(g.pow(2).sum() for g in grads), student)  # the reference: fine
    loss = dreamteacher_loss(student, teacher, backend=backend)
    with pytest.raises(RuntimeError, match="cannot be differentiated again.*backend='torch'"):
        torch.autograd.grad(loss, student, create_graph=True)


def cpu_fused_params():
    """The fused backends that run on CPU tensors here (Triton only under TRITON_INTERPRET=1)."""
    return fused_backends("cpu")


@pytest.mark.parametrize("backend", cpu_fused_params())
def test_teacher_maps_from_inference_mode(backend):
    # a frozen teacher usually runs under torch.inference_mode: its maps cannot go through save_for_backward,
    # which every fused backend used ("Inference tensors cannot be saved for backward")
    student, teacher = make_levels("cpu", seed=11)
    with torch.inference_mode():
        teacher_inf = [g.clone() for g in teacher]
    assert all(g.is_inference() for g in teacher_inf)
    loss = dreamteacher_loss(student, teacher_inf, backend=backend)
    grads = torch.autograd.grad(loss, student)
    ref = dreamteacher_loss(student, teacher, backend="torch")
    ref_grads = torch.autograd.grad(ref, student)
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_meta_and_fake_tensors_with_the_default_finite_check(backend):
    # shape inference (meta device, FakeTensorMode) has no values: check_finite must not call .item() on them
    student = [torch.empty(2, 8, 4, 4, device="meta", requires_grad=True)]
    teacher = [torch.empty(2, 8, 4, 4, device="meta")]
    loss = dreamteacher_loss(student, teacher, backend=backend)
    assert loss.device.type == "meta" and loss.shape == ()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        s, g = torch.randn(2, 8, 4, 4, requires_grad=True), torch.randn(2, 8, 4, 4)
        assert dreamteacher_loss([s], [g], backend=backend).shape == ()


def test_unsupported_float_dtypes_are_named():
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no float8 dtype in this torch")
    s = torch.randn(2, 3, 4, 4).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="level 0.*float8_e4m3fn"):
        dreamteacher_loss([s], [s.clone()])


@pytest.mark.skipif(not HAS_CPU_EXT, reason=NO_EXT)
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_kernel_per_level_mse_keeps_nan(channels_last):
    student, teacher = make_levels("cpu", seed=12, channels_last=channels_last)
    with torch.no_grad():
        student[0][1, 2, 3, 4] = float("nan")
    parts = dreamteacher_loss(student, teacher, backend="cpu", return_parts=True, check_finite=False, at_weight=0.0)
    assert torch.isnan(parts["mse"][0]) and torch.isfinite(parts["mse"][1:]).all()


def test_backend_from_the_environment_applies_to_mixed_dtypes_and_is_named(monkeypatch):
    student, teacher = make_levels("cpu", seed=7)
    student[1], teacher[1] = student[1].detach().double().requires_grad_(), teacher[1].double()
    monkeypatch.setenv("DTFAST_BACKEND", "cpu")
    with pytest.raises(ValueError, match="backend 'cpu' needs one dtype"):
        dreamteacher_loss(student, teacher)
    monkeypatch.setenv("DTFAST_BACKEND", "cuda")
    with pytest.raises(BackendUnavailable, match="DTFAST_BACKEND='cuda'"):
        resolve_backend("auto", torch.device("cpu"), torch.float32)
    monkeypatch.setenv("DTFAST_BACKEND", " Torch ")
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "torch"


@pytest.mark.parametrize("backend", ["torch", *cpu_fused_params()])
def test_learnable_at_weight_gets_its_gradient(backend):
    student, teacher = make_levels("cpu", seed=13)
    weight = torch.tensor(2.5, requires_grad=True)
    parts = dreamteacher_loss(student, teacher, at_weight=weight, backend=backend, return_parts=True)
    parts["loss"].backward()
    # d loss / d at_weight = mean_l at_l
    torch.testing.assert_close(weight.grad, parts["at"].detach().mean(), rtol=1e-5, atol=1e-7)


def test_reference_result_dtype_does_not_depend_on_level_order():
    student, teacher = make_levels("cpu", seed=14)
    student[1], teacher[1] = student[1].detach().double().requires_grad_(), teacher[1].double()
    assert dreamteacher_loss(student, teacher).dtype == torch.float64
    assert dreamteacher_loss(student[::-1], teacher[::-1]).dtype == torch.float64


def test_generators_of_maps_are_accepted_and_whiten_checks_rank():
    student, teacher = make_levels("cpu", seed=15)
    torch.testing.assert_close(dreamteacher_loss(iter(student), (g for g in teacher)),
                               dreamteacher_loss(student, teacher))
    from dtfast.ops import whiten

    with pytest.raises(ValueError, match=r"whiten expects a \(B, C, H, W\) tensor, got shape \(3, 4, 4\)"):
        whiten(torch.randn(3, 4, 4), "sample")


@pytest.mark.parametrize("backend", cpu_fused_params())
@pytest.mark.parametrize("whiten", ["channel", "sample"])
def test_mse_is_never_negative_at_a_perfect_fit(backend, whiten):
    # the fused mse expands sum (s - w)^2 into moments that cancel in fp32: Triton reported -1e-7 at a perfect
    # fit (student = whitened teacher) where the C++/CUDA kernels clamp at 0
    from dtfast.ops.reference import whiten as whiten_ref

    _, teacher = make_levels("cpu", seed=5, shapes=[(4, 64, 9, 9), (4, 128, 5, 5)])
    student = [whiten_ref(g.double(), whiten).float() for g in teacher]
    mse = dreamteacher_loss(student, teacher, whiten=whiten, backend=backend, return_parts=True)["mse"]
    assert (mse >= 0).all() and mse.max() < 1e-5, mse
