"""Student tokenization with the model's ids cached per pre-tokenized piece.

A Hugging Face `tokenizers` pipeline is: split off added tokens, normalise, pre-tokenize
into pieces, run the model on *each piece on its own* (`PreTokenizedString.tokenize` calls
`Model::tokenize` per split), post-process. The model step is where most of the time goes
(a Viterbi lattice per piece for Unigram), and a math rationale repeats its words, so the
ids of a piece are cached by the piece's text. `PieceCachedEncoder.encode(text)` returns
exactly `tokenizer.encode(text).ids` (post-processor included) when every step is one of
those this module restates:

- added tokens: none of their contents occurs in the raw or the normalised text (then the
  added-token split leaves the text whole); otherwise the text takes the full tokenizer;
- normalizer: `normalizer.normalize_str` (the tokenizer's own, so exact for any normalizer
  — Precompiled included). For ASCII text and a normalizer made only of NFC/NFKC/NFD/NFKD
  (identity on ASCII), Lowercase, Strip, and Replace of the regexes `\\s+` / ` {2,}` or a
  plain string, it is computed here instead (on ASCII, `\\s` and Rust's `is_whitespace`
  are exactly `\\t\\n\\v\\f\\r` and space; Python's `str.isspace` would add \\x1c-\\x1f);
- pre-tokenizer: `Metaspace(split=True, prepend_scheme="always")`, alone or after
  `WhitespaceSplit` (T5's, FlanT5's and `engine.tokenizers.train_t5_unigram`'s). A
  normalised text that holds the replacement character itself, or is empty, takes the
  full tokenizer;
- model: Unigram, WordLevel, WordPiece, or BPE without dropout (deterministic per piece);
- post-processor: none, or `TemplateProcessing` (its single-sequence template).

`plan_for(spec)` returns None for any other pipeline — e.g. ByteLevel or Split
pre-tokenizers (GPT-2 style), `Metaspace` with `prepend_scheme` "first"/"never" or
`split=False`, BPE dropout, RobertaProcessing/BertProcessing — and the caller then uses
the full tokenizer for every text. tests/test_aligner_piece_cache.py checks equality with
the full tokenizer on all GSM8K rationales and on hypothesis strings.

`encode_packed(texts)` gives the same ids for a whole batch at once, flat with offsets,
without Python bytecode per word, where the pieces of a text are the replacement
character + each of its whitespace-split words: ASCII texts (none of \\x1c-\\x1f or
\\x00, at least one word; no added-token content in the raw or normalised batch) and a
plan whose ASCII steps are only the squeeze (`\\s+` -> " " then strip), Lowercase and
Strip — with the squeeze when pieces are not split on whitespace first. The words are
split and looked up by their bytes in compiled code (a word pool: word -> the model's ids
of its piece, bounded like the piece cache); the texts it does not take are the caller's
to encode one by one (`StudentTokenizer.encode_packed` does).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from itertools import chain

import numpy as np
from numba import njit
from tokenizers import Tokenizer

from .offsets import offsets
from .top_logprobs import RawStringTable

MAX_CACHED = 1_000_000  # pieces; the cache is emptied when it grows past this (memory stays bounded)

_ASCII_WS = "\t\n\x0b\x0c\r "
# Unicode White_Space: what Rust's char::is_whitespace (WhitespaceSplit, Strip) and Oniguruma's \s match
_UNICODE_WS = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")
_ASCII_REGEX = {r"\s+": re.compile(f"[{re.escape(_ASCII_WS)}]+"), r" {2,}": re.compile(" {2,}")}
# str.split() splits on Unicode White_Space and on these four (Python's isspace counts them):
# a text without them is split by str.split() exactly where Rust's is_whitespace splits it
_PY_ONLY_SPACE = re.compile("[\x1c-\x1f]")
_IDENTITY_ON_ASCII = {"NFC", "NFD", "NFKC", "NFKD"}
_DETERMINISTIC_MODELS = {"Unigram", "WordLevel", "WordPiece", "BPE"}


@dataclass(frozen=True)
class Plan:
    """What `plan_for` proved about a pipeline: the ASCII normaliser steps (None: call the
    tokenizer's normaliser), whether pieces are split on whitespace first, the Metaspace
    replacement, and the ids the template puts before and after the text's own."""
    ascii_steps: tuple | None
    whitespace_split: bool
    replacement: str
    prefix: tuple[int, ...]
    suffix: tuple[int, ...]


def _ascii_steps(norm: dict | None) -> tuple | None:
    if norm is None:
        return ()
    parts = norm["normalizers"] if norm["type"] == "Sequence" else [norm]
    steps: list[tuple] = []
    for n in parts:
        kind = n["type"]
        if kind in _IDENTITY_ON_ASCII:
            continue
        if kind == "Lowercase":
            steps.append(("lower",))
        elif kind == "Strip":
            steps.append(("strip", n.get("strip_left", True), n.get("strip_right", True)))
        elif kind == "Replace" and not n["content"].isascii():
            return None  # the text would leave ASCII, where the skipped NF* steps are no identity
        elif kind == "Replace" and "Regex" in n["pattern"] and n["pattern"]["Regex"] in _ASCII_REGEX:
            steps.append(("sub", _ASCII_REGEX[n["pattern"]["Regex"]], n["content"]))
        elif kind == "Replace" and "String" in n["pattern"]:
            steps.append(("replace", n["pattern"]["String"], n["content"]))
        else:
            return None
    # `\s+` -> " " then strip both ends is " ".join(text.split()) (one C pass) when the text
    # has none of _PY_ONLY_SPACE; `_normalize` checks that per text
    for i in range(len(steps) - 1):
        if steps[i][:2] == ("sub", _ASCII_REGEX[r"\s+"]) and steps[i][2] == " " and steps[i + 1] == ("strip", True, True):
            steps[i:i + 2] = [("squeeze", steps[i], steps[i + 1])]
            break
    return tuple(steps)


def _metaspace(pre: dict | None) -> tuple[bool, str] | None:
    """(whitespace_split, replacement) of a supported pre-tokenizer, else None."""
    if pre is None:
        return None
    parts = pre["pretokenizers"] if pre["type"] == "Sequence" else [pre]
    ws_split = len(parts) == 2 and parts[0]["type"] == "WhitespaceSplit"
    meta = parts[-1]
    if len(parts) != 1 + ws_split or meta["type"] != "Metaspace":
        return None
    if meta.get("prepend_scheme") != "always" or not meta.get("split", True):
        return None
    return ws_split, meta["replacement"]


def _template(post: dict | None) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    if post is None:
        return (), ()
    if post["type"] != "TemplateProcessing":
        return None
    before, after, seen = [], [], False
    for item in post["single"]:
        if "Sequence" in item:
            if seen or item["Sequence"]["id"] != "A":
                return None
            seen = True
        else:
            (after if seen else before).extend(post["special_tokens"][item["SpecialToken"]["id"]]["ids"])
    return (tuple(before), tuple(after)) if seen else None


def plan_for(spec: dict) -> Plan | None:
    """The plan for a tokenizer.json spec (`Tokenizer.to_str()`), or None when the pipeline
    is not one this module can restate exactly (see the module docstring)."""
    model = spec.get("model") or {}
    if model.get("type") not in _DETERMINISTIC_MODELS or model.get("dropout") not in (None, 0.0):
        return None
    meta, template = _metaspace(spec.get("pre_tokenizer")), _template(spec.get("post_processor"))
    if meta is None or template is None:
        return None
    return Plan(_ascii_steps(spec.get("normalizer")), meta[0], meta[1], *template)


class _PieceIds(dict):
    """piece -> the model's ids for it, filled on first look-up."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def __missing__(self, piece: str) -> list[int]:
        if len(self) >= MAX_CACHED:
            self.clear()
        ids = self[piece] = [t.id for t in self.model.tokenize(piece)]
        return ids


def _batch_steps(plan: Plan) -> bool | None:
    """For `encode_packed`: whether its texts are lowercased first (None: it cannot take this
    plan). The pieces of a normalised ASCII text are then "▁" + each word of text.split()."""
    steps = plan.ascii_steps
    if steps is None or plan.replacement.isascii() or any(s[0] not in ("squeeze", "lower", "strip") for s in steps):
        return None
    if not plan.whitespace_split and not any(s[0] == "squeeze" for s in steps):
        return None  # single spaces only after the squeeze: otherwise "a  b" has a piece "▁" alone
    return any(s[0] == "lower" for s in steps)


class PieceCachedEncoder:
    """`encode(text)` == `backend.encode(text).ids` for a backend with a plan (truncation and
    padding off, as StudentTokenizer sets them); `None` from `encode` means "take the full
    tokenizer" for this text."""

    def __init__(self, backend: Tokenizer, plan: Plan):
        self.backend, self.plan = backend, plan
        self._normalizer, self._model = backend.normalizer, backend.model
        contents = set()
        for tok in json.loads(backend.to_str()).get("added_tokens", []):
            contents.add(tok["content"])
            if self._normalizer is not None:
                contents.add(self._normalizer.normalize_str(tok["content"]))
        contents.discard("")
        self._added = re.compile("|".join(map(re.escape, sorted(contents)))) if contents else None
        self._added_has_space = any(ch.isspace() for c in contents for ch in c)
        self._ids = _PieceIds(backend.model)
        self._batch_lower = _batch_steps(plan)


    def _normalize(self, text: str) -> str:
        steps = self.plan.ascii_steps
        if steps is None or not text.isascii():
            return self._normalizer.normalize_str(text) if self._normalizer is not None else text
        for step in steps:
            if step[0] == "squeeze":
                if not _PY_ONLY_SPACE.search(text):
                    text = " ".join(text.split())
                    continue
                text = step[1][1].sub(" ", text).strip(_ASCII_WS)
            elif step[0] == "sub":
                text = step[1].sub(step[2], text)
            elif step[0] == "replace":
                text = text.replace(step[1], step[2])
            elif step[0] == "strip":
                text = text.lstrip(_ASCII_WS) if step[1] else text
                text = text.rstrip(_ASCII_WS) if step[2] else text
            else:
                text = text.lower()
        return text

    def pieces(self, normalized: str) -> list[str]:
        """Metaspace pieces of a non-empty normalised text without the replacement character in
        it: every word (split on whitespace first, when the plan says so) gets the replacement
        prepended unless it starts with a space, and each space starts a new piece
        ("a  b" -> "▁a", "▁", "▁b"; " a" -> "▁a")."""
        r = self.plan.replacement
        if self.plan.whitespace_split:
            words = normalized.split() if not _PY_ONLY_SPACE.search(normalized) else _UNICODE_WS.split(normalized)
            return [r + w for w in words if w]
        # "a  b" -> "▁a ▁ ▁b" -> ["▁a", "▁", "▁b"]: no space is left inside a piece. Metaspace
        # prepends only to a text that does not start with the replacement (a leading space has become one)
        if normalized[0] == " ":
            return normalized.replace(" ", " " + r).split(" ")[1:]
        return (r + normalized.replace(" ", " " + r)).split(" ")

    def encode(self, text: str) -> list[int] | None:
        added = self._added
        if added is not None and added.search(text):
            return None
        try:
            normalized = self._normalize(text)
        except Exception:  # e.g. a lone surrogate: the full tokenizer raises its own error for it
            return None
        if not normalized or self.plan.replacement in normalized or (added is not None and added.search(normalized)):
            return None
        ids = chain.from_iterable(map(self._ids.__getitem__, self.pieces(normalized)))
        return [*self.plan.prefix, *ids, *self.plan.suffix]

    def _word_rows(self, buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Row in the word pool (the ids of replacement + word) of each word buf[starts:ends]
        (ASCII bytes), looked up in compiled code; words met for the first time are added."""
        rows = self._words.lookup(buf, starts, ends)
        missing = np.flatnonzero(rows < 0)
        if not missing.size:
            return rows
        if len(self._words) >= MAX_CACHED:  # memory stays bounded: start again from this batch's words
            self._reset_words()
            missing = np.arange(len(starts))
        raw = buf.tobytes()
        new = list({raw[s:e] for s, e in zip(starts[missing].tolist(), ends[missing].tolist())})
        r = self.plan.replacement
        ids = [self._ids[r + w.decode("ascii")] for w in new]
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        n_rows = len(self._words)
        n_ids = int(self._pool_off[n_rows])
        need_rows, need_ids = n_rows + len(ids) + 1, n_ids + int(lengths.sum())
        if need_rows > len(self._pool_off):
            self._pool_off = np.resize(self._pool_off, 2 * need_rows)
        if need_ids > len(self._pool):
            self._pool = np.resize(self._pool, 2 * need_ids)
        self._pool_off[n_rows + 1:need_rows] = n_ids + np.cumsum(lengths)
        self._pool[n_ids:need_ids] = np.fromiter(chain.from_iterable(ids), np.int32, need_ids - n_ids)
        for row, word in enumerate(new, n_rows):
            self._words.add(word, row)
        return self._words.lookup(buf, starts, ends)

    def _reset_words(self) -> None:
        self._words = RawStringTable()  # word bytes -> row of the pool
        self._pool = np.zeros(1024, np.int32)
        self._pool_off = np.zeros(1024, np.int64)

    def encode_packed(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(ids int32 flat, offsets int64 [len(texts) + 1], taken bool [len(texts)]): for each
        text taken, ids[off[i]:off[i+1]] == `encode(texts[i])`; the others (not ASCII, holding
        one of \\x1c-\\x1f or \\x00, or no words) have no ids here and are the caller's to
        encode. None when the plan is not one this takes, or an added token's content may be
        in the batch. The words are split and looked up (by their bytes) in compiled code."""
        lower, added = self._batch_lower, self._added
        if lower is None:
            return None
        if "_words" not in self.__dict__:
            self._reset_words()
        taken = np.fromiter(map(str.isascii, texts), bool, len(texts))
        batch = [t for t, ok in zip(texts, taken) if ok] if not taken.all() else list(texts)
        joined = "\x00".join(batch)  # one C pass per check for the whole batch
        if _PY_ONLY_SPACE.search(joined) or joined.count("\x00") != max(0, len(batch) - 1):
            taken &= np.fromiter((not _PY_ONLY_SPACE.search(t) and "\x00" not in t for t in texts), bool, len(texts))
            batch = [t for t, ok in zip(texts, taken) if ok]
            joined = "\x00".join(batch)
        if added is not None and added.search(joined):
            return None
        if not batch:
            return np.zeros(0, np.int32), np.zeros(len(texts) + 1, np.int64), taken
        if lower:
            joined = joined.lower()
        buf = np.frombuffer(joined.encode("ascii"), np.uint8)
        starts, ends = np.empty(len(buf) // 2 + 1, np.int64), np.empty(len(buf) // 2 + 1, np.int64)
        text_of = np.empty(len(buf) // 2 + 1, np.int64)
        n = _split_words(buf, starts, ends, text_of)
        starts, ends, text_of = starts[:n], ends[:n], text_of[:n]
        # a normalised text is the (lowercased) text, stripped, or " ".join of its words: a
        # content without whitespace found in it is found in `joined`; one with whitespace
        # (none in the usual special tokens) may only be found in the words joined
        if added is not None and (lower and added.search(joined)
                                  or self._added_has_space and added.search(_spaced(buf, starts, ends))):
            return None
        rows = self._word_rows(buf, starts, ends)
        body_len = np.zeros(len(batch), np.int64)
        n_words = np.zeros(len(batch), np.int64)
        _count(rows, text_of, self._pool_off, body_len, n_words)
        prefix, suffix = np.array(self.plan.prefix, np.int32), np.array(self.plan.suffix, np.int32)
        has_words = n_words > 0  # a text with no words: the full tokenizer's, as in `encode`
        taken[np.flatnonzero(taken)[~has_words]] = False
        lengths = np.zeros(len(texts), np.int64)
        lengths[taken] = body_len[has_words] + len(prefix) + len(suffix)
        off = offsets(lengths)
        out = np.empty(int(off[-1]), np.int32)
        start_of = np.full(len(batch), -1, np.int64)  # batch text -> where its ids start in out
        start_of[has_words] = off[:-1][taken]
        _fill(rows, text_of, self._pool, self._pool_off, start_of, prefix, suffix, out)
        return out, off, taken


def _spaced(buf, starts, ends) -> str:
    """The words of a batch joined by single spaces."""
    raw = buf.tobytes()
    return b" ".join(raw[s:e] for s, e in zip(starts.tolist(), ends.tolist())).decode("ascii")


@njit(cache=True)
def _split_words(buf, starts, ends, text_of):
    """Spans of the words of ASCII texts separated by NUL bytes, split where str.split()
    splits them (\\t \\n \\v \\f \\r and space; the caller excludes \\x1c-\\x1f), and the
    text of each; returns the number of words."""
    n = 0
    text = 0
    i = 0
    end = buf.shape[0]
    while i < end:
        c = buf[i]
        if c == 0:
            text += 1
            i += 1
            continue
        if c == 32 or 9 <= c <= 13:
            i += 1
            continue
        j = i + 1
        while j < end and not (buf[j] == 32 or 9 <= buf[j] <= 13 or buf[j] == 0):
            j += 1
        starts[n], ends[n], text_of[n] = i, j, text
        n += 1
        i = j
    return n


@njit(cache=True)
def _count(rows, text_of, pool_off, body_len, n_words):
    """Per text of a batch: the number of its words' ids, and of its words."""
    for k in range(rows.shape[0]):
        body_len[text_of[k]] += pool_off[rows[k] + 1] - pool_off[rows[k]]
        n_words[text_of[k]] += 1


@njit(cache=True)
def _fill(rows, text_of, pool, pool_off, start_of, prefix, suffix, out):
    """Write prefix, the words' ids and suffix of every text with words (start_of >= 0)."""
    w = -1
    for t in range(start_of.shape[0]):
        if start_of[t] >= 0:
            for j in range(prefix.shape[0]):
                out[start_of[t] + j] = prefix[j]
    text = -1
    for k in range(rows.shape[0]):
        if text_of[k] != text:
            if text >= 0:
                for j in range(suffix.shape[0]):
                    out[w + j] = suffix[j]
            text = text_of[k]
            w = start_of[text] + prefix.shape[0]
        for j in range(pool_off[rows[k]], pool_off[rows[k] + 1]):
            out[w] = pool[j]
            w += 1
    if text >= 0:
        for j in range(suffix.shape[0]):
            out[w + j] = suffix[j]
