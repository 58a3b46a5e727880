"""The DeepSpeed JSON generated from the dtfast config, user overrides, the dist.* validation, and safe loading."""

from __future__ import annotations

import json
import os

import pytest
import torch

from dtfast.distributed.ds_config import DeepSpeedConfigError, build_ds_config, merge_user_config, teacher_ds_config
from dtfast.train.config import ConfigError, load_config


def _cfg(*overrides):
    return load_config(None, list(overrides))


def test_generated_config_follows_the_dtfast_config():
    cfg = _cfg("train.batch_size=8", "train.grad_accum=3", "train.grad_clip=1.5", "dist.zero_stage=2")
    ds = build_ds_config(cfg, world_size=4, device_type="cuda")
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 8 * 3 * 4 and ds["gradient_clipping"] == 1.5
    assert ds["zero_optimization"]["stage"] == 2
    assert "optimizer" not in ds and "scheduler" not in ds  # dtfast owns both
    # bf16 on GPU: autocast by default (fp32 weights), DeepSpeed's bf16 weights on request
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and not ds["bf16"]["enabled"]
    params = build_ds_config(_cfg("dist.bf16_mode=params"), world_size=1, device_type="cuda")
    assert params["bf16"]["enabled"] and "torch_autocast" not in params
    cpu = build_ds_config(cfg, world_size=2, device_type="cpu")  # CPU runs stay fp32
    assert not cpu["bf16"]["enabled"] and "torch_autocast" not in cpu
    off = build_ds_config(_cfg("train.bf16=false"), world_size=1, device_type="cuda")
    assert not off["bf16"]["enabled"] and "torch_autocast" not in off


def test_user_file_merges_and_conflicts_name_the_keys(tmp_path):
    cfg = _cfg("train.batch_size=8", "dist.zero_stage=1")
    generated = build_ds_config(cfg, world_size=2, device_type="cuda")
    merged = merge_user_config(generated, {"zero_optimization": {"reduce_bucket_size": 123}, "train_batch_size": "auto",
                                           "gradient_accumulation_steps": 1})
    assert merged["zero_optimization"] == {**generated["zero_optimization"], "reduce_bucket_size": 123}
    assert merged["train_batch_size"] == 16
    with pytest.raises(DeepSpeedConfigError) as info:
        merge_user_config(generated, {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3}})
    assert "train_micro_batch_size_per_gpu" in str(info.value) and "zero_optimization.stage" in str(info.value)
    with pytest.raises(DeepSpeedConfigError, match="optimizer"):
        merge_user_config(generated, {"optimizer": {"type": "Adam"}})
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"overlap_comm": False}}))
    ds = build_ds_config(_cfg("dist.zero_stage=1", f"dist.deepspeed_config={path}"), 2, "cuda")
    assert ds["zero_optimization"]["overlap_comm"] is False and ds["zero_optimization"]["stage"] == 1
    path.write_text("{not json")
    with pytest.raises(DeepSpeedConfigError, match="not valid JSON"):
        build_ds_config(_cfg(f"dist.deepspeed_config={path}"), 2, "cuda")


def test_teacher_config_is_stage_3_without_optimizer():
    ds = teacher_ds_config(world_size=8, dtype="bf16")
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert "optimizer" not in ds
    with pytest.raises(DeepSpeedConfigError, match="int8"):
        teacher_ds_config(2, "int8")


@pytest.mark.parametrize(("overrides", "keys"), [
    (["dist.zero_stage=4"], ["dist.zero_stage"]),
    (["dist.engine=ddp", "teacher.shard=true"], ["teacher.shard", "dist.engine"]),
    (["train.optimizer=lamb", "dist.zero_stage=1"], ["train.optimizer", "dist.zero_stage"]),
    (["train.optimizer=lamb", "dist.bf16_mode=params"], ["train.optimizer", "dist.bf16_mode"]),
    (["dist.deepspeed_config=/no/such/file.json"], ["dist.deepspeed_config"]),
    (["dist.bf16_mode=fp8"], ["dist.bf16_mode"]),
])
def test_invalid_dist_settings_name_the_keys(overrides, keys):
    with pytest.raises(ConfigError) as info:
        _cfg(*overrides)
    for key in keys:
        assert key in str(info.value), str(info.value)


def test_valid_combinations_load():
    assert _cfg("train.optimizer=lamb", "dist.zero_stage=0").dist.zero_stage == 0
    assert _cfg("teacher.shard=true", "dist.zero_stage=3").teacher.shard
    assert _cfg("dist.engine=ddp").dist.engine == "ddp"
    assert _cfg().dist.engine == "deepspeed"


class _NotData:
    def __reduce__(self):  # what a crafted checkpoint does: call something on load
        return (print, ("code ran while loading",))


def test_safe_load_refuses_objects_and_accepts_deepspeed_records(tmp_path):
    from dtfast.distributed.safe_load import allowed_globals, safe_torch_load

    path = tmp_path / "evil.pt"
    torch.save({"module": {"w": torch.ones(2)}, "x": _NotData()}, path)
    with pytest.raises(RuntimeError, match="refusing to load"):
        safe_torch_load(str(path))
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    assert {LossScaler, ZeroStageEnum} <= set(allowed_globals())
    path = tmp_path / "ok.pt"
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients},
                "param_shapes": [{"w": torch.Size([2, 3])}]}, path)
    loaded = safe_torch_load(str(path))
    assert loaded["optimizer_state_dict"]["zero_stage"] == ZeroStageEnum.gradients
    assert loaded["param_shapes"][0]["w"] == torch.Size([2, 3])


def _shared_folder_worker(rank: int, folders: list[str], port: int, results) -> None:
    import torch.distributed as dist

    from dtfast.train.distributed import DistInfo, check_shared_folder

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    info = DistInfo(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
    try:
        check_shared_folder(folders[rank], info, timeout_s=1.0)
        results.put((rank, "ok"))
    except RuntimeError as error:
        results.put((rank, str(error)))
    finally:
        dist.destroy_process_group()


@pytest.mark.multiproc
@pytest.mark.parametrize("shared", [True, False])
def test_out_must_be_shared_by_every_rank(tmp_path, shared):
    # rank 1 looking at another folder is what a node without the shared filesystem sees
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    folders = [str(tmp_path / "run"), str(tmp_path / ("run" if shared else "elsewhere"))]
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_shared_folder_worker, args=(r, folders, port, results)) for r in (0, 1)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(120)
    outcome = dict(results.get(timeout=10) for _ in range(2))
    if shared:
        assert outcome == {0: "ok", 1: "ok"}
        assert os.listdir(tmp_path / "run") == []  # the marker is removed
    else:
        assert "cannot see a file rank 0 wrote there" in outcome[0] and "another node" in outcome[0]
        assert "this rank (1, on" in outcome[1]
