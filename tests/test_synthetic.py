"""The synthetic mini-world: determinism, no duplicates across splits, gold CoT correctness, OOD knobs."""
import re

import pytest

from specialize.engine.data import build_target, is_correct, load_dataset_by_name
from specialize.engine.data.synthetic import (
    DEFAULT_SIZES,
    SPLITS,
    TEMPLATES_A,
    TEMPLATES_B,
    make_splits,
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


_LINE = re.compile(r"(?:So )?(\d+) ([-+*/]) (\d+) = (\d+)\.")


def _check_arithmetic(e):
    """Re-run every CoT line "a op b = c." (or "So a op b = c.") in plain Python: each line is right, uses a
    number of the question or an earlier result, and every earlier result is used by the end (the
    last line's result is the answer)."""
    lines = e.rationale.splitlines()[:-1]
    numbers = [int(n) for n in re.findall(r"\d+", e.question)]
    results, unused = [], []
    for line in lines:
        a, op, b, c = _LINE.fullmatch(line).groups()
        a, b, c = int(a), int(b), int(c)
        assert {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op] == c and (op != "/" or a % b == 0), e
        assert {a, b} & set(results + numbers), e
        unused = [r for r in unused if r not in (a, b)] + [c]
        results.append(c)
    assert str(results[-1]) == e.answer and results[-1] >= 1, e
    assert unused == [results[-1]], e  # no dangling intermediate result
    return len(lines), results[-1]


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
    assert load_dataset_by_name("synthetic/ood_steps", split="all") == make_splits()["ood_steps"]
    with pytest.raises(ValueError, match="unknown synthetic split"):
        load_dataset_by_name("synthetic/nope")


def _question_total(e) -> int:
    """Plain-Python reading of an in-distribution question: each sentence's template applied to the
    amount of the person it names; a "together" question sums both people."""
    amounts: dict[str, int] = {}
    for sent in re.findall(r"[^.?]+[.?]", e.question):
        sent = sent.strip()
        m = re.fullmatch(r"(\w+) (?:has|owns) (\d+) \w+\.", sent)
        if m:
            amounts[m[1]] = int(m[2])
            continue
        for pattern, apply in (
                (r"(\w+) (?:buys|finds) (\d+) more\.", lambda v, n: v + n),
                (r"\w+ gives (\w+) (\d+) more\.", lambda v, n: v + n),
                (r"(\w+) (?:loses|sells) (\d+)\.", lambda v, n: v - n),
                (r"(\w+) gives (\d+) to \w+\.", lambda v, n: v - n),
                (r"Then (\w+) has (\d+) times as many\.", lambda v, n: v * n),
                (r"(\w+) keeps one of (\d+) equal shares\.", lambda v, n: v // n)):
            m = re.fullmatch(pattern, sent)
            if m:
                amounts[m[1]] = apply(amounts[m[1]], int(m[2]))
                break
        else:
            m = re.fullmatch(r"How many \w+ do (\w+) and (\w+) have (?:together|in total)\?", sent)
            if m:
                return amounts[m[1]] + amounts[m[2]]
            m = re.fullmatch(r"How many \w+ does (\w+) have (?:now|in the end)\?", sent)
            assert m, sent
            return amounts[m[1]]
    raise AssertionError(e.question)


def test_answers_follow_from_the_story(world):
    """The gold answer is what the question's sentences say (read independently of the generator)."""
    for name in ("train", "test", "ood_steps", "ood_numbers"):
        for e in world[name]:
            assert str(_question_total(e)) == e.answer, e


def test_the_gold_cot_is_one_of_several_valid_ones(world):
    """Real choice: two-person problems, both operand orders of + and *, both openers; the gold CoT is
    one of the enumerated alternatives, every alternative is a valid CoT, and the draws spread
    over them (not always the first)."""
    from specialize.engine.data.synthetic import Chain, rationale_alternatives, sample_rationale
    chains = (Chain(5, (("add", 3, 8),)), Chain(4, (("mul", 2, 8),)))
    alts = rationale_alternatives(chains)
    # 2 orders x (2 x 2 options per commuting line) x 2 lines x 4 options for the sum (8 + 8: one order)
    assert len(alts) == 2 * 4 * 4 * 2 == len(set(alts))
    assert "4 * 2 = 8.\nSo 3 + 5 = 8.\n8 + 8 = 16.\nThe answer is 16." in alts
    import random
    rng = random.Random(0)
    drawn = [sample_rationale(rng, chains) for _ in range(2000)]
    assert set(drawn) <= set(alts) and len(set(drawn)) > 0.9 * len(alts)
    for text in alts:
        fake = type("E", (), {"rationale": text, "question": "5 3 4 2", "answer": "16"})
        _check_arithmetic(fake)
    together = [e for e in world["train"] if "together" in e.question or "in total" in e.question]
    assert 0.2 < len(together) / len(world["train"]) < 0.4
    openers = {line.startswith("So ") for e in world["train"] for line in e.rationale.splitlines()[:-1]}
    assert openers == {True, False}
