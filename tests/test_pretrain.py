"""End to end: the real trainer under torchrun (2 processes, gloo, CPU), resume, and config errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["data.image_size=32", "data.num_images=64", "data.num_workers=0", "student.width=32",
         "train.batch_size=4", "train.log_every=1", "train.warmup_steps=2", "train.lr=3e-3"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


@pytest.mark.multiproc
def test_torchrun_two_processes_end_to_end(tmp_path):
    import timm
    from safetensors.torch import load_file

    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "dtfast.pretrain",
           f"out={out}", "train.max_steps=8", *SMALL]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "backbone.safetensors" in proc.stdout
    records = _metrics(out)
    assert [r["step"] for r in records] == list(range(1, 9))
    for key in ("loss", "mse", "at", "lr", "img_per_s"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in records), key
    losses = [r["loss"] for r in records]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert os.path.isfile(os.path.join(out, "config.yaml"))

    path = os.path.join(out, "backbone.safetensors")
    model = timm.create_model("resnet18", pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=path))
    exported = load_file(path)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in exported.items())
    fresh = timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict()
    assert not torch.equal(fresh["conv1.weight"], loaded["conv1.weight"])


def _run(out, steps, extra=()):
    from dtfast.train.config import load_config
    from dtfast.train.trainer import Trainer

    cfg = load_config(None, [f"out={out}", f"train.max_steps={steps}", "train.save_every=3", "loss.backend=torch",
                             *SMALL, *extra])
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()


def test_resume_gives_the_same_curve(tmp_path):
    torch.set_num_threads(1)
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    _run(full, 6)
    # a run stopped at step 3 (as if preempted: checkpoint, clean exit), then resumed to 6 with the same schedule
    from dtfast.train.config import load_config
    from dtfast.train.trainer import Trainer

    cfg = load_config(None, [f"out={split}", "train.max_steps=6", "train.save_every=3", "loss.backend=torch", *SMALL])
    trainer = Trainer(cfg)
    original = trainer.optimizer_step

    def stop_after_three(batches, timer=None):
        parts = original(batches, timer)
        if trainer.step == 3:
            trainer._stop_signal = 15  # what SIGTERM does: checkpoint, then a clean exit
        return parts

    trainer.optimizer_step = stop_after_three
    trainer.train()
    trainer.close()
    assert [r["step"] for r in _metrics(split)] == [1, 2, 3]
    _run(split, 6)
    a, b = _metrics(full), _metrics(split)
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-6), (ra, rb)


def test_logged_values_are_the_mean_over_the_steps_micro_batches(tmp_path):
    from dtfast.train.config import load_config
    from dtfast.train.trainer import Trainer

    torch.set_num_threads(1)
    cfg = load_config(None, [f"out={tmp_path / 'run'}", "train.max_steps=2", "train.grad_accum=3",
                             "loss.backend=torch", *SMALL])
    trainer = Trainer(cfg)
    try:
        micro = []
        original = trainer.forward_backward

        def record(batch, timer=None):
            parts = original(batch, timer)
            micro.append({key: parts[key].detach().clone() for key in ("loss", "mse", "at")})
            return parts

        trainer.forward_backward = record
        state = {"loader": iter(trainer._build_loader(0)), "data_wait": 0.0}
        parts = trainer.optimizer_step(trainer._micro_batches(state))
    finally:
        trainer.close()
    assert len(micro) == 3 and len({float(m["loss"]) for m in micro}) == 3
    for key in ("loss", "mse", "at"):
        expected = sum(m[key] for m in micro) / 3
        assert torch.allclose(parts[key], expected, rtol=1e-6), key
        assert parts[key].shape == micro[0][key].shape  # per level for mse and at


def test_a_bf16_teacher_gets_the_fp32_image_and_noises_it_before_rounding(tmp_path):
    from dtfast.train.config import load_config
    from dtfast.train.trainer import Trainer

    cfg = load_config(None, [f"out={tmp_path / 'run'}", "train.max_steps=1", "teacher.dtype=bf16",
                             "loss.backend=torch", *SMALL, "train.warmup_steps=1"])
    trainer = Trainer(cfg)
    try:
        seen = []
        encode = trainer.teacher._encode_fn

        def spy(images, noise):
            seen.append(images.dtype)
            return encode(images, noise)

        trainer.teacher._encode_fn = spy
        state = {"loader": iter(trainer._build_loader(0)), "data_wait": 0.0}
        parts = trainer.optimizer_step(trainer._micro_batches(state))
    finally:
        trainer.close()
    assert seen == [torch.float32] and trainer.teacher.dtype == torch.bfloat16
    assert torch.isfinite(parts["loss"])


def test_epochs_set_the_runs_length_from_the_data_and_global_batch(tmp_path, capsys):
    out = str(tmp_path / "run")
    # 64 images, global batch 4: 0.25 epochs = 4 steps, 0.125 warm-up epochs = 2 steps
    _run(out, 0, ["train.epochs=0.25", "train.warmup_steps=0", "train.warmup_epochs=0.125"])
    records = _metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    lrs = [r["lr"] for r in records]
    assert lrs[:2] == pytest.approx([1.5e-3, 3e-3]) and lrs[2] == pytest.approx(3e-3)  # peak at the warm-up's end
    assert "steps 0->4 (0.25 epochs, 0.125 warm-up epochs of 64 images at global batch 4)" in capsys.readouterr().out


def test_non_square_crops_train_export_and_refuse_another_width(tmp_path):
    from safetensors import safe_open

    from dtfast.eval.config import load_eval_config

    out = str(tmp_path / "run")
    _run(out, 2, ["data.image_size=32", "data.image_width=64"])  # the BDD100K recipe's 1:2 crops, embedded data
    assert [r["step"] for r in _metrics(out)] == [1, 2] and all(r["loss"] > 0 for r in _metrics(out))
    backbone = os.path.join(out, "backbone.safetensors")
    with safe_open(backbone, framework="pt") as fh:
        assert fh.metadata()["image_size"] == "32x64"
    assert load_eval_config(None, [f"backbone={backbone}"]).data.image_size == 32  # the probe's square: shorter side
    with pytest.raises(ValueError, match="data.image_width: checkpoint has 64, this run has 0"):
        _run(out, 4, ["data.image_size=32"])
    # a checkpoint written before data.image_width existed was square: a non-square resume is refused too
    square = str(tmp_path / "square")
    _run(square, 2)
    meta_path = os.path.join(square, "checkpoints", "step_2", "meta.json")
    with open(meta_path) as fh:
        meta = json.load(fh)
    del meta["config"]["data"]["image_width"]
    with open(meta_path, "w") as fh:
        json.dump(meta, fh)
    with pytest.raises(ValueError, match="data.image_width: checkpoint has 0, this run has 64"):
        _run(square, 4, ["data.image_width=64"])
    _run(square, 3)  # the same square crops resume
    assert [r["step"] for r in _metrics(square)] == [1, 2, 3]
    with pytest.raises(ValueError, match="'data.image_width' = 48 must be a multiple of 32 for this teacher"):
        _run(str(tmp_path / "odd"), 1, ["data.image_width=48"])


def test_resume_refuses_a_different_config(tmp_path):
    out = str(tmp_path / "run")
    _run(out, 3)
    with open(os.path.join(out, "config.yaml")) as fh:
        config = fh.read()
    with pytest.raises(ValueError, match="student.width"):
        _run(out, 6, ["student.width=16"])
    with open(os.path.join(out, "config.yaml")) as fh:
        assert fh.read() == config  # the refused run did not overwrite the run's config


def test_resume_with_another_batch_size_warns(tmp_path, caplog):
    out = str(tmp_path / "run")
    _run(out, 3)
    with caplog.at_level("WARNING", logger="dtfast.train"):
        _run(out, 4, ["train.batch_size=2"])
    assert any("different data order or batch" in r.message and "train.batch_size" in r.message
               for r in caplog.records), [r.message for r in caplog.records]
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3, 4]


def test_export_only_writes_a_checkpoints_backbone(tmp_path, capsys):
    from safetensors.torch import load_file

    from dtfast.pretrain import main

    torch.set_num_threads(1)
    out = str(tmp_path / "run")
    _run(out, 6)  # checkpoints at steps 3 and 6, backbone.safetensors at 6
    files = {name: open(os.path.join(out, name), "rb").read() for name in ("config.yaml", "metrics.jsonl")}
    checkpoints = sorted(os.listdir(os.path.join(out, "checkpoints")))
    args = [f"out={out}", "train.max_steps=6", "train.save_every=3", "loss.backend=torch", *SMALL,
            "train.export_only=true"]
    assert main([*args, f"train.resume={out}/checkpoints/step_3"]) == 0
    assert main(args) == 0  # train.resume=auto: the latest, step 6
    final = load_file(os.path.join(out, "backbone.safetensors"))
    step6 = load_file(os.path.join(out, "backbone_step_6.safetensors"))
    step3 = load_file(os.path.join(out, "backbone_step_3.safetensors"))
    assert step6.keys() == final.keys() == step3.keys()
    assert all(torch.equal(step6[k], final[k]) for k in final)
    assert not torch.equal(step3["conv1.weight"], final["conv1.weight"])
    from safetensors import safe_open

    with safe_open(os.path.join(out, "backbone_step_3.safetensors"), framework="pt") as fh:
        image_size = yaml.safe_load(files["config.yaml"])["data"]["image_size"]
        assert fh.metadata()["image_size"] == str(image_size)  # dtfast.evaluate's default resolution
    # the run itself is left as it was
    assert {name: open(os.path.join(out, name), "rb").read() for name in files} == files
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == checkpoints
    capsys.readouterr()
    assert main([f"out={tmp_path / 'empty'}", *SMALL, "train.export_only=true"]) == 2
    assert "train.export_only: no checkpoint to export" in capsys.readouterr().err


def test_fresh_start_sets_earlier_metrics_aside(tmp_path, capsys):
    # a used folder started from step 0 (train.resume=never here; also a crash before the first checkpoint): the
    # earlier attempt's lines move to metrics.1.jsonl instead of mixing with the new run's
    torch.set_num_threads(1)
    out = str(tmp_path / "run")
    _run(out, 3)
    _run(out, 2, ["train.resume=never"])
    assert [r["step"] for r in _metrics(out)] == [1, 2]
    with open(os.path.join(out, "metrics.1.jsonl")) as fh:
        assert [json.loads(line)["step"] for line in fh] == [1, 2, 3]
    assert "metrics of an earlier attempt went to" in capsys.readouterr().out


def test_cli_reports_bad_keys():
    proc = subprocess.run([sys.executable, "-m", "dtfast.pretrain", "train.lrr=1"], env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "train.lrr" in proc.stderr and "train.lr" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "dtfast.pretrain", "--help"], env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "teacher.timestep" in proc.stdout and "loss.at_mode" in proc.stdout


def test_progress_reports_time_left(tmp_path, capsys):
    from dtfast.train.trainer import format_duration

    assert [format_duration(s) for s in (0.4, 45, 750, 4 * 3600 + 300, 2 * 86400 + 3 * 3600 + 59)] == [
        "0s", "45s", "12m 30s", "4h 05m", "2d 03h"]
    torch.set_num_threads(1)
    out = str(tmp_path / "run")
    _run(out, 3)
    records = _metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    # (steps left) x (global batch 4) / (images/s of the window)
    for r in records:
        assert r["eta_s"] == pytest.approx((3 - r["step"]) * 4 / r["img_per_s"])
    assert records[-1]["eta_s"] == 0
    assert "eta 0s" in capsys.readouterr().out


def test_grad_norm_is_logged_by_every_engine_when_clipping(tmp_path):
    # DeepSpeed at ZeRO stage 0 clips fp32 gradients without keeping the norm; dtfast takes it itself there
    torch.set_num_threads(1)
    norms = {}
    for engine in (["dist.engine=ddp"], ["dist.engine=deepspeed", "dist.zero_stage=0"]):
        out = str(tmp_path / engine[-1].replace("=", "_"))
        _run(out, 2, [*engine, "train.grad_clip=0.5", "train.resume=never"])
        norms[engine[-1]] = [r.get("grad_norm") for r in _metrics(out)]
    ddp, zero0 = norms["dist.engine=ddp"], norms["dist.zero_stage=0"]
    assert all(n is not None and n > 0 for n in ddp + zero0), norms
    assert zero0[0] == pytest.approx(ddp[0], rel=1e-4)  # same weights and data at step 1: the same global norm


def test_noise_seeds_do_not_repeat_across_ranks():
    from dtfast.train.trainer import _rank_seed

    seeds = [_rank_seed(0, rank, micro) for rank in range(8) for micro in range(0, 40000, 7)]
    assert len(set(seeds)) == len(seeds)
    assert _rank_seed(0, 0, 10_007) != _rank_seed(0, 1, 0)  # the old linear mix made these equal


def test_resume_never_moves_the_earlier_run_aside(tmp_path):
    # a fresh start in a used folder: the old checkpoints would be pruned among (and, without the `latest` pointer,
    # resumed instead of) the new run's; they and the old metrics are renamed, not deleted
    out = tmp_path / "run"
    _run(str(out), 3, ["dist.engine=ddp"])
    assert (out / "checkpoints" / "step_3").is_dir()
    _run(str(out), 1, ["dist.engine=ddp", "train.resume=never"])
    assert (out / "checkpoints.1" / "step_3").is_dir() and (out / "metrics.1.jsonl").is_file()
    assert [m["step"] for m in _metrics(str(out))] == [1]
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step_1"]


def test_set_up_errors_are_one_line_and_a_teacher_run_folder_is_named(tmp_path, capsys):
    import shutil

    from dtfast.pretrain import main

    run = tmp_path / "teacher_run"  # what dtfast.train_teacher writes: <out>/teacher is the teacher
    shutil.copytree(os.path.join(ROOT, "dtfast", "assets", "teacher_tiny32"), run / "teacher")
    (run / "metrics.jsonl").write_text("")
    assert main([f"out={tmp_path / 'out'}", f"teacher.pretrained={run}", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "is a dtfast.train_teacher run folder" in err and f"teacher.pretrained={run / 'teacher'}" in err
    assert "Traceback" not in err and "raised at" in err and "loading.py" in err
    os.environ["DTFAST_TRACEBACK"] = "1"  # a bug that looks like a user error can still be traced
    try:
        with pytest.raises(ValueError, match="train_teacher run folder"):
            main([f"out={tmp_path / 'out'}", f"teacher.pretrained={run}", *SMALL])
    finally:
        del os.environ["DTFAST_TRACEBACK"]
