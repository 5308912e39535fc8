"""Locally trained tokenizers behave like T5's SentencePiece (student) and GPT-2's BPE (teacher)."""
import json

import pytest

from specialize.engine.tokenizers import load_tokenizer, train_byte_bpe, train_t5_unigram


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
