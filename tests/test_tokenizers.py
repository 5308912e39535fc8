"""Locally trained tokenizers behave like T5's SentencePiece (student) and GPT-2's BPE (teacher)."""
import json

import pytest

from specialize.engine.tokenizers import load_tokenizer, train_byte_bpe, train_t5_unigram, word_count_unigram


@pytest.fixture(scope="module")
def gsm8k_texts(shared_data):
    with open(shared_data / "gsm8k" / "train.jsonl") as f:
        return [json.loads(line)["answer"] for _, line in zip(range(1500), f)]


def test_t5_unigram_normalises_like_t5(gsm8k_texts, tmp_path):
    tok = train_t5_unigram(gsm8k_texts, vocab_size=800)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("She had  48\n\nclips.").input_ids
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "She had 48 clips."  # whitespace collapsed
    assert all(not t.startswith(" ") for t in tok.convert_ids_to_tokens(ids))
    assert tok.convert_ids_to_tokens(ids)[0].startswith("▁")
    tok.save_pretrained(tmp_path)
    assert load_tokenizer(str(tmp_path))("She had 48 clips.").input_ids == tok("She had 48 clips.").input_ids


def test_byte_bpe_keeps_newlines(gsm8k_texts):
    tok = train_byte_bpe(gsm8k_texts, vocab_size=600)
    text = "She had 48\nclips, 24 more."
    ids = tok(text).input_ids
    assert tok.decode(ids) == text
    assert tok.eos_token == "<|endoftext|>"


def test_word_count_unigram_spells_seen_words_whole(gsm8k_texts, tmp_path):
    """Every word of its texts is one piece, split where letters meet digits or punctuation as
    SentencePiece seeds split; an unseen word falls back to characters, an unseen character to <unk>;
    decoding gives the normalised text back."""
    texts = gsm8k_texts[:300]
    tok = word_count_unigram(texts, vocab_size=100_000)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    pieces = tok.convert_ids_to_tokens(tok("Natalia sold 48 clips.\nSo 48/2 = 24.").input_ids)
    assert pieces == ["▁Natalia", "▁sold", "▁48", "▁clips", ".", "▁So", "▁48", "/", "2", "▁=", "▁24", ".", "</s>"]
    for text in texts:
        ids = tok(text).input_ids
        assert tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == " ".join(text.split())
    assert tok.convert_ids_to_tokens(tok("zqxv").input_ids)[:-1] == ["▁z", "q", "x", "v"]
    assert tok.unk_token_id in tok("a ✓").input_ids
    tok.save_pretrained(tmp_path)
    assert load_tokenizer(str(tmp_path))(texts[0]).input_ids == tok(texts[0]).input_ids


def test_word_count_unigram_caps_the_vocabulary_by_frequency(gsm8k_texts):
    """The cap drops the rarest words first; characters always stay, so nothing becomes <unk>."""
    small = word_count_unigram(gsm8k_texts[:300], vocab_size=400)
    assert len(small) == 400
    assert small.convert_ids_to_tokens(small("the").input_ids)[0] == "▁the"
    for text in gsm8k_texts[:300]:
        assert small.unk_token_id not in small(text).input_ids
