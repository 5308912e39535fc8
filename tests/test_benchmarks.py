"""The benchmark runner's CPU entries in --quick mode, and the pieces the engine benchmark relies on."""
import json

import pytest
import torch

from specialize.benchmarks import bench_engine, run
from specialize.engine.measure import synthetic_world


def test_runner_quick_runs_every_cpu_entry(tmp_path, capsys):
    assert run.main(["--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "run.json").read_text())
    status = {r["entry"]: r["status"] for r in summary["entries"]}
    assert set(status) == set(run.ENTRIES)
    assert status["loss_cpu"] == "ok" and status["engine"] == "ok" and status["teacher"] == "ok" and status["store"] == "ok"
    assert status["aligner"] in ("ok", "not available")
    assert "tokens/s/gpu" in out and "entry" in out

    rows = json.loads((tmp_path / "engine_cpu-quick.json").read_text())["rows"]
    by = {r["provider"]: r for r in rows}
    assert set(by) == {"specialize", "hf-seq2seq+deepspeed"}
    for r in rows:  # both sides measured on the same shapes, in the same run
        assert "error" not in r, r.get("error")
        assert r["tokens_per_s_per_gpu"] > 0 and r["peak_mem_gb"] > 0 and 0 < r["mfu"] < 1
        assert (r["micro_batch"], r["src_len"], r["tgt_len"], r["zero"]) == (2, 32, 16, 2)
    eng, hf = by["specialize"], by["hf-seq2seq+deepspeed"]
    assert eng["speedup_vs_hf"] == pytest.approx(eng["tokens_per_s_per_gpu"] / hf["tokens_per_s_per_gpu"])
    assert json.loads((tmp_path / "loss_cpu.json").read_text())["rows"]
    teacher = json.loads((tmp_path / "teacher_cpu.json").read_text())["rows"]
    assert [r["copies"] for r in teacher] == [1, 2] and all(r["records_equal_one_copy"] for r in teacher)
    store = json.loads((tmp_path / "teacher_store.json").read_text())
    assert store["same_done_keys"] and [r["provider"] for r in store["rows"]] == ["open: msgspec", "open: json", "filter"]
    assert 0 < store["rows"][2]["kept"] < store["records"]


def test_runner_rejects_unknown_entry_and_reports_missing_modules(monkeypatch, capsys):
    assert run.main(["--quick", "--only", "nope"]) == 2
    assert "unknown entry 'nope'" in capsys.readouterr().err
    monkeypatch.setitem(run.ENTRIES, "ghost", (("specialize.benchmarks.no_such_bench",), None))
    assert run.main(["--quick", "--only", "ghost"]) == 0
    row = run.run_entry("ghost", True, None)
    assert row["status"] == "not available" and "no_such_bench" in row["detail"]


def test_synthetic_world_batches_have_exact_shapes(tmp_path):
    """Every micro-batch is B x S -> B x T with no padding, so tokens/s counts the same on both sides."""
    from specialize.engine.batching import BatchBuilder, BatchPlan, ExemplarSets, open_shards, sample_lengths
    from specialize.engine.tokenizers import load_tokenizer
    world = synthetic_world(tmp_path, n_samples=6, src_len=40, tgt_len=12, top_k=4)
    shards = open_shards(world["aligned"])
    builder = BatchBuilder(shards, load_tokenizer(world["tokenizer"]), ExemplarSets([], 0, 0), 40, 12, True)
    plan = BatchPlan(sample_lengths(shards), {"zero_shot_cot": 1.0}, "per_batch", 3, 0, 0, 1)
    for i in range(2):
        b = builder.collate(plan.micro_batch(i))
        assert b["input_ids"].shape == (3, 40) and b["n_src_tokens"] == 3 * 40
        assert b["labels"].shape == (3, 12) and b["n_tgt_tokens"] == 3 * 12
        ids = b["topk_ids"]
        assert ids.shape == (3, 12, 4) and (ids[..., 0] == b["labels"]).all()
        assert all(len(set(row.tolist())) == 4 for row in ids.reshape(-1, 4))  # distinct per position


def test_model_flops_formula_by_hand():
    counts = {"encoder": 10, "decoder": 7, "lm_head": 3}
    assert bench_engine.model_flops_per_step(counts, batch=2, src=5, tgt=4) == 6 * (10 * 5 + 10 * 4) * 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
@pytest.mark.parametrize("mode", ["gpu-xl", "gpu-xxl"])
def test_gpu_modes_exit_clearly_without_cuda(mode, capsys):
    assert bench_engine.main(["--mode", mode]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
