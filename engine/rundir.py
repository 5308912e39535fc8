"""The run directory: what a training run leaves behind so it can be understood and repeated.

<train.output_dir>/ recipe.yaml (resolved, every default filled in), env.json (package versions, machine,
git hash and the diff when the tree is dirty, command line, world size), tb/ (TensorBoard), checkpoints/,
dev_scores.jsonl, train_log.jsonl, best/ (HF export). Written by rank 0 only.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from specialize.engine.config import ConfigError, Recipe, dump_recipe, recipe_hash
from specialize.engine.io_helpers import append_jsonl

REPO = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def git_state() -> dict:
    """Commit hash of the source tree and, when files differ from it, the diff (so the run can be rebuilt)."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None}
    diff = _git("diff", "HEAD") or ""
    return {"commit": commit.strip(), "dirty": bool(diff.strip()), "diff": diff or None}


def environment(world_size: int) -> dict:
    from specialize.engine.envinfo import collect
    return {**collect(), "git": git_state(), "argv": sys.argv, "world_size": world_size,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def prepare_run_dir(recipe: Recipe, world_size: int, resume: bool) -> Path:
    """Create the run dir; a fresh run refuses a dir that already holds checkpoints (use --resume)."""
    run = RunDir(recipe.train.output_dir, find_train=False)
    out, ckpts = run.root, run.checkpoints
    if not resume and ckpts.is_dir() and any(ckpts.iterdir()):
        raise ConfigError(f"{out} already holds checkpoints: pass --resume to continue that run, "
                              f"or choose another train.output_dir")
    out.mkdir(parents=True, exist_ok=True)
    ckpts.mkdir(exist_ok=True)
    dump_recipe(recipe, run.recipe_path)
    env = environment(world_size)
    env["recipe_hash"] = recipe_hash(recipe)
    name = "env.json" if not (out / "env.json").exists() else f"env.resume-{int(time.time())}.json"
    (out / name).write_text(json.dumps(env, indent=1))
    return out





class RunDir:
    """Every path and reader of a training run's folder (<train.output_dir>), in one place.

    Layout (written by rank 0):  recipe.yaml  env.json  tb/  train_log.jsonl  dev_scores.jsonl
    dev/step-XXXXXX/<set>.jsonl  checkpoints/step-XXXXXX/ (DeepSpeed's files, rng-rank<r>.pt,
    complete.json once every rank has written)  best/ (HF export, specialize.json)
    test_scores.jsonl + checkpoints-hf/step-XXXXXX/ (from `specialize eval --run`).
    Given a pipeline run dir (`specialize run`: the engine's folder is its train/), it opens that train/,
    unless `find_train=False` (the engine naming its own folder, which may not exist yet).
    """

    def __init__(self, path, find_train: bool = True):
        root = Path(path)
        if find_train and not (root / "checkpoints").is_dir() and not (root / "dev_scores.jsonl").exists() \
                and (root / "train").is_dir():
            root = root / "train"
        self.root = root

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # ------------------------------------------------------------------ paths
    @staticmethod
    def tag(step: int) -> str:
        return f"step-{step:06d}"

    @staticmethod
    def step_of(path) -> int | None:
        """The step of a step-XXXXXX folder, None for any other name."""
        name = Path(path).name
        if not name.startswith("step-"):
            return None
        try:
            return int(name[len("step-"):])
        except ValueError:
            return None

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / self.tag(step)

    def hf_checkpoint(self, step: int) -> Path:
        """Where `specialize eval --run` exports a DeepSpeed checkpoint as a HF model, once."""
        return self.root / "checkpoints-hf" / self.tag(step)

    def dev_predictions(self, step: int) -> Path:
        return self.root / "dev" / self.tag(step)

    best = property(lambda self: self.root / "best")
    recipe_path = property(lambda self: self.root / "recipe.yaml")
    train_log = property(lambda self: self.root / "train_log.jsonl")
    dev_scores_path = property(lambda self: self.root / "dev_scores.jsonl")
    test_scores_path = property(lambda self: self.root / "test_scores.jsonl")
    tensorboard = property(lambda self: self.root / "tb")

    # ------------------------------------------------------------------ readers
    def checkpoint_dirs(self) -> list[tuple[int, Path]]:
        """(step, dir) of every step-XXXXXX folder, complete or not, oldest first."""
        found = [(self.step_of(d), d) for d in self.checkpoints.glob("step-*") if d.is_dir()]
        return sorted((s, d) for s, d in found if s is not None)

    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, dir) of every checkpoint whose save finished on all ranks, oldest first."""
        return [(s, d) for s, d in self.checkpoint_dirs() if self.is_complete(d)]

    @staticmethod
    def is_complete(checkpoint_dir: Path) -> bool:
        return (Path(checkpoint_dir) / "complete.json").is_file()

    def recipe(self) -> Recipe | None:
        """The resolved recipe the run was trained with (None where the folder has none)."""
        from specialize.engine.config import load_recipe
        return load_recipe(self.recipe_path) if self.recipe_path.is_file() else None

    def dev_scores(self) -> list[dict]:
        return self._step_rows(self.dev_scores_path)

    def test_scores(self) -> list[dict]:
        return self._step_rows(self.test_scores_path)

    def best_info(self) -> dict | None:
        """best/specialize.json (step, selection rule and scores), None before any export."""
        path = self.best / "specialize.json"
        return json.loads(path.read_text()) if path.is_file() else None

    @staticmethod
    def _step_rows(path: Path) -> list[dict]:
        from specialize.engine.io_helpers import read_jsonl_objects
        if not path.exists():
            return []
        rows = []
        for lineno, row in read_jsonl_objects(path, ValueError):
            if not isinstance(row.get("step"), int):
                raise ValueError(f"{path}:{lineno}: expected an object with an integer 'step'")
            rows.append(row)
        return rows
__all__ = ["RunDir", "prepare_run_dir", "append_jsonl", "git_state", "environment"]
