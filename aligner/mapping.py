"""One sample: align teacher tokens with student tokens, then carry the teacher's top-k
distributions over to student ids.

A student position gets the teacher's distribution only where it is paired 1:1 with a
teacher token of the same surface (then both predict the same text at the same point).
Each alternative is spelled the student's way (`normalise.alternative_surface`) and
looked up in the student vocabulary; alternatives the student cannot spell as one token
are dropped (their mass is lost, which the stats report), and alternatives that land on
the same student id are merged (log-sum-exp). Every other position — unpaired,
mismatched, or with nothing left after dropping — is one-hot on the student's own token
([label, 0.0], as the paper did). Padding: id −1, logprob −inf (probability 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from numba import njit

from .dp import align_codes
from .normalise import alternative_surface, encode_surfaces, student_surfaces, teacher_surfaces

PAD_ID = -1
PAD_LOGPROB = -math.inf


@dataclass
class Alignment:
    cost: int
    path: np.ndarray        # int32 [L, 2]: (teacher index | -1, student index | -1), monotone
    s2t: np.ndarray         # int32 [M]: teacher token paired 1:1 with equal surface, else -1
    teacher_surfaces: list[str]
    student_surfaces: list[str]
    pending: list[bool]     # marker state before each teacher token (for its alternatives)


def align(teacher_tokens: Sequence[str], student_tokens: Sequence[str], band: int = 0,
          student_unknown: Sequence[bool] | None = None, byte_level: bool = False) -> Alignment:
    """Align teacher token strings (real characters) with student pieces ("▁" markers)."""
    t_surf, pending = teacher_surfaces(teacher_tokens, byte_level=byte_level)
    s_surf = student_surfaces(student_tokens)
    t_codes, s_codes, t_gap = encode_surfaces(t_surf, s_surf, student_unknown)
    cost, path, s2t = align_codes(t_codes, s_codes, t_gap, band=band)
    return Alignment(cost, path, s2t, t_surf, s_surf, pending)


@dataclass
class MappingStats:
    positions: int = 0      # student target positions (eos excluded)
    mapped: int = 0         # positions that carry a teacher distribution
    kept_mass: float = 0.0  # Σ over mapped positions of the teacher probability kept
    topk_mass: float = 0.0  # Σ over mapped positions of the teacher's listed top-k mass
    samples: int = 0

    def __add__(self, other: "MappingStats") -> "MappingStats":
        return MappingStats(self.positions + other.positions, self.mapped + other.mapped,
                            self.kept_mass + other.kept_mass, self.topk_mass + other.topk_mass,
                            self.samples + other.samples)

    @property
    def mapped_share(self) -> float:
        return self.mapped / self.positions if self.positions else 0.0

    @property
    def mean_kept_mass(self) -> float:
        """Average teacher probability kept per mapped position (≤ 1)."""
        return self.kept_mass / self.mapped if self.mapped else 0.0

    @property
    def kept_of_topk(self) -> float:
        return self.kept_mass / self.topk_mass if self.topk_mass else 0.0

    def to_dict(self) -> dict:
        return {"samples": self.samples, "positions": self.positions, "mapped": self.mapped,
                "mapped_share": self.mapped_share, "mean_kept_mass": self.mean_kept_mass,
                "kept_of_topk_mass": self.kept_of_topk}


def _logaddexp(a: float, b: float) -> float:
    if a < b:
        a, b = b, a
    if b == -math.inf:
        return a
    return a + math.log1p(math.exp(b - a))


@dataclass
class StudentVocab:
    """Student piece → id, with a cache of alternative lookups (the same few thousand
    teacher strings recur in every sample)."""
    token_to_id: Mapping[str, int]
    byte_level: bool = False
    _cache: dict = field(default_factory=dict, repr=False)

    def lookup(self, token: str, pending: bool) -> int:
        key = (token, pending)
        sid = self._cache.get(key)
        if sid is None:
            surface = alternative_surface(token, pending, self.byte_level)
            sid = self.token_to_id.get(surface, -1) if surface is not None else -1
            self._cache[key] = sid
        return sid


def map_distributions(labels: Sequence[int], s2t: np.ndarray, top_logprobs: Sequence[Sequence],
                      pending: Sequence[bool], vocab: StudentVocab, k: int):
    """topk_ids int32[T, k], topk_logprobs float32[T, k] for `labels` (eos included, T =
    len(labels); s2t covers the first len(s2t) positions) and the sample's MappingStats."""
    T = len(labels)
    ids = np.full((T, k), PAD_ID, np.int32)
    lps = np.full((T, k), PAD_LOGPROB, np.float32)
    ids[:, 0] = labels
    lps[:, 0] = 0.0
    stats = MappingStats(positions=len(s2t), samples=1)
    for t, i in enumerate(s2t.tolist()):
        if i < 0:
            continue
        merged: dict[int, float] = {}
        listed = 0.0
        for token, lp in top_logprobs[i]:
            listed += math.exp(lp)
            sid = vocab.lookup(token, pending[i])
            if sid < 0:
                continue
            merged[sid] = _logaddexp(merged[sid], lp) if sid in merged else lp
        if not merged:
            continue
        best = sorted(merged.items(), key=lambda kv: -kv[1])[:k]  # stable: ties keep first-seen order
        for c, (sid, lp) in enumerate(best):
            ids[t, c] = sid
            lps[t, c] = lp
        stats.mapped += 1
        stats.kept_mass += sum(math.exp(lp) for _, lp in best)
        stats.topk_mass += listed
    return ids, lps, stats


@njit(cache=True)
def _log_add(a, b):
    """`_logaddexp` in compiled form (same operations, same libm calls, same result)."""
    if a < b:
        a, b = b, a
    if b == -math.inf:
        return a
    return a + math.log1p(math.exp(b - a))


@njit(cache=True)
def _map_packed_core(labels, lab_off, s2t, s_off, t_off, alt_off, alt_ids, alt_lps, ids, lps, mapped, kept, listed):
    """`map_distributions` for packed pairs, one pass per student position; the same
    float64 operations in the same order, so the stats and logprobs are bit-identical."""
    buf_id = np.empty(max(1, alt_ids.shape[0]), np.int32)
    buf_lp = np.empty(max(1, alt_ids.shape[0]), np.float64)
    k = ids.shape[1]
    for p in range(lab_off.shape[0] - 1):
        l0 = lab_off[p]
        for t in range(lab_off[p + 1] - l0):
            ids[l0 + t, 0] = labels[l0 + t]
            lps[l0 + t, 0] = 0.0
        n_kept = 0.0
        n_listed = 0.0
        n_mapped = 0
        for t in range(s_off[p + 1] - s_off[p]):
            i = s2t[s_off[p] + t]
            if i < 0:
                continue
            a0, a1 = alt_off[t_off[p] + i], alt_off[t_off[p] + i + 1]
            n = 0  # merged alternatives, first-seen order
            pos_listed = 0.0
            for a in range(a0, a1):
                lp = alt_lps[a]
                pos_listed += math.exp(lp)
                sid = alt_ids[a]
                if sid < 0:
                    continue
                found = False
                for c in range(n):
                    if buf_id[c] == sid:
                        buf_lp[c] = _log_add(buf_lp[c], lp)
                        found = True
                        break
                if not found:
                    buf_id[n] = sid
                    buf_lp[n] = lp
                    n += 1
            if n == 0:
                continue
            # stable insertion sort, largest logprob first (ties keep first-seen order, as sorted() does)
            for c in range(1, n):
                sid, lp = buf_id[c], buf_lp[c]
                d = c
                while d > 0 and buf_lp[d - 1] < lp:
                    buf_id[d] = buf_id[d - 1]
                    buf_lp[d] = buf_lp[d - 1]
                    d -= 1
                buf_id[d] = sid
                buf_lp[d] = lp
            pos_kept = 0.0
            for c in range(min(n, k)):
                ids[l0 + t, c] = buf_id[c]
                lps[l0 + t, c] = buf_lp[c]
                pos_kept += math.exp(buf_lp[c])
            n_mapped += 1
            n_kept += pos_kept
            n_listed += pos_listed
        mapped[p] = n_mapped
        kept[p] = n_kept
        listed[p] = n_listed


def map_packed(labels, lab_off, s2t, s_off, t_off, alt_off, alt_ids, alt_lps, k: int):
    """`map_distributions` for many packed pairs at once (the bulk path).

    labels int32 [Σ T] with lab_off [P+1] (eos included); s2t int32 [Σ M] with s_off [P+1]
    (from `dp.align_packed`, M = T − 1); the teacher tokens of pair p are t_off[p]..t_off[p+1]
    and token g's alternatives alt_off[g]..alt_off[g+1] of alt_ids (student id, −1: none) and
    alt_lps (float64). Returns topk_ids int32 [Σ T, k], topk_logprobs float32 [Σ T, k] and
    per pair mapped positions, kept mass and listed top-k mass (summed like MappingStats).
    """
    total = int(lab_off[-1])
    ids = np.full((total, k), PAD_ID, np.int32)
    lps = np.full((total, k), PAD_LOGPROB, np.float32)
    n = len(lab_off) - 1
    mapped, kept, listed = np.zeros(n, np.int64), np.zeros(n, np.float64), np.zeros(n, np.float64)
    _map_packed_core(np.asarray(labels, np.int32), np.asarray(lab_off, np.int64), np.asarray(s2t, np.int32),
                     np.asarray(s_off, np.int64), np.asarray(t_off, np.int64), np.asarray(alt_off, np.int64),
                     np.asarray(alt_ids, np.int32), np.asarray(alt_lps, np.float64), ids, lps, mapped, kept, listed)
    return ids, lps, mapped, kept, listed
