"""Exact resume under DeepSpeed (2 processes, gloo): 2N steps == N steps + resume to 2N; incompatible checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 32 images / (2 per rank x 2 ranks x 2 micro-batches) = 4 steps per epoch: the run crosses an epoch boundary
RUN = ["data.image_size=32", "data.num_images=32", "data.num_workers=0", "student.width=16", "train.batch_size=2",
       "train.grad_accum=2", "train.grad_clip=1.0", "train.warmup_steps=2", "train.lr=3e-3", "train.log_every=1",
       "loss.backend=torch", "dist.engine=deepspeed", "dist.zero_stage=2"]


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
                DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")


def pretrain(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dtfast.pretrain", *args]
    proc = subprocess.run(cmd, check=False, env=env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return proc


def metrics(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


@pytest.mark.multiproc
def test_deepspeed_resume_continues_exactly(tmp_path):
    from safetensors.torch import load_file

    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    pretrain([f"out={full}", "train.max_steps=6", "train.save_every=3", "train.keep_last=3", *RUN])
    # "N steps": the full run's own step-3 checkpoint, copied into a fresh run folder with the metrics up to it
    os.makedirs(os.path.join(split, "checkpoints"))
    shutil.copytree(os.path.join(full, "checkpoints", "step_3"), os.path.join(split, "checkpoints", "step_3"))
    with open(os.path.join(split, "checkpoints", "latest"), "w") as fh:
        fh.write("step_3\n")
    with open(os.path.join(split, "metrics.jsonl"), "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in metrics(full) if r["step"] <= 3)
    proc = pretrain([f"out={split}", "train.max_steps=6", "train.save_every=3", "train.resume=auto", *RUN])
    assert "resumed from" in proc.stdout and "at step 3" in proc.stdout, proc.stdout[-2000:]

    a, b = metrics(full), metrics(split)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):  # same model, optimizer, LR, data position, noise: the same numbers
        for key in ("loss", "mse", "at", "lr", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-7), (key, ra, rb)
    wa = load_file(os.path.join(full, "backbone.safetensors"))
    wb = load_file(os.path.join(split, "backbone.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert (wa[key].double() - wb[key].double()).abs().max() <= 1e-6, key


class _Engine:
    name = "deepspeed"
    zero_stage = 2


def test_incompatible_checkpoint_names_the_keys(tmp_path):
    from dtfast.distributed import checkpoint as dist_ckpt
    from dtfast.train.config import PretrainConfig, to_dict
    from dtfast.train.trainer import RESUME_KEYS

    saved, current = PretrainConfig(), PretrainConfig()
    current.student.width, current.teacher.arch = 128, "adm256"
    meta = {"step": 5, "engine": "deepspeed", "zero_stage": 1, "world_size": 4, "config": to_dict(saved)}
    with pytest.raises(ValueError) as info:
        dist_ckpt.check_compatible(str(tmp_path), meta, to_dict(current), RESUME_KEYS, _Engine(), world_size=2)
    message = str(info.value)
    for part in ("student.width", "teacher.arch", "dist.zero_stage", "world size", str(tmp_path)):
        assert part in message, message
    assert "student.arch" not in message  # equal keys are not reported
    meta.update(engine="ddp", zero_stage=None, world_size=2)
    with pytest.raises(ValueError, match="dist.engine: checkpoint has 'ddp'"):
        dist_ckpt.check_compatible(str(tmp_path), meta, to_dict(saved), RESUME_KEYS, _Engine(), world_size=2)


def test_incomplete_checkpoint_is_reported(tmp_path):
    from dtfast.distributed import checkpoint as dist_ckpt

    (tmp_path / "step_3").mkdir()
    with pytest.raises(FileNotFoundError, match="meta.json"):
        dist_ckpt.read_meta(str(tmp_path / "step_3"))


def test_rng_state_round_trip_is_weights_only_loadable(tmp_path):
    import random

    import numpy as np
    import torch

    from dtfast.distributed import checkpoint as dist_ckpt
    from dtfast.distributed.safe_load import safe_torch_load

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.normal()  # a cached gaussian in numpy's state
    state = dist_ckpt.rng_state(torch.device("cpu"))
    torch.save(state, tmp_path / "rank_0.pt")
    expected = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    dist_ckpt.set_rng_state(safe_torch_load(str(tmp_path / "rank_0.pt")), torch.device("cpu"))
    got = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1])
    assert expected[2] == got[2] and expected[3] == got[3]
