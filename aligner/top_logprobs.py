"""The `top_logprobs` field of a chunk of teacher records, read in compiled code.

Parsed into Python objects, a GSM8K record's top-5 is ~340 strings, floats and tuples
that the mapping then walks again; that was most of the bulk path's read and mapping time.
Here the field stays the raw JSON bytes of each line (msgspec `Raw`), and one Numba pass
over the chunk (`_scan`) checks its shape — a list per teacher token of
`[string, number]` pairs, JSON whitespace anywhere — and returns per token the number of
alternatives, per alternative the byte span of its string's content (escapes left as
written) and its logprob. Numbers are converted in the same pass (json_numbers.py: the
correctly rounded double, so the float64 msgspec gives, bit for bit); the few that module
leaves over (zeros, subnormals, more than 19 digits) are converted by msgspec itself, in
one call on a JSON array of their text — the same parser the per-line decoder uses, with
the same refusals of what is out of a double's range. Text that is not a JSON number
refuses the chunk. The strings are looked up by their raw bytes (`RawStringTable`, a
compiled open-addressing table); only strings never met before are decoded, again by
msgspec, and handed to the caller once.

`read_top_logprobs` returns None for anything it does not accept: a different shape, a
control character in a string, a number it cannot convert, a logprob > 0, a count of lists
other than the record's token count. The caller then reads that chunk with the per-line
decoder (records.py), which accepts or refuses it with the usual messages — so both readers
take and refuse the same records.
"""
from __future__ import annotations

from dataclasses import dataclass

import msgspec
import numpy as np
from numba import njit

from .json_numbers import FALLBACK, INVALID, POW5, parse_number

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
def _scan(buf, rec_off, n_tokens, counts, starts, ends, bits, fallback, nums, pow5):
    """Fill counts/starts/ends, the float64 bits of each logprob json_numbers converts, and
    for the others their index (`fallback`) and text (the blob `nums`, "[n,n,...]");
    returns (tokens, alternatives, fallbacks, blob length), or -1s at the first record it
    refuses."""
    n_tok = 0
    n_alt = 0
    n_fb = 0
    w = 0
    nums[w] = 91  # [
    w += 1
    for r in range(rec_off.shape[0] - 1):
        end = rec_off[r + 1]
        i = _ws(buf, rec_off[r], end)
        if i >= end or buf[i] != 91:
            return -1, -1, -1, -1
        i = _ws(buf, i + 1, end)
        lists = 0
        while i < end and buf[i] != 93:  # each token's list
            if lists > 0:
                if buf[i] != 44:
                    return -1, -1, -1, -1
                i = _ws(buf, i + 1, end)
            if i >= end or buf[i] != 91 or n_tok >= counts.shape[0]:
                return -1, -1, -1, -1
            i = _ws(buf, i + 1, end)
            alts = 0
            while i < end and buf[i] != 93:  # each [string, number]
                if alts > 0:
                    if buf[i] != 44:
                        return -1, -1, -1, -1
                    i = _ws(buf, i + 1, end)
                if i >= end or buf[i] != 91 or n_alt >= starts.shape[0]:
                    return -1, -1, -1, -1
                i = _ws(buf, i + 1, end)
                if i >= end or buf[i] != 34:
                    return -1, -1, -1, -1
                j = _string(buf, i, end)
                if j < 0:
                    return -1, -1, -1, -1
                starts[n_alt] = i + 1
                ends[n_alt] = j - 1
                i = _ws(buf, j, end)
                if i >= end or buf[i] != 44:
                    return -1, -1, -1, -1
                i = _ws(buf, i + 1, end)
                j, status, value = parse_number(buf, i, end, pow5)
                if status == INVALID:
                    return -1, -1, -1, -1
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
                    return -1, -1, -1, -1
                i = _ws(buf, i + 1, end)
                n_alt += 1
                alts += 1
            if i >= end:
                return -1, -1, -1, -1
            counts[n_tok] = alts
            n_tok += 1
            lists += 1
            i = _ws(buf, i + 1, end)
        if i >= end or lists != n_tokens[r] or _ws(buf, i + 1, end) != end:
            return -1, -1, -1, -1
    nums[w] = 93  # ]
    return n_tok, n_alt, n_fb, w + 1


def read_top_logprobs(raws, n_tokens) -> PackedTopK | None:
    """The packed alternatives of a chunk's raw `top_logprobs` values (`n_tokens`: each
    record's token count), or None where the per-line decoder must decide (module docstring)."""
    lengths = np.fromiter(map(len, raws), np.int64, len(raws))
    rec_off = np.zeros(len(raws) + 1, np.int64)
    np.cumsum(lengths, out=rec_off[1:])
    buf = np.frombuffer(b"".join(raws), np.uint8)
    total_tokens = int(sum(n_tokens))
    # a pair takes at least 7 bytes ('["",0]' and a comma): bounds on what the chunk can hold
    max_alts = len(buf) // 7 + 1
    counts = np.empty(total_tokens, np.int64)
    starts, ends = np.empty(max_alts, np.int64), np.empty(max_alts, np.int64)
    bits, fallback = np.empty(max_alts, np.uint64), np.empty(max_alts, np.int64)
    nums = np.empty(len(buf) + 2, np.uint8)
    n_tok, n_alt, n_fb, n_bytes = _scan(buf, rec_off, np.asarray(n_tokens, np.int64), counts, starts, ends, bits,
                                        fallback, nums, POW5)
    if n_tok != total_tokens:
        return None
    logprobs = bits[:n_alt].view(np.float64)
    if n_fb:
        try:
            logprobs[fallback[:n_fb]] = _FLOATS.decode(nums[:n_bytes].tobytes())
        except (msgspec.DecodeError, ValueError):  # not a number msgspec takes; ValueError: a count mismatch
            return None
    if not (logprobs <= 0).all():  # also refuses NaN
        return None
    return PackedTopK(buf, counts, starts[:n_alt], ends[:n_alt], logprobs)


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
        key_off = np.zeros(len(self._keys) + 1, np.int64)
        np.cumsum([len(k) for k in self._keys], out=key_off[1:])
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
