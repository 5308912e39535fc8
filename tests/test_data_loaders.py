"""Loaders on the real reference files (counts, fields), the GSM8K dev split, errors on broken files."""
import json
import re

import pytest

from specialize.engine.data import (
    BBH_TASKS,
    DataError,
    Example,
    load_asdiv,
    load_bbh,
    load_bbh_cot_prompt,
    load_dataset_by_name,
    load_gsm8k,
    load_multiarith,
    load_svamp,
    loaders,
    split_gsm8k_dev,
)


@pytest.fixture(scope="module")
def gsm8k_train(shared_data):
    return load_gsm8k("train", shared_data / "gsm8k")


def test_gsm8k_counts_and_fields(shared_data, gsm8k_train):
    test = load_gsm8k("test", shared_data / "gsm8k")
    assert (len(gsm8k_train), len(test)) == (7473, 1319)
    first = test[0]
    assert first.id == "gsm8k/test/0" and first.source == "gsm8k" and first.answer == "18"
    assert first.question.startswith("Janet") and first.question.endswith("farmers' market?")
    # calculator notes and the "#### N" line are gone, the reasoning text is kept
    assert first.rationale == ("Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n"
                               "She makes 9 * 2 = $18 every day at the farmer\u2019s market.")
    for ex in gsm8k_train + test:
        assert "<<" not in ex.rationale and "####" not in ex.rationale
        assert re.fullmatch(r"-?\d+(\.\d+)?", ex.answer), ex  # "1,000" normalised to "1000"
    assert len({ex.id for ex in gsm8k_train}) == 7473


def test_gsm8k_dev_split_is_held_out_deterministic_and_seeded(gsm8k_train):
    rest, dev = split_gsm8k_dev(gsm8k_train, dev_size=300, seed=0)
    assert (len(rest), len(dev)) == (7173, 300)
    assert not {e.id for e in rest} & {e.id for e in dev}
    assert {e.id for e in rest} | {e.id for e in dev} == {e.id for e in gsm8k_train}
    again = split_gsm8k_dev(gsm8k_train, dev_size=300, seed=0)[1]
    assert [e.id for e in again] == [e.id for e in dev]
    other = split_gsm8k_dev(gsm8k_train, dev_size=300, seed=1)[1]
    assert {e.id for e in other} != {e.id for e in dev}
    with pytest.raises(ValueError, match="dev_size"):
        split_gsm8k_dev(gsm8k_train, dev_size=0)


def test_multiarith_svamp_asdiv(shared_data):
    ma = load_multiarith(shared_data / "multiarith")
    assert len(ma) == 600 and ma[0].answer == "39" and ma[0].id == "multiarith/0"
    assert ma[0].question.startswith("For Halloween")  # leading blank of sQuestion stripped

    sv = load_svamp(shared_data / "svamp")
    assert len(sv) == 1000 and sv[0].id == "svamp/chal-1" and sv[0].answer == "51"
    raw = json.loads((shared_data / "svamp" / "SVAMP.json").read_text())[0]
    assert sv[0].question == raw["Body"].strip() + " " + raw["Question"].strip()

    asd = load_asdiv(shared_data / "asdiv")
    assert len(asd) == 2305 and len({e.id for e in asd}) == 2305
    assert asd[0].id == "asdiv/nluds-0001" and asd[0].answer == "9"  # "9 (apples)"
    assert asd[0].question == ("Seven red apples and two green apples are in the basket. "
                               "How many apples are in the basket?")
    assert not any("(" in e.answer and re.search(r"\([a-z]", e.answer) for e in asd)
    by_answer = {e.answer for e in asd}
    assert "5; 15; 20" in by_answer and "3:30 p.m." in by_answer  # lists and text kept


def test_bbh_tasks_and_prompts(shared_data):
    bbh = load_bbh(shared_data / "bbh")
    assert len(bbh) == 6511
    assert len({e.source for e in bbh}) == 27 == len(BBH_TASKS)
    assert all(e.source.startswith("bbh/") and e.id.startswith(e.source + "/") for e in bbh)
    assert len(load_bbh(shared_data, tasks=["snarks"])) == 178  # data root works too
    with pytest.raises(ValueError, match="unknown BBH task"):
        load_bbh(shared_data / "bbh", tasks=["nope"])
    for task in BBH_TASKS:
        prompt = load_bbh_cot_prompt(task, shared_data / "bbh")
        assert "canary" not in prompt.lower() and not prompt.startswith("-")
        assert prompt.count("Q:") == 3 and "Let's think step by step." in prompt


def test_load_dataset_by_name(shared_data):
    assert len(load_dataset_by_name("gsm8k", shared_data)) == 1319
    assert len(load_dataset_by_name("gsm8k", shared_data, split="train")) == 7473
    dev = load_dataset_by_name("gsm8k_dev", shared_data)
    train = load_dataset_by_name("gsm8k_train", shared_data)
    assert len(dev) == 300 and len(train) == 7173 and not {e.id for e in dev} & {e.id for e in train}
    assert len(load_dataset_by_name("bbh/word_sorting", shared_data)) == 250
    assert len(load_dataset_by_name("asdiv", shared_data, split="all")) == 2305
    assert len(load_dataset_by_name("asdiv", shared_data)) == 2305 - 200  # the test part of the OOD split
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset_by_name("mnist", shared_data)


# ---------------------------------------------------------------- the hub path, with a fake hub

def test_hub_rows_are_converted_the_same_way(monkeypatch):
    calls = []
    fake = {
        ("openai/gsm8k", "main", "test"): [{"question": "Q1?", "answer": "a <<1+1=2>>2\n#### 1,002"}],
        ("ChilleD/MultiArith", None, "train"): [{"question": " M?", "final_ans": "7"}],
        ("ChilleD/MultiArith", None, "test"): [{"question": "N?", "final_ans": "8.0"}],
        ("ChilleD/SVAMP", None, "train"): [{"ID": "chal-9", "Body": "B.", "Question": "Q?", "Answer": 2.5}],
        ("ChilleD/SVAMP", None, "test"): [],
        ("EleutherAI/asdiv", None, "validation"): [{"body": "B.", "question": "Q?", "answer": "4 (cats)"}],
        ("lukaemon/bbh", "navigate", "test"): [{"input": "Go?", "target": "Yes"}],
    }

    def load_dataset(hub_id, config=None, split=None):
        calls.append((hub_id, config, split))
        return fake[(hub_id, config, split)]

    import datasets
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert load_gsm8k("test") == [Example("gsm8k/test/0", "Q1?", "1002", "a 2", "gsm8k")]
    assert [e.answer for e in load_multiarith()] == ["7", "8"]
    assert load_svamp()[0] == Example("svamp/chal-9", "B. Q?", "2.5", None, "svamp")
    assert load_asdiv()[0].answer == "4"
    assert load_bbh(tasks=["navigate"])[0] == Example("bbh/navigate/0", "Go?", "Yes", None, "bbh/navigate")
    assert ("openai/gsm8k", "main", "test") in calls


# ---------------------------------------------------------------- malformed files name file and line

def test_broken_jsonl_names_file_and_line(tmp_path):
    good = json.dumps({"question": "q", "answer": "x\n#### 3"})
    (tmp_path / "test.jsonl").write_text(good + "\n" + good + "\n{not json\n")
    with pytest.raises(DataError, match=r"test\.jsonl:3: invalid JSON"):
        load_gsm8k("test", tmp_path)
    (tmp_path / "test.jsonl").write_text(good + "\n" + json.dumps({"question": "q", "answer": "no final"}) + "\n")
    with pytest.raises(DataError, match=r"test\.jsonl:2: .*####"):
        load_gsm8k("test", tmp_path)
    (tmp_path / "test.jsonl").write_text(json.dumps({"answer": "x\n#### 3"}) + "\n")
    with pytest.raises(DataError, match=r"test\.jsonl:1: missing field 'question'"):
        load_gsm8k("test", tmp_path)
    (tmp_path / "test.jsonl").write_text(good + "\n" + json.dumps({"question": "q", "answer": "#### many"}) + "\n")
    with pytest.raises(DataError, match=r"test\.jsonl:2: answer 'many' is not a number"):
        load_gsm8k("test", tmp_path)


def test_broken_json_names_record(tmp_path):
    (tmp_path / "SVAMP.json").write_text(json.dumps([
        {"ID": "a", "Body": "b", "Question": "q", "Answer": 1.0},
        {"ID": "chal-2", "Body": "b", "Answer": 1.0}]))
    with pytest.raises(DataError, match=r"SVAMP\.json: record 1 \(ID chal-2\): missing field 'Question'"):
        load_svamp(tmp_path)
    (tmp_path / "SVAMP.json").write_text(json.dumps([{"ID": "x", "Body": "b", "Question": "q", "Answer": None}]))
    with pytest.raises(DataError, match=r"record 0 \(ID x\): field 'Answer' should be int or float or str"):
        load_svamp(tmp_path)
    (tmp_path / "SVAMP.json").write_text('[{"ID": "a",\n "Body": }]')
    with pytest.raises(DataError, match=r"SVAMP\.json:2: invalid JSON"):
        load_svamp(tmp_path)
    (tmp_path / "MultiArith.json").write_text(json.dumps([
        {"iIndex": 4, "sQuestion": "q", "lSolutions": [1.0, 2.0]}]))
    with pytest.raises(DataError, match=r"MultiArith\.json: record 0 \(iIndex 4\): expected one solution"):
        load_multiarith(tmp_path)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "snarks.json").write_text(json.dumps({"examples": [
        {"input": "i", "target": "(A)"}, {"input": "i"}]}))
    with pytest.raises(DataError, match=r"snarks\.json: example 1: missing field 'target'"):
        load_bbh(tmp_path, tasks=["snarks"])


def test_broken_xml_names_line_or_problem(tmp_path):
    problem = ('<Problem ID="p-{i}"><Body>B.</Body><Question>Q?</Question>'
               '<Answer>{a}</Answer></Problem>')
    (tmp_path / "ASDiv.xml").write_text(
        "<X><ProblemSet>\n" + problem.format(i=1, a="3 (cats)") + "\n<Problem ID='p-2'><Body>\n</ProblemSet></X>")
    with pytest.raises(DataError, match=r"ASDiv\.xml:4: invalid XML"):
        load_asdiv(tmp_path)
    (tmp_path / "ASDiv.xml").write_text(
        "<X>" + problem.format(i=1, a="3 (cats)") + '<Problem ID="p-2"><Body>B.</Body><Answer>1</Answer></Problem></X>')
    with pytest.raises(DataError, match=r"ASDiv\.xml: Problem 1 \(ID p-2\): missing field 'Question'"):
        load_asdiv(tmp_path)
    (tmp_path / "ASDiv.xml").write_text("<X>" + problem.format(i=1, a="3 (cats)") + "</X>")
    assert load_asdiv(tmp_path) == [Example("asdiv/p-1", "B. Q?", "3", None, "asdiv")]


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        loaders.load_multiarith(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"looked for train\.jsonl"):
        load_gsm8k("train", tmp_path)  # a folder without the file


def test_a_limit_on_bbh_keeps_every_task(shared_data):
    """`--limit 300` on BBH (27 tasks listed task by task) used to keep 250 boolean_expressions and 50
    causal_judgement items under the name "bbh"."""
    from collections import Counter

    from specialize.engine.data import first_indices, first_items
    bbh = load_dataset_by_name("bbh", shared_data)
    kept = first_items(bbh, 300)
    per_task = Counter(e.source for e in kept)
    assert len(kept) == 300 and len(per_task) == 27 and set(per_task.values()) <= {11, 12}
    assert [e.id for e in kept] == [e.id for e in bbh if e.id in {k.id for k in kept}]  # file order kept
    assert first_items(bbh, len(bbh) + 5) == bbh and first_items(bbh, None) == bbh
    gsm = load_dataset_by_name("gsm8k", shared_data)
    assert first_indices(gsm, 7) == list(range(7))  # one task: the plain prefix
