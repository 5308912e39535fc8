"""Runs of `specialize run`: recipes x zipped sweeps, and where each stage of a run writes."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specialize.engine.config import (
    ConfigError,
    Recipe,
    load_recipe,
    parse_override,
)

STAGES = ("toy", "teacher", "filter", "align", "train", "eval", "plot")


# ----------------------------------------------------------------------------- runs and their paths

@dataclass
class Run:
    recipe: Recipe
    tag: str        # "" for a recipe that is not swept
    source: str     # the YAML it came from

    @property
    def root(self) -> Path:
        return Path(self.recipe.output_dir)

    @property
    def run_dir(self) -> Path:
        return self.root / self.tag if self.tag else self.root

    def dir(self, stage: str) -> Path:
        r = self.recipe
        teacher = Path(r.teacher.out_dir) if r.teacher.out_dir else self.root / "teacher"
        return {
            "toy": Path(r.teacher.model or self.root / "toy" / "teacher").parent,
            "teacher": teacher,
            "filter": teacher.with_name(teacher.name + "-correct"),
            "align": Path(r.aligner.out_dir) if r.aligner.out_dir else self.root / "aligned",
            "train": self.run_dir / "train",
            "eval": (Path(r.eval.out_dir) / self.tag if r.eval.out_dir else self.run_dir / "eval"),
            "plot": Path(r.plot.out_dir) if r.plot.out_dir else self.root / "plots",
        }[stage]

    @property
    def name(self) -> str:
        return f"{self.recipe.name}/{self.tag}" if self.tag else self.recipe.name


def _slug(value: Any, key: str) -> str:
    if isinstance(value, dict):
        text = "+".join(str(k) for k in value)
    elif isinstance(value, str):
        text = Path(value).stem if "/" in value else value
    else:
        text = f"{key.split('.')[-1]}={value}"
    return re.sub(r"[^A-Za-z0-9_.+=-]+", "-", text).strip("-") or "run"


def expand_runs(paths: list[str], sets: list[str], sweeps: list[str]) -> list[Run]:
    """Recipes x zipped sweeps -> runs, each recipe loaded strictly with its overrides."""
    parsed = []
    for text in sweeps:
        keys, values = parse_override(text)
        if not isinstance(values, list) or not values:
            raise ConfigError(f"--sweep {text!r}: expected key.path=[value, value, ...]")
        parsed.append((".".join(keys), values))
    lengths = {len(v) for _, v in parsed}
    if len(lengths) > 1:
        raise ConfigError(f"--sweep lists are zipped and must have one length; got {sorted(lengths)}")
    n_variants = lengths.pop() if lengths else 0
    runs = []
    for path in paths:
        if not n_variants:
            runs.append(Run(load_recipe(path, sets), "", str(path)))
            continue
        tags: list[str] = []
        for i in range(n_variants):
            extra = [f"{key}={json.dumps(values[i])}" for key, values in parsed]
            tag = _slug(parsed[0][1][i], parsed[0][0])
            tag = tag if tag not in tags else f"{tag}-{i}"
            tags.append(tag)
            runs.append(Run(load_recipe(path, list(sets) + extra), tag, str(path)))
    return runs


