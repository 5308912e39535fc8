"""`openai` backend: any OpenAI-compatible server (OpenAI, vLLM, SGLang) through the official client.

Both APIs parse into the same Sample:
  completions  `logprobs=k`: choice.logprobs.tokens / token_logprobs / top_logprobs (dicts), partial
               UTF-8 characters spelled "bytes:\\xNN" (OpenAI) or U+FFFD (vLLM, SGLang);
  chat         `logprobs=True, top_logprobs=k`: choice.logprobs.content[i].token / bytes / logprob /
               top_logprobs[j].
Servers also send logprobs past the text: the tokens of a stop string they cut from it, and an
end-of-sequence token; `backends.build_sample` matches the tokens to the text (`pieces_for_text`).
The client's own retries are off (max_retries=0): generate.py retries every backend the same way.
The API key is read from the environment variable named by `api_key_env` and kept only in the client.
"""
from __future__ import annotations

import os
from typing import Optional

from .backends import (
    Completion,
    MalformedResponse,
    TeacherBackendError,
    TransientError,
    build_sample,
    token_bytes_from_string,
    token_string,
)

_PARSE_ERRORS = (AttributeError, TypeError, KeyError, IndexError, ValueError)


def _retry_after(response) -> Optional[float]:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (seconds; float accepted)."""
    headers = getattr(response, "headers", None) or {}
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                pass
    return None


def _canonical(tok: str) -> str:
    return token_string(token_bytes_from_string(tok))


class OpenAIBackend:
    name = "openai"

    def __init__(self, model: str, base_url: Optional[str] = None, api: str = "completions",
                 api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0):
        import openai
        if api not in ("completions", "chat"):
            raise ValueError(f"api must be 'completions' or 'chat', got {api!r}")
        if not model:
            raise ValueError("the openai backend needs a model name (--model)")
        key = os.environ.get(api_key_env)
        if not key:
            raise TeacherBackendError(f"environment variable {api_key_env} is not set (it must hold the API key)")
        self.model, self.api, self._openai = model, api, openai
        self.client = openai.AsyncOpenAI(api_key=key, base_url=base_url, timeout=timeout, max_retries=0)

    async def sample(self, prompt: str, n: int, *, temperature: float, max_tokens: int, top_logprobs: int,
                     seed: Optional[int] = None, stop: Optional[list[str]] = None) -> Completion:
        oa = self._openai
        stop = list(stop) if stop else None  # the client sends nothing for None
        try:
            if self.api == "completions":
                resp = await self.client.completions.create(
                    model=self.model, prompt=prompt, n=n, temperature=temperature, max_tokens=max_tokens,
                    logprobs=top_logprobs, seed=seed, stop=stop)
            else:
                extra = {"top_logprobs": top_logprobs} if top_logprobs else {}
                resp = await self.client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": prompt}], n=n,
                    temperature=temperature, max_tokens=max_tokens, logprobs=True, seed=seed, stop=stop, **extra)
        except oa.RateLimitError as e:
            raise TransientError("HTTP 429 rate limited", _retry_after(e.response)) from None
        except oa.APITimeoutError:
            raise TransientError("request timed out") from None
        except oa.APIConnectionError as e:
            raise TransientError(f"connection error: {type(e).__name__}") from None
        except oa.APIResponseValidationError as e:
            raise MalformedResponse(f"response failed validation: {e.message}") from None
        except oa.APIStatusError as e:
            if e.status_code >= 500 or e.status_code in (408, 409):
                raise TransientError(f"HTTP {e.status_code}", _retry_after(e.response)) from None
            raise TeacherBackendError(f"HTTP {e.status_code}: {e.message}") from None
        except ValueError as e:  # a body that is not JSON
            raise MalformedResponse(f"response is not valid JSON: {type(e).__name__}") from None
        try:
            return self._parse(resp, n, top_logprobs)
        except MalformedResponse:
            raise
        except _PARSE_ERRORS as e:
            raise MalformedResponse(f"unexpected response shape ({type(e).__name__}: {e})") from None

    def _parse(self, resp, n: int, top_logprobs: int) -> Completion:
        choices = sorted(resp.choices, key=lambda c: c.index)
        if len(choices) != n:
            raise MalformedResponse(f"asked for {n} choices, got {len(choices)}")
        samples, short = [], 0
        for c in choices:
            what = f"{self.api} choice {c.index}"
            if c.logprobs is None:
                raise MalformedResponse(f"{what}: logprobs missing")
            if self.api == "completions":
                text, lp = c.text, c.logprobs
                if any(t.startswith("token_id:") for t in lp.tokens) and "token_id:" not in text:
                    raise TeacherBackendError(
                        f"{what}: the server spells tokens as ids ('{lp.tokens[0]}'), not as text, so "
                        "they cannot be matched to the text: turn off vLLM's --return-tokens-as-token-ids "
                        "(or the request field return_tokens_as_token_ids)")
                raw = [token_bytes_from_string(t) for t in lp.tokens]
                tops = [[(_canonical(t), v) for t, v in (d or {}).items()] for d in (lp.top_logprobs or [{}] * len(raw))]
                short += sum(len(alts) < top_logprobs for alts in tops)
                logprobs = lp.token_logprobs
            else:
                text = c.message.content or ""
                content = c.logprobs.content or []
                raw = [bytes(t.bytes) if t.bytes is not None else t.token.encode("utf-8") for t in content]
                logprobs = [t.logprob for t in content]
                tops = [[(token_string(bytes(a.bytes)) if a.bytes is not None else _canonical(a.token), a.logprob)
                         for a in (t.top_logprobs or [])] for t in content]
            samples.append(build_sample(text, raw, logprobs, tops, c.finish_reason or "stop", what))
        usage = resp.usage
        completion_tokens = sum(len(s.tokens) for s in samples)
        return Completion(samples=samples, prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                          completion_tokens=int(getattr(usage, "completion_tokens", 0) or completion_tokens),
                          model=resp.model or self.model, short_topk_positions=short)
