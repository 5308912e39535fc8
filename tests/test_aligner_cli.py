"""Aligned shards round-trip; `specialize align` end to end: output, resume, workers, errors."""
import json
import math
import pickle

import numpy as np
import pytest

from specialize.aligner import AlignedShards, write_shards
from specialize.aligner.bulk import format_summary
from specialize.aligner.teacher_tokenizers import load_teacher_tokenizer, tokenize_text
from specialize.engine.cli import main as specialize_main
from specialize.engine.data import load_gsm8k
from specialize.engine.tokenizers import train_t5_unigram


def random_record(rng, n, k):
    T = int(rng.integers(1, 30))
    return {"qid": f"q{n}", "sample_index": n % 3, "answer": str(n), "question": f"Question {n} ✓?",
            "input_ids": rng.integers(0, 100, int(rng.integers(1, 20))).astype(np.int32),
            "labels": rng.integers(0, 100, T).astype(np.int32),
            "topk_ids": rng.integers(-1, 100, (T, k)).astype(np.int32),
            "topk_logprobs": -rng.random((T, k)).astype(np.float32)}


def assert_record_equal(got, want, k):
    for key in ("qid", "sample_index", "answer", "question"):
        assert got[key] == want[key]
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    np.testing.assert_array_equal(got["labels"], want["labels"])
    kk = want["topk_ids"].shape[1]
    np.testing.assert_array_equal(got["topk_ids"][:, :kk], want["topk_ids"])
    np.testing.assert_array_equal(got["topk_logprobs"][:, :kk], want["topk_logprobs"])
    assert (got["topk_ids"][:, kk:] == -1).all() and np.isneginf(got["topk_logprobs"][:, kk:]).all()
    assert got["topk_ids"].shape[1] == k and got["labels"].dtype == np.int32
    assert got["topk_logprobs"].dtype == np.float32


def test_shards_round_trip_and_pickle(tmp_path):
    rng = np.random.default_rng(0)
    records = [random_record(rng, n, 4) for n in range(23)]
    paths = write_shards(records, tmp_path / "a", shard_size=10)
    assert [p.name for p in paths] == ["shard-00000", "shard-00001", "shard-00002"]
    # a second folder with a smaller K is padded up to the largest on read
    more = [random_record(rng, n, 2) for n in range(23, 30)]
    write_shards(more, tmp_path / "a", prefix="zz")
    ds = AlignedShards(tmp_path / "a")
    assert len(ds) == 30 and ds.k == 4
    for i, rec in enumerate(records + more):
        assert_record_equal(ds[i], rec, 4)
    assert_record_equal(ds[-1], more[-1], 4)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._open == {} and clone[5]["qid"] == "q5"
    with pytest.raises(IndexError):
        ds[30]


def test_shards_ignore_partial_and_reject_bad_records(tmp_path):
    rng = np.random.default_rng(1)
    write_shards([random_record(rng, 0, 3)], tmp_path)
    (tmp_path / "shard-00009.tmp").mkdir()  # an interrupted write
    assert len(AlignedShards(tmp_path)) == 1
    bad = random_record(rng, 1, 3)
    bad["topk_ids"] = bad["topk_ids"][:-1]
    with pytest.raises(ValueError, match="record 0 .*q1.*len\\(labels\\)"):
        write_shards([bad], tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="no complete aligned shards"):
        AlignedShards(tmp_path / "shard-00009.tmp")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, shared_data):
    """Three teacher shards of GSM8K rationales in the teacher-record format, with top-3."""
    root = tmp_path_factory.mktemp("align")
    train = load_gsm8k("train", shared_data / "gsm8k")[:60]
    enc = load_teacher_tokenizer(str(shared_data / "tokenizers" / "p50k_base.tiktoken"))
    student = train_t5_unigram([ex.question + " " + ex.rationale for ex in load_gsm8k(
        "train", shared_data / "gsm8k")[:400]], vocab_size=1000)
    student.save_pretrained(root / "student")
    (root / "teacher").mkdir()
    for shard in range(3):
        with open(root / "teacher" / f"samples-{shard:05d}.jsonl", "w") as fh:
            for n, ex in enumerate(train[shard * 20:(shard + 1) * 20]):
                text = ex.rationale + " The answer is " + ex.answer + "."
                tokens = tokenize_text(enc, text)
                top = [[[t, math.log(0.6)], [" " + t.lstrip(), math.log(0.25)], ["\n", math.log(0.1)]]
                       for t in tokens]
                fh.write(json.dumps({"qid": ex.id, "sample_index": n % 2, "prompt_hash": "h", "question": ex.question,
                                     "gold": ex.answer, "dataset": "gsm8k", "text": text, "tokens": tokens,
                                     "token_bytes": [list(t.encode()) for t in tokens],
                                     "token_logprobs": [math.log(0.6)] * len(tokens), "top_logprobs": top,
                                     "finish_reason": "stop", "usage": {}, "model": "fixture"}) + "\n")
    return root


def run_align(root, out, *extra):
    return specialize_main(["align", "--teacher-data", str(root / "teacher"), "--student-tokenizer",
                            str(root / "student"), "--out", str(out), "--no-progress", *extra])


def test_cli_end_to_end_and_resume(teacher_dir, tmp_path, capsys):
    from specialize.engine.tokenizers import load_tokenizer
    out = tmp_path / "aligned"
    assert run_align(teacher_dir, out) == 0
    table = capsys.readouterr().out
    shard_lines = [line for line in table.splitlines() if line.startswith("samples-")]
    assert "samples-00002.jsonl" in table and "total" in table and sum(" aligned " in line for line in shard_lines) == 3
    ds = AlignedShards(out)
    assert len(ds) == 60 and ds.k == 3
    student = load_tokenizer(str(teacher_dir / "student"))
    lines = [json.loads(line) for p in sorted((teacher_dir / "teacher").glob("*.jsonl")) for line in open(p)]
    mapped = 0
    for i, rec in enumerate(lines):
        got = ds[i]
        assert got["qid"] == rec["qid"] and got["answer"] == rec["gold"] and got["question"] == rec["question"]
        assert got["input_ids"].tolist() == student(rec["question"])["input_ids"]
        assert got["labels"].tolist() == student(rec["text"])["input_ids"]
        assert (got["topk_ids"] < len(student.get_vocab())).all()
        assert (np.exp(got["topk_logprobs"].astype(np.float64)).sum(1) <= 1 + 1e-6).all()
        mapped += (got["topk_ids"][:, 1] >= 0).sum() + (got["topk_logprobs"][:, 0] < 0).sum()
    assert mapped > 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["samples"] for r in summary] == [20, 20, 20] and 0.3 < summary[0]["mapped_share"] <= 1

    # rerun: finished shards are skipped and left untouched
    stamp = (out / "aligned-00001" / "labels.npy").stat().st_mtime_ns
    assert run_align(teacher_dir, out) == 0
    assert sum(" skipped " in line for line in capsys.readouterr().out.splitlines()) == 3
    assert (out / "aligned-00001" / "labels.npy").stat().st_mtime_ns == stamp

    # an interrupted shard (only its .tmp left) is redone; the rest skipped
    before = ds[25]
    (out / "aligned-00001").rename(out / "aligned-00001.tmp")
    assert run_align(teacher_dir, out) == 0
    rows = json.loads((out / "summary.json").read_text())
    assert [r["status"] for r in rows] == ["skipped", "aligned", "skipped"]
    assert not (out / "aligned-00001.tmp").exists()
    after = AlignedShards(out)[25]
    for key in ("labels", "topk_ids", "topk_logprobs"):
        np.testing.assert_array_equal(after[key], before[key])
    assert "total" in format_summary(rows)


@pytest.mark.slow
def test_cli_workers_and_band_give_the_same_shards(teacher_dir, tmp_path):
    assert run_align(teacher_dir, tmp_path / "one") == 0
    assert run_align(teacher_dir, tmp_path / "two", "--workers", "2", "--band", "64") == 0
    one, two = AlignedShards(tmp_path / "one"), AlignedShards(tmp_path / "two")
    assert len(one) == len(two) == 60
    for i in range(60):  # GSM8K pairs stay well inside a 64-wide band
        for key in ("input_ids", "labels", "topk_ids", "topk_logprobs"):
            np.testing.assert_array_equal(one[i][key], two[i][key])


def test_cli_malformed_line_names_file_and_line(teacher_dir, tmp_path, capsys):
    bad = tmp_path / "teacher"
    bad.mkdir()
    good = (teacher_dir / "teacher" / "samples-00000.jsonl").read_text().splitlines()
    broken = json.loads(good[2])
    broken["tokens"] = broken["tokens"][:-1]
    (bad / "samples-00000.jsonl").write_text("\n".join([good[0], good[1], json.dumps(broken)]) + "\n")
    args = ["align", "--teacher-data", str(bad), "--student-tokenizer", str(teacher_dir / "student"),
            "--out", str(tmp_path / "o"), "--no-progress"]
    assert specialize_main(args) == 1
    err = capsys.readouterr().err
    assert "samples-00000.jsonl:3" in err and "concatenate" in err
    (bad / "samples-00000.jsonl").write_text(good[0] + "\n{not json\n")
    assert specialize_main(args) == 1
    assert "samples-00000.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert specialize_main(args[:2] + [str(tmp_path / "nothing")] + args[3:]) == 1
    assert "no teacher shards" in capsys.readouterr().err


@pytest.mark.slow
def test_benchmark_quick_runs_and_writes_json(tmp_path, shared_data, capsys):
    from specialize.benchmarks.bench_aligner import main as bench_main
    out = tmp_path / "aligner_quick.json"
    assert bench_main(["--quick", "--data", str(shared_data), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    providers = {r["provider"] for r in result["rows"]}
    assert {"python-ref", "numba-1t", "numba-2t", "numba-2t-b16"} <= providers
    assert result["config"]["pairs"] == 400 and result["projection_300k"]["end_to_end_cpu_on_2_cores_min"] > 0
    assert result["shards_byte_identical"] is True  # the packed and per-record paths, measured side by side
    assert set(result["end_to_end"]) == {"packed", "per-record", "packed, 2 samples per question"}
    assert result["headline"]["pairs"] == 800 and result["headline"]["cpu_us_per_pair"] > 0
    for path in ("packed", "per-record"):
        assert set(result["phases_us_per_pair"][path]["cpu"]) == {"read", "tokenize", "encode", "dp", "map", "write"}
    assert result["end_to_end"]["packed"]["start_cpu_s"] >= 0
    assert result["projection_300k"]["start_plus_per_pair_cpu_on_2_cores_s"] > 0
    assert set(result["student_tokenize_us_per_text"]) == {"full", "cached_cold", "cached_warm"}
    assert "python-ref" in capsys.readouterr().out
