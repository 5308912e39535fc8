"""The paper's findings as tests that can fail: each compares two measured quantities, item by item.

A finding states the paper's direction ("A > B"), the two numbers we measured, and the standard
error of their difference. It is *reproduced* only when A - B exceeds two standard errors, *the
opposite came out* when B - A does, and otherwise *within noise*. The difference is paired: both
sides are scored on the same questions, so the SE is that of the per-question differences
(sd / sqrt(n)), which is what a McNemar-style comparison of two models on one test set uses.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from specialize.engine.io_helpers import read_jsonl
from specialize.engine.rundir import RunDir

REPRODUCED = "reproduced"
NOT_REPRODUCED = "**not reproduced at this scale**"


def paired_gap(a: Mapping[str, float], b: Mapping[str, float]) -> tuple[float, float, int]:
    """(mean of a - b, its standard error, n) over the items both sides scored (id -> value, e.g. 0/1
    correctness or an item's mean correctness over checkpoints)."""
    ids = sorted(set(a) & set(b))
    n = len(ids)
    if not n:
        return math.nan, math.nan, 0
    d = [float(a[i]) - float(b[i]) for i in ids]
    mean = sum(d) / n
    if n == 1:
        return mean, math.inf, 1
    var = sum((x - mean) ** 2 for x in d) / (n - 1)
    return mean, math.sqrt(var / n), n


def judge(gap: float, se: float) -> str:
    """The verdict on "A > B" from the measured gap A - B and its standard error."""
    if gap is None or se is None or math.isnan(gap) or math.isnan(se):
        return "n/a (missing numbers)"
    margin = 2 * se
    if gap > margin:
        return REPRODUCED
    if -gap > margin:
        return f"{NOT_REPRODUCED} (the opposite came out)"
    return f"{NOT_REPRODUCED} (within noise: the gap is under 2 SE)"


@dataclass
class Finding:
    name: str       # short label, e.g. "in-dist rises"
    paper: str      # the paper's claim and direction, quoted
    measure: str    # what A and B are
    a_label: str
    b_label: str
    a: float        # the side the paper says is larger
    b: float
    gap: float      # paired mean of A - B (equals a - b when both sides score the same items)
    se: float
    n: int
    note: str = ""

    @property
    def verdict(self) -> str:
        return judge(self.gap, self.se)

    @property
    def reproduced(self) -> bool:
        return self.verdict == REPRODUCED


def compare(name: str, paper: str, measure: str, a_label: str, b_label: str,
            a_items: Mapping[str, float], b_items: Mapping[str, float], note: str = "") -> Finding:
    """A Finding from per-item values of both sides (A expected larger)."""
    gap, se, n = paired_gap(a_items, b_items)
    ids = set(a_items) & set(b_items)
    mean = lambda items: sum(items[i] for i in ids) / len(ids) if ids else math.nan  # noqa: E731
    return Finding(name, paper, measure, a_label, b_label, mean(a_items), mean(b_items), gap, se, n, note)


def _pct(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def table(findings: Sequence[Finding]) -> str:
    """Markdown: one row per finding with both numbers, the gap +- 2 SE and the verdict."""
    rows = ["| # | finding (paper's direction) | measured | A | B | A - B (± 2 SE) | n | verdict |",
            "|---|---|---|---:|---:|---:|---:|---|"]
    for i, f in enumerate(findings, 1):
        margin = "n/a" if math.isnan(f.se) else f"{100 * f.gap:+.1f} ± {100 * 2 * f.se:.1f}"
        rows.append(f"| {i} | {f.name}: {f.paper} | {f.measure} | {f.a_label} {_pct(f.a)} | {f.b_label} "
                    f"{_pct(f.b)} | {margin} | {f.n} | {f.verdict}{'; ' + f.note if f.note else ''} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- per-item readers

def item_correct(result_file: Path, names: Sequence[str]) -> dict[str, float]:
    """id -> 1/0 over the named datasets of one evaluator output (<label>.json with predictions)."""
    if not result_file.exists():
        return {}
    results = json.loads(result_file.read_text())["results"]
    return {p["id"]: float(bool(p["correct"])) for n in names if n in results
            for p in results[n].get("predictions", [])}


def dev_items_by_step(train_dir: Path, name: str) -> dict[int, dict[str, float]]:
    """step -> {id: 1/0} from the engine's dev dumps train/dev/step-NNNNNN/<name>.jsonl."""
    out = {}
    for path in sorted((Path(train_dir) / "dev").glob(f"step-*/{name.replace('/', '_')}.jsonl")):
        step = RunDir.step_of(path.parent)
        out[step] = {r["id"]: float(bool(r["correct"])) for r in read_jsonl(path)}
    return out


def area_items(by_step: Mapping[int, Mapping[str, float]], steps: Sequence[int]) -> dict[str, float]:
    """id -> the item's mean correctness over `steps` (the dev-accuracy area under the curve per item,
    normalised by the number of evaluations)."""
    ids = set.intersection(*(set(by_step[s]) for s in steps)) if steps else set()
    return {i: sum(by_step[s][i] for s in steps) / len(steps) for i in ids}


def steps_to_reach(curve: Mapping[int, float], level: float) -> int | None:
    """The first evaluated step whose accuracy is at least `level` (None if never)."""
    return next((s for s in sorted(curve) if curve[s] >= level), None)
