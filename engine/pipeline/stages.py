"""The stages of `specialize run` and the done-markers that make reruns skip finished ones: each stage's
key (the recipe fields its output depends on) is computed beside it."""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from specialize.engine.config import (
    ConfigError,
    Recipe,
    dump_recipe,
    hashed_dict,
)
from specialize.engine.io_helpers import settings_hash
from specialize.engine.pipeline.runs import STAGES, Run
from specialize.engine.rundir import RunDir

# ----------------------------------------------------------------------------- done-markers

def _hash(obj: Any) -> str:
    return settings_hash(obj)


def stage_key(run: Run, stage: str) -> str:
    """Hash of the recipe fields a stage's output depends on (what makes reuse safe): STAGE_KEYS[stage],
    each defined beside its stage below, so what a stage reads and what its key covers change together."""
    return _hash(STAGE_KEYS.get(stage, _later_stage_key)(run, stage))


def _source_data(run: Run) -> dict:
    """The fields that pick the questions. GSM8K's dev split has a fixed seed (loaders), so runs that
    differ only in train.seed share a teacher; the synthetic world is drawn by train.seed, so there the
    seed is another world (other questions under the same ids)."""
    r = run.recipe
    d = hashed_dict(r)["data"]
    source = {k: d[k] for k in ("dataset", "data_dir", "dev_size", "synthetic_sizes")}
    if "synthetic" in (r.data.dataset, r.teacher.dataset) and r.train.seed != 0:
        source["world_seed"] = r.train.seed  # absent means 0, so folders made before it keep their keys
    return source


def marker_path(path: Path, stage: str) -> Path:
    return path / f".done-{stage}.json"


def is_stale(run: Run, stage: str) -> bool:
    """The stage's folder holds finished outputs of another configuration."""
    marker = marker_path(run.dir(stage), stage)
    return marker.exists() and json.loads(marker.read_text()).get("key") != stage_key(run, stage)


def is_done(run: Run, stage: str) -> bool:
    marker = marker_path(run.dir(stage), stage)
    if not marker.exists():
        return False
    if is_stale(run, stage):
        raise ConfigError(f"{run.source}: {run.dir(stage)} holds '{stage}' outputs of a different configuration "
                          f"(marker {marker.name}); delete that directory or point the recipe elsewhere")
    return True


def mark_done(run: Run, stage: str, seconds: float, info: dict | None = None) -> None:
    out = run.dir(stage)
    out.mkdir(parents=True, exist_ok=True)
    marker = {"stage": stage, "key": stage_key(run, stage), "seconds": round(seconds, 1),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(info or {})}
    marker_path(out, stage).write_text(json.dumps(marker, indent=1))


# ----------------------------------------------------------------------------- data helpers

def load_examples(recipe: Recipe, name: str, split: str = "test") -> list:
    """Examples of a named dataset (the data layer's names); GSM8K train excludes the dev questions, and
    the OOD sets give their test part for split="test" (their dev part is the engine's, for selection)."""
    from specialize.engine.data import load_dataset_by_name
    if name == "synthetic":
        name = f"synthetic/{split}"
    if name == "gsm8k" and split == "train":
        # The dev questions are held out of everything the teacher answers or the student trains on.
        name = "gsm8k_train"
    return list(load_dataset_by_name(name, data_dir=recipe.data.data_dir, split=split,
                                     dev_size=recipe.data.dev_size, seed=recipe.train.seed,
                                     sizes=recipe.data.synthetic_sizes or None,
                                     ood_dev_size=recipe.data.ood_dev_size))


def training_pool(recipe: Recipe) -> list:
    return load_examples(recipe, recipe.data.dataset, split="train")


# ----------------------------------------------------------------------------- stages

def toy_key(run: Run, stage: str) -> list:
    """What the toy models depend on: the synthetic world (its sizes and seed). Not the student's
    model fields: the scaling and start-checkpoint runs use the same toy teacher with other students."""
    return [_source_data(run)]


def stage_toy(run: Run) -> dict:
    from specialize.engine.demo.toy_models import prepare_toy_models
    r = run.recipe
    return prepare_toy_models(run.dir("toy"), seed=r.train.seed, sizes=r.data.synthetic_sizes or None)


def _teacher_settings(run: Run) -> dict:
    """The teacher fields its samples depend on (not its client's concurrency, timeouts or out_dir)."""
    r = run.recipe
    teacher = {k: v for k, v in hashed_dict(r)["teacher"].items()
               if k not in ("concurrency", "out_dir", "timeout", "max_retries")}
    if r.teacher.format.startswith("in_context") and r.teacher.shots and r.teacher.prompt == "seeded":
        teacher["exemplar_seed"] = r.train.seed  # stage_teacher draws the exemplars with it
    return teacher


def teacher_key(run: Run, stage: str) -> list:
    """The teacher and filter stages: the questions and the teacher's settings (and which stage)."""
    return [stage, _source_data(run), _teacher_settings(run)]


def stage_teacher(run: Run) -> dict:
    from specialize.engine.teacher import generate
    r = run.recipe
    examples = load_examples(r, r.teacher.dataset, split=r.teacher.split)
    if r.teacher.limit:
        from specialize.engine.data import first_items
        examples = first_items(examples, r.teacher.limit)
    pool = training_pool(r) if r.teacher.format.startswith("in_context") else None
    summary = generate(r.teacher, examples, str(run.dir("teacher")), exemplar_pool=pool, seed=r.train.seed)
    return {"questions": len(examples), **{k: v for k, v in (summary or {}).items() if isinstance(v, (int, float))}}


def stage_filter(run: Run) -> dict:
    from specialize.engine.teacher import filter_samples
    result = filter_samples(str(run.dir("teacher")), str(run.dir("filter")))
    return result if isinstance(result, dict) else {}


def align_key(run: Run, stage: str) -> list:
    r = run.recipe
    aligner = {k: v for k, v in hashed_dict(r)["aligner"].items() if k not in ("workers", "out_dir")}
    # the tokenizer the stage really uses (as stage_align picks it), so runs of different model sizes
    # that name one shared student vocabulary share one aligned folder
    aligner["student_tokenizer"] = r.aligner.student_tokenizer or r.model.tokenizer or r.model.name_or_path
    return [_source_data(run), _teacher_settings(run), aligner]


def stage_align(run: Run) -> dict:
    from specialize.aligner import AlignedShards, align_teacher_dir
    r = run.recipe
    student = r.aligner.student_tokenizer or r.model.tokenizer or r.model.name_or_path
    # Teacher records carry the teacher's own token strings; the aligner needs the teacher tokenizer (a
    # tiktoken table) only to re-tokenize API records that lack them, so a local hf teacher passes none.
    teacher_tok = r.aligner.teacher_tokenizer if r.teacher.backend == "openai" else None
    align_teacher_dir(str(run.dir("filter")), student, str(run.dir("align")), workers=r.aligner.workers,
                      band=r.aligner.band, teacher_tokenizer=teacher_tok)
    return {"aligned_samples": len(AlignedShards(str(run.dir("align"))))}


def resolved_train_recipe(run: Run) -> Path:
    """The recipe the engine reads: train.output_dir and data.aligned_dir point at this run's stages."""
    import copy
    recipe = copy.deepcopy(run.recipe)
    recipe.train.output_dir = str(run.dir("train"))
    recipe.data.aligned_dir = str(run.dir("align"))
    run.run_dir.mkdir(parents=True, exist_ok=True)
    path = run.run_dir / "recipe.resolved.yaml"
    # one `specialize run` per node writes this same file on the shared filesystem: replace it whole, so
    # no node's engine ever reads it half-written
    tmp = path.with_name(f"{path.name}.{os.uname().nodename}.{os.getpid()}.tmp")
    dump_recipe(recipe, tmp)
    os.replace(tmp, path)
    return path


def train_command(recipe_path: Path, launcher: str | None, nproc: int, resume: bool = False) -> list[str]:
    """The training subprocess. `launcher` is any launcher line that takes `--module M args` after it:
    deepspeed (one node, a hostfile over ssh, or one `--no_ssh --node_rank R` per node) or torchrun
    (`--nnodes N --node_rank R --master_addr A`, whose -m is also spelt --module)."""
    args = ["--recipe", str(recipe_path)] + (["--resume"] if resume else [])
    if launcher:
        return shlex.split(launcher) + ["--module", "specialize.engine.train"] + args
    import torch
    if torch.cuda.is_available():
        return ["deepspeed", "--num_gpus", str(torch.cuda.device_count()), "--module", "specialize.engine.train"] + args
    # CPU: torchrun starts the ranks; the engine picks gloo when no GPU is present.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "specialize.engine.train"] + args


# What the ranks on other nodes need from the launching shell. `deepspeed --hostfile` starts them over
# ssh (pdsh) and forwards only variables named PYTHON*, NCCL*, UCX*, MV2*, MLFLOW* and the lines of a
# .deepspeed_env file: an offline node would try the hub, ranks would JIT-build DeepSpeed's ops into
# their own ~/.cache, and GLOO_SOCKET_IFNAME would not reach them.
FORWARDED_PREFIXES = ("HF_", "TRANSFORMERS_", "SPECIALIZE_", "TORCH_", "GLOO_", "TP_SOCKET_IFNAME", "TRITON_",
                      "OMP_NUM_THREADS", "CUDA_HOME", "LD_LIBRARY_PATH")


def deepspeed_env_file(launcher: str | None, out_dir: Path, environ: dict) -> Path | None:
    """For a deepspeed launcher line that reaches other nodes over ssh, write the variables of
    FORWARDED_PREFIXES set in `environ` to <out_dir>/deepspeed_env, after the user's own ~/.deepspeed_env
    and ./.deepspeed_env lines (theirs win), and return its path for DS_ENV_FILE; None otherwise (one
    node, --no_ssh, torchrun, or DS_ENV_FILE already set by the user)."""
    words = shlex.split(launcher or "")
    if not words or Path(words[0]).name != "deepspeed" or "--no_ssh" in words or "DS_ENV_FILE" in environ:
        return None
    lines, named = [], set()
    for user_file in (Path.home() / ".deepspeed_env", Path(".deepspeed_env")):
        if user_file.is_file():
            for line in user_file.read_text().splitlines():
                if "=" in line:
                    lines.append(line)
                    named.add(line.split("=", 1)[0].strip())
    lines += [f"{k}={v}" for k, v in sorted(environ.items())
              if k.startswith(FORWARDED_PREFIXES) and k not in named and "\n" not in v]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = (out_dir / "deepspeed_env").resolve()
    path.write_text("".join(line + "\n" for line in lines))
    return path


def train_key(run: Run, stage: str) -> dict:
    d = hashed_dict(run.recipe)
    return {k: d[k] for k in ("model", "data", "teacher", "aligner", "loss", "deepspeed", "train")}


def stage_train(run: Run, launcher: str | None = None, nproc: int = 1, resume: bool = False) -> dict:
    cmd = train_command(resolved_train_recipe(run), launcher, nproc, resume)
    print(f"[run] {run.name}: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    env_file = deepspeed_env_file(launcher, run.dir("train"), env)
    if env_file is not None:
        env["DS_ENV_FILE"] = str(env_file)  # an absolute name: DeepSpeed reads it in place of .deepspeed_env
        print(f"[run] {run.name}: variables for the other nodes in {env_file}", flush=True)
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{run.name}: training exited with status {proc.returncode} "
                           f"(command: {' '.join(cmd)})")
    return {"command": cmd}


def evaluate_checkpoint(recipe: Recipe, model_dir: str, out_dir: Path, label: str, progress: bool = True) -> dict:
    """Score one saved model on every eval dataset; writes <out_dir>/<label>.json, returns accuracies
    (module level, so an eval.workers process can run it)."""
    from specialize.engine.data import draw_exemplars, first_items, split_label
    from specialize.engine.evaluation.evaluate import evaluate_model, load_model_and_tokenizer
    model, tok = load_model_and_tokenizer(model_dir, recipe.model.tokenizer)
    shots = recipe.data.shots if recipe.eval.format.startswith("in_context") else 0
    exemplars = draw_exemplars(training_pool(recipe), shots, recipe.train.seed) if shots else ()
    results = {}
    for name in recipe.eval.datasets:
        examples = first_items(load_examples(recipe, name, split="test"), recipe.eval.limit)
        res = evaluate_model(model, tok, examples, name, fmt=recipe.eval.format, exemplars=exemplars,
                             batch_size=recipe.eval.batch_size, max_new_tokens=recipe.eval.max_new_tokens,
                             num_beams=recipe.eval.num_beams, progress=progress, data_dir=recipe.data.data_dir,
                             seed=recipe.train.seed)
        res.split = split_label(name, "test", recipe.data.ood_dev_size)
        results[name] = res.to_dict()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{label}.json").write_text(json.dumps({"model": model_dir, "results": results}, indent=1))
    return {name: r["accuracy"] for name, r in results.items()}


def selected_checkpoints(run: Run) -> dict[str, str]:
    """label -> HF model dir: the engine's best/ (picked by train.selection) and, for the paper's RQ5,
    the checkpoint the *other* dev signal picks (in_dist <-> ood), exported from DeepSpeed if needed."""
    train_dir = run.dir("train")
    engine_run = RunDir(train_dir, find_train=False)
    found = {"best": str(engine_run.best)}
    other = {"in_dist": "ood", "ood": "in_dist"}.get(run.recipe.train.selection)
    if other is None or not run.recipe.train.dev_ood:
        return found
    from specialize.engine.evaluation.select import export_selected
    out = run.dir("eval") / f"selected-{other}"
    path = export_selected(str(train_dir), other, str(out))
    if path is None and (out / "selection.json").exists():
        step = json.loads((out / "selection.json").read_text())["step"]
        ckpt = engine_run.checkpoint(step)
        best_step = (engine_run.best_info() or {}).get("step")
        if step == best_step:
            return found  # both signals agree: best/ is that checkpoint
        if ckpt.is_dir():
            from specialize.engine.export import export_checkpoint
            path = export_checkpoint(ckpt, out / "model")
    if path is not None:
        found[f"selected_{other}"] = str(path)
    return found


def tradeoff_datasets(recipe: Recipe) -> list[str]:
    """The in-distribution test set and the generic ones (BBH, synthetic generic_*): the RQ4 axes."""
    names = recipe.eval.datasets
    generic = [n for n in names if n.startswith(("bbh", "synthetic/generic"))]
    return names[:1] + [n for n in generic if n != names[0]]


def score_every_checkpoint(run: Run, pool=None) -> int:
    """RQ4: score every kept checkpoint on the trade-off datasets (eval.tradeoff_limit examples each,
    default train.dev_limit) into train/test_scores.jsonl; the evaluator exports DeepSpeed checkpoints
    to HF first."""
    from specialize.engine.evaluation.evaluate import evaluate_checkpoints
    r, train_dir = run.recipe, run.dir("train")
    limit = r.eval.tradeoff_limit or r.train.dev_limit
    rows = evaluate_checkpoints(str(train_dir), tradeoff_datasets(r), fmt=r.eval.format, limit=limit,
                                tokenizer=r.model.tokenizer, shots=r.data.shots, seed=r.train.seed,
                                data_dir=r.data.data_dir, batch_size=r.eval.batch_size, pool=pool,
                                max_new_tokens=r.eval.max_new_tokens, num_beams=r.eval.num_beams, progress=False)
    return len(rows)


def _later_stage_key(run: Run, stage: str) -> dict:
    """eval and plot read everything before them: the whole recipe but its description and stage list."""
    return {k: v for k, v in hashed_dict(run.recipe).items() if k not in ("plot", "stages", "description")}


def stage_eval(run: Run) -> dict:
    """The start, the selected checkpoints and (for the trade-off plot) every kept one, scored by
    eval.workers processes side by side (one model each at a time), or here with one."""
    from concurrent.futures import Future

    from specialize.engine.workers import DevicePool
    r = run.recipe
    pool = DevicePool(r.eval.workers, what="eval.workers") if r.eval.workers > 1 else None

    def submit(*args) -> Future:
        if pool is not None:
            return pool.submit(evaluate_checkpoint, *args, False)
        done: Future = Future()
        done.set_result(evaluate_checkpoint(*args))
        return done

    with pool or contextlib.nullcontext():
        pending = {}
        if r.model.name_or_path and not (start_cache(run) / "start.json").exists():
            pending["start"] = submit(r, r.model.name_or_path, start_cache(run), "start")
        for label, model_dir in selected_checkpoints(run).items():
            pending[label] = submit(r, model_dir, run.dir("eval"), label)
        checkpoints = 0
        if "tradeoff" in r.plot.plots:
            try:
                checkpoints = score_every_checkpoint(run, pool)
            except Exception as err:  # the trade-off curve is extra: its absence must not fail the run
                print(f"[run] {run.name}: per-checkpoint scoring failed, trade-off plot falls back to dev scores: "
                      f"{type(err).__name__}: {err}", file=sys.stderr)
        scores = {label: f.result() for label, f in pending.items()}
    if r.model.name_or_path and "start" not in scores:
        results = json.loads((start_cache(run) / "start.json").read_text())["results"]
        scores = {"start": {name: res["accuracy"] for name, res in results.items()}, **scores}
    (run.dir("eval") / "scores.json").write_text(json.dumps(scores, indent=1))
    return {"scores": scores, "checkpoints_scored": checkpoints}


def start_cache(run: Run) -> Path:
    """Where the start checkpoint's scores live: computed once per (model, eval settings) and shared
    by the runs of a recipe (every arm of a sweep starts from the same model)."""
    r = run.recipe
    key = _hash([r.model.name_or_path, hashed_dict(r)["eval"], r.data.shots, r.data.synthetic_sizes,
                 r.data.data_dir, r.train.seed, r.data.ood_dev_size])
    return run.root / "eval_start" / key


def stage_plot(runs: list[Run]) -> dict:
    """One plot directory per recipe, drawing across its runs (sizes, formats, losses)."""
    from specialize.engine.evaluation import plots
    first = runs[0]
    out = first.dir("plot")
    out.mkdir(parents=True, exist_ok=True)
    written = plots.plot_runs([str(run.run_dir) for run in runs], first.recipe.plot.plots, str(out),
                              labels=[run.tag or run.recipe.name for run in runs])
    return {"plots": [str(p) for p in written or []]}


STAGE_KEYS: dict[str, Callable] = {"toy": toy_key, "teacher": teacher_key, "filter": teacher_key, "align": align_key,
                                   "train": train_key, "eval": _later_stage_key, "plot": _later_stage_key}
STAGE_FUNCS: dict[str, Callable] = {"toy": stage_toy, "teacher": stage_teacher, "filter": stage_filter,
                                    "align": stage_align, "train": stage_train, "eval": stage_eval}


def wanted_stages(run: Run, stages: list[str] | None = None) -> list[str]:
    """The recipe's stages, in its order, that `--stages` keeps (all without it)."""
    return [s for s in run.recipe.stages if not stages or s in stages]


def run_stages(runs: list[Run], stages: list[str] | None = None, launcher: str | None = None,
               nproc: int = 1, log: Callable[[str], None] = print,
               stage_funcs: dict[str, Callable] | None = None, resume: bool = False,
               replace_stale_under: Path | None = None) -> list[dict]:
    """Execute every run's stages in order, skipping finished ones; returns one row per (run, stage).

    `stage_funcs` replaces stage implementations by name (the demo passes its own toy scale); `resume`
    continues an interrupted train stage from its last complete checkpoint. A stage folder holding
    finished outputs of another configuration is refused (teacher samples cost money), except below
    `replace_stale_under` (the demo's own --out, all cheap to remake), where it is deleted and run again.
    """
    funcs = {**STAGE_FUNCS, **(stage_funcs or {})}
    rows = []
    for run in runs:
        wanted = wanted_stages(run, stages)
        unknown = [s for s in run.recipe.stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"{run.source}: stages: unknown stage {unknown[0]!r} (known: {', '.join(STAGES)})")
        for stage in wanted:
            if stage == "plot":
                continue
            folder = run.dir(stage).resolve()
            if replace_stale_under and folder.is_relative_to(replace_stale_under.resolve()) and is_stale(run, stage):
                log(f"[run] {run.name}: {run.dir(stage)} holds '{stage}' outputs of another configuration; "
                    "deleting it and running the stage again")
                shutil.rmtree(folder)
            if is_done(run, stage):
                log(f"[run] {run.name}: {stage} done, reusing {run.dir(stage)}")
                rows.append({"run": run.name, "stage": stage, "status": "reused"})
                continue
            log(f"[run] {run.name}: {stage} -> {run.dir(stage)}")
            t0 = time.time()
            kwargs = {"launcher": launcher, "nproc": nproc, "resume": resume} if stage == "train" else {}
            info = funcs[stage](run, **kwargs) or {}
            mark_done(run, stage, time.time() - t0, {k: v for k, v in info.items() if k != "command"})
            rows.append({"run": run.name, "stage": stage, "status": "ran", "seconds": round(time.time() - t0, 1)})
    by_recipe: dict[str, list[Run]] = {}
    for run in runs:
        if "plot" in run.recipe.stages and (not stages or "plot" in stages) and run.recipe.plot.plots:
            by_recipe.setdefault(run.source, []).append(run)
    for group in by_recipe.values():
        info = stage_plot(group)
        rows.append({"run": group[0].recipe.name, "stage": "plot", "status": "ran", **info})
    return rows


