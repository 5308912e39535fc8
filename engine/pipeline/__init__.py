"""`specialize run`: a recipe's stages, toy -> teacher -> filter -> align -> train -> eval -> plot.

    runs.py     recipes x zipped sweeps -> runs, and each stage's output folder of a run
    stages.py   the stages, each beside the key of the recipe fields it reads (its done-marker)
    dry_run.py  --dry-run: the wiring checked on true shapes and tiny data
    cli.py      the command line (its docstring is the user's guide)

The names below are the package's API, as `specialize.engine.pipeline` has always offered them.
"""
from specialize.engine.pipeline.cli import build_parser, main
from specialize.engine.pipeline.dry_run import dry_run
from specialize.engine.pipeline.runs import STAGES, Run, expand_runs
from specialize.engine.pipeline.stages import (
                                               STAGE_FUNCS,
                                               evaluate_checkpoint,
                                               is_done,
                                               load_examples,
                                               mark_done,
                                               resolved_train_recipe,
                                               run_stages,
                                               score_every_checkpoint,
                                               selected_checkpoints,
                                               stage_align,
                                               stage_eval,
                                               stage_filter,
                                               stage_key,
                                               stage_plot,
                                               stage_teacher,
                                               stage_toy,
                                               stage_train,
                                               start_cache,
                                               tradeoff_datasets,
                                               train_command,
                                               training_pool,
)

__all__ = ["STAGES", "STAGE_FUNCS", "Run", "build_parser", "dry_run", "evaluate_checkpoint", "start_cache",
           "expand_runs", "is_done", "load_examples", "main", "mark_done", "resolved_train_recipe", "run_stages",
           "score_every_checkpoint", "selected_checkpoints", "stage_align", "stage_eval", "stage_filter",
           "stage_key", "stage_plot", "stage_teacher", "stage_toy", "stage_train", "tradeoff_datasets",
           "train_command", "training_pool"]
