"""The trainer's input pipeline: data.backend reaches InputPipeline, raw uint8 batches (dtfast.bench) and pipeline
views give the same step, resume continues the samples exactly, the data-wait share is logged, close() stops it."""

import json
import os

import pytest
import torch
from test_data_backends import smooth_folder

from dtfast.data.dali import dali_available

SMALL = ["data.image_size=32", "data.num_workers=0", "student.width=16", "train.batch_size=2", "train.log_every=1",
         "train.warmup_steps=1", "loss.backend=torch", "teacher.arch=tiny"]


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _trainer(out, root, backend, steps, extra=()):
    from dtfast.train.config import load_config
    from dtfast.train.trainer import Trainer

    cfg = load_config(None, [f"out={out}", f"data.root={root}", f"data.backend={backend}", f"train.max_steps={steps}",
                             "train.save_every=2", *SMALL, *extra])
    return Trainer(cfg)


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=pytest.mark.skipif(
    not dali_available(), reason="NVIDIA DALI is not installed"))])
def test_trainer_backend_resume_and_data_wait(tmp_path, capsys, backend):
    torch.set_num_threads(1)
    root = tmp_path / "images"
    smooth_folder(root, per_class=3)  # 6 images, batch 2 -> 3 steps per epoch: 5 steps cross an epoch boundary
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    trainer = _trainer(full, root, backend, 5)
    try:
        trainer.train()
        assert trainer.data_backend == backend and trainer.pipeline is None  # closed and dropped at the end
    finally:
        trainer.close()
    assert f"data: {backend} backend" in capsys.readouterr().out  # what the pipeline really used
    records = _metrics(full)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert all(0.0 <= r["data_wait_frac"] <= 1.0 for r in records)

    trainer = _trainer(split, root, backend, 5)  # stopped after step 2 as if preempted, then resumed
    original = trainer.optimizer_step

    def stop_after_two(batches, timer=None):
        parts = original(batches, timer)
        if trainer.step == 2:
            trainer._stop_signal = 15
        return parts

    trainer.optimizer_step = stop_after_two
    try:
        trainer.train()
    finally:
        trainer.close()
    trainer = _trainer(split, root, backend, 5)
    try:
        trainer.train()
    finally:
        trainer.close()
    resumed = _metrics(split)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    for a, b in zip(records, resumed):  # same samples, crops and noise after the restart
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a, b)


def test_raw_uint8_batches_and_pipeline_views_give_the_same_step(tmp_path):
    """dtfast.bench passes (uint8 images, labels); the trainer's pipeline passes (teacher view, student view,
    labels): forward_backward takes both and computes the same loss from the same pixels."""
    root = tmp_path / "images"
    smooth_folder(root, per_class=2)
    trainer = _trainer(str(tmp_path / "out"), root, "torch", 1)
    pipeline = trainer.build_pipeline(0)
    try:
        views = next(pipeline)
        raw = next(iter(trainer._build_loader(0)))
        assert raw[0].dtype == torch.uint8 and views[0].is_floating_point()
        trainer._micro_index = 0
        from_raw = trainer.forward_backward(raw)["loss"].item()
        trainer._micro_index = 0
        from_views = trainer.forward_backward(views)["loss"].item()
        assert from_raw == pytest.approx(from_views, rel=1e-6)
        trainer._micro_index = 0
        other = trainer.forward_backward((raw[0].flip(-1), raw[1]))["loss"].item()
        assert other != pytest.approx(from_raw, rel=1e-6)  # the batch matters: the comparison is not vacuous
    finally:
        pipeline.close()
        trainer.close()


def test_a_backend_that_cannot_read_the_data_fails_at_set_up(tmp_path):
    from dtfast.train.config import load_config
    from dtfast.train.trainer import Trainer

    cfg = load_config(None, [f"out={tmp_path}", "data.backend=nvjpeg", "data.num_images=16", *SMALL])
    with pytest.raises(ValueError, match="data.backend=nvjpeg decodes image files"):
        Trainer(cfg)


def test_teacher_fast_path_keys_reach_the_teacher(tmp_path):
    from dtfast.train.config import load_config
    from dtfast.train.trainer import Trainer

    for mode, expected, inference in (("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs", "false"),
                                      ("default", None, "true")):
        cfg = load_config(None, [f"out={tmp_path / mode}", f"teacher.compile_mode={mode}",
                                 f"teacher.inference_mode={inference}", *SMALL])
        trainer = Trainer(cfg)
        try:
            assert trainer.teacher.options.compile_mode == expected
            assert trainer.teacher.options.inference_mode == (inference == "true")
            assert trainer.teacher.options.cuda_graph is False
        finally:
            trainer.close()
    # a CUDA graph needs a GPU: the config says so when the device is cpu, the teacher when auto found none
    from dtfast.train.config import ConfigError

    for engine in ("deepspeed", "ddp"):
        with pytest.raises(ConfigError, match="teacher.cuda_graph"):
            load_config(None, ["teacher.cuda_graph=true", "device=cpu", f"dist.engine={engine}"])
    with pytest.raises(ConfigError, match="reduce-overhead"):
        load_config(None, ["teacher.cuda_graph=true", "teacher.compile=true", "teacher.compile_mode=reduce-overhead"])
    if not torch.cuda.is_available():
        cfg = load_config(None, [f"out={tmp_path / 'graph'}", "teacher.cuda_graph=true", *SMALL])
        with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
            Trainer(cfg)
