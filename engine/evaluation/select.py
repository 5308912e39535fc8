"""Model selection over checkpoints (the paper's RQ5): which dev signal picks the checkpoint to keep?

Three rules, each an argmax over every evaluated checkpoint of one or more runs:
  in_dist  the in-distribution dev accuracy (e.g. dev/gsm8k_dev_acc)
  ood      the mean of the OOD dev accuracies (e.g. dev/multiarith_acc, ...)
  mean     the mean of those two numbers
Ties go to the earliest step (less training, less drift from the generic model), then to the run
given first. For each rule's choice we print its test scores on every dataset side by side.

Inputs, per run dir (the engine's <train.output_dir>, or a pipeline run dir holding train/):
  dev_scores.jsonl   written by the engine: {"step": int, "dev/<name>_acc": float, ...} per evaluation
  test_scores.jsonl  written by `specialize eval --run RUN` (evaluate.evaluate_checkpoints):
                     {"step": int, "<dataset>_acc": float, "<dataset>_ci": [lo, hi], "<dataset>_n": int,
                      "<dataset>_split": which part was scored, e.g. an OOD set's test part}
                     per checkpoint; a step's lines add up, a later score of a dataset wins
  recipe.yaml        train.dev_in_dist / train.dev_ood say which dev set is which
                     (--in-dist / --ood override; without either, gsm8k_dev or synthetic/dev is in-dist)
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from specialize.engine.cli import HelpFormatter
from specialize.engine.io_helpers import percent
from specialize.engine.rundir import RunDir

RULES = ("in_dist", "ood", "mean")
_IN_DIST_GUESSES = ("gsm8k_dev", "synthetic/dev", "gsm8k")


@dataclass
class Choice:
    rule: str
    run: str
    step: int
    in_dist: Optional[float]
    ood: Optional[float]
    mean: Optional[float]
    test: dict = field(default_factory=dict)  # dataset -> accuracy at that step (empty: not evaluated)


def run_files_dir(run_dir) -> Path:
    """The engine's folder of a run: the run dir itself, or its train/ (pipeline layout)."""
    return RunDir(run_dir).root


def read_dev_scores(run_dir) -> list[dict]:
    return RunDir(run_dir).dev_scores()


def read_test_scores(run_dir) -> dict[int, dict]:
    """step -> {dataset: accuracy}; the lines of a step add up (`specialize eval --run` writes a line
    per step with the datasets it lacked), a later score of a dataset replacing an earlier one."""
    out: dict[int, dict] = {}
    for row in RunDir(run_dir).test_scores():
        out.setdefault(row["step"], {}).update(
            {k[:-4]: v for k, v in row.items() if k.endswith("_acc") and isinstance(v, (int, float))})
    return out


def dev_names(run_dir, rows: Sequence[dict]) -> tuple[Optional[str], list[str]]:
    """(in-distribution dev name, OOD dev names) from the run's recipe.yaml, else guessed from the keys."""
    recipe = RunDir(run_dir).recipe()
    if recipe is not None and recipe.train.dev_in_dist:
        return recipe.train.dev_in_dist, list(recipe.train.dev_ood)
    names = sorted({k[4:-4] for row in rows for k in row if k.startswith("dev/") and k.endswith("_acc")})
    in_dist = next((g for g in _IN_DIST_GUESSES if g in names), names[0] if names else None)
    return in_dist, [n for n in names if n != in_dist]


def signals(row: dict, in_dist: Optional[str], ood: Sequence[str]) -> dict[str, Optional[float]]:
    """The three rules' values at one evaluation; None where a dev set was not evaluated."""
    a = row.get(f"dev/{in_dist}_acc") if in_dist else None
    vals = [row.get(f"dev/{n}_acc") for n in ood]
    b = sum(vals) / len(vals) if vals and None not in vals else None
    return {"in_dist": a, "ood": b, "mean": (a + b) / 2 if a is not None and b is not None else None}


def selection_value(row: dict, rule: str, in_dist: Optional[str], ood: Sequence[str]) -> Optional[float]:
    """The value `rule` ranks a checkpoint by: the one rule, used by the engine (best/) and by
    `specialize select` alike. None when a dev set the rule needs was not evaluated or scored NaN."""
    value = signals(row, in_dist, ood)[rule]
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def select(runs: Sequence[str], in_dist: Optional[str] = None, ood: Optional[Sequence[str]] = None,
           rules: Sequence[str] = RULES) -> dict[str, Choice]:
    """rule -> the chosen (run, step) over all evaluated checkpoints of `runs`, with its test scores."""
    best: dict[str, tuple] = {}
    for order, run in enumerate(runs):
        rows = read_dev_scores(run)
        if not rows:
            raise FileNotFoundError(f"{run}: no dev_scores.jsonl (the engine writes it during training)")
        guess_in, guess_ood = dev_names(run, rows)
        name_in, names_ood = in_dist or guess_in, list(ood) if ood else guess_ood
        tests = read_test_scores(run)
        for row in rows:
            sig = signals(row, name_in, names_ood)
            for rule in rules:
                value = selection_value(row, rule, name_in, names_ood)
                if value is None:
                    continue
                key = (value, -row["step"], -order)  # ties: earliest step, then first run
                if rule not in best or key > best[rule][0]:
                    best[rule] = (key, Choice(rule, str(run), row["step"], sig["in_dist"], sig["ood"],
                                              sig["mean"], tests.get(row["step"], {})))
    missing = [r for r in rules if r not in best]
    if missing:
        raise ValueError(f"no checkpoint has the dev scores rule(s) {missing} need "
                         f"(in-dist {in_dist or 'from recipe'}, OOD {list(ood) if ood else 'from recipe'})")
    return {rule: best[rule][1] for rule in rules}


_pct = percent


def format_table(choices: dict[str, Choice]) -> str:
    """Markdown: one row per rule, its checkpoint, dev signals, and test accuracy on every dataset."""
    datasets = sorted({d for c in choices.values() for d in c.test})
    multi_run = len({c.run for c in choices.values()}) > 1
    head = ["rule"] + (["run"] if multi_run else []) + ["step", "dev in-dist", "dev OOD", "dev mean"]
    head += [f"test {d}" for d in datasets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in choices.values():
        cells = [c.rule] + ([c.run] if multi_run else []) + [str(c.step), _pct(c.in_dist), _pct(c.ood), _pct(c.mean)]
        cells += [_pct(c.test.get(d)) for d in datasets]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("\n(dev columns: the engine's dev sets, i.e. the held-out GSM8K/synthetic dev and each OOD set's dev "
                 "part; test columns: the test part, disjoint from it; see data.ood_dev_size)")
    if any(not c.test for c in choices.values()):
        lines.append("\n(n/a test scores: run `specialize eval --run RUN --datasets ...` to fill RUN/test_scores.jsonl)")
    return "\n".join(lines)


def export_selected(train_dir, signal: str, out_dir) -> Optional[Path]:
    """The HF model dir of the checkpoint `signal` selects in one run, or None when that checkpoint
    was not kept as an HF model (the pipeline then evaluates best/ only). Writes out_dir/selection.json."""
    from specialize.engine.evaluation.evaluate import checkpoint_steps
    try:
        choice = select([str(train_dir)], rules=[signal])[signal]
    except (FileNotFoundError, ValueError) as e:
        print(f"[select] {train_dir}: {e}", file=sys.stderr)
        return None
    path = checkpoint_steps(run_files_dir(train_dir)).get(choice.step)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "selection.json").write_text(json.dumps({**asdict(choice), "model_dir": str(path) if path else None}, indent=1))
    if path is None:
        print(f"[select] {train_dir}: step {choice.step} ({signal}) has no HF export yet (the eval stage exports "
              "its DeepSpeed checkpoint when one is kept)", file=sys.stderr)
    return path


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(formatter_class=HelpFormatter, prog="specialize select",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", required=True, help="run dirs (holding dev_scores.jsonl)")
    p.add_argument("--in-dist", default=None, help="in-distribution dev set name (default: from recipe.yaml)")
    p.add_argument("--ood", default=None, help="comma list of OOD dev set names (default: from recipe.yaml)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = p.parse_args(argv)
    ood = [n.strip() for n in args.ood.split(",") if n.strip()] if args.ood else None
    try:
        choices = select(args.runs, args.in_dist, ood)
    except (FileNotFoundError, ValueError) as e:
        print(f"specialize select: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({rule: asdict(c) for rule, c in choices.items()}, indent=1))
    else:
        print(format_table(choices))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
