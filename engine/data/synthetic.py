"""The synthetic mini-world: short multi-step arithmetic word problems with gold chain of thought,
plus three generic task families standing in for BIG-Bench Hard.

Small on purpose: a tiny T5 has to learn the in-distribution task on 2 CPU cores in minutes, so
questions stay under ~40 words and CoTs under ~60. The out-of-distribution splits each move one
knob: `ood_steps` (more operations), `ood_templates` (phrasings never seen in train) and
`ood_numbers` (larger numbers), mirroring the paper's in-distribution vs. generalisation split.

Gold CoT: one line per operation, the last line "The answer is N.". The world has real choice, as
natural CoT does: a line may put commuting operands either way round ("3 + 4" or "4 + 3") and open
with "So " or not, and a two-person problem ("How many ... together?") may compute
either person's amount first. The gold CoT is drawn uniformly among these valid alternatives
(`rationale_alternatives`), so a teacher trained on it spreads probability over the valid next
tokens, and its top-k carries information a single sample does not (the point of distribution
matching).
Every split is a pure function of (seed, sizes); no question appears twice in the whole world.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import random
from dataclasses import dataclass
from typing import Callable, Optional

from .records import Example

NAMES = ("Ann", "Ben", "Cara", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivy", "Jack", "Kim", "Leo",
         "Mia", "Ned", "Omar", "Pia", "Ravi", "Sara", "Tom", "Uma", "Vic", "Wen", "Zoe")
ITEMS = ("apples", "pens", "cards", "shells", "books", "stamps", "coins", "eggs", "cups", "kites",
         "beads", "rocks", "toys", "plums", "socks", "hats")

# Template sets: {name}/{other} people, {item} the counted things, {n} the operand.
# Set A (train and in-distribution test): one person's possessions.
TEMPLATES_A = {
    "start": ("{name} has {n} {item}.", "{name} owns {n} {item}."),
    "add": ("{name} buys {n} more.", "{other} gives {name} {n} more.", "{name} finds {n} more."),
    "sub": ("{name} gives {n} to {other}.", "{name} loses {n}.", "{name} sells {n}."),
    "mul": ("Then {name} has {n} times as many.",),
    "div": ("{name} keeps one of {n} equal shares.",),
    "question": ("How many {item} does {name} have now?", "How many {item} does {name} have in the end?"),
    "together": ("How many {item} do {name} and {other} have together?",
                 "How many {item} do {name} and {other} have in total?"),
}
# Set B (ood_templates only): a shared box, phrasings never used by set A.
TEMPLATES_B = {
    "start": ("A box holds {n} {item}.", "There are {n} {item} in a box."),
    "add": ("{name} puts {n} more into the box.", "Later, {n} extra are added."),
    "sub": ("{name} takes {n} out of the box.", "Then {n} are removed."),
    "mul": ("The contents of the box grow {n} times.",),
    "div": ("Only one of {n} equal parts stays in the box.",),
    "question": ("How many {item} are in the box at the end?", "How many {item} does the box hold now?"),
}


@dataclass(frozen=True)
class ArithmeticSpec:
    """One distribution of arithmetic problems."""
    steps: tuple[int, int]          # inclusive range of operations after the starting amount
    start: tuple[int, int]          # starting amount
    operand: tuple[int, int]        # operand of + and -
    factor: tuple[int, int]         # operand of * and /
    cap: int                        # no intermediate value above this
    templates: dict
    together: float = 0.0           # share of two-person problems (needs a "together" template)


# Values stay at or under 20 in train: about 260 distinct "a op b = c" facts, which a sub-million-
# parameter model learns in minutes (with values up to 99, about 2,000 facts, the toy teacher was
# at 42% held-out after 600 steps; up to 20, 72%). ood_numbers goes past that range.
SMALL = dict(start=(2, 9), operand=(1, 6), factor=(2, 2), cap=20, together=0.3)
LARGE = dict(start=(30, 99), operand=(10, 50), factor=(2, 5), cap=999, together=0.3)

ARITHMETIC_SPECS = {
    "train": ArithmeticSpec(steps=(2, 3), templates=TEMPLATES_A, **SMALL),
    "dev": ArithmeticSpec(steps=(2, 3), templates=TEMPLATES_A, **SMALL),
    "test": ArithmeticSpec(steps=(2, 3), templates=TEMPLATES_A, **SMALL),
    "ood_steps": ArithmeticSpec(steps=(4, 5), templates=TEMPLATES_A, **SMALL),
    "ood_templates": ArithmeticSpec(steps=(2, 3), templates=TEMPLATES_B, **SMALL),
    "ood_numbers": ArithmeticSpec(steps=(2, 3), templates=TEMPLATES_A, **LARGE),
}
GENERIC_FAMILIES = ("generic_sort", "generic_count", "generic_bool")
SPLITS = tuple(ARITHMETIC_SPECS) + GENERIC_FAMILIES
# Each OOD split is later cut into a dev part (selection) and a test part, so it holds twice the
# data layer's default dev part (data.ood_dev_size 200).
DEFAULT_SIZES = {"train": 2000, "dev": 200, "test": 200, "ood_steps": 400, "ood_templates": 400,
                 "ood_numbers": 400, "generic_sort": 300, "generic_count": 300, "generic_bool": 300}


def _final(answer) -> str:
    return f"The answer is {answer}."


# ---------------------------------------------------------------- arithmetic word problems

def _step(rng: random.Random, spec: ArithmeticSpec, value: int) -> Optional[tuple[str, int, int]]:
    """One operation applicable to `value` (op, operand, result), or None if none fits."""
    options = []
    lo, hi = spec.operand
    if value + lo <= spec.cap:
        options.append("add")
    if value - lo >= 1:
        options.append("sub")
    if value * spec.factor[0] <= spec.cap:
        options.append("mul")
    divisors = [d for d in range(spec.factor[0], spec.factor[1] + 1) if value % d == 0]
    if divisors:
        options.append("div")
    if not options:
        return None
    op = rng.choice(options)
    if op == "add":
        n = rng.randint(lo, min(hi, spec.cap - value))
        return op, n, value + n
    if op == "sub":
        n = rng.randint(lo, min(hi, value - 1))  # keep something left: a zero ends the story
        return op, n, value - n
    if op == "mul":
        n = rng.randint(spec.factor[0], min(spec.factor[1], spec.cap // value))
        return op, n, value * n
    n = rng.choice(divisors)
    return op, n, value // n


_SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
COMMUTATIVE = ("add", "mul")
# Two ways to open a line. The choice sits before the sum, not between it and its result: "a + b ="
# stays one fact to learn (a verb in that slot, "a + b makes", made the toy teacher learn every fact
# twice and its held-out accuracy fell from 74% to 23%).
OPENERS = ("", "So ")


@dataclass(frozen=True)
class Chain:
    """One person's amount: a start and the operations applied to it, (op, operand, result) each."""
    start: int
    ops: tuple

    @property
    def value(self) -> int:
        return self.ops[-1][2] if self.ops else self.start


def line_options(a: int, op: str, b: int, c: int) -> list[str]:
    """Every valid way to write the CoT line for a op b = c: both operand orders where the operation
    commutes, each with either opener. These are the choice points a trained teacher spreads mass over."""
    orders = [(a, b), (b, a)] if op in COMMUTATIVE and a != b else [(a, b)]
    return [f"{opener}{x} {_SYMBOL[op]} {y} = {c}." for x, y in orders for opener in OPENERS]


def _plan_lines(chains: tuple) -> list[list[list[str]]]:
    """Per chain, the options of each of its lines (a chain's lines keep their order: each uses the
    previous result)."""
    out = []
    for chain in chains:
        value, lines = chain.start, []
        for op, n, new in chain.ops:
            lines.append(line_options(value, op, n, new))
            value = new
        out.append(lines)
    return out


def _total_lines(chains: tuple) -> list[str]:
    return line_options(chains[0].value, "add", chains[1].value, chains[0].value + chains[1].value) \
        if len(chains) == 2 else []


def rationale_alternatives(chains: tuple) -> list[str]:
    """All valid gold rationales of a problem: with two people, either person's amount first; every
    line in any of its `line_options`; then "The answer is N."."""
    per_chain = _plan_lines(chains)
    total = _total_lines(chains)
    final = _final(chains[0].value + chains[1].value if len(chains) == 2 else chains[0].value)
    orders = [per_chain] if len(chains) == 1 else [per_chain, per_chain[::-1]]
    out = []
    for order in orders:
        slots = [opts for lines in order for opts in lines] + ([total] if total else [])
        out += ["\n".join([*choice, final]) for choice in itertools.product(*slots)]
    return list(dict.fromkeys(out))


def sample_rationale(rng: random.Random, chains: tuple) -> str:
    """One of `rationale_alternatives`, drawn choice by choice (order, then each line)."""
    per_chain = _plan_lines(chains)
    if len(chains) == 2 and rng.random() < 0.5:
        per_chain = per_chain[::-1]
    lines = [rng.choice(opts) for chain in per_chain for opts in chain]
    total = _total_lines(chains)
    if total:
        lines.append(rng.choice(total))
    value = chains[0].value + chains[1].value if len(chains) == 2 else chains[0].value
    return "\n".join([*lines, _final(value)])


def _chain(rng: random.Random, spec: ArithmeticSpec, n_ops: int, cap: int) -> Chain:
    value = start = rng.randint(*spec.start)
    ops = []
    for _ in range(n_ops):
        step = _step(rng, dataclasses.replace(spec, cap=cap), value)
        if step is None:
            break
        ops.append(step)
        value = step[2]
    return Chain(start, tuple(ops))


def _sentences(rng: random.Random, templates: dict, chain: Chain, name: str, other: str, item: str,
               alone: bool) -> list[str]:
    """The story of one chain. With two people (alone=False) the templates naming the other person
    are left out: a gift between them would not change the total the question asks for."""
    def pick(kind):
        options = [t for t in templates[kind] if alone or "{other}" not in t]
        return rng.choice(options)
    out = [pick("start").format(name=name, other=other, item=item, n=chain.start)]
    out += [pick(op).format(name=name, other=other, item=item, n=n) for op, n, _ in chain.ops]
    return out


def arithmetic_problem(rng: random.Random, spec: ArithmeticSpec) -> tuple[str, str, str]:
    """(question, rationale ending in "The answer is N.", answer) drawn from `spec`.

    A share `spec.together` of problems follow two people and ask for their total, so the CoT may
    compute either amount first; the gold rationale is one draw from `rationale_alternatives`."""
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    t = spec.templates
    n_ops = rng.randint(*spec.steps)
    if "together" in t and rng.random() < spec.together:
        # n_ops counts the final sum too: the two chains share the remaining operations
        left = rng.randint(0, n_ops - 1)
        chains = (_chain(rng, spec, left, spec.cap // 2), _chain(rng, spec, n_ops - 1 - left, spec.cap // 2))
        sentences = (_sentences(rng, t, chains[0], name, other, item, alone=False)
                     + _sentences(rng, t, chains[1], other, name, item, alone=False)
                     + [rng.choice(t["together"]).format(name=name, other=other, item=item)])
        answer = chains[0].value + chains[1].value
    else:
        chains = (_chain(rng, spec, n_ops, spec.cap),)
        sentences = (_sentences(rng, t, chains[0], name, other, item, alone=True)
                     + [rng.choice(t["question"]).format(name=name, item=item)])
        answer = chains[0].value
    return " ".join(sentences), sample_rationale(rng, chains), str(answer)


# ---------------------------------------------------------------- generic families (BBH stand-ins)

SORT_WORDS = ("apple", "bread", "cloud", "dance", "eagle", "flame", "grape", "house", "igloo", "jelly",
              "kite", "lemon", "mango", "night", "olive", "piano", "queen", "river", "stone", "tiger",
              "umbra", "vivid", "whale", "xenon", "yacht", "zebra", "amber", "brick", "candle", "daisy",
              "ember", "frost", "globe", "honey", "ivory", "jewel", "koala", "lunar", "maple", "noble")
COUNT_WORDS = ("banana", "carrot", "letter", "puppy", "mirror", "pepper", "rabbit", "coffee", "balloon",
               "button", "kitten", "hammer", "bubble", "cherry", "summer", "yellow", "window", "paddle",
               "giraffe", "tomato", "sister", "ladder", "cotton", "garden", "parrot", "pillow", "dinner",
               "assess", "teeth", "needle")


def sort_problem(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(SORT_WORDS, rng.randint(3, 5))
    answer = " ".join(sorted(words))
    question = "Sort these words alphabetically: " + " ".join(words)
    rationale = "First letters: " + ", ".join(w[0] for w in words) + ".\n" + _final(answer)
    return question, rationale, answer


def count_problem(rng: random.Random) -> tuple[str, str, str]:
    phrase = " ".join(rng.sample(COUNT_WORDS, rng.randint(1, 2)))
    letter = rng.choice(sorted(set(phrase.replace(" ", ""))))
    spelled = " ".join(phrase.replace(" ", ""))
    count = phrase.count(letter)
    question = f'How many times does the letter "{letter}" appear in "{phrase}"?'
    # spell the word out, then copy each match: counting a short list is learnable by a tiny model
    rationale = f"{spelled}: {', '.join([letter] * count)}.\n{_final(count)}"
    return question, rationale, str(count)


def _bool_expr(rng: random.Random, leaves: int, lines: list[str]) -> tuple[str, bool]:
    """A random expression with `leaves` literals; appends one evaluation line per operator."""
    if leaves == 1:
        value = rng.random() < 0.5
        text = str(value)
        if rng.random() < 0.35:
            lines.append(f"not {value} = {not value}.")
            text, value = f"not {value}", not value
        return text, value
    left_n = rng.randint(1, leaves - 1)
    left, lv = _bool_expr(rng, left_n, lines)
    right, rv = _bool_expr(rng, leaves - left_n, lines)
    op = rng.choice(("and", "or"))
    value = (lv and rv) if op == "and" else (lv or rv)
    lines.append(f"{lv} {op} {rv} = {value}.")
    # brackets around compound sides, so Python's and-before-or precedence never matters
    wrap = lambda s, n: f"( {s} )" if n > 1 else s  # noqa: E731
    return f"{wrap(left, left_n)} {op} {wrap(right, leaves - left_n)}", value


def bool_problem(rng: random.Random) -> tuple[str, str, str]:
    lines: list[str] = []
    expr, value = _bool_expr(rng, rng.randint(2, 4), lines)
    lines.append(_final(value))
    return f"What is {expr}?", "\n".join(lines), str(value)


GENERIC_MAKERS: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "generic_sort": sort_problem, "generic_count": count_problem, "generic_bool": bool_problem,
}


# ---------------------------------------------------------------- the splits

def make_split(name: str, n: int, seed: int, seen: set) -> list[Example]:
    """`n` new problems of split `name`; questions already in `seen` are redrawn (and `seen` grows)."""
    if name in ARITHMETIC_SPECS:
        spec = ARITHMETIC_SPECS[name]
        draw = lambda rng: arithmetic_problem(rng, spec)  # noqa: E731
    elif name in GENERIC_MAKERS:
        draw = GENERIC_MAKERS[name]
    else:
        raise ValueError(f"unknown synthetic split {name!r}; known: {', '.join(SPLITS)}")
    rng = random.Random(f"specialize-synthetic/{seed}/{name}")  # str seeds are stable across runs
    out = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise RuntimeError(f"synthetic/{name}: only {len(out)} distinct questions after {attempts} draws; "
                               f"ask for fewer than {n}")
        question, rationale, answer = draw(rng)
        if question in seen:
            continue
        seen.add(question)
        out.append(Example(f"synthetic/{name}/{len(out)}", question, answer, rationale, f"synthetic/{name}"))
    return out


@functools.lru_cache(maxsize=8)
def _make_splits(seed: int, sizes: tuple) -> dict:
    seen: set = set()
    return {name: tuple(make_split(name, n, seed, seen)) for name, n in sizes}


def make_splits(seed: int = 0, sizes: Optional[dict] = None) -> dict[str, list[Example]]:
    """All splits of the mini-world: train, dev, test, ood_steps, ood_templates, ood_numbers,
    generic_sort, generic_count, generic_bool. `sizes` overrides DEFAULT_SIZES per split."""
    sizes = dict(sizes or {})
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown synthetic split(s) {sorted(unknown)}; known: {', '.join(SPLITS)}")
    merged = {**DEFAULT_SIZES, **sizes}
    bad = {k: v for k, v in merged.items() if not isinstance(v, int) or v < 0}
    if bad:
        raise ValueError(f"synthetic sizes must be non-negative integers, got {bad}")
    # Fixed generation order (train first): a duplicate is always redrawn in the later split.
    splits = _make_splits(seed, tuple((name, merged[name]) for name in SPLITS))
    return {name: list(examples) for name, examples in splits.items()}
