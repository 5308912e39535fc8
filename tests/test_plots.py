"""Plots are written as valid PNGs of a sensible size, from tables, score files and TensorBoard logs."""
import json

import matplotlib.image as mpimg
import pytest

from specialize.engine.evaluation import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RECIPE = "train:\n  dev_in_dist: gsm8k_dev\n  dev_ood: [multiarith, svamp]\n"


def assert_png(path, min_w=600, min_h=400):
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    h, w = mpimg.imread(path).shape[:2]
    assert w >= min_w and h >= min_h and w <= 4000 and h <= 4000, (w, h)
    return w, h


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two fake training runs: dev scores, test scores (gsm8k, bbh) and TensorBoard scalars."""
    from torch.utils.tensorboard import SummaryWriter
    root = tmp_path_factory.mktemp("runs")
    out = []
    for k, name in enumerate(("dm", "sm")):
        run = root / name
        run.mkdir()
        (run / "recipe.yaml").write_text(RECIPE)
        dev, test = [], []
        for i, step in enumerate(range(100, 1100, 100)):
            g = 0.1 + 0.05 * i - 0.01 * k
            dev.append({"step": step, "dev/gsm8k_dev_acc": g, "dev/multiarith_acc": 0.4 - abs(i - 3) * 0.04,
                        "dev/svamp_acc": 0.3 - abs(i - 4) * 0.03})
            test.append({"step": step, "gsm8k_acc": g, "bbh_acc": 0.35 - 0.02 * i})
        (run / "dev_scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dev))
        (run / "test_scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
        w = SummaryWriter(str(run / "tb"))
        for step in range(0, 200, 10):
            w.add_scalar("train/loss", 3.0 / (1 + step / 50) + 0.1 * k, step)
            w.add_scalar("train/ce", 2.0 / (1 + step / 50), step)
            w.add_scalar("lr", 1e-3 * min(1, step / 50), step)
        w.close()
        out.append(run)
    return out


def test_scaling_curve_from_yaml_table(tmp_path):
    table = tmp_path / "scaling.yaml"
    table.write_text("- {model: flan-t5-small, params: 77M, before: 0.021, after: 0.076}\n"
                     "- {model: flan-t5-base, params: 250M, before: 0.035, after: 0.131}\n"
                     "- {model: flan-t5-large, params: 780M, before: 0.067, after: 0.201}\n"
                     "- {model: flan-t5-xl, params: 3B, before: 0.132, after: 0.272}\n")
    assert_png(plots.plot_scaling(table, tmp_path / "scaling.png"))


def test_scaling_accepts_rows_and_families(tmp_path):
    rows = [{"model": m, "params": p, "before": b, "after": a, "family": f}
            for f in ("flan-t5", "t5-v1_1") for m, p, b, a in (("small", 7.7e7, 2, 7), ("base", 2.5e8, 3, 13))]
    assert_png(plots.plot_scaling(rows, tmp_path / "s.png", metric="GSM8K accuracy"))


def test_params_parse():
    assert plots.parse_params("77M") == 77e6 and plots.parse_params("3B") == 3e9 and plots.parse_params(1e6) == 1e6
    with pytest.raises(ValueError, match="params"):
        plots.parse_params("big")


def test_bad_table_names_the_row(tmp_path):
    table = tmp_path / "t.json"
    table.write_text(json.dumps([{"model": "a", "params": 1, "before": 0.1, "after": 0.2}, {"model": "b"}]))
    with pytest.raises(ValueError, match=r"row 1: missing field\(s\) \['params', 'before', 'after'\]"):
        plots.plot_scaling(table, tmp_path / "x.png")


def test_tradeoff_in_dist_vs_ood_and_training_curves(runs, tmp_path):
    assert_png(plots.plot_tradeoff(runs, tmp_path / "tradeoff.png", labels=["DM", "SM"]))
    assert_png(plots.plot_in_dist_vs_ood(runs, tmp_path / "ood.png", labels=["DM", "SM"]))
    assert_png(plots.plot_training_curves(runs, tmp_path / "curves.png", labels=["DM", "SM"]))


def test_tensorboard_scalars_are_read_back(runs):
    curves = plots.read_tensorboard(runs[0], ["train/loss", "lr"])
    assert set(curves) == {"train/loss", "lr"}
    steps, values = zip(*curves["train/loss"])
    assert steps == tuple(range(0, 200, 10))
    assert values[0] == pytest.approx(3.0) and values[-1] == pytest.approx(3.0 / (1 + 190 / 50))


def test_tradeoff_falls_back_to_dev_scores(runs, tmp_path):
    run = tmp_path / "dev-only"
    run.mkdir()
    (run / "dev_scores.jsonl").write_text((runs[0] / "dev_scores.jsonl").read_text())
    pts, names = plots._series(run, None, None, "dev")
    assert names == ("dev gsm8k_dev", "dev OOD (mean)") and len(pts) == 10
    assert_png(plots.plot_tradeoff([run], tmp_path / "t.png"))


def test_plot_runs_writes_each_and_skips_what_has_no_data(runs, tmp_path, capsys):
    written = plots.plot_runs(runs, ["tradeoff", "in_dist_vs_ood", "training_curves", "scaling"], tmp_path / "p")
    assert sorted(p.name for p in written) == ["in_dist_vs_ood.png", "tradeoff.png", "training_curves.png"]
    assert "skipped scaling" in capsys.readouterr().err  # no eval/scores.json in these runs
    with pytest.raises(ValueError, match="unknown plot"):
        plots.plot_runs(runs, ["pie"], tmp_path)


def test_cli(runs, tmp_path, capsys):
    assert plots.main(["tradeoff", "--runs", *map(str, runs), "--labels", "DM,SM", "--out", str(tmp_path / "t.png")]) == 0
    assert plots.main(["in-dist-vs-ood", "--runs", str(runs[0]), "--out", str(tmp_path / "o.png")]) == 0
    assert plots.main(["all", "--runs", str(runs[0]), "--out", str(tmp_path / "all")]) == 0
    assert len(list((tmp_path / "all").glob("*.png"))) == 3
    assert plots.main(["training-curves", "--runs", str(tmp_path), "--out", str(tmp_path / "c.png")]) == 2
    assert "none of" in capsys.readouterr().err


def test_cli_scaling_from_json_table(tmp_path, capsys):
    table = tmp_path / "t.json"
    table.write_text(json.dumps({"rows": [{"model": "small", "params": "77M", "before": 2.1, "after": 7.6},
                                          {"model": "base", "params": "250M", "before": 3.5, "after": 13.1}]}))
    out = tmp_path / "scaling.png"
    assert plots.main(["scaling", "--table", str(table), "--out", str(out), "--title", "FlanT5 on GSM8K"]) == 0
    assert_png(out)
    assert plots.main(["scaling", "--table", str(tmp_path / "t.json"), "--out", str(out)]) == 0
    table.write_text("[]")
    assert plots.main(["scaling", "--table", str(table), "--out", str(out)]) == 2
    assert "no rows" in capsys.readouterr().err


def test_tradeoff_from_the_pipelines_evaluated_models(tmp_path):
    """No per-checkpoint test scores: the start -> best (-> selected) models of eval/scores.json are drawn."""
    run = tmp_path / "dm"
    (run / "eval").mkdir(parents=True)
    scores = {"best": {"synthetic/test": 0.6, "synthetic/generic_sort": 0.1, "synthetic/generic_bool": 0.3},
              "start": {"synthetic/test": 0.2, "synthetic/generic_sort": 0.3, "synthetic/generic_bool": 0.5}}
    (run / "eval" / "scores.json").write_text(json.dumps(scores))
    pts, names = plots._series(run, None, None, "eval")
    assert [p[0] for p in pts] == ["start", "best"]  # start first, whatever the file order
    assert pts[0][1:] == pytest.approx((0.2, 0.4)) and pts[1][1:] == pytest.approx((0.6, 0.2))
    assert names == ("test synthetic/test", "test generic mean (2 sets)")
    assert_png(plots.plot_tradeoff([run], tmp_path / "t.png", labels=["DM"]))


def test_smooth_is_a_centred_running_mean():
    assert plots.smooth([0, 3, 6, 3]) == pytest.approx([1.5, 3, 4, 4.5])
    assert plots.smooth([5]) == [5]


def test_tradeoff_panels_label_the_start_and_each_pick(runs, tmp_path):
    """One panel per run; the start model (from eval/scores.json) and both dev signals' picks are drawn."""
    import matplotlib.pyplot as plt
    (runs[0] / "eval").mkdir(exist_ok=True)
    (runs[0] / "eval" / "scores.json").write_text(json.dumps({"start": {"gsm8k": 0.05, "bbh": 0.4}}))
    texts = []
    real_savefig = plt.Figure.savefig

    def spy(fig, *a, **k):
        texts.extend(t.get_text() for ax in fig.axes for t in ax.texts)
        texts.append(f"axes={len(fig.axes)}")
        return real_savefig(fig, *a, **k)

    plt.Figure.savefig = spy
    try:
        w, _ = assert_png(plots.plot_tradeoff(runs, tmp_path / "t.png", labels=["DM", "SM"]))
    finally:
        plt.Figure.savefig = real_savefig
    picks = plots._picks(runs[0])
    assert picks == {"in_dist": 1000, "ood": 400}  # gsm8k dev peaks last, the OOD mean at step 400
    assert texts.count("start") == 1  # only the DM run has a scored start model
    assert f"in-dist pick (step {picks['in_dist']})" in texts and f"ood pick (step {picks['ood']})" in texts
    assert "axes=3" in texts  # two run panels and the shared step colour bar
    assert w > 1000


def test_in_dist_vs_ood_labels_each_picked_step_once(runs, tmp_path, monkeypatch):
    """Run 0's two dev signals pick different steps, so it gets two labels; a run whose signals pick one
    checkpoint gets one label naming both (two would print over each other)."""
    same = tmp_path / "same"
    same.mkdir()
    (same / "recipe.yaml").write_text(RECIPE)
    rows = [{"step": s, "dev/gsm8k_dev_acc": 0.1 * k, "dev/multiarith_acc": 0.05 * k, "dev/svamp_acc": 0.05 * k}
            for k, s in enumerate((100, 200, 300), start=1)]
    (same / "dev_scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = {}
    monkeypatch.setattr(plots, "_save", lambda fig, out: texts.setdefault("all", [t.get_text() for t in fig.axes[0].texts]))
    plots.plot_in_dist_vs_ood([runs[0], same], tmp_path / "x.png", labels=["DM", "SAME"])
    assert sorted(t.strip() for t in texts["all"]) == ["DM: in-dist pick", "DM: ood pick", "SAME: in-dist + ood pick"]
