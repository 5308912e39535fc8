"""The evaluator on real benchmark items: gold answers score 100%, extraction edge cases, a random tiny T5
end to end (batched = one-by-one generation), the CLI's files, prediction files, checkpoints of a run."""
import json

import numpy as np
import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from specialize.engine.data import BBH_TASKS, Example, build_prompt, build_target, load_dataset_by_name
from specialize.engine.evaluation import evaluate
from specialize.engine.evaluation.evaluate import EvalResult, bootstrap_ci, evaluate_model, score_predictions
from specialize.engine.tokenizers import train_t5_unigram

MATH = ("gsm8k", "multiarith", "asdiv", "svamp")


@pytest.fixture(scope="module")
def tiny(shared_data):
    """A random-init T5 (d_model 32) and a Unigram tokenizer trained on real questions and BBH prompts."""
    gsm = load_dataset_by_name("gsm8k", shared_data, split="train")[:300]
    prompts = [p.read_text() for p in sorted((shared_data / "bbh" / "cot-prompts").glob("*.txt"))]
    tok = train_t5_unigram([e.question for e in gsm] + [e.rationale for e in gsm] + prompts, vocab_size=800)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_ff=64, d_kv=8, num_heads=2, num_layers=1,
                   num_decoder_layers=1, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).eval(), tok


# ---------------------------------------------------------------- gold answers score 100%

def test_gold_rationales_score_100_percent_on_gsm8k_test(shared_data):
    examples = load_dataset_by_name("gsm8k", shared_data)
    assert len(examples) == 1319
    res = score_predictions([build_target(ex, None, "zero_shot_cot") for ex in examples], examples, "gsm8k")
    assert (res.accuracy, res.n_correct, res.n) == (1.0, 1319, 1319)
    assert res.ci_low == res.ci_high == 1.0


@pytest.mark.parametrize("template", ["{}", "Let's think step by step. So the answer is {}."])
def test_bbh_targets_score_100_percent_on_every_task(shared_data, template):
    examples = load_dataset_by_name("bbh", shared_data)
    res = score_predictions([template.format(ex.answer) for ex in examples], examples, "bbh")
    assert set(res.per_task) == set(BBH_TASKS)
    assert {t: v["accuracy"] for t, v in res.per_task.items() if v["accuracy"] < 1} == {}
    assert res.accuracy == 1.0 and res.n == 6511


def test_bbh_average_is_the_mean_over_tasks():
    ex = [Example(f"bbh/navigate/{i}", "q", "Yes", None, "bbh/navigate") for i in range(4)]
    ex += [Example(f"bbh/snarks/{i}", "q", "(A)", None, "bbh/snarks") for i in range(2)]
    preds = ["So the answer is Yes."] * 4 + ["So the answer is (A).", "So the answer is (B)."]
    res = score_predictions(preds, ex, "bbh")
    assert res.per_task["navigate"]["accuracy"] == 1.0 and res.per_task["snarks"]["accuracy"] == 0.5
    assert res.accuracy == pytest.approx(0.75)  # macro, not the 5/6 micro average
    assert res.n_correct == 5


# ---------------------------------------------------------------- extraction edge cases

@pytest.mark.parametrize("prediction, gold, ok", [
    ("She pays 1,250 dollars in all. The answer is 1,250.", "1250", True),
    ("The temperature drops to -5 degrees. The answer is -5.", "-5", True),
    ("He walks 3 - 5 = -2 ... no. The answer is 2.", "2", True),
    ("Each costs 2.50, so the answer is $7.5.", "7.5", True),
    ("Half of a half is 1/4. The answer is 1/4.", "0.25", True),
    ("So she has 18 apples.", "18", True),                       # trailing unit, no marker
    ("The answer is 40 minutes.", "40", True),
    ("3 + 4 = 7, 7 * 2 = 14. The answer is 14.", "14", True),    # several numbers: the marked one
    ("3 + 4 = 7, then 7 * 2 = 14", "14", True),                  # several numbers: the last one
    ("The answer is 14. Also 3 more.", "14", True),
    ("The answer is 15.", "14", False),
    ("I do not know.", "14", False),
])
def test_number_extraction_through_the_evaluator(prediction, gold, ok):
    res = score_predictions([prediction], [Example("x/0", "q", gold, None, "gsm8k")], "gsm8k")
    assert res.predictions[0]["correct"] is ok
    assert res.accuracy == float(ok)


@pytest.mark.parametrize("task, prediction, gold, ok", [
    ("date_understanding", "Let's think. So the answer is (B).", "(B)", True),
    ("date_understanding", "Options (A) and (C) are wrong. The answer is (B).", "(B)", True),
    ("date_understanding", "The answer is (C).", "(B)", False),
    ("boolean_expressions", "not True is False. So the answer is False.", "False", True),
    ("web_of_lies", "So the answer is No.", "No", True),
    ("object_counting", "1 + 2 + 3 = 6. So the answer is 6.", "6", True),
])
def test_bbh_extraction_through_the_evaluator(task, prediction, gold, ok):
    res = score_predictions([prediction], [Example(f"bbh/{task}/0", "q", gold, None, f"bbh/{task}")], "bbh")
    assert res.predictions[0]["correct"] is ok
    assert res.per_task[task]["n"] == 1


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError, match="2 predictions for 1 examples"):
        score_predictions(["a", "b"], [Example("x/0", "q", "1", None, "gsm8k")], "gsm8k")


# ---------------------------------------------------------------- bootstrap interval

def test_bootstrap_matches_index_resampling_and_is_seeded():
    outcomes = [True] * 130 + [False] * 70
    acc, lo, hi = bootstrap_ci([outcomes], seed=3)
    assert (acc, lo, hi) == bootstrap_ci([outcomes], seed=3)
    # Independent reference: resample indices with replacement, percentile interval.
    rng = np.random.default_rng(123)
    x = np.array(outcomes, dtype=float)
    means = x[rng.integers(0, len(x), size=(4000, len(x)))].mean(axis=1)
    ref_lo, ref_hi = np.percentile(means, [2.5, 97.5])
    assert acc == pytest.approx(0.65)
    assert lo == pytest.approx(ref_lo, abs=0.015) and hi == pytest.approx(ref_hi, abs=0.015)
    _, lo_small, hi_small = bootstrap_ci([outcomes[::10]], seed=3)
    assert hi_small - lo_small > hi - lo  # fewer items, wider interval


# ---------------------------------------------------------------- a tiny T5 end to end

def test_tiny_t5_end_to_end_on_every_dataset(tiny, shared_data):
    model, tok = tiny
    for name in MATH:
        examples = load_dataset_by_name(name, shared_data)[:3]
        res = evaluate_model(model, tok, examples, name, batch_size=2, max_new_tokens=6, progress=False)
        assert isinstance(res, EvalResult) and res.n == 3
        assert [p["id"] for p in res.predictions] == [ex.id for ex in examples]
        assert [p["gold"] for p in res.predictions] == [ex.answer for ex in examples]
        assert 0.0 <= res.ci_low <= res.accuracy <= res.ci_high <= 1.0
    bbh = [load_dataset_by_name(f"bbh/{t}", shared_data)[0] for t in ("navigate", "word_sorting")]
    res = evaluate_model(model, tok, bbh, "bbh", max_new_tokens=4, data_dir=shared_data, progress=False)
    assert set(res.per_task) == {"navigate", "word_sorting"}
    json.dumps(res.to_dict())  # serialisable as is


def test_bucketed_batches_equal_one_by_one_generation(tiny, shared_data):
    """Sorting by length, padding and restoring order must not change any output."""
    model, tok = tiny
    examples = [ex for name in MATH for ex in load_dataset_by_name(name, shared_data)[:2]]
    res = evaluate_model(model, tok, examples, "gsm8k", fmt="zero_shot_answer_only", batch_size=3,
                         max_new_tokens=5, progress=False)
    for ex, row in zip(examples, res.predictions):
        enc = tok(f"Q: {ex.question.strip()}\nA:", return_tensors="pt")
        alone = model.generate(**enc, max_new_tokens=5, do_sample=False)
        assert row["prediction"] == tok.decode(alone[0], skip_special_tokens=True).strip(), ex.id


def test_beam_search_runs(tiny, shared_data):
    model, tok = tiny
    examples = load_dataset_by_name("svamp", shared_data)[:2]
    res = evaluate_model(model, tok, examples, "svamp", num_beams=2, max_new_tokens=4, progress=False)
    assert res.n == 2


def test_in_context_format_needs_and_uses_exemplars(tiny, shared_data):
    model, tok = tiny
    pool = load_dataset_by_name("gsm8k", shared_data, split="train")[:10]
    ex = load_dataset_by_name("gsm8k", shared_data)[:1]
    assert pool[0].question.strip() in evaluate.prompt_for(ex[0], "in_context_cot", pool[:1])
    with pytest.raises(ValueError, match="needs exemplars"):
        evaluate_model(model, tok, ex, "gsm8k", fmt="in_context_cot", progress=False)


# ---------------------------------------------------------------- CLI and files

@pytest.fixture(scope="module")
def model_dir(tiny, tmp_path_factory):
    model, tok = tiny
    path = tmp_path_factory.mktemp("tiny-t5")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_cli_writes_json_markdown_and_predictions(model_dir, shared_data, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = evaluate.main(["--model", str(model_dir), "--datasets", "gsm8k,bbh/navigate", "--format", "zero-shot-cot",
                        "--limit", "2", "--data-dir", str(shared_data), "--max-new-tokens", "3",
                        "--device", "cpu", "--quiet", "--out", str(out)])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["datasets"]) == {"gsm8k", "bbh/navigate"} and results["format"] == "zero_shot_cot"
    assert results["datasets"]["gsm8k"]["n"] == 2
    table = (out / "results.md").read_text()
    assert "| gsm8k |" in table and "95% CI" in table
    rows = [json.loads(x) for x in (out / "predictions-bbh_navigate.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["bbh/navigate/0", "bbh/navigate/1"]
    assert "| gsm8k |" in capsys.readouterr().out


def test_cli_scores_a_prediction_file(shared_data, tmp_path):
    examples = load_dataset_by_name("multiarith", shared_data)[:4]
    preds = tmp_path / "preds.jsonl"
    answers = [examples[0].answer, "-1", examples[2].answer, examples[3].answer]  # the second is wrong
    preds.write_text("".join(json.dumps({"id": ex.id, "prediction": f"The answer is {a}."}) + "\n"
                             for ex, a in zip(examples, answers)))
    rc = evaluate.main(["--predictions", str(preds), "--datasets", "multiarith", "--data-dir", str(shared_data),
                        "--out", str(tmp_path / "out")])
    assert rc == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())["datasets"]["multiarith"]
    assert (res["n"], res["n_correct"]) == (4, 3)


def test_cli_scores_teacher_records(tmp_path):
    recs = [{"qid": "gsm8k/test/0", "sample_index": i, "prompt_hash": "h", "question": "q", "gold": "18",
             "dataset": "gsm8k", "text": f"16 - 3 - 4 = 9. The answer is {a}.", "tokens": [], "token_bytes": [],
             "token_logprobs": [], "top_logprobs": [], "finish_reason": "stop", "usage": {}, "model": "m"}
            for i, a in enumerate(["18", "18", "17"])]
    recs.append({**recs[0], "qid": "bbh/navigate/0", "dataset": "bbh", "gold": "No", "text": "So the answer is No."})
    path = tmp_path / "samples-00000.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    got = evaluate.read_prediction_file(path, [])
    gsm = score_predictions(*got["gsm8k"], "gsm8k")
    assert (gsm.n, gsm.n_correct) == (3, 2)
    bbh = score_predictions(*got["bbh"], "bbh")
    assert bbh.per_task["navigate"]["accuracy"] == 1.0


def test_prediction_files_are_labelled_with_the_part_they_score(tmp_path, shared_data):
    """Teacher records of the train split say train in the table, not test; {id, prediction} lines of an
    OOD set say which of its parts they cover."""
    recs = [{"qid": f"gsm8k/train/{i}", "sample_index": 0, "question": "q", "gold": "7", "dataset": "gsm8k",
             "text": "The answer is 7."} for i in range(3)]
    path = tmp_path / "samples-00000.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert evaluate.main(["--predictions", str(path), "--out", str(tmp_path / "rec")]) == 0
    res = json.loads((tmp_path / "rec" / "results.json").read_text())["datasets"]["gsm8k"]
    assert res["split"] == "train" and "| gsm8k | train |" in (tmp_path / "rec" / "results.md").read_text()
    dev = load_dataset_by_name("svamp", shared_data, split="dev")[:2]
    test = load_dataset_by_name("svamp", shared_data, split="test")[:2]
    for name, items, want in (("dev", dev, "dev part"), ("test", test, "test part"), ("both", dev + test, "all")):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"id": ex.id, "prediction": "1"}) + "\n" for ex in items))
        assert evaluate.main(["--predictions", str(path), "--datasets", "svamp", "--data-dir", str(shared_data),
                              "--out", str(tmp_path / name)]) == 0
        split = json.loads((tmp_path / name / "results.json").read_text())["datasets"]["svamp"]["split"]
        assert split.startswith(want), (name, split)


def test_bad_prediction_file_names_file_and_line(tmp_path, shared_data):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "multiarith/0", "prediction": "1"}\n{oops\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2"):
        evaluate.read_prediction_file(path, ["multiarith"], shared_data)
    path.write_text('{"id": "nope/0", "prediction": "1"}\n')
    with pytest.raises(ValueError, match="match no example"):
        evaluate.read_prediction_file(path, ["multiarith"], shared_data)


def test_unknown_format_is_refused(capsys):
    assert evaluate.main(["--model", "x", "--format", "few-shot", "--out", "o"]) == 2
    assert "unknown --format" in capsys.readouterr().err


def test_evaluate_checkpoints_writes_test_scores_and_resumes(model_dir, shared_data, tmp_path):
    import shutil
    run = tmp_path / "run"
    for step in (100, 200):
        shutil.copytree(model_dir, run / "checkpoints" / f"step-{step:06d}")
    (run / "checkpoints" / "step-000300").mkdir()  # a DeepSpeed-only checkpoint: not HF-loadable, skipped
    rows = evaluate.evaluate_checkpoints(run, ["svamp"], limit=2, data_dir=shared_data, device="cpu",
                                         max_new_tokens=3, progress=False)
    assert [r["step"] for r in rows] == [100, 200]
    lines = [json.loads(x) for x in (run / "test_scores.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [100, 200] and all("svamp_acc" in r for r in lines)
    assert evaluate.evaluate_checkpoints(run, ["svamp"], limit=2, data_dir=shared_data, device="cpu",
                                         max_new_tokens=3, progress=False) == []


def test_workers_score_the_checkpoints_as_one_process_does(model_dir, shared_data, tmp_path, capsys):
    """`specialize eval --run R --workers 2`: two spawned processes score the checkpoints side by side;
    the rows are those one process writes, in step order."""
    import shutil
    for name in ("one", "two"):
        for step in (100, 200, 300):
            shutil.copytree(model_dir, tmp_path / name / "checkpoints" / f"step-{step:06d}")
    args = ["--datasets", "svamp,synthetic/test", "--limit", "3", "--data-dir", str(shared_data), "--device", "cpu",
            "--max-new-tokens", "3", "--quiet"]
    assert evaluate.main(["--run", str(tmp_path / "one"), *args]) == 0
    assert evaluate.main(["--run", str(tmp_path / "two"), "--workers", "2", *args]) == 0
    one, two = ((tmp_path / name / "test_scores.jsonl").read_text().splitlines() for name in ("one", "two"))
    assert [json.loads(x)["step"] for x in two] == [100, 200, 300] and two == one
    capsys.readouterr()


def test_deepspeed_checkpoints_are_exported_once_then_scored(model_dir, shared_data, tmp_path, monkeypatch):
    import shutil

    from specialize.engine import export
    calls = []

    def fake_export(ckpt, run_dir, out_dir):  # stands in for zero_to_fp32: the wiring is what is tested
        calls.append(ckpt.name)
        shutil.copytree(model_dir, out_dir)
        return out_dir

    monkeypatch.setattr(export, "export_checkpoint", fake_export)
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000050").mkdir(parents=True)
    (run / "checkpoints" / "step-000050" / "complete.json").write_text('{"step": 50}')
    rows = evaluate.evaluate_checkpoints(run, ["svamp"], limit=1, data_dir=shared_data, device="cpu",
                                         max_new_tokens=2, progress=False)
    assert [r["step"] for r in rows] == [50] and calls == ["step-000050"]
    assert evaluate.checkpoint_steps(run, convert=True) == {50: run / "checkpoints-hf" / "step-000050"}
    assert calls == ["step-000050"]  # the export is reused, not redone


def test_bbh_prompt_is_the_data_layers_3_shot_prompt(shared_data):
    from specialize.engine.data import build_bbh_prompt
    ex = load_dataset_by_name("bbh/date_understanding", shared_data)[5]
    for fmt in ("zero_shot_cot", "in_context_answer_only"):
        got = evaluate.prompt_for(ex, fmt, (), shared_data)
        assert got == build_bbh_prompt("date_understanding", ex.question, shared_data)
    assert got.count("Q:") == 4 and got.endswith("A: Let's think step by step.")


def test_run_recipe_decides_the_synthetic_items(model_dir, tmp_path):
    """`--run` loads data as the pipeline does for that run (seed, synthetic sizes), not the defaults."""
    import shutil
    run = tmp_path / "pipeline-run"
    shutil.copytree(model_dir, run / "train" / "checkpoints" / "step-000010")
    (run / "train" / "recipe.yaml").write_text("data:\n  synthetic_sizes: {test: 3}\ntrain:\n  seed: 7\n")
    # read through load_recipe: the recipe's own values, the rest its resolved defaults
    from specialize.engine.config import DataConfig
    assert evaluate.run_data_options(run / "train") == {"seed": 7, "sizes": {"test": 3},
                                                        "dev_size": DataConfig.dev_size,
                                                        "ood_dev_size": DataConfig.ood_dev_size}
    rows = evaluate.evaluate_checkpoints(run, ["synthetic/test"], device="cpu", max_new_tokens=2, progress=False)
    assert rows[0]["synthetic/test_n"] == 3
    assert (run / "train" / "test_scores.jsonl").exists()


def test_run_scores_with_the_recipes_settings_and_only_what_is_missing(model_dir, shared_data, tmp_path, capsys,
                                                                         monkeypatch):
    """`eval --run` after `specialize run`: the format, shots, seed and max_new_tokens are the recipe's
    (in-context prompts, so the prompts differ from the CLI's zero-shot default); a (step, dataset) already
    scored is skipped, a new dataset or a new --limit is scored, and the rows of a step add up for select."""
    import shutil

    from specialize.engine.evaluation import select
    run = tmp_path / "pipeline-run"
    for step in (10, 20):
        shutil.copytree(model_dir, run / "train" / "checkpoints" / f"step-{step:06d}")
    (run / "train" / "recipe.yaml").write_text(
        f"data:\n  data_dir: {shared_data}\n  shots: 2\ntrain:\n  seed: 3\n"
        "eval:\n  format: in_context_cot\n  max_new_tokens: 2\n")
    prompts = []
    real = evaluate.prompt_for
    monkeypatch.setattr(evaluate, "prompt_for", lambda ex, fmt, exemplars=(), data_dir=None:
                        prompts.append((fmt, len(exemplars))) or real(ex, fmt, exemplars, data_dir))
    args = ["--run", str(run), "--device", "cpu", "--quiet"]
    assert evaluate.main([*args, "--datasets", "svamp", "--limit", "2"]) == 0
    assert set(prompts) == {("in_context_cot", 2)}
    rows = [json.loads(x) for x in (run / "train" / "test_scores.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20]
    assert rows[0]["settings"] == {"format": "in_context_cot", "shots": 2, "seed": 3, "max_new_tokens": 2,
                                   "num_beams": 1}
    capsys.readouterr()
    prompts.clear()
    assert evaluate.main([*args, "--datasets", "svamp", "--limit", "2"]) == 0
    assert prompts == [] and "nothing left to score" in capsys.readouterr().err
    assert evaluate.main([*args, "--datasets", "svamp,asdiv", "--limit", "2"]) == 0  # asdiv is new
    assert len(prompts) == 2 * 2  # two steps x two asdiv items; svamp not again
    prompts.clear()
    assert evaluate.main([*args, "--datasets", "svamp", "--limit", "3"]) == 0  # more items: scored again
    assert len(prompts) == 2 * 3
    prompts.clear()
    assert evaluate.main([*args, "--datasets", "svamp", "--limit", "3", "--max-new-tokens", "3"]) == 0
    assert len(prompts) == 2 * 3  # other settings: scored again
    scores = select.read_test_scores(run)
    assert set(scores) == {10, 20} and set(scores[10]) == {"svamp", "asdiv"}
    capsys.readouterr()


def test_cli_teacher_records_without_datasets_scores_every_dataset_in_the_file(tmp_path):
    recs = [{"qid": f"synthetic/train/{i}", "sample_index": 0, "question": "q", "gold": "7", "dataset": "synthetic",
             "text": f"3 + 4 = 7. The answer is {a}."} for i, a in enumerate(["7", "7", "8", "7"])]
    path = tmp_path / "samples-00000.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert evaluate.main(["--predictions", str(path), "--out", str(tmp_path / "o")]) == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())["datasets"]
    assert list(res) == ["synthetic"] and (res["synthetic"]["n"], res["synthetic"]["n_correct"]) == (4, 3)
    assert evaluate.main(["--predictions", str(path), "--datasets", "gsm8k", "--out", str(tmp_path / "p")]) == 2


def test_no_examples_give_nan_accuracy_not_an_error(tiny):
    model, tok = tiny
    res = evaluate_model(model, tok, [], "gsm8k", progress=False)
    assert res.n == 0 and np.isnan(res.accuracy)


def test_outputs_cut_off_at_max_new_tokens_are_counted(shared_data):
    """Each output's `truncated` equals what generating it alone shows (no EOS within the limit), in
    batches where some rows end and others run out, and the count reaches results.json and the table."""
    from teacher_server import tiny_teacher
    model, tok = tiny_teacher()  # a decoder-only model, whose last hidden state depends on the prompt
    with torch.no_grad():
        model.transformer.wte.weight[tok.eos_token_id] *= 3  # EOS wins at some steps of some outputs
    examples = load_dataset_by_name("synthetic/test")[:12]
    res = evaluate_model(model, tok, examples, "synthetic/test", batch_size=4, max_new_tokens=8, progress=False)
    expected = []
    for ex in examples:
        ids = tok(build_prompt(ex.question, "zero_shot_cot"), return_tensors="pt")
        alone = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
        new = alone[0, ids["input_ids"].shape[1]:].tolist()
        expected.append(len(new) == 8 and tok.eos_token_id not in new)
    assert [row["truncated"] for row in res.predictions] == expected
    assert 0 < sum(expected) < len(expected), expected  # both kinds
    assert res.truncated == sum(expected) and res.to_dict()["truncated"] == sum(expected)
    table = evaluate.markdown_table({"synthetic/test": res})
    assert "Outputs cut off at max_new_tokens" in table and f"synthetic/test {sum(expected)}/12" in table
