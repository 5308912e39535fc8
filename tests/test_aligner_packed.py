"""The packed bulk path (aligner/packed.py) against the plain-Python twin and the per-record path.

Hypothesis cases: random texts (whitespace of every kind, emoji, NFKC forms), real teacher
(p50k_base) and student tokenizers, random top-k alternatives (duplicates that merge,
whitespace that is dropped, ties); every output equals tests/naive_aligner.py, stats
bit for bit. On disk: the packed and per-record paths write byte-identical shards, and
accept and refuse the same lines with the same messages.
"""
import filecmp
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from naive_aligner import naive_align, naive_map, naive_surfaces
from test_aligner_cli import teacher_dir  # noqa: F401 (the module-scoped fixture)
from test_aligner_dp import ALPHABET, student_tok, teacher_enc

from specialize.aligner.bulk import align_teacher_dir
from specialize.aligner.codebook import Codebook
from specialize.aligner.packed import align_chunk
from specialize.aligner.records import TeacherRecord, TeacherRecordError
from specialize.aligner.student import StudentTokenizer
from specialize.aligner.teacher_tokenizers import tokenize_text

ALTS = ["a", " a", "The", " The", "\n", " ", "  x", "x ", "ﬁ", "Ａ", " 12", "12", "😀", "▁", "Ġa", "", "日本"]
texts = st.lists(st.sampled_from(ALPHABET), max_size=30).map("".join)
alternatives = st.lists(st.tuples(st.sampled_from(ALTS), st.sampled_from([0.0, -0.1, -0.5, -0.5, -2.0, -30.0])),
                        max_size=7)


def student():
    return StudentTokenizer(student_tok())


def naive_expected(text, top, k):
    """labels, top-k rows, mapped, kept mass of one record by the plain-Python twin."""
    hf = student_tok()
    labels = hf(text)["input_ids"]
    pieces = hf.convert_ids_to_tokens(labels[:-1])
    surf, pending = naive_surfaces(tokenize_text(teacher_enc(), text))
    _, _, s2t = naive_align(surf, pieces, [0 if s == "" else 1 for s in surf],
                            s_unknown=[i == hf.unk_token_id for i in labels[:-1]])
    rows, mapped, kept = naive_map(labels, s2t, top, pending, hf.get_vocab(), k)
    return labels, rows, mapped, kept


def assert_chunk_equals_naive(records):
    stok = student()
    out = align_chunk(records, [f"rec:{n}" for n in range(len(records))], stok,
                      Codebook(stok.pieces, stok.vocab, stok.unk_id))
    k = out["topk_ids"].shape[1]
    assert k == max([1] + [len(a) for r in records for a in r.top_logprobs])
    for p, rec in enumerate(records):
        labels, rows, mapped, kept = naive_expected(rec.text, rec.top_logprobs, k)
        a, b = out["lab_off"][p], out["lab_off"][p + 1]
        assert out["labels"][a:b].tolist() == labels
        assert out["questions"][p] == student_tok()(rec.question)["input_ids"]
        np.testing.assert_array_equal(out["topk_ids"][a:b], np.array([[i for i, _ in r] for r in rows], np.int32))
        np.testing.assert_array_equal(out["topk_logprobs"][a:b],
                                      np.array([[lp for _, lp in r] for r in rows], np.float32))
        assert out["mapped"][p] == mapped and out["kept"][p] == kept  # same sums in the same order
        assert out["positions"][p] == len(labels) - 1


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), n=st.integers(1, 4))
def test_random_records_equal_the_naive_twin(data, n):
    records = []
    for i in range(n):
        text = data.draw(texts)
        tokens = tokenize_text(teacher_enc(), text)
        top = [data.draw(alternatives) for _ in tokens]
        records.append(TeacherRecord(f"q{i}", data.draw(texts), text, i, str(i), tokens, top))
    assert_chunk_equals_naive(records)


def test_hand_picked_merge_drop_and_ties():
    text = "The cat\n\nThe dog 12 apples."
    tokens = tokenize_text(teacher_enc(), text)
    top = [[("The", -0.5), (" The", -0.5), ("\n", -0.1), ("  x", -1.0), ("The", -2.0)] for _ in tokens]
    assert_chunk_equals_naive([TeacherRecord("a", "Q?", text, 0, "1", tokens, top),
                               TeacherRecord("b", "", "", 1, "2", [], [])])


def test_text_the_tokenizer_refuses_names_the_record():
    bad = "fine \ud800 text"  # a lone surrogate: the Rust tokenizer raises TypeError
    recs = [TeacherRecord("a", "Q", "ok", 0, "1", ["ok"], [[]]), TeacherRecord("b", "Q", bad, 0, "1", [bad], [[]])]
    stok = student()
    with pytest.raises(TeacherRecordError, match=r"f\.jsonl:7: field 'text': the student tokenizer refuses it "
                                                 r"\(TypeError"):
        align_chunk(recs, ["f.jsonl:3", "f.jsonl:7"], stok, Codebook(stok.pieces, stok.vocab, stok.unk_id))


# ---- on disk: the two paths over the same teacher folder ---------------------------------------------------

def write_lines(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def assert_same_shards(a, b):
    dirs = sorted(p.name for p in a.iterdir() if p.is_dir())
    assert dirs == sorted(p.name for p in b.iterdir() if p.is_dir()) and dirs
    for d in dirs:
        for f in sorted((a / d).iterdir()):
            if f.name == "meta.json":
                ma, mb = (json.loads(p.read_text()) for p in (f, b / d / f.name))
                ma["stats"].pop("seconds"), mb["stats"].pop("seconds")
                assert ma == {**mb, "source": ma["source"]}
            else:
                assert filecmp.cmp(f, b / d / f.name, shallow=False), f"{d}/{f.name} differs"


def both_paths(teacher, student_dir, out, **kw):
    rows = {impl: align_teacher_dir(teacher, student_dir, out / impl, progress=False, implementation=impl, **kw)
            for impl in ("packed", "per-record")}
    assert_same_shards(out / "packed", out / "per-record")
    return rows


def test_byte_identical_to_per_record_path(teacher_dir, tmp_path):
    rows = both_paths(teacher_dir / "teacher", str(teacher_dir / "student"), tmp_path)
    for a, b in zip(rows["packed"], rows["per-record"]):
        timing = ("seconds", "phase_seconds", "peak_rss_mib")  # measurements, not results
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
        assert a["peak_rss_mib"] > 0
        assert set(a["phase_seconds"]["cpu"]) == {"read", "tokenize", "encode", "dp", "map", "write"}


def test_lines_the_typed_decoder_refuses_go_the_checked_way(teacher_dir, tmp_path):
    """Lines msgspec refuses or that need filling in: both paths take them alike."""
    good = (teacher_dir / "teacher" / "samples-00000.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in good[:5]]
    recs[0]["top_logprobs"][0][0][1] = False       # bool logprob: accepted by the checks (0.0)
    del recs[1]["top_logprobs"]                     # no distributions: one-hot
    recs[2]["sample_index"] = True
    recs[3]["gold"] = None
    lines = [json.dumps(r) for r in recs] + ["  ", "\u3000"]  # blank lines of both kinds are skipped
    write_lines(tmp_path / "t" / "samples-00000.jsonl", lines)
    both_paths(tmp_path / "t", str(teacher_dir / "student"), tmp_path)


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.update(text=r["text"] + "\ud800", tokens=r["tokens"] + ["\ud800"]),
     r"field 'text' has a lone surrogate \(U\+D800\)"),
    (lambda r: r["top_logprobs"][1].append(["x", float("nan")]), r"top_logprobs\[1\] entry \['x', nan\]"),
    (lambda r: r["top_logprobs"][1].append(["x", 0.5]), r"top_logprobs\[1\] entry \['x', 0.5\]"),
    (lambda r: r.pop("gold"), "missing field 'gold'"),
    (lambda r: r.update(tokens=r["tokens"][:-1], top_logprobs=r["top_logprobs"][:-1]), "do not concatenate"),
])
def test_bad_record_same_error_on_both_paths(teacher_dir, tmp_path, edit, message):
    good = (teacher_dir / "teacher" / "samples-00000.jsonl").read_text().splitlines()
    rec = json.loads(good[1])
    edit(rec)
    write_lines(tmp_path / "t" / "samples-00000.jsonl", [good[0], json.dumps(rec)])  # ensure_ascii: \ud800 escape
    errors = []
    for impl in ("packed", "per-record"):
        with pytest.raises(TeacherRecordError, match=message) as e:
            align_teacher_dir(tmp_path / "t", str(teacher_dir / "student"), tmp_path / impl, progress=False,
                              implementation=impl)
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "samples-00000.jsonl:2:" in errors[0]


def test_missing_tokens_are_made_by_the_teacher_tokenizer(teacher_dir, tmp_path, shared_data):
    good = (teacher_dir / "teacher" / "samples-00000.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in good[:4]]
    for r in recs[:2]:
        del r["tokens"], r["top_logprobs"]
    write_lines(tmp_path / "t" / "samples-00000.jsonl", [json.dumps(r) for r in recs])
    both_paths(tmp_path / "t", str(teacher_dir / "student"), tmp_path,
               teacher_tokenizer=str(shared_data / "tokenizers" / "p50k_base.tiktoken"))


def test_resume_and_workers_with_the_packed_path(teacher_dir, tmp_path, monkeypatch):
    import specialize.aligner.bulk as bulk
    monkeypatch.setattr(bulk, "SPAWN_MIN_LINES", 0)  # spawned workers even for this small folder
    out = tmp_path / "o"
    first = align_teacher_dir(teacher_dir / "teacher", str(teacher_dir / "student"), out, workers=2, progress=False)
    assert [r["status"] for r in first] == ["aligned"] * 3
    (out / "aligned-00002").rename(out / "aligned-00002.tmp")
    again = align_teacher_dir(teacher_dir / "teacher", str(teacher_dir / "student"), out, workers=2, progress=False)
    assert [r["status"] for r in again] == ["skipped", "skipped", "aligned"]
    align_teacher_dir(teacher_dir / "teacher", str(teacher_dir / "student"), tmp_path / "ref", progress=False,
                      implementation="per-record")
    assert_same_shards(out, tmp_path / "ref")
    assert math.isclose(again[2]["mapped_share"], first[2]["mapped_share"])


def test_repeated_questions_tokenized_once_same_bytes(teacher_dir, tmp_path):
    """Several samples of one question (what a teacher folder holds): the question cache
    changes nothing on disk."""
    good = (teacher_dir / "teacher" / "samples-00000.jsonl").read_text().splitlines()
    lines = [json.dumps({**json.loads(line), "sample_index": i}) for line in good[:6] for i in range(3)]
    write_lines(tmp_path / "t" / "samples-00000.jsonl", lines)
    both_paths(tmp_path / "t", str(teacher_dir / "student"), tmp_path)


def test_aligner_imports_neither_engine_nor_transformers():
    """Import direction (aligner <- engine, never back); workers that get a StudentTokenizer
    never pay for importing transformers."""
    import subprocess
    import sys
    code = ("import sys, specialize.aligner, specialize.aligner.bulk, specialize.aligner.cli; "
            "bad = [m for m in sys.modules if m.startswith('specialize.engine') or m == 'transformers']; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
