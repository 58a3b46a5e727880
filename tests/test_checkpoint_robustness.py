"""Checkpoints at the edges (found by a review that killed and damaged runs): damaged or truncated checkpoints,
a kill while a step is re-saved, a full or unwritable disk, changed optimizer keys on resume, two runs in one
folder. One process, DDP engine on the CPU, a few steps each."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from dtfast.distributed import checkpoint as dist_ckpt
from dtfast.train import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["data.image_size=32", "data.num_images=32", "data.num_workers=0", "student.width=16", "train.batch_size=4",
         "train.log_every=1", "train.warmup_steps=1", "train.lr=3e-3", "loss.backend=torch", "train.save_every=2",
         "train.keep_last=3", "dist.engine=ddp"]


def _trainer(out, steps, extra=()):
    from dtfast.train.config import load_config
    from dtfast.train.trainer import Trainer

    torch.set_num_threads(1)
    return Trainer(load_config(None, [f"out={out}", f"train.max_steps={steps}", *SMALL, *extra]))


def _run(out, steps, extra=()):
    trainer = _trainer(out, steps, extra)
    try:
        trainer.train()
    finally:
        trainer.close()
    return trainer


def _main(out, steps, extra=()):
    from dtfast.pretrain import main

    torch.set_num_threads(1)
    return main([f"out={out}", f"train.max_steps={steps}", *SMALL, *extra])


def test_a_damaged_latest_checkpoint_is_skipped_for_the_one_before(tmp_path, capsys):
    out = str(tmp_path / "run")
    _run(out, 4)  # step_2, step_4
    model = os.path.join(out, "checkpoints", "step_4", "model.safetensors")
    with open(model, "r+b") as fh:  # a partial copy: the file is cut short
        fh.truncate(os.path.getsize(model) // 2)
    with pytest.warns(UserWarning, match="step_4 is skipped: .*model.safetensors is damaged"):
        assert ckpt.read_latest(out, check=dist_ckpt.verify).endswith("step_2")
    capsys.readouterr()
    with pytest.warns(UserWarning, match="step_4 is skipped"):
        assert _main(out, 4) == 0
    assert "resumed from" in capsys.readouterr().out
    assert ckpt.read_latest(out, check=dist_ckpt.verify).endswith("step_4")  # saved again, whole
    # named explicitly, a damaged checkpoint is a one-line error naming the file
    with open(model, "r+b") as fh:
        fh.truncate(100)
    assert _main(out, 4, [f"train.resume={os.path.dirname(model)}"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors is damaged" in err and "Traceback" not in err


def test_damaged_files_that_keep_their_size_are_named(tmp_path, capsys):
    out = str(tmp_path / "run")
    _run(out, 2)
    step = os.path.join(out, "checkpoints", "step_2")
    with open(os.path.join(step, "optimizer.pt"), "r+b") as fh:  # same size, garbage inside
        fh.write(b"\0" * 64)
    assert _main(out, 4) == 2
    err = capsys.readouterr().err
    assert "optimizer.pt cannot be read" in err and "move the folder aside" in err
    with open(os.path.join(step, "meta.json"), "w") as fh:
        fh.write("")
    with pytest.raises(dist_ckpt.CheckpointError, match="meta.json is damaged"):
        dist_ckpt.read_meta(step)


def test_meta_step_must_match_the_folder_and_latest_stays_inside(tmp_path, capsys):
    out = str(tmp_path / "run")
    _run(out, 2)
    step = os.path.join(out, "checkpoints", "step_2")
    with open(os.path.join(step, "meta.json")) as fh:
        meta = json.load(fh)
    with open(os.path.join(step, "meta.json"), "w") as fh:
        json.dump({**meta, "step": 1, "files": None}, fh)
    assert _main(out, 4) == 2
    assert "meta.json says step 1, the folder name step 2" in capsys.readouterr().err
    elsewhere = tmp_path / "elsewhere" / "checkpoints" / "step_9"
    elsewhere.mkdir(parents=True)
    (elsewhere / "meta.json").write_text(json.dumps({"step": 9}))
    with open(os.path.join(out, "checkpoints", "latest"), "w") as fh:
        fh.write("../../elsewhere/checkpoints/step_9\n")
    assert ckpt.read_latest(out) == step  # not followed outside checkpoints/: the newest folder inside


def test_a_kill_while_a_step_is_resaved_keeps_its_copy(tmp_path):
    # _commit moves an existing step_N aside before renaming the new one in: a kill between the two renames left
    # `latest` naming nothing, the run restarted from step 0 and its first save deleted both copies
    out = str(tmp_path / "run")
    _run(out, 2, ["train.keep_last=1"])
    root = os.path.join(out, "checkpoints")
    os.replace(os.path.join(root, "step_2"), os.path.join(root, ".tmp_replaced_step_2"))  # the kill window
    assert ckpt.read_latest(out, check=dist_ckpt.verify) == os.path.join(root, ".tmp_replaced_step_2")
    trainer = _run(out, 4, ["train.keep_last=1"])
    assert trainer._resumed_from.endswith(".tmp_replaced_step_2") and trainer.step == 4
    assert sorted(os.listdir(root)) == ["latest", "step_4"]


def test_a_run_resumed_at_its_end_does_not_save_its_checkpoint_again(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    _run(out, 3)  # steps 2 (periodic) and 3 (final, 3 % save_every != 0)
    saves = []
    monkeypatch.setattr(dist_ckpt, "save", lambda *a, **k: saves.append(a[2]))
    os.remove(os.path.join(out, "backbone.safetensors"))  # as if killed during the export
    trainer = _run(out, 3)
    assert trainer.step == 3 and saves == []
    assert os.path.isfile(os.path.join(out, "backbone.safetensors"))


def test_resume_applies_changed_weight_decay_and_betas_and_warns(tmp_path, caplog):
    out = str(tmp_path / "run")
    _run(out, 2)
    trainer = _trainer(out, 4, ["train.weight_decay=0.5", "train.betas=[0.8,0.99]", "teacher.timestep=40"])
    try:
        with caplog.at_level(logging.WARNING, logger="dtfast.train"):
            trainer.maybe_resume()
        groups = trainer.engine.optimizer.param_groups
        assert groups[0]["weight_decay"] == 0.5 and groups[1]["weight_decay"] == 0.0
        assert all(tuple(g["betas"]) == (0.8, 0.99) for g in groups)
        assert "changed objective or schedule" in caplog.text
        for key in ("train.weight_decay", "train.betas", "teacher.timestep"):
            assert key in caplog.text
    finally:
        trainer.close()


def test_a_failed_write_leaves_no_partial_folder_and_says_why(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    _run(out, 2)
    real_save = torch.save

    def full_disk(obj, path, *a, **k):
        if "optimizer" in str(path):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 26974912 vs 26974800")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    os.remove(os.path.join(out, "backbone.safetensors"))
    # the final save (step 3) fails: the error names the folder and the free space, the backbone is exported anyway
    assert _main(out, 3) == 2
    err = capsys.readouterr().err
    assert ".tmp_step_3: writing failed" in err and "GiB free" in err and "previous checkpoint is kept" in err
    assert os.path.isfile(os.path.join(out, "backbone.safetensors"))
    root = os.path.join(out, "checkpoints")
    assert sorted(os.listdir(root)) == ["latest", "step_2"]
    monkeypatch.setattr(torch, "save", real_save)
    os.makedirs(os.path.join(root, ".tmp_step_7", "junk"))  # a killed write's leftovers go at start-up
    trainer = _trainer(out, 2)
    try:
        trainer.train()
    finally:
        trainer.close()
    assert not os.path.exists(os.path.join(root, ".tmp_step_7"))


def test_an_unwritable_checkpoint_folder_is_found_before_training(tmp_path, capsys, monkeypatch):
    from dtfast.train.trainer import Trainer

    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("not a folder")
    monkeypatch.setattr(Trainer, "optimizer_step", lambda *a, **k: pytest.fail("trained before the check"))
    assert _main(str(out), 2) == 2
    assert "checkpoint folder" in capsys.readouterr().err


def test_a_second_run_in_the_same_folder_is_refused(tmp_path):
    from dtfast.train.lifecycle import _lock, _unlock

    out = tmp_path / "run"
    out.mkdir()
    lock = str(out / ".lock")
    assert _lock(lock) is None  # this process plays the running job
    try:
        env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, "-m", "dtfast.pretrain", f"out={out}", "train.max_steps=1", *SMALL],
                              env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "in use by a running job" in proc.stderr and f"pid {os.getpid()}" in proc.stderr
        assert not (out / "metrics.jsonl").exists()
    finally:
        _unlock(lock)
    trainer = _run(str(out), 1)  # free again; and a second trainer of one process may take it after the first
    assert trainer.step == 1
    shutil.rmtree(out / "checkpoints")


def test_a_filesystem_without_locks_warns_and_runs(tmp_path, monkeypatch):
    import errno
    import fcntl

    from dtfast.train.lifecycle import _LOCKS, _lock

    def no_locks(*a, **k):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    with pytest.warns(UserWarning, match="no POSIX locks"):
        assert _lock(str(tmp_path / ".lock")) is None
    assert not _LOCKS


def test_two_trainers_of_one_process_share_the_lock(tmp_path):
    from dtfast.train.lifecycle import _LOCKS, _lock

    out = str(tmp_path / "run")
    os.makedirs(out)
    first, second = _trainer(out, 1), _trainer(out, 1)
    try:
        first.lock_out_folder()
        second.lock_out_folder()
        first.close()  # the second still holds it: another process is kept out
        assert os.path.abspath(os.path.join(out, ".lock")) in _LOCKS
    finally:
        second.close()
    assert not _LOCKS and _lock(os.path.join(out, ".lock")) is None
    from dtfast.train.lifecycle import _unlock

    _unlock(os.path.join(out, ".lock"))


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path, capsys):
    out = str(tmp_path / "run")
    _run(out, 4)
    for step in (2, 4):
        model = os.path.join(out, "checkpoints", f"step_{step}", "model.safetensors")
        with open(model, "r+b") as fh:
            fh.truncate(os.path.getsize(model) - 10)
    with pytest.warns(UserWarning, match="is skipped"):
        assert _main(out, 6) == 2
    err = capsys.readouterr().err
    assert "every checkpoint" in err and "is damaged" in err and "train.resume=never" in err
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["latest", "step_2", "step_4"]


@pytest.mark.multiproc
def test_a_write_failing_on_one_rank_stops_every_rank_together(tmp_path):
    # rank 1's failed write used to leave rank 0 on the success path, waiting in a collective rank 1 never joined
    script = tmp_path / "fail_rank1.py"
    script.write_text(
        "import os, sys, torch\n"
        "real = torch.save\n"
        "def save(obj, path, *a, **k):\n"
        "    if os.environ.get('RANK') == '1' and str(path).endswith('rank_1.pt') and 'step_3' in str(path):\n"
        "        raise OSError(28, 'No space left on device')\n"
        "    return real(obj, path, *a, **k)\n"
        "torch.save = save\n"
        "from dtfast.pretrain import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), f"out={out}", "train.max_steps=3", *SMALL],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert text.count(".tmp_step_3: writing failed") >= 2, text[-4000:]  # both ranks say why, neither hangs
    assert os.path.isfile(out / "backbone.safetensors")  # exported all the same
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step_2"]
