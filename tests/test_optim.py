"""Optimizers: the multi-tensor LAMB against timm's per-parameter LAMB (an independent implementation of the same
update), checkpoint compatibility with timm's state, and a step whose op count does not grow with the parameters."""

import copy
import json

import pytest
import torch
from torch import nn

from dtfast.bench.flops import OpCounter
from dtfast.train.optim import Lamb, build_optimizer, param_groups

timm_lamb = pytest.importorskip("timm.optim.lamb")


def _model(channels_last: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 7, 3), nn.BatchNorm2d(7), nn.ReLU(), nn.Conv2d(7, 5, 1), nn.Flatten(),
                          nn.LazyLinear(3))
    model(torch.randn(2, 3, 9, 9))
    model = model.double()
    with torch.no_grad():
        model[3].weight.zero_()  # a zero weight: trust ratio 1 (||w|| = 0)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _timm(groups, lr, betas, eps):
    return timm_lamb.Lamb(groups, lr=lr, betas=betas, eps=eps, max_grad_norm=None, foreach=False)


def _run(model, optimizer, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(memory_format=(
                torch.channels_last if p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)
                and not p.is_contiguous() else torch.contiguous_format))
        model[1].bias.grad.zero_()  # a zero update on a no-decay group
        optimizer.step()


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_lamb_matches_timm_per_parameter_lamb(channels_last, foreach):
    ours_model, timm_model = _model(channels_last), _model(channels_last)
    kwargs = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-6)
    ours = Lamb(param_groups(ours_model, 0.05), foreach=foreach, **kwargs)
    theirs = _timm(param_groups(timm_model, 0.05), **kwargs)
    _run(ours_model, ours, 6, seed=1)
    _run(timm_model, theirs, 6, seed=1)
    for (name, a), b in zip(ours_model.named_parameters(), timm_model.parameters()):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), name
        if channels_last and a.dim() == 4:
            assert a.is_contiguous(memory_format=torch.channels_last)
            assert ours.state[a]["exp_avg"].is_contiguous(memory_format=torch.channels_last)
    moved = sum((a - b).abs().sum() for a, b in zip(ours_model.parameters(), _model(channels_last).parameters()))
    assert moved > 0.1  # the comparison is not between two models that did not move


def test_lamb_with_the_presets_clipping_matches_timm_lamb_with_its_default_clipping():
    """The LAMB presets' train.grad_clip=1.0 (clip_grad_norm_, the engine's) + dtfast's Lamb is timm's Lamb with its
    default max_grad_norm=1.0. The random gradients have a global norm of about 10, so every step clips."""
    ours_model, timm_model = _model(False), _model(False)
    kwargs = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-6)
    ours = Lamb(param_groups(ours_model, 0.05), **kwargs)
    theirs = timm_lamb.Lamb(param_groups(timm_model, 0.05), max_grad_norm=1.0, foreach=False, **kwargs)

    class Clipped:  # what the engine does before the optimizer step
        def step(self):
            norm = torch.nn.utils.clip_grad_norm_(ours_model.parameters(), 1.0)
            assert norm > 2.0
            ours.step()

    _run(ours_model, Clipped(), 6, seed=3)
    _run(timm_model, theirs, 6, seed=3)
    for (name, a), b in zip(ours_model.named_parameters(), timm_model.parameters()):
        # clip_grad_norm_ divides by norm + 1e-6, timm by the norm: a relative 1e-7 in each step's gradient
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-8), name
    unclipped = _model(False)
    _run(unclipped, Lamb(param_groups(unclipped, 0.05), **kwargs), 6, seed=3)
    assert not all(torch.allclose(a, b, rtol=1e-3) for a, b in zip(unclipped.parameters(), timm_model.parameters()))


def test_lamb_resumes_from_timm_state():
    first, second = _model(False), _model(False)
    theirs = _timm(param_groups(first, 0.05), lr=1e-2, betas=(0.9, 0.999), eps=1e-6)
    _run(first, theirs, 3, seed=2)
    second.load_state_dict(first.state_dict())
    ours = Lamb(param_groups(second, 0.05), lr=1e-2, foreach=True)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    _run(first, theirs, 2, seed=3)
    _run(second, ours, 2, seed=3)
    assert [g["step"] for g in ours.param_groups] == [5, 5]
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_lamb_foreach_step_op_count_does_not_grow_with_parameters():
    counts = []
    for layers in (3, 30):
        model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(layers)])
        optimizer = Lamb(param_groups(model, 0.05), lr=1e-3, foreach=True)  # the CUDA default
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()  # state initialisation (zeros_like per parameter) happens once
        with OpCounter() as mode:
            optimizer.step()
        counts.append(mode.count)
    # one norm cast per tensor stays in Python (a no-op for float32), everything else is per group
    assert counts[1] == counts[0], counts


def test_build_optimizer_lamb_on_cpu_is_the_multi_tensor_lamb():
    model = _model(True).float()
    optimizer = build_optimizer(model, "lamb", lr=1e-3, weight_decay=0.05, betas=[0.9, 0.95])
    assert isinstance(optimizer, Lamb)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    with pytest.raises(ValueError, match="bad hyper-parameters"):
        Lamb(model.parameters(), betas=(0.9, 1.0))


def test_trainer_with_lamb_trains_and_resumes(tmp_path):
    """The real trainer (DDP engine, one process, channels_last student as in the ImageNet presets) with LAMB: it
    trains, its checkpoint holds the Lamb state, and a resumed run continues with the same step count."""
    from dtfast.train.config import load_config
    from dtfast.train.trainer import Trainer

    small = [f"out={tmp_path}", "data.image_size=32", "data.num_workers=0", "student.width=16", "train.batch_size=2",
             "train.warmup_steps=1", "loss.backend=torch", "teacher.arch=tiny", "train.optimizer=lamb",
             "train.lr=1e-2", "train.save_every=2", "train.log_every=1", "dist.engine=ddp"]
    trainer = Trainer(load_config(None, [*small, "train.max_steps=2"]))
    try:
        assert isinstance(trainer.optimizer, Lamb)
        before = {k: v.clone() for k, v in trainer.student.state_dict().items() if v.is_floating_point()}
        trainer.train()
        after = trainer.student.state_dict()
        assert sum(float((after[k] - v).abs().sum()) for k, v in before.items()) > 0
        assert all(torch.isfinite(after[k]).all() for k in before)
        assert [g["step"] for g in trainer.optimizer.param_groups] == [2, 2]
    finally:
        trainer.close()
    resumed = Trainer(load_config(None, [*small, "train.max_steps=3"]))
    try:
        resumed.train()  # resumes from the step-2 checkpoint, then runs step 3 only
        assert resumed.step == 3
        assert [g["step"] for g in resumed.optimizer.param_groups] == [3, 3]
    finally:
        resumed.close()
    with open(tmp_path / "metrics.jsonl") as fh:
        steps = [json.loads(line)["step"] for line in fh if line.strip()]
    assert steps == [1, 2, 3], steps
