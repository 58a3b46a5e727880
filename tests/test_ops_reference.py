"""dtfast.ops reference loss against an independent float64 implementation (explicit loops / einsum)."""

import math

import pytest
import torch

from dtfast.ops import DreamTeacherLoss, attention_map, dreamteacher_loss

COMBOS = [(w, a) for w in ("channel", "sample") for a in ("paper", "code")]
SHAPES = [(3, 37, 13, 13), (2, 5, 7, 3), (1, 64, 4, 6)]


def oracle_loss(student, teacher, at_weight, whiten, at_mode):
    """DESIGN.md section 3 written differently: per-sample loops, einsum, math on python floats where possible."""
    total_mse, total_at = [], []
    for s, g in zip(student, teacher):
        g = g.detach().double()
        s = s.double()
        B, C, H, W = s.shape
        mse_terms, at_terms = [], []
        for b in range(B):
            gb = g[b].reshape(C, H * W)
            sb = s[b].reshape(C, H * W)
            if whiten == "channel":
                mu = torch.einsum("cp->p", gb) / C
                var = torch.einsum("cp,cp->p", gb - mu, gb - mu) / C
                target = (gb - mu) / torch.sqrt(var + 1e-6)
            else:
                n = C * H * W
                mu = gb.sum() / n
                var = ((gb - mu) ** 2).sum() / n
                target = (gb - mu) / torch.sqrt(var + 1e-6)
            mse_terms.append(((sb - target) ** 2).sum())
            qs = torch.einsum("cp,cp->p", sb, sb)
            qg = torch.einsum("cp,cp->p", gb, gb)
            qs = qs / torch.maximum(torch.sqrt((qs * qs).sum()), torch.tensor(1e-12, dtype=qs.dtype))
            qg = qg / torch.maximum(torch.sqrt((qg * qg).sum()), torch.tensor(1e-12, dtype=qg.dtype))
            diff = qs - qg
            if at_mode == "paper":
                sq = (diff * diff).sum()
                # gradient of sqrt at 0 defined as 0: sqrt(sq) with a safe branch
                at_terms.append(torch.where(sq > 0, torch.sqrt(torch.where(sq > 0, sq, torch.ones_like(sq))), sq * 0))
            else:
                at_terms.append((diff * diff).sum() / (H * W))
        total_mse.append(sum(mse_terms) / (B * C * H * W))
        total_at.append(sum(at_terms) / B)
    mse = torch.stack(total_mse)
    at = torch.stack(total_at)
    return (mse + at_weight * at).sum() / len(student), mse, at


def random_levels(shapes, dtype=torch.float64, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    student = [torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_() for s in shapes]
    # teacher with a non-zero mean and scale per channel, so whitening matters
    teacher = [(3.0 + 2.0 * torch.randn(s, generator=gen, dtype=torch.float64)).to(device, dtype) for s in shapes]
    return student, teacher


@pytest.mark.parametrize("whiten,at_mode", COMBOS)
def test_reference_matches_float64_oracle(whiten, at_mode):
    student, teacher = random_levels(SHAPES, seed=1)
    at_weight = 7.5
    out = dreamteacher_loss(student, teacher, at_weight=at_weight, whiten=whiten, at_mode=at_mode,
                            backend="torch", return_parts=True)
    student2 = [s.detach().clone().requires_grad_() for s in student]
    loss2, mse2, at2 = oracle_loss(student2, teacher, at_weight, whiten, at_mode)
    torch.testing.assert_close(out["loss"], loss2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["mse"], mse2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["at"], at2, rtol=1e-10, atol=1e-12)
    scale = 0.37
    (out["loss"] * scale).backward()
    (loss2 * scale).backward()
    for a, b in zip(student, student2):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-13)


def test_teacher_gets_no_gradient():
    student, teacher = random_levels([(2, 3, 4, 5)])
    teacher = [g.requires_grad_() for g in teacher]
    dreamteacher_loss(student, teacher, backend="torch").backward()
    assert teacher[0].grad is None and student[0].grad is not None


def test_paper_at_gradient_is_zero_at_zero_difference():
    # s = 2 g gives identical normalised attention maps: the paper-mode AT term is 0 and so is its gradient
    g = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    s = (2.0 * g).requires_grad_()
    out = dreamteacher_loss([s], [g], at_weight=1.0, return_parts=True, backend="torch")
    assert out["at"].abs().max() < 1e-15
    out["at"].sum().backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().max() < 1e-12


def test_attention_map_is_unit_norm_and_zero_safe():
    x = torch.randn(3, 5, 4, 2, dtype=torch.float64)
    q = attention_map(x)
    assert q.shape == (3, 8)
    torch.testing.assert_close(q.norm(dim=1), torch.ones(3, dtype=torch.float64))
    assert torch.equal(attention_map(torch.zeros(1, 2, 3, 3)), torch.zeros(1, 9))


def test_module_matches_function_and_low_precision_runs():
    student, teacher = random_levels([(2, 6, 5, 5), (2, 12, 3, 3)], dtype=torch.bfloat16, seed=3)
    module = DreamTeacherLoss(at_weight=3.0, whiten="sample", at_mode="code")
    loss = module(student, teacher)
    assert loss.dtype == torch.float32
    loss.backward()
    assert student[0].grad.dtype == torch.bfloat16
    ref = dreamteacher_loss(student, teacher, at_weight=3.0, whiten="sample", at_mode="code")
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-6)


@pytest.mark.parametrize("case,match", [
    ("levels", r"2 student levels .* 1 teacher levels"),
    ("shape", r"level 1: student \(2, 4, 3, 3\) vs teacher \(2, 4, 3, 2\)"),
    ("dtype", r"level 0: .*dtypes differ"),
    ("rank", r"level 0: student \(2, 4, 9\) vs teacher \(2, 4, 9\): both must be 4-D"),
    ("whiten", r"whiten must be one of"),
    ("backend", r"unknown backend"),
])
def test_bad_inputs_raise_value_error(case, match):
    s = [torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)]
    g = [torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)]
    kwargs = {}
    if case == "levels":
        g = g[:1]
    elif case == "shape":
        g[1] = torch.randn(2, 4, 3, 2)
    elif case == "dtype":
        g[0] = g[0].double()
    elif case == "rank":
        s, g = [torch.randn(2, 4, 9)], [torch.randn(2, 4, 9)]
    elif case == "whiten":
        kwargs["whiten"] = "pixel"
    elif case == "backend":
        kwargs["backend"] = "tpu"
    with pytest.raises(ValueError, match=match):
        dreamteacher_loss(s, g, **kwargs)


@pytest.mark.parametrize("which", ["student", "teacher"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_are_reported(which, bad):
    s = [torch.randn(2, 4, 3, 3), torch.randn(2, 8, 2, 2)]
    g = [torch.randn(2, 4, 3, 3), torch.randn(2, 8, 2, 2)]
    (s if which == "student" else g)[1][1, 2, 0, 1] = bad
    with pytest.raises(ValueError, match=rf"level 1: {which} map"):
        dreamteacher_loss(s, g)
    loss = dreamteacher_loss(s, g, check_finite=False)
    assert not torch.isfinite(loss)
