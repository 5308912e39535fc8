"""Tokenizers trained locally, for offline runs and tests.

No T5 SentencePiece model can be downloaded here, so the student side uses a T5-style
Unigram tokenizer trained with Hugging Face `tokenizers`: whitespace (newlines included)
collapsed to single spaces as T5's SentencePiece normaliser does, "▁" word markers,
ids pad=0, eos=1, unk=2 as in T5. The teacher side of the demo is a GPT-2-style
byte-level BPE. Both come back as `PreTrainedTokenizerFast` and round-trip through
`save_pretrained` / `AutoTokenizer.from_pretrained`.
"""
from __future__ import annotations

from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

T5_SPECIALS = ["<pad>", "</s>", "<unk>"]
GPT_EOS = "<|endoftext|>"


def train_t5_unigram(texts: Iterable[str], vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """A T5-like Unigram tokenizer: pad=0, eos=1 (appended to every encoded text), unk=2."""
    tok = Tokenizer(models.Unigram())
    # T5's SentencePiece normaliser: NFKC, and every run of whitespace becomes one space.
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=T5_SPECIALS, unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator(texts, trainer)
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", eos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    assert fast.pad_token_id == 0 and fast.eos_token_id == 1 and fast.unk_token_id == 2
    return fast


def train_byte_bpe(texts: Iterable[str], vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE (newlines and spaces kept, "Ġ" space marker)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[GPT_EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=GPT_EOS, eos_token=GPT_EOS,
                                   pad_token=GPT_EOS, unk_token=None)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerFast:
    """A hub id or a local directory saved with `save_pretrained`."""
    return AutoTokenizer.from_pretrained(name_or_path)
