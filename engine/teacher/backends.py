"""What every teacher backend returns, the errors that drive retries, and token-string helpers.

A backend is any object with
    async def sample(self, prompt: str, n: int, *, temperature: float, max_tokens: int,
                     top_logprobs: int, seed: int | None = None, stop: list[str] | None = None) -> Completion
`stop`: strings that end a sample (OpenAI's `stop`); a local backend stops the row once its text holds one.
It raises `TransientError` for what a retry may fix (429, 5xx, timeouts) and `MalformedResponse`
for an answer that cannot be parsed into samples (retried too, then reported as a failure).
"""
from __future__ import annotations

import codecs
import math
import re
from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence


class TeacherBackendError(RuntimeError):
    """A request failed for good (bad request, authentication, ...): not retried."""


class TransientError(RuntimeError):
    """Worth retrying; `retry_after` (seconds) when the server said how long to wait."""

    def __init__(self, message: str, retry_after: Optional[float] = None):
        super().__init__(message)
        self.retry_after = retry_after


class MalformedResponse(RuntimeError):
    """The response arrived but is not usable (bad JSON, logprobs missing or not covering the text)."""


@dataclass
class Sample:
    text: str
    tokens: list[str]                       # decoded pieces; "".join(tokens) == text
    token_bytes: list[list[int]]            # each token's raw bytes
    token_logprobs: list[float]
    top_logprobs: list[list[list]]          # per token [[token_str, logprob], ...], best first
    finish_reason: str
    token_ids: Optional[list[int]] = None   # only local backends know them; not written to records


@dataclass
class Completion:
    samples: list[Sample]
    prompt_tokens: int
    completion_tokens: int
    model: str
    extra: dict = field(default_factory=dict)
    # positions whose top-k came with fewer entries than asked for (before the sampled token is added):
    # a completions server keys top-k by token text, so tokens spelled alike merge into one entry
    short_topk_positions: int = 0


class Backend(Protocol):
    name: str

    async def sample(self, prompt: str, n: int, *, temperature: float, max_tokens: int, top_logprobs: int,
                     seed: Optional[int] = None, stop: Optional[list[str]] = None) -> Completion: ...


def token_string(raw: bytes) -> str:
    """A single token's bytes as a string: the UTF-8 text when valid, else OpenAI's
    "bytes:\\xNN..." spelling (a piece of a multi-byte character)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def token_bytes_from_string(tok: str) -> bytes:
    """Inverse of `token_string` (the completions API writes partial characters as "bytes:\\xNN")."""
    if tok.startswith("bytes:"):
        body = tok[len("bytes:"):]
        try:
            return codecs.escape_decode(body.encode("latin-1"))[0]
        except (ValueError, UnicodeEncodeError):
            return tok.encode("utf-8")
    return tok.encode("utf-8")


def decoded_pieces(token_bytes: Sequence[bytes]) -> list[str]:
    """Each token's share of the decoded text: an incremental UTF-8 decoder, so a character split
    over two tokens belongs to the token that completes it, and the pieces concatenate to the text."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = [decoder.decode(b) for b in token_bytes]
    if pieces:
        pieces[-1] += decoder.decode(b"", final=True)
    return pieces


REPLACEMENT = "\ufffd"
# A zero probability: JSON has no -Infinity (the aligner's reader refuses it); vLLM sends this value.
ZERO_LOGPROB = -9999.0


def pieces_for_text(text: str, pieces: Sequence[str]) -> Optional[list[str]]:
    """Each leading token's share of `text` when the server's token strings do not spell it
    exactly, or None when they cannot be matched to it. Real servers' tokens differ from the text
    in two ways, and this undoes both:
    - tokens past the text: vLLM, SGLang and TensorRT-LLM cut a stop string out of the text but keep
      the logprobs of every token they generated, and vLLM adds the end-of-sequence token ("</s>",
      "<|im_end|>") to the logprobs but not to the text. The pieces returned stop where the text
      ends; when it ends inside a token, that token, which starts the stop string, goes too (the
      rule of `truncate.cut_sample`), so the pieces may spell a prefix of `text`.
    - a character split over tokens: servers that decode each token on its own write each part as
      U+FFFD. A run of such tokens spells the text up to where the next token matches it, and the
      token that completes the run gets those characters, as `decoded_pieces` would give them."""
    out: list[str] = []
    pos, i = 0, 0
    while i < len(pieces) and pos < len(text):
        piece = pieces[i]
        if REPLACEMENT in piece:  # U+FFFD here may stand for more or fewer characters of the text
            j = i
            while j < len(pieces) and REPLACEMENT in pieces[j]:
                j += 1
            run = _spell_replacement_run(text, pos, pieces[i:j], pieces[j] if j < len(pieces) else None)
            if run is None:
                return None
            out += run
            pos += sum(map(len, run))
            i = j
        elif text.startswith(piece, pos):
            out.append(piece)
            pos += len(piece)
            i += 1
        elif text.startswith(piece[:len(text) - pos], pos):
            return out  # the text ends inside this token
        else:
            return None
    return out if pos == len(text) else None


def _spell_replacement_run(text: str, pos: int, run: Sequence[str], following: Optional[str]) -> Optional[list[str]]:
    """`run`'s share of text[pos:]: its literal characters as they are, each stretch of U+FFFD
    (across token boundaries too) any non-ASCII characters, ending where `following` (or the text)
    begins."""
    atoms = []  # (token index, literal or None for a stretch of U+FFFD)
    for k, piece in enumerate(run):
        for part in re.split(f"({REPLACEMENT}+)", piece):
            if part:
                atoms.append((k, None if part[0] == REPLACEMENT else part))
    # a stretch that goes on into the next token is spelled by the token where it ends
    ends = [lit is None and (n + 1 == len(atoms) or atoms[n + 1][1] is not None) for n, (_, lit) in enumerate(atoms)]
    pattern = ""
    for (k, lit), end in zip(atoms, ends):
        if lit is not None:
            pattern += re.escape(lit)
        elif end:
            pattern += "([^\\x00-\\x7f]*?)"  # part of a character is never ASCII
    ahead = [r"\Z"] + ([re.escape(following)] if following else [])
    ahead += [re.escape(following[:m]) + r"\Z" for m in range(1, len(following or ""))]
    m = re.compile(f"{pattern}(?={'|'.join(ahead)})", re.DOTALL).match(text, pos)
    if m is None:
        return None
    spelled = ["" for _ in run]
    groups = iter(m.groups())
    for (k, lit), end in zip(atoms, ends):
        if lit is not None:
            spelled[k] += lit
        elif end:
            spelled[k] += next(groups)
    return spelled


def _logprob(value, what: str) -> float:
    """A logprob as stored: <= 0 (the float noise of a log-softmax, -0.0 or 1e-8, clamped), -inf as
    ZERO_LOGPROB; NaN and +inf are a broken response."""
    value = float(value)
    if math.isnan(value) or value == math.inf:
        raise MalformedResponse(f"{what}: a logprob is {value}")
    return max(ZERO_LOGPROB, min(0.0, value))


def build_sample(text: str, raw_tokens: Sequence[bytes], logprobs: Sequence[Optional[float]],
                 top: Sequence[Sequence[tuple[str, float]]], finish_reason: str, what: str,
                 token_ids: Optional[list[int]] = None) -> Sample:
    """Check that the per-token data covers `text` (`pieces_for_text` matches what servers send
    past it or spell with U+FFFD), then assemble a Sample, each step's top-k best first (servers
    differ: vLLM's chat lists the sampled token first). Raises MalformedResponse naming `what` when
    the data does not cover the text."""
    if len(logprobs) != len(raw_tokens) or len(top) != len(raw_tokens):
        raise MalformedResponse(f"{what}: {len(raw_tokens)} tokens but {len(logprobs)} logprobs and "
                                f"{len(top)} top-logprob lists")
    decoded = decoded_pieces(raw_tokens)
    pieces = decoded if "".join(decoded) == text else pieces_for_text(text, decoded)
    if pieces is None:
        spelled = "".join(decoded)
        at = next((k for k, (a, b) in enumerate(zip(spelled, text)) if a != b), min(len(spelled), len(text)))
        raise MalformedResponse(f"{what}: the tokens spell {len(spelled)} characters, the text has {len(text)}, "
                                f"and they differ from character {at} on ({spelled[at:at + 12]!r} vs "
                                f"{text[at:at + 12]!r}): logprobs missing or not for this text")
    n = len(pieces)
    if any(lp is None for lp in logprobs[:n]):
        raise MalformedResponse(f"{what}: a token logprob is null")
    # A token whose piece was re-spelled from the text keeps those characters' bytes as its own.
    token_bytes = [list(raw) if piece == own else list(piece.encode("utf-8"))
                   for raw, own, piece in zip(raw_tokens, decoded, pieces)]
    lps = [_logprob(lp, what) for lp in logprobs[:n]]
    tops = [sorted(([t, _logprob(lp, what)] for t, lp in alts), key=lambda alt: -alt[1]) for alts in top[:n]]
    return Sample(text="".join(pieces), tokens=pieces, token_bytes=token_bytes, token_logprobs=lps,
                  top_logprobs=with_sampled_token(tops, raw_tokens[:n], lps),
                  finish_reason=finish_reason, token_ids=token_ids[:n] if token_ids is not None else None)


def with_sampled_token(tops: list[list[list]], raw_tokens: Sequence[bytes],
                       logprobs: Sequence[float]) -> list[list[list]]:
    """The paper listed the sampled token beside the top-k at every step: at temperature > 0 the
    sampled token is often outside the top-k, and without it the label has no teacher mass. When
    it is missing it is appended after the top-k (k + 1 entries there; the aligner pads every step
    to the widest). Steps without a distribution (top_logprobs = 0) stay empty."""
    for alts, raw, lp in zip(tops, raw_tokens, logprobs):
        name = token_string(bytes(raw))
        if alts and all(t != name for t, _ in alts):
            alts.append([name, lp])
    return tops
