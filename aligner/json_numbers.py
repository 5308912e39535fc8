"""JSON numbers to float64 in compiled code, correctly rounded, with an explicit fallback.

The bulk reader (top_logprobs.py) meets ~340 logprobs per GSM8K record. Handing their text
to msgspec and the resulting Python floats to NumPy cost about as much as scanning the
whole field, so the scan converts them itself with the Eisel–Lemire algorithm (D. Lemire,
"Number Parsing at a Gigabyte per Second", 2021, §5–6): the decimal mantissa w (at most 19
significant digits, so it fits in 64 bits) is multiplied by a 128-bit truncation of 5^q,
and the top bits give the double's mantissa. The result is the correctly rounded double —
the one every correct parser (msgspec, Python's `float`) gives — whenever the algorithm can
tell; where it cannot it says so and the caller converts that number the slow way.

`parse_number` returns such a "not here" (`FALLBACK`) for: more than 19 significant digits,
a zero mantissa (msgspec gives -0 → +0.0 for the integer literal but -0.0 for "-0.0": the
rule stays msgspec's), exponents outside [-342, 308] or results that would be subnormal or
infinite, and the rare products whose truncated low bits leave the rounding undecided.
Logprobs as teachers write them are all normal doubles of 1–17 digits: OpenAI's short
decimals ("-0.0031282704") and Python's 17-digit `repr` of a float32 or float64 alike.
tests/test_aligner_json_numbers.py compares every result bit for bit with `float(text)`
and msgspec, on random doubles' `repr` and on random JSON decimal strings.
"""
from __future__ import annotations

import numpy as np
from numba import njit

SMALLEST_Q, LARGEST_Q = -342, 308
INVALID, FALLBACK, OK = -1, 0, 1


def _pow5_table() -> np.ndarray:
    """[q - SMALLEST_Q] -> (high, low) 64-bit halves of 5^q scaled into [2^127, 2^128):
    truncated for q >= 0, and for q < 0 the reciprocal 2^b / 5^-q rounded up (q >= -27,
    where 2^b / 5^-q is computed to 128 bits exactly) or truncated from twice the bits."""
    rows = []
    for q in range(SMALLEST_Q, LARGEST_Q + 1):
        if q >= 0:
            v = 5 ** q
            v = v << (128 - v.bit_length()) if v.bit_length() <= 128 else v >> (v.bit_length() - 128)
        else:
            p = 5 ** -q
            z = (p - 1).bit_length()  # smallest z with 2^z >= p
            if q >= -27:
                v = (1 << (z + 127)) // p + 1
            else:
                v = (1 << (2 * z + 128)) // p + 1
                v >>= max(0, v.bit_length() - 128)
        rows.append((v >> 64, v & (2 ** 64 - 1)))
    return np.array(rows, np.uint64)


POW5 = _pow5_table()

_M32 = np.uint64(0xFFFFFFFF)
_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)


@njit(cache=True, inline="always")
def _mul128(a, b):
    """(high, low) of the 128-bit product of two uint64."""
    a_lo, a_hi = a & _M32, a >> np.uint64(32)
    b_lo, b_hi = b & _M32, b >> np.uint64(32)
    p0, p1, p2, p3 = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo, a_hi * b_hi
    mid = (p0 >> np.uint64(32)) + (p1 & _M32) + (p2 & _M32)
    low = (p0 & _M32) | (mid << np.uint64(32))
    high = p3 + (p1 >> np.uint64(32)) + (p2 >> np.uint64(32)) + (mid >> np.uint64(32))
    return high, low


@njit(cache=True, inline="always")
def _eisel_lemire(w, q, negative, pow5):
    """Bits of the double nearest to (-1)^negative · w · 10^q, for 0 < w < 2^64 and
    SMALLEST_Q <= q <= LARGEST_Q; (FALLBACK, 0) where undecided, subnormal or infinite."""
    lz = 0
    for s in (32, 16, 8, 4, 2, 1):  # leading zeros of w, then w normalised to bit 63
        if w < (np.uint64(1) << np.uint64(64 - s)):
            w = w << np.uint64(s)
            lz += s
    row = q - SMALLEST_Q
    high, low = _mul128(w, pow5[row, 0])
    mask = np.uint64(0x1FF)  # the bits below the 54 kept ones (52 + hidden + rounding)
    if (high & mask) == mask:  # the truncation of 5^q may matter: add the next 64 bits
        high2, _ = _mul128(w, pow5[row, 1])
        low_sum = low + high2
        if high2 > low_sum:
            high += np.uint64(1)
        low = low_sum
        if (high & mask) == mask and low == _ALL:
            return FALLBACK, np.uint64(0)
    upper = int(high >> np.uint64(63))
    shift = np.uint64(upper + 9)
    mantissa = high >> shift
    power2 = (((152170 + 65536) * q) >> 16) + 63 + upper - lz + 1023
    if power2 <= 0:
        return FALLBACK, np.uint64(0)
    if low <= np.uint64(1) and -4 <= q <= 23 and (mantissa & np.uint64(3)) == np.uint64(1):
        if (mantissa << shift) == high:  # exactly halfway: round to even
            mantissa &= ~np.uint64(1)
    mantissa += mantissa & np.uint64(1)
    mantissa >>= np.uint64(1)
    if mantissa >= (np.uint64(2) << np.uint64(52)):
        mantissa = np.uint64(1) << np.uint64(52)
        power2 += 1
    mantissa &= ~(np.uint64(1) << np.uint64(52))
    if power2 >= 0x7FF:
        return FALLBACK, np.uint64(0)
    bits = (np.uint64(power2) << np.uint64(52)) | mantissa
    if negative:
        bits |= np.uint64(1) << np.uint64(63)
    return OK, bits


@njit(cache=True, inline="always")
def parse_number(buf, i, end, pow5):
    """The JSON number starting at buf[i]: (index just past it, status, float64 bits).
    status INVALID: not a JSON number there (e.g. "-01" stops after "-0", "1." and "--1" are
    invalid); FALLBACK: a JSON number this function does not convert (module docstring)."""
    negative = False
    if i < end and buf[i] == 45:  # -
        negative = True
        i += 1
    if i >= end or not (48 <= buf[i] <= 57):
        return i, INVALID, np.uint64(0)
    w = np.uint64(0)
    digits = 0  # significant digits taken into w (leading zeros are not)
    dropped = False  # a non-zero digit past the 19th
    exp10 = 0
    if buf[i] == 48:
        i += 1
    else:
        while i < end and 48 <= buf[i] <= 57:
            if digits < 19:
                w = w * np.uint64(10) + np.uint64(buf[i] - 48)
                digits += 1
            else:
                exp10 += 1
                dropped = True
            i += 1
    literal_int = True
    if i < end and buf[i] == 46:  # .
        literal_int = False
        i += 1
        if i >= end or not (48 <= buf[i] <= 57):
            return i, INVALID, np.uint64(0)
        while i < end and 48 <= buf[i] <= 57:
            if digits == 0 and buf[i] == 48:
                exp10 -= 1  # a leading zero of the fraction: scale only
            elif digits < 19:
                w = w * np.uint64(10) + np.uint64(buf[i] - 48)
                digits += 1
                exp10 -= 1
            else:
                dropped = True
            i += 1
    if i < end and (buf[i] == 101 or buf[i] == 69):  # e E
        literal_int = False
        i += 1
        exp_negative = False
        if i < end and (buf[i] == 43 or buf[i] == 45):
            exp_negative = buf[i] == 45
            i += 1
        if i >= end or not (48 <= buf[i] <= 57):
            return i, INVALID, np.uint64(0)
        e = 0
        while i < end and 48 <= buf[i] <= 57:
            if e < 100000:  # beyond any double's range either way
                e = e * 10 + (buf[i] - 48)
            i += 1
        exp10 += -e if exp_negative else e
    if dropped or w == 0 or literal_int and digits > 15 or exp10 < SMALLEST_Q or exp10 > LARGEST_Q:
        # (an integer literal of 16+ digits is msgspec's int, converted its way)
        return i, FALLBACK, np.uint64(0)
    status, bits = _eisel_lemire(w, exp10, negative, pow5)
    return i, status, bits


@njit(cache=True)
def _parse_list(buf, pow5, bits, status):
    """Numbers separated by single commas: fill bits/status per number; returns the count."""
    n = 0
    i = 0
    end = buf.shape[0]
    while i < end:
        j, st, b = parse_number(buf, i, end, pow5)
        status[n] = st
        bits[n] = b
        n += 1
        if st == INVALID or (j < end and buf[j] != 44):
            status[n - 1] = INVALID
            return n
        i = j + 1
    return n


def parse_numbers(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(float64 values, status per text) of JSON number texts, as the compiled scan converts
    them (values are 0.0 where the status is not OK). For tests and measurements."""
    blob = np.frombuffer(",".join(texts).encode(), np.uint8)
    bits = np.zeros(len(texts), np.uint64)
    status = np.full(len(texts), INVALID, np.int64)
    _parse_list(blob, POW5, bits, status)
    return bits.view(np.float64), status
