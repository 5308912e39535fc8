"""Plain-Python reference for specialize.aligner: the same DP and mapping, written
directly on surface strings (no integer codes, no Numba), for the tests to compare with.

Kept deliberately simple, but the inner loop is tight enough to run over all GSM8K
train rationales inside the test budget.
"""
from __future__ import annotations

import math
import unicodedata

SUB, SGAP = 2, 1


def band_rows(n, m, band):
    if band <= 0 or n == 0:
        return [(0, m)] * (n + 1)
    rows = []
    for i in range(n + 1):
        centre = i * m // n
        reach = -(-((i + 1) * m) // n)
        rows.append((max(0, centre - band), min(m, max(reach, centre) + band)))
    rows[n] = (rows[n][0], m)
    return rows


def naive_align(t, s, t_gap, band=0, s_unknown=None):
    """t, s: surface strings; t_gap: skip cost per teacher token. Returns (cost, path, s2t)
    with path a list of (teacher idx | -1, student idx | -1)."""
    n, m = len(t), len(s)
    # an unknown student token equals nothing: give it a fresh object as its surface
    s = [object() if (s_unknown and s_unknown[j]) else x for j, x in enumerate(s)]
    rows = band_rows(n, m, band)
    INF = float("inf")
    # cells outside a row's band hold INF, so the recurrence needs no range checks
    prev = [INF] * (m + 1)
    prev[0] = 0
    for j in range(1, rows[0][1] + 1):
        prev[j] = prev[j - 1] + SGAP
    moves = [bytearray(b"L" * (m + 1))]
    moves[0][0] = ord("D")
    for i in range(1, n + 1):
        lo, hi = rows[i]
        ti, gi = t[i - 1], t_gap[i - 1]
        cur = [INF] * (m + 1)
        mv = bytearray(m + 1)
        if lo == 0:
            cur[0] = prev[0] + gi
            mv[0] = ord("U")
        for j in range(max(lo, 1), hi + 1):
            best, step = prev[j - 1] + (0 if ti == s[j - 1] else SUB), 68  # "D"
            c = prev[j] + gi
            if c < best:
                best, step = c, 85  # "U"
            c = cur[j - 1] + SGAP
            if c < best:
                best, step = c, 76  # "L"
            cur[j] = best
            mv[j] = step
        moves.append(mv)
        prev = cur
    path, s2t = [], [-1] * m
    i, j = n, m
    while i > 0 or j > 0:
        step = moves[i][j] if i > 0 else 76
        if step == 68:
            path.append((i - 1, j - 1))
            if t[i - 1] == s[j - 1]:
                s2t[j - 1] = i - 1
            i, j = i - 1, j - 1
        elif step == 85:
            path.append((i - 1, -1))
            i -= 1
        else:
            path.append((-1, j - 1))
            j -= 1
    path.reverse()
    return prev[m], path, s2t


def naive_surfaces(tokens):
    """Student-style teacher surfaces and the pending-marker state before each token."""
    out, pend, pending = [], [], True
    for tok in tokens:
        pend.append(pending)
        s = ""
        for ch in unicodedata.normalize("NFKC", tok):
            if ch.isspace():
                pending = True
                continue
            if pending:
                s += "▁"
                pending = False
            s += ch
        out.append(s)
    return out, pend


def naive_alternative(token, pending):
    text = unicodedata.normalize("NFKC", token)
    body = text.lstrip()
    if body == "" or any(c.isspace() for c in body):
        return None
    return ("▁" if pending or body != text else "") + body


def naive_map(labels, s2t, top_logprobs, pending, vocab, k):
    """Rows of (ids, logprobs) per label position, and (mapped, kept_mass)."""
    rows, mapped, kept = [], 0, 0.0
    for t, label in enumerate(labels):
        i = s2t[t] if t < len(s2t) else -1
        pairs = []
        if i >= 0:
            for tok, lp in top_logprobs[i]:
                surf = naive_alternative(tok, pending[i])
                if surf is None or surf not in vocab:
                    continue
                sid = vocab[surf]
                for c, (other, olp) in enumerate(pairs):
                    if other == sid:
                        hi, lo = max(olp, lp), min(olp, lp)
                        pairs[c] = (sid, hi if lo == -math.inf else hi + math.log1p(math.exp(lo - hi)))
                        break
                else:
                    pairs.append((sid, lp))
        if pairs:
            pairs = sorted(pairs, key=lambda p: -p[1])[:k]
            mapped += 1
            kept += sum(math.exp(lp) for _, lp in pairs)
        else:
            pairs = [(label, 0.0)]
        pairs += [(-1, -math.inf)] * (k - len(pairs))
        rows.append(pairs)
    return rows, mapped, kept
