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


def build_sample(text: str, raw_tokens: Sequence[bytes], logprobs: Sequence[Optional[float]],
                 top: Sequence[Sequence[tuple[str, float]]], finish_reason: str, what: str,
                 token_ids: Optional[list[int]] = None) -> Sample:
    """Check that the per-token data covers `text` exactly, then assemble a Sample.
    Raises MalformedResponse naming `what` when it does not."""
    if len(logprobs) != len(raw_tokens) or len(top) != len(raw_tokens):
        raise MalformedResponse(f"{what}: {len(raw_tokens)} tokens but {len(logprobs)} logprobs and "
                                f"{len(top)} top-logprob lists")
    pieces = decoded_pieces(raw_tokens)
    if "".join(pieces) != text:
        raise MalformedResponse(f"{what}: the tokens spell {len(''.join(pieces))} characters, the text has "
                                f"{len(text)} (logprobs missing or shorter than the text)")
    if any(lp is None for lp in logprobs):
        raise MalformedResponse(f"{what}: a token logprob is null")
    # Logprobs are <= 0 by definition; clamp the float noise of a log-softmax (-0.0, 1e-8).
    tops = [[[t, min(0.0, float(lp))] for t, lp in alts] for alts in top]
    return Sample(text=text, tokens=pieces, token_bytes=[list(b) for b in raw_tokens],
                  token_logprobs=[min(0.0, float(lp)) for lp in logprobs],
                  top_logprobs=with_sampled_token(tops, raw_tokens, logprobs),
                  finish_reason=finish_reason, token_ids=token_ids)


def with_sampled_token(tops: list[list[list]], raw_tokens: Sequence[bytes],
                       logprobs: Sequence[float]) -> list[list[list]]:
    """The paper listed the sampled token beside the top-k at every step: at temperature > 0 the
    sampled token is often outside the top-k, and without it the label has no teacher mass. When
    it is missing it is appended after the top-k (k + 1 entries there; the aligner pads every step
    to the widest). Steps without a distribution (top_logprobs = 0) stay empty."""
    for alts, raw, lp in zip(tops, raw_tokens, logprobs):
        name = token_string(bytes(raw))
        if alts and all(t != name for t, _ in alts):
            alts.append([name, min(0.0, float(lp))])
    return tops
