"""Token surfaces as the DP compares them, and their integer codes.

The student (T5 SentencePiece style) normalises its input: NFKC, every whitespace run
becomes one space, the text is stripped, and each word starts with the marker "▁".
Newlines therefore vanish on the student side. To compare like with like, the teacher's
token strings are rewritten the same way, token by token:

- NFKC per token (a character composed across a token boundary stays a mismatch, which
  the DP simply pays for);
- whitespace is not emitted where it stands but remembered as a *pending marker* that
  the next token with visible characters receives as a leading "▁" ("\\n", "The" →
  "", "▁The" — exactly the student's "▁The");
- a token made only of whitespace (newline, indent) thus becomes the empty surface; the
  DP leaves it unpaired at zero cost, and its distribution is dropped, since no
  student position predicts a newline.

Surfaces are case-preserving. "Ġ" and " " markers from byte-level vocabularies (the
student's pieces, or top-k strings of an HF teacher vocabulary) are read as "▁" only
where a caller says the strings use them (`byte_level=True`); teacher records hold real
characters (the teacher writes decoded text, see engine/teacher/records.py), so a literal "Ġ"
there is a letter.
"""
from __future__ import annotations

import unicodedata
from typing import Sequence

import numpy as np

MARKER = "▁"
_BYTE_LEVEL = {"Ġ": " ", "Ċ": "\n", "ĉ": "\t"}


def from_byte_level(token: str) -> str:
    """GPT-2 byte-level vocabulary spelling ("Ġthe", "Ċ") to real characters."""
    return "".join(_BYTE_LEVEL.get(ch, ch) for ch in token)


def surface_step(token: str, pending: bool, byte_level: bool = False) -> tuple[str, bool]:
    """Surface of one teacher token read with `pending` marker state, and the state after it."""
    text = unicodedata.normalize("NFKC", from_byte_level(token) if byte_level else token)
    out = []
    for ch in text:
        if ch.isspace():
            pending = True
        else:
            if pending:
                out.append(MARKER)
                pending = False
            out.append(ch)
    return "".join(out), pending


def teacher_surfaces(tokens: Sequence[str], byte_level: bool = False) -> tuple[list[str], list[bool]]:
    """Student-style surface of each teacher token, and whether a marker was pending
    before it (the state its top-k alternatives are read in)."""
    surfaces, pending_before = [], []
    pending = True  # the student prepends "▁" to the text
    for token in tokens:
        pending_before.append(pending)
        surface, pending = surface_step(token, pending, byte_level)
        surfaces.append(surface)
    return surfaces, pending_before


def alternative_surface(token: str, pending: bool, byte_level: bool = False) -> str | None:
    """Student-style surface of a top-k alternative read at a position with `pending`
    marker state; None when no single student token can spell it (whitespace only, or
    whitespace inside/after visible characters)."""
    text = unicodedata.normalize("NFKC", from_byte_level(token) if byte_level else token)
    body = text.lstrip()
    if not body or any(ch.isspace() for ch in body):
        return None
    return (MARKER if (pending or len(body) < len(text)) else "") + body


def student_surfaces(pieces: Sequence[str]) -> list[str]:
    """Student pieces with any space marker read as "▁"."""
    return [p.replace("Ġ", MARKER).replace(" ", MARKER) for p in pieces]


def encode_surfaces(t_surfaces: Sequence[str], s_surfaces: Sequence[str],
                    s_unknown: Sequence[bool] | None = None):
    """Integer codes (equal code ⇔ equal surface) and teacher gap costs for the DP.

    Student unknown-token positions get codes that equal nothing: "<unk>" spells no
    particular text. An empty teacher surface (vanished whitespace) costs 0 to skip.
    """
    table: dict[str, int] = {}
    # int32, the DP's type: align_codes_many then packs the pairs without a cast copy
    t_codes = np.array([table.setdefault(s, len(table)) for s in t_surfaces], np.int32)
    s_codes = np.array([table.setdefault(s, len(table)) for s in s_surfaces], np.int32)
    if s_unknown is not None:
        unk = np.asarray(s_unknown, bool)
        s_codes[unk] = -1 - np.flatnonzero(unk)
    t_gap = np.array([teacher_gap(s) for s in t_surfaces], np.int32)
    return t_codes, s_codes, t_gap


def teacher_gap(surface: str) -> int:
    """DP cost of leaving a teacher token unpaired: 0 for one that vanished (whitespace)."""
    return 0 if surface == "" else 1
