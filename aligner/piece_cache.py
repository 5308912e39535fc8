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
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from itertools import chain

from tokenizers import Tokenizer

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
        self._ids = _PieceIds(backend.model)

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
