"""Numba DP and mapping vs the plain-Python reference on hand-picked and random inputs."""
import functools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from naive_aligner import naive_align, naive_map, naive_surfaces

from specialize.aligner import StudentVocab, align, align_codes, align_codes_many, map_distributions
from specialize.aligner.teacher_tokenizers import load_teacher_tokenizer, token_strings, tokenize_text
from specialize.engine.tokenizers import train_t5_unigram

# whitespace of every kind, emoji (with modifiers / ZWJ), combining marks, CJK, NFKC-changing forms
ALPHABET = list("abcxyz ABC 0123 .,?$%=+-/") + ["\n", "\n\n", "\t", "  ", "\u00a0", "😀", "👍🏽", "👩‍👩‍👧",
                                                  "e\u0301", "\u0301", "日本語", "中", "ﬁ", "Ａ", "½", "▁", "Ġ"]
texts = st.lists(st.sampled_from(ALPHABET), max_size=40).map("".join)


@functools.lru_cache(maxsize=None)
def teacher_enc():
    return load_teacher_tokenizer("p50k_base")


@functools.lru_cache(maxsize=None)
def student_tok():
    from conftest import SHARED_DATA

    from specialize.engine.data import load_gsm8k
    train = load_gsm8k("train", SHARED_DATA / "gsm8k")[:400]
    return train_t5_unigram([ex.rationale for ex in train], vocab_size=800)


def reference(teacher_tokens, student_pieces, band=0, unknown=None):
    surf, _ = naive_surfaces(teacher_tokens)
    return naive_align(surf, student_pieces, [0 if s == "" else 1 for s in surf], band, unknown)


def assert_same(teacher_tokens, student_pieces, band=0, unknown=None):
    got = align(teacher_tokens, student_pieces, band=band, student_unknown=unknown)
    cost, path, s2t = reference(teacher_tokens, student_pieces, band, unknown)
    assert got.cost == cost
    assert [tuple(p) for p in got.path.tolist()] == path
    assert got.s2t.tolist() == s2t
    assert_valid_path(got.path, len(teacher_tokens), len(student_pieces))
    return got


def assert_valid_path(path, n, m):
    """Monotone and covering both sequences end to end: each index exactly once, in order."""
    t_idx, s_idx = path[:, 0].tolist(), path[:, 1].tolist()
    assert [i for i in t_idx if i >= 0] == list(range(n))
    assert [j for j in s_idx if j >= 0] == list(range(m))
    assert all(i >= 0 or j >= 0 for i, j in zip(t_idx, s_idx))


@pytest.mark.parametrize("teacher, student, matched", [
    ([], [], []),
    ([], ["▁a"], [-1]),
    (["a"], [], []),
    (["Hello", " world"], ["▁Hello", "▁world"], [0, 1]),
    (["Hello", "\n", "\n", "World"], ["▁Hello", "▁World"], [0, 3]),   # newlines vanish, marker moves on
    (["  ", "\t"], [], []),                                           # whitespace only
    ([" 48"], ["▁4", "8"], [-1, -1]),                                 # split differently: one-hot
    (["The", " cat"], ["▁the", "▁cat"], [-1, 1]),                     # case preserved
])
def test_hand_picked(teacher, student, matched):
    assert assert_same(teacher, student).s2t.tolist() == matched


def test_unknown_student_token_never_matches():
    got = assert_same(["<unk>"], ["▁<unk>"], unknown=[True])
    assert got.s2t.tolist() == [-1]
    assert assert_same(["<unk>"], ["▁<unk>"]).s2t.tolist() == [0]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts, band=st.sampled_from([0, 0, 1, 3, 8]))
def test_random_text_real_tokenizers(text, band):
    teacher = tokenize_text(teacher_enc(), text)
    assert "".join(teacher) == text
    ids = student_tok()(text)["input_ids"][:-1]
    pieces = student_tok().convert_ids_to_tokens(ids)
    assert_same(teacher, pieces, band, [i == student_tok().unk_token_id for i in ids])


@settings(max_examples=150, deadline=None)
@given(teacher=st.lists(st.sampled_from(ALPHABET + ["", " a", " b"]), max_size=25),
       student=st.lists(st.sampled_from(["▁a", "a", "▁b", "b", "▁", "c", "日本語", "😀", "▁Ａ", "▁A"]), max_size=25),
       band=st.integers(0, 6))
def test_random_token_lists(teacher, student, band):
    assert_same(teacher, student, band)


def test_4k_token_sequences():
    rng = np.random.default_rng(1)
    words = [" the", " cat", " sat", "\n", " 12", ".", " apples", "日本", "😀"]
    teacher = [words[i] for i in rng.integers(0, len(words), 4096)]
    # the student sees the same text, with one word in nine split differently
    student = [p for p in naive_surfaces(teacher)[0] if p]
    student = [p if n % 9 else p + "x" for n, p in enumerate(student)]
    for band in (0, 32):
        got = assert_same(teacher, student, band)
        assert (got.s2t >= 0).mean() > 0.8


@settings(max_examples=60, deadline=None)
@given(t=st.lists(st.integers(0, 4), max_size=30), s=st.lists(st.integers(0, 4), max_size=30),
       band=st.integers(1, 5))
def test_band_bounds_full_and_equals_it_when_wide(t, s, band):
    full, _, _ = align_codes(t, s)
    banded, path, _ = align_codes(t, s, band=band)
    assert banded >= full
    assert_valid_path(path, len(t), len(s))
    assert align_codes(t, s, band=max(len(t), len(s)) + 1)[0] == full


def test_many_pairs_in_parallel_equal_one_by_one():
    rng = np.random.default_rng(2)
    pairs = [(rng.integers(0, 5, rng.integers(0, 60)), rng.integers(0, 5, rng.integers(0, 60))) for _ in range(200)]
    gaps = [rng.integers(0, 2, len(t)) for t, _ in pairs]
    for band in (0, 4):
        many = align_codes_many([t for t, _ in pairs], [s for _, s in pairs], gaps, band=band, threads=2)
        for (t, s), g, (cost, path, s2t) in zip(pairs, gaps, many):
            one = align_codes(t, s, g, band=band)
            assert cost == one[0] and np.array_equal(path, one[1]) and np.array_equal(s2t, one[2])


def test_input_validation():
    with pytest.raises(ValueError, match="band"):
        align_codes([1], [1], band=-1)
    with pytest.raises(ValueError, match="t_gap"):
        align_codes([1, 2], [1], t_gap=[1])
    with pytest.raises(ValueError, match="1-D"):
        align_codes([[1]], [1])
    with pytest.raises(ValueError, match="2 teacher sequences but 1"):
        align_codes_many([[1], [2]], [[1]])


def test_token_strings_concatenate_even_when_bytes_split():
    enc = teacher_enc()
    text = "日本語 😀 e\u0301 👩‍👩‍👧"
    ids = enc.encode_ordinary(text)
    strings = token_strings(enc, ids)
    assert len(strings) == len(ids) > len(text.split()) and "".join(strings) == text
    assert enc.n_vocab == 50281 and enc.eot_token == 50256


VOCAB = {"<pad>": 0, "</s>": 1, "<unk>": 2, "▁The": 3, "▁So": 4, "The": 5, "▁": 6, "x": 7}


@pytest.mark.parametrize("pending", [True, False])
def test_mapping_hand_picked(pending):
    top = [[["The", math.log(0.5)], [" The", math.log(0.2)], ["\n", math.log(0.1)], [" So", math.log(0.1)],
            ["Zebra", math.log(0.05)]]]
    labels, s2t = [3, 1], np.array([0], np.int32)
    ids, lps, stats = map_distributions(labels, s2t, top, [pending], StudentVocab(VOCAB), k=5)
    rows, mapped, kept = naive_map(labels, s2t.tolist(), top, [pending], VOCAB, 5)
    np.testing.assert_array_equal(ids, [[sid for sid, _ in r] for r in rows])
    np.testing.assert_array_equal(lps, np.array([[lp for _, lp in r] for r in rows], np.float32))
    if pending:  # "The" and " The" both read "▁The": merged; "\n" and "Zebra" dropped
        assert ids[0].tolist() == [3, 4, -1, -1, -1]
        assert lps[0, 0] == pytest.approx(math.log(0.7), abs=1e-6)
    else:
        assert ids[0].tolist() == [5, 3, 4, -1, -1]
    assert stats.kept_mass == pytest.approx(0.8) and stats.mapped == mapped == 1
    assert stats.kept_of_topk == pytest.approx(0.8 / 0.95)
    assert ids[1].tolist() == [1, -1, -1, -1, -1] and lps[1, 0] == 0  # eos one-hot


def test_mapping_falls_back_to_one_hot():
    top = [[["Zebra", -0.1]], [["The", -0.1]]]
    ids, lps, stats = map_distributions([7, 3, 1], np.array([0, -1], np.int32), top, [False, True],
                                        StudentVocab(VOCAB), k=2)
    assert ids.tolist() == [[7, -1], [3, -1], [1, -1]] and (lps[:, 0] == 0).all()
    assert stats.mapped == 0 and stats.positions == 2 and stats.mapped_share == 0
