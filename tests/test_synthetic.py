"""The synthetic mini-world: determinism, no duplicates across splits, gold CoT correctness, OOD knobs."""
import re

import pytest

from specialize.engine.data import build_target, is_correct, load_dataset_by_name
from specialize.engine.data.synthetic import (
    DEFAULT_SIZES, SPLITS, TEMPLATES_A, TEMPLATES_B, make_splits,
)


@pytest.fixture(scope="module")
def world():
    return make_splits(seed=0)


def test_split_names_and_default_sizes(world):
    assert set(world) == {"train", "dev", "test", "ood_steps", "ood_templates", "ood_numbers",
                          "generic_sort", "generic_count", "generic_bool"} == set(SPLITS)
    assert {k: len(v) for k, v in world.items()} == DEFAULT_SIZES
    for name, examples in world.items():
        assert all(e.source == f"synthetic/{name}" and e.id == f"synthetic/{name}/{i}"
                   for i, e in enumerate(examples))


def test_deterministic_by_seed_and_overridable():
    small = {"train": 50, "dev": 10, "generic_bool": 5}
    a, b = make_splits(seed=3, sizes=small), make_splits(seed=3, sizes=small)
    assert a == b and len(a["train"]) == 50 and len(a["generic_bool"]) == 5 and len(a["test"]) == 200
    assert a["train"] != make_splits(seed=4, sizes=small)["train"]
    with pytest.raises(ValueError, match="unknown synthetic split"):
        make_splits(sizes={"trian": 5})
    with pytest.raises(ValueError, match="non-negative"):
        make_splits(sizes={"train": -1})


def test_no_duplicate_questions_anywhere(world):
    questions = [e.question for examples in world.values() for e in examples]
    assert len(questions) == len(set(questions)) == sum(DEFAULT_SIZES.values())


def test_gold_cot_is_correct_short_and_ends_with_the_answer(world):
    for name, examples in world.items():
        for e in examples:
            assert e.rationale.splitlines()[-1] == f"The answer is {e.answer}.", e
            assert is_correct(e.rationale, e.answer, e.source), e
            assert is_correct(build_target(e, None, "zero_shot_cot"), e.answer, e.source), e
            assert len(e.rationale.split()) <= 60, e
            limit = 40 if name in ("train", "dev", "test", "ood_numbers") or name.startswith("generic") else 55
            assert len(e.question.split()) <= limit, e


def _check_arithmetic(e):
    """Re-run every CoT line "a op b = c." in plain Python and chain the values."""
    lines = e.rationale.splitlines()[:-1]
    value = None
    for line in lines:
        a, op, b, c = re.fullmatch(r"(\d+) ([-+*/]) (\d+) = (\d+)\.", line).groups()
        a, b, c = int(a), int(b), int(c)
        assert value is None or a == value, e
        assert {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op] == c and (op != "/" or a % b == 0), e
        value = c
    assert str(value) == e.answer and value >= 1
    return len(lines), value


def test_ood_splits_move_one_knob(world):
    steps = {name: {_check_arithmetic(e)[0] for e in world[name]} for name in
             ("train", "test", "ood_steps", "ood_templates", "ood_numbers")}
    assert steps["train"] <= {1, 2, 3} and max(steps["train"]) == 3
    assert min(steps["ood_steps"]) > max(steps["train"])
    start = lambda e: int(re.search(r"\d+", e.question).group())  # noqa: E731
    assert max(start(e) for e in world["train"]) <= 20 < min(start(e) for e in world["ood_numbers"])
    # unseen phrasings: every sentence of ood_templates comes from set B, every train/test one from set A
    def frames(templates):
        return [re.compile(re.sub(r"\\\{\w+\\\}", ".+?", re.escape(t)) + "$") for ts in templates.values() for t in ts]

    def sentences(q):
        return re.findall(r"[^.?]+[.?]", q)

    a, b = frames(TEMPLATES_A), frames(TEMPLATES_B)
    for name, own, other in (("train", a, b), ("test", a, b), ("ood_templates", b, a)):
        for e in world[name]:
            for sent in sentences(e.question):
                assert any(f.match(sent.strip()) for f in own), (name, sent)
                assert not any(f.match(sent.strip()) for f in other), (name, sent)


def test_generic_families_are_right(world):
    for e in world["generic_sort"]:
        words = e.question.split(": ", 1)[1].split()
        assert e.answer == " ".join(sorted(words))
    for e in world["generic_count"]:
        letter, phrase = re.fullmatch(r'How many times does the letter "(.)" appear in "(.+)"\?', e.question).groups()
        assert e.answer == str(phrase.count(letter))
    for e in world["generic_bool"]:
        expr = re.fullmatch(r"What is (.+)\?", e.question).group(1)
        assert e.answer == str(eval(expr, {"__builtins__": {}}))  # Python's own evaluation as reference
    assert {e.answer for e in world["generic_bool"]} == {"True", "False"}


def test_load_dataset_by_name_synthetic():
    dev = load_dataset_by_name("synthetic/dev", sizes={"train": 20, "dev": 7})
    assert len(dev) == 7 and dev == make_splits(sizes={"train": 20, "dev": 7})["dev"]
    assert load_dataset_by_name("synthetic/ood_steps") == make_splits()["ood_steps"]
    with pytest.raises(ValueError, match="unknown synthetic split"):
        load_dataset_by_name("synthetic/nope")
