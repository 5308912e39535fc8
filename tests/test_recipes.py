"""Every recipe loads strictly and its header command passes `specialize run --dry-run`.

The command is read from the recipe's own header comment (the first `specialize run` line), so a
header that drifts from what actually runs fails here.
"""
import json
import shlex
from pathlib import Path

import pytest

from specialize.engine import pipeline
from specialize.engine.config import ConfigError, load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


def header_command(path: Path) -> list[str]:
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text.startswith("specialize run "):
            return shlex.split(text)[2:]
    raise AssertionError(f"{path}: no `specialize run` command in the header comment")


def test_recipes_exist_with_mini_variants():
    names = {p.relative_to(REPO / "recipes").as_posix() for p in RECIPES}
    for experiment in ("formats", "start_checkpoint", "dm_vs_sm", "scaling", "tradeoff", "model_selection"):
        assert f"{experiment}.yaml" in names and f"mini/{experiment}.yaml" in names
    assert {f"headline_flan_t5_{s}.yaml" for s in ("base", "large", "xl", "xxl")} <= names
    assert "mini/headline.yaml" in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(REPO / "recipes").as_posix())
def test_recipe_header_command_dry_runs(path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # recipe paths (DeepSpeed JSONs) are relative to the repository root
    monkeypatch.setenv("OPENAI_API_KEY", "sk-dry-run")  # the API teachers' stage needs one (next test)
    argv = header_command(path)
    assert argv[0] == path.relative_to(REPO).as_posix()
    load_recipe(path)  # strict: unknown keys / wrong types raise
    assert pipeline.main(argv + ["--dry-run"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    for check in ("stages", "inputs", "deepspeed", "model", "data", "aligned", "loss"):
        assert f"  {check}" in out


def test_dry_run_checks_what_the_stages_to_run_read(tmp_path, monkeypatch, capsys, shared_data):
    """What would stop the real run is a dry-run failure: the API key the teacher stage needs, the local
    data files of the sets the stages read, and (with --stages) the outputs of a stage left out."""
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    recipe = ["recipes/headline_flan_t5_base.yaml", "--set", f"output_dir={tmp_path / 'runs'}",
              "--set", f"teacher.out_dir={tmp_path / 'teacher'}", "--set", f"aligner.out_dir={tmp_path / 'aligned'}"]

    def dry(*extra):
        code = pipeline.main([*recipe, *extra, "--dry-run"])
        out = capsys.readouterr()
        return code, out.out + out.err

    code, out = dry()
    assert code == 1 and "OPENAI_API_KEY is not set" in out
    code, out = dry("--stages", "train", "eval")  # no teacher stage to run: no key needed, but no shards either
    assert code == 1 and "the train stage reads the align stage's outputs" in out and "--stages" in out
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    empty = tmp_path / "no-data"
    empty.mkdir()
    code, out = dry("--set", f"data.data_dir={empty}")
    assert code == 1 and f"data.data_dir {empty}" in out and "gsm8k" in out
    code, out = dry("--set", f"data.data_dir={shared_data}")
    assert code == 0, out
    assert "gsm8k train 7,173" in out and "bbh test 6,511" in out and "API key in $OPENAI_API_KEY" in out
    # the align stage finished (its marker, with the key of this configuration): train may run alone
    run = pipeline.expand_runs([recipe[0]], recipe[2::2], [])[0]
    from specialize.engine.pipeline.stages import mark_done
    mark_done(run, "align", 1.0)
    monkeypatch.delenv("OPENAI_API_KEY")
    code, out = dry("--stages", "train")
    assert code == 0, out
    assert "stages         train  (run dir" in out and f"train reads {run.dir('align')}" in out


def test_ds_json_files_are_valid_and_referenced():
    configs = sorted((REPO / "recipes").glob("*.json"))
    assert configs
    text = "".join(p.read_text() for p in RECIPES)
    for cfg in configs:
        json.loads(cfg.read_text())
        assert f"recipes/{cfg.name}" in text, f"{cfg.name} is used by no recipe"


def test_sweeps_zip_and_tag_runs(tmp_path):
    runs = pipeline.expand_runs([str(REPO / "recipes/dm_vs_sm.yaml")], ["train.max_steps=7"],
                                ["loss.kind=[dm, sm]", "train.lr=[0.1, 0.2]"])
    assert [(r.tag, r.recipe.loss.kind, r.recipe.train.lr, r.recipe.train.max_steps) for r in runs] == \
        [("dm", "dm", 0.1, 7), ("sm", "sm", 0.2, 7)]
    assert runs[0].dir("teacher") == runs[1].dir("teacher")          # teacher data shared
    assert runs[0].dir("train") != runs[1].dir("train")              # training is per run
    with pytest.raises(ConfigError, match="zipped"):
        pipeline.expand_runs([str(REPO / "recipes/dm_vs_sm.yaml")], [], ["loss.kind=[dm, sm]", "train.lr=[0.1]"])
    with pytest.raises(ConfigError, match="loss.kind"):
        pipeline.expand_runs([str(REPO / "recipes/dm_vs_sm.yaml")], [], ["loss.kind=[dm, fancy]"])


def test_recipes_sharing_a_folder_share_its_stage_key(monkeypatch):
    """Recipes (and their swept runs, as their header commands run them) that point at one toy, teacher or
    aligned folder must agree on what goes in it, or the second `specialize run` refuses the folder."""
    monkeypatch.chdir(REPO)
    groups: dict[tuple[str, str], dict[str, str]] = {}
    for path in RECIPES:
        args = pipeline.build_parser().parse_args(header_command(path))
        for run in pipeline.expand_runs(args.recipes, args.sets, args.sweeps):
            for stage in ("toy", "teacher", "filter", "align"):
                if stage not in run.recipe.stages:
                    continue
                groups.setdefault((stage, str(run.dir(stage).resolve())), {})[run.name] = \
                    pipeline.stage_key(run, stage)
    shared = {k: v for k, v in groups.items() if len(v) > 1}
    assert any(stage == "align" and len(v) >= 4 for (stage, _), v in shared.items())  # the GSM8K recipes
    for (stage, folder), keys in shared.items():
        assert len(set(keys.values())) == 1, f"{stage} folder {folder}: {keys}"


def test_dry_run_reports_mismatched_deepspeed_config(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    code = pipeline.main(["recipes/headline_flan_t5_base.yaml", "--set", "deepspeed.zero_stage=3", "--dry-run"])
    assert code == 1
    assert "zero_stage=3" in capsys.readouterr().err


def test_done_markers_skip_and_refuse_stale(tmp_path):
    calls = []
    runs = pipeline.expand_runs([str(REPO / "recipes/mini/headline.yaml")],
                                [f"output_dir={tmp_path}", f"teacher.out_dir={tmp_path}/t",
                                 "stages=[teacher, filter]"], [])
    fake = {"teacher": lambda run: calls.append("teacher") or {}, "filter": lambda run: calls.append("filter") or {}}
    pipeline.run_stages(runs, stage_funcs=fake, log=lambda s: None)
    pipeline.run_stages(runs, stage_funcs=fake, log=lambda s: None)
    assert calls == ["teacher", "filter"]  # the second pass reused both
    changed = pipeline.expand_runs([str(REPO / "recipes/mini/headline.yaml")],
                                   [f"output_dir={tmp_path}", f"teacher.out_dir={tmp_path}/t",
                                    "stages=[teacher, filter]", "teacher.samples=9"], [])
    with pytest.raises(ConfigError, match="different configuration"):
        pipeline.run_stages(changed, stage_funcs=fake, log=lambda s: None)
    # the demo's mode: below its own folder a stale folder is deleted and its stage made again...
    (changed[0].dir("teacher") / "old-sample.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="different configuration"):  # ...and only there
        pipeline.run_stages(changed, stage_funcs=fake, log=lambda s: None, replace_stale_under=tmp_path / "elsewhere")
    assert (changed[0].dir("teacher") / "old-sample.jsonl").exists()
    said = []
    calls.clear()
    pipeline.run_stages(changed, stage_funcs=fake, log=said.append, replace_stale_under=tmp_path)
    assert calls == ["teacher", "filter"] and not (changed[0].dir("teacher") / "old-sample.jsonl").exists()
    assert sum("another configuration; deleting it" in line for line in said) == 2
    calls.clear()
    pipeline.run_stages(changed, stage_funcs=fake, log=lambda s: None, replace_stale_under=tmp_path)
    assert calls == []


# The paper's conf/batch_size (sequences per micro-batch, one model over all its GPUs) and its
# grad_accum_steps per size (experiments*.md), typed in from the paper's repository.
PAPER_BATCHES = {
    "base": ({"in_context_cot": 25, "in_context_answer_only": 35, "zero_shot_cot": 40, "zero_shot_answer_only": 60}, 3),
    "large": ({"in_context_cot": 8, "in_context_answer_only": 12, "zero_shot_cot": 18, "zero_shot_answer_only": 30}, 20),
    "xl": ({"in_context_cot": 2, "in_context_answer_only": 10, "zero_shot_cot": 8, "zero_shot_answer_only": 20}, 30),
    "xxl": ({"in_context_cot": 4, "in_context_answer_only": 20, "zero_shot_cot": 15, "zero_shot_answer_only": 40}, 20),
}


@pytest.mark.parametrize("size", sorted(PAPER_BATCHES))
def test_headline_recipes_carry_the_papers_mix_and_batches(size):
    from specialize.engine.config import load_recipe
    from specialize.engine.data import FORMATS
    r = load_recipe(REPO / f"recipes/headline_flan_t5_{size}.yaml")
    paper, accum = PAPER_BATCHES[size]
    assert set(r.data.formats) == set(FORMATS) and set(r.data.micro_batch_sizes) == set(FORMATS)
    for fmt, per_micro in paper.items():
        ours = r.data.micro_batch_size_for(fmt, r.train.micro_batch_size) * 8 * r.train.grad_accum
        assert 0.75 <= ours / (per_micro * accum) <= 1.34, (fmt, ours, per_micro * accum)  # sequences per step
    # the formats' shares follow the paper's batches per epoch: CoT formats hold every kept sample
    cot = r.data.formats["in_context_cot"] / r.data.formats["zero_shot_cot"]
    assert cot == pytest.approx(paper["zero_shot_cot"] / paper["in_context_cot"], rel=0.05)
    assert r.data.formats["zero_shot_answer_only"] < r.data.formats["in_context_answer_only"] < 0.05
    assert (r.train.lr, r.train.warmup_steps, r.train.weight_decay, r.loss.alpha) == (5e-4, 10, 0.01, 0.0)
    assert (r.teacher.prompt, r.teacher.stop, r.teacher.cut_at_answer) == ("complex", None, True)


def test_every_gsm8k_recipe_uses_the_complex_prompt_and_dm_alpha_zero():
    from specialize.engine.config import load_recipe
    for path in sorted(REPO.glob("recipes/**/*.yaml")):
        r = load_recipe(path)
        if r.teacher.dataset == "gsm8k":
            assert r.teacher.prompt == "complex", path
        if r.loss.kind == "dm":
            assert r.loss.alpha == 0.0, path


def test_a_seed_sweep_shares_the_gsm8k_teacher_but_not_its_dev_questions(shared_data):
    """Runs differing in train.seed share the GSM8K teacher folder (its questions do not depend on the
    seed), so the dev split must not depend on it either; the synthetic world does, so there the seed
    is part of the teacher's key."""
    from specialize.engine.data import load_dataset_by_name
    runs = pipeline.expand_runs([str(REPO / "recipes/dm_vs_sm.yaml")], [f"data.data_dir={shared_data}"],
                                ["train.seed=[42, 1]"])
    assert pipeline.stage_key(runs[0], "teacher") == pipeline.stage_key(runs[1], "teacher")
    assert pipeline.stage_key(runs[0], "align") == pipeline.stage_key(runs[1], "align")
    devs = [{e.id for e in pipeline.load_examples(run.recipe, "gsm8k", split="dev")} for run in runs]
    train_ids = {e.id for e in pipeline.load_examples(runs[1].recipe, "gsm8k", split="train")}
    assert devs[0] == devs[1] and len(devs[0]) == runs[0].recipe.data.dev_size and not devs[0] & train_ids
    # `specialize eval --datasets gsm8k_dev` (no recipe, default seed) scores that same dev part
    assert {e.id for e in load_dataset_by_name("gsm8k_dev", runs[0].recipe.data.data_dir)} == devs[0]
    mini = pipeline.expand_runs([str(REPO / "recipes/mini/dm_vs_sm.yaml")], [], ["train.seed=[0, 1]"])
    for stage in ("toy", "teacher", "filter", "align"):
        assert pipeline.stage_key(mini[0], stage) != pipeline.stage_key(mini[1], stage), stage
