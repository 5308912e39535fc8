"""Prompt formats, targets, exemplar drawing and the official BBH prompts."""
import pytest

from specialize.engine.data import (
    FORMATS,
    Example,
    build_bbh_prompt,
    build_prompt,
    build_target,
    draw_exemplars,
    extract_answer,
)

POOL = [Example(f"toy/{i}", f"What is {i} + 1?", str(i + 1), f"{i} + 1 = {i + 1}.", "toy") for i in range(20)]


def test_format_names():
    assert FORMATS == ("in_context_answer_only", "in_context_cot", "zero_shot_cot", "zero_shot_answer_only")


def test_zero_shot_prompts():
    assert build_prompt(" What is 2 + 2? ", "zero_shot_cot") == "Q: What is 2 + 2?\nA: Let's think step by step."
    assert build_prompt("What is 2 + 2?", "zero_shot_answer_only") == "Q: What is 2 + 2?\nA:"


def test_targets():
    ex = POOL[3]
    assert build_target(ex, None, "zero_shot_cot") == "3 + 1 = 4. The answer is 4."
    assert build_target(ex, None, "in_context_cot") == "3 + 1 = 4. The answer is 4."
    assert build_target(ex, None, "zero_shot_answer_only") == "The answer is 4."
    assert build_target("2 + 2 = 4.", "4", "zero_shot_cot") == "2 + 2 = 4. The answer is 4."
    # a rationale that already ends with its answer line (synthetic gold CoT) gets no second one
    assert build_target("2 + 2 = 4.\nThe answer is 4.", "4", "zero_shot_cot") == "2 + 2 = 4. The answer is 4."
    with pytest.raises(ValueError, match="needs a rationale"):
        build_target(Example("x/1", "q", "3"), None, "zero_shot_cot")
    with pytest.raises(ValueError, match="unknown prompt format"):
        build_target(ex, None, "few_shot")
    for fmt in FORMATS:
        assert extract_answer(build_target(ex, None, fmt), "gsm8k") == "4"


def test_in_context_prompts():
    shots = POOL[:2]
    cot = build_prompt("What is 9 + 1?", "in_context_cot", shots)
    assert cot == ("Q: What is 0 + 1?\nA: 0 + 1 = 1. The answer is 1.\n\n"
                   "Q: What is 1 + 1?\nA: 1 + 1 = 2. The answer is 2.\n\n"
                   "Q: What is 9 + 1?\nA:")
    ao = build_prompt("What is 9 + 1?", "in_context_answer_only", shots)
    assert ao == ("Q: What is 0 + 1?\nA: The answer is 1.\n\nQ: What is 1 + 1?\nA: The answer is 2.\n\n"
                  "Q: What is 9 + 1?\nA:")
    with pytest.raises(ValueError, match="needs exemplars"):
        build_prompt("q", "in_context_cot")


def test_draw_exemplars_is_seeded_and_excludes_the_item():
    a = draw_exemplars(POOL, 4, seed=0)
    assert a == draw_exemplars(POOL, 4, seed=0) and len(set(e.id for e in a)) == 4
    assert [e.id for e in draw_exemplars(POOL, 4, seed=1)] != [e.id for e in a]
    for seed in range(30):
        assert "toy/5" not in {e.id for e in draw_exemplars(POOL, 19, seed, exclude_id="toy/5")}
    with pytest.raises(ValueError, match="cannot draw"):
        draw_exemplars(POOL, 20, seed=0, exclude_id="toy/5")


def test_bbh_prompt(shared_data):
    prompt = build_bbh_prompt("boolean_expressions", "True and False is", shared_data / "bbh")
    assert prompt.startswith("Evaluate the result of a random Boolean expression.\n\nQ: ")
    assert prompt.endswith("\n\nQ: True and False is\nA: Let's think step by step.")
    assert "canary" not in prompt and prompt.count("Q:") == 4
