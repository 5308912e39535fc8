"""`specialize demo --out DIR [--tiny]`: the whole paper in miniature, offline, on a CPU.

1. the toy stage: a byte-level BPE + Llama-style teacher and a T5 Unigram + "instruction-tuned"
   tiny T5 student, trained here on the synthetic world (engine/demo/toy_models.py), kept under
   DIR/toy/<hash of the toy configuration>/ so a second run reuses them;
2. teacher CoT samples with top-k logprobs through the `hf` teacher backend, filtered by correctness;
3. Numba alignment onto the student's tokens;
4. specialization with the DeepSpeed engine (2 CPU ranks), by distribution and by sample matching;
5. evaluation before/after on in-distribution, OOD and generic splits, checkpoint selection by the
   in-distribution vs the OOD dev signal;
6. REPORT.md with the results table and each paper finding judged by a test that can fail
   (engine/demo/findings.py), results.json and PNG plots, all under DIR. A rerun reuses finished stages.

The configuration is recipes/mini/dm_vs_sm.yaml swept over loss.kind=[dm, sm], with named
overrides: PATHS (everything under DIR) and, for --tiny, TINY (the test scale). This module only
adds the toy scale, the comparison across the two runs and the report.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from specialize.engine.cli import HelpFormatter
from specialize.engine.config import ConfigError
from specialize.engine.demo import findings as fnd
from specialize.engine.demo.toy_models import ToyScale, prepare_toy_models, toy_key
from specialize.engine.io_helpers import percent, read_jsonl
from specialize.engine.pipeline import Run, expand_runs, run_stages

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "mini" / "dm_vs_sm.yaml"
SWEEP = "loss.kind=[dm, sm]"
IN_DIST = "synthetic/test"
OOD = ["synthetic/ood_steps", "synthetic/ood_templates", "synthetic/ood_numbers"]
GENERIC = ["synthetic/generic_sort", "synthetic/generic_count", "synthetic/generic_bool"]

# --tiny: the test configuration (about a minute); the toy scale is not a recipe field.
TINY_TOY = ToyScale(teacher_steps=120, teacher_layers=2, teacher_width=64, student_steps=20, student_overrides={},
                    teacher_vocab=300, student_vocab=300, student_math={"train": 20}, heldout_check=8,
                    teacher_sees_questions=True, teacher_examples=24, student_examples=48, practice_questions=2000)
TINY = {"teacher.samples": 4, "teacher.limit": 24, "teacher.max_tokens": 40, "eval.max_new_tokens": 40,
        "train.micro_batch_size": 2, "train.max_steps": 6, "train.eval_every": 3, "train.save_every": 3,
        "train.keep_last": 2, "train.dev_limit": 4, "train.log_every": 2, "train.dev_ood": [OOD[0]],
        "eval.limit": 4, "eval.datasets": [IN_DIST, OOD[0], GENERIC[2]], "data.ood_dev_size": 64}


def _sets(named: dict) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in named.items()]


def paths(out: Path, toy: Path, recipe: Path = RECIPE) -> dict:
    """The PATHS overrides: every file the demo reads or writes under `out` (the recipe's runs/mini
    paths are for `specialize run`), the toy models under toy/<key>."""
    return {"output_dir": str(out), "model.name_or_path": str(toy / "student_start"),
            "model.tokenizer": str(toy / "student_start"), "teacher.model": str(toy / "teacher"),
            "teacher.out_dir": str(out / "teacher"), "aligner.teacher_tokenizer": str(toy / "teacher"),
            "aligner.student_tokenizer": str(toy / "student_start"), "aligner.out_dir": str(out / "aligned"),
            "plot.out_dir": str(out / "plots"),
            # the recipe names its DeepSpeed JSON relative to the repository root
            "deepspeed.config": str(recipe.parents[2] / "recipes" / "ds_cpu_fp32.json")}


def toy_scale(tiny: bool) -> ToyScale:
    return TINY_TOY if tiny else ToyScale()


def build_runs(out: Path, tiny: bool, recipe: Path = RECIPE) -> list[Run]:
    """The recipe swept over DM and SM, with the PATHS (and, for --tiny, TINY) overrides."""
    if not recipe.exists():
        raise ConfigError(f"{recipe}: the demo's recipe is missing (the demo runs from a source checkout)")
    probe = expand_runs([str(recipe)], _sets(TINY) if tiny else [], [])[0].recipe  # the seed and sizes
    toy = out / "toy" / toy_key(probe.train.seed, probe.data.synthetic_sizes or None, toy_scale(tiny))
    sets = _sets(paths(out, toy, recipe)) + (_sets(TINY) if tiny else []) + _sets(fit_processes(probe))
    return expand_runs([str(recipe)], sets, [SWEEP])


def fit_processes(recipe) -> dict:
    """teacher.replicas and eval.workers cut to the visible GPUs (one process per GPU; the recipe's
    two are for the 2-core CPU), so the demo also runs on a machine with one GPU."""
    import torch
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not gpus:
        return {}
    counts = {"teacher.replicas": recipe.teacher.replicas, "eval.workers": recipe.eval.workers}
    return {key: gpus for key, n in counts.items() if n > gpus}


# ----------------------------------------------------------------------------- reading the runs back

def selection(runs: list[Run]) -> dict | str:
    """rule -> Choice (the select module): the checkpoint each dev signal picks, over the given runs; or,
    where the runs cannot be read, why (e.g. no dev scores yet, a recipe.yaml that does not load)."""
    from specialize.engine.evaluation.select import select
    try:
        return select([str(run.dir("train")) for run in runs], rules=["in_dist", "ood"])
    except (FileNotFoundError, ValueError) as err:
        return f"{type(err).__name__}: {err}"


def scores(run: Run) -> dict:
    path = run.dir("eval") / "scores.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _mean(d: dict, names: list[str]) -> float | None:
    vals = [d[n] for n in names if n in d]
    return sum(vals) / len(vals) if vals else None


def _pct(x) -> str:
    return percent(x, width=5)


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


# ----------------------------------------------------------------------------- the findings

PAPER = {
    "in-dist": "specialization raises in-distribution accuracy (FlanT5 gains on GSM8K, Fig. 1/Table 1): "
               "DM best > start",
    "OOD": "it carries over to held-out math (MultiArith/ASDiv/SVAMP improve too): DM best > start",
    "generic": "generic ability is traded away (RQ4, Fig. 3: BBH drops): start > DM best",
    "DM faster": "distribution matching converges faster than sample matching (Sec. 4): DM dev AUC > SM dev AUC",
    "RQ5": "select by the OOD dev signal for OOD performance (RQ5, Fig. 4): OOD-picked > in-dist-picked "
           "on OOD test",
}


def _start_file(run: Run) -> Path:
    """The start model's scored predictions (the pipeline caches them under eval_start/<key>/)."""
    found = [p for p in sorted((run.root / "eval_start").glob("*/start.json"), key=lambda p: p.stat().st_mtime)
             if json.loads(p.read_text()).get("model") == run.recipe.model.name_or_path]
    return found[-1] if found else run.root / "eval_start" / "missing" / "start.json"


def _picked_file(run: Run, rule: str) -> Path:
    """The evaluated model a dev signal picked: best/ is train.selection's; the other rule's is
    selected_<rule>.json, or best's own when both signals pick one checkpoint."""
    other = run.dir("eval") / f"selected_{rule}.json"
    return other if rule != run.recipe.train.selection and other.exists() else run.dir("eval") / "best.json"


def dev_curve(run: Run, name: str) -> dict[int, float]:
    return {step: sum(items.values()) / len(items)
            for step, items in fnd.dev_items_by_step(run.dir("train"), name).items() if items}


def judge_findings(runs: list[Run]) -> list[fnd.Finding]:
    """The five findings from the runs' per-question outputs (paired A - B, reproduced beyond 2 SE)."""
    by = {run.tag: run for run in runs}
    dm, sm = by["dm"], by["sm"]
    start, best = _start_file(dm), _picked_file(dm, "in_dist")
    item = fnd.item_correct
    out = [
        fnd.compare("in-dist rises", PAPER["in-dist"], f"test accuracy on {IN_DIST}", "DM best", "start",
                    item(best, [IN_DIST]), item(start, [IN_DIST])),
        fnd.compare("OOD rises", PAPER["OOD"], "test accuracy, OOD test parts pooled", "DM best", "start",
                    item(best, OOD), item(start, OOD)),
        fnd.compare("generic falls", PAPER["generic"], "test accuracy, generic families pooled", "start", "DM best",
                    item(start, GENERIC), item(best, GENERIC)),
    ]
    name = dm.recipe.train.dev_in_dist
    dm_steps, sm_steps = fnd.dev_items_by_step(dm.dir("train"), name), fnd.dev_items_by_step(sm.dir("train"), name)
    steps = sorted(set(dm_steps) & set(sm_steps))
    c_dm, c_sm = dev_curve(dm, name), dev_curve(sm, name)
    note = ""
    if c_sm:
        level = 0.9 * c_sm[max(c_sm)]
        note = (f"steps to reach 90% of SM's final dev accuracy ({100 * level:.1f}%): DM "
                f"{fnd.steps_to_reach(c_dm, level)}, SM {fnd.steps_to_reach(c_sm, level)}; one seed, so the SE "
                "covers the dev questions, not seed-to-seed variation")
    out.append(fnd.compare("DM faster", PAPER["DM faster"],
                           f"mean {name} dev accuracy over the {len(steps)} evaluations (AUC)", "DM", "SM",
                           fnd.area_items(dm_steps, steps), fnd.area_items(sm_steps, steps), note))
    picked_ood = _picked_file(dm, "ood")
    same = picked_ood == best
    out.append(fnd.compare("RQ5", PAPER["RQ5"], "DM run: OOD test accuracy, pooled", "OOD-picked", "in-dist-picked",
                           item(picked_ood, OOD), item(best, OOD),
                           "both signals picked the same checkpoint" if same else ""))
    return out


def finding_lines(found: list[fnd.Finding]) -> list[str]:
    n_ok = sum(f.reproduced for f in found)
    return [f"Each row: the paper's claim and direction (A > B), both measured numbers (%), the paired gap "
            "A - B over the same questions with two standard errors, the questions behind it, and the "
            f"verdict: **reproduced** only when the gap exceeds 2 SE. {n_ok} of {len(found)} reproduced.", "",
            fnd.table(found)]


# ----------------------------------------------------------------------------- teacher data

def teacher_spread(filter_dir: Path) -> dict:
    """How much the kept teacher samples' top-k says beyond the sampled token: the mean entropy (nats)
    of the top-k renormalised, and the mean probability off the sampled token, over every token of
    every kept sample, in the distribution the folder's manifest names (teacher.logprobs)."""
    from specialize.engine.teacher.records import read_manifest, with_legacy_defaults
    settings = with_legacy_defaults((read_manifest(filter_dir) or {}).get("settings", {}))
    entropy = off = 0.0
    tokens = 0
    split_tokens = 0  # positions where the top-1 holds under 90% of the mass: real choice points
    for path in sorted(filter_dir.glob("samples-*.jsonl")):
        for rec in read_jsonl(path):
            for lp, tops in zip(rec["token_logprobs"], rec["top_logprobs"]):
                probs = [math.exp(t[1]) for t in tops]
                if not probs:
                    continue
                total = sum(probs)
                entropy -= sum(p / total * math.log(p / total) for p in probs if p > 0)
                off += 1 - math.exp(lp)
                split_tokens += max(probs) < 0.9
                tokens += 1
    if not tokens:
        return {}
    return {"tokens": tokens, "top_k_entropy": entropy / tokens, "off_sampled": off / tokens,
            "choice_points": split_tokens / tokens, "logprobs": settings.get("logprobs"),
            "temperature": settings.get("temperature")}


def teacher_lines(filt: dict, spread: dict) -> list[str]:
    """The filter's yield with and without the cut at the first answer line, and the soft targets' spread."""
    n = filt.get("samples")
    if not n:
        return ["Filter stage: no counts recorded."]
    lines = [f"- Samples: {n}; kept (correct) after the cut at the first answer line: {filt.get('kept')} "
             f"({100 * filt.get('kept', 0) / n:.1f}%); kept without the cut: {filt.get('kept_without_cut', 'n/a')} "
             f"({100 * filt.get('kept_without_cut', 0) / n:.1f}%); samples cut: {filt.get('cut_samples', 'n/a')}.",
             f"- Questions with at least one kept sample: {filt.get('questions_kept')}/{filt.get('questions')}."]
    if spread:
        which = {"raw": f"the teacher's own distribution (T = 1; the tokens were drawn at T = {spread.get('temperature')})",
                 "sampled": f"the distribution the tokens were drawn from (T = {spread.get('temperature')})"}
        lines.append(f"- The soft targets are {which.get(spread.get('logprobs'), 'of an unrecorded kind')} "
                     "(teacher.logprobs).")
        lines.append(f"- The soft targets carry information: over the {spread['tokens']} tokens of the kept samples, "
                     f"the teacher's mean top-k entropy is {spread['top_k_entropy']:.3f} nats, the mean probability "
                     f"off the sampled token {100 * spread['off_sampled']:.1f}%, and at "
                     f"{100 * spread['choice_points']:.1f}% of the tokens the top-1 holds under 90% of the mass "
                     "(the world's choice points: operand order, opener, which amount first).")
    return lines


def load_part(recipe, name: str, part: str) -> list:
    """The `part` (dev or test) of a dataset as the run's engine and test stage load it."""
    from specialize.engine.data import load_dataset_by_name
    d = recipe.data
    return load_dataset_by_name(name, None, part, d.dev_size, recipe.train.seed, d.synthetic_sizes or None,
                                ood_dev_size=d.ood_dev_size)


def ood_split_counts(recipe) -> dict[str, tuple[int, int]]:
    """name -> (dev items, test items) of each OOD split the run uses, as the engine and the test
    stage load them."""
    return {n: tuple(len(load_part(recipe, n, part)) for part in ("dev", "test"))
            for n in OOD if n in recipe.eval.datasets or n in recipe.train.dev_ood}


def split_lines(recipe) -> list[str]:
    counts = ood_split_counts(recipe)
    rows = [f"| {n} | {dev} | {test} |" for n, (dev, test) in counts.items()]
    return ["Each OOD split is cut once (seed 0) into a dev part, which the engine scores for checkpoint "
            "selection, and a disjoint test part, which the results above score "
            f"(`data.ood_dev_size` = {recipe.data.ood_dev_size}; the test stage reads at most "
            f"`eval.limit` = {recipe.eval.limit} of it, the engine at most `train.dev_limit` = "
            f"{recipe.train.dev_limit} of the dev part). {_dev_size_line(recipe, counts)}", "",
            "| OOD split | dev items | test items |", "|---|---:|---:|", *rows]


def _dev_size_line(recipe, ood_counts: dict) -> str:
    """What the dev sets' sizes buy: the SE of one checkpoint's accuracy near 50% for the smallest OOD
    dev part (the selection signal), and the in-distribution dev set's size (finding 4's AUC)."""
    limit = recipe.train.dev_limit or float("inf")
    ood = min((min(dev, limit) for dev, _ in ood_counts.values()), default=0)
    n_in = min(len(load_part(recipe, recipe.train.dev_in_dist, "dev")), limit) if recipe.train.dev_in_dist else 0
    parts = []
    if ood:
        parts.append(f"An OOD dev part of {ood} questions puts the standard error of a dev accuracy near 50% at "
                     f"{100 * math.sqrt(0.25 / ood):.1f} points, so checkpoints 10 points apart are told apart "
                     "by the dev signal rather than by which questions were drawn.")
    if n_in:
        parts.append(f"The in-distribution dev set ({recipe.train.dev_in_dist}) holds {n_in} questions, all "
                     "scored at every evaluation, for finding 4's AUC (its SE falls with the square root of "
                     "the questions).")
    return " ".join(parts)


def accuracy_by_group(correct: dict[str, float], group: dict[str, int]) -> dict[int, tuple[int, float]]:
    """group key -> (questions, accuracy) over the items of `correct` (id -> 1/0) that `group` keys."""
    out: dict[int, list[float]] = {}
    for i, c in correct.items():
        if i in group:
            out.setdefault(group[i], []).append(c)
    return {k: (len(v), sum(v) / len(v)) for k, v in sorted(out.items())}


def operations(example) -> int:
    """A synthetic problem's operation count: its gold CoT's lines less the answer line."""
    return len((example.rationale or "").strip().splitlines()) - 1


def length_lines(runs: list[Run]) -> list[str]:
    """Test accuracy of the start and the DM pick per split and number of operations: where the
    student's reasoning holds and where it stops."""
    dm = next(run for run in runs if run.tag == "dm")
    start, best = _start_file(dm), _picked_file(dm, "in_dist")
    rows = []
    for name in [IN_DIST, *OOD]:
        if name not in dm.recipe.eval.datasets:
            continue
        group = {e.id: operations(e) for e in load_part(dm.recipe, name, "test")}
        before = accuracy_by_group(fnd.item_correct(start, [name]), group)
        after = accuracy_by_group(fnd.item_correct(best, [name]), group)
        rows += [f"| {name} | {k} | {after[k][0]} | {_pct(before.get(k, (0, None))[1])} | {_pct(acc)} |"
                 for k, (_, acc) in after.items()]
    return ["Test accuracy (%) by the number of operations in the gold CoT (two-person problems count "
            "the final sum). Training problems have 2 or 3.", "",
            "| split | operations | questions | start | DM best |", "|---|---:|---:|---:|---:|", *rows]


def _selection_table(runs: list[Run]) -> str:
    from specialize.engine.evaluation.select import format_table
    choices = selection(runs)
    if isinstance(choices, str):
        return f"(no selection: {choices})"
    return format_table(choices) if choices else "(no dev scores were written)"


def write_report(out: Path, runs: list[Run], rows: list[dict], seconds: float, tiny: bool) -> dict:
    table, table_rows = results_table(runs)
    plots = [p for r in rows for p in r.get("plots", [])]
    done_toy = runs[0].dir("toy") / ".done-toy.json"
    toy = json.loads(done_toy.read_text()) if done_toy.exists() else {}
    filt = runs[0].dir("filter") / ".done-filter.json"
    kept = json.loads(filt.read_text()) if filt.exists() else {}
    spread = teacher_spread(runs[0].dir("filter"))
    found = judge_findings(runs)
    stage_lines = [f"| {r['run']} | {r['stage']} | {r['status']} | {r.get('seconds', '')} |" for r in rows]
    text = "\n".join([
        f"# specialize demo{' (--tiny)' if tiny else ''}: the paper in miniature",
        "",
        f"Wall time {seconds / 60:.1f} min on this machine (stages reused from an earlier run count as 0). "
        "Synthetic math world from `specialize.engine.data.synthetic`; toy Llama-style teacher "
        f"({toy.get('teacher_params', '?')} params, greedy dev accuracy {_pct(toy.get('teacher_dev_acc'))}%) and "
        f"tiny T5 student ({toy.get('student_params', '?')} params); toy models in `{runs[0].dir('toy')}`.",
        "",
        "## Results (test accuracy, %)",
        "", "```", table, "```", "",
        "In-dist = synthetic/test; OOD = mean of the test parts of " + ", ".join(OOD) + "; generic = mean of "
        + ", ".join(GENERIC) + ".",
        "",
        "## Paper findings, checked",
        "", *finding_lines(found), "",
        "## By reasoning length",
        "", *length_lines(runs), "",
        "## OOD dev/test split",
        "", *split_lines(runs[0].recipe),
        "",
        "## Model selection (dev signals over both runs' checkpoints)",
        "", _selection_table(runs), "",
        "## Teacher data",
        "", *teacher_lines(kept, spread), "",
        f"Filter stage: {json.dumps({k: v for k, v in kept.items() if k not in ('key', 'stage')})}", "",
        "## Plots", "", *[f"![{Path(p).stem}]({Path(p).relative_to(out) if Path(p).is_relative_to(out) else p})"
                          for p in plots], "",
        "## Stages", "", "| run | stage | status | seconds |", "|---|---|---|---|", *stage_lines, "",
    ])
    report = out / "REPORT.md"
    report.write_text(text)
    (out / "results.json").write_text(json.dumps(
        {"rows": table_rows, "seconds": seconds, "teacher_spread": spread,
         "findings": [{**vars(f), "verdict": f.verdict, "reproduced": f.reproduced} for f in found]},
        indent=1, default=str))
    return {"table": table, "report": str(report), "plots": plots, "findings": found}


OWNER_MARK = ".specialize-demo"


def claim_output_dir(out: Path) -> bool:
    """Whether `out` is the demo's own, claiming it if it is new: empty, or marked by an earlier demo
    (OWNER_MARK, or the REPORT.md a demo writes from before the mark existed)."""
    report = out / "REPORT.md"
    ours = (out / OWNER_MARK).exists() or not any(out.iterdir()) or (
        report.exists() and report.read_text(errors="replace").startswith("# specialize demo"))
    if ours:
        (out / OWNER_MARK).write_text("made by `specialize demo`: stages of another configuration here are remade\n")
    return ours


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(formatter_class=HelpFormatter, prog="specialize demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (everything the demo writes goes here)")
    p.add_argument("--tiny", action="store_true", help="shrunken configuration for tests (about a minute)")
    p.add_argument("--nproc", type=int, default=2, help="CPU ranks for the DeepSpeed engine (default 2)")
    p.add_argument("--recipe", type=Path, default=RECIPE, help=f"the recipe the demo runs (default {RECIPE})")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    runs = build_runs(out, args.tiny, args.recipe.resolve())
    scale = toy_scale(args.tiny)

    def toy_stage(run: Run) -> dict:
        return prepare_toy_models(run.dir("toy"), seed=run.recipe.train.seed,
                                  sizes=run.recipe.data.synthetic_sizes or None, scale=scale)

    # The stages run here (teacher sampling, evaluation) decode a sub-million-parameter model one
    # token at a time: one thread does that as fast as two, and two threads on cores that are busy
    # (another job, or this demo's own training ranks just before) spin against each other. Measured
    # on one teacher batch (64 samples) on the 2-core machine under load: 0.41 s with one thread,
    # 11.9 s with two. Training runs in its own ranks (one thread each, set by torchrun).
    import torch
    torch.set_num_threads(1)
    # In a folder the demo made, a stage made by other code (after an upgrade) is made again; anywhere
    # else (say --out pointed at a real run) such a stage is refused, as `specialize run` does.
    owned = claim_output_dir(out)
    rows = run_stages(runs, nproc=args.nproc, stage_funcs={"toy": toy_stage}, replace_stale_under=out if owned else None)
    report = write_report(out, runs, rows, seconds=time.time() - t0, tiny=args.tiny)
    print(report["table"])
    print("\n" + "\n".join(f"[demo] finding {f.name}: {f.verdict}" for f in report["findings"]))
    print(f"\n[demo] report: {report['report']}\n[demo] plots:  {', '.join(report['plots'])}\n[demo] output: {out}")
    return 0
