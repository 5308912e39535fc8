"""Spawned worker processes, one per device, for the work that runs outside the training ranks: the
`hf` teacher's model copies (teacher.replicas) and the eval stage's models (eval.workers).

Worker i runs on cuda:i; on a CPU every worker runs on the CPU with its share of the torch threads,
as a small model's matmuls do not scale to a second thread but two processes do. Workers are
spawned, not forked: CUDA cannot be forked, and a forked OpenMP runtime can hang. A worker ignores
Ctrl-C (the parent stops the pool) and exits when its parent dies, so no orphan keeps a model on a GPU.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Optional, Sequence

# How long every worker may take to start (load its model) before the pool gives up: an 11B teacher
# copy reads tens of GB from disk, but a worker stuck in CUDA set-up or on a hung file system must not
# block the stage forever.
START_TIMEOUT_ENV = "SPECIALIZE_WORKER_START_TIMEOUT"
DEFAULT_START_TIMEOUT_S = 1800.0

_DEVICE: Optional[str] = None  # in a worker: the device it took
_ALL_STARTED = None  # in a worker: the barrier every worker reaches once started


def worker_devices(n: int, device: Optional[str] = None, what: str = "workers") -> list[str]:
    """The device of each of `n` workers: cuda:0..n-1 (refused past the visible GPUs), or n times the CPU."""
    import torch
    if n < 1:
        raise ValueError(f"{what} must be >= 1, got {n}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return ["cpu"] * n
    if device != "cuda":
        raise ValueError(f"{what} place themselves on cuda:0..N-1 or the CPU; got device {device!r}")
    visible = torch.cuda.device_count()
    if n > visible:
        raise ValueError(f"{what} is {n} but {visible} GPU(s) are visible: one per GPU")
    return [f"cuda:{i}" for i in range(n)]


def worker_device() -> Optional[str]:
    """The device of this worker process (None outside a DevicePool)."""
    return _DEVICE


def _exit_with_parent() -> None:
    parent = multiprocessing.parent_process()
    if parent is not None:
        multiprocessing.connection.wait([parent.sentinel])  # returns when the parent is gone
        os._exit(1)


def _start(devices, started, threads: Optional[int], initializer: Optional[Callable], initargs: tuple) -> None:
    global _DEVICE, _ALL_STARTED
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    import torch
    _DEVICE, _ALL_STARTED = devices.get(), started
    if _DEVICE == "cpu" and threads:
        torch.set_num_threads(threads)
    elif _DEVICE.startswith("cuda"):
        torch.cuda.set_device(_DEVICE)
    if initializer is not None:
        initializer(_DEVICE, *initargs)


def _start_timeout_from_env() -> float:
    raw = os.environ.get(START_TIMEOUT_ENV, "").strip()
    try:
        seconds = float(raw) if raw else DEFAULT_START_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{START_TIMEOUT_ENV}={raw!r}: expected seconds > 0")
    return seconds


def _wait_for_the_others() -> None:
    _ALL_STARTED.wait()


class DevicePool:
    """`n` spawned processes, one per device of `worker_devices`; `initializer(device, *initargs)`
    runs once in each (to load a model). submit/map as a ProcessPoolExecutor; as a context manager
    it stops the workers at once when the block raises (a running job is not waited for). Workers that
    have not all started within `start_timeout` seconds (default: $SPECIALIZE_WORKER_START_TIMEOUT,
    else 30 min) are killed and the pool raises, naming itself."""

    def __init__(self, n: int, device: Optional[str] = None, initializer: Optional[Callable] = None,
                 initargs: tuple = (), what: str = "workers", start_timeout: Optional[float] = None):
        import torch
        if start_timeout is None:
            start_timeout = _start_timeout_from_env()
        self.devices = worker_devices(n, device, what)
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        for dev in self.devices:
            queue.put(dev)
        threads = max(1, torch.get_num_threads() // n) if self.devices[0] == "cpu" else None
        self._pool = ProcessPoolExecutor(n, mp_context=context, initializer=_start,
                                         initargs=(queue, context.Barrier(n), threads, initializer, initargs))
        # Start every worker now and wait until all have run the initializer: a pool spawns its
        # processes one per waiting task, so otherwise the first to load a model would take every job
        # while the others load, and a model that fails to load would fail a later job instead.
        # Each of these n tasks holds its worker at the barrier, so each lands in its own process.
        deadline = time.monotonic() + start_timeout
        try:
            for f in [self._pool.submit(_wait_for_the_others) for _ in range(n)]:
                f.result(timeout=max(0.0, deadline - time.monotonic()))
        except BrokenProcessPool as e:
            self.close(abort=True)
            raise RuntimeError(f"{what}: a worker process failed to start on {', '.join(self.devices)} "
                               "(its error is printed above)") from e
        except TimeoutError as e:
            self.close(abort=True)
            raise RuntimeError(f"{what}: the workers on {', '.join(self.devices)} did not all start within "
                               f"{start_timeout:g} s (a model load or device set-up hangs; set "
                               f"{START_TIMEOUT_ENV} to wait longer)") from e

    def submit(self, fn: Callable, *args) -> Future:
        return self._pool.submit(fn, *args)

    def map(self, fn: Callable, jobs: Sequence[tuple]) -> list:
        """fn(*job) for every job, in the jobs' order."""
        return [f.result() for f in [self._pool.submit(fn, *job) for job in jobs]]

    def close(self, abort: bool = False) -> None:
        """Stop the workers: once their jobs are done, or with `abort` at once (queued jobs cancelled,
        running ones killed)."""
        if abort:
            for proc in list((self._pool._processes or {}).values()):  # the executor has no public kill
                proc.terminate()
        self._pool.shutdown(wait=not abort, cancel_futures=True)

    def __enter__(self) -> "DevicePool":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(abort=exc_type is not None)
