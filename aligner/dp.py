"""Monotone token alignment by dynamic programming (edit-distance style), Numba core.

Both sequences arrive as integer codes of their normalised surfaces (equal code ⇔ equal
string; see `normalise.py`). The DP fills D[i][j] = least cost of aligning the first i
teacher tokens with the first j student tokens, with integer costs so that every
implementation breaks ties identically:

    diagonal   D[i-1][j-1] + (MATCH if codes equal else SUBSTITUTE)
    up         D[i-1][j]   + teacher_gap[i-1]   (teacher token with no student partner;
                                                 0 for a token that vanished on the
                                                 student side, e.g. a newline)
    left       D[i][j-1]   + STUDENT_GAP

SUBSTITUTE = 2 = one gap on each side, so the optimum maximises the number of exact
surface matches (an LCS), and among equal costs the traceback prefers diagonal, then
up, then left, pairing unmatched runs position by position.

Speed: the core keeps 4·cost + move in each cell so one branch-free `min` both chooses
the step and applies that tie-break; the full table is filled two rows per sweep
(≈1.3 ns per cell on this machine, ≈2 ns one row at a time as the banded fill does).

Band: row i only holds columns lo[i]..hi[i] around the scaled diagonal i·M/N, widened
so consecutive rows always overlap (a path from (0,0) to (N,M) always exists). band=0
means the full table. Memory is O(N·W) for the traceback, W the widest row.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from .offsets import offsets

MATCH, SUBSTITUTE, STUDENT_GAP = 0, 2, 1
DIAG, UP, LEFT = 0, 1, 2


@njit(cache=True)
def _band_limits(n, m, band):
    """Column range [lo[i], hi[i]] of each DP row i = 0..n."""
    lo = np.zeros(n + 1, np.int64)
    hi = np.full(n + 1, m, np.int64)
    if band <= 0 or n == 0:
        return lo, hi
    for i in range(n + 1):
        centre = (i * m) // n
        nxt = ((i + 1) * m + n - 1) // n  # reach the next row's centre: rows stay connected
        lo[i] = max(0, centre - band)
        hi[i] = min(m, max(nxt, centre) + band)
    hi[n] = m
    return lo, hi


@njit(cache=True)
def _fill_band(t_codes, s_codes, t_gap, lo, hi, move):
    """Banded fill: row i holds columns lo[i]..hi[i] (move[i, j - lo[i]]). Returns the cost."""
    n = t_codes.shape[0]
    m = s_codes.shape[0]
    # Two cost rows indexed by absolute column. Cells a row may read outside the previous
    # row's band hold INF (far below int32 overflow), so the loops need no range checks.
    inf = np.int32(1 << 29)  # costs are stored ×4 (move in the low bits during the min)
    prev = np.full(m + 1, inf, np.int32)
    cur = np.full(m + 1, inf, np.int32)
    cur[0] = 0
    move[0, 0] = DIAG
    for j in range(1, hi[0] + 1):
        cur[j] = cur[j - 1] + 4 * STUDENT_GAP
        move[0, j] = LEFT
    for i in range(1, n + 1):
        prev, cur = cur, prev
        a, b = lo[i], hi[i]
        # fence this row's band in the reused buffer (the next row reads a-1 .. hi[i+1])
        if a >= 1:
            cur[a - 1] = inf
        stop = hi[i + 1] if i < n else b
        for j in range(b + 1, stop + 1):
            cur[j] = inf
        ti = t_codes[i - 1]
        gi = np.int32(t_gap[i - 1])
        mv = move[i]
        j0 = a
        if a == 0:  # column 0: only "up"
            cur[0] = prev[0] + 4 * gi
            mv[0] = UP
            j0 = 1
        # One pass per row over values 4·cost + move: `min` then picks the cheapest step and,
        # among equal costs, DIAG (0) before UP (1) before LEFT (2) — the reference's
        # tie-break — with no branches. Slices are indexed from 0 so the compiler can drop
        # Numba's negative-index wraparound checks.
        p_row = prev[j0 - 1:b + 1]
        s_row = s_codes[j0 - 1:b]
        c_row = cur[j0:b + 1]
        m_row = mv[j0 - a:b - a + 1]
        up_step = np.int32(4 * gi + UP)
        left_base = cur[j0 - 1] if j0 > a else inf  # the cell left of the first one, if in band
        for k in range(b + 1 - j0):
            diag = p_row[k] + np.int32(4 * SUBSTITUTE) * np.int32(ti != s_row[k])
            up = p_row[k + 1] + up_step
            v = min(diag, up, left_base + np.int32(4 * STUDENT_GAP + LEFT))
            m_row[k] = np.int8(v & 3)
            left_base = v & np.int32(-4)
            c_row[k] = left_base
    return cur[m] // 4


@njit(cache=True)
def _fill_full(t_codes, s_codes, t_gap, move):
    """Full table, two rows per sweep: row i's cells feed row i+1 straight from registers,
    so each column costs one load of the row above and the two rows' dependency chains
    (each cell waits for its left neighbour) overlap — ~1.5x the one-row loop of
    `_fill_band`. Same values 4·cost + move, same tie-break. Returns the cost."""
    n = t_codes.shape[0]
    m = s_codes.shape[0]
    row = np.empty(m + 1, np.int32)  # 4·cost of the last finished row
    row[0] = 0
    move[0, 0] = DIAG
    for j in range(1, m + 1):
        row[j] = row[j - 1] + 4 * STUDENT_GAP
        move[0, j] = LEFT
    r1 = row[1:]  # indexed from 0: no wraparound checks
    left_step = np.int32(4 * STUDENT_GAP + LEFT)
    sub = np.int32(4 * SUBSTITUTE)
    i = 1
    while i + 1 <= n:  # rows i (a) and i + 1 (b)
        ta, tb = t_codes[i - 1], t_codes[i]
        up_a = np.int32(4 * t_gap[i - 1] + UP)
        up_b = np.int32(4 * t_gap[i] + UP)
        ma, mb = move[i, 1:], move[i + 1, 1:]
        move[i, 0] = UP
        move[i + 1, 0] = UP
        p_left = row[0]
        a_left = p_left + (up_a - UP)
        b_left = a_left + (up_b - UP)
        row[0] = b_left
        for k in range(m):  # column k + 1
            sk = s_codes[k]
            p_up = r1[k]
            va = min(p_left + sub * np.int32(ta != sk), p_up + up_a, a_left + left_step)
            ma[k] = np.int8(va & 3)
            a = va & np.int32(-4)
            vb = min(a_left + sub * np.int32(tb != sk), a + up_b, b_left + left_step)
            mb[k] = np.int8(vb & 3)
            b = vb & np.int32(-4)
            r1[k] = b
            p_left, a_left, b_left = p_up, a, b
        i += 2
    if i == n:  # odd n: the last row alone
        ta = t_codes[i - 1]
        up_a = np.int32(4 * t_gap[i - 1] + UP)
        ma = move[i, 1:]
        move[i, 0] = UP
        p_left = row[0]
        a_left = p_left + (up_a - UP)
        row[0] = a_left
        for k in range(m):
            p_up = r1[k]
            va = min(p_left + sub * np.int32(ta != s_codes[k]), p_up + up_a, a_left + left_step)
            ma[k] = np.int8(va & 3)
            a = va & np.int32(-4)
            r1[k] = a
            p_left, a_left = p_up, a
    return row[m] // 4


@njit(cache=True)
def _align_core(t_codes, s_codes, t_gap, band, path_out, s2t_out):
    """Fill the DP, trace back; write the path (teacher idx | -1, student idx | -1) rows
    from the start into path_out, s2t_out[j] = teacher index matched exactly to student j
    (or -1). Returns (cost, path length)."""
    n = t_codes.shape[0]
    m = s_codes.shape[0]
    lo, hi = _band_limits(n, m, band)
    if band <= 0:
        move = np.empty((n + 1, m + 1), np.int8)
        cost = _fill_full(t_codes, s_codes, t_gap, move)
    else:
        width = 1
        for i in range(n + 1):
            width = max(width, hi[i] - lo[i] + 1)
        move = np.empty((n + 1, width), np.int8)
        cost = _fill_band(t_codes, s_codes, t_gap, lo, hi, move)
    # traceback from (n, m), written backwards then reversed in place
    i, j, k = n, m, 0
    for jj in range(m):
        s2t_out[jj] = -1
    while i > 0 or j > 0:
        step = move[i, j - lo[i]] if i > 0 else LEFT
        if step == DIAG:
            path_out[k, 0] = i - 1
            path_out[k, 1] = j - 1
            if t_codes[i - 1] == s_codes[j - 1]:
                s2t_out[j - 1] = i - 1
            i -= 1
            j -= 1
        elif step == UP:
            path_out[k, 0] = i - 1
            path_out[k, 1] = -1
            i -= 1
        else:
            path_out[k, 0] = -1
            path_out[k, 1] = j - 1
            j -= 1
        k += 1
    for a in range(k // 2):
        for c in range(2):
            tmp = path_out[a, c]
            path_out[a, c] = path_out[k - 1 - a, c]
            path_out[k - 1 - a, c] = tmp
    return cost, k


@njit(cache=True, parallel=True)
def _align_many_core(t_codes, t_off, s_codes, s_off, t_gap, band, path_out, path_off, path_len, s2t_out, costs):
    """Pair p uses t_codes[t_off[p]:t_off[p+1]] etc.; its path goes to the rows
    path_off[p]... of path_out (room for N+M steps), so threads never share a buffer."""
    for p in prange(t_off.shape[0] - 1):
        t0, t1 = t_off[p], t_off[p + 1]
        s0, s1 = s_off[p], s_off[p + 1]
        cost, k = _align_core(t_codes[t0:t1], s_codes[s0:s1], t_gap[t0:t1], band,
                              path_out[path_off[p]:path_off[p] + (t1 - t0) + (s1 - s0)],
                              s2t_out[s0:s1])
        costs[p] = cost
        path_len[p] = k


def _as_codes(a, name):
    arr = np.ascontiguousarray(a, dtype=np.int32)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def align_codes(t_codes, s_codes, t_gap=None, band: int = 0):
    """Align one pair of integer-coded sequences.

    Returns (cost, path int32[L, 2], s2t int32[M]); `t_gap` (default all 1) is the cost of
    leaving each teacher token unpaired.
    """
    t = _as_codes(t_codes, "t_codes")
    s = _as_codes(s_codes, "s_codes")
    gap = np.ones(len(t), np.int32) if t_gap is None else _as_codes(t_gap, "t_gap")
    if gap.shape != t.shape:
        raise ValueError(f"t_gap has {gap.shape[0]} entries for {t.shape[0]} teacher tokens")
    _check_band(band)
    path = np.empty((len(t) + len(s), 2), np.int32)
    s2t = np.empty(len(s), np.int32)
    cost, k = _align_core(t, s, gap, int(band), path, s2t)
    return int(cost), path[:k].copy(), s2t


def _check_band(band):
    if band < 0:
        raise ValueError(f"band must be >= 0 (0 = full table), got {band}")


def _run_many(t_all, t_off, s_all, s_off, g_all, band, threads):
    """The parallel core over packed pairs; returns (path_out, path_off, path_len, s2t, costs)."""
    path_off = t_off + s_off  # pair p's path has at most N_p + M_p steps
    path_out = np.empty((int(path_off[-1]), 2), np.int32)
    s2t = np.empty(int(s_off[-1]), np.int32)
    path_len = np.zeros(len(t_off) - 1, np.int64)
    costs = np.zeros(len(t_off) - 1, np.int64)
    old = numba.get_num_threads()
    if threads:
        numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
    try:
        _align_many_core(t_all, t_off, s_all, s_off, g_all, int(band), path_out, path_off, path_len, s2t, costs)
    finally:
        numba.set_num_threads(old)
    return path_out, path_off, path_len, s2t, costs


def align_packed(t_all, t_off, s_all, s_off, t_gap, band: int = 0, threads: int | None = None) -> np.ndarray:
    """Align pairs already packed end to end (what the bulk path builds per chunk, with no
    per-pair arrays): pair p is t_all[t_off[p]:t_off[p+1]] against s_all[s_off[p]:s_off[p+1]],
    t_gap aligned with t_all. Returns s2t for all student positions (int32, indexed like
    s_all; teacher indices local to each pair, -1 where unpaired)."""
    t_all, s_all, t_gap = (_as_codes(a, n) for a, n in ((t_all, "t_all"), (s_all, "s_all"), (t_gap, "t_gap")))
    t_off = np.ascontiguousarray(t_off, np.int64)
    s_off = np.ascontiguousarray(s_off, np.int64)
    if t_gap.shape != t_all.shape or t_off.shape != s_off.shape or t_off[-1] != len(t_all) or s_off[-1] != len(s_all):
        raise ValueError("packed pairs: offsets and arrays do not agree")
    _check_band(band)
    return _run_many(t_all, t_off, s_all, s_off, t_gap, band, threads)[3]


def align_codes_many(teacher, student, gaps=None, band: int = 0, threads: int | None = None):
    """Align many pairs in one parallel Numba call (prange over pairs).

    teacher/student/gaps: sequences of 1-D integer arrays. Returns a list of
    (cost, path, s2t) like `align_codes` (views into shared output arrays).
    """
    if len(teacher) != len(student):
        raise ValueError(f"{len(teacher)} teacher sequences but {len(student)} student sequences")
    _check_band(band)
    t_len = np.fromiter(map(len, teacher), np.int64, len(teacher))
    s_len = np.fromiter(map(len, student), np.int64, len(student))
    if gaps is not None and not np.array_equal(np.fromiter(map(len, gaps), np.int64, len(gaps)), t_len):
        raise ValueError("each gap array must have one entry per teacher token")
    t_off, s_off = offsets(t_len), offsets(s_len)
    cat = lambda seqs: (np.concatenate(seqs, dtype=np.int32, casting="same_kind") if len(seqs)  # noqa: E731
                        else np.zeros(0, np.int32))
    t_all, s_all = cat(teacher), cat(student)
    g_all = np.ones(len(t_all), np.int32) if gaps is None else cat(gaps)
    path_out, path_off, path_len, s2t, costs = _run_many(t_all, t_off, s_all, s_off, g_all, band, threads)
    # views into the shared output arrays (no per-pair copies)
    ends = (path_off[:-1] + path_len).tolist()
    starts, s_starts = path_off[:-1].tolist(), s_off.tolist()
    return [(c, path_out[starts[p]:ends[p]], s2t[s_starts[p]:s_starts[p + 1]])
            for p, c in enumerate(costs.tolist())]
