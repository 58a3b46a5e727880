"""dtfast.bench: a real (short) CPU run of the tiny preset, row parsing, and FLOP counts checked independently."""

import json
import os
import time

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
pytest.importorskip("timm")

from dtfast.bench import flops as bench_flops
from dtfast.bench.core import run_benchmark
from dtfast.bench.rows import SWITCHES, parse_row, split_overrides, sweep_rows
from dtfast.bench.runner import summarize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """baseline + optimized rows of the tiny preset, 2 warm-up + 2 timed steps each, in one process."""
    out = tmp_path_factory.mktemp("bench")
    results = out / "results"
    results.mkdir()
    import signal

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared CPU: one thread per process avoids OpenMP oversubscription stalls
    handlers = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    try:
        result = run_benchmark(TINY, ["bench.warmup=2", "bench.steps=2", "bench.rows=[baseline,optimized]",
                                      "train.batch_size=4", "data.num_images=64", f"bench.results_dir={results}",
                                      "dist.engine=ddp",
                                      "bench.peak_tflops=0"], out=str(out / "run"))
    finally:
        torch.set_num_threads(threads)
    # the Trainer's "checkpoint and stop" signal handlers must not outlive its construction in a benchmark
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
    return result, out, results


def test_tiny_run_writes_table_json_png_and_record(tiny_run):
    _, out, results = tiny_run
    for ext in ("json", "md", "png"):
        path = out / "run" / f"bench.{ext}"
        assert path.is_file() and path.stat().st_size > 0, path
    assert (out / "run" / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "run" / "bench.json").read_text())
    assert [r["row"] for r in saved["rows"]] == ["baseline", "optimized"]
    table = (out / "run" / "bench.md").read_text()
    assert "| baseline | 4 |" in table and "| optimized | 4 |" in table and "teacher ms" in table
    lines = (results / "bench_results.jsonl").read_text().splitlines()
    assert [json.loads(line)["row"] for line in lines] == ["baseline", "optimized"]
    assert list(results.glob("bench_cpu-*_tiny.md")) and list(results.glob("bench_cpu-*_tiny.png"))


def test_tiny_run_numbers_are_positive_and_consistent(tiny_run):
    result = tiny_run[0]
    flops = result["flops"]
    assert flops["teacher_full"] > flops["teacher_early_exit"] > 0 and flops["student_train"] > 0
    assert result["meta"]["peak"]["source"] == "measured" and result["meta"]["peak"]["tflops"] > 0
    for row in result["rows"]:
        assert row["status"] == "ok", row.get("error")
        times = row["step_times_s"]
        assert len(times) == 2 and all(t > 0 for t in times)
        assert row["images_per_step"] == 4
        assert row["images_per_s"] == pytest.approx(4 * 2 / sum(times), rel=1e-9)
        assert row["step_time_s"]["min"] <= row["step_time_s"]["median"] <= row["step_time_s"]["max"]
        stages = row["stage_s_per_step"]
        assert all(v >= 0 for v in stages.values())
        for name in ("teacher", "student", "loss", "backward", "optimizer"):
            assert stages[name] > 0, name
        assert sum(stages.values()) == pytest.approx(row["step_time_s"]["mean"], rel=0.05)
        executed = flops["teacher_early_exit" if row["early_exit"] else "teacher_full"] + flops["student_train"]
        assert row["flops_per_image"] == executed
        assert row["achieved_tflops"] == pytest.approx(executed * row["images_per_s"] / 1e12)
        model = flops["teacher_early_exit"] + flops["student_train"]
        assert row["model_flops_per_image"] == model
        assert row["mfu"] == pytest.approx(model * row["images_per_s"] / 1e12 / result["meta"]["peak"]["tflops"])
        assert row["peak_memory_gb"] > 0 and row["loss"] > 0
    baseline, optimized = result["rows"]
    assert baseline["early_exit"] is False and optimized["early_exit"] is True
    assert baseline["speedup_vs_baseline"] == 1.0
    assert optimized["speedup_vs_baseline"] == pytest.approx(optimized["images_per_s"] / baseline["images_per_s"])


def test_rows_parse_to_switches_and_overrides():
    base_cpu = parse_row("baseline", "cpu")
    assert base_cpu.switches == {name: False for name in SWITCHES}
    assert base_cpu.overrides["loss.backend"] == "torch" and base_cpu.overrides["teacher.dtype"] == "fp32"
    assert parse_row("baseline", "cuda").switches["bf16"] is True  # the GPU baseline uses bf16 autocast
    assert parse_row("baseline", "cuda").overrides["train.cudnn_benchmark"] is False
    assert parse_row("optimized", "cuda").overrides["train.cudnn_benchmark"] is True
    assert "optimized-cudnn_benchmark" in sweep_rows("cuda") and "optimized-cudnn_benchmark" not in sweep_rows("cpu")
    opt = parse_row("optimized-compile+channels_last", "cuda")
    assert opt.switches["compile"] is False and opt.switches["channels_last"] is True and opt.early_exit is True
    config_items, options = split_overrides(parse_row("baseline+early_exit", "cpu").overrides)
    assert options == {"early_exit": True} and "train.compile=false" in config_items
    assert parse_row("config", "cpu").overrides == {}
    assert parse_row("config-early_exit", "cpu").overrides == {"teacher.early_exit": False}
    assert sweep_rows("cuda")[:2] == ["baseline", "optimized"] and "optimized-compile" in sweep_rows("cuda")
    assert "optimized-data_backend" not in sweep_rows("cpu") and "optimized-data_backend" in sweep_rows("cpu", "real")
    for bad in ("fastest", "optimized+warp_drive", "baseline compile"):
        with pytest.raises(ValueError, match="bench row"):
            parse_row(bad, "cpu")


@pytest.mark.parametrize("preset", ["imagenet_r50_adm256", "imagenet_convnextb_adm256"])
def test_imagenet_presets_fit(preset):
    """The preset's student regresses exactly the ADM-256 teacher's maps at 256x256 (built without weights)."""
    from dtfast.students import build_student
    from dtfast.teachers import build_teacher
    from dtfast.train.config import load_config

    cfg = load_config(os.path.join(ROOT, "configs", f"{preset}.yaml"))
    assert (cfg.teacher.arch, cfg.data.image_size, cfg.teacher.timestep, cfg.train.optimizer) == ("adm256", 256, 150,
                                                                                                  "lamb")
    teacher = build_teacher(arch=cfg.teacher.arch, strides=tuple(cfg.teacher.strides), device="meta", compile=False)
    assert teacher.feature_shapes(256, 256) == [(512, 64, 64), (512, 32, 32), (1024, 16, 16), (1024, 8, 8)]
    student = build_student(cfg.student.arch, teacher.channels, strides=tuple(cfg.teacher.strides),
                            width=cfg.student.width)
    assert student.feature_shapes(256, 256) == teacher.feature_shapes(256, 256)


def test_summarize_quantiles():
    stats = summarize([0.3, 0.1, 0.2, 0.4])
    assert stats["median"] == pytest.approx(0.25) and stats["min"] == 0.1 and stats["max"] == 0.4
    assert stats["p10"] == pytest.approx(0.13) and stats["total"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------- FLOP counts
def _manual_flops(model: nn.Module, run) -> int:
    """Independent count: 2*MACs of every Conv2d / Linear call and 2 * (QK^T + AV) of every attention call."""
    from diffusers.models.attention_processor import Attention

    total = [0]

    def conv_hook(module, inputs, output):
        kh, kw = module.kernel_size
        total[0] += 2 * output.numel() * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module, inputs, output):
        total[0] += 2 * output.numel() * module.in_features

    def attention_hook(module, inputs, output):
        hidden = inputs[0]
        tokens = hidden.shape[2] * hidden.shape[3] if hidden.dim() == 4 else hidden.shape[1]
        total[0] += 2 * 2 * hidden.shape[0] * tokens * tokens * module.inner_dim

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
        elif isinstance(module, Attention):
            handles.append(module.register_forward_hook(attention_hook))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return total[0]


@pytest.fixture(scope="module")
def adm256_counts():
    """flop_counter (the benchmark's count) and the independent hook count, early exit on and off, at 256x256."""
    from dtfast.teachers import build_teacher
    from dtfast.train.config import load_config

    cfg = load_config(os.path.join(ROOT, "configs", "imagenet_r50_adm256.yaml"))
    counts = {}
    for early_exit in (True, False):
        counted = bench_flops.teacher_forward_flops(cfg, 256, early_exit=early_exit)
        teacher = build_teacher(arch="adm256", timestep=150, strides=(4, 8, 16, 32), device="meta",
                                dtype=torch.float32, compile=False, early_exit=early_exit)
        images = torch.zeros(1, 3, 256, 256, device="meta")
        counts[early_exit] = (counted, _manual_flops(teacher, lambda t=teacher, x=images: t(x)))
    return counts


def test_adm256_teacher_flops_match_an_independent_count(adm256_counts):
    for early_exit, (counted, manual) in adm256_counts.items():
        assert counted == manual, early_exit
    # DESIGN.md section 6 quotes ~0.91 / ~2.18 TFLOP; the exact figure depends on the diffusers version's blocks
    assert 0.8e12 < adm256_counts[True][0] < 1.1e12
    assert 2.0e12 < adm256_counts[False][0] < 2.4e12
    assert adm256_counts[False][0] >= 2 * adm256_counts[True][0]  # early exit: >= 2x fewer teacher FLOPs


def test_student_train_flops_are_forward_plus_both_gradients():
    """Backward of a conv net = grad_input + grad_weight = 2x forward per conv, minus the stem's grad_input."""
    from dtfast.students import build_student

    student = build_student("resnet18", (24, 40, 56, 72), width=32)
    forward = _manual_flops(student, lambda: student.eval()(torch.zeros(1, 3, 64, 64)))
    stem = student.backbone.conv1
    stem_flops = 2 * (64 // 2) ** 2 * stem.out_channels * stem.in_channels * stem.kernel_size[0] * stem.kernel_size[1]
    counted = bench_flops.student_train_flops(student.train(), 64)
    assert counted == 3 * forward - stem_flops
    assert student.training


# ---------------------------------------------------------------------------------------------------- GPU check
def test_record_gpu_results_appends_once_and_keeps_local_files(tiny_run, tmp_path):
    import importlib.util
    import shutil
    import tarfile

    spec = importlib.util.spec_from_file_location("record_gpu_results",
                                                  os.path.join(ROOT, "benchmarks", "record_gpu_results.py"))
    recorder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recorder)

    _, out, _ = tiny_run
    fetched, results = tmp_path / "fetched", tmp_path / "results"
    fetched.mkdir()
    results.mkdir()
    shutil.copyfile(out / "run" / "bench.json", fetched / "bench_r50.json")
    (fetched / "gpu_info.json").write_text(json.dumps({"card": "NVIDIA H100 80GB HBM3", "torch": "2.11",
                                                                "timm": "1.0.31", "nvidia-dali-cuda130": None}))
    (fetched / "summary.txt").write_text("stage  status\nloss_bench ok\n")
    remote = tmp_path / "remote" / "benchmarks" / "results"
    remote.mkdir(parents=True)
    (remote / "loss_bench.jsonl").write_text('{"a": 1}\n{"a": 2}\n')
    (remote / "loss_bench.md").write_text("remote table\n")
    (remote / "teacher_bench.md").write_text("new table\n")
    with tarfile.open(fetched / "results.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "remote" / "benchmarks", arcname="benchmarks")
    (results / "loss_bench.jsonl").write_text('{"a": 1, "gpu_check_card": "NVIDIA H100 80GB HBM3"}\n')
    (results / "loss_bench.md").write_text("local table\n")

    for _ in range(2):  # recording twice must not duplicate anything
        assert recorder.main([str(fetched), "--results", str(results)]) == 0
    rows = [json.loads(line) for line in (results / "bench_results.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rows] == ["baseline", "optimized"]
    lines = [json.loads(line) for line in (results / "loss_bench.jsonl").read_text().splitlines()]
    assert lines == [{"a": 1, "gpu_check_card": "NVIDIA H100 80GB HBM3"},
                     {"a": 2, "gpu_check_card": "NVIDIA H100 80GB HBM3"}]
    assert (results / "loss_bench.md").read_text() == "local table\n"
    assert (results / "gpu_nvidia-h100-80gb-hbm3" / "loss_bench.md").read_text() == "remote table\n"
    assert (results / "teacher_bench.md").read_text() == "new table\n"
    check_md = (results / "bench_gpu_check_nvidia-h100-80gb-hbm3.md").read_text()
    assert "loss_bench ok" in check_md and "torch 2.11" in check_md
    assert ", timm 1.0.31" in check_md and "dali" not in check_md  # versions found, nothing for a missing package


def test_gpu_check_script_survives_missing_pieces(tmp_path):
    """With every stage skipped (or missing) the script still exits 0 and prints the stage table last."""
    import subprocess
    import sys

    stages = "wheels build_ext cuda_tests_ops loss_bench dtfast_bench teacher_bench cuda_tests_rest data_bench op_tests"
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_BUDGET": "120", "SKIP_STAGES": stages,
           "PYTHON": sys.executable}
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()
    assert last[-1].split()[0] == "op_tests" and any(line.startswith("dtfast_bench") for line in last)
    assert {p.name for p in tmp_path.iterdir()} >= {"summary.txt", "gpu_info.json", "logs.tar.gz", "results.tar.gz"}
    assert json.loads((tmp_path / "gpu_info.json").read_text())["card"]


def test_a_failing_row_is_recorded_and_the_others_still_run(tmp_path):
    """loss.backend=cuda cannot run on CPU: the `config` row fails with that error, `baseline` (torch loss) runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_benchmark(TINY, ["bench.warmup=1", "bench.steps=1", "bench.rows=[config,baseline]",
                                      "train.batch_size=2", "data.num_images=16", "loss.backend=cuda",
                                      "dist.engine=ddp",
                                      "bench.results_dir=", "bench.peak_tflops=1.0"], out=str(tmp_path))
    finally:
        torch.set_num_threads(threads)
    config_row, baseline = result["rows"]
    assert config_row["status"] == "failed" and "cuda" in config_row["error"].lower()
    assert baseline["status"] == "ok" and baseline["images_per_s"] > 0
    assert result["meta"]["peak"] == {"tflops": 1.0, "source": "bench.peak_tflops"}
    assert "failed" in (tmp_path / "bench.md").read_text()


def test_time_budget_skips_rows_that_no_longer_fit(tmp_path):
    from dtfast.bench.core import _estimate

    assert _estimate(None, 64) == (0.0, 0.0)
    assert _estimate((100.0, 6.0, 128), 256) == (200.0, 12.0)  # time ~ batch size
    assert _estimate((100.0, 6.0, 128), 64) == (100.0, 6.0)  # a smaller batch is not assumed cheaper
    result = run_benchmark(TINY, ["bench.rows=[baseline]", "bench.batch_sizes=[2,4]", "bench.time_budget_s=0.001",
                                  "bench.peak_tflops=1", "bench.results_dir=", "dist.engine=ddp"], out=str(tmp_path))
    assert [(r["batch_size"], r["status"]) for r in result["rows"]] == [(2, "skipped"), (4, "skipped")]
    assert "time budget" in result["rows"][0]["error"]
    assert (tmp_path / "bench.json").is_file() and "skipped" in (tmp_path / "bench.md").read_text()


def test_warmup_deadline_raises_even_when_the_timeout_is_swallowed():
    from dtfast.bench.core import WarmupTimeout, _warmup_deadline

    with pytest.raises(WarmupTimeout, match="ran past"):
        with _warmup_deadline(0.2):
            time.sleep(5)
    with pytest.raises(WarmupTimeout, match="caught on the way"):
        with _warmup_deadline(0.2):
            try:  # a compiler's error handling that eats the exception and goes on
                time.sleep(5)
            except WarmupTimeout:
                pass
    with pytest.raises(WarmupTimeout, match="spent"):
        with _warmup_deadline(-1.0):
            pass
    with _warmup_deadline(None):  # no limit: nothing happens
        time.sleep(0.01)
    with _warmup_deadline(5.0):  # finishes in time: the alarm is cancelled
        time.sleep(0.01)
    time.sleep(0.05)


def test_slow_warmup_fails_its_row_and_the_others_are_measured(tmp_path, monkeypatch):
    from dtfast.bench import core, runner

    original = runner.Measurement.warmup

    def warmup(self, steps):
        if self.trainer.cfg.loss.backend != "torch":  # the optimized row: a compile that takes too long
            time.sleep(60)
        original(self, steps)

    monkeypatch.setattr(runner.Measurement, "warmup", warmup)
    allowances = []
    real_allowance = core._warmup_allowance

    def allowance(budget_s, started, active, steps):
        allowances.append(real_allowance(budget_s, started, active, steps))
        return 1.0 if active else None  # the first row: no limit; the second: one second

    monkeypatch.setattr(core, "_warmup_allowance", allowance)
    t0 = time.perf_counter()
    result = run_benchmark(TINY, ["bench.rows=[baseline,optimized]", "bench.batch_sizes=[2]", "bench.warmup=1",
                                  "bench.steps=2", "bench.time_budget_s=3600", "bench.peak_tflops=1",
                                  "bench.results_dir=", "dist.engine=ddp"], out=str(tmp_path))
    assert time.perf_counter() - t0 < 55
    baseline, optimized = result["rows"]
    assert baseline["status"] == "ok" and baseline["steps"] == 2
    assert optimized["status"] == "failed" and "WarmupTimeout" in optimized["error"]
    # the real allowance: the budget minus elapsed time, the warmed-up row's timed steps and a margin
    assert allowances[0] is not None and 3500 < allowances[0] < 3595
    assert allowances[1] < allowances[0]


def test_cudnn_benchmark_flag_follows_each_rows_trainer(monkeypatch):
    """train.cudnn_benchmark sets cuDNN's autotuner on GPU (not on CPU), and the runner re-applies each row's
    setting before every step (rows interleave in one process)."""
    from types import SimpleNamespace

    from dtfast.bench.runner import Measurement
    from dtfast.train.timing import StageTimer
    from dtfast.train.trainer import Trainer

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)

    def fake_trainer(device, enabled, log):
        cfg = SimpleNamespace(train=SimpleNamespace(cudnn_benchmark=enabled, grad_accum=1),
                              data=SimpleNamespace(image_size=8, crop_hw=(8, 8)))
        trainer = SimpleNamespace(cfg=cfg, device=torch.device(device), dist=SimpleNamespace(world_size=1))
        trainer.apply_backend_flags = lambda: Trainer.apply_backend_flags(trainer)

        def optimizer_step(batches, timer):
            for _ in batches:
                pass
            log.append((enabled, torch.backends.cudnn.benchmark))
            return {"loss": torch.tensor(1.0)}

        trainer.optimizer_step = optimizer_step
        return trainer

    log = []
    Trainer.apply_backend_flags(fake_trainer("cpu", True, log))
    assert torch.backends.cudnn.benchmark is False  # CPU runs leave cuDNN alone
    rows = []
    for flag in (True, False):  # measurements of "GPU" trainers, without touching CUDA on this machine
        row = object.__new__(Measurement)
        row.trainer, row.grad_accum = fake_trainer("cuda", flag, log), 1
        row.source = iter(lambda: (None, None), 0)
        rows.append(row)
    timer = StageTimer(torch.device("cpu"))
    for _ in range(2):
        for row in rows:
            row._step(timer)
    assert log == [(True, True), (False, False)] * 2


def test_a_failing_row_keeps_the_compiled_graphs_of_the_others(tmp_path, monkeypatch):
    # torch._dynamo.reset() when one row fails made the rows compiled before it recompile inside their timed steps
    # (found in review); compiled graphs are dropped only at the end of the run
    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(len(resets)))
    result = run_benchmark(TINY, ["bench.warmup=1", "bench.steps=1", "bench.rows=[baseline,config]",
                                  "train.batch_size=2", "data.num_images=16", "loss.backend=cuda", "dist.engine=ddp",
                                  "bench.results_dir=", "bench.peak_tflops=1.0"], out=str(tmp_path))
    statuses = {row["row"]: row["status"] for row in result["rows"]}
    assert statuses["config"] == "failed" and statuses["baseline"] == "ok", statuses
    assert len(resets) == 1  # the final clean-up only


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_real_data_rows_time_the_configured_backend(tmp_path, monkeypatch, backend):
    """bench.data=real times training's own input pipeline with data.backend (it used to time the torch
    DataLoader whatever the config said), and closes it when the row is done."""
    if backend == "dali":
        from dtfast.data.dali import dali_available

        if not dali_available():
            pytest.skip("NVIDIA DALI is not installed")
    from test_data_backends import smooth_folder

    from dtfast.bench import runner
    from dtfast.data.pipeline import InputPipeline

    root = tmp_path / "images"
    smooth_folder(str(root / "train"), per_class=6)
    built, closed = [], []
    real_init, real_close = InputPipeline.__init__, InputPipeline.close

    def init(self, *args, **kwargs):
        built.append(kwargs.get("backend"))
        real_init(self, *args, **kwargs)

    def close(self):
        closed.append(self.backend)
        real_close(self)

    monkeypatch.setattr(InputPipeline, "__init__", init)
    monkeypatch.setattr(InputPipeline, "close", close)
    monkeypatch.setattr(runner, "release", lambda *a, **k: None)  # keep the test's dynamo state
    result = run_benchmark(TINY, ["bench.warmup=1", "bench.steps=1", "bench.rows=[config]", "bench.data=real",
                                  f"data.root={root}", f"data.backend={backend}", "data.num_workers=0",
                                  "train.batch_size=4", "dist.engine=ddp", "bench.peak_tflops=1",
                                  "bench.results_dir="], out=str(tmp_path / "run"))
    row = result["rows"][0]
    assert row["status"] == "ok", row.get("error")
    assert row["data_backend"] == backend and built == [backend] and set(closed) == {backend}
    assert row["stage_s_per_step"]["data"] > 0
    # the batches decoded ahead during the warm-up were taken before timing (the loader's: DALI's queue of 2, none
    # from a DataLoader without workers; none from the pipeline's own queue on CPU; plus one)
    assert row["data_drained_before_timing"] == (3 if backend == "dali" else 1)


def test_bench_batch_size_below_two_names_the_key(tmp_path):
    from dtfast.train.config import ConfigError

    with pytest.raises(ConfigError, match="'bench.batch_sizes' must hold sizes >= 2"):
        run_benchmark(TINY, ["bench.batch_sizes=[1,4]"], out=str(tmp_path / "run"))


@pytest.mark.multiproc
def test_two_process_ddp_rows_measure_exposed_communication(tmp_path):
    """Under torchrun with DDP each timed step is paired with one without the gradient all-reduce; the difference
    is the communication column, taken out of backward (the column used to be always 0)."""
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dtfast.bench",
           "--config", TINY, "bench.warmup=1", "bench.steps=2", "dist.engine=ddp", "train.batch_size=4",
           "data.num_images=64", "bench.peak_tflops=1", "bench.results_dir=", f"out={out}"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = json.loads((out / "bench" / "bench.json").read_text())["rows"][0]
    assert row["status"] == "ok" and row["world_size"] == 2
    assert row["communication"].startswith("exposed gradient all-reduce")
    assert len(row["step_times_without_sync_s"]) == 2 and all(t > 0 for t in row["step_times_without_sync_s"])
    stages = row["stage_s_per_step"]
    assert stages["communication"] is not None and 0.0 <= stages["communication"]
    total = sum(v for v in stages.values() if v is not None)
    assert total == pytest.approx(row["step_time_s"]["mean"], rel=0.05)


def test_unmeasured_communication_prints_a_dash():
    from dtfast.bench import report

    row = {"row": "config", "batch_size": 4, "status": "ok", "images_per_s": 10.0, "images_per_s_per_device": 5.0,
           "step_time_s": {"median": 0.4, "p10": 0.39, "p90": 0.41},
           "stage_s_per_step": {"data": 0.01, "teacher": 0.1, "student": 0.1, "loss": 0.01, "backward": 0.1,
                                "optimizer": 0.05, "communication": None, "other": 0.03},
           "achieved_tflops": None, "mfu": None, "peak_memory_gb": 1.0}
    line = report.table({"rows": [row]}).splitlines()[-1]
    cells = [c.strip() for c in line.strip("|").split("|")]
    head = [c.strip() for c in report.table({"rows": []}).splitlines()[0].strip("|").split("|")]
    assert cells[head.index("communication ms")] == "-" and cells[head.index("backward ms")] == "100.0"


def test_commit_stamp_prefers_dtfast_commit_and_never_says_head(tmp_path, monkeypatch):
    import subprocess as sp

    from dtfast import _provenance

    monkeypatch.setenv("DTFAST_COMMIT", "abc123def456+dirty")
    assert _provenance.git_commit() == "abc123def456+dirty"
    monkeypatch.delenv("DTFAST_COMMIT")
    # a copy of the tree in a repository without commits: git prints "HEAD" with an error; the stamp is "unknown"
    sp.run(["git", "init", "-q", str(tmp_path)], check=True)
    monkeypatch.setattr(_provenance, "ROOT", str(tmp_path))
    assert _provenance.git_commit() == "unknown"
