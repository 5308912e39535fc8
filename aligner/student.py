"""The student tokenizer as the bulk aligner uses it.

`load_student_tokenizer` opens a hub id or a `save_pretrained` folder (transformers is only
imported there, so aligner worker processes that receive a ready `StudentTokenizer` never
import it). `StudentTokenizer` wraps a Hugging Face tokenizer for batch work:

- a fast tokenizer is driven through a copy of its Rust backend (`encode_batch_fast`):
  the ids are those `tokenizer(texts)["input_ids"]` gives — the same post-processor appends
  the eos — without the per-call Python bookkeeping of `__call__`. The copy has truncation
  and padding switched off, as `__call__` without arguments has them, whatever the saved
  tokenizer.json holds; the caller's object is not changed.
  Texts go through `piece_cache.PieceCachedEncoder` (the model's ids cached per
  pre-tokenized piece, the same ids) where the pipeline is one it can restate exactly;
  other texts and pipelines take `encode_batch_fast`.
- a slow (Python) tokenizer falls back to `tokenizer(texts)["input_ids"]`.

`pieces[id]` is the vocabulary piece of each id (`convert_ids_to_tokens`), from which the
aligner takes the student surfaces once per vocabulary instead of once per position.
"""
from __future__ import annotations

import hashlib
import json
import os
from itertools import chain
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer

from .offsets import offsets
from .piece_cache import PieceCachedEncoder, plan_for


def load_student_tokenizer(name_or_path: str | os.PathLike):
    """A hub id or a local directory saved with `save_pretrained` (AutoTokenizer)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(name_or_path))


class StudentTokenizer:
    """Batch encoding, vocabulary, `<unk>` id and per-id pieces of a student tokenizer.
    Picklable (the backend travels as its JSON), so worker processes get it ready-made.
    `fingerprint` tells two copies of one tokenizer apart from different tokenizers."""

    def __init__(self, hf_tokenizer):
        self.unk_id = hf_tokenizer.unk_token_id
        self.vocab: dict[str, int] = hf_tokenizer.get_vocab()
        backend = hf_tokenizer.backend_tokenizer if getattr(hf_tokenizer, "is_fast", False) else None
        if backend is not None:
            spec = backend.to_str()
            self.fingerprint = hashlib.sha256(spec.encode()).hexdigest()
            self._backend = Tokenizer.from_str(spec)
            self._backend.no_truncation()
            self._backend.no_padding()
            self._slow = None
            size = self._backend.get_vocab_size(with_added_tokens=True)
            self.pieces: list[str | None] = [self._backend.id_to_token(i) for i in range(size)]
            self._plan = plan_for(json.loads(spec))
        else:
            self._backend = None
            self._plan = None
            self._slow = hf_tokenizer
            self.fingerprint = hashlib.sha256(repr(sorted(self.vocab.items())).encode()).hexdigest()
            self.pieces = hf_tokenizer.convert_ids_to_tokens(list(range(max(self.vocab.values(), default=-1) + 1)))

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_cached", None)  # rebuilt on first use in the receiving process
        return state

    @property
    def cached_encoder(self) -> PieceCachedEncoder | None:
        """The per-piece cached encoder of this tokenizer (None: its pipeline has no plan)."""
        if self._plan is None:
            return None
        if "_cached" not in self.__dict__:
            self._cached = PieceCachedEncoder(self._backend, self._plan)
        return self._cached

    @classmethod
    def load(cls, student) -> "StudentTokenizer":
        """From a `StudentTokenizer`, a Hugging Face tokenizer, or a name/path to load."""
        if isinstance(student, cls):
            return student
        if isinstance(student, (str, os.PathLike)):
            student = load_student_tokenizer(student)
        return cls(student)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Student ids of each text, eos included (what `tokenizer(texts)["input_ids"]` gives).
        Raises the tokenizer's own error (TypeError for a lone surrogate) — callers that know
        where the texts came from turn it into a message naming the record."""
        if self._backend is None:
            return self._slow(list(texts))["input_ids"]
        cached = self.cached_encoder
        if cached is None:
            return self.encode_uncached(texts)
        out = list(map(cached.encode, texts))
        rest = [i for i, ids in enumerate(out) if ids is None]
        if rest:
            for i, ids in zip(rest, self.encode_uncached([texts[i] for i in rest])):
                out[i] = ids
        return out

    def encode_packed(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """`encode` flat: (ids int32, offsets int64 [len(texts) + 1]); the per-piece cache's
        batch path (`PieceCachedEncoder.encode_packed`) where it takes the batch."""
        texts = list(texts)
        cached = self.cached_encoder if self._backend is not None else None
        packed = cached.encode_packed(texts) if cached is not None else None
        if packed is None:
            lists = self.encode(texts)
            off = offsets([len(ids) for ids in lists])
            return np.fromiter(chain.from_iterable(lists), np.int32, int(off[-1])), off
        ids, off, taken = packed
        if taken.all():
            return ids, off
        rest = np.flatnonzero(~taken)
        lists = self.encode([texts[i] for i in rest])  # the per-text path (full tokenizer where needed)
        lengths = np.diff(off)
        lengths[rest] = np.fromiter(map(len, lists), np.int64, len(lists))
        out_off = offsets(lengths)
        out = np.empty(int(out_off[-1]), np.int32)
        from_batch = np.repeat(taken, lengths)
        out[from_batch] = ids
        out[~from_batch] = np.fromiter(chain.from_iterable(lists), np.int32, int(lengths[rest].sum()))
        return out, out_off

    def encode_uncached(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` through the full tokenizer for every text (the reference the cached path equals)."""
        if self._backend is None:
            return self._slow(list(texts))["input_ids"]
        return [e.ids for e in self._backend.encode_batch_fast(list(texts))]
