"""The `top_logprobs` field of a chunk of teacher records, read in compiled code.

Parsed into Python objects, a GSM8K record's top-5 is ~340 strings, floats and tuples
that the mapping then walks again; that was most of the bulk path's read and mapping time.
Here one Numba pass over a chunk's lines (`scan_lines`) walks the top-level keys of each
line's object, steps over every value but the `top_logprobs` one, and checks that one's
shape — a list per teacher token of `[string, number]` pairs, JSON whitespace anywhere —
returning per token the number of alternatives, per alternative the byte span of its
string's content (escapes left as written) and its logprob, and per line where the value
is (msgspec then decodes the other fields from the line without it: records.read_packed).
Numbers are converted in the same pass (json_numbers.py: the correctly rounded double, so
the float64 msgspec gives, bit for bit); the few that module leaves over (zeros,
subnormals, more than 19 digits) are converted by msgspec itself, in one call on a JSON
array of their text — the same parser the per-line decoder uses, with the same refusals of
what is out of a double's range. Text that is not a JSON number refuses the chunk. The
strings are looked up by their raw bytes (`RawStringTable`, a compiled open-addressing
table); only strings never met before are decoded, again by msgspec, and handed to the
caller once.

`scan_lines` returns None for anything it does not accept: a different shape, a control
character in a string, a number it cannot convert, a logprob > 0, a key with an escape, a
line without `top_logprobs` or with it twice; records.read_packed adds a count of lists
other than the record's token count and whatever msgspec refuses in the rest of a line.
The caller then reads that chunk with the per-line decoder (records.py), which accepts or
refuses it with the usual messages — so both readers take and refuse the same records.
"""
from __future__ import annotations

from dataclasses import dataclass

import msgspec
import numpy as np
from numba import njit

from .json_numbers import FALLBACK, INVALID, POW5, parse_number
from .offsets import offsets

_FLOATS = msgspec.json.Decoder(list[float])
_STR = msgspec.json.Decoder(str)


@dataclass
class PackedTopK:
    """One chunk's alternatives, flat: per teacher token `counts` alternatives, in order;
    per alternative its string's content span in `buf` and its logprob (float64)."""
    buf: np.ndarray       # uint8: the chunk's raw top_logprobs JSON, records back to back
    counts: np.ndarray    # int64 [Σ teacher tokens]
    starts: np.ndarray    # int64 [Σ alternatives]
    ends: np.ndarray      # int64 [Σ alternatives]
    logprobs: np.ndarray  # float64 [Σ alternatives]


@njit(cache=True, inline="always")
def _ws(buf, i, end):
    while i < end and (buf[i] == 32 or buf[i] == 10 or buf[i] == 13 or buf[i] == 9):
        i += 1
    return i


@njit(cache=True, inline="always")
def _string(buf, i, end):
    """Index just past the closing quote of the JSON string whose opening quote is at i; -1 if malformed."""
    i += 1
    while i < end:
        c = buf[i]
        if c == 34:  # "
            return i + 1
        if c < 32:
            return -1
        if c == 92:  # backslash: one escaped character, or uXXXX
            if i + 1 >= end:
                return -1
            e = buf[i + 1]
            if e == 117:  # u
                if i + 5 >= end:
                    return -1
                for h in range(i + 2, i + 6):
                    x = buf[h]
                    if not (48 <= x <= 57 or 65 <= x <= 70 or 97 <= x <= 102):
                        return -1
                i += 6
                continue
            if not (e == 34 or e == 92 or e == 47 or e == 98 or e == 102 or e == 110 or e == 114 or e == 116):
                return -1
            i += 2
            continue
        i += 1
    return -1


@njit(cache=True)
def _scan_value(buf, i, end, counts, starts, ends, bits, fallback, nums, pow5, pos):
    """Scan one top_logprobs value starting at buf[i]: append its counts/starts/ends, the
    float64 bits of each logprob json_numbers converts, and for the others their index
    (`fallback`) and text (the blob `nums`, "[n,n,...]"); `pos` holds the running (tokens,
    alternatives, fallbacks, blob length). Returns the index just past the value, or -1
    where it is not one the reader takes (or an array is full)."""
    n_tok, n_alt, n_fb, w = pos[0], pos[1], pos[2], pos[3]
    if i >= end or buf[i] != 91:
        return -1
    i = _ws(buf, i + 1, end)
    lists = 0
    while i < end and buf[i] != 93:  # each token's list
        if lists > 0:
            if buf[i] != 44:
                return -1
            i = _ws(buf, i + 1, end)
        if i >= end or buf[i] != 91 or n_tok >= counts.shape[0]:
            return -1
        i = _ws(buf, i + 1, end)
        alts = 0
        while i < end and buf[i] != 93:  # each [string, number]
            if alts > 0:
                if buf[i] != 44:
                    return -1
                i = _ws(buf, i + 1, end)
            if i >= end or buf[i] != 91 or n_alt >= starts.shape[0]:
                return -1
            i = _ws(buf, i + 1, end)
            if i >= end or buf[i] != 34:
                return -1
            j = _string(buf, i, end)
            if j < 0:
                return -1
            starts[n_alt] = i + 1
            ends[n_alt] = j - 1
            i = _ws(buf, j, end)
            if i >= end or buf[i] != 44:
                return -1
            i = _ws(buf, i + 1, end)
            j, status, value = parse_number(buf, i, end, pow5)
            if status == INVALID:
                return -1
            bits[n_alt] = value
            if status == FALLBACK:
                if n_fb > 0:
                    nums[w] = 44
                    w += 1
                for b in range(i, j):
                    nums[w] = buf[b]
                    w += 1
                fallback[n_fb] = n_alt
                n_fb += 1
            i = _ws(buf, j, end)
            if i >= end or buf[i] != 93:
                return -1
            i = _ws(buf, i + 1, end)
            n_alt += 1
            alts += 1
        if i >= end:
            return -1
        counts[n_tok] = alts
        n_tok += 1
        lists += 1
        i = _ws(buf, i + 1, end)
    if i >= end:
        return -1
    pos[0], pos[1], pos[2], pos[3] = n_tok, n_alt, n_fb, w
    return i + 1


@njit(cache=True)
def _skip_value(buf, i, end):
    """Index just past the JSON value at buf[i] (strings and brackets followed, so a value's
    own commas and quotes are stepped over); -1 if there is none. Whether it is valid JSON is
    msgspec's to decide, on the line without its top_logprobs."""
    if i >= end:
        return -1
    c = buf[i]
    if c == 34:
        return _string(buf, i, end)
    if c == 91 or c == 123:
        depth = 0
        while i < end:
            c = buf[i]
            if c == 34:
                i = _string(buf, i, end)
                if i < 0:
                    return -1
                continue
            if c == 91 or c == 123:
                depth += 1
            elif c == 93 or c == 125:
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return -1
    j = i
    while j < end and not (buf[j] == 44 or buf[j] == 125 or buf[j] == 93 or buf[j] == 32 or buf[j] == 10
                           or buf[j] == 13 or buf[j] == 9):
        j += 1
    return j if j > i else -1


_KEY = np.frombuffer(b"top_logprobs", np.uint8)


@njit(cache=True)
def _scan_lines(buf, line_off, key, counts, starts, ends, bits, fallback, nums, pow5, pos, top_span, lists):
    """Walk the top-level keys of each line's JSON object; scan the value of the one key
    spelled exactly `key` (`_scan_value`; its span in top_span, its token lists in `lists`)
    and step over the others. Returns -1, or the first line it does not take: not an object
    as far as it can tell, a key with an escape (it might spell `key`), `key` missing or
    twice, or a value `_scan_value` refuses."""
    for r in range(line_off.shape[0] - 1):
        end = line_off[r + 1]
        i = _ws(buf, line_off[r], end)
        if i >= end or buf[i] != 123:
            return r
        i = _ws(buf, i + 1, end)
        found = False
        while True:
            if i >= end or buf[i] != 34:
                return r
            j = _string(buf, i, end)
            if j < 0:
                return r
            is_key = j - i - 2 == key.shape[0]
            for k in range(i + 1, j - 1):
                if buf[k] == 92:
                    return r
                if is_key and buf[k] != key[k - i - 1]:
                    is_key = False
            i = _ws(buf, j, end)
            if i >= end or buf[i] != 58:  # :
                return r
            i = _ws(buf, i + 1, end)
            if is_key:
                if found:
                    return r
                found = True
                tokens_before = pos[0]
                top_span[r, 0] = i
                i = _scan_value(buf, i, end, counts, starts, ends, bits, fallback, nums, pow5, pos)
                top_span[r, 1] = i
                lists[r] = pos[0] - tokens_before
            else:
                i = _skip_value(buf, i, end)
            if i < 0:
                return r
            i = _ws(buf, i, end)
            if i < end and buf[i] == 44:
                i = _ws(buf, i + 1, end)
                continue
            if i < end and buf[i] == 125:
                break
            return r
        if not found or _ws(buf, i + 1, end) != end:
            return r
    return -1


@dataclass
class ScannedLines:
    """What `scan_lines` found in a chunk's lines: their alternatives packed (spans in the
    chunk's buffer), and per line the span of its top_logprobs value and its token lists."""
    top: PackedTopK
    spans: np.ndarray  # int64 [lines, 2], offsets into the chunk's buffer
    lists: np.ndarray  # int64 [lines]
    line_off: np.ndarray  # int64 [lines + 1]

    def without_top(self, lines: list[bytes]) -> list[bytes]:
        """Each line with its top_logprobs value replaced by 0 (for msgspec to decode the rest)."""
        local = (self.spans - self.line_off[:-1, None]).tolist()
        return [line[:a] + b"0" + line[b:] for line, (a, b) in zip(lines, local)]


def scan_lines(lines: list[bytes]) -> ScannedLines | None:
    """The packed alternatives of a chunk's JSON lines and where each line's top_logprobs
    is, or None where the per-line decoder must decide (module docstring). The caller checks
    the rest of each line (msgspec on `without_top`) and that `lists` equals its token count."""
    line_off = offsets([len(line) for line in lines])
    buf = np.frombuffer(b"".join(lines), np.uint8)
    # bounds on what the chunk can hold: a token's list takes at least 3 bytes ('[]' and a
    # comma), a pair at least 7 ('["",0]' and a comma); np.empty leaves unused pages untouched
    max_lists, max_alts = len(buf) // 3 + 1, len(buf) // 7 + 1
    counts = np.empty(max_lists, np.int64)
    starts, ends = np.empty(max_alts, np.int64), np.empty(max_alts, np.int64)
    bits, fallback = np.empty(max_alts, np.uint64), np.empty(max_alts, np.int64)
    nums = np.empty(len(buf) + 2, np.uint8)
    nums[0] = 91  # [
    pos = np.array([0, 0, 0, 1], np.int64)
    spans, lists = np.empty((len(lines), 2), np.int64), np.empty(len(lines), np.int64)
    if _scan_lines(buf, line_off, _KEY, counts, starts, ends, bits, fallback, nums, POW5, pos, spans, lists) >= 0:
        return None
    n_tok, n_alt, n_fb, n_bytes = pos.tolist()
    nums[n_bytes] = 93  # ]
    logprobs = bits[:n_alt].view(np.float64)
    if n_fb:
        try:
            logprobs[fallback[:n_fb]] = _FLOATS.decode(nums[:n_bytes + 1].tobytes())
        except (msgspec.DecodeError, ValueError):  # not a number msgspec takes; ValueError: a count mismatch
            return None
    if not (logprobs <= 0).all():  # also refuses NaN
        return None
    return ScannedLines(PackedTopK(buf, counts[:n_tok], starts[:n_alt], ends[:n_alt], logprobs), spans, lists, line_off)


_EMPTY = -1


@njit(cache=True)
def _hash(buf, s, e):
    h = np.uint64(14695981039346656037)  # FNV-1a, 64 bit
    for i in range(s, e):
        h = (h ^ np.uint64(buf[i])) * np.uint64(1099511628211)
    return h


@njit(cache=True)
def _insert_all(pool, key_off, table):
    mask = table.shape[0] - 1
    for k in range(key_off.shape[0] - 1):
        slot = np.int64(_hash(pool, key_off[k], key_off[k + 1]) & np.uint64(mask))
        while table[slot] != _EMPTY:
            slot = (slot + 1) & mask
        table[slot] = k


@njit(cache=True)
def _lookup(buf, starts, ends, pool, key_off, table, values, out):
    """out[a] = values[key] of the key equal to buf[starts[a]:ends[a]], or -1 (not in the table)."""
    mask = table.shape[0] - 1
    for a in range(starts.shape[0]):
        s, e = starts[a], ends[a]
        slot = np.int64(_hash(buf, s, e) & np.uint64(mask))
        out[a] = -1
        while table[slot] != _EMPTY:
            k = table[slot]
            k0 = key_off[k]
            if key_off[k + 1] - k0 == e - s:
                same = True
                for i in range(e - s):
                    if pool[k0 + i] != buf[s + i]:
                        same = False
                        break
                if same:
                    out[a] = values[k]
                    break
            slot = (slot + 1) & mask


class RawStringTable:
    """Raw JSON string content (bytes, escapes as written) -> an int the caller assigns per
    decoded string. Two spellings of one string ("\\u00e9" and "é") are two keys with the
    same value. `lookup` is compiled; new keys are added in bulk (the table is rebuilt,
    kept at most half full)."""

    def __init__(self):
        self._keys: list[bytes] = []
        self._values: list[int] = []
        self._index: dict[bytes, int] = {}
        self._arrays = None

    def __len__(self) -> int:
        return len(self._keys)

    def _build(self):
        pool = np.frombuffer(b"".join(self._keys), np.uint8) if self._keys else np.zeros(0, np.uint8)
        key_off = offsets([len(k) for k in self._keys])
        table = np.full(1 << max(4, (2 * len(self._keys)).bit_length()), _EMPTY, np.int64)
        _insert_all(pool, key_off, table)
        self._arrays = (pool, key_off, table, np.array(self._values, np.int64))

    def lookup(self, buf, starts, ends) -> np.ndarray:
        if self._arrays is None:
            self._build()
        out = np.empty(len(starts), np.int64)
        _lookup(buf, starts, ends, *self._arrays, out)
        return out

    def add(self, key: bytes, value: int) -> None:
        if key not in self._index:
            self._index[key] = len(self._keys)
            self._keys.append(key)
            self._values.append(value)
            self._arrays = None


def decode_raw_string(key: bytes) -> str:
    """The string a raw JSON string content spells (msgspec, as the per-line decoder reads it)."""
    return _STR.decode(b'"' + key + b'"')
