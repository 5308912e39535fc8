"""The compiled top_logprobs reader (aligner/top_logprobs.py) against msgspec's typed decoder.

Reference: records.TeacherRecord decoded by msgspec (what the per-line reader does). On
hypothesis records written in every JSON spelling (ASCII escapes or raw UTF-8, compact or
indented, escaped quotes and control characters, numbers as ints, exponents, -0) the
reader gives the same alternatives and bit-identical logprobs; on lines it does not take
it answers None (the per-line decoder then decides), and the packed path writes the same
shards as the per-record path.
"""
import json

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_aligner_cli import teacher_dir  # noqa: F401 (the module-scoped fixture)
from test_aligner_packed import both_paths, write_lines

from specialize.aligner.bulk import align_teacher_dir
from specialize.aligner.records import _DECODER, TeacherRecordError, read_packed
from specialize.aligner.top_logprobs import RawStringTable, decode_raw_string

STRINGS = ["a", " a", "\n", "\"", "\\", "/", "\t", "\x01", "\x7f", "é", "日本", "😀", "▁", "", "  x", "\u2028"]
# logprobs as a teacher writes them (repr of a double) and as JSON allows them
NUMBERS = st.one_of(st.floats(max_value=0.0, allow_nan=False).map(repr).filter(lambda s: "inf" not in s),
                    st.sampled_from(["0", "-0", "-0.0", "-1", "-1e-400", "-1E+2", "-2.5e-3", "-12345678901234567890123",
                                     "-1e308", "-4.9e-324", "-0.1000000000000000055511151231257827"]))
alternative = st.tuples(st.lists(st.sampled_from(STRINGS), max_size=3).map("".join), NUMBERS)
top = st.lists(st.lists(alternative, max_size=6), max_size=8)


def spell(top_lists, ensure_ascii, compact):
    """The JSON text of a top_logprobs value, numbers exactly as given."""
    sep = "," if compact else ", "
    pair = lambda s, n: f"[{json.dumps(s, ensure_ascii=ensure_ascii)}{sep}{n}]"  # noqa: E731
    return "[" + sep.join("[" + sep.join(pair(s, n) for s, n in alts) + "]" for alts in top_lists) + "]"


def line(top_text, n_tokens):
    tokens = ["t"] * n_tokens
    return (f'{{"qid": "q", "question": "Q", "text": "{"t" * n_tokens}", "sample_index": 0, "gold": 1, '
            f'"tokens": {json.dumps(tokens)}, "top_logprobs": {top_text}}}').encode()


def read(lines):
    """What records.Chunk does with the lines before the per-line fallback."""
    packed = read_packed(lines)
    return packed[1] if packed is not None else None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=st.lists(top, min_size=1, max_size=4), ensure_ascii=st.booleans(), compact=st.booleans())
def test_same_alternatives_and_bits_as_msgspec(records, ensure_ascii, compact):
    lines = [line(spell(t, ensure_ascii, compact), len(t)) for t in records]
    want = [_DECODER.decode(b).top_logprobs for b in lines]  # the typed decoder takes every one of these
    got = read(lines)
    assert got is not None
    flat = [alt for rec in want for alts in rec for alt in alts]
    assert got.counts.tolist() == [len(alts) for rec in want for alts in rec]
    raw = got.buf.tobytes()
    assert [decode_raw_string(raw[s:e]) for s, e in zip(got.starts, got.ends)] == [s for s, _ in flat]
    np.testing.assert_array_equal(got.logprobs.view(np.int64), np.array([lp for _, lp in flat], np.float64).view(np.int64))


OTHER_VALUES = st.one_of(st.integers(), st.text(max_size=6), st.none(), st.booleans(), st.lists(st.integers(), max_size=3),
                         # a nested top_logprobs key, and text that spells one: neither is the record's
                         st.just({"top_logprobs": [[["x", -1.0]]], "k": [{}, []]}), st.just('"top_logprobs": [[["y", -2]]]'))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(top_lists=top, order=st.permutations(["qid", "question", "text", "sample_index", "gold", "tokens", "top_logprobs"]),
       others=st.dictionaries(st.sampled_from(["finish_reason", "meta", "token_logprobs", "é"]), OTHER_VALUES, max_size=3),
       indent=st.sampled_from([None, 1]), ensure_ascii=st.booleans())
def test_any_key_order_and_other_fields(top_lists, order, others, indent, ensure_ascii):
    """The line walker finds top_logprobs wherever the teacher put it, past any other field,
    and msgspec reads the rest: the same records and alternatives as the typed decoder."""
    n = len(top_lists)
    fields = {"qid": "q", "question": "Q?", "text": "t" * n, "sample_index": 3, "gold": {"a": [1]}, "tokens": ["t"] * n,
              "top_logprobs": [[[s, float(x)] for s, x in alts] for alts in top_lists]}
    rec = {**{k: fields[k] for k in order}, **others}
    text = json.dumps(rec, indent=indent, ensure_ascii=ensure_ascii).replace("\n", " ")
    want = _DECODER.decode(text)
    got = read_packed([text.encode()])
    if ensure_ascii and "é" in others:  # a key spelled with an escape: the per-line decoder's
        assert got is None
        return
    assert got is not None
    (record,), packed = got
    assert (record.qid, record.question, record.text, record.sample_index, record.gold, record.tokens) == \
        (want.qid, want.question, want.text, want.sample_index, want.gold, want.tokens)
    flat = [alt for alts in want.top_logprobs for alt in alts]
    assert packed.counts.tolist() == [len(alts) for alts in want.top_logprobs]
    raw = packed.buf.tobytes()
    assert [decode_raw_string(raw[s:e]) for s, e in zip(packed.starts, packed.ends)] == [a for a, _ in flat]
    want_bits = np.array([lp for _, lp in flat], np.float64).view(np.int64)
    np.testing.assert_array_equal(packed.logprobs.view(np.int64), want_bits)


@pytest.mark.parametrize("text", [
    '{"qid": "q", "question": "Q", "text": "t", "sample_index": 0, "gold": 1, "tokens": ["t"]}',  # no top_logprobs
    '{"qid": "q", "question": "Q", "text": "t", "sample_index": 0, "gold": 1, "tokens": ["t"], '
    '"top_logprobs": [[["a", -1]]], "top_logprobs": [[["b", -2]]]}',  # twice: msgspec's rule, not the walker's
    '{"qid": "q", "question": "Q", "text": "t", "sample_index": 0, "gold": 1, "tokens": ["t"], '
    '"top\\u005flogprobs": [[["a", -1]]]}',  # the key spelled with an escape
    '{"qid": "q", "question": "Q", "text": "t", "sample_index": 0, "gold": 1, "tokens": ["t"], '
    '"top_logprobs": [[["a", -1]]]} x',  # text after the object
    '[{"top_logprobs": [[["a", -1]]]}]',
])
def test_lines_the_walker_leaves_to_the_per_line_decoder(text):
    assert read_packed([text.encode()]) is None


@pytest.mark.parametrize("top_text", [
    '[[["a", 1]]]', '[[["a", 1e400]]]', '[[["a"]]]', '[[["a", -1, -2]]]', '[[["a", true]]]', '[[["a", NaN]]]',
    '[[["a", -Infinity]]]', '[[["a\x01", -1]]]', '[[[1, -1]]]', '[[["a", -01]]]', '[[["a", -1.]]]', '[[["a", -.5]]]',
    '[[["a", --1]]]', '[[["a", -1]],]', '[[["a", -1]]] x', 'null', '[[["a", -1]]', '[[["a\\x", -1]]]',
    '[[["a\\u12", -1]]]', '[[], []]',  # two lists for one token
])
def test_what_the_reader_refuses(top_text):
    assert read([line(top_text, 1)]) is None


def test_one_bad_record_refuses_the_chunk():
    assert read([line('[[["a", -1]]]', 1), line('[[["a", 2]]]', 1)]) is None
    assert read([line('[[["a", -1]]]', 1), line('[[["a", -2]]]', 1)]).logprobs.tolist() == [-1.0, -2.0]


def test_raw_string_table():
    table = RawStringTable()
    keys = [f"k{i}".encode() for i in range(3000)] + [b"", b"\\u00e9", "é".encode()]
    for v, k in enumerate(keys):
        table.add(k, v)
    table.add(b"k0", 99)  # a key already there keeps its value
    buf = np.frombuffer(b"".join(keys) + b"zz", np.uint8)
    ends = np.cumsum([len(k) for k in keys] + [2])
    starts = np.concatenate([[0], ends[:-1]])
    assert table.lookup(buf, starts, ends).tolist() == list(range(len(keys))) + [-1]
    assert decode_raw_string(b"\\u00e9") == decode_raw_string("é".encode()) == "é"
    with pytest.raises((msgspec.DecodeError, UnicodeDecodeError)):
        decode_raw_string(b"\xff")


@pytest.mark.parametrize("ensure_ascii, separators, indent", [(False, (",", ":"), None), (True, None, 1)])
def test_every_spelling_same_shards_as_the_per_record_path(teacher_dir, tmp_path, ensure_ascii, separators, indent):
    good = (teacher_dir / "teacher" / "samples-00000.jsonl").read_text().splitlines()
    recs = [json.loads(text) for text in good[:6]]
    recs[0]["top_logprobs"][0].append(["\"quoted\" \\ é 日本", -0.25])
    if ensure_ascii:  # a lone surrogate in an alternative (only an escape can spell it): both paths alike
        recs[1]["top_logprobs"][1].append(["\ud800", -0.5])
    recs[2]["top_logprobs"][0].append(["x", 0])          # an int logprob
    lines = [json.dumps(r, ensure_ascii=ensure_ascii, separators=separators, indent=indent).replace("\n", " ")
             for r in recs]
    write_lines(tmp_path / "t" / "samples-00000.jsonl", lines)
    both_paths(tmp_path / "t", str(teacher_dir / "student"), tmp_path)


def test_bytes_that_are_not_utf8_inside_an_alternative(teacher_dir, tmp_path):
    """The raw reader leaves string bytes undecoded; the codebook's decoding refuses them and
    the per-line decoder names the line, as on the per-record path."""
    good = (teacher_dir / "teacher" / "samples-00000.jsonl").read_bytes().splitlines()
    rec = json.loads(good[1])
    rec["top_logprobs"][0].append(["BAD", -0.5])
    path = tmp_path / "t" / "samples-00000.jsonl"
    path.parent.mkdir()
    path.write_bytes(good[0] + b"\n" + json.dumps(rec).replace('"BAD"', '"B\xffD"').encode("latin-1") + b"\n")
    errors = []
    for impl in ("packed", "per-record"):
        with pytest.raises(TeacherRecordError, match="not valid UTF-8") as e:
            align_teacher_dir(tmp_path / "t", str(teacher_dir / "student"), tmp_path / impl, progress=False,
                              implementation=impl)
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "samples-00000.jsonl:2:" in errors[0]
