import json

import pytest
import torch
from safetensors.torch import load_file

from dtfast.teacher_training.config import ConfigError, load_teacher_config
from dtfast.teacher_training.trainer import EMA, TeacherTrainer, unet_config

# a very small UNet of the `tiny` layout: seconds per step on a CPU
SMALL = ["model.block_out_channels=[8,8,8,8,16,16]", "model.norm_num_groups=4", "model.attention_head_dim=8",
         "data.image_size=32",
         "data.num_images=16", "data.num_workers=0", "train.batch_size=4", "train.log_every=1", "train.warmup_steps=1"]


def _train(out, *overrides):
    cfg = load_teacher_config(None, [f"out={out}", *SMALL, *overrides])
    trainer = TeacherTrainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    return trainer


def test_trains_exports_and_loads_as_teacher(tmp_path):
    from dtfast.teachers import build_teacher

    trainer = _train(tmp_path, "train.max_steps=3", "train.save_every=2")
    folder = tmp_path / "teacher"
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "scheduler" / "scheduler_config.json").is_file()
    info = json.loads((folder / "dtfast_teacher.json").read_text())
    assert info["steps"] == 3 and info["image_size"] == 32
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3] and all(r["loss"] > 0 for r in lines)
    # the export is the EMA, not the live weights
    exported = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    ema = trainer.ema.model.state_dict()
    live = trainer.unet.state_dict()
    assert all(torch.equal(exported[k], ema[k]) for k in exported)
    assert any(not torch.equal(exported[k], live[k]) for k in exported)
    teacher = build_teacher(pretrained=str(folder), timestep=50)
    assert not teacher.is_random
    features = teacher(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert [tuple(f.shape[2:]) for f in features] == [(8, 8), (4, 4), (2, 2), (1, 1)]
    assert [f.shape[1] for f in features] == list(teacher.channels)


def test_resume_equals_uninterrupted_run(tmp_path):
    straight = _train(tmp_path / "a", "train.max_steps=4", "train.save_every=0")
    _train(tmp_path / "b", "train.max_steps=2", "train.save_every=1")
    resumed = _train(tmp_path / "b", "train.max_steps=4", "train.save_every=1")
    assert resumed.step == 4 and resumed.ema.num_updates == 4
    for key, value in straight.ema.model.state_dict().items():
        torch.testing.assert_close(resumed.ema.model.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_resume_refuses_another_architecture(tmp_path):
    _train(tmp_path, "train.max_steps=1")
    with pytest.raises(ValueError, match="model"):
        _train(tmp_path, "train.max_steps=2", "model.block_out_channels=[8,8,8,8,16,32]")


def test_ema_follows_its_formula():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # n=1: decay = min(0.9, 2/11)
    d = 2 / 11
    torch.testing.assert_close(ema.model.weight, d * start + (1 - d) * model.weight.detach())
    assert not ema.model.weight.requires_grad


def test_config_errors():
    with pytest.raises(ConfigError, match="did you mean"):
        load_teacher_config(None, ["train.max_step=3"])
    with pytest.raises(ConfigError, match="ema_decay"):
        load_teacher_config(None, ["train.ema_decay=1.5"])
    with pytest.raises(ValueError, match="norm_num_groups"):
        unet_config(load_teacher_config(None, ["model.norm_num_groups=5"]))
    with pytest.raises(ValueError, match="attention_head_dim"):
        unet_config(load_teacher_config(None, ["model.attention_head_dim=48"]))


def test_cli_help_lists_every_key(capsys):
    from dtfast.train_teacher import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for key in ("data.root", "model.arch", "train.ema_decay", "train.resume", "diffusion.beta_schedule"):
        assert key in text
    assert main(["train.lr=-1"]) == 2
