"""The per-piece cached student tokenization (aligner/piece_cache.py) against the full tokenizer.

References: `tokenizers.Tokenizer.encode` of the original object (the caller's, never the
copy the cache reads), on every GSM8K train rationale and question, on hypothesis strings
(unicode, whitespace of every kind and number, the Metaspace character, added tokens,
digits), and for several pipelines: the T5-style one of the project, a FlanT5-shaped one
(WhitespaceSplit + Metaspace, a normaliser only the tokenizer itself can apply), and ones
the cache must refuse (byte-level BPE).
"""
import functools
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_aligner_dp import ALPHABET, student_tok
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from specialize.aligner.piece_cache import plan_for
from specialize.aligner.student import StudentTokenizer
from specialize.engine.data import load_gsm8k
from specialize.engine.tokenizers import train_byte_bpe

# whitespace Python and Rust disagree on (\x1c-\x1f), Unicode spaces, runs, the replacement
# character, added tokens spelled inside text, digits
EXTRA = ["\x0b", "\x0c", "\r", "\x1c", "\x1f", "\x85", "\u2028", "\u3000", "\u200b", "   ", " \n ", "▁▁",
         "</s>", "<pad>", "<unk>", "<s", "12", "3.5", "1,000", "$", "x" * 30]
strings = st.lists(st.sampled_from(ALPHABET + EXTRA), max_size=40).map("".join) | st.text(max_size=40)


def _train_unigram(texts, normalizer, pre_tokenizer, vocab_size=600):
    tok = Tokenizer(models.Unigram())
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    tok.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                                           unk_token="<unk>", show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return tok


@functools.lru_cache(maxsize=None)
def rationales():
    from conftest import SHARED_DATA
    return load_gsm8k("train", SHARED_DATA / "gsm8k")


def _pipelines():
    texts = [ex.rationale for ex in rationales()[:300]]
    meta = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    return {
        # FlanT5's shape: its Precompiled normaliser is stood in for by one the cache does not restate
        "flan-shaped": _train_unigram(texts, normalizers.Sequence([normalizers.NFKD(), normalizers.StripAccents(),
                                                                   normalizers.Replace(Regex(" {2,}"), " ")]),
                                      pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), meta])),
        "lowercase, whitespace split": _train_unigram(
            texts, normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(" ", " ")]),
            pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), meta])),
        "no normaliser": _train_unigram(texts, None, meta),
    }


@functools.lru_cache(maxsize=None)
def pipelines():
    return {"t5-style (engine.tokenizers)": student_tok().backend_tokenizer, **_pipelines()}


def wrapped(tok: Tokenizer) -> StudentTokenizer:
    return StudentTokenizer(PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>"))


def expected(tok: Tokenizer, texts):
    return [e.ids for e in tok.encode_batch(list(texts))]


def unpacked(packed):
    ids, off = packed
    assert ids.dtype == np.int32 and off[0] == 0 and off[-1] == len(ids)
    return [ids[a:b].tolist() for a, b in zip(off[:-1], off[1:])]


def test_python_whitespace_is_rust_whitespace_plus_four():
    """The rule piece_cache relies on: str.split() splits on Rust's whitespace and \\x1c-\\x1f only."""
    split = pre_tokenizers.WhitespaceSplit()
    rust = {chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF
            and len(split.pre_tokenize_str(f"a{chr(c)}b")) == 2}
    python = {chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()}
    assert python - rust == {"\x1c", "\x1d", "\x1e", "\x1f"} and rust <= python


def test_plans():
    assert plan_for(json_spec(student_tok().backend_tokenizer)).ascii_steps  # restated on ASCII
    flan = plan_for(json_spec(pipelines()["flan-shaped"]))
    assert flan.whitespace_split and flan.ascii_steps is None  # the tokenizer's own normaliser
    assert plan_for(json_spec(train_byte_bpe([ex.rationale for ex in rationales()[:50]]).backend_tokenizer)) is None
    first = _train_unigram(["a b"], None, pre_tokenizers.Metaspace(prepend_scheme="first"), vocab_size=10)
    assert plan_for(json_spec(first)) is None


def json_spec(tok: Tokenizer) -> dict:
    import json
    return json.loads(tok.to_str())


def test_every_gsm8k_rationale_and_question():
    tok = student_tok().backend_tokenizer
    stok = wrapped(tok)
    texts = [ex.rationale for ex in rationales()] + [ex.question for ex in rationales()]
    assert len(texts) == 2 * 7473
    want = expected(tok, texts)
    assert stok.encode(texts) == want
    assert stok.encode(texts) == want  # from a warm cache
    assert sum(stok.cached_encoder.encode(t) is None for t in texts) < 10  # the cached path did the work
    fresh = wrapped(tok)  # the batch path from empty caches, in chunks as the aligner calls it, then warm
    for _ in range(2):
        assert sum((unpacked(fresh.encode_packed(texts[i:i + 1024])) for i in range(0, len(texts), 1024)), []) == want
    _, _, taken = fresh.cached_encoder.encode_packed(texts)
    assert taken.mean() > 0.9  # ASCII texts: the batch path did the work


@pytest.mark.parametrize("name", ["flan-shaped", "lowercase, whitespace split", "no normaliser"])
def test_other_pipelines_on_gsm8k(name):
    tok = pipelines()[name]
    texts = [ex.rationale for ex in rationales()[300:1300]]
    stok = wrapped(tok)
    assert stok.cached_encoder is not None
    assert stok.encode(texts) == expected(tok, texts)
    assert unpacked(wrapped(tok).encode_packed(texts)) == expected(tok, texts)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(strings, min_size=1, max_size=6))
def test_hypothesis_strings_equal_the_full_tokenizer(batch):
    for tok in pipelines().values():
        assert wrapped_cached(id(tok)).encode(batch) == expected(tok, batch)
        assert unpacked(wrapped_cached(id(tok)).encode_packed(batch)) == expected(tok, batch)


def test_batch_path_with_a_full_word_pool(monkeypatch):
    """The word pool is emptied when it holds MAX_CACHED words; ids stay those of the tokenizer."""
    import specialize.aligner.piece_cache as piece_cache
    monkeypatch.setattr(piece_cache, "MAX_CACHED", 50)
    tok = pipelines()["t5-style (engine.tokenizers)"]
    stok = wrapped(tok)
    texts = [ex.rationale for ex in rationales()[:400]]
    for i in range(0, len(texts), 40):
        assert unpacked(stok.encode_packed(texts[i:i + 40])) == expected(tok, texts[i:i + 40])
    assert len(stok.cached_encoder._words) < 50 + 40 * 200


@functools.lru_cache(maxsize=None)
def wrapped_cached(tok_id):  # one StudentTokenizer per pipeline, so the cache is shared across examples
    return wrapped(next(t for t in pipelines().values() if id(t) == tok_id))


def test_byte_level_pipeline_takes_the_full_tokenizer():
    hf = train_byte_bpe([ex.rationale for ex in rationales()[:200]])
    stok = StudentTokenizer(hf)
    texts = [ex.rationale for ex in rationales()[200:400]] + ["  two  spaces\n", ""]
    assert stok.cached_encoder is None
    assert stok.encode(texts) == hf(texts)["input_ids"]


def test_a_pickled_tokenizer_rebuilds_its_cache():
    import pickle
    stok = wrapped(pipelines()["no normaliser"])
    text = [rationales()[0].rationale]
    first = stok.encode(text)
    clone = pickle.loads(pickle.dumps(stok))
    assert "_cached" not in clone.__dict__ and clone.encode(text) == first


def test_batch_path_with_an_added_token_holding_a_space():
    """An added token whose content has whitespace may appear only once the text is normalised
    ("7  =" squeezes to "7 ="): the batch path must leave such a batch to the full tokenizer."""
    tok = Tokenizer.from_str(pipelines()["t5-style (engine.tokenizers)"].to_str())
    tok.add_tokens(["7 ="])
    stok = wrapped(tok)
    texts = ["So 7  = 7.", "a\t7 \n=b", "plain words here", "7 = 7"] + [ex.rationale for ex in rationales()[:50]]
    for batch in (texts, texts[:1], texts[1:2], texts[2:3], texts[4:]):
        assert unpacked(stok.encode_packed(batch)) == expected(tok, batch)
    assert stok.cached_encoder.encode_packed(texts[:1]) is None  # found in the squeezed text only
