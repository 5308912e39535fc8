"""teacher.prompt complex: the 8 GSM8K train exemplars with the most reasoning steps (lines of the
gold rationale), dev questions excluded, ties by file order, in the "Question: ... Let's think step
by step" style, and the teacher really sends it."""
import json

import pytest

from specialize.engine.data import load_dataset_by_name
from specialize.engine.data.prompts import build_complex_prompt, complex_exemplars, reasoning_steps
from specialize.engine.teacher import build_prompts

DATA = "/work/shared/data"


@pytest.fixture(scope="module")
def gsm8k():
    train = load_dataset_by_name("gsm8k_train", DATA, dev_size=300, seed=42)
    dev = load_dataset_by_name("gsm8k_dev", DATA, dev_size=300, seed=42)
    full = load_dataset_by_name("gsm8k", DATA, split="train")
    return train, dev, full


def test_selection_rule_on_gsm8k_train(gsm8k):
    train, dev, _ = gsm8k
    chosen = complex_exemplars(train)
    # a naive twin from the raw file: steps = non-empty solution lines before "####"; the most steps
    # first, ties by line number; dev questions and nothing else left out
    dev_ids = {e.id for e in dev}
    rows = []
    with open(f"{DATA}/gsm8k/train.jsonl") as fh:
        for i, line in enumerate(fh):
            qid = f"gsm8k/train/{i}"
            if qid not in dev_ids:
                sol = json.loads(line)["answer"].split("####")[0]
                rows.append((-sum(1 for s in sol.splitlines() if s.strip()), i, qid))
    expected = [qid for _, _, qid in sorted(rows)[:8]]
    assert [e.id for e in chosen] == expected
    assert not dev_ids & set(expected)
    steps = [reasoning_steps(e) for e in chosen]
    assert steps == sorted(steps, reverse=True) and steps[-1] > 8  # the hardest GSM8K items, many steps
    # deterministic, and the asked question is never among its own exemplars
    assert [e.id for e in complex_exemplars(train)] == expected
    other = complex_exemplars(train, exclude_id=chosen[0].id)
    assert chosen[0].id not in {e.id for e in other} and [e.id for e in other] == [q for _, _, q in sorted(rows)[1:9]]


def test_prompt_style_and_the_teacher_prompts(gsm8k):
    train, _, _ = gsm8k
    chosen = complex_exemplars(train)
    text = build_complex_prompt("How many?", chosen)
    assert text.count("Question: ") == 9 and text.count("Let's think step by step\n") == 9
    assert text.endswith("\n\nQuestion: How many?\nLet's think step by step\n")
    first = text.split("\n\n")[0].splitlines()
    assert first[0] == f"Question: {chosen[0].question}" and first[-1] == f"The answer is {chosen[0].answer}."
    assert len(first) == reasoning_steps(chosen[0]) + 3
    asked = [train[5], chosen[2]]
    prompts = build_prompts(asked, "in_context_cot", 8, train, seed=0, prompt="complex")
    assert prompts[0] == build_complex_prompt(train[5].question, chosen)
    # an exemplar asked as a question is never its own exemplar
    assert prompts[1].count(chosen[2].question) == 1
    with pytest.raises(ValueError, match="in_context_cot"):
        build_prompts(asked, "zero_shot_cot", 8, train, prompt="complex")
