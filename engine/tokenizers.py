"""Tokenizers trained locally, for offline runs and tests.

No T5 SentencePiece model can be downloaded here, so the student side uses a T5-style
Unigram tokenizer built with Hugging Face `tokenizers` (trained by its UnigramTrainer, or, for a
small closed world such as the demo's, made from word counts): whitespace (newlines included)
collapsed to single spaces as T5's SentencePiece normaliser does, "▁" word markers,
ids pad=0, eos=1, unk=2 as in T5. The teacher side of the demo is a GPT-2-style
byte-level BPE. Both come back as `PreTrainedTokenizerFast` and round-trip through
`save_pretrained` / `AutoTokenizer.from_pretrained`.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

T5_SPECIALS = ["<pad>", "</s>", "<unk>"]
GPT_EOS = "<|endoftext|>"


def _t5_normalizer() -> normalizers.Normalizer:
    # T5's SentencePiece normaliser: NFKC, and every run of whitespace becomes one space.
    return normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()])


def _t5_pipeline(tok: Tokenizer) -> Tokenizer:
    tok.normalizer = _t5_normalizer()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return tok


def train_t5_unigram(texts: Iterable[str], vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """A T5-like Unigram tokenizer: pad=0, eos=1 (appended to every encoded text), unk=2."""
    tok = _t5_pipeline(Tokenizer(models.Unigram()))
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=T5_SPECIALS, unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return _t5_fast(tok)


# SentencePiece's default seed segmentation: a piece never crosses a change of script (letters,
# digits, the rest), so "12." is "12" + "." and "Let's" is "Let" + "'" + "s".
_SEGMENT = re.compile(r"[^\W\d_]+|\d+|[\W_]")


def word_count_unigram(texts: Iterable[str], vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """A T5-like Unigram whose pieces are the texts' whole words, split where the script changes,
    scored by their log frequency; every character seen is a piece too, alone and after "▁", so any
    text of those characters encodes without <unk>.

    It stands in for a student vocabulary pretrained on broad text (T5's 32k SentencePiece pieces
    cover every word and small number of a math story as one piece). `train_t5_unigram` is the
    wrong tool on a small closed world: on the demo's 447 distinct words, Hugging Face's
    UnigramTrainer keeps 476 of 800 pieces and spells "answer" as "▁an" "s" "w" "er" and " 3" as
    "▁" "3", so few student tokens line up with the teacher's.
    """
    segments: Counter[str] = Counter()
    chars: Counter[str] = Counter()
    normalizer = _t5_normalizer()
    for text in texts:
        for word in normalizer.normalize_str(text).split(" "):
            parts = _SEGMENT.findall(word)
            segments.update(["▁" + parts[0]] + parts[1:] if parts else [])
            chars.update(word)
    alphabet = ["▁"] + sorted(chars) + ["▁" + c for c in sorted(chars)]
    total = sum(segments.values())
    room = max(0, vocab_size - len(T5_SPECIALS) - len(alphabet))
    in_alphabet = set(alphabet)
    words = [w for w, _ in segments.most_common() if w not in in_alphabet][:room]
    score = {w: math.log(segments[w] / total) for w in words + alphabet if segments[w]}
    # A character never seen alone costs more than any word, so the Viterbi spelling takes whole
    # words and falls back to characters (rarer ones costlier) only for what the vocabulary lacks.
    floor = min(score.values(), default=0.0) - 1.0
    n_chars = sum(chars.values())
    score |= {c: floor - math.log(n_chars / chars.get(c[-1], 1)) for c in alphabet if c not in score}
    vocab = [(s, 0.0) for s in T5_SPECIALS] + sorted(score.items(), key=lambda kv: -kv[1])
    return _t5_fast(_t5_pipeline(Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))))


def _t5_fast(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """T5's ids and post-processing: eos appended to every text; pad=0, eos=1, unk=2."""
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
