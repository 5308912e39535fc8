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
aligned shards written and read back in the layout the engine trains on.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from specialize.engine.cli import HelpFormatter
from specialize.engine.config import (
    ConfigError,
    Recipe,
    dump_recipe,
    hashed_dict,
    load_recipe,
    parse_override,
    recipe_to_dict,
)
from specialize.engine.io_helpers import settings_hash
from specialize.engine.rundir import RunDir

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


# ----------------------------------------------------------------------------- done-markers

def _hash(obj: Any) -> str:
    return settings_hash(obj)


def stage_key(run: Run, stage: str) -> str:
    """Hash of the recipe fields a stage's output depends on (what makes reuse safe)."""
    d = hashed_dict(run.recipe)
    data_src = {k: d["data"][k] for k in ("dataset", "data_dir", "dev_size", "synthetic_sizes")}
    teacher = {k: v for k, v in d["teacher"].items() if k not in ("concurrency", "out_dir", "timeout", "max_retries")}
    if stage == "toy":
        return _hash([data_src, run.recipe.teacher.model, run.recipe.model.name_or_path, run.recipe.model.config])
    if run.recipe.teacher.format.startswith("in_context") and run.recipe.teacher.shots \
            and run.recipe.teacher.prompt == "seeded":
        teacher["exemplar_seed"] = run.recipe.train.seed  # stage_teacher draws the exemplars with it
    if stage in ("teacher", "filter"):
        return _hash([stage, data_src, teacher])
    if stage == "align":
        aligner = {k: v for k, v in d["aligner"].items() if k not in ("workers", "out_dir")}
        # the tokenizer the stage really uses (as stage_align picks it), so runs of different model
        # sizes that name one shared student vocabulary share one aligned folder
        r = run.recipe
        aligner["student_tokenizer"] = r.aligner.student_tokenizer or r.model.tokenizer or r.model.name_or_path
        return _hash([data_src, teacher, aligner])
    if stage == "train":
        return _hash({k: d[k] for k in ("model", "data", "teacher", "aligner", "loss", "deepspeed", "train")})
    return _hash({k: v for k, v in d.items() if k not in ("plot", "stages", "description")})


def _marker(path: Path, stage: str) -> Path:
    return path / f".done-{stage}.json"


def is_done(run: Run, stage: str) -> bool:
    marker = _marker(run.dir(stage), stage)
    if not marker.exists():
        return False
    found = json.loads(marker.read_text()).get("key")
    if found != stage_key(run, stage):
        raise ConfigError(f"{run.source}: {run.dir(stage)} holds '{stage}' outputs of a different configuration "
                          f"(marker {marker.name}); delete that directory or point the recipe elsewhere")
    return True


def mark_done(run: Run, stage: str, seconds: float, info: dict | None = None) -> None:
    out = run.dir(stage)
    out.mkdir(parents=True, exist_ok=True)
    _marker(out, stage).write_text(json.dumps({"stage": stage, "key": stage_key(run, stage), "seconds": round(seconds, 1),
                                               "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                               **(info or {})}, indent=1))


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

def stage_toy(run: Run) -> dict:
    from specialize.engine.toy_teacher import prepare_toy_models
    r = run.recipe
    return prepare_toy_models(run.dir("toy"), seed=r.train.seed, sizes=r.data.synthetic_sizes or None)


def stage_teacher(run: Run) -> dict:
    from specialize.engine.teacher import generate
    r = run.recipe
    examples = load_examples(r, r.teacher.dataset, split=r.teacher.split)
    if r.teacher.limit:
        examples = examples[: r.teacher.limit]
    pool = training_pool(r) if r.teacher.format.startswith("in_context") else None
    summary = generate(r.teacher, examples, str(run.dir("teacher")), exemplar_pool=pool, seed=r.train.seed)
    return {"questions": len(examples), **{k: v for k, v in (summary or {}).items() if isinstance(v, (int, float))}}


def stage_filter(run: Run) -> dict:
    from specialize.engine.teacher import filter_samples
    result = filter_samples(str(run.dir("teacher")), str(run.dir("filter")))
    return result if isinstance(result, dict) else {}


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


def stage_train(run: Run, launcher: str | None = None, nproc: int = 1, resume: bool = False) -> dict:
    cmd = train_command(resolved_train_recipe(run), launcher, nproc, resume)
    print(f"[run] {run.name}: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{run.name}: training exited with status {proc.returncode} "
                           f"(command: {' '.join(cmd)})")
    return {"command": cmd}


def evaluate_checkpoint(recipe: Recipe, model_dir: str, out_dir: Path, label: str) -> dict:
    """Score one saved model on every eval dataset; writes <out_dir>/<label>.json, returns accuracies."""
    from specialize.engine.data import draw_exemplars, split_label
    from specialize.engine.evaluate import evaluate_model, load_model_and_tokenizer
    model, tok = load_model_and_tokenizer(model_dir, recipe.model.tokenizer)
    shots = recipe.data.shots if recipe.eval.format.startswith("in_context") else 0
    exemplars = draw_exemplars(training_pool(recipe), shots, recipe.train.seed) if shots else ()
    results = {}
    for name in recipe.eval.datasets:
        examples = load_examples(recipe, name, split="test")[: recipe.eval.limit or None]
        res = evaluate_model(model, tok, examples, name, fmt=recipe.eval.format, exemplars=exemplars,
                             batch_size=recipe.eval.batch_size, max_new_tokens=recipe.eval.max_new_tokens,
                             num_beams=recipe.eval.num_beams, progress=True, data_dir=recipe.data.data_dir,
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
    from specialize.engine.select import export_selected
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


def score_every_checkpoint(run: Run) -> int:
    """RQ4: score every kept checkpoint on the trade-off datasets (train.dev_limit examples each) into
    train/test_scores.jsonl; the evaluator exports DeepSpeed checkpoints to HF first."""
    from specialize.engine.evaluate import evaluate_checkpoints
    r, train_dir = run.recipe, run.dir("train")
    rows = evaluate_checkpoints(str(train_dir), tradeoff_datasets(r), fmt=r.eval.format, limit=r.train.dev_limit,
                                tokenizer=r.model.tokenizer, shots=r.data.shots, seed=r.train.seed,
                                data_dir=r.data.data_dir, batch_size=r.eval.batch_size,
                                max_new_tokens=r.eval.max_new_tokens, num_beams=r.eval.num_beams, progress=False)
    return len(rows)


def stage_eval(run: Run) -> dict:
    r = run.recipe
    scores = {}
    if r.model.name_or_path:
        scores["start"] = evaluate_start(run)
    for label, model_dir in selected_checkpoints(run).items():
        scores[label] = evaluate_checkpoint(r, model_dir, run.dir("eval"), label)
    (run.dir("eval") / "scores.json").write_text(json.dumps(scores, indent=1))
    checkpoints = 0
    if "tradeoff" in r.plot.plots:
        try:
            checkpoints = score_every_checkpoint(run)
        except Exception as err:  # the trade-off curve is extra: its absence must not fail the run
            print(f"[run] {run.name}: per-checkpoint scoring failed, trade-off plot falls back to dev scores: "
                  f"{type(err).__name__}: {err}", file=sys.stderr)
    return {"scores": scores, "checkpoints_scored": checkpoints}


def evaluate_start(run: Run) -> dict:
    """The start checkpoint's scores, computed once per (model, eval settings) and shared by the runs
    of a recipe (every arm of a sweep starts from the same model)."""
    r = run.recipe
    key = _hash([r.model.name_or_path, recipe_to_dict(r)["eval"], r.data.shots, r.data.synthetic_sizes,
                 r.data.data_dir, r.train.seed, r.data.ood_dev_size])
    cache = run.root / "eval_start" / key
    if (cache / "start.json").exists():
        results = json.loads((cache / "start.json").read_text())["results"]
        return {name: res["accuracy"] for name, res in results.items()}
    return evaluate_checkpoint(r, r.model.name_or_path, cache, "start")


def stage_plot(runs: list[Run]) -> dict:
    """One plot directory per recipe, drawing across its runs (sizes, formats, losses)."""
    from specialize.engine import plots
    first = runs[0]
    out = first.dir("plot")
    out.mkdir(parents=True, exist_ok=True)
    written = plots.plot_runs([str(run.run_dir) for run in runs], first.recipe.plot.plots, str(out),
                              labels=[run.tag or run.recipe.name for run in runs])
    return {"plots": [str(p) for p in written or []]}


STAGE_FUNCS: dict[str, Callable] = {"toy": stage_toy, "teacher": stage_teacher, "filter": stage_filter,
                                    "align": stage_align, "train": stage_train, "eval": stage_eval}


def run_stages(runs: list[Run], stages: list[str] | None = None, launcher: str | None = None,
               nproc: int = 1, log: Callable[[str], None] = print,
               stage_funcs: dict[str, Callable] | None = None, resume: bool = False) -> list[dict]:
    """Execute every run's stages in order, skipping finished ones; returns one row per (run, stage).

    `stage_funcs` replaces stage implementations by name (the demo passes its own toy scale); `resume`
    continues an interrupted train stage from its last complete checkpoint.
    """
    funcs = {**STAGE_FUNCS, **(stage_funcs or {})}
    rows = []
    for run in runs:
        wanted = [s for s in run.recipe.stages if not stages or s in stages]
        unknown = [s for s in run.recipe.stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"{run.source}: stages: unknown stage {unknown[0]!r} (known: {', '.join(STAGES)})")
        for stage in wanted:
            if stage == "plot":
                continue
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


# ----------------------------------------------------------------------------- dry run

def _check_deepspeed(run: Run, world_size: int) -> str:
    """The engine's own DeepSpeed config builder, so the dry run fails exactly where training would."""
    from specialize.engine.ds_config import build_ds_config
    r = run.recipe
    if isinstance(r.deepspeed.config, str) and not Path(r.deepspeed.config).is_file():
        raise ConfigError(f"{run.source}: deepspeed.config: file {r.deepspeed.config!r} not found (paths are "
                          f"relative to the directory `specialize run` is started from)")
    try:
        ds = build_ds_config(r, world_size)
    except ConfigError as err:
        raise ConfigError(f"{run.source}: {err}") from None
    zero = ds["zero_optimization"]
    precision = "bf16" if ds["bf16"]["enabled"] else "fp16" if ds["fp16"]["enabled"] else "fp32"
    offload = [k for k in ("offload_optimizer", "offload_param") if k in zero]
    return (f"ZeRO-{zero['stage']} {precision}, offload={offload or 'none'}, train_batch_size="
            f"{ds['train_batch_size']} = {ds['train_micro_batch_size_per_gpu']} x "
            f"{ds['gradient_accumulation_steps']} x {world_size} ranks")


def _meta_model(run: Run):
    """The student's true shapes, random-init on the meta device (no memory is allocated)."""
    import torch
    from transformers import T5ForConditionalGeneration

    from specialize.engine.models import t5_config
    cfg = t5_config(run.recipe.model.config, **run.recipe.model.overrides)
    with torch.device("meta"):
        model = T5ForConditionalGeneration(cfg)
    return cfg, model


def _tiny_examples(run: Run, n: int = 6) -> tuple[list, str]:
    """A few training examples: the recipe's own data when it is on disk, else the synthetic stand-in."""
    r = run.recipe
    if r.data.dataset == "synthetic" or r.data.data_dir:
        try:
            return training_pool(r)[:n], r.data.dataset
        except (OSError, FileNotFoundError):
            pass
    from specialize.engine.data.synthetic import make_splits
    return list(make_splits(seed=0)["train"][:n]), "synthetic stand-in (recipe data not on disk)"


def _tiny_tokenizer(run: Run, texts: list[str]):
    """The recipe's student tokenizer when it loads offline, else a small T5-style one trained here."""
    from specialize.engine.tokenizers import load_tokenizer, train_t5_unigram
    name = run.recipe.aligner.student_tokenizer or run.recipe.model.tokenizer
    if name:
        try:
            return load_tokenizer(name), name
        except (OSError, ValueError):
            pass
    return train_t5_unigram(texts * 4, vocab_size=200), f"stand-in ({name} not available offline)"


def dry_run(run: Run, world_size: int = 8) -> list[tuple[str, str]]:
    """Check that the stages wire together; returns (check, detail) rows, raises on the first mismatch."""
    import numpy as np
    import torch

    from specialize.engine.data import FORMATS, build_prompt, build_target, draw_exemplars, extract_answer
    r, rows = run.recipe, []
    bad = [s for s in r.stages if s not in STAGES]
    if bad:
        raise ConfigError(f"{run.source}: stages: unknown stage {bad[0]!r} (known: {', '.join(STAGES)})")
    if "toy" in r.stages and r.teacher.backend != "hf":
        raise ConfigError(f"{run.source}: the toy stage trains a local teacher, so teacher.backend must be hf")
    rows.append(("stages", " -> ".join(r.stages) + f"  (run dir {run.run_dir})"))
    rows.append(("deepspeed", _check_deepspeed(run, world_size)))

    cfg, model = _meta_model(run)
    params = sum(p.numel() for p in model.parameters())
    rows.append(("model", f"{r.model.config}: {params / 1e6:,.{0 if params > 1e8 else 2}f}M params, d_model={cfg.d_model}, "
                          f"layers={cfg.num_layers}+{cfg.num_decoder_layers}, vocab={cfg.vocab_size} (meta device)"))

    examples, data_note = _tiny_examples(run)
    for fmt in list(r.data.formats) + [r.teacher.format, r.eval.format]:
        if fmt not in FORMATS:
            raise ConfigError(f"{run.source}: prompt format {fmt!r} unknown (known: {', '.join(FORMATS)})")
    tok, tok_note = _tiny_tokenizer(run, [e.question + " " + (e.rationale or "") for e in examples])
    if len(tok) > cfg.vocab_size and r.model.name_or_path and r.model.config != "tiny":
        # A pretrained checkpoint cannot grow its embedding: ids past vocab_size would index out of range.
        raise ConfigError(f"{run.source}: tokenizer has {len(tok)} ids but {r.model.config} has vocab_size "
                          f"{cfg.vocab_size}")
    lengths = []
    for fmt in r.data.formats:
        ex = examples[0]
        in_context = fmt.startswith("in_context")
        shots = draw_exemplars(examples, r.data.shots, r.train.seed, exclude_id=ex.id) if in_context else ()
        source, target = build_prompt(ex.question, fmt, shots), build_target(ex, ex.answer, fmt)
        if extract_answer(target, "gsm8k" if r.data.dataset == "gsm8k" else r.data.dataset) is None:
            raise ValueError(f"{run.source}: data format {fmt}: no answer can be read back from target {target!r}")
        lengths.append(f"{fmt} src={len(tok(source)['input_ids'])} tgt={len(tok(target)['input_ids'])}")
    rows.append(("data", f"{data_note}; tokenizer {tok_note}; " + ", ".join(lengths)))
    rows.append(("teacher", f"{r.teacher.backend}:{r.teacher.model} {r.teacher.format} {r.teacher.shots}-shot "
                            f"({r.teacher.prompt} prompt{', cut at the answer' if r.teacher.cut_at_answer else ''}), "
                            f"{r.teacher.samples} samples, T={r.teacher.temperature}, top-{r.teacher.top_logprobs}"))

    # Aligned shards in the layout the engine reads, ids drawn from the true vocabulary.
    import tempfile

    from specialize.aligner.shards import AlignedShards, write_shards
    k, rng = r.teacher.top_logprobs, np.random.default_rng(0)
    records = []
    for i, ex in enumerate(examples[:3]):
        labels = np.asarray(tok(build_target(ex, ex.answer, "zero_shot_cot"))["input_ids"], dtype=np.int32)
        ids = rng.integers(3, cfg.vocab_size, size=(len(labels), k)).astype(np.int32)
        ids[:, 0] = labels
        logp = np.log(np.full((len(labels), k), 1.0 / k, dtype=np.float32))
        records.append({"qid": ex.id, "sample_index": 0, "answer": ex.answer, "question": ex.question,
                        "input_ids": np.asarray(tok(ex.question)["input_ids"], dtype=np.int32), "labels": labels,
                        "topk_ids": ids, "topk_logprobs": logp})
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(records, tmp)
        shards = AlignedShards(tmp)
        item = shards[0]
        if item["topk_ids"].shape != (len(item["labels"]), k):
            raise ValueError(f"aligned shards: topk_ids {item['topk_ids'].shape} vs labels {item['labels'].shape}, K={k}")
        rows.append(("aligned", f"{len(shards)} records read back, K={k}, labels {item['labels'].shape}"))
        # copies: the shards are read-only memory maps
        topk_ids = torch.tensor(np.array(item["topk_ids"]), dtype=torch.long)
        topk_lp = torch.tensor(np.array(item["topk_logprobs"]))
        target = torch.tensor(np.array(item["labels"]), dtype=torch.long)

    # Loss kernel on the true hidden size and vocabulary, a few rows only.
    from specialize.kernels import fused_linear_sparse_kl_ce, sparse_kl_ce
    n = min(4, len(target))
    h = torch.randn(n, cfg.d_model)
    weight = torch.randn(cfg.vocab_size, cfg.d_model) * cfg.d_model ** -0.5
    alpha = 1.0 if r.loss.kind == "sm" else r.loss.alpha
    kw = dict(alpha=alpha, temperature=r.loss.temperature, tail=r.loss.tail)
    if r.loss.fused_linear:
        loss = fused_linear_sparse_kl_ce(h, weight, topk_ids[:n], topk_lp[:n], target[:n],
                                         chunk_size=r.loss.chunk_size, **kw)
    else:
        loss = sparse_kl_ce(h @ weight.T, topk_ids[:n], topk_lp[:n], target[:n], **kw)
    if not torch.isfinite(loss):
        raise ValueError(f"{run.source}: loss kernel returned {loss.item()} on true shapes")
    kernel = "fused_linear_sparse_kl_ce" if r.loss.fused_linear else "sparse_kl_ce"
    rows.append(("loss", f"{r.loss.kind}: {kernel} h[{n},{cfg.d_model}] W[{cfg.vocab_size},{cfg.d_model}] "
                         f"K={k} alpha={alpha} -> {loss.item():.3f}"))
    rows.append(("eval", f"{', '.join(r.eval.datasets)} ({r.eval.format}); plots: {', '.join(r.plot.plots) or 'none'}"))
    return rows


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
                    rows = dry_run(run, world)
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
