"""`teacher.replicas`: the hf teacher sampled by N model copies in spawned processes writes the same
records as one copy in this process (each request draws with its own seeded generator), every copy
really samples, a dead copy stops the stage with a message naming it, and the recipe refuses
settings that cannot work (0 copies, copies of a server, more GPUs than are visible)."""
import pytest
import torch
from teacher_server import tiny_teacher

from specialize.engine.config import ConfigError, TeacherConfig
from specialize.engine.data import load_dataset_by_name
from specialize.engine.teacher import generate, iter_records
from specialize.engine.teacher.hf_backend import HFBackend
from specialize.engine.teacher.hf_replicas import EXIT_AFTER_ENV, ReplicatedHFBackend
from specialize.engine.workers import worker_devices


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    model, tok = tiny_teacher()
    out = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def _config(teacher_dir, **kw):
    return TeacherConfig(backend="hf", model=teacher_dir, dataset="synthetic", format="zero_shot_cot", shots=0,
                         samples=2, temperature=0.7, max_tokens=12, top_logprobs=4, **kw)


def _records(folder) -> dict:
    return {(r["qid"], r["sample_index"]): r for r in iter_records(folder)}


def test_two_replicas_write_the_records_of_one(teacher_dir, tmp_path):
    examples = load_dataset_by_name("synthetic/train")[:14]
    cfg = _config(teacher_dir)
    # 4 rows a batch (2 requests of 2 samples): the 14 questions make 7 batches, so both copies sample
    generate(cfg, examples, str(tmp_path / "one"),
             HFBackend.from_pretrained(teacher_dir, device="cpu", max_batch_rows=4), progress=False)
    replicated = ReplicatedHFBackend(teacher_dir, 2, device="cpu", max_batch_rows=4)
    try:
        generate(_config(teacher_dir, replicas=2), examples, str(tmp_path / "two"), replicated, progress=False)
    finally:
        replicated.close()
    assert sum(replicated.batches.values()) == 7 and len(replicated.batches) == 2, replicated.batches
    one, two = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) == 28
    for key, a in one.items():
        b = two[key]
        assert (a["text"], a["tokens"], a["finish_reason"]) == (b["text"], b["tokens"], b["finish_reason"]), key
        torch.testing.assert_close(torch.tensor(b["token_logprobs"]), torch.tensor(a["token_logprobs"]),
                                   atol=1e-5, rtol=0)
        assert [[t for t, _ in alts] for alts in a["top_logprobs"]] == [[t for t, _ in alts] for alts in b["top_logprobs"]]


def test_a_dead_replica_stops_the_stage_and_keeps_the_samples(teacher_dir, tmp_path, monkeypatch):
    examples = load_dataset_by_name("synthetic/train")[:14]
    monkeypatch.setenv(EXIT_AFTER_ENV, "2")  # each copy dies (as if killed) before its third batch
    backend = ReplicatedHFBackend(teacher_dir, 2, device="cpu", max_batch_rows=4)
    try:
        with pytest.raises(RuntimeError, match="a teacher replica died"):
            generate(_config(teacher_dir, replicas=2), examples, str(tmp_path / "t"), backend, progress=False)
    finally:
        backend.close(abort=True)
    stored = len(_records(tmp_path / "t"))
    assert 8 <= stored < 28  # at least the first two batches (2 requests x 2 samples each) are on disk
    monkeypatch.delenv(EXIT_AFTER_ENV)
    generate(_config(teacher_dir), examples, str(tmp_path / "t"),
             HFBackend.from_pretrained(teacher_dir, device="cpu", max_batch_rows=4), progress=False)
    assert len(_records(tmp_path / "t")) == 28  # the rerun samples only what is missing


def test_the_recipe_and_the_devices_refuse_what_cannot_run(teacher_dir, monkeypatch):
    with pytest.raises(ConfigError, match="teacher.replicas: expected an int >= 1"):
        _config(teacher_dir, replicas=0)
    with pytest.raises(ConfigError, match="only the hf backend"):
        TeacherConfig(backend="openai", model="m", replicas=2)
    assert worker_devices(3, "cpu") == ["cpu"] * 3
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert worker_devices(2, "cuda") == ["cuda:0", "cuda:1"]
    with pytest.raises(ValueError, match="teacher.replicas is 8 but 4 GPU"):
        worker_devices(8, "cuda", "teacher.replicas")
    with pytest.raises(ValueError, match="cuda:0..N-1 or the CPU"):
        worker_devices(2, "cuda:1")


def test_a_request_that_arrives_late_takes_a_free_lane_at_once():
    """With one of two lanes busy, a request that arrives later (a retry, or one the rate limiter held)
    runs on the free lane, not after the busy one's batch."""
    import asyncio
    import time

    from specialize.engine.teacher.hf_backend import BatchQueue

    class Slow(BatchQueue):
        lanes = 2

        def __init__(self):
            super().__init__()

        async def _run_batch(self, requests, settings):
            await asyncio.sleep(0.6 if requests[0][0] == "slow" else 0.05)
            return [(prompt, time.monotonic()) for prompt, _, _ in requests]

    async def main():
        queue = Slow()
        opts = dict(temperature=0.7, max_tokens=4, top_logprobs=1)
        slow = asyncio.ensure_future(queue.sample("slow", 1, **opts))
        await asyncio.sleep(0.1)
        fast = await queue.sample("fast", 1, **opts)
        return (await slow)[1], fast[1]

    slow_done, fast_done = asyncio.run(main())
    assert fast_done < slow_done
