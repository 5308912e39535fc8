"""engine.workers: one spawned process per device, each told its device and, on a CPU, its share of
the threads; more workers than visible GPUs, or a device it cannot split, is refused by name."""
import pytest
import torch

from specialize.engine.workers import DevicePool, worker_device, worker_devices


def _device_and_threads() -> tuple:
    import os
    return worker_device(), torch.get_num_threads(), os.getpid()


def test_each_worker_knows_its_device_and_its_thread_share():
    torch.set_num_threads(2)
    with DevicePool(2, "cpu") as pool:
        seen = pool.map(_device_and_threads, [()] * 6)
    assert {(dev, threads) for dev, threads, _ in seen} == {("cpu", 1)}
    assert worker_device() is None  # not in a worker


def test_worker_devices_on_gpus_and_what_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert worker_devices(4, "cuda") == [f"cuda:{i}" for i in range(4)]
    with pytest.raises(ValueError, match="eval.workers is 9 but 8 GPU"):
        worker_devices(9, "cuda", "eval.workers")
    with pytest.raises(ValueError, match="must be >= 1"):
        worker_devices(0, "cpu")
