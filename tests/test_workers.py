"""engine.workers: one spawned process per device, each told its device and, on a CPU, its share of
the threads; more workers than visible GPUs, or a device it cannot split, is refused by name."""
import pytest
import torch

from specialize.engine.workers import DevicePool, worker_device, worker_devices


def _device_and_threads() -> tuple:
    import os
    return worker_device(), torch.get_num_threads(), os.getpid()


def _hold(seconds: float) -> int:
    import os
    import time
    time.sleep(seconds)
    return os.getpid()


def test_each_worker_knows_its_device_and_its_thread_share():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with DevicePool(2, "cpu") as pool:
            seen = pool.map(_device_and_threads, [()] * 6)
            # two jobs that each hold a worker run in two processes, not one after the other
            assert len(set(pool.map(_hold, [(0.5,), (0.5,)]))) == 2
    finally:
        torch.set_num_threads(before)
    assert {(dev, threads) for dev, threads, _ in seen} == {("cpu", 1)}
    assert worker_device() is None  # not in a worker


def test_a_block_that_raises_stops_the_workers_without_waiting():
    import time
    start = time.monotonic()
    with pytest.raises(KeyError):
        with DevicePool(2, "cpu") as pool:
            pool.submit(_hold, 60)
            raise KeyError("stop")
    assert time.monotonic() - start < 30  # the 60 s job was killed, not waited for


def test_worker_devices_on_gpus_and_what_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert worker_devices(4, "cuda") == [f"cuda:{i}" for i in range(4)]
    with pytest.raises(ValueError, match="eval.workers is 9 but 8 GPU"):
        worker_devices(9, "cuda", "eval.workers")
    with pytest.raises(ValueError, match="must be >= 1"):
        worker_devices(0, "cpu")
