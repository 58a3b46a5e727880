"""How DataLoader worker processes are started: from a fork server, never by ``fork()`` of the training process.

Why. ``fork()`` copies only the calling thread; every lock another thread held at that instant stays locked in
the child forever (Python's import lock, logging, allocator and library locks, filelock's descriptor gate,
CUDA's and NCCL's/gloo's internal state). A training process always has other threads: the input pipeline's
prefetch thread, DataLoader pin-memory threads, the process-group threads, CUDA's. The failure seen on the
H100 (filelock >= 4 refusing ``os.fork`` while another thread was inside its fork gate, Python 3.12 warning
"This process is multi-threaded, use of fork() may lead to deadlocks in the child") is one symptom of it;
a silent deadlock of a worker is another. Checking "is the process single-threaded right now" does not
help: importing torch already starts a native thread, and gloo/CUDA/DALI threads are invisible to
``threading``.

What. ``auto`` (the default) uses the ``forkserver`` start method (``spawn`` where there is none): the server is
started once per process by fork+exec (``_posixsubprocess``, safe with threads) while it is still cheap, imports
torch and ``dtfast.data`` once (``PRELOAD``), and forks every worker from ITS single thread. Workers are
persistent (``persistent_workers=True``, the loaders reuse one DataLoader across epochs), so a pipeline starts
its workers once; epoch boundaries send indices to the same processes and start nothing.

Cost, measured on the shared 2-core CPU machine under load (load average ~8; 2 workers, batch 8 of 224x224 crops
from 500x375 JPEGs, time to the first batch): fork 0.5-0.7 s; forkserver with the preload 6.8 s for the first
pipeline of a process (starting the server: one torch import) and 0.5 s for every later one; forkserver
without the preload 11 s; spawn 9 s for every pipeline. The next epoch's first batch with persistent workers:
0.2 s for all methods. Hence forkserver + preload + persistent workers: one-off seconds per process, then as
cheap as fork, and safe.

A worker forked by the server is the server's child, not the training process's: DataLoader's own liveness check
(its parent's pid) would not notice a training process killed with SIGKILL (preemption, OOM killer), and the
worker and the server (which lives while any process holding its "alive" descriptor does, workers included)
would stay forever. ``watch_parent`` (``worker_init_fn``) therefore makes each worker exit as soon as the
process that started it is gone (a pidfd on Linux, else a 1 s poll).

Requirements this puts on callers (as for any non-fork start method): the data set, collate function and
sampler items are pickled to the workers, and a script that builds a pipeline at import time must use
``if __name__ == "__main__":`` (workers import the main module). ``DTFAST_WORKER_START`` (or the
``start_method`` argument) = fork | forkserver | spawn overrides the choice, e.g. ``fork`` for a
single-threaded throwaway script.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import select
import threading
import time
from collections.abc import Callable
from multiprocessing.context import BaseContext

__all__ = ["PRELOAD", "START_METHODS", "loader_options", "watch_parent", "worker_context", "worker_start_method"]

START_METHODS = ("auto", "fork", "forkserver", "spawn")
# imported once by the fork server, so that each worker forked from it starts in milliseconds
PRELOAD = ["torch", "numpy", "PIL.Image", "dtfast.data"]
_preload_lock = threading.Lock()
_preload_set = False


def worker_start_method(method: str | None = None) -> str:
    """The concrete start method: ``method``, else ``$DTFAST_WORKER_START``, else ``auto`` (see module doc)."""
    chosen = (method or os.environ.get("DTFAST_WORKER_START") or "auto").strip().lower()
    if chosen not in START_METHODS:
        raise ValueError(f"worker start method must be one of {START_METHODS} (argument or DTFAST_WORKER_START), "
                         f"got {chosen!r}")
    available = multiprocessing.get_all_start_methods()
    if chosen == "auto":
        return "forkserver" if "forkserver" in available else "spawn"
    if chosen not in available:
        raise ValueError(f"worker start method {chosen!r} is not available on this platform ({available})")
    return chosen


def worker_context(method: str | None = None) -> BaseContext:
    """The multiprocessing context for DataLoader workers (``multiprocessing_context=``)."""
    global _preload_set
    name = worker_start_method(method)
    context = multiprocessing.get_context(name)
    if name == "forkserver":
        with _preload_lock:
            if not _preload_set:  # only effective before the server starts (process-wide, first use wins)
                context.set_forkserver_preload(list(PRELOAD))
                _preload_set = True
    return context


def _exit_when_gone(parent_pid: int) -> None:
    try:
        fd = os.pidfd_open(parent_pid)  # Linux >= 5.3: readable once the process has exited
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        select.select([fd], [], [])
    else:
        while True:
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                break
            except PermissionError:
                pass
            time.sleep(1.0)
    os._exit(1)  # the training process is gone: nobody will read this worker's batches


def watch_parent(parent_pid: int, worker_id: int = 0, user_init: Callable[[int], None] | None = None) -> None:
    """``worker_init_fn`` (bound with ``functools.partial``): exit this worker when ``parent_pid`` ends."""
    if parent_pid != os.getppid():  # forked directly by the parent (fork): DataLoader's own check covers it
        threading.Thread(target=_exit_when_gone, args=(parent_pid,), name="dtfast-parent-watch", daemon=True).start()
    if user_init is not None:
        user_init(worker_id)


def loader_options(num_workers: int, start_method: str | None = None) -> dict:
    """DataLoader keyword arguments for ``num_workers`` worker processes: start method (see module doc),
    persistent workers, and the parent watch. Empty for ``num_workers == 0``."""
    if num_workers <= 0:
        return {}
    return {"multiprocessing_context": worker_context(start_method), "persistent_workers": True,
            "worker_init_fn": functools.partial(watch_parent, os.getpid())}


def shutdown_workers(loader) -> None:
    """Stop a persistent-worker DataLoader's processes (idempotent). Its result queue is closed too: a thread
    still waiting in ``next()`` for a stalled worker (the input pipeline's prefetch thread) then gets an error and
    ends, instead of polling the stopped loader for ever."""
    iterator = getattr(loader, "_iterator", None)
    loader._iterator = None
    if iterator is None or not hasattr(iterator, "_shutdown_workers"):
        return
    iterator._shutdown_workers()
    results = getattr(iterator, "_worker_result_queue", None)
    if results is not None:
        try:
            results.close()
        except (OSError, ValueError):  # already closed
            pass
