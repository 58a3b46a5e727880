"""Preemption under DeepSpeed (2 processes, gloo): SIGTERM to one rank writes a loadable checkpoint and stops all
ranks; ``kill -9`` of one rank under ``torchrun --max-restarts`` resumes from the last checkpoint and finishes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["data.image_size=32", "data.num_images=64", "data.num_workers=0", "student.width=16", "train.batch_size=2",
       "train.warmup_steps=2", "train.lr=3e-3", "train.log_every=1", "loss.backend=torch", "dist.engine=deepspeed",
       "dist.zero_stage=1"]


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
                DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")


def launch(args: list[str], log_path: str, max_restarts: int = 0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", str(max_restarts), "-m", "dtfast.pretrain", *args]
    log = open(log_path, "w")  # noqa: SIM115 - closed by the caller through proc.stdout
    return subprocess.Popen(cmd, env=env(), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def finish(proc: subprocess.Popen, log_path: str, timeout: int = 300) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with open(log_path) as fh:
        return fh.read()


def logged_steps(out: str) -> list[int]:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as fh:
        return [json.loads(line)["step"] for line in fh if line.strip().endswith("}")]


def latest(out: str) -> str | None:
    try:
        with open(os.path.join(out, "checkpoints", "latest")) as fh:
            return fh.read().strip()
    except FileNotFoundError:
        return None


def wait_for(condition, proc: subprocess.Popen, log_path: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError("the run ended early:\n" + finish(proc, log_path)[-5000:])
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting:\n" + finish(proc, log_path)[-5000:])
        time.sleep(0.2)


def worker_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of the worker process with RANK=rank among torchrun's children."""
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "dtfast.pretrain" in " ".join(child.cmdline()):
                return child.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise AssertionError(f"no worker with RANK={rank} under torchrun pid {launcher.pid}")


@pytest.mark.multiproc
def test_sigterm_on_one_rank_writes_a_loadable_checkpoint(tmp_path):
    out, log_path = str(tmp_path / "run"), str(tmp_path / "run.log")
    proc = launch([f"out={out}", "train.max_steps=500", "train.save_every=0", *RUN], log_path)
    wait_for(lambda: len(logged_steps(out)) >= 2, proc, log_path)
    # only rank 1 (rank 0 learns it through the any-rank check), and twice, as under Slurm + torchrun
    pid = worker_pid(proc, rank=1)
    os.kill(pid, signal.SIGTERM)
    time.sleep(0.05)
    os.kill(pid, signal.SIGTERM)
    text = finish(proc, log_path)
    match = re.search(r"stopped by signal at step (\d+)", text)
    assert match, text[-5000:]
    stopped = int(match.group(1))
    assert latest(out) == f"step_{stopped}", (latest(out), text[-3000:])
    # the stopped rank exits with 128 + SIGTERM so that torchrun --max-restarts restarts the job; torchrun reports
    # that as a ChildFailedError (its own traceback), but no worker may crash with a Python traceback of its own
    assert "exitcode  : 143" in text, text[-5000:]
    assert not re.search(r'File ".*/dtfast/', text), text[-5000:]
    with open(os.path.join(out, "checkpoints", f"step_{stopped}", "meta.json")) as fh:
        assert json.load(fh)["step"] == stopped

    # loadable: a rerun continues from it to the end
    resume = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
         "dtfast.pretrain", f"out={out}", f"train.max_steps={stopped + 2}", "train.save_every=0", *RUN],
        check=False, env=env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert resume.returncode == 0, resume.stdout[-3000:] + resume.stderr[-5000:]
    assert f"at step {stopped}" in resume.stdout
    assert logged_steps(out) == list(range(1, stopped + 3))
    assert os.path.isfile(os.path.join(out, "backbone.safetensors"))


def test_repeated_signal_still_checkpoints_and_a_third_exits():
    """Slurm signals every process of a job step and torchrun forwards its own SIGTERM too: a worker sees the same
    stop request twice. The second must not abort the checkpoint; a third one exits at once."""
    from dtfast.train.trainer import Trainer

    trainer = Trainer.__new__(Trainer)
    trainer._stop_signal, trainer._signals_while_stopping, trainer._in_loop = None, 0, True
    trainer._on_signal(signal.SIGTERM, None)
    assert trainer._stop_signal == signal.SIGTERM
    trainer._on_signal(signal.SIGTERM, None)  # ignored: still stopping cleanly
    with pytest.raises(SystemExit) as exc:
        trainer._on_signal(signal.SIGINT, None)
    assert exc.value.code == 128 + signal.SIGINT
    trainer._in_loop = False  # outside the step loop there is no step to finish
    with pytest.raises(SystemExit):
        Trainer._on_signal(trainer, signal.SIGTERM, None)


def test_exit_code_reports_the_signal():
    """After a signal stop the trainer's exit status is 128 + signal (what the entry point should return), so that
    torchrun --max-restarts and schedulers see an unfinished job; 0 after a finished run."""
    from dtfast.train.trainer import Trainer

    trainer = Trainer.__new__(Trainer)  # the property needs no models
    trainer._stop_signal = None
    assert trainer.exit_code == 0
    trainer._stop_signal = signal.SIGTERM
    assert trainer.exit_code == 128 + 15


@pytest.mark.multiproc
def test_kill_9_of_one_rank_then_torchrun_restart_resumes(tmp_path):
    out, log_path = str(tmp_path / "run"), str(tmp_path / "run.log")
    max_steps, save_every = 12, 3
    # 2 restarts allowed: on a loaded machine gloo's connect during a restart can time out once; a real job
    # would allow a few restarts as well
    proc = launch([f"out={out}", f"train.max_steps={max_steps}", f"train.save_every={save_every}",
                   "dist.timeout_minutes=1", *RUN], log_path, max_restarts=2)
    # kill between two checkpoints, so that there are steps to lose
    wait_for(lambda: latest(out) is not None and len(logged_steps(out)) % save_every == 1, proc, log_path)
    checkpoint_at_kill = int(latest(out).split("_")[1])
    killed_after = len(logged_steps(out))
    os.kill(worker_pid(proc, rank=1), signal.SIGKILL)
    text = finish(proc, log_path, timeout=400)
    assert proc.returncode == 0, text[-6000:]
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", text)]
    assert resumed, text[-5000:]
    # lost at most the steps since the last checkpoint: the restart began at that checkpoint (or a later one)
    assert checkpoint_at_kill <= resumed[0] <= killed_after, (checkpoint_at_kill, resumed, killed_after)
    assert logged_steps(out) == list(range(1, max_steps + 1))  # replayed steps are logged once
    assert latest(out) == f"step_{max_steps}"
    # keep_last (default 2) pruned older checkpoints; no half-written folder was left behind by the killed rank
    names = sorted(n for n in os.listdir(os.path.join(out, "checkpoints")) if n.startswith(("step_", ".tmp")))
    assert names == sorted([f"step_{max_steps - save_every}", f"step_{max_steps}"]), names
    assert os.path.isfile(os.path.join(out, "backbone.safetensors"))
