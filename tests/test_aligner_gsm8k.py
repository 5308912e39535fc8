"""Numba aligner vs the plain-Python reference on every GSM8K train rationale.

Teacher side: p50k_base (code-davinci-002's table) token strings of each rationale, with
a synthetic top-5 per position (the sampled token, its space-flipped twin, a newline and
random vocabulary tokens). Student side: a T5-style Unigram trained here on GSM8K text.
Each side is computed once per module; alignment and mapping must be identical.
"""

import numpy as np
import pytest
from naive_aligner import naive_align, naive_map, naive_surfaces

from specialize.aligner import StudentVocab, align_codes_many, map_distributions
from specialize.aligner.codebook import Codebook
from specialize.aligner.normalise import encode_surfaces, student_surfaces, teacher_surfaces
from specialize.aligner.packed import align_chunk
from specialize.aligner.records import TeacherRecord
from specialize.aligner.student import StudentTokenizer
from specialize.aligner.teacher_tokenizers import load_teacher_tokenizer, tokenize_text
from specialize.engine.data import load_gsm8k
from specialize.engine.tokenizers import train_t5_unigram

K = 5


def synthetic_top_k(tokens, pool, rng):
    """[[token_str, logprob], ...] per token; probabilities sum to < 1 (a tail is left out)."""
    probs = rng.dirichlet(np.ones(6), size=len(tokens))[:, :5]  # column 6 = mass outside the top-k
    others = rng.integers(0, len(pool), size=(len(tokens), 2))
    return [[[a, float(lp)] for a, lp in zip((tok, " " + tok.lstrip(), "\n", pool[o[0]], pool[o[1]]), np.log(p))]
            for tok, p, o in zip(tokens, probs, others)]


@pytest.fixture(scope="module")
def gsm8k_pairs(shared_data):
    train = load_gsm8k("train", shared_data / "gsm8k")
    assert len(train) == 7473
    texts = [ex.rationale for ex in train]
    student = train_t5_unigram(texts[:3000], vocab_size=4000)
    enc = load_teacher_tokenizer(str(shared_data / "tokenizers" / "p50k_base.tiktoken"))
    rng = np.random.default_rng(0)
    pool = [enc.decode_single_token_bytes(int(i)).decode("utf-8", "replace") for i in rng.integers(0, 50000, 3000)]
    teacher = [tokenize_text(enc, text) for text in texts]
    labels = student(texts)["input_ids"]
    pieces = [student.convert_ids_to_tokens(lab[:-1]) for lab in labels]
    unknown = [[i == student.unk_token_id for i in lab[:-1]] for lab in labels]
    top = [synthetic_top_k(toks, pool, rng) for toks in teacher]
    return {"texts": texts, "student": student, "teacher": teacher, "labels": labels, "pieces": pieces,
            "unknown": unknown, "top": top}


@pytest.fixture(scope="module")
def numba_side(gsm8k_pairs):
    d = gsm8k_pairs
    codes, pendings = [], []
    for toks, pieces, unk in zip(d["teacher"], d["pieces"], d["unknown"]):
        surf, pending = teacher_surfaces(toks)
        codes.append(encode_surfaces(surf, student_surfaces(pieces), unk))
        pendings.append(pending)
    results = align_codes_many([c[0] for c in codes], [c[1] for c in codes], [c[2] for c in codes], threads=2)
    vocab = StudentVocab(d["student"].get_vocab())
    maps = [map_distributions(lab, s2t, top, pend, vocab, K)
            for lab, (_, _, s2t), top, pend in zip(d["labels"], results, d["top"], pendings)]
    return results, maps


@pytest.fixture(scope="module")
def naive_side(gsm8k_pairs):
    d = gsm8k_pairs
    vocab = d["student"].get_vocab()
    out = []
    for toks, pieces, unk, lab, top in zip(d["teacher"], d["pieces"], d["unknown"], d["labels"], d["top"]):
        surf, pending = naive_surfaces(toks)
        cost, path, s2t = naive_align(surf, pieces, [0 if s == "" else 1 for s in surf], s_unknown=unk)
        out.append((cost, path, s2t, naive_map(lab, s2t, top, pending, vocab, K)))
    return out


def test_every_rationale_identical_alignment(numba_side, naive_side):
    results, _ = numba_side
    assert len(results) == len(naive_side) == 7473
    for n, ((cost, path, s2t), (ncost, npath, ns2t, _)) in enumerate(zip(results, naive_side)):
        assert cost == ncost, f"rationale {n}: cost {cost} vs reference {ncost}"
        assert [tuple(p) for p in path.tolist()] == npath, f"rationale {n}: paths differ"
        assert s2t.tolist() == ns2t, f"rationale {n}: 1:1 matches differ"


def test_every_rationale_identical_mapping(numba_side, naive_side):
    _, maps = numba_side
    for n, ((ids, lps, stats), (*_, (rows, mapped, kept))) in enumerate(zip(maps, naive_side)):
        ref_ids = np.array([[sid for sid, _ in row] for row in rows], np.int32)
        ref_lps = np.array([[lp for _, lp in row] for row in rows], np.float32)
        np.testing.assert_array_equal(ids, ref_ids, err_msg=f"rationale {n}: top-k ids differ")
        np.testing.assert_array_equal(lps, ref_lps, err_msg=f"rationale {n}: top-k logprobs differ")
        assert stats.mapped == mapped and stats.kept_mass == pytest.approx(kept, rel=1e-12)


def test_invariants_on_real_text(gsm8k_pairs, numba_side):
    results, maps = numba_side
    vocab_size = len(gsm8k_pairs["student"].get_vocab())
    total_mapped = total_positions = 0
    for (cost, path, s2t), toks, (ids, lps, stats), lab in zip(results, gsm8k_pairs["teacher"], maps,
                                                                gsm8k_pairs["labels"]):
        t_idx, s_idx = path[:, 0], path[:, 1]
        # covers both sequences end to end, each index once, in increasing order (monotone)
        assert t_idx[t_idx >= 0].tolist() == list(range(len(toks)))
        assert s_idx[s_idx >= 0].tolist() == list(range(len(lab) - 1))
        assert ((ids >= -1) & (ids < vocab_size)).all()
        valid = ids >= 0
        assert (ids[:, 0] >= 0).all() and np.isneginf(lps[~valid]).all()
        assert (np.exp(lps.astype(np.float64)).sum(axis=1) <= 1 + 1e-6).all()  # kept mass ≤ 1
        assert ids[-1, 0] == lab[-1] == 1 and lps[-1, 0] == 0  # eos one-hot
        for row in ids[valid.sum(axis=1) > 1]:
            assert len(set(row[row >= 0].tolist())) == (row >= 0).sum()  # merged duplicates
        total_mapped += stats.mapped
        total_positions += stats.positions
    # the two tokenizers agree on most of GSM8K's text: most positions carry the teacher
    assert total_mapped / total_positions > 0.6


def test_newline_tokens_vanish_and_pass_their_marker(gsm8k_pairs):
    toks = gsm8k_pairs["teacher"][0]
    surf, pending = teacher_surfaces(toks)
    nl = toks.index("\n")
    assert surf[nl] == "" and pending[nl + 1] and surf[nl + 1].startswith("▁")


def test_every_rationale_identical_on_the_packed_path(gsm8k_pairs, naive_side):
    """The bulk path (codebook, packed DP, compiled mapping) in chunks of 1024, as
    `specialize align` runs it, equals the plain-Python twin on all 7,473 pairs."""
    d = gsm8k_pairs
    stok = StudentTokenizer(d["student"])
    book = Codebook(stok.pieces, stok.vocab, stok.unk_id)
    records = [TeacherRecord(str(n), text, text, 0, "", toks, top)
               for n, (text, toks, top) in enumerate(zip(d["texts"], d["teacher"], d["top"]))]
    n = 0
    for start in range(0, len(records), 1024):
        chunk = records[start:start + 1024]
        out = align_chunk(chunk, [str(i) for i in range(len(chunk))], stok, book, threads=2)
        for p in range(len(chunk)):
            rows, mapped, kept = naive_side[n][3]
            a, b = out["lab_off"][p], out["lab_off"][p + 1]
            assert out["labels"][a:b].tolist() == d["labels"][n]
            np.testing.assert_array_equal(out["topk_ids"][a:b], np.array([[i for i, _ in r] for r in rows], np.int32),
                                          err_msg=f"rationale {n}: top-k ids differ")
            np.testing.assert_array_equal(out["topk_logprobs"][a:b],
                                          np.array([[lp for _, lp in r] for r in rows], np.float32),
                                          err_msg=f"rationale {n}: top-k logprobs differ")
            assert out["mapped"][p] == mapped and out["kept"][p] == kept, f"rationale {n}: stats differ"
            n += 1
    assert n == 7473
