"""Teacher records (`samples-*.jsonl`, fields of specialize.engine.teacher.records): parse and check.

`check_record` is the one statement of what a record must hold; every problem is a
`TeacherRecordError` naming file:line and the field. The bulk reader's per-line decoder
(`_decode`, used by `Chunk`) decodes each line straight into a typed `TeacherRecord` with
msgspec, which checks the types and `logprob <= 0` while parsing, in C (about the cost of parsing alone; a Python
pass over every alternative cost more than the parse). A line it refuses, or one that
needs filling in (no 'tokens' or 'top_logprobs'), goes through the standard library and
`check_record`, which names the problem — or accepts what only the typed decoder is
stricter about (a bool logprob or sample_index; NaN, a lone surrogate or a positive
logprob are refused by both) — so both readers take and refuse the same records, with
the same messages.

`iter_packed_chunks` (the bulk reader) goes one step further: one compiled pass over a
chunk's lines (top_logprobs.scan_lines) finds each line's `top_logprobs` and reads its
alternatives, and msgspec decodes the rest of each line (the value replaced by 0, so
msgspec does not step over ~10 KB of top-k per GSM8K record); a chunk that reader does not
accept, or whose strings msgspec refuses later (`Chunk.per_line`), is decoded line by line
as above.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import msgspec

from .teacher_tokenizers import tokenize_text
from .top_logprobs import PackedTopK, scan_lines

_FIELDS = (("qid", str), ("question", str), ("text", str), ("sample_index", int))
_TEXT_FIELDS = ("qid", "question", "text")


class TeacherRecordError(ValueError):
    """A teacher record that cannot be aligned; the message names file and line."""


class _RecordFields(msgspec.Struct):
    """The fields the aligner reads besides `top_logprobs` (others in the line are skipped while
    decoding): what the bulk reader decodes from a line without its top_logprobs value;
    `TeacherRecord` adds the value decoded (the per-line path)."""
    qid: str
    question: str
    text: str
    sample_index: int
    gold: Any
    tokens: Optional[list[str]] = None


class TeacherRecord(_RecordFields):
    """A record with its top-k decoded and checked (every logprob <= 0)."""
    top_logprobs: Optional[list[list[tuple[str, Annotated[float, msgspec.Meta(le=0)]]]]] = None


_DECODER = msgspec.json.Decoder(TeacherRecord)


_FIELDS_DECODER = msgspec.json.Decoder(_RecordFields)  # a line without its top_logprobs (bulk reader)


def _lone_surrogate(s: str) -> int | None:
    """Index of the first lone surrogate in s (text no tokenizer or UTF-8 file takes), or None."""
    if s.isascii():
        return None
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def parse_line(line: str, where: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise TeacherRecordError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None


def check_record(rec, where: str, teacher_enc=None) -> dict:
    """Check one parsed record in place (filling 'tokens' from `teacher_enc` and a missing
    'top_logprobs' with empty lists); raises TeacherRecordError naming `where`."""
    if not isinstance(rec, dict):
        raise TeacherRecordError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for key, kind in _FIELDS:
        if not isinstance(rec.get(key), kind):
            raise TeacherRecordError(f"{where}: field {key!r} must be {kind.__name__}, "
                                     f"got {rec.get(key)!r:.60}")
    for key in _TEXT_FIELDS:
        at = _lone_surrogate(rec[key])
        if at is not None:
            raise TeacherRecordError(f"{where}: field {key!r} has a lone surrogate (U+{ord(rec[key][at]):04X}) "
                                     f"at character {at}: not valid Unicode text, no tokenizer takes it")
    if "gold" not in rec:
        raise TeacherRecordError(f"{where}: missing field 'gold'")
    tokens = rec.get("tokens")
    if tokens is None and teacher_enc is not None:
        tokens = rec["tokens"] = tokenize_text(teacher_enc, rec["text"])
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise TeacherRecordError(f"{where}: field 'tokens' must be a list of strings")
    if "".join(tokens) != rec["text"]:
        raise TeacherRecordError(f"{where}: 'tokens' do not concatenate to 'text'")
    top = rec.get("top_logprobs")
    if top is None:  # no distributions (e.g. sample matching): every position one-hot
        top = rec["top_logprobs"] = [[] for _ in tokens]
    if not isinstance(top, list) or len(top) != len(tokens):
        raise TeacherRecordError(f"{where}: 'top_logprobs' must have one list per token "
                                 f"({len(tokens)}), got {len(top) if isinstance(top, list) else top!r:.40}")
    for t, alts in enumerate(top):
        for alt in alts if isinstance(alts, list) else [None]:
            ok = (isinstance(alt, list) and len(alt) == 2 and isinstance(alt[0], str)
                  and isinstance(alt[1], (int, float)) and alt[1] <= 0 and not math.isnan(alt[1]))
            if not ok:
                raise TeacherRecordError(f"{where}: top_logprobs[{t}] entry {alt!r:.60} is not "
                                         f"[token_str, logprob <= 0]")
    return rec


def read_teacher_records(path: Path, teacher_enc=None) -> list[dict]:
    """Parse and check one whole `samples-*.jsonl` shard (the per-record path)."""
    records = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            line = _utf8(raw, where)
            if not line.strip():
                continue
            records.append(check_record(parse_line(line, where), where, teacher_enc))
    return records


def _utf8(line: bytes, where: str) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TeacherRecordError(f"{where}: not valid UTF-8 (byte {e.start})") from None


def _decode(line: bytes, where: str, teacher_enc=None) -> TeacherRecord | None:
    """One line of the bulk reader (None: a blank line)."""
    try:
        rec = _DECODER.decode(line)
        if (rec.tokens is not None and rec.top_logprobs is not None and len(rec.top_logprobs) == len(rec.tokens)
                and "".join(rec.tokens) == rec.text):
            return rec
    except (msgspec.DecodeError, UnicodeDecodeError):  # ValidationError included; bad UTF-8 in a string
        pass
    text = _utf8(line, where)
    if not text.strip():
        return None
    d = check_record(parse_line(text, where), where, teacher_enc)
    return TeacherRecord(d["qid"], d["question"], d["text"], d["sample_index"], d["gold"], d["tokens"],
                         d["top_logprobs"])


def read_packed(lines: list[bytes]) -> tuple[list[_RecordFields], PackedTopK] | None:
    """The records of a chunk's lines (without their top_logprobs) and their alternatives
    packed, or None where the per-line decoder must decide: a line the compiled scan or
    msgspec does not take, no 'tokens', tokens that do not spell the text, or a count of
    top_logprobs lists other than the token count."""
    scanned = scan_lines(lines)
    if scanned is None:
        return None
    records = []
    for line in scanned.without_top(lines):
        try:
            rec = _FIELDS_DECODER.decode(line)
        except (msgspec.DecodeError, UnicodeDecodeError):
            return None
        if rec.tokens is None or "".join(rec.tokens) != rec.text:
            return None
        records.append(rec)
    if scanned.lists.tolist() != [len(r.tokens) for r in records]:
        return None
    return records, scanned.top


class Chunk:
    """Up to `chunk` checked records of a shard with the file:line of each; `top` holds their
    alternatives packed (then the records are `_RecordFields`, without `top_logprobs`), or
    is None (the records were decoded line by line and hold lists)."""

    def __init__(self, lines: list[bytes], wheres: list[str], teacher_enc=None):
        self.lines, self._line_wheres, self._teacher_enc = lines, wheres, teacher_enc
        self.wheres = wheres
        self.records, self.top = read_packed(lines) or (self._decoded(), None)

    def _decoded(self) -> list[TeacherRecord]:
        pairs = [(rec, where) for line, where in zip(self.lines, self._line_wheres)
                 if (rec := _decode(line, where, self._teacher_enc)) is not None]  # None: a blank line
        self.wheres = [where for _, where in pairs]
        return [rec for rec, _ in pairs]

    def per_line(self) -> None:
        """Decode the records line by line instead (the packed alternatives are dropped)."""
        self.records, self.top = self._decoded(), None


def iter_packed_chunks(path: Path, chunk: int, teacher_enc=None) -> Iterator[Chunk]:
    """Checked records of one shard, `chunk` lines at a time (only one chunk of parsed JSON is
    alive at a time), with each chunk's alternatives packed where the compiled reader takes
    them; blank lines are skipped."""
    lines, wheres = [], []
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.isspace():  # a blank line (bytes.strip() would copy every line to tell)
                continue
            lines.append(line)
            wheres.append(f"{path}:{lineno}")
            if len(lines) == chunk:
                yield Chunk(lines, wheres, teacher_enc)
                lines, wheres = [], []
    if lines:
        yield Chunk(lines, wheres, teacher_enc)
