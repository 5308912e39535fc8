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


def _hang_after_writing_pid(device, pid_dir):
    import os
    import time
    open(os.path.join(pid_dir, str(os.getpid())), "w").close()
    time.sleep(600)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()  # a zombie has exited, only its entry is left
    except FileNotFoundError:
        return False


def test_workers_that_hang_while_starting_are_killed_and_the_pool_named(tmp_path):
    import os
    import time
    with pytest.raises(RuntimeError, match=r"eval.workers: the workers on cpu, cpu did not all start within 8 s"):
        DevicePool(2, "cpu", _hang_after_writing_pid, (str(tmp_path),), what="eval.workers", start_timeout=8)
    pids = [int(name) for name in os.listdir(tmp_path)]
    assert pids  # the initializer did run (8 s leaves a slow machine time to spawn), so the wait timed out
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids)


def test_the_start_timeout_defaults_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECIALIZE_WORKER_START_TIMEOUT", "2")
    with pytest.raises(RuntimeError, match="within 2 s"):
        DevicePool(1, "cpu", _hang_after_writing_pid, (str(tmp_path),))
    for bad in ("soon", "0"):
        monkeypatch.setenv("SPECIALIZE_WORKER_START_TIMEOUT", bad)
        with pytest.raises(ValueError, match=f"SPECIALIZE_WORKER_START_TIMEOUT='{bad}': expected seconds > 0"):
            DevicePool(1, "cpu")
