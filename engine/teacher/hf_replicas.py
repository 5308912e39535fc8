"""`hf` teacher on several devices at once: one copy of the model per worker process.

`teacher.replicas: N` loads the model N times, each in its own spawned process (engine.workers):
on GPUs copy i runs on cuda:i; on a CPU each copy gets its share of the torch threads. Requests are
batched as by one `HFBackend` (see BatchQueue) and up to N batches run at once, one per copy. Every
request draws with its own seeded generator, so a sample does not depend on which copy or batch
drew it.

A copy that dies (out of memory, killed) stops the stage with the samples so far kept; a rerun
resumes.
"""
from __future__ import annotations

import asyncio
import os
from collections import Counter
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Optional

from specialize.engine.workers import DevicePool

from .hf_backend import BatchQueue, check_logprobs

_REPLICA = None  # this worker process's HFBackend
_BATCHES = 0  # batches this worker has sampled
# Test hook: a copy exits hard (as when killed) before its batch number N + 1.
EXIT_AFTER_ENV = "SPECIALIZE_REPLICA_EXIT_AFTER_BATCHES"


def _load_replica(device: str, path: str, logprobs: str, max_batch_rows: int) -> None:
    global _REPLICA
    from .hf_backend import HFBackend
    _REPLICA = HFBackend.from_pretrained(path, device=device, logprobs=logprobs, max_batch_rows=max_batch_rows)


def _sample_on_replica(requests: list, settings: tuple) -> tuple[int, list]:
    global _BATCHES
    _BATCHES += 1
    if os.environ.get(EXIT_AFTER_ENV) and _BATCHES > int(os.environ[EXIT_AFTER_ENV]):
        os._exit(1)
    return os.getpid(), _REPLICA.sample_batch_sync(requests, *settings)


class ReplicatedHFBackend(BatchQueue):
    name = "hf"

    def __init__(self, path: str | Path, replicas: int, device: Optional[str] = None, logprobs: str = "raw",
                 max_batch_rows: int = 64):
        from transformers import AutoConfig
        check_logprobs(logprobs)  # here, not as a worker that fails to start
        AutoConfig.from_pretrained(str(path))  # a wrong path too
        self._pool = DevicePool(replicas, device, _load_replica, (str(path), logprobs, max_batch_rows),
                                what="teacher.replicas")
        self.devices = self._pool.devices
        self.lanes = replicas
        self.logprobs = logprobs
        self.model_name = str(path)
        self.max_batch_rows = max_batch_rows
        self.batches: Counter = Counter()  # worker pid -> batches it sampled (the tests read it)
        BatchQueue.__init__(self)

    async def _run_batch(self, requests: list, settings: tuple) -> list:
        try:
            pid, results = await asyncio.wrap_future(self._pool.submit(_sample_on_replica, requests, settings))
        except BrokenProcessPool as e:
            raise RuntimeError(f"a teacher replica died (out of memory or killed; devices {', '.join(self.devices)}); "
                               "the samples so far are kept, a rerun resumes") from e
        self.batches[pid] += 1
        return results

    def close(self, abort: bool = False) -> None:
        self._pool.close(abort)
