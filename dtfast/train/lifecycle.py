"""What the trainers share about a run's life: stopping on SIGTERM/SIGINT (finish the step, checkpoint, exit
128 + signal) and starting (resume from a checkpoint, or set an earlier run's files aside).

A scheduler's preemption, ``torchrun``'s forwarding and a Ctrl-C all arrive as one of these signals. Inside the step
loop the first one asks the loop to stop after the current step and its checkpoint; the same signal delivered once
more (Slurm signals every process of the job step and torchrun forwards its own SIGTERM to the workers) is absorbed;
a third one means "now". Outside the loop (set-up, resume, final save, export) there is no step to finish: the
process leaves at once, and the last complete checkpoint stays valid. ``exit_code`` is 128 + the signal after a
stop, so that ``torchrun --max-restarts`` or a scheduler restarts the job, which resumes with ``train.resume=auto``.
"""

from __future__ import annotations

import os
import signal
import warnings
from typing import Any

from dtfast.train import checkpoint as ckpt
from dtfast.train.distributed import barrier, main_rank_check

_LOCKS: dict[str, list] = {}  # path -> [open file holding its lock, trainers of this process using it]


class RunLocked(RuntimeError):
    """Another process is running in the same ``out`` folder."""


def _lock(path: str) -> None:
    """Take the lock file at ``path`` (kept until released or the process ends); RunLocked when another process
    holds it.

    Only "held by another process" refuses the run. A filesystem without POSIX locks (some Lustre and NFSv3 mounts)
    or a lock file this user cannot open is a warning: the run goes on, unguarded."""
    import errno
    import fcntl
    import socket

    path = os.path.abspath(path)
    if path in _LOCKS:  # this process holds it already (a second trainer in one process: tests, the recipe)
        _LOCKS[path][1] += 1
        return
    try:
        fh = open(path, "a+")  # noqa: SIM115 - held open while the run lasts
    except OSError as exc:
        warnings.warn(f"cannot open the run lock {path} ({exc}); a second job into this folder is not kept out",
                      stacklevel=3)
        return
    try:
        fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):  # ENOLCK, EOPNOTSUPP, ENOSYS: no locks on this mount
            fh.close()
            warnings.warn(f"cannot lock {path} ({exc}: this filesystem has no POSIX locks?); a second job into this "
                          "folder is not kept out", stacklevel=3)
            return
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise RunLocked(f"{os.path.dirname(path)} is in use by a running job ({holder}, holding {path}): wait for "
                        "it to end or kill it (every worker process: torchrun starts each in its own session), or use "
                        "another out")
    fh.seek(0)
    fh.truncate()
    fh.write(f"host {socket.gethostname()}, pid {os.getpid()}\n")
    fh.flush()
    _LOCKS[path] = [fh, 1]


def _unlock(path: str) -> None:
    entry = _LOCKS.get(os.path.abspath(path))
    if entry is not None:
        entry[1] -= 1
        if entry[1] <= 0:
            _LOCKS.pop(os.path.abspath(path))[0].close()


class RunLifecycle:
    """Mixin for a trainer (with ``cfg``, ``dist``, ``step``, ``_print`` and ``_load_checkpoint() -> path | None``):
    call ``_init_stop_state()`` in ``__init__``, set ``_in_loop`` around the step loop, and check ``_stop_signal``
    after each step. ``_signal_tag`` prefixes the one message the signal handler writes."""

    _signal_tag = b"[dtfast]"

    def _init_stop_state(self) -> None:
        self._stop_signal: int | None = None
        self._signals_while_stopping = 0
        self._in_loop = False
        self._old_handlers: dict[int, Any] = {}
        self._holds_lock = False  # <out>/.lock taken (held by the main rank)

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        if not self._in_loop:
            raise SystemExit(128 + signum)
        if self._stop_signal is None:
            self._stop_signal = signum  # finish this step, checkpoint on every rank, then stop
            return
        self._signals_while_stopping += 1
        if self._signals_while_stopping == 1:
            # os.write: print is not safe in a signal handler
            os.write(2, self._signal_tag + b" signal repeated while stopping: still finishing the step and its "
                     b"checkpoint (one more signal exits at once)\n")
            return
        raise SystemExit(128 + signum)

    @property
    def exit_code(self) -> int:
        """0 after a finished run; 128 + signal number after a signal stopped it (the job is not done)."""
        return 128 + int(self._stop_signal) if self._stop_signal is not None else 0

    def _install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread
                continue
            self._old_handlers.setdefault(sig, previous)

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    # ---------------------------------------------------------------- start
    def lock_out_folder(self) -> None:
        """Hold ``<out>/.lock`` until ``close`` (main rank; a POSIX record lock, also freed when the process ends,
        however it ends). A second run into the same folder stops with RunLocked naming the holder: two runs
        would interleave their metrics and commit checkpoints over each other (``kill -9`` of torchrun's process
        group leaves its workers running, in sessions of their own)."""
        if not self._holds_lock:
            main_rank_check(lambda: _lock(os.path.join(self.cfg.out, ".lock")), self.dist, RunLocked)
            self._holds_lock = True  # every rank: all take part in the check, the main rank holds the file

    def release_out_folder(self) -> None:
        """Give up ``<out>/.lock`` (at ``close``; the end of the process frees it anyway)."""
        if self._holds_lock:
            self._holds_lock = False
            _unlock(os.path.join(self.cfg.out, ".lock"))

    def maybe_resume(self) -> None:
        """Continue from the checkpoint train.resume names (metrics cut back to its step), or, starting from step 0
        in a used folder (a crash before the first checkpoint, or train.resume=never), move the earlier run's
        metrics (and with never its checkpoints) aside: they would mix with, or be pruned among, this run's."""
        path = self._load_checkpoint()
        if path is not None:
            self._truncate_metrics(self.step)
            self._print(f"resumed from {path} at step {self.step}")
            return
        if self.dist.is_main:
            for message in ckpt.set_aside_earlier_run(self.cfg.out, self.cfg.train.resume):
                self._print(message)
        barrier(self.dist)

    def _truncate_metrics(self, step: int) -> None:
        if self.dist.is_main:
            ckpt.truncate_metrics(os.path.join(self.cfg.out, "metrics.jsonl"), step)
