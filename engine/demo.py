"""`specialize demo --out DIR [--tiny]`: the whole paper in miniature, offline, on a CPU.

1. the toy stage: a byte-level BPE + GPT-2-style teacher and a T5 Unigram + "instruction-tuned"
   tiny T5 student, trained here on the synthetic world (engine/toy_teacher.py);
2. teacher CoT samples with top-k logprobs through the `hf` teacher backend, filtered by correctness;
3. Numba alignment onto the student's tokens;
4. specialization with the DeepSpeed engine (2 CPU ranks), by distribution and by sample matching;
5. evaluation before/after on in-distribution, OOD and generic splits, checkpoint selection by the
   in-distribution vs the OOD dev signal;
6. a results table, REPORT.md and PNG plots, all under DIR. A rerun reuses finished stages.

The demo is `specialize run` on an embedded recipe (the same stage functions as recipes/mini/):
this module only adds the toy scale, the comparison across the two runs and the report.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from specialize.engine.config import recipe_from_dict
from specialize.engine.pipeline import Run, run_stages
from specialize.engine.toy_teacher import ToyScale, prepare_toy_models
from specialize.engine.cli import HelpFormatter

IN_DIST = "synthetic/test"
OOD = ["synthetic/ood_steps", "synthetic/ood_templates", "synthetic/ood_numbers"]
GENERIC = ["synthetic/generic_sort", "synthetic/generic_count", "synthetic/generic_bool"]
OOD_DEV = 64  # items of each OOD split held out as its dev part (data.ood_dev_size)

# The full demo (<= 15 min on 2 cores) and the --tiny one the tests run (about a minute).
SCALES = {
    "full": dict(
        toy=ToyScale(),
        sizes={},
        teacher=dict(samples=4, limit=2000, max_tokens=128),  # every training question, as in the paper
        train=dict(micro_batch_size=16, max_steps=500, eval_every=50, save_every=50, keep_last=10, dev_limit=64),
        eval_limit=200),
    "tiny": dict(
        toy=ToyScale(teacher_steps=120, teacher_layers=2, teacher_width=64, student_steps=20, student_overrides={},
                     teacher_vocab=300, student_vocab=300, math_for_student=20, heldout_check=8,
                     teacher_sees_questions=True, teacher_examples=24, student_examples=48),
        # The data layer's default sizes (cheap to generate) so the engine's dev sets are the same
        # draw; the limits below keep the work small.
        sizes={},
        teacher=dict(samples=2, limit=24, max_tokens=40),
        train=dict(micro_batch_size=4, max_steps=6, eval_every=3, save_every=3, keep_last=2, dev_limit=4),
        eval_limit=4,
        # one split per column of the table: in-dist, OOD, generic
        eval_datasets=[IN_DIST, OOD[0], GENERIC[2]], dev_ood=[OOD[0]]),
}


def demo_recipe(out: Path, scale: dict, kind: str) -> dict:
    """The embedded recipe: recipes/mini/dm_vs_sm.yaml with every path under `out`."""
    toy = out / "toy"
    return {
        "name": f"demo_{kind}", "description": f"demo, {kind}",
        "stages": ["toy", "teacher", "filter", "align", "train", "eval"],
        "output_dir": str(out),
        "model": {"name_or_path": str(toy / "student_start"), "config": scale["toy"].student_config,
                  "tokenizer": str(toy / "student_start")},
        # ood_dev_size: each OOD split's dev part (selection), disjoint from the test part scored below
        "data": {"dataset": "synthetic", "dev_size": 64, "ood_dev_size": OOD_DEV, "formats": {"zero_shot_cot": 1.0},
                 "shots": 2, "max_source_len": 256, "max_target_len": 128, "synthetic_sizes": scale["sizes"]},
        "teacher": {"backend": "hf", "model": str(toy / "teacher"), "dataset": "synthetic", "split": "train",
                    "format": "zero_shot_cot", "shots": 0, "temperature": 0.7, "top_logprobs": 5,
                    "concurrency": 1, "out_dir": str(out / "teacher"), **scale["teacher"]},
        "aligner": {"teacher_tokenizer": str(toy / "teacher"), "student_tokenizer": str(toy / "student_start"),
                    "out_dir": str(out / "aligned")},
        "loss": {"kind": kind, "alpha": 0.0, "fused_linear": True},  # the recipes' default: KL only (DM)
        "deepspeed": {"config": {"zero_optimization": {"stage": 0}, "gradient_clipping": 1.0,
                                 "steps_per_print": 100000}, "zero_stage": 0},
        "train": {"seed": 0, "grad_accum": 1, "lr": 1e-3, "warmup_steps": 20, "precision": "fp32",
                  "log_every": 5, "selection": "in_dist", "dev_in_dist": "synthetic/dev",
                  "dev_ood": scale.get("dev_ood", OOD[:2]), **scale["train"]},
        "eval": {"datasets": scale.get("eval_datasets", [IN_DIST] + OOD + GENERIC), "format": "zero_shot_cot",
                 "limit": scale["eval_limit"],
                 "batch_size": 32, "max_new_tokens": scale["teacher"]["max_tokens"]},
        "plot": {"plots": ["training_curves", "tradeoff", "in_dist_vs_ood"], "out_dir": str(out / "plots")},
    }


def build_runs(out: Path, tiny: bool) -> list[Run]:
    scale = SCALES["tiny" if tiny else "full"]
    return [Run(recipe_from_dict(demo_recipe(out, scale, kind), source=f"demo ({kind})"), kind, f"demo-{kind}")
            for kind in ("dm", "sm")]


# ----------------------------------------------------------------------------- reading the runs back

def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def dev_curve(run: Run) -> list[dict]:
    """The engine's dev_scores.jsonl: one row per evaluation, {"step", "dev/<name>_acc", ...}."""
    return _jsonl(run.dir("train") / "dev_scores.jsonl")


def _key(name: str) -> str:
    return f"dev/{name}_acc"


def selection(runs: list[Run]) -> dict:
    """rule -> Choice (the select module): the checkpoint each dev signal picks, over the given runs."""
    from specialize.engine.select import select
    try:
        return select([str(run.dir("train")) for run in runs], rules=["in_dist", "ood"])
    except (FileNotFoundError, ValueError):
        return {}


def scores(run: Run) -> dict:
    path = run.dir("eval") / "scores.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _mean(d: dict, names: list[str]) -> float | None:
    vals = [d[n] for n in names if n in d]
    return sum(vals) / len(vals) if vals else None


def _pct(x) -> str:
    return "  n/a" if x is None else f"{100 * x:5.1f}"


# ----------------------------------------------------------------------------- report

def results_table(runs: list[Run]) -> tuple[str, list[dict]]:
    """Rows: start checkpoint, then each run's selected model; columns in-dist / OOD / generic."""
    rows = []
    first = scores(runs[0]).get("start")
    if first:
        rows.append({"model": "student start (instruction-tuned)", **_summary(first)})
    for run in runs:
        for label, accs in scores(run).items():
            if label != "start":
                rows.append({"model": f"{run.tag.upper()} {label}", **_summary(accs)})
    head = f"{'model':<36} {'in-dist':>7} {'OOD':>7} {'generic':>7}"
    lines = [head, "-" * len(head)]
    lines += [f"{r['model']:<36} {_pct(r['in_dist']):>7} {_pct(r['ood']):>7} {_pct(r['generic']):>7}" for r in rows]
    return "\n".join(lines), rows


def _summary(accs: dict) -> dict:
    return {"in_dist": accs.get(IN_DIST), "ood": _mean(accs, OOD), "generic": _mean(accs, GENERIC), "all": accs}


def verdict(better: float | None, worse: float | None, n_better: int, n_worse: int) -> str:
    """Does `better` beat `worse` beyond sampling noise? Two standard errors of the difference
    of two accuracies measured on n_better and n_worse questions: at toy scale a 1-point gap
    on 100 questions is noise, and the report must not call it a reproduction."""
    if better is None or worse is None or not n_better or not n_worse:
        return "n/a (missing numbers)"
    se = math.sqrt(better * (1 - better) / n_better + worse * (1 - worse) / n_worse)
    margin = 2 * max(se, 1e-9)
    if better - worse > margin:
        return "reproduced"
    if worse - better > margin:
        return "**not reproduced at this scale** (the opposite came out)"
    return f"**not reproduced at this scale** (difference {100 * (better - worse):+.1f} points, within noise ±{100 * margin:.1f})"


def findings(runs: list[Run]) -> list[str]:
    """Each paper finding checked against what came out, stated either way."""
    by = {run.tag: run for run in runs}
    dm, sm = scores(by["dm"]), scores(by["sm"])
    start = _summary(dm.get("start", {}))
    dm_best, sm_best = _summary(dm.get("best", {})), _summary(sm.get("best", {}))
    # questions behind each mean: the test items really scored (an OOD split's test part is smaller
    # than the split)
    r = by["dm"].recipe
    scored = {n: len(_examples(r, n, r.eval.limit)) for n in r.eval.datasets}
    n_in = scored.get(IN_DIST, 0)
    n_ood, n_gen = (sum(scored.get(n, 0) for n in names) for names in (OOD, GENERIC))
    out = [
        f"- Specialization raises in-distribution accuracy (paper: FlanT5 gains on GSM8K): "
        f"{_pct(start['in_dist'])}% -> {_pct(dm_best['in_dist'])}% (DM) — "
        f"{verdict(dm_best['in_dist'], start['in_dist'], n_in, n_in)}.",
        f"- It carries over to OOD math (paper: MultiArith/ASDiv/SVAMP improve too): "
        f"{_pct(start['ood'])}% -> {_pct(dm_best['ood'])}% — {verdict(dm_best['ood'], start['ood'], n_ood, n_ood)}.",
        f"- Generic ability is traded away (paper RQ4: BBH drops): "
        f"{_pct(start['generic'])}% -> {_pct(dm_best['generic'])}% — "
        f"{verdict(start['generic'], dm_best['generic'], n_gen, n_gen)}.",
    ]
    c_dm, c_sm = dev_curve(by["dm"]), dev_curve(by["sm"])
    key = _key(by["dm"].recipe.train.dev_in_dist)
    auc = lambda rows: sum(r.get(key, 0.0) for r in rows) / len(rows) if rows else None  # noqa: E731
    dev_n = by["dm"].recipe.train.dev_limit or 0
    out.append(f"- Distribution matching converges faster than sample matching (paper Sec. 4): mean in-dist dev "
               f"accuracy over training {_pct(auc(c_dm))}% (DM) vs {_pct(auc(c_sm))}% (SM) — "
               f"{verdict(auc(c_dm), auc(c_sm), dev_n * len(c_dm), dev_n * len(c_sm))}; "
               f"final test in-dist {_pct(dm_best['in_dist'])}% vs {_pct(sm_best['in_dist'])}%.")
    sel = selection([by["dm"]])
    if sel:
        a, b = sel["in_dist"], sel["ood"]
        out.append(f"- In-distribution and OOD dev signals pick different checkpoints (paper RQ5), DM run: in-dist "
                   f"picks step {a.step} (OOD dev {_pct(a.ood)}%), OOD picks step {b.step} (OOD dev {_pct(b.ood)}%) "
                   f"— {'reproduced' if a.step != b.step else '**not reproduced at this scale** (same checkpoint)'}.")
    return out


def _examples(recipe, name: str, limit) -> list:
    from specialize.engine.pipeline import load_examples
    return load_examples(recipe, name, split="test")[: limit or None]


def ood_split_counts(recipe) -> dict[str, tuple[int, int]]:
    """name -> (dev items, test items) of each OOD split the run uses, as the engine and the test
    stage load them."""
    from specialize.engine.data import load_dataset_by_name
    d = recipe.data
    return {n: tuple(len(load_dataset_by_name(n, None, part, d.dev_size, recipe.train.seed, d.synthetic_sizes or None,
                                              ood_dev_size=d.ood_dev_size)) for part in ("dev", "test"))
            for n in OOD if n in recipe.eval.datasets or n in recipe.train.dev_ood}


def teacher_lines(filt: dict) -> list[str]:
    """The filter's yield with and without the cut at the first answer line."""
    n = filt.get("samples")
    if not n:
        return ["Filter stage: no counts recorded."]
    return [f"- Samples: {n}; kept (correct) after the cut at the first answer line: {filt.get('kept')} "
            f"({100 * filt.get('kept', 0) / n:.1f}%); kept without the cut: {filt.get('kept_without_cut', 'n/a')} "
            f"({100 * filt.get('kept_without_cut', 0) / n:.1f}%); samples cut: {filt.get('cut_samples', 'n/a')}.",
            f"- Questions with at least one kept sample: {filt.get('questions_kept')}/{filt.get('questions')}."]


def split_lines(recipe) -> list[str]:
    counts = ood_split_counts(recipe)
    rows = [f"| {n} | {dev} | {test} |" for n, (dev, test) in counts.items()]
    return ["Each OOD split is cut once (seed 0) into a dev part, which the engine scores for checkpoint "
            "selection, and a disjoint test part, which the results above score "
            f"(`data.ood_dev_size` = {recipe.data.ood_dev_size}; the test stage reads at most "
            f"`eval.limit` = {recipe.eval.limit} of it, the engine at most `train.dev_limit` = "
            f"{recipe.train.dev_limit} of the dev part).", "",
            "| OOD split | dev items | test items |", "|---|---:|---:|", *rows]


def _selection_table(runs: list[Run]) -> str:
    from specialize.engine.select import format_table
    choices = selection(runs)
    return format_table(choices) if choices else "(no dev scores were written)"


def draw_plots(out: Path, runs: list[Run]) -> list[str]:
    """The eval teammate's plot functions over the two runs; returns the PNG paths written."""
    from specialize.engine.pipeline import stage_plot
    info = stage_plot(runs)
    return info.get("plots", [])


def write_report(out: Path, runs: list[Run], rows: list[dict], seconds: float, tiny: bool) -> dict:
    table, table_rows = results_table(runs)
    plots = draw_plots(out, runs)
    toy = json.loads((runs[0].dir("toy") / ".done-toy.json").read_text()) if (runs[0].dir("toy") / ".done-toy.json").exists() else {}
    filt = runs[0].dir("filter") / ".done-filter.json"
    kept = json.loads(filt.read_text()) if filt.exists() else {}
    stage_lines = [f"| {r['run']} | {r['stage']} | {r['status']} | {r.get('seconds', '')} |" for r in rows]
    text = "\n".join([
        f"# specialize demo{' (--tiny)' if tiny else ''}: the paper in miniature",
        "",
        f"Wall time {seconds / 60:.1f} min on this machine (stages reused from an earlier run count as 0). "
        "Synthetic math world from `specialize.engine.data.synthetic`; toy GPT-2 teacher "
        f"({toy.get('teacher_params', '?')} params, greedy dev accuracy {_pct(toy.get('teacher_dev_acc'))}%) and "
        f"tiny T5 student ({toy.get('student_params', '?')} params).",
        "",
        "## Results (test accuracy, %)",
        "", "```", table, "```", "",
        "In-dist = synthetic/test; OOD = mean of the test parts of " + ", ".join(OOD) + "; generic = mean of "
        + ", ".join(GENERIC) + ".",
        "",
        "## OOD dev/test split",
        "", *split_lines(runs[0].recipe),
        "",
        "## Model selection (dev signals over both runs' checkpoints)",
        "", _selection_table(runs), "",
        "## Paper findings, checked",
        "", *findings(runs), "",
        "## Teacher data",
        "", *teacher_lines(kept), "",
        f"Filter stage: {json.dumps({k: v for k, v in kept.items() if k not in ('key', 'stage')})}", "",
        "## Plots", "", *[f"![{Path(p).stem}]({Path(p).relative_to(out) if Path(p).is_relative_to(out) else p})" for p in plots], "",
        "## Stages", "", "| run | stage | status | seconds |", "|---|---|---|---|", *stage_lines, "",
    ])
    report = out / "REPORT.md"
    report.write_text(text)
    (out / "results.json").write_text(json.dumps({"rows": table_rows, "seconds": seconds}, indent=1, default=str))
    return {"table": table, "report": str(report), "plots": plots}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(formatter_class=HelpFormatter, prog="specialize demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (everything the demo writes goes here)")
    p.add_argument("--tiny", action="store_true", help="shrunken configuration for tests (about a minute)")
    p.add_argument("--nproc", type=int, default=2, help="CPU ranks for the DeepSpeed engine")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    scale = SCALES["tiny" if args.tiny else "full"]
    runs = build_runs(out, args.tiny)

    def toy_stage(run: Run) -> dict:
        return prepare_toy_models(run.dir("toy"), seed=run.recipe.train.seed, sizes=scale["sizes"] or None,
                                  scale=scale["toy"])

    rows = run_stages(runs, nproc=args.nproc, stage_funcs={"toy": toy_stage})
    report = write_report(out, runs, rows, seconds=time.time() - t0, tiny=args.tiny)
    print(report["table"])
    print(f"\n[demo] report: {report['report']}\n[demo] plots:  {', '.join(report['plots'])}\n[demo] output: {out}")
    return 0
