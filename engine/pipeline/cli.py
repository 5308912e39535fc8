"""`specialize run`: a recipe's stages, toy -> teacher -> filter -> align -> train -> eval -> plot.

    specialize run recipes/X.yaml [more.yaml ...] [--set k=v ...] [--sweep k=[a,b] ...]
                   [--stages train eval] [--dry-run] [--launcher "deepspeed --hostfile hostfile"] [--resume]

Each stage calls the owning module's Python API and, when it finishes, writes a
done-marker `.done-<stage>.json` into its output directory holding a hash of the recipe fields the
stage depends on. A rerun skips a stage whose marker matches, and refuses (names the directory) when
the marker belongs to a different configuration, so stale outputs are never silently reused.

`--sweep key=[v1, v2, ...]` expands one recipe into runs; several sweeps are *zipped* (run i takes
value i of each), so one command can pair e.g. model size with its DeepSpeed config. Runs of one
recipe share its teacher/filter/align outputs and get their own `<output_dir>/<tag>/` for train and
eval; the plot stage draws across the runs of a recipe.

`--dry-run` checks the wiring without training: DeepSpeed JSON and batch arithmetic, the student's
true shapes built on the `meta` device (an 11B model costs no memory), the loss kernel on the true
hidden size and vocabulary for a few rows, prompt/target formats tokenized at tiny data size, and
aligned shards written and read back in the layout the engine trains on; then, for the stages that
would run (the recipe's or --stages, less the finished ones), the teacher's API key, the local data
files they read (data.data_dir) and the finished outputs of a stage --stages leaves out.
"""
from __future__ import annotations

import argparse
import os
import sys

from specialize.engine.cli import HelpFormatter
from specialize.engine.config import (
    ConfigError,
)
from specialize.engine.pipeline.dry_run import dry_run
from specialize.engine.pipeline.runs import STAGES, expand_runs
from specialize.engine.pipeline.stages import run_stages

# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(formatter_class=HelpFormatter, prog="specialize run", description=__doc__.split("\n\n")[0])
    p.add_argument("recipes", nargs="+", help="recipe YAML files")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field (repeatable), e.g. train.max_steps=10")
    p.add_argument("--sweep", dest="sweeps", action="append", default=[], metavar="KEY=[A,B]",
                   help="one run per list element; several sweeps are zipped")
    p.add_argument("--stages", nargs="+", choices=STAGES, help="run only these stages (default: the recipe's)")
    p.add_argument("--dry-run", action="store_true", help="check the wiring with true shapes on tiny data; no training")
    p.add_argument("--launcher", help='training launcher, e.g. "deepspeed --hostfile hostfile" (default: deepspeed '
                                      'on all local GPUs, or torchrun with --nproc CPU ranks)')
    p.add_argument("--nproc", type=int, default=2, help="CPU ranks when no GPU is present (default 2)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted train stage from its last complete checkpoint (e.g. after a "
                        "node was lost: rerun the same command on every node with --resume)")
    p.add_argument("--world-size", type=int, default=None,
                   help="ranks assumed by --dry-run's batch arithmetic (default: 8 GPUs; --nproc for fp32 CPU recipes)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        runs = expand_runs(args.recipes, args.sets, args.sweeps)
        if args.dry_run:
            # A dry run never downloads: the hub tokenizer is used only when it is already cached.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            failed = 0
            for run in runs:
                try:
                    world = args.world_size or (args.nproc if run.recipe.train.precision == "fp32" else 8)
                    rows = dry_run(run, world, args.stages)
                except (ConfigError, ValueError, RuntimeError, ImportError) as err:
                    failed += 1
                    print(f"[dry-run] {run.name}: FAILED: {err}", file=sys.stderr)
                    continue
                print(f"[dry-run] {run.name} ({run.source})")
                for check, detail in rows:
                    print(f"  {check:<14} {detail}")
            return 1 if failed else 0
        rows = run_stages(runs, args.stages, args.launcher, args.nproc, resume=args.resume)
    except ConfigError as err:
        print(f"specialize run: {err}", file=sys.stderr)
        return 2
    for row in rows:
        print(f"[run] {row['run']:<32} {row['stage']:<8} {row['status']}")
    return 0
