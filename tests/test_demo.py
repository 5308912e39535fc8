"""The demo end to end in its --tiny configuration: every stage runs for real (toy models, hf teacher,
Numba aligner, DeepSpeed engine on 2 CPU ranks, evaluator, plots) on a shrunken scale."""
import json

import pytest

from specialize.engine.demo import findings
from specialize.engine.demo import run as demo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert demo.main(["--out", str(out), "--tiny"]) == 0
    return out


def test_report_table_and_findings(tiny_demo, capsys):
    report = (tiny_demo / "REPORT.md").read_text()
    assert "## Results" in report and "## Paper findings, checked" in report
    # Each of the five findings is stated either way, never left out, with its gap and 2 SE.
    table = report.split("## Paper findings, checked")[1].split("##")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 5
    assert all(("reproduced" in row or "n/a" in row) and " ± " in row for row in rows)
    results = json.loads((tiny_demo / "results.json").read_text())
    # the verdicts are the criterion applied to the numbers the report states
    for f in results["findings"]:
        assert f["verdict"] == findings.judge(f["gap"], f["se"])
        assert f["n"] > 0
    labels = [row["model"] for row in results["rows"]]
    assert labels[0].startswith("student start")
    assert any(l.startswith("DM") for l in labels) and any(l.startswith("SM") for l in labels)
    for row in results["rows"]:
        assert 0.0 <= row["in_dist"] <= 1.0


def test_plots_are_png(tiny_demo):
    pngs = sorted((tiny_demo / "plots").glob("*.png"))
    assert len(pngs) >= 3
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_MAGIC


def test_everything_under_out_and_stages_marked(tiny_demo):
    (toy,) = (tiny_demo / "toy").iterdir()  # toy/<hash of the toy configuration>
    recipe = demo.build_runs(tiny_demo, tiny=True)[0].recipe
    assert toy.name == demo.toy_key(recipe.train.seed, recipe.data.synthetic_sizes or None, demo.TINY_TOY)
    for stage_dir, stage in [(f"toy/{toy.name}", "toy"), ("teacher", "teacher"), ("teacher-correct", "filter"),
                             ("aligned", "align"), ("dm/train", "train"), ("sm/train", "train"),
                             ("dm/eval", "eval"), ("sm/eval", "eval")]:
        assert (tiny_demo / stage_dir / f".done-{stage}.json").exists(), stage_dir
    assert (tiny_demo / "dm" / "train" / "dev_scores.jsonl").exists()


def test_rerun_reuses_finished_stages(tiny_demo, capsys):
    assert demo.main(["--out", str(tiny_demo), "--tiny"]) == 0
    out = capsys.readouterr().out
    for stage in ("toy", "teacher", "filter", "align", "train", "eval"):
        assert f"{stage} done, reusing" in out


def _items(correct: int, n: int, offset: int = 0) -> dict:
    """id -> 1/0 with `correct` ones among n items, the ones starting at `offset` (wrapping)."""
    return {f"q{i}": float((i - offset) % n < correct) for i in range(n)}


@pytest.mark.parametrize("a,b,expect", [
    # 200 questions, the same 20 solved by both and 40 more by A: gap 20 points, SE 2.8 -> beyond 2 SE
    (_items(60, 200), _items(20, 200), "reproduced"),
    # 100 questions, 11% vs 10%, different questions: gap 1 point, SE ~4 -> noise
    (_items(11, 100), _items(10, 100, offset=50), "within noise"),
    # the first full demo's RQ5 gap (3.8% vs 3.7% OOD test) on 300 questions: noise
    (_items(12, 300), _items(11, 300, offset=100), "within noise"),
    # the paper's direction reversed, clearly: 10% vs 30%
    (_items(10, 100), _items(30, 100), "opposite"),
    # both sides the same checkpoint: the gap is exactly 0 and cannot be called a reproduction
    (_items(30, 100), _items(30, 100), "within noise"),
    ({}, _items(10, 100), "n/a"),
])
def test_a_finding_is_reproduced_only_beyond_two_standard_errors(a, b, expect):
    f = findings.compare("x", "A > B", "acc", "A", "B", a, b)
    assert expect in f.verdict
    assert f.reproduced == (expect == "reproduced")


def test_paired_gap_against_a_hand_computation():
    # differences +1, +1, 0, -1 -> mean 0.25, sample sd sqrt(((.75)^2*2 + .25^2 + 1.25^2)/3) = 0.957, SE = sd/2
    gap, se, n = findings.paired_gap({"a": 1, "b": 1, "c": 1, "d": 0}, {"a": 0, "b": 0, "c": 1, "d": 1, "e": 1})
    assert n == 4 and gap == pytest.approx(0.25) and se == pytest.approx(0.9574271 / 2, rel=1e-6)


def test_dev_area_and_steps_to_reach():
    by_step = {50: {"a": 0.0, "b": 0.0}, 100: {"a": 1.0, "b": 0.0}, 150: {"a": 1.0, "b": 1.0}}
    assert findings.area_items(by_step, [50, 100, 150]) == {"a": pytest.approx(2 / 3), "b": pytest.approx(1 / 3)}
    assert findings.steps_to_reach({50: 0.1, 100: 0.5, 150: 0.7}, 0.45) == 100
    assert findings.steps_to_reach({50: 0.1}, 0.45) is None


def ood_part(tiny_demo, part: str) -> list:
    """The first OOD split's dev or test part as the demo's recipe cuts it (the engine and the
    test stage load the same)."""
    from specialize.engine.data import load_dataset_by_name
    data = demo.build_runs(tiny_demo, tiny=True)[0].recipe.data
    return load_dataset_by_name(demo.OOD[0], split=part, seed=0, sizes=data.synthetic_sizes or None,
                                ood_dev_size=data.ood_dev_size)


def test_report_states_teacher_yield_and_ood_split(tiny_demo):
    report = (tiny_demo / "REPORT.md").read_text()
    filt = json.loads((tiny_demo / "teacher-correct" / ".done-filter.json").read_text())
    assert f"kept (correct) after the cut at the first answer line: {filt['kept']}" in report
    assert f"kept without the cut: {filt['kept_without_cut']}" in report
    split = report.split("## OOD dev/test split")[1].split("##")[0]
    # the counts in the report are the parts the engine and the test stage load, and they are disjoint
    dev, test = ood_part(tiny_demo, "dev"), ood_part(tiny_demo, "test")
    assert f"| {demo.OOD[0]} | {len(dev)} | {len(test)} |" in split
    assert not {e.question for e in dev} & {e.question for e in test}
    # the OOD items the test stage scored are all from the test part
    scored = json.loads((tiny_demo / "dm" / "eval" / "best.json").read_text())["results"][demo.OOD[0]]
    assert scored["split"].startswith("test part")
    ids = {p["id"] for p in scored.get("predictions", [])}
    assert ids and ids <= {e.id for e in test}


def test_engine_dev_sets_are_the_ood_dev_part(tiny_demo):
    """The engine's dev predictions (train/dev/step-*/<name>.jsonl) on the OOD split are all from its
    dev part, so checkpoint selection never sees a test item."""
    dev = {e.id for e in ood_part(tiny_demo, "dev")}
    dumps = sorted((tiny_demo / "dm" / "train" / "dev").glob(f"step-*/{demo.OOD[0].replace('/', '_')}.jsonl"))
    assert dumps, "the engine wrote no dev predictions for the OOD dev set"
    for path in dumps:
        ids = {json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()}
        assert ids and ids <= dev, path


def test_grad_norm_is_logged_positive_and_finite_on_real_steps(tiny_demo):
    import math
    for run in ("dm", "sm"):
        rows = [json.loads(line) for line in (tiny_demo / run / "train" / "train_log.jsonl").read_text().splitlines()]
        norms = [r["grad_norm"] for r in rows if "grad_norm" in r]
        assert norms and all(math.isfinite(g) and g > 0 for g in norms), (run, norms)


def test_teacher_spread_by_hand(tmp_path):
    """Two tokens: a 50/50 choice between two tokens (sampled one of them), then a sure token."""
    import math
    rec = {"token_logprobs": [math.log(0.5), 0.0],
           "top_logprobs": [[["a", math.log(0.5)], ["b", math.log(0.5)]], [["c", 0.0]]]}
    (tmp_path / "samples-00000.jsonl").write_text(json.dumps(rec) + "\n")
    got = demo.teacher_spread(tmp_path)
    assert got["tokens"] == 2
    assert got["top_k_entropy"] == pytest.approx(math.log(2) / 2)
    assert got["off_sampled"] == pytest.approx(0.25) and got["choice_points"] == pytest.approx(0.5)
    # which distribution the numbers are of comes from the folder's manifest (the filter copies the teacher's)
    settings = {"backend": "hf", "temperature": 0.7}
    (tmp_path / "manifest.json").write_text(json.dumps({"settings": settings}))
    assert demo.teacher_spread(tmp_path)["logprobs"] == "sampled"  # an hf folder from before the setting
    (tmp_path / "manifest.json").write_text(json.dumps({"settings": {**settings, "logprobs": "raw"}}))
    spread = demo.teacher_spread(tmp_path)
    assert (spread["logprobs"], spread["temperature"]) == ("raw", 0.7)
    lines = demo.teacher_lines({"samples": 1, "kept": 1}, spread)
    assert any("own distribution (T = 1; the tokens were drawn at T = 0.7)" in line for line in lines)


def test_the_demo_runs_the_recipe_file_with_named_overrides(tmp_path):
    """Only the PATHS and TINY keys differ from recipes/mini/dm_vs_sm.yaml; the sweep gives DM and SM."""
    from specialize.engine.config import load_recipe, recipe_to_dict
    base = recipe_to_dict(load_recipe(demo.RECIPE))
    for tiny in (False, True):
        runs = demo.build_runs(tmp_path, tiny)
        assert [r.tag for r in runs] == ["dm", "sm"] and [r.recipe.loss.kind for r in runs] == ["dm", "sm"]
        got = recipe_to_dict(runs[0].recipe)
        changed = {f"{sec}.{k}" for sec, fields in got.items() if isinstance(fields, dict)
                   for k, v in fields.items() if base[sec][k] != v} | {k for k, v in got.items()
                                                                     if not isinstance(v, dict) and base[k] != v}
        allowed = (set(demo.paths(tmp_path, tmp_path)) | (set(demo.TINY) if tiny else set())
                   | set(demo.fit_processes(runs[0].recipe)))
        assert changed <= allowed, changed - allowed
        assert runs[0].recipe.model.name_or_path.startswith(str(tmp_path / "toy" / demo.toy_key(
            0, runs[0].recipe.data.synthetic_sizes or None, demo.toy_scale(tiny))))


def test_process_counts_fit_the_visible_gpus(monkeypatch):
    """The recipe's two teacher copies and eval workers are for the CPU; on one GPU the demo uses one
    of each (worker_devices refuses more processes than GPUs), on eight it keeps the recipe's."""
    import torch

    from specialize.engine.config import load_recipe
    recipe = load_recipe(demo.RECIPE)
    assert (recipe.teacher.replicas, recipe.eval.workers) == (2, 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert demo.fit_processes(recipe) == {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert demo.fit_processes(recipe) == {"teacher.replicas": 1, "eval.workers": 1}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert demo.fit_processes(recipe) == {}


def test_accuracy_by_group_by_hand():
    correct = {"a": 1.0, "b": 0.0, "c": 1.0, "d": 1.0, "x": 0.0}  # "x" has no group: left out
    got = demo.accuracy_by_group(correct, {"a": 2, "b": 2, "c": 3, "d": 2})
    assert got == {2: (3, pytest.approx(2 / 3)), 3: (1, 1.0)}


def test_operations_counts_cot_lines_before_the_answer():
    from specialize.engine.data.records import Example
    assert demo.operations(Example("q", "Q?", "9", "3 + 4 = 7.\nSo 7 + 2 = 9.\nThe answer is 9.")) == 2


def test_report_by_length_rows_are_the_scored_questions(tiny_demo):
    """The by-length table splits exactly the in-dist questions the test stage scored, and its DM column
    is their accuracy recomputed from the evaluator's predictions."""
    from specialize.engine.data import load_dataset_by_name
    report = (tiny_demo / "REPORT.md").read_text()
    section = report.split("## By reasoning length")[1].split("##")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith(f"| {demo.IN_DIST} |")]
    assert rows
    recipe = demo.build_runs(tiny_demo, tiny=True)[0].recipe
    ops = {e.id: demo.operations(e) for e in load_dataset_by_name(
        demo.IN_DIST, split="test", seed=0, sizes=recipe.data.synthetic_sizes or None)}
    scored = json.loads((tiny_demo / "dm" / "eval" / "best.json").read_text())["results"][demo.IN_DIST]["predictions"]
    assert sum(int(r[2]) for r in rows) == len(scored)
    for _, k, n, _, acc in rows:
        mine = [p["correct"] for p in scored if ops[p["id"]] == int(k)]
        assert len(mine) == int(n) and float(acc) == pytest.approx(100 * sum(mine) / len(mine), abs=0.05)


def test_the_demo_remakes_stale_stages_only_in_a_folder_it_owns(tmp_path):
    """A new or empty --out, one an earlier demo marked, or one holding a demo's REPORT.md is the demo's
    own (and gets the mark); a folder holding anything else (a real run's outputs) is not."""
    new = tmp_path / "new"
    new.mkdir()
    assert demo.claim_output_dir(new) and (new / demo.OWNER_MARK).exists()
    assert demo.claim_output_dir(new)  # marked now
    old = tmp_path / "old-demo"
    old.mkdir()
    (old / "REPORT.md").write_text("# specialize demo: the paper in miniature\n")
    assert demo.claim_output_dir(old) and (old / demo.OWNER_MARK).exists()
    real = tmp_path / "runs"
    (real / "dm" / "train").mkdir(parents=True)
    assert not demo.claim_output_dir(real) and not (real / demo.OWNER_MARK).exists()


def test_selection_that_cannot_read_the_runs_says_why(tmp_path):
    """A run whose recipe.yaml does not load (here: a key this version does not know) is reported with the
    loader's message, not as "no dev scores were written"."""
    runs = demo.build_runs(tmp_path / "out", tiny=True)
    train = runs[0].dir("train")
    train.mkdir(parents=True)
    (train / "dev_scores.jsonl").write_text('{"step": 3, "dev/synthetic/dev_acc": 0.5}\n')
    (train / "recipe.yaml").write_text("loss:\n  a_key_from_a_later_version: 1\n")
    table = demo._selection_table(runs[:1])
    assert table.startswith("(no selection: ConfigError:") and "a_key_from_a_later_version" in table
