"""The four prompt/target formats, exemplar drawing, and the official BBH 3-shot CoT prompt.

Formats (the paper's data formats; the names are used by recipes, teacher and evaluator):
  in_context_answer_only  k exemplars "Q: ..\\nA: The answer is N." then "Q: <question>\\nA:"
  in_context_cot          k exemplars "Q: ..\\nA: <rationale> The answer is N." then "Q: <question>\\nA:"
  zero_shot_cot           "Q: <question>\\nA: Let's think step by step."
  zero_shot_answer_only   "Q: <question>\\nA:"
Targets: CoT formats -> "<rationale> The answer is N."; answer-only formats -> "The answer is N.".
Every CoT target ends in "The answer is N." so `answers.extract_answer` reads model outputs the same way.
"""
from __future__ import annotations

import random
import re
from typing import Optional, Sequence, Union

from .loaders import load_bbh_cot_prompt
from .records import Example

FORMATS = ("in_context_answer_only", "in_context_cot", "zero_shot_cot", "zero_shot_answer_only")
COT_FORMATS = ("in_context_cot", "zero_shot_cot")
IN_CONTEXT_FORMATS = ("in_context_answer_only", "in_context_cot")
ZERO_SHOT_COT_TRIGGER = "Let's think step by step."

_FINAL_LINE = re.compile(r"\s*The answer is [^\n]*\.?\s*$")


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}; known: {', '.join(FORMATS)}")


def _answer_sentence(answer: str) -> str:
    answer = str(answer).strip()
    return f"The answer is {answer}" + ("" if answer.endswith(".") else ".")


def build_target(example_or_rationale: Union[Example, str, None], answer: Optional[str] = None,
                 fmt: str = "zero_shot_cot") -> str:
    """The target text of one example. A rationale that already ends with its own
    "The answer is N." line (the synthetic gold CoT does) is not given a second one."""
    _check_format(fmt)
    if isinstance(example_or_rationale, Example):
        ex = example_or_rationale
        rationale, answer = ex.rationale, ex.answer if answer is None else answer
        who = ex.id
    else:
        rationale, who = example_or_rationale, "the given rationale"
    if answer is None:
        raise ValueError("build_target needs an answer (or an Example)")
    final = _answer_sentence(answer)
    if fmt not in COT_FORMATS:
        return final
    if not rationale or not rationale.strip():
        raise ValueError(f"{who}: format {fmt} needs a rationale, but there is none")
    rationale = _FINAL_LINE.sub("", rationale.strip()).strip()
    return f"{rationale} {final}" if rationale else final


def build_prompt(question: str, fmt: str, exemplars: Sequence[Example] = ()) -> str:
    """The model input for `question`; in-context formats need at least one exemplar."""
    _check_format(fmt)
    query = f"Q: {question.strip()}\nA:"
    if fmt == "zero_shot_cot":
        return f"{query} {ZERO_SHOT_COT_TRIGGER}"
    if fmt == "zero_shot_answer_only":
        return query
    if not exemplars:
        raise ValueError(f"format {fmt} needs exemplars (draw them with draw_exemplars)")
    shots = [f"Q: {ex.question.strip()}\nA: {build_target(ex, None, fmt)}" for ex in exemplars]
    return "\n\n".join(shots + [query])


def draw_exemplars(pool: Sequence[Example], k: int, seed: int,
                   exclude_id: Optional[str] = None) -> list[Example]:
    """k exemplars from `pool` (the train split, never the evaluated one), chosen by seed;
    the item being asked (`exclude_id`) is never its own exemplar."""
    candidates = [ex for ex in pool if ex.id != exclude_id]
    if not 0 <= k <= len(candidates):
        raise ValueError(f"cannot draw {k} exemplars from a pool of {len(candidates)}")
    return random.Random(seed).sample(candidates, k)


# ---------------------------------------------------------------- complexity-based prompt

COMPLEX_TRIGGER = "Let's think step by step"
COMPLEX_SHOTS = 8


def reasoning_steps(example: Example) -> int:
    """Steps of a gold rationale: its non-empty lines (GSM8K writes one computation per line)."""
    return sum(1 for line in (example.rationale or "").splitlines() if line.strip())


def complex_exemplars(pool: Sequence[Example], k: int = COMPLEX_SHOTS,
                      exclude_id: Optional[str] = None) -> list[Example]:
    """The `k` exemplars of `pool` with the most reasoning steps (Fu et al. 2022, complexity-based
    prompting, the teacher prompt of the paper). Ties go to the earlier item of `pool`, so the choice
    is a function of the pool alone; `pool` must already leave out the dev questions (GSM8K train
    minus dev, as every stage loads it) and `exclude_id` (the question being asked) is never chosen.
    Returned most-steps first, the order they appear in the prompt."""
    ranked = sorted((ex for ex in pool if ex.id != exclude_id and ex.rationale),
                    key=lambda ex: -reasoning_steps(ex))  # sorted() is stable: ties keep pool order
    if len(ranked) < k:
        raise ValueError(f"the complex prompt needs {k} exemplars with a rationale, the pool has {len(ranked)}")
    return ranked[:k]


def build_complex_prompt(question: str, exemplars: Sequence[Example]) -> str:
    """The complexity-based prompt's style: "Question: ..." / "Let's think step by step" / one line per
    step / "The answer is N.", exemplars apart by a blank line, the asked question last. The model's
    answer starts on the line after the trigger; the next "\nQuestion:" is a stop sequence."""
    shots = []
    for ex in exemplars:
        steps = [line.strip() for line in (ex.rationale or "").splitlines() if line.strip()]
        shots.append("\n".join([f"Question: {ex.question.strip()}", COMPLEX_TRIGGER, *steps,
                                _answer_sentence(ex.answer)]))
    return "\n\n".join(shots) + f"\n\nQuestion: {question.strip()}\n{COMPLEX_TRIGGER}\n"


def build_bbh_prompt(task: str, question: str, path=None) -> str:
    """The official BBH 3-shot CoT prompt of `task` followed by the question, as in the BBH paper."""
    return f"{load_bbh_cot_prompt(task, path)}\n\nQ: {question.strip()}\nA: {ZERO_SHOT_COT_TRIGGER}"
