import os

import pytest
import torch

from dtfast.train import checkpoint as ckpt
from dtfast.train.optim import lr_at


def _save(out, step, keep_last=2):
    model = {"w": torch.full((3,), float(step))}
    state = {"step": step, "rng": torch.get_rng_state()}
    return ckpt.save_checkpoint(str(out), step, model, state, {"config": {"a": 1}}, keep_last=keep_last)


def test_save_load_latest_and_prune(tmp_path):
    for step in (10, 20, 30):
        _save(tmp_path, step)
    latest = ckpt.read_latest(str(tmp_path))
    assert latest.endswith("step_30")
    model, state, meta = ckpt.load_checkpoint(latest)
    assert torch.equal(model["w"], torch.full((3,), 30.0)) and state["step"] == 30 and meta["step"] == 30
    names = sorted(os.listdir(ckpt.checkpoint_dir(str(tmp_path))))
    assert names == ["latest", "step_20", "step_30"]


def test_interrupted_write_keeps_previous(tmp_path, monkeypatch):
    _save(tmp_path, 10)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 20)
    monkeypatch.undo()
    assert ckpt.read_latest(str(tmp_path)).endswith("step_10")
    assert not os.path.exists(os.path.join(ckpt.checkpoint_dir(str(tmp_path)), "step_20"))


def test_missing_pointer_falls_back_and_incomplete_is_named(tmp_path):
    _save(tmp_path, 5)
    os.remove(os.path.join(ckpt.checkpoint_dir(str(tmp_path)), "latest"))
    path = ckpt.read_latest(str(tmp_path))
    assert path.endswith("step_5")
    os.remove(os.path.join(path, "state.pt"))
    with pytest.raises(FileNotFoundError, match="state.pt"):
        ckpt.load_checkpoint(path)


def test_compare_configs_names_keys():
    diffs = ckpt.compare_configs({"student": {"arch": "resnet50"}}, {"student": {"arch": "resnet18"}},
                                 ["student.arch"])
    assert diffs == ["student.arch: checkpoint has 'resnet50', this run has 'resnet18'"]
    # a key an older checkpoint lacks: its default (the old behaviour) if defaults are given, else not compared
    old, new = {"data": {"image_size": 32}}, {"data": {"image_size": 32, "image_width": 64}}
    keys = ["data.image_size", "data.image_width"]
    assert ckpt.compare_configs(old, new, keys) == []
    assert ckpt.compare_configs(old, new, keys, {"data": {"image_size": 32, "image_width": 0}}) == [
        "data.image_width: checkpoint has 0, this run has 64"]
    assert ckpt.compare_configs(old, {"data": {"image_size": 32, "image_width": 0}}, keys,
                                {"data": {"image_width": 0}}) == []


def test_lr_schedule_warmup_and_cosine():
    kw = dict(peak=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)
    assert lr_at(110, **kw) == pytest.approx(0.1)
    values = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_usual_permissions(tmp_path, umask):
    # the atomic writes go through temporary files (0600) and folders (0700): once in place they must have what a
    # plain open()/mkdir() gives under the umask, or exported weights are unreadable to the rest of a group
    old = os.umask(umask)
    try:
        ckpt.atomic_write_text(str(tmp_path / "config.yaml"), "a: 1\n")
        ckpt.save_safetensors_atomic({"w": torch.zeros(2)}, str(tmp_path / "backbone.safetensors"))
        folder = _save(tmp_path / "run", 5)
    finally:
        os.umask(old)
    for name in ("config.yaml", "backbone.safetensors"):
        assert oct(os.stat(tmp_path / name).st_mode & 0o777) == oct(0o666 & ~umask), name
    assert oct(os.stat(folder).st_mode & 0o777) == oct(0o777 & ~umask)
    assert oct(os.stat(os.path.join(folder, "model.safetensors")).st_mode & 0o777) == oct(0o666 & ~umask)
    latest = os.path.join(ckpt.checkpoint_dir(str(tmp_path / "run")), ckpt.LATEST)
    assert oct(os.stat(latest).st_mode & 0o777) == oct(0o666 & ~umask)


def test_truncate_metrics_drops_a_line_cut_short(tmp_path):
    # a crash (node failure, disk full) can leave half a line at the end: resume must not stop on it
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    ckpt.truncate_metrics(str(path), 2)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    path.write_text('{"step": 1}\n{"step": 2}')  # complete records, the last without its newline
    ckpt.truncate_metrics(str(path), 5)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_set_aside_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert ckpt.set_aside_metrics(str(path)) is None
    path.write_text("")
    assert ckpt.set_aside_metrics(str(path)) is None and path.exists()
    for n in (1, 2):
        path.write_text(f'{{"step": {n}}}\n')
        assert ckpt.set_aside_metrics(str(path)) == str(tmp_path / f"metrics.{n}.jsonl")
        assert not path.exists()
    assert (tmp_path / "metrics.2.jsonl").read_text() == '{"step": 2}\n'
