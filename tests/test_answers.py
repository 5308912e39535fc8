"""Answer extraction and comparison: hand-picked cases plus the gold-through-extractor properties."""
import json

import pytest

from specialize.engine.data import (
    answers_match,
    build_target,
    extract_answer,
    is_correct,
    load_asdiv,
    load_bbh,
    load_gsm8k,
    load_multiarith,
    load_svamp,
)


@pytest.mark.parametrize("text, expected", [
    ("The answer is 18.", "18"),
    ("She has 1,234 apples. The answer is 1,234.", "1234"),
    ("So 16 - 3 - 4 = 9 and 9 * 2 = 18\n#### 18", "18"),
    ("#### -7", "-7"),
    ("It costs $3.50 each. The answer is $7.", "7"),
    ("The answer is 2.50", "2.5"),
    ("The answer is -3.", "-3"),
    ("The answer is 3/4.", "0.75"),              # exact short decimals win
    ("The answer is 2/3", "2/3"),
    ("The answer is 0.75.", "0.75"),
    ("The answer is 9 (apples).", "9"),
    ("The answer is 25%.", "25"),
    ("He had 5 then 7, and finally 12 left", "12"),        # no marker: the last number
    ("The answer is 12, since 3 * 4 = 12 and not 13.", "12"),  # marker: the number after it
    ("The answer is 4. Then 7 more", "4"),
    ("16-3-4=9", "9"),                                      # binary minus is not a sign
    ("1,2,3", "3"),                                         # not a thousands group
    ("The answer is -(1/3)", "-1/3"),
    ("The answer is 20-5=15.", "15"),                       # a computation: its result, not its first operand
    ("The answer is 2.5 x 4 = 10 dollars.", "10"),
    ("The answer is $15 (= 3 * 5).", "15"),                 # a number first: that number
    ("The answer is 20.\nQ: 3-1=2", "20"),                  # only the answer line counts
    ("no numbers at all", None),
])
def test_extract_number(text, expected):
    assert extract_answer(text, "gsm8k") == expected


@pytest.mark.parametrize("pred, gold, ok", [
    ("18", "18", True), ("18.0", "18", True), ("1,000", "1000", True), ("3/4", "0.75", True),
    ("0.333", "1/3", False), ("0.3333333333", "1/3", True), ("10/3", "3.3333333333333335", True), ("-5", "5", False),
    ("19", "18", False), (None, "18", False), ("abc", "18", False),
])
def test_numeric_match(pred, gold, ok):
    assert answers_match(pred, gold, "svamp") is ok


@pytest.mark.parametrize("dataset, text, expected", [
    ("bbh/date_understanding", "Let's think. So the answer is (B).", "(B)"),
    ("bbh/date_understanding", "... the answer is B.", "(B)"),
    ("bbh/date_understanding", "(A) is wrong; (C) fits.", "(C)"),
    ("bbh/date_understanding", "I think it is fine", None),
    ("bbh/boolean_expressions", "not False = True. So the answer is True.", "True"),
    ("bbh/causal_judgement", "So the answer is No.", "No"),
    ("bbh/sports_understanding", "So the answer is yes.", "Yes"),
    ("bbh/formal_fallacies", "So the answer is invalid.", "invalid"),
    ("bbh/formal_fallacies", "So the answer is valid.", "valid"),
    ("bbh/object_counting", "we have 2 + 3 = 5 items. So the answer is 5.", "5"),
    ("bbh/multistep_arithmetic_two", "So the answer is -50.", "-50"),
    ("bbh/word_sorting", "So the answer is apple banana cherry.", "apple banana cherry"),
    ("bbh/dyck_languages", "So the answer is ] ) >.", "] ) >"),
])
def test_extract_bbh(dataset, text, expected):
    assert extract_answer(text, dataset) == expected


def test_bbh_match_is_case_and_format_tolerant():
    assert is_correct("So the answer is Yes.", "yes", "bbh/sports_understanding")
    assert is_correct("So the answer is apple, banana.", "apple banana", "bbh/word_sorting")
    assert not is_correct("So the answer is banana apple.", "apple banana", "bbh/word_sorting")
    assert is_correct("So the answer is ]).", "] )", "bbh/dyck_languages")
    assert not is_correct("So the answer is (A).", "(B)", "bbh/snarks")
    assert is_correct("So the answer is Monsters, Inc.", "Monsters, Inc", "bbh/movie_recommendation")


def test_gsm8k_gold_through_extractor_is_all_correct(shared_data):
    test = load_gsm8k("test", shared_data / "gsm8k")
    raw = [json.loads(line) for line in open(shared_data / "gsm8k" / "test.jsonl")]
    for fmt in ("zero_shot_cot", "in_context_answer_only"):
        assert sum(is_correct(build_target(e, None, fmt), e.answer, "gsm8k") for e in test) == 1319
    # the untouched solution text ("... <<a*b=c>>c ... #### N") as well
    assert sum(is_correct(r["answer"], e.answer, "gsm8k") for r, e in zip(raw, test)) == 1319
    assert sum(extract_answer(build_target(e, None, "zero_shot_cot"), "gsm8k") == e.answer for e in test) == 1319


def test_bbh_targets_match_themselves(shared_data):
    bbh = load_bbh(shared_data / "bbh")
    for dataset in (None, "bbh"):  # per-task kinds, and the kind guessed from the gold
        assert sum(is_correct(e.answer, e.answer, dataset or e.source) for e in bbh) == 6511
    cot = [f"Let's think step by step. So the answer is {e.answer}." for e in bbh]
    assert sum(is_correct(t, e.answer, e.source) for t, e in zip(cot, bbh)) == 6511
    assert sum(answers_match(extract_answer(t, e.source), e.answer, e.source) for t, e in zip(cot, bbh)) == 6511


def test_other_math_golds_match_themselves(shared_data):
    for name, examples in [("multiarith", load_multiarith(shared_data)), ("svamp", load_svamp(shared_data)),
                           ("asdiv", load_asdiv(shared_data))]:
        texts = [f"The answer is {e.answer}." for e in examples]
        assert all(is_correct(t, e.answer, name) for t, e in zip(texts, examples)), name


def test_synthetic_kinds():
    assert extract_answer("2 + 3 = 5.\nThe answer is 5.", "synthetic") == "5"
    assert is_correct("The answer is bread jewel.", "bread jewel", "synthetic/generic_sort")
    assert is_correct("not False = True.\nThe answer is True.", "True", "synthetic/generic_bool")
    assert not is_correct("The answer is 4.", "3", "synthetic/generic_count")


def test_unknown_dataset_is_an_error():
    with pytest.raises(ValueError, match="unknown dataset"):
        extract_answer("The answer is 3", "mnist")
