"""The demo end to end in its --tiny configuration: every stage runs for real (toy models, hf teacher,
Numba aligner, DeepSpeed engine on 2 CPU ranks, evaluator, plots) on a shrunken scale."""
import json

import pytest

from specialize.engine import demo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert demo.main(["--out", str(out), "--tiny"]) == 0
    return out


def test_report_table_and_findings(tiny_demo, capsys):
    report = (tiny_demo / "REPORT.md").read_text()
    assert "## Results" in report and "## Paper findings, checked" in report
    # Each finding is stated either way, never left out.
    findings = report.split("## Paper findings, checked")[1].split("##")[0]
    assert findings.count("- ") >= 4
    assert all(("reproduced" in line or "n/a" in line) for line in findings.splitlines() if line.startswith("- "))
    results = json.loads((tiny_demo / "results.json").read_text())
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
    for stage_dir, stage in [("toy", "toy"), ("teacher", "teacher"), ("teacher-correct", "filter"),
                             ("aligned", "align"), ("dm/train", "train"), ("sm/train", "train"),
                             ("dm/eval", "eval"), ("sm/eval", "eval")]:
        assert (tiny_demo / stage_dir / f".done-{stage}.json").exists(), stage_dir
    assert (tiny_demo / "dm" / "train" / "dev_scores.jsonl").exists()


def test_rerun_reuses_finished_stages(tiny_demo, capsys):
    assert demo.main(["--out", str(tiny_demo), "--tiny"]) == 0
    out = capsys.readouterr().out
    for stage in ("toy", "teacher", "filter", "align", "train", "eval"):
        assert f"{stage} done, reusing" in out


@pytest.mark.parametrize("better,worse,n,expect", [
    (0.20, 0.10, 100, "reproduced"),           # 10 points, 2 SE = 9.8 points
    (0.11, 0.10, 100, "within noise"),
    (0.030, 0.023, 300, "within noise"),       # the gap the first full demo called a reproduction
    (0.10, 0.30, 100, "opposite"),
    (None, 0.10, 100, "n/a"),
])
def test_verdict_needs_a_gap_beyond_sampling_noise(better, worse, n, expect):
    assert expect in demo.verdict(better, worse, n, n)


def test_report_states_teacher_yield_and_ood_split(tiny_demo):
    report = (tiny_demo / "REPORT.md").read_text()
    filt = json.loads((tiny_demo / "teacher-correct" / ".done-filter.json").read_text())
    assert f"kept (correct) after the cut at the first answer line: {filt['kept']}" in report
    assert f"kept without the cut: {filt['kept_without_cut']}" in report
    split = report.split("## OOD dev/test split")[1].split("##")[0]
    # the counts in the report are the parts the engine and the test stage load, and they are disjoint
    from specialize.engine.data import load_dataset_by_name
    dev = load_dataset_by_name(demo.OOD[0], split="dev", seed=0, ood_dev_size=demo.OOD_DEV)
    test = load_dataset_by_name(demo.OOD[0], split="test", seed=0, ood_dev_size=demo.OOD_DEV)
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
    from specialize.engine.data import load_dataset_by_name
    dev = {e.id for e in load_dataset_by_name(demo.OOD[0], split="dev", seed=0, ood_dev_size=demo.OOD_DEV)}
    dumps = sorted((tiny_demo / "dm" / "train" / "dev").glob(f"step-*/{demo.OOD[0].replace('/', '_')}.jsonl"))
    assert dumps, "the engine wrote no dev predictions for the OOD dev set"
    for path in dumps:
        ids = {json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()}
        assert ids and ids <= dev, path
