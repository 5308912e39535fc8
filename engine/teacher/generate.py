"""`generate`: sample CoT solutions with per-token top-k logprobs for every question, resumably.

Work unit: one request = one prompt and up to `samples_per_request` sample indices. The key of a
sample is (qid, sample_index); on start the store reports which keys exist, and only the missing
indices are asked for, so a rerun after any crash completes the set without duplicates.
Requests run on `concurrency` asyncio workers behind the rate limiter; transient errors and
malformed responses are retried with backoff, and what stays broken goes to failures.jsonl
(a rerun retries it, since its keys are still missing).
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import time
from typing import Iterator, Optional, Sequence

from tqdm.auto import tqdm

from specialize.engine.io_helpers import stable_int

from .backends import MalformedResponse, TeacherBackendError, TransientError
from .ratelimit import RateLimiter, backoff_delay
from .records import ShardStore, add_usage
from .truncate import cut_sample, resolve_stop

# Settings that change what a sample is; the rest (concurrency, limits, timeouts, sample count,
# question limit) can differ between a run and its resume.
HASHED_FIELDS = ("backend", "model", "api", "dataset", "split", "temperature", "max_tokens", "top_logprobs",
                 "logprobs", "format", "shots", "prompt", "stop", "cut_at_answer")


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def _stable_int(*parts) -> int:
    return stable_int(*parts, sep="\x1f", byteorder="big")  # the request seeds teacher folders were made with


def build_prompts(examples: Sequence, fmt: str, shots: int, pool: Sequence, seed: int = 0,
                  prompt: str = "seeded", prefix: Optional[str] = None) -> list[str]:
    """One prompt per example. In-context formats use one fixed k-shot set (the paper's single prompt
    for all questions): drawn from `pool` by `seed` (prompt "seeded"), or the `shots` exemplars of
    `pool` with the most reasoning steps in the complexity-based style (prompt "complex",
    in_context_cot only). A question that is itself one of those exemplars gets its own set with it
    excluded, so no prompt ever contains its own question. Prompt "file": `prefix` (a prompt file's
    text) and each question in the paper's "\nQuestion: <q>\nLet's think step by step"."""
    from specialize.engine.data import build_prompt, draw_exemplars
    from specialize.engine.data.prompts import COMPLEX_TRIGGER, IN_CONTEXT_FORMATS, build_complex_prompt, complex_exemplars
    if prompt not in ("seeded", "complex", "file"):
        raise ValueError(f"teacher.prompt must be 'seeded', 'complex' or 'file', got {prompt!r}")
    if prompt == "file":
        if fmt != "in_context_cot" or prefix is None:
            raise ValueError(f"teacher.prompt file is a chain-of-thought few-shot prompt: it needs teacher.format "
                             f"in_context_cot (got {fmt!r}) and teacher.prompt_file")
        return [f"{prefix}\nQuestion: {ex.question.strip()}\n{COMPLEX_TRIGGER}" for ex in examples]
    if prompt == "complex":
        if fmt != "in_context_cot":
            raise ValueError(f"teacher.prompt complex is a chain-of-thought few-shot prompt: it needs "
                             f"teacher.format in_context_cot, got {fmt!r}")
        pick = lambda exclude=None: complex_exemplars(pool, shots, exclude_id=exclude)  # noqa: E731
        render = build_complex_prompt
    elif fmt in IN_CONTEXT_FORMATS:
        pick = lambda exclude=None: draw_exemplars(pool, shots, seed, exclude_id=exclude)  # noqa: E731
        render = lambda question, shots_: build_prompt(question, fmt, shots_)  # noqa: E731
    else:
        return [build_prompt(ex.question, fmt) for ex in examples]
    fixed = pick()
    fixed_ids = {e.id for e in fixed}
    return [render(ex.question, fixed if ex.id not in fixed_ids else pick(ex.id)) for ex in examples]


def make_backend(cfg):
    if cfg.backend == "hf":
        if not cfg.model:
            raise ValueError("the hf backend needs teacher.model (a local model folder or hub id)")
        if cfg.replicas > 1:
            from .hf_replicas import ReplicatedHFBackend
            return ReplicatedHFBackend(cfg.model, cfg.replicas, logprobs=cfg.logprobs)
        from .hf_backend import HFBackend
        return HFBackend.from_pretrained(cfg.model, logprobs=cfg.logprobs)
    if cfg.backend == "openai":
        from .openai_backend import OpenAIBackend
        return OpenAIBackend(cfg.model, base_url=cfg.base_url, api=cfg.api, api_key_env=cfg.api_key_env,
                             timeout=cfg.timeout)
    raise ValueError(f"unknown teacher backend {cfg.backend!r} (openai or hf)")


def hashed_settings(cfg, backend=None) -> dict:
    d = {k: getattr(cfg, k) for k in HASHED_FIELDS}
    if backend is not None and not d["model"]:
        d["model"] = getattr(backend, "model_name", None) or getattr(backend, "model", None)
    if d["backend"] != "openai":
        d["api"] = None  # only the openai backend has two APIs
    d["stop"] = resolve_stop(cfg.stop)  # what is really sent, so None and its expansion hash alike
    if cfg.prompt == "file":
        from specialize.engine.config import prompt_file_sha256
        d["prompt_file_sha256"] = prompt_file_sha256(cfg.prompt_file)
    return d


class _Redactor:
    def __init__(self, env_name: str):
        self.secret = os.environ.get(env_name) or None

    def __call__(self, text: str) -> str:
        return text.replace(self.secret, "***") if self.secret else text


def generate(config, examples: Sequence, out_dir: str, backend=None, *, exemplar_pool: Optional[Sequence] = None,
             samples_per_request: Optional[int] = None, retry_base_delay: float = 1.0, seed: int = 0,
             progress: bool = True) -> dict:
    """Sample `config.samples` CoT solutions for each example into `out_dir` (see records.py);
    `backend` defaults to the one `config` names. Returns a summary (written, stored, expected,
    failures, tokens, cost). Rerunning completes an interrupted run; another configuration is refused."""
    cfg = config
    if backend is None:
        backend = make_backend(cfg)
        close = getattr(backend, "close", None)  # replica processes
        try:
            summary = generate(cfg, examples, out_dir, backend, exemplar_pool=exemplar_pool,
                               samples_per_request=samples_per_request, retry_base_delay=retry_base_delay,
                               seed=seed, progress=progress)
        except BaseException:
            if close is not None:
                close(abort=True)  # a running batch's samples are lost either way: do not wait for it
            raise
        if close is not None:
            close()
        return summary
    made = getattr(backend, "logprobs", cfg.logprobs)  # a local backend knows which logprobs it computes
    if made != cfg.logprobs:
        raise ValueError(f"teacher.logprobs is {cfg.logprobs!r} but the backend computes {made!r} logprobs")
    settings = hashed_settings(cfg, backend)
    if cfg.format.startswith("in_context") and cfg.shots and cfg.prompt == "seeded":
        settings["exemplar_seed"] = seed  # it picks the exemplars, so the prompts: part of what a folder holds
    store = ShardStore(out_dir, settings)
    pool = list(exemplar_pool) if exemplar_pool is not None else list(examples)
    prefix = None
    if cfg.prompt == "file":
        from specialize.engine.config import read_prompt_file
        prefix = read_prompt_file(cfg.prompt_file)
        # a question the file works through as an exemplar would be answered by copying it
        inside = [ex for ex in examples if ex.question.strip() in prefix]
        if inside:
            print(f"teacher: {len(inside)} question(s) are exemplars of {cfg.prompt_file} and are not asked "
                  f"({', '.join(ex.id for ex in inside[:8])})", flush=True)
            examples = [ex for ex in examples if ex.question.strip() not in prefix]
    prompts = build_prompts(examples, cfg.format, cfg.shots, pool, seed, prompt=cfg.prompt, prefix=prefix)
    per_request = max(1, samples_per_request or cfg.samples)
    todo = []
    for ex, prompt in zip(examples, prompts):
        missing = [i for i in range(cfg.samples) if (ex.id, i) not in store.done]
        for start in range(0, len(missing), per_request):
            todo.append((ex, prompt, missing[start:start + per_request]))
    expected = len(examples) * cfg.samples
    started = time.time()
    # Owned here, not by _run: a run that stops on an error or Ctrl-C has still paid for its requests,
    # so the ledger records them (a SIGKILL leaves no chance; the provider's own bill is the reference).
    stats = {"requests": 0, "retries": 0, "samples": 0, "failures": 0, "prompt_tokens": 0, "completion_tokens": 0,
             "topk_positions": 0, "short_topk_positions": 0}
    ended = False
    try:
        asyncio.run(_run(cfg, backend, store, todo, retry_base_delay, progress, stats))
        ended = True
    finally:
        store.close()
        stats["seconds"] = round(time.time() - started, 2)
        stats["cost_usd"] = _cost(cfg, stats["prompt_tokens"], stats["completion_tokens"])
        total = add_usage(out_dir, {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), **stats,
                                    **({} if ended else {"interrupted": True})})
    stored = sum(1 for ex in examples for i in range(cfg.samples) if (ex.id, i) in store.done)
    summary = {**stats, "stored": stored, "expected": expected, "torn_bytes_dropped": store.torn_bytes,
               "ledger_total": total}
    _print_ledger(summary, out_dir)
    return summary


def _cost(cfg, prompt_tokens: int, completion_tokens: int) -> Optional[float]:
    if cfg.price_prompt_per_1k is None and cfg.price_completion_per_1k is None:
        return None
    return round((cfg.price_prompt_per_1k or 0.0) * prompt_tokens / 1000
                 + (cfg.price_completion_per_1k or 0.0) * completion_tokens / 1000, 6)


async def _run(cfg, backend, store: ShardStore, todo: list, base_delay: float, progress: bool, stats: dict) -> None:
    """Send every request of `todo`, adding to `stats` as responses come."""
    limiter = RateLimiter(cfg.requests_per_minute, cfg.tokens_per_minute)
    stop = resolve_stop(cfg.stop)
    redact = _Redactor(cfg.api_key_env)
    bar = tqdm(total=sum(len(t[2]) for t in todo), unit="sample", desc="teacher", disable=not progress,
               dynamic_ncols=True)
    jobs: Iterator = iter(todo)

    async def one(ex, prompt, indices) -> None:
        est_tokens = len(prompt) / 4 + len(indices) * cfg.max_tokens
        error, kind, malformed = None, None, 0
        for attempt in range(cfg.max_retries + 1):
            await limiter.acquire(est_tokens)
            stats["requests"] += 1
            retry_after = None
            # A request that failed in transit is asked again as it was; after a malformed response a new
            # seed, since a seeded server (vLLM) would send the same broken sample again.
            seed = _stable_int(ex.id, indices[0], *(("malformed", malformed) if malformed else ()))
            try:
                comp = await backend.sample(prompt, len(indices), temperature=cfg.temperature,
                                            max_tokens=cfg.max_tokens, top_logprobs=cfg.top_logprobs,
                                            seed=seed, stop=stop or None)
            except TransientError as e:
                error, kind, retry_after = str(e), "transient", e.retry_after
            except MalformedResponse as e:
                error, kind, malformed = str(e), "malformed", malformed + 1
            except TeacherBackendError as e:
                error, kind = str(e), "fatal"
                break
            else:
                records = [_record(cfg, ex, prompt, idx, *_cut(cfg, s, stop), comp)
                           for idx, s in zip(indices, comp.samples)]
                written = store.append(records)
                stats["samples"] += written
                stats["topk_positions"] += sum(len(r["top_logprobs"]) for r in records)
                stats["short_topk_positions"] += comp.short_topk_positions
                stats["prompt_tokens"] += comp.prompt_tokens
                stats["completion_tokens"] += comp.completion_tokens
                cost = _cost(cfg, stats["prompt_tokens"], stats["completion_tokens"])
                bar.update(len(indices))
                bar.set_postfix(tokens=stats["completion_tokens"], **({"cost": f"${cost:.4f}"} if cost else {}),
                                refresh=False)
                return
            if attempt < cfg.max_retries:
                stats["retries"] += 1
                await asyncio.sleep(backoff_delay(attempt, base_delay, retry_after=retry_after))
        stats["failures"] += 1
        store.add_failure({"qid": ex.id, "sample_indices": indices, "kind": kind, "error": redact(error or "?"),
                           "attempts": attempt + 1, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        bar.write(f"teacher: request for {ex.id} samples {indices[0]}..{indices[-1]} failed ({kind}): "
                  f"{redact(error or '?')}")

    async def worker() -> None:
        for job in jobs:  # one shared iterator: each job is taken by exactly one worker
            await one(*job)

    workers = max(1, cfg.concurrency)
    if getattr(backend, "max_batch_rows", None):
        # A local model batches whatever requests wait together; concurrency is about servers, so
        # keep enough requests in flight to fill a batch on every replica.
        rows = getattr(backend, "lanes", 1) * backend.max_batch_rows
        workers = max(workers, rows // max(1, max(len(t[2]) for t in todo) if todo else 1))
    await asyncio.gather(*(worker() for _ in range(workers)))
    bar.close()


def _cut(cfg, sample, stop: list[str]):
    """(sample, cut field): cut at the first answer line unless the recipe turns that off; the
    dropped text is kept in the record so the filter can report the share kept without the cut."""
    if not cfg.cut_at_answer:
        return sample, None
    kept, cut = cut_sample(sample, stop)
    if cut is not None:
        cut["dropped_text"] = sample.text[len(kept.text):]
    return kept, cut


def _record(cfg, ex, prompt: str, index: int, s, cut, comp) -> dict:
    return {"qid": ex.id, "sample_index": index, "prompt_hash": prompt_hash(prompt), "question": ex.question,
            "gold": ex.answer, "dataset": ex.source or cfg.dataset, "text": s.text, "tokens": s.tokens,
            "token_bytes": s.token_bytes, "token_logprobs": s.token_logprobs, "top_logprobs": s.top_logprobs,
            "finish_reason": s.finish_reason, "cut": cut,
            "usage": {"prompt_tokens": comp.prompt_tokens, "completion_tokens": len(s.tokens)},
            "model": comp.model}


def _print_ledger(summary: dict, out_dir: str) -> None:
    cost = summary.get("cost_usd")
    print(f"teacher: {summary['samples']} new samples ({summary['stored']}/{summary['expected']} stored) in "
          f"{summary['seconds']}s; {summary['requests']} requests, {summary['retries']} retries, "
          f"{summary['failures']} failed requests")
    print(f"teacher usage: prompt {summary['prompt_tokens']} tokens, completion {summary['completion_tokens']} "
          f"tokens" + (f", cost ${cost:.4f}" if cost is not None else "") + f"; ledger in {out_dir}/usage.json")
    if summary["short_topk_positions"]:
        print(f"teacher: warning: {summary['short_topk_positions']} of {summary['topk_positions']} positions came with "
              f"fewer top-k entries than asked for. The completions API sends top-k as an object keyed by token "
              f"text, so different tokens that decode to the same text (e.g. byte pieces of one character) "
              f"merge and their probability is lost (a merge in a top-k the server extended with the sampled "
              f"token is not seen, so this counts at least those hit); the chat API (--api chat) lists every "
              f"entry.")
