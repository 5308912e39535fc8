"""Cut a teacher sample at the end of its first answer line (the paper's rule), text and per-token
data together.

A completions model given a few-shot prompt keeps writing after "The answer is 72.": it starts the
next "Q: ..." exemplar and often answers it too. Stop sequences end most of that at the server,
but not all (a server may ignore them, the continuation may use another marker), and the answer
filter reads the *last* "answer is", so whatever follows the first answer line must go. The cut
point is the earliest of: the end of the first line that holds "answer is", the start of the first
stop sequence. At an answer line the token that reaches the line end is kept (it may carry a few
characters past it, e.g. "4.\\n": dropping it would lose the answer); at a stop sequence the token
that starts it is dropped. So text, tokens, token bytes, logprobs and top-k stay one per token and
`"".join(tokens) == text` still holds.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from specialize.engine.data.answers import ANSWER_IS

from .backends import Sample

# What ends a response in the prompt styles the teacher writes: our "Q: ...\nA:" formats and the
# complexity-based prompt's "Question: ..." exemplars (see engine/data/prompts.py).
DEFAULT_STOP = ("\nQ:", "\nQuestion:")


def resolve_stop(stop: Optional[Sequence[str]]) -> list[str]:
    """The stop sequences sent to the server: the recipe's list, or DEFAULT_STOP when it gives none
    (an empty list sends none). OpenAI accepts at most four."""
    found = list(DEFAULT_STOP if stop is None else stop)
    if len(found) > 4:
        raise ValueError(f"teacher.stop: at most 4 stop sequences (the OpenAI API limit), got {len(found)}")
    if any(not isinstance(s, str) or not s for s in found):
        raise ValueError(f"teacher.stop: every stop sequence must be a non-empty string, got {found!r}")
    return found


def cut_point(text: str, stop: Sequence[str] = ()) -> tuple[Optional[int], Optional[str]]:
    """(character index where the sample ends, why) or (None, None) when nothing follows."""
    best, why = None, None
    m = ANSWER_IS.search(text)
    if m:
        nl = text.find("\n", m.end())
        if nl >= 0:
            best, why = nl, "answer_line"
    for s in stop:
        at = text.find(s)
        if at >= 0 and (best is None or at < best):
            best, why = at, "stop_sequence"
    return best, why


def cut_sample(sample: Sample, stop: Sequence[str] = ()) -> tuple[Sample, Optional[dict]]:
    """The sample cut after its first answer line (or before a stop sequence), and the cut as a
    record field: {"reason", "kept_tokens", "dropped_tokens", "dropped_chars"}; None when nothing
    was dropped."""
    end, why = cut_point(sample.text, stop)
    if end is None:
        return sample, None
    n, length = 0, 0
    while n < len(sample.tokens) and length < end:
        length += len(sample.tokens[n])
        n += 1
    if why == "stop_sequence" and length > end:
        n -= 1  # the token that starts the stop string goes with it (the server would not send it)
    if n >= len(sample.tokens):
        return sample, None  # the token that reaches the cut is the last one: nothing to drop
    kept = dataclasses.replace(
        sample, text="".join(sample.tokens[:n]), tokens=sample.tokens[:n], token_bytes=sample.token_bytes[:n],
        token_logprobs=sample.token_logprobs[:n], top_logprobs=sample.top_logprobs[:n],
        token_ids=sample.token_ids[:n] if sample.token_ids is not None else None)
    return kept, {"reason": why, "kept_tokens": n, "dropped_tokens": len(sample.tokens) - n,
                  "dropped_chars": len(sample.text) - len(kept.text)}
