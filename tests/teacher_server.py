"""A stand-in OpenAI server for the teacher tests: /v1/completions and /v1/chat/completions in
OpenAI's wire format on 127.0.0.1 (a free port), answered by the `hf` backend on a tiny random-init
GPT-2, so the text and logprobs are real model outputs. Faults are queued: each request takes the
next one (`server.faults.extend([...])`):
  "429"        HTTP 429 with Retry-After (seconds)       "500"   HTTP 500
  "slow"       answers after `slow_seconds` (past the client's timeout)
  "badjson"    200 with a body that is not JSON          "nologprobs"  logprobs: null
  "short"      logprobs cover fewer tokens than the text
`wire="vllm"` answers as vLLM (and SGLang) do rather than as OpenAI does (`vllm_wire`).
The server stops itself after `lifetime` seconds or `max_requests` requests (bounded in tests).
"""
from __future__ import annotations

import collections
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from specialize.engine.teacher.backends import Sample, token_bytes_from_string, token_string

EOS = "<|endoftext|>"


def client_config(server, **fields):
    """A TeacherConfig for the `openai` backend against `server`: zero-shot CoT on the synthetic world,
    the API key in TEACHER_TEST_KEY; `fields` set the rest (samples, max_tokens, ...)."""
    from specialize.engine.config import TeacherConfig
    base = dict(backend="openai", model=server.model_name, base_url=server.base_url, api_key_env="TEACHER_TEST_KEY",
                dataset="synthetic", format="zero_shot_cot", shots=0)
    return TeacherConfig(**{**base, **fields})


def tiny_teacher(vocab: int = 300, seed: int = 0):
    """(model, tokenizer): a 2-layer random GPT-2 and a byte-BPE trained on the synthetic world."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from specialize.engine.data import load_dataset_by_name
    from specialize.engine.tokenizers import train_byte_bpe
    texts = [f"{e.question} {e.rationale}" for e in load_dataset_by_name("synthetic/train")[:300]]
    tok = train_byte_bpe(texts + ["héllo wörld € ✓"], vocab)
    # One intra-op thread: the model is tiny, and on a loaded 2-core box two threads mostly wait on each other.
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=32, n_layer=2, n_head=2,
                     eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    return GPT2LMHeadModel(cfg).eval(), tok


def completions_body(comp, model: str) -> dict:
    choices = []
    for i, s in enumerate(comp.samples):
        offsets, pos = [], 0
        for piece in s.tokens:
            offsets.append(pos)
            pos += len(piece)
        choices.append({"index": i, "text": s.text, "finish_reason": s.finish_reason, "logprobs": {
            "tokens": [token_string(bytes(b)) for b in s.token_bytes], "token_logprobs": s.token_logprobs,
            "top_logprobs": [dict((t, v) for t, v in alts) for alts in s.top_logprobs], "text_offset": offsets}})
    return {"id": "cmpl-test", "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": _usage(comp)}


def chat_body(comp, model: str) -> dict:
    choices = []
    for i, s in enumerate(comp.samples):
        content = [{"token": token_string(bytes(b)), "logprob": lp, "bytes": list(b),
                    "top_logprobs": [{"token": t, "logprob": v, "bytes": list(token_bytes_from_string(t))}
                                     for t, v in alts]}
                   for b, lp, alts in zip(s.token_bytes, s.token_logprobs, s.top_logprobs)]
        choices.append({"index": i, "finish_reason": s.finish_reason, "logprobs": {"content": content},
                        "message": {"role": "assistant", "content": s.text}})
    return {"id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": _usage(comp)}


def vllm_wire(s: Sample, stop) -> Sample:
    """The sample as vLLM sends it (vllm/v1/engine/detokenizer.py, logprobs.py; SGLang alike):
    - a stop string is cut out of the text, but every token up to the one that completes it keeps
      its logprobs (the server stops generating there);
    - a sample that ended on the end-of-sequence token lists that token ("<|endoftext|>") last;
    - each token is decoded on its own, so part of a character reads U+FFFD, in the top-k too, and
      chat's `bytes` are those of the decoded string."""
    text, reason = s.text, s.finish_reason
    names = [bytes(b).decode("utf-8", "replace") for b in s.token_bytes]
    lps = list(s.token_logprobs)
    tops = [[[token_bytes_from_string(t).decode("utf-8", "replace"), v] for t, v in alts] for alts in s.top_logprobs]
    hits = [(text.find(x), x) for x in (stop or []) if x in text]
    if hits:
        at, x = min(hits)
        n, end = 0, 0
        while end < at + len(x):
            end += len(s.tokens[n])
            n += 1
        text, reason, names, lps, tops = text[:at], "stop", names[:n], lps[:n], tops[:n]
    elif reason == "stop":
        names, lps, tops = names + [EOS], lps + [-0.01], tops + [[[EOS, -0.01]]]
    return Sample(text, names, [list(t.encode("utf-8")) for t in names], lps, tops, reason)


def _usage(comp) -> dict:
    return {"prompt_tokens": comp.prompt_tokens, "completion_tokens": comp.completion_tokens,
            "total_tokens": comp.prompt_tokens + comp.completion_tokens}


class TeacherServer:
    def __init__(self, backend, model_name: str = "tiny-gpt2", lifetime: float = 120.0, max_requests: int = 5000,
                 slow_seconds: float = 1.5, retry_after: str = "0.05", delay: float = 0.0, wire: str = "openai"):
        self.backend, self.model_name, self.wire = backend, model_name, wire
        self.lifetime, self.max_requests = lifetime, max_requests
        self.slow_seconds, self.retry_after, self.delay = slow_seconds, retry_after, delay
        self.faults: collections.deque = collections.deque()
        self.log: list[dict] = []  # one entry per request: path, fault, authorization header
        self.stops: list = []      # the `stop` field of every answered request
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self._timer = threading.Timer(self.lifetime, self.httpd.shutdown)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()

    def _next_fault(self, path: str, auth: str, seed=None):
        with self._lock:
            fault = self.faults.popleft() if self.faults else None
            self.log.append({"path": path, "fault": fault, "authorization": auth, "seed": seed})
            over = len(self.log) > self.max_requests
        if over:
            threading.Thread(target=self.httpd.shutdown, daemon=True).start()
        return fault

    def answer(self, path: str, req: dict, fault) -> dict:
        chat = path.endswith("/chat/completions")
        prompt = req["messages"][-1]["content"] if chat else req["prompt"]
        k = (req.get("top_logprobs") or 0) if chat else (req.get("logprobs") or 0)
        stop = req.get("stop")
        self.stops.append(stop)
        comp = self.backend.sample_sync(prompt, req.get("n", 1), temperature=req.get("temperature", 1.0),
                                        max_tokens=req.get("max_tokens", 16), top_logprobs=k, seed=req.get("seed"),
                                        stop=[stop] if isinstance(stop, str) else stop)
        if self.wire == "vllm":
            comp.samples = [vllm_wire(x, [stop] if isinstance(stop, str) else stop) for x in comp.samples]
        body = (chat_body if chat else completions_body)(comp, self.model_name)
        for choice in body["choices"]:
            if fault == "nologprobs":
                choice["logprobs"] = None
            elif fault == "mergedtopk" and not chat:  # top-k tokens spelled alike: k - 1 keys of the object
                tops = choice["logprobs"]["top_logprobs"]
                choice["logprobs"]["top_logprobs"] = [dict(list(d.items())[:k - 1]) for d in tops]
            elif fault == "short":
                lp = choice["logprobs"]
                if chat:
                    lp["content"] = lp["content"][:-1]
                else:
                    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                        lp[key] = lp[key][:-1]
        return body

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, payload: bytes, headers: dict = {}):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout fault)
                    pass

            def _error(self, status: int, message: str, headers: dict = {}):
                self._send(status, json.dumps({"error": {"message": message, "type": "test_fault"}}).encode(),
                           headers)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path not in ("/v1/completions", "/v1/chat/completions"):
                    return self._error(404, f"no route {self.path}")
                try:
                    seed = json.loads(body).get("seed")
                except ValueError:
                    seed = None
                fault = server._next_fault(self.path, self.headers.get("Authorization", ""), seed)
                if server.delay:
                    time.sleep(server.delay)
                if fault == "429":
                    return self._error(429, "slow down", {"Retry-After": server.retry_after})
                if fault == "500":
                    return self._error(500, "internal error")
                if fault == "slow":
                    time.sleep(server.slow_seconds)
                if fault == "badjson":
                    return self._send(200, b'{"id": "cmpl-test", "choices": [{"text": "unterminated')
                try:
                    reply = server.answer(self.path, json.loads(body), fault)
                except Exception as e:  # a test bug shows up as a 400 with its message, not a hang
                    return self._error(400, f"{type(e).__name__}: {e}")
                self._send(200, json.dumps(reply).encode())

        return Handler


class RamblingTeacher:
    """A scripted completions model that does what a few-shot-prompted LM does: it answers the
    question correctly (the gold rationale, then "The answer is N."), then keeps writing: an
    invented next exemplar ("\n\nQ: ..." or "\nQuestion: ...") answered with another number, or a
    second answer line. `honour_stop`: end the text before the first stop string, as OpenAI does.
    Tokens are whitespace-separated words and newlines; a step's top-k holds the sampled word
    except every third step, where it lists only other words (a sampled token outside the top-k)."""

    def __init__(self, examples, honour_stop: bool = False):
        from specialize.engine.data import build_target
        self.by_question = {e.question.strip(): (build_target(e, None, "zero_shot_cot"), e.answer) for e in examples}
        self.honour_stop = honour_stop
        self.prompts: list[str] = []

    def _question(self, prompt: str) -> str:
        import re
        last = re.split(r"(?:^|\n)(?:Q|Question): ", prompt)[-1]
        return last.split("\n")[0].strip()

    def _continuation(self, gold: str, variant: int) -> str:
        wrong = str(int(float(gold)) + 7 + variant)
        return [f"\n\nQ: Tom has 3 boxes of 4 pens. How many pens?\nA: 3 * 4 = 12. The answer is {wrong}.\n\nQ: Amy",
                f"\nQuestion: A bus carries 9 people.\nLet's think step by step\nIt is {wrong}.\nThe answer is {wrong}.",
                f"\nThe answer is {wrong}.\nThe answer is {wrong}."][variant % 3]

    def sample_sync(self, prompt: str, n: int, *, temperature: float, max_tokens: int, top_logprobs: int,
                    seed=None, stop=None):
        import re

        from specialize.engine.teacher.backends import Completion, Sample
        self.prompts.append(prompt)
        target, gold = self.by_question[self._question(prompt)]
        samples = []
        for i in range(n):
            text = target + self._continuation(gold, (seed or 0) + i)
            reason = "length"
            if self.honour_stop and stop:
                hits = [text.find(s) for s in stop if s in text]
                if hits:
                    text, reason = text[: min(hits)], "stop"
            pieces = re.findall(r"\n|[^\S\n]*[^\s]+|[^\S\n]+", text)
            raw = [p.encode("utf-8") for p in pieces]
            lps = [-3.0 if t % 3 == 2 else -0.05 - 0.01 * (t % 5) for t in range(len(raw))]
            tops = []
            for t, (p, lp) in enumerate(zip(pieces, lps)):
                others = [[f" alt{j}", -0.5 - 0.1 * j] for j in range(top_logprobs)]
                alts = others if t % 3 == 2 else [[p, lp]] + others[: top_logprobs - 1]
                tops.append(alts if top_logprobs else [])
            # Built directly, not by build_sample: the wire carries the plain top-k, as a server's does.
            samples.append(Sample(text, pieces, [list(b) for b in raw], lps, tops, reason))
        return Completion(samples=samples, prompt_tokens=len(prompt.split()),
                          completion_tokens=sum(len(s.tokens) for s in samples), model="rambling")
