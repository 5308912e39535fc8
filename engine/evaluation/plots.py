"""The paper's figures as PNGs (matplotlib, Agg: no display needed).

  scaling          accuracy vs parameters (log x), before and after specialization, one line per family;
                   input: a JSON/YAML list of {model, params, before, after[, family]} (params: 7.7e7 or "77M")
  tradeoff         target-task accuracy (x) vs generic ability (y, BBH) over the checkpoints of each run
  in_dist_vs_ood   in-distribution and OOD dev accuracy over training steps, with each rule's pick marked
  training_curves  train/loss, train/ce, train/kl, lr, ... read from each run's tb/ TensorBoard logs

Run dirs are read as `specialize select` reads them (dev_scores.jsonl, test_scores.jsonl, recipe.yaml,
tb/, in the dir or its train/). Accuracies in [0, 1] are drawn as percentages.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from specialize.engine.cli import HelpFormatter
from specialize.engine.evaluation import select  # noqa: E402

PLOTS = ("scaling", "tradeoff", "in_dist_vs_ood", "training_curves")
TRAIN_TAGS = ("train/loss", "train/ce", "train/kl", "lr", "grad_norm", "tokens_per_second_per_gpu")
_GENERIC_HINTS = ("bbh", "generic")
_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}
DPI = 150


def _pct(values):
    return [None if v is None else 100 * v for v in values]


def _save(fig, out) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def _label(run, labels, i) -> str:
    return labels[i] if labels and i < len(labels) else Path(run).name


# ---------------------------------------------------------------- scaling

def parse_params(value) -> float:
    """7.7e7, "77M", "3B", "250m" -> a parameter count."""
    if isinstance(value, (int, float)):
        return float(value)
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmbt]?)\s*", str(value), re.I)
    if not m:
        raise ValueError(f"params {value!r}: expected a number or e.g. '77M', '3B'")
    return float(m.group(1)) * _SUFFIX.get(m.group(2).lower(), 1.0)


def human_params(n: float) -> str:
    for suffix, unit in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= unit:
            return f"{n / unit:.3g}{suffix}"
    return f"{n:.0f}"


def read_table(path) -> list[dict]:
    """A scaling table from JSON or YAML: a list of rows, or {"rows": [...]}."""
    import yaml
    text = Path(path).read_text()
    data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    rows = data.get("rows") if isinstance(data, dict) else data
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a list of {{model, params, before, after}} rows")
    for i, row in enumerate(rows):
        missing = [k for k in ("model", "params", "before", "after") if not isinstance(row, dict) or k not in row]
        if missing:
            raise ValueError(f"{path}: row {i}: missing field(s) {missing}")
    return rows


def plot_scaling(table, out, title: str = "Specialization across model sizes", metric: str = "GSM8K accuracy") -> Path:
    rows = read_table(table) if isinstance(table, (str, Path)) else list(table)
    if not rows:
        raise ValueError("scaling plot: the table has no rows")
    scale = 100 if all(0 <= float(r[k]) <= 1 for r in rows for k in ("before", "after")) else 1
    fig, ax = plt.subplots(figsize=(7, 4.5))
    families = {}
    for row in rows:
        families.setdefault(row.get("family", ""), []).append(row)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (family, fam_rows) in enumerate(families.items()):
        fam_rows = sorted(fam_rows, key=lambda r: parse_params(r["params"]))
        x = [parse_params(r["params"]) for r in fam_rows]
        prefix = f"{family}: " if family else ""
        color = colors[i % len(colors)]
        ax.plot(x, [scale * float(r["before"]) for r in fam_rows], "o--", color=color, alpha=0.6,
                label=f"{prefix}before specialization")
        ax.plot(x, [scale * float(r["after"]) for r in fam_rows], "s-", color=color, lw=2,
                label=f"{prefix}after specialization")
        for xi, r in zip(x, fam_rows):
            ax.annotate(str(r["model"]), (xi, scale * float(r["after"])), textcoords="offset points",
                        xytext=(0, 7), ha="center", fontsize=8)
    ax.set_xscale("log")
    # Ticks at the models' own sizes, written as 77M / 3B, read better than powers of ten.
    sizes = sorted({parse_params(r["params"]) for r in rows})
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xticks(sizes, [human_params(p) for p in sizes])
    ax.margins(x=0.1, y=0.12)
    ax.set_xlabel("parameters (log scale)")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)


# ---------------------------------------------------------------- checkpoints of runs

def _is_generic(name: str) -> bool:
    return any(h in name for h in _GENERIC_HINTS)


def _pick_xy(scores: dict, x: Optional[str], y: Optional[str]) -> Optional[tuple[str, str, float, float]]:
    """(x name, y name, x value, y value) from one {dataset: accuracy} table: x defaults to gsm8k (or the
    synthetic in-distribution test), y to bbh, else the mean of the generic sets; None when either is absent."""
    x = x or next((n for n in ("gsm8k", "synthetic/test", "synthetic") if n in scores), None)
    if x not in scores:
        return None
    if y:
        return (x, y, scores[x], scores[y]) if y in scores else None
    if "bbh" in scores:
        return x, "bbh", scores[x], scores["bbh"]
    generic = sorted(n for n in scores if _is_generic(n))
    if not generic:
        return None
    name = generic[0] if len(generic) == 1 else f"generic mean ({len(generic)} sets)"
    return x, name, scores[x], sum(scores[n] for n in generic) / len(generic)


def _series(run, x: Optional[str], y: Optional[str], source: str) -> tuple[list, Optional[tuple[str, str]]]:
    """[(tag, x, y)] for one run from one source, and the axis names:
      test  RUN/test_scores.jsonl, one point per checkpoint (tag = step)
      eval  the pipeline's eval/scores.json, one point per evaluated model (tag = "start", "best", ...)
      dev   dev_scores.jsonl: in-distribution dev vs a generic dev set, else vs the OOD mean (tag = step)"""
    pts, names = [], None
    if source == "test":
        for step, scores in sorted(select.read_test_scores(run).items()):
            got = _pick_xy(scores, x, y)
            if got:
                names = (f"test {got[0]}", f"test {got[1]}")
                pts.append((step, got[2], got[3]))
    elif source == "eval":
        path = next((p for p in (Path(run) / "eval" / "scores.json", Path(run) / "scores.json") if p.exists()), None)
        table = json.loads(path.read_text()) if path else {}
        for tag, scores in sorted(table.items(), key=lambda kv: kv[0] != "start"):  # start first
            got = _pick_xy(scores, x, y) if isinstance(scores, dict) else None
            if got:
                names = (f"test {got[0]}", f"test {got[1]}")
                pts.append((tag, got[2], got[3]))
    else:
        rows = select.read_dev_scores(run)
        in_dist, ood = select.dev_names(run, rows)
        generic = [n for n in ood if _is_generic(n)]
        for row in rows:
            a = row.get(f"dev/{in_dist}_acc")
            b = row.get(f"dev/{generic[0]}_acc") if generic else select.signals(row, in_dist, ood)["ood"]
            if a is not None and b is not None:
                pts.append((row["step"], a, b))
        names = (f"dev {in_dist}", f"dev {generic[0]}" if generic else "dev OOD (mean)")
    return pts, names


def smooth(values: Sequence[float], window: int = 3) -> list[float]:
    """Centred running mean (the window shrinks at the ends): per-checkpoint scores on a few hundred
    questions jitter by several points, and the trajectory is what the trade-off figure is about."""
    half = window // 2
    return [sum(values[max(0, i - half):i + half + 1]) / len(values[max(0, i - half):i + half + 1])
            for i in range(len(values))]


def _start_point(run, x: Optional[str], y: Optional[str]) -> Optional[tuple[float, float]]:
    """The start model's (x, y) from the pipeline's eval/scores.json, if it was scored."""
    pts, _ = _series(run, x, y, "eval")
    return next(((a, b) for tag, a, b in pts if tag == "start"), None)


def _picks(run) -> dict[str, int]:
    """rule -> step each dev signal picks in this run (empty when the run has no dev scores)."""
    try:
        return {rule: c.step for rule, c in select.select([str(run)], rules=("in_dist", "ood")).items()}
    except (ValueError, FileNotFoundError):
        return {}


def _trajectory_panel(ax, run, pts, who: str, color, x, y, sc_norm):
    """One run: checkpoints in step order (faint), their running mean (bold, with the direction of
    training), the start model and each dev signal's pick labelled."""
    pts = sorted(pts)
    steps, xs, ys = zip(*pts)
    xs, ys = _pct(xs), _pct(ys)
    start = _start_point(run, x, y)
    sx, sy = (_pct(start) if start else (None, None))
    path_x, path_y = ([sx] if start else []) + list(xs), ([sy] if start else []) + list(ys)
    ax.plot(path_x, path_y, "-", color="0.6", lw=0.8, alpha=0.6, zorder=1)
    sc = ax.scatter(xs, ys, c=steps, cmap="viridis", norm=sc_norm, s=22, alpha=0.8, zorder=2)
    mx, my = smooth(path_x), smooth(path_y)
    ax.plot(mx, my, "-", color=color, lw=2.2, alpha=0.9, zorder=3, label=f"{who}: running mean of 3")
    if len(mx) > 1:
        ax.annotate("", (mx[-1], my[-1]), (mx[-2], my[-2]),
                    arrowprops=dict(arrowstyle="-|>", color=color, lw=2), zorder=4)
    if start:
        ax.scatter([sx], [sy], marker="*", s=180, color="black", zorder=5)
        ax.annotate("start", (sx, sy), textcoords="offset points", xytext=(6, -12), fontsize=8, weight="bold")
    picks = _picks(run)
    if steps[-1] not in picks.values():  # a pick's own label names its step
        ax.annotate(f"step {steps[-1]}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(6, 6), fontsize=7)
    for k, (rule, step) in enumerate(sorted(picks.items())):
        if step in steps:
            i = steps.index(step)
            ax.scatter([xs[i]], [ys[i]], marker="sD"[k % 2], s=70, facecolors="none", edgecolors="crimson",
                       linewidths=1.6, zorder=6)
            ax.annotate(f"{rule.replace('_', '-')} pick (step {step})", (xs[i], ys[i]), textcoords="offset points",
                        xytext=(-8, 10 + 12 * k), fontsize=7, ha="right", color="crimson")
    ax.set_title(who, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(0.18)
    return sc


def plot_tradeoff(runs: Sequence, out, x: Optional[str] = None, y: Optional[str] = None,
                  labels: Optional[Sequence[str]] = None, title: Optional[str] = None) -> Path:
    """Target accuracy (x) vs generic accuracy (y) per run. The first source any run has is used for all
    runs (so the axes mean one thing): test scores per checkpoint, else the pipeline's evaluated models
    (start -> best, arrows), else dev scores per checkpoint. Per checkpoint, each run gets its own panel
    (overlaid zigzags of several runs cross and hide each other): points coloured by step, their running
    mean drawn as the trajectory from the start model, the start and each dev signal's pick labelled."""
    for source in ("test", "eval", "dev"):
        series = [_series(run, x, y, source) for run in runs]
        if any(pts for pts, _ in series):
            break
    else:
        raise ValueError("tradeoff plot: no run has scores on both axes "
                         "(needs test_scores.jsonl, eval/scores.json or dev_scores.jsonl)")
    names = next(n for pts, n in series if pts)
    generic_y = _is_generic(names[1])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = [(i, run, pts) for i, (run, (pts, _)) in enumerate(zip(runs, series)) if pts]
    if source == "eval":
        fig, ax = plt.subplots(figsize=(6.5, 5))
        axes = [ax]
        for i, run, pts in drawn:
            tags, xs, ys = zip(*pts)
            xs, ys = _pct(xs), _pct(ys)
            who, color = _label(run, labels, i), colors[i % len(colors)]
            ax.scatter(xs, ys, s=40, color=color, marker="osD^v"[i % 5], label=who, zorder=3)
            for tag, xi, yi in zip(tags, xs, ys):
                ax.annotate(f"{who} {tag}", (xi, yi), textcoords="offset points", xytext=(6, 4 - 10 * i), fontsize=7)
            for xi, yi in zip(xs[1:], ys[1:]):  # arrows from the start model to each specialized one
                ax.annotate("", (xi, yi), (xs[0], ys[0]), arrowprops=dict(arrowstyle="->", color=color, alpha=0.6))
        ax.grid(True, alpha=0.3)
        ax.margins(0.15)
        ax.legend(fontsize=8)
    else:
        fig, axes = plt.subplots(1, len(drawn), figsize=(5.2 * len(drawn) + 1.2, 5), sharex=True, sharey=True,
                                 squeeze=False)
        axes = list(axes[0])
        all_steps = [p[0] for _, _, pts in drawn for p in pts]
        norm = matplotlib.colors.Normalize(min(all_steps), max(all_steps))
        sc = None
        for ax, (i, run, pts) in zip(axes, drawn):
            sc = _trajectory_panel(ax, run, pts, _label(run, labels, i), colors[i % len(colors)], x, y, norm)
            ax.legend(fontsize=7, loc="best")
        fig.colorbar(sc, ax=axes, label="training step", fraction=0.04)
    for ax in axes:
        ax.set_xlabel(f"{names[0]} accuracy (%)  — specialized ability")
    axes[0].set_ylabel(f"{names[1]} accuracy (%)  — " + ("generic ability" if generic_y else "out of distribution"))
    fig.suptitle(title or "Trade-off: target task vs " + ("generic ability" if generic_y else "OOD accuracy"))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, bbox_inches="tight")  # tight_layout cannot place a colorbar shared by panels
    plt.close(fig)
    return out


def _rules_by_step(picks: dict) -> dict[int, list[str]]:
    """step -> the rules that picked it, in the order given."""
    by_step: dict[int, list[str]] = {}
    for rule, choice in picks.items():
        by_step.setdefault(choice.step, []).append(rule)
    return by_step


def plot_in_dist_vs_ood(runs: Sequence, out, labels: Optional[Sequence[str]] = None,
                        title: Optional[str] = None) -> Path:
    """In-dist dev (solid) and OOD-mean dev (dashed) accuracy vs step; dotted lines at each rule's pick."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = 0
    for i, run in enumerate(runs):
        rows = sorted(select.read_dev_scores(run), key=lambda r: r["step"])
        if not rows:
            continue
        in_dist, ood = select.dev_names(run, rows)
        sig = [(r["step"], select.signals(r, in_dist, ood)) for r in rows]
        color, name = colors[i % len(colors)], _label(run, labels, i)
        for rule, style, what in (("in_dist", "-", f"in-dist ({in_dist})"), ("ood", "--", f"OOD ({', '.join(ood)})")):
            pts = [(s, v[rule]) for s, v in sig if v[rule] is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, _pct(ys), style, marker="o", ms=3, color=color, label=f"{name}: {what}")
        try:
            picks = select.select([str(run)], rules=("in_dist", "ood"))
        except ValueError:
            picks = {}
        for step, rules in _rules_by_step(picks).items():
            ax.axvline(step, color=color, ls=":" if rules == ["in_dist"] else "-.", alpha=0.6, lw=1)
            # one label per step (two rules that pick one checkpoint would print over each other); x in
            # data units, y in axes units (it stays put whatever the final y range). Runs alternate sides of
            # the line, then heights, so picks of several runs at one step stay legible.
            what = " + ".join(rule.replace("_", "-") for rule in rules)  # as the trade-off plot names them
            ax.text(step, 0.98 - 0.3 * (i // 2 % 3), f" {name}: {what} pick ", transform=ax.get_xaxis_transform(),
                    rotation=90, fontsize=7, va="top", ha="right" if i % 2 == 0 else "left", color=color)
        drawn += 1
    if not drawn:
        plt.close(fig)
        raise ValueError("in_dist_vs_ood plot: no run has a dev_scores.jsonl")
    ax.set_xlabel("training step")
    ax.set_ylabel("dev accuracy (%)")
    ax.set_title(title or "In-distribution vs OOD dev accuracy over training")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best", handlelength=3.5)  # long enough handles to tell dashed from solid
    return _save(fig, out)


def read_tensorboard(run, tags: Sequence[str] = ()) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from RUN/tb (or RUN/train/tb) and its subfolders (one per rank or
    resume); all scalar tags when `tags` is empty."""
    tb = select.run_files_dir(run) / "tb"
    if not tb.is_dir():
        return {}
    out: dict[str, list] = {}
    for folder in [tb] + sorted(p for p in tb.rglob("*") if p.is_dir()):
        for tag, pts in _read_event_dir(folder, tags).items():
            out.setdefault(tag, []).extend(pts)
    return {t: sorted(v) for t, v in out.items()}


def _read_event_dir(path, tags: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})  # 0 = keep every point
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags().get("scalars", [])
            if not tags or t in tags}


def plot_training_curves(runs: Sequence, out, tags: Sequence[str] = TRAIN_TAGS,
                         labels: Optional[Sequence[str]] = None, title: Optional[str] = None) -> Path:
    """One panel per TensorBoard scalar tag, one line per run."""
    curves = [read_tensorboard(run, tags) for run in runs]
    present = [t for t in tags if any(t in c for c in curves)]
    if not present:
        raise ValueError(f"training_curves plot: none of {list(tags)} in the runs' tb/ logs")
    ncols = min(2, len(present))
    nrows = (len(present) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 3.2 * nrows), squeeze=False)
    for ax, tag in zip(axes.flat, present):
        for i, (run, c) in enumerate(zip(runs, curves)):
            if tag in c:
                xs, ys = zip(*c[tag])
                ax.plot(xs, ys, lw=1.3, label=_label(run, labels, i))
        ax.set_title(tag)
        ax.set_xlabel("training step")
        ax.set_ylabel(tag.split("/")[-1])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(present):]:
        ax.set_visible(False)
    fig.suptitle(title or "Training curves")
    return _save(fig, out)


# ---------------------------------------------------------------- the pipeline's entry point

def scaling_table_from_runs(runs: Sequence, labels: Optional[Sequence[str]] = None,
                            dataset: Optional[str] = None) -> list[dict]:
    """Rows {model, params, before, after} from each pipeline run's eval/scores.json ("start" vs "best")
    and the parameter count of its best/ model config."""
    rows = []
    for i, run in enumerate(runs):
        run = Path(run)
        scores_file = next((p for p in (run / "eval" / "scores.json", run / "scores.json") if p.exists()), None)
        config = next((p for p in (run / "train" / "best", run / "best") if (p / "config.json").exists()), None)
        if scores_file is None or config is None:
            continue
        scores = json.loads(scores_file.read_text())
        start, best = scores.get("start", {}), scores.get("best", {})
        name = dataset or next((d for d in ("gsm8k", "synthetic/test") if d in best), next(iter(best), None))
        if name in start and name in best:
            rows.append({"model": _label(run, labels, i), "params": count_params(config),
                         "before": start[name], "after": best[name]})
    return rows


def count_params(model_dir) -> int:
    """Parameters of the model in `model_dir`, built on the meta device (no memory, no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM
    with torch.device("meta"):
        model = AutoModelForSeq2SeqLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def plot_runs(runs: Sequence, names: Sequence[str], out_dir, labels: Optional[Sequence[str]] = None) -> list[Path]:
    """Draw each named plot over `runs` into out_dir/<name>.png; a plot without its data is skipped with a
    note (a pipeline stage should not fail because, e.g., no TensorBoard log was written)."""
    unknown = [n for n in names if n not in PLOTS]
    if unknown:
        raise ValueError(f"unknown plot(s) {unknown}; known: {', '.join(PLOTS)}")
    out, written = Path(out_dir), []
    for name in names:
        target = out / f"{name}.png"
        try:
            if name == "scaling":
                written.append(plot_scaling(scaling_table_from_runs(runs, labels), target))
            elif name == "tradeoff":
                written.append(plot_tradeoff(runs, target, labels=labels))
            elif name == "in_dist_vs_ood":
                written.append(plot_in_dist_vs_ood(runs, target, labels=labels))
            else:
                written.append(plot_training_curves(runs, target, labels=labels))
        except (ValueError, FileNotFoundError) as e:
            print(f"[plot] skipped {name}: {e}", file=sys.stderr)
    return written


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(formatter_class=HelpFormatter, prog="specialize plot", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="plot", required=True)
    s = sub.add_parser("scaling", formatter_class=HelpFormatter, help="accuracy vs parameters from a table")
    s.add_argument("--table", required=True, help="JSON/YAML list of {model, params, before, after[, family]}")
    s.add_argument("--metric", default="GSM8K accuracy", help="y-axis label")
    for name, help_ in (("tradeoff", "target vs generic accuracy over checkpoints"),
                        ("in_dist_vs_ood", "in-dist vs OOD dev accuracy over steps"),
                        ("training_curves", "TensorBoard scalars over steps"),
                        ("all", "every run-based plot into --out (a dir)")):
        aliases = [name.replace("_", "-")] if "_" in name else []
        q = sub.add_parser(name, formatter_class=HelpFormatter, help=help_, aliases=aliases)
        q.add_argument("--runs", nargs="+", required=True, help="run dirs (the engine's, or pipeline run dirs)")
        q.add_argument("--labels", default=None, help="comma list, one per run")
        if name == "tradeoff":
            q.add_argument("--x", default=None, help="target dataset (default gsm8k)")
            q.add_argument("--y", default=None, help="generic dataset (default bbh)")
        if name == "training_curves":
            q.add_argument("--tags", default=",".join(TRAIN_TAGS), help="comma list of TensorBoard scalar tags")
    for q in {id(q): q for q in sub.choices.values()}.values():  # aliases share a parser
        q.add_argument("--out", required=True, help="PNG path (a dir for `all`)")
        q.add_argument("--title", default=None, help="figure title (default: the plot's own)")
    args = p.parse_args(argv)
    kind = args.plot.replace("-", "_")
    labels = args.labels.split(",") if getattr(args, "labels", None) else None
    try:
        if kind == "scaling":
            paths = [plot_scaling(args.table, args.out, metric=args.metric, **_title(args))]
        elif kind == "tradeoff":
            paths = [plot_tradeoff(args.runs, args.out, args.x, args.y, labels, args.title)]
        elif kind == "in_dist_vs_ood":
            paths = [plot_in_dist_vs_ood(args.runs, args.out, labels, args.title)]
        elif kind == "training_curves":
            paths = [plot_training_curves(args.runs, args.out, args.tags.split(","), labels, args.title)]
        else:
            paths = plot_runs(args.runs, ["tradeoff", "in_dist_vs_ood", "training_curves"], args.out, labels)
    except (ValueError, FileNotFoundError) as e:
        print(f"specialize plot: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"[plot] wrote {path}")
    return 0 if paths else 2


def _title(args) -> dict:
    return {"title": args.title} if args.title else {}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
