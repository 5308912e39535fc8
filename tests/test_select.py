"""Model selection on synthetic score tables: each rule picks the checkpoint we can work out by hand."""
import json

import pytest

from specialize.engine.evaluation import select


def write_run(path, dev_rows, test_rows=(), recipe=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "dev_scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dev_rows))
    if test_rows:
        (path / "test_scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test_rows))
    if recipe is not None:
        (path / "recipe.yaml").write_text(recipe)
    return path


# In-dist dev keeps rising while OOD dev peaks early: the paper's RQ5 picture.
DEV = [
    {"step": 100, "dev/gsm8k_dev_acc": 0.10, "dev/multiarith_acc": 0.30, "dev/svamp_acc": 0.20},
    {"step": 200, "dev/gsm8k_dev_acc": 0.20, "dev/multiarith_acc": 0.50, "dev/svamp_acc": 0.40},  # ood 0.45
    {"step": 300, "dev/gsm8k_dev_acc": 0.40, "dev/multiarith_acc": 0.40, "dev/svamp_acc": 0.30},  # mean 0.375
    {"step": 400, "dev/gsm8k_dev_acc": 0.45, "dev/multiarith_acc": 0.20, "dev/svamp_acc": 0.10},  # in-dist max
]
TEST = [{"step": s, "gsm8k_acc": g, "bbh_acc": b, "gsm8k_ci": [0, 1], "gsm8k_n": 10}
        for s, g, b in [(100, 0.1, 0.4), (200, 0.2, 0.35), (300, 0.35, 0.3), (400, 0.4, 0.2)]]
RECIPE = "train:\n  dev_in_dist: gsm8k_dev\n  dev_ood: [multiarith, svamp]\n"


def test_each_rule_picks_the_expected_checkpoint(tmp_path):
    run = write_run(tmp_path / "run", DEV, TEST, RECIPE)
    got = select.select([str(run)])
    assert {r: c.step for r, c in got.items()} == {"in_dist": 400, "ood": 200, "mean": 300}
    assert got["ood"].ood == pytest.approx(0.45) and got["mean"].mean == pytest.approx(0.375)
    assert got["in_dist"].test == {"gsm8k": 0.4, "bbh": 0.2}  # _ci / _n fields are not scores


def test_names_are_guessed_without_a_recipe_and_can_be_overridden(tmp_path):
    run = write_run(tmp_path / "run", DEV, TEST)
    assert select.select([str(run)])["ood"].step == 200  # gsm8k_dev guessed in-dist, the rest OOD
    got = select.select([str(run)], in_dist="multiarith", ood=["gsm8k_dev"])
    assert got["in_dist"].step == 200 and got["ood"].step == 400


def test_ties_go_to_the_earliest_step_then_the_first_run(tmp_path):
    rows = [{"step": s, "dev/gsm8k_dev_acc": 0.5, "dev/multiarith_acc": 0.5} for s in (300, 100, 200)]
    a = write_run(tmp_path / "a", rows)
    b = write_run(tmp_path / "b", [{"step": 50, "dev/gsm8k_dev_acc": 0.5, "dev/multiarith_acc": 0.1}])
    got = select.select([str(a), str(b)])
    assert (got["ood"].run, got["ood"].step) == (str(a), 100)
    assert (got["in_dist"].run, got["in_dist"].step) == (str(b), 50)


def test_selection_spans_several_runs(tmp_path):
    a = write_run(tmp_path / "small", DEV, TEST, RECIPE)
    better_ood = [{"step": 150, "dev/gsm8k_dev_acc": 0.05, "dev/multiarith_acc": 0.9, "dev/svamp_acc": 0.9}]
    b = write_run(tmp_path / "base", better_ood, [], RECIPE)
    got = select.select([str(a), str(b)])
    assert (got["ood"].run, got["ood"].step, got["ood"].test) == (str(b), 150, {})
    assert (got["in_dist"].run, got["in_dist"].step) == (str(a), 400)


def test_rows_without_a_signal_are_skipped(tmp_path):
    rows = [{"step": 100, "dev/gsm8k_dev_acc": 0.9},  # OOD not evaluated at this step
            {"step": 200, "dev/gsm8k_dev_acc": 0.1, "dev/multiarith_acc": 0.2, "dev/svamp_acc": 0.2}]
    got = select.select([str(write_run(tmp_path / "r", rows, recipe=RECIPE))])
    assert {r: c.step for r, c in got.items()} == {"in_dist": 100, "ood": 200, "mean": 200}


def test_pipeline_layout_with_train_subdir_and_a_steps_test_lines_add_up(tmp_path):
    """A later line of a step replaces the datasets it holds and keeps the others (`eval --run` writes
    a line with the datasets a step lacked)."""
    run = tmp_path / "run"
    write_run(run / "train", DEV, TEST + [{"step": 400, "gsm8k_acc": 0.5}, {"step": 400, "svamp_acc": 0.3}], RECIPE)
    assert select.select([str(run)])["in_dist"].test == {"gsm8k": 0.5, "bbh": 0.2, "svamp": 0.3}


def test_cli_table_and_json(tmp_path, capsys):
    run = write_run(tmp_path / "run", DEV, TEST, RECIPE)
    assert select.main(["--runs", str(run)]) == 0
    table = capsys.readouterr().out
    assert "| rule | step | dev in-dist | dev OOD | dev mean | test bbh | test gsm8k |" in table
    assert "| in_dist | 400 | 45.0 | 15.0 | 30.0 | 20.0 | 40.0 |" in table
    assert "| ood | 200 | 20.0 | 45.0 | 32.5 | 35.0 | 20.0 |" in table
    assert select.main(["--runs", str(run), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {r: data[r]["step"] for r in select.RULES} == {"in_dist": 400, "ood": 200, "mean": 300}


def test_cli_errors_are_clear(tmp_path, capsys):
    assert select.main(["--runs", str(tmp_path / "nothing")]) == 2
    assert "no dev_scores.jsonl" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "dev_scores.jsonl").write_text('{"step": 1, "dev/x_acc": 0.1}\n{"acc": 2}\n')
    assert select.main(["--runs", str(bad)]) == 2
    assert "dev_scores.jsonl:2" in capsys.readouterr().err


def test_export_selected_returns_the_hf_checkpoint_or_none(tmp_path):
    run = write_run(tmp_path / "run", DEV, TEST, RECIPE)
    hf = run / "checkpoints" / "step-000200" / "hf"
    hf.mkdir(parents=True)
    (hf / "config.json").write_text("{}")
    (run / "checkpoints" / "step-000400").mkdir()  # DeepSpeed state only
    assert select.export_selected(run, "ood", tmp_path / "sel-ood") == hf
    assert json.loads((tmp_path / "sel-ood" / "selection.json").read_text())["step"] == 200
    assert select.export_selected(run, "in_dist", tmp_path / "sel-in") is None
    assert select.export_selected(tmp_path / "missing", "in_dist", tmp_path / "x") is None
