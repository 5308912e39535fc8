"""Final-answer extraction and comparison, per dataset.

Math datasets (gsm8k, multiarith, asdiv, svamp, synthetic arithmetic) compare numbers: the number after
the last "#### ", else the first number after the last "The answer is" (the result after "=" when
that line starts with a computation: "The answer is 20 - 5 = 15."), else the last number in the text;
commas, signs, "$", decimals and fractions are understood, and comparison has a small tolerance
(SVAMP/MultiArith golds are floats). BBH compares per task kind: option letters "(B)", True/False,
Yes/No, valid/invalid, numbers, word lists (word_sorting) and bracket sequences (dyck_languages).
"""
from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Optional

# A number: optional sign (only where it cannot be a binary minus, i.e. not after a digit, letter
# or ")"), optional "$", thousands groups or plain digits, optional decimals, optional "/denominator".
_NUMBER = re.compile(
    r"(?P<sign>(?<![\w)])[-\u2212])?\(?\$?"
    r"(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)?(?P<frac>\.\d+)?"
    r"(?:\s?/\s?(?P<den>\d+(?:\.\d+)?))?"
)
_ANSWER_IS = re.compile(r"answer is\s*:?", re.I)
# The marker of a final-answer line; the teacher's output is cut after the first line holding it.
ANSWER_IS = _ANSWER_IS
_HASHES = re.compile(r"####")
# An answer line that starts with a computation and gives its result after "=".
_EQUATION = re.compile(r"\s*\$?[\d.,]+\s*[-+*/x\u00d7\u2212]\s*\$?[\d.,(].*=\s*[-\u2212]?\$?\d")

BBH_KINDS = {
    "boolean_expressions": "bool", "causal_judgement": "yesno", "navigate": "yesno",
    "web_of_lies": "yesno", "sports_understanding": "yesno", "formal_fallacies": "valid",
    "multistep_arithmetic_two": "number", "object_counting": "number",
    "word_sorting": "words", "dyck_languages": "dyck",
}  # every other BBH task is multiple choice: "option"

_NON_NUMERIC_SYNTHETIC = {"generic_sort": "words", "generic_bool": "bool"}
_NUMERIC = {"gsm8k", "gsm8k_train", "gsm8k_dev", "multiarith", "asdiv", "svamp"}


def _kind(dataset: str, gold: Optional[str] = None) -> str:
    """The answer kind of `dataset`; for plain "bbh"/"asdiv" the gold's shape decides."""
    if dataset.startswith("bbh/"):
        kind = BBH_KINDS.get(dataset[4:], "option")
        if kind == "option" and gold is not None and not re.fullmatch(r"\([A-Z]\)", gold.strip()):
            return "text"  # three choice-task targets are the option text ("Monsters, Inc")
        return kind
    if dataset == "synthetic":  # the arithmetic world as a whole (recipes say data.dataset: synthetic)
        return "number"
    if dataset.startswith("synthetic/"):
        return _NON_NUMERIC_SYNTHETIC.get(dataset.split("/", 1)[1], "number")
    if dataset == "bbh":
        return _kind_of_gold(gold) if gold is not None else "text"
    if dataset == "asdiv" and gold is not None:
        # ASDiv has a few hundred non-numeric golds (names, times "3:30 p.m.", ratios "5:6", lists).
        return _kind_of_gold(gold)
    if dataset in _NUMERIC:
        return "number"
    raise ValueError(f"unknown dataset {dataset!r} for answer extraction")


def _kind_of_gold(gold: str) -> str:
    g = gold.strip()
    if re.fullmatch(r"\([A-Z]\)", g):
        return "option"
    low = g.lower()
    if low in ("true", "false"):
        return "bool"
    if low in ("yes", "no"):
        return "yesno"
    if low in ("valid", "invalid"):
        return "valid"
    if _parse_number(g) is not None:
        return "number"
    if ";" in g and all(_parse_number(p) is not None for p in g.split(";")):
        return "numbers"
    if g and all(c in "()[]{}<> " for c in g):
        return "dyck"
    return "text"


# ---------------------------------------------------------------- numbers

def _to_fraction(m: re.Match) -> Optional[Fraction]:
    if not (m.group("int") or m.group("frac")):
        return None
    value = Fraction((m.group("int") or "0").replace(",", "") + (m.group("frac") or ""))
    if m.group("den"):
        den = Fraction(m.group("den"))
        if den == 0:
            return None
        value /= den
    return -value if m.group("sign") else value


def _numbers(text: str) -> list[tuple[Fraction, re.Match]]:
    out = []
    for m in _NUMBER.finditer(text):
        v = _to_fraction(m)
        if v is not None:
            out.append((v, m))
    return out


def _parse_number(text: str) -> Optional[Fraction]:
    """`text` as one number ("1,000", "-3.5", "$4", "5/2", "-(1/3)", "25%"), else None."""
    t = text.strip().rstrip(".").replace("(", "").replace(")", "").rstrip("%").strip()
    m = _NUMBER.fullmatch(t)
    return _to_fraction(m) if m else None


def format_number(value: Fraction) -> str:
    """Canonical text: 18, -2.5, 1/3 (fractions without a short decimal form stay fractions)."""
    if value.denominator == 1:
        return str(value.numerator)
    x = float(value)
    if Fraction(repr(x)) == value and len(repr(x)) <= 12:
        return repr(x)
    return f"{value.numerator}/{value.denominator}"


def _extract_number(text: str) -> Optional[str]:
    hashes = list(_HASHES.finditer(text))
    if hashes:
        found = _numbers(text[hashes[-1].end():])
        if found:
            return format_number(found[0][0])
    marks = list(_ANSWER_IS.finditer(text))
    if marks:
        span = text[marks[-1].end():]
        line = span.split("\n", 1)[0]
        if _EQUATION.match(line):  # "The answer is 20 - 5 = 15.": the result, not the first operand
            span = line[line.rindex("=") + 1:]
        found = _numbers(span)
        if found:
            return format_number(found[0][0])
    found = _numbers(text)
    return format_number(found[-1][0]) if found else None


# ---------------------------------------------------------------- BBH free-form and choices

def _answer_span(text: str) -> tuple[str, bool]:
    """The text after the last "answer is" up to the line end (True), else the whole text (False)."""
    marks = list(_ANSWER_IS.finditer(text))
    if marks:
        return text[marks[-1].end():].split("\n", 1)[0].strip(), True
    return text.strip(), False


def _strip_period(s: str) -> str:
    s = s.strip()
    return s[:-1].rstrip() if s.endswith(".") else s


def _pick(text: str, pattern: str, fix) -> Optional[str]:
    span, marked = _answer_span(text)
    hits = re.findall(pattern, span if marked else text, re.I)
    if not hits:
        return None
    return fix(hits[0] if marked else hits[-1])


def _extract_kind(text: str, kind: str) -> Optional[str]:
    if kind in ("number",):
        return _extract_number(text)
    if kind == "option":
        span, marked = _answer_span(text)
        letters = re.findall(r"\(([A-Z])\)", span if marked else text)
        if letters:
            return f"({letters[0] if marked else letters[-1]})"
        bare = re.match(r"([A-Z])(?![\w'])", span) if marked else None
        if bare:
            return f"({bare.group(1)})"
        # a few choice-task golds are the option text itself ("Monsters, Inc"): keep the span
        return (_strip_period(span) or None) if marked else None
    if kind == "bool":
        return _pick(text, r"\b(true|false)\b", str.capitalize)
    if kind == "yesno":
        return _pick(text, r"\b(yes|no)\b", str.capitalize)
    if kind == "valid":
        return _pick(text, r"\b(invalid|valid)\b", str.lower)
    span, marked = _answer_span(text)
    if not marked:
        span = span.strip().splitlines()[-1] if span.strip() else ""
    span = _strip_period(span)
    if kind == "dyck":
        return " ".join(c for c in span if c in "()[]{}<>") or None
    if kind == "numbers":
        nums = [format_number(v) for v, _ in _numbers(span)]
        return "; ".join(nums) or None
    return span or None  # words / text


def extract_answer(text: str, dataset: str) -> Optional[str]:
    """The final answer in a model output (or a gold target), normalised; None when there is none."""
    if text is None:
        return None
    return _extract_kind(text, _kind(dataset))


def _norm_text(s: str) -> str:
    return re.sub(r"\s+", " ", _strip_period(s).replace(",", " ")).strip().lower()


def answers_match(pred: Optional[str], gold: str, dataset: str) -> bool:
    """Whether an extracted prediction equals the gold answer (numbers: relative tolerance 1e-6)."""
    if pred is None:
        return False
    kind = _kind(dataset, gold)
    if kind == "number":
        p, g = _parse_number(pred), _parse_number(gold)
        if p is None or g is None:
            return False
        return math.isclose(float(p), float(g), rel_tol=1e-6, abs_tol=1e-9)
    if kind == "numbers":
        ps = [_parse_number(x) for x in re.split(r"[;,]| and ", pred)]
        gs = [_parse_number(x) for x in gold.split(";")]
        return None not in ps and len(ps) == len(gs) and all(
            math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9) for a, b in zip(ps, gs))
    if kind == "dyck":
        return pred.replace(" ", "") == gold.replace(" ", "")
    if kind == "option":
        return _extract_kind(pred, "option") == gold.strip()
    return _norm_text(pred) == _norm_text(gold)


def is_correct(text: str, gold: str, dataset: str) -> bool:
    """extract_answer then answers_match; the gold decides the kind where the dataset mixes kinds."""
    if text is None:
        return False
    return answers_match(_extract_kind(text, _kind(dataset, gold)), gold, dataset)
