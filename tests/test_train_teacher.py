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


def _main(out, *overrides):
    from dtfast.train_teacher import main

    return main([f"out={out}", *SMALL, *overrides])


@pytest.mark.parametrize("override,key", [
    ("train.lr=1e-5", "train.min_lr"),  # below the default min_lr 1e-4: the cosine "decay" would raise the LR
    ("train.lr=nan", "train.lr"), ("train.lr=inf", "train.lr"), ("train.min_lr=-1e-5", "train.min_lr"),
    ("train.warmup_steps=-1", "train.warmup_steps"), ("train.save_every=-1", "train.save_every"),
    ("data.num_workers=-1", "data.num_workers"), ("train.grad_clip=-1", "train.grad_clip"),
    ("train.weight_decay=-0.1", "train.weight_decay"), ("train.keep_last=0", "train.keep_last"),
    ("train.betas=[0.9,1.0]", "train.betas"), ("train.betas=[-0.1,0.9]", "train.betas"),
    ("model.arch=sd15", "model.arch")])
def test_config_refuses_values_that_would_train_wrongly(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_teacher_config(None, [override])


def test_non_square_teacher_trains_and_exports_at_its_size(tmp_path):
    from dtfast.teachers import build_teacher

    _train(tmp_path, "train.max_steps=2", "data.image_width=64")  # BDD100K-like 1:2 crops
    info = json.loads((tmp_path / "teacher" / "dtfast_teacher.json").read_text())
    assert info["image_size"] == "32x64"
    teacher = build_teacher(pretrained=str(tmp_path / "teacher"), timestep=50, strides=(4, 8, 16, 32))
    assert [tuple(s[-2:]) for s in teacher.feature_shapes(32, 64)] == [(8, 16), (4, 8), (2, 4), (1, 2)]
    with pytest.raises(ConfigError, match=r"'data\.image_width' = 48 must be a multiple of 32"):
        load_teacher_config(None, ["data.image_width=48"])


def test_config_accepts_a_low_lr_with_a_lower_min_lr():
    cfg = load_teacher_config(None, ["train.lr=1e-5", "train.min_lr=0", "train.betas=[0,0.99]"])
    assert cfg.train.lr == 1e-5


def test_image_size_must_be_a_multiple_of_the_unet_downsampling(tmp_path, capsys):
    # tiny has 6 levels, 5 downsamplings: 48 px would crash in diffusers' skip connections at step 1
    with pytest.raises(ConfigError, match=r"'data\.image_size' = 48 must be a multiple of 32 for model\.arch=tiny"):
        load_teacher_config(None, ["data.image_size=48"])
    with pytest.raises(ConfigError, match="multiple of 32"):
        load_teacher_config(None, ["data.image_size=16"])
    assert load_teacher_config(None, ["data.image_size=64"])
    assert load_teacher_config(None, ["model.arch=adm256", "data.image_size=64"])
    assert _main(tmp_path / "run", "data.image_size=48") == 2
    assert "multiple of 32" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def _signal_at(monkeypatch, step, signum, times=1):
    """Deliver ``signum`` to this process ``times`` times during the forward of step ``step`` (1-based)."""
    import os

    original = TeacherTrainer.diffusion_loss

    def loss(self, images, generator):
        if self.step + 1 == step:
            for _ in range(times):
                os.kill(os.getpid(), signum)
        return original(self, images, generator)

    monkeypatch.setattr(TeacherTrainer, "diffusion_loss", loss)


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_signal_stop_checkpoints_and_exits_with_128_plus_signal(tmp_path, monkeypatch, signum):
    import signal

    signum = getattr(signal, signum)
    before = signal.getsignal(signum)
    _signal_at(monkeypatch, 2, signum)
    # not 0: torchrun --max-restarts, schedulers and recipes/small_scale.py must see that the job is not done
    assert _main(tmp_path, "train.max_steps=3", "train.save_every=0") == 128 + signum
    assert signal.getsignal(signum) == before  # close() put the handlers back
    assert (tmp_path / "checkpoints" / "step_2").is_dir() and not (tmp_path / "teacher").exists()
    monkeypatch.undo()
    assert _main(tmp_path, "train.max_steps=3", "train.save_every=0") == 0  # resumes at step 2, exports
    assert json.loads((tmp_path / "teacher" / "dtfast_teacher.json").read_text())["steps"] == 3


def test_repeated_signal_still_checkpoints(tmp_path, monkeypatch):
    import signal

    # Slurm and torchrun deliver the same request twice: the second must not abort the checkpoint
    _signal_at(monkeypatch, 1, signal.SIGTERM, times=2)
    assert _main(tmp_path, "train.max_steps=3", "train.save_every=0") == 128 + signal.SIGTERM
    assert (tmp_path / "checkpoints" / "step_1").is_dir()


def test_finished_run_exits_0_and_a_signal_after_the_loop_exits_at_once(tmp_path, monkeypatch):
    import signal

    assert _main(tmp_path, "train.max_steps=1") == 0
    # a signal during the export (outside the step loop): nothing to finish, so out at once with 128 + signal
    monkeypatch.setattr(TeacherTrainer, "export", lambda self: signal.raise_signal(signal.SIGTERM))
    with pytest.raises(SystemExit) as exc:
        _main(tmp_path, "train.max_steps=1")
    assert exc.value.code == 128 + signal.SIGTERM


def test_resume_never_sets_the_earlier_run_aside(tmp_path, capsys):
    _train(tmp_path, "train.max_steps=3", "train.save_every=1")
    _train(tmp_path, "train.max_steps=2", "train.save_every=1", "train.resume=never")
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    earlier = [json.loads(line)["step"] for line in (tmp_path / "metrics.1.jsonl").read_text().splitlines()]
    assert earlier == [1, 2, 3]
    # the earlier run's checkpoints are kept, apart: they can neither be pruned with nor resumed instead of this run's
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_1", "step_2"]
    assert sorted(p.name for p in (tmp_path / "checkpoints.1").glob("step_*")) == ["step_2", "step_3"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_2"
    assert "went to" in capsys.readouterr().out
    resumed = _train(tmp_path, "train.max_steps=2")
    assert resumed.step == 2


def test_refused_resume_leaves_the_config_and_prints_no_traceback(tmp_path, capsys):
    _train(tmp_path, "train.max_steps=1")
    config = (tmp_path / "config.yaml").read_text()
    capsys.readouterr()
    assert _main(tmp_path, "train.max_steps=2", "data.image_size=64") == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "data.image_size: checkpoint has 32, this run has 64" in err, err
    assert "Traceback" not in err
    assert (tmp_path / "config.yaml").read_text() == config  # still the config of the checkpoints and the export
    assert _main(tmp_path, "train.resume=" + str(tmp_path / "nowhere")) == 2
    assert "no checkpoint folder" in capsys.readouterr().err


def test_too_few_images_for_a_batch_names_train_batch_size(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (40, 40), (i * 60, 0, 0)).save(root / "a" / f"{i}.png")
    assert _main(tmp_path / "run", f"data.root={root}", "train.batch_size=4") == 2
    err = capsys.readouterr().err
    assert "'train.batch_size' = 4" in err and str(root) in err and "3 images" in err, err
    with pytest.raises(ConfigError, match=r"'train\.batch_size' = 4: data\.num_images=3 has 3 images"):
        _train(tmp_path / "run2", "data.num_images=3")


def test_resume_with_changed_settings_warns_applies_them_and_records_them(tmp_path, caplog):
    import logging

    _train(tmp_path, "train.max_steps=2", "train.save_every=1")
    with caplog.at_level(logging.WARNING, logger="dtfast.train_teacher"):
        resumed = _train(tmp_path, "train.max_steps=3", "train.save_every=1", "data.seed=3", "train.ema_decay=0.5",
                         "train.weight_decay=0.25", "train.betas=[0.8,0.99]")
    assert "changed settings" in caplog.text and "data.seed" in caplog.text and "train.ema_decay" in caplog.text
    groups = resumed.optimizer.param_groups
    assert groups[0]["weight_decay"] == 0.25 and all(tuple(g["betas"]) == (0.8, 0.99) for g in groups)
    info = json.loads((tmp_path / "teacher" / "dtfast_teacher.json").read_text())
    (entry,) = info["resume_history"]
    assert entry["step"] == 2 and any("data.seed" in c for c in entry["changed"])
