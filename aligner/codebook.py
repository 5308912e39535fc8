"""Integer codes and student ids for the bulk path, computed once per distinct string.

Teacher token strings come from a finite vocabulary, so the per-token rules of
`normalise.py` (surface, pending-marker state, DP gap) and of the mapping (an alternative's
student id) need running once per distinct (string, pending-marker state), not once per
position. `Codebook` keeps those results for the life of a shard's alignment:

- one code table shared by all pairs (equal code ⇔ equal surface, as `encode_surfaces`
  gives per pair: the DP only compares codes for equality, so the shared numbering gives
  the same alignments);
- the code of every student vocabulary id, so a pair's student codes are one array
  lookup (`<unk>` positions then get codes that equal nothing, as in `encode_surfaces`);
- per teacher token string, for both marker states: (code, gap, marker state after it),
  as a row of a table that one compiled pass walks over a chunk's packed tokens (the state
  carried from token to token; only strings met for the first time take Python);
- per alternative string: its student id when read with and without a pending marker
  (`normalise.alternative_surface`, then the vocabulary), as a row of a small table that
  is indexed in bulk — by the string itself, or by its raw JSON bytes in a chunk read by
  top_logprobs.py (`raw_rows`: the look-up is compiled; each new raw spelling is
  decoded once).

Memory grows with the distinct strings met (bounded by the teacher vocabulary, a few MiB).
"""
from __future__ import annotations

from itertools import repeat
from typing import Sequence

import msgspec
import numpy as np
from numba import njit

from .normalise import alternative_surface, student_surfaces, surface_step, teacher_gap
from .top_logprobs import PackedTopK, RawStringTable, decode_raw_string


@njit(cache=True)
def _walk_teacher(rows, t_off, table, codes, gaps, pending):
    """Per token of each packed sequence: the marker state before it, and the code and gap of
    its entry in that state (`table[row, state]` = code, gap, state after)."""
    for p in range(t_off.shape[0] - 1):
        state = 1  # the student prepends "▁" to the text
        for t in range(t_off[p], t_off[p + 1]):
            pending[t] = state
            codes[t] = table[rows[t], state, 0]
            gaps[t] = table[rows[t], state, 1]
            state = table[rows[t], state, 2]


class Codebook:
    def __init__(self, student_pieces: Sequence[str | None], vocab: dict[str, int], unk_id: int | None):
        self._codes: dict[str, int] = {}
        self.vocab, self.unk_id = vocab, unk_id
        # a piece-less id (none in practice) gets -1: a code no teacher surface has
        surfaces = student_surfaces([p if p is not None else "" for p in student_pieces])
        self.student_codes = np.array([self._code(s) if p is not None else -1
                                       for s, p in zip(surfaces, student_pieces)], np.int32)
        self._teacher_rows: dict[str, int] = {}
        self._teacher_table: list[tuple] = []  # row -> ((code, gap, after) read without marker, with)
        self._teacher_array = np.zeros((0, 2, 3), np.int32)
        self._alt_rows: dict[str, int] = {}
        self._alt_table: list[tuple[int, int]] = []   # row -> (id read without marker, id read with)
        self._alt_array = np.zeros((0, 2), np.int32)
        self._raw_rows = RawStringTable()  # raw JSON string content -> row of _alt_table

    def _code(self, surface: str) -> int:
        return self._codes.setdefault(surface, len(self._codes))

    def _add_teacher(self, token: str) -> None:
        entries = []
        for pending in (False, True):
            surface, after = surface_step(token, pending)
            entries.append((self._code(surface), teacher_gap(surface), int(after)))
        self._teacher_rows[token] = len(self._teacher_table)
        self._teacher_table.append(tuple(entries))

    def teacher(self, tokens: Sequence[str], offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Codes (int32), gaps (int32) and pending-before states (bool) of packed teacher
        sequences (`tokens` flat, `offsets` int64 [P + 1]): `teacher_surfaces` +
        `encode_surfaces` for the teacher side."""
        rows = np.fromiter(map(self._teacher_rows.get, tokens, repeat(-1)), np.int64, len(tokens))
        if (rows < 0).any():  # strings met for the first time: add each once, then look up again
            for token in set(tokens).difference(self._teacher_rows):
                self._add_teacher(token)
            rows = np.fromiter(map(self._teacher_rows.__getitem__, tokens), np.int64, len(tokens))
        if len(self._teacher_array) != len(self._teacher_table):
            self._teacher_array = np.array(self._teacher_table, np.int32).reshape(-1, 2, 3)
        codes, gaps = np.empty(len(tokens), np.int32), np.empty(len(tokens), np.int32)
        pending = np.empty(len(tokens), np.bool_)
        _walk_teacher(rows, np.asarray(offsets, np.int64), self._teacher_array, codes, gaps, pending)
        return codes, gaps, pending

    def student(self, ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Codes of packed student id sequences (offsets: int64 [P + 1]); `<unk>` at local
        position j of its sequence gets -1 - j, which equals no teacher code."""
        codes = self.student_codes[ids]
        if self.unk_id is not None:
            unk = np.flatnonzero(ids == self.unk_id)
            if len(unk):
                local = unk - offsets[np.searchsorted(offsets, unk, side="right") - 1]
                codes[unk] = -1 - local
        return codes

    def _add_alternative(self, token: str) -> None:
        ids = tuple(self.vocab.get(s, -1) if s is not None else -1
                    for s in (alternative_surface(token, False), alternative_surface(token, True)))
        self._alt_rows[token] = len(self._alt_table)
        self._alt_table.append(ids)

    def _alt_row(self, token: str) -> int:
        if token not in self._alt_rows:
            self._add_alternative(token)
        return self._alt_rows[token]

    def by_rows(self, rows: np.ndarray, pending) -> np.ndarray:
        """Student id (−1: none) of each alternative given its row (`raw_rows`) and marker state."""
        if len(self._alt_array) != len(self._alt_table):
            self._alt_array = np.array(self._alt_table, np.int32).reshape(-1, 2)
        return self._alt_array[rows, np.asarray(pending, np.intp)]

    def raw_rows(self, top: PackedTopK) -> np.ndarray | None:
        """Rows of a packed chunk's alternatives, strings given by their raw JSON spans (a
        compiled look-up; each raw spelling met for the first time is decoded once); None
        when msgspec refuses a string spelled there (the chunk is then read line by line)."""
        rows = self._raw_rows.lookup(top.buf, top.starts, top.ends)
        raw = None
        # new spellings are added a batch of positions at a time, then everything is looked up
        # again (compiled): a chunk repeats its strings, so a few rounds find them all without
        # a Python pass over every position
        while (missing := np.flatnonzero(rows < 0)[:32768]).size:
            raw = raw if raw is not None else top.buf.tobytes()
            for key in {raw[s:e] for s, e in zip(top.starts[missing].tolist(), top.ends[missing].tolist())}:
                try:
                    self._raw_rows.add(key, self._alt_row(decode_raw_string(key)))
                except (msgspec.DecodeError, UnicodeDecodeError):  # e.g. bytes that are not UTF-8
                    return None
            rows = self._raw_rows.lookup(top.buf, top.starts, top.ends)
        return rows

    def alternatives(self, tokens: Sequence[str], pending: np.ndarray) -> np.ndarray:
        """Student id (−1: none) of each alternative string read in its position's marker
        state (`pending`, bool per alternative)."""
        rows = np.fromiter(map(self._alt_rows.get, tokens, repeat(-1)), np.intp, len(tokens))
        if (rows < 0).any():  # strings met for the first time: add each once, then look up again
            for token in set(tokens).difference(self._alt_rows):
                self._add_alternative(token)
            rows = np.fromiter(map(self._alt_rows.__getitem__, tokens), np.intp, len(tokens))
        return self.by_rows(rows, pending)
