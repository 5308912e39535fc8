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
    out = Path(recipe.train.output_dir)
    ckpts = out / "checkpoints"
    if not resume and ckpts.is_dir() and any(ckpts.iterdir()):
        raise ConfigError(f"{out} already holds checkpoints: pass --resume to continue that run, "
                              f"or choose another train.output_dir")
    out.mkdir(parents=True, exist_ok=True)
    ckpts.mkdir(exist_ok=True)
    dump_recipe(recipe, out / "recipe.yaml")
    env = environment(world_size)
    env["recipe_hash"] = recipe_hash(recipe)
    name = "env.json" if not (out / "env.json").exists() else f"env.resume-{int(time.time())}.json"
    (out / name).write_text(json.dumps(env, indent=1))
    return out


def append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
