"""`hf` backend: a local transformers causal LM sampled with its KV cache.

Requests that wait together are merged into one batch of up to `max_batch_rows` rows (n rows per
request, prompts left-padded, positions counted from each row's first real token), so a small
model on a GPU or CPU is not fed one prompt at a time. Each request samples with its own seeded
generator, so its samples do not depend on what it was batched with.

Tokens are drawn from softmax(logits / T) (greedy at T = 0). The logprobs it stores are, with
`logprobs="raw"` (the default, what OpenAI and vLLM return), those of the model's own distribution,
log_softmax(logits), whatever T; with `logprobs="sampled"` those of the distribution the tokens were
drawn from, log_softmax(logits / T) (the plain softmax at T = 0). The tests check both against a
direct forward pass on prompt + sampled ids. Token strings are the decoded text pieces (see backends.decoded_pieces).
"""
from __future__ import annotations

import asyncio
import inspect
import threading
from typing import Optional

from .backends import Completion, TeacherBackendError, build_sample, decoded_pieces, token_string


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE spells each byte as one printable character: printable Latin-1 bytes
    stand for themselves, the other bytes (space, controls, ...) are shifted to U+0100 onwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, shift = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + shift)] = b
            shift += 1
    return chars


def _bos_prefix(tokenizer) -> list[int]:
    """[bos] when the tokenizer's own encoding starts a text with its BOS token, else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return [bos] if tokenizer("a")["input_ids"][:1] == [bos] and plain[:1] != [bos] else []


def _generation_eos_ids(model) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def _token_byte_table(tokenizer) -> list[bytes]:
    """Raw bytes of every vocabulary id (byte-level BPE maps its "Ġ"-style characters back to bytes)."""
    inverse = _byte_level_alphabet()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = backend is not None and type(backend.decoder).__name__ == "ByteLevel"
    size = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
    table = [b""] * size
    specials = set(tokenizer.all_special_ids)
    for piece, idx in tokenizer.get_vocab().items():
        if byte_level and idx not in specials and all(ch in inverse for ch in piece):
            table[idx] = bytes(inverse[ch] for ch in piece)
        else:
            table[idx] = tokenizer.decode([idx]).encode("utf-8")
    return table


def check_logprobs(kind: str) -> str:
    if kind not in ("raw", "sampled"):
        raise ValueError(f"logprobs must be 'raw' or 'sampled', got {kind!r}")
    return kind


class BatchQueue:
    """Merges the requests that wait together into batches of up to `max_batch_rows` rows (n rows
    per request, same settings) and keeps up to `lanes` batches running at once; a subclass runs
    one batch in `_run_batch`. One lane for a model in this process; one per replica process."""

    max_batch_rows: int = 64
    lanes: int = 1

    def __init__(self):
        self._pending: list = []
        self._drainer = None
        self._arrived: asyncio.Event | None = None  # set by sample(): wakes a drainer with a free lane

    async def _run_batch(self, requests: list, settings: tuple) -> list:
        raise NotImplementedError

    async def sample(self, prompt: str, n: int, *, temperature: float, max_tokens: int, top_logprobs: int,
                     seed: Optional[int] = None, stop: Optional[list[str]] = None) -> Completion:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        settings = (temperature, max_tokens, top_logprobs, tuple(stop or ()))
        self._pending.append(((prompt, n, seed), settings, fut))
        if self._drainer is None or self._drainer.done() or self._drainer.get_loop() is not loop:
            self._arrived = asyncio.Event()
            self._drainer = loop.create_task(self._drain())
        self._arrived.set()
        return await fut

    def _take_batch(self) -> list:
        settings = self._pending[0][1]
        batch, rows = [], 0
        for item in self._pending:
            n = item[0][1]
            if item[1] == settings and (not batch or rows + n <= self.max_batch_rows):
                batch.append(item)
                rows += n
        taken = {id(item) for item in batch}
        self._pending = [item for item in self._pending if id(item) not in taken]
        return batch

    async def _finish(self, batch: list) -> None:
        try:
            results = await self._run_batch([b[0] for b in batch], batch[0][1])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} requests returned {len(results)} results")
        except Exception as e:  # noqa: BLE001 - handed to every waiting request
            results = [e] * len(batch)
        for (_, _, fut), res in zip(batch, results):
            if fut.done():
                continue
            if isinstance(res, BaseException):
                fut.set_exception(res)
            else:
                fut.set_result(res)

    async def _drain(self) -> None:
        running: set = set()
        while self._pending or running:
            await asyncio.sleep(0)  # let the other workers queue their requests first
            while self._pending and len(running) < self.lanes:
                running.add(asyncio.ensure_future(self._finish(self._take_batch())))
            if not running:
                continue
            # wake when a batch finishes, or, with a lane free, when a request arrives (a retry, or
            # one the rate limiter held back), so that lane does not wait for the running batches
            waits = set(running)
            arrival = None
            if len(running) < self.lanes:
                self._arrived.clear()
                arrival = asyncio.ensure_future(self._arrived.wait())
                waits.add(arrival)
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if arrival is not None:
                arrival.cancel()
            running -= done


class HFBackend(BatchQueue):
    name = "hf"

    def __init__(self, model, tokenizer, device: Optional[str] = None, model_name: Optional[str] = None,
                 max_batch_rows: int = 64, logprobs: str = "raw"):
        import torch
        self.logprobs = check_logprobs(logprobs)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.model_name = model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.eos_id = tokenizer.eos_token_id
        # Every id that ends a sequence: the tokenizer's EOS and the generation config's (Llama-3 ends
        # a turn with <|eot_id|>, not <|end_of_text|>), as a server's generate stops on them.
        self.end_ids = {self.eos_id, *_generation_eos_ids(model)} - {None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.prefix_ids = _bos_prefix(tokenizer)
        # Only the last position's logits are used: at prefill the full [rows, prompt, vocab] tensor
        # would be the largest allocation (40 rows x 1,800 tokens x 128k vocab is 17 GB in bf16).
        self._last_logits_only = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.byte_table = _token_byte_table(tokenizer)
        cfg = model.config
        self.max_positions = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
        self.max_batch_rows = max_batch_rows
        # One generation at a time on this model (it is not re-entrant); more at once is teacher.replicas.
        self._lock = threading.Lock()
        BatchQueue.__init__(self)

    @classmethod
    def from_pretrained(cls, path: str, device: Optional[str] = None, **kw) -> "HFBackend":
        from transformers import AutoModelForCausalLM, AutoTokenizer
        # the checkpoint's own dtype (bf16 for most hub LMs), not an fp32 copy in host memory per replica
        return cls(AutoModelForCausalLM.from_pretrained(path, dtype="auto"), AutoTokenizer.from_pretrained(path),
                   device=device, model_name=str(path), **kw)

    async def _run_batch(self, requests: list, settings: tuple) -> list:
        return await asyncio.to_thread(self.sample_batch_sync, requests, *settings)

    def encode(self, prompt: str) -> list[int]:
        """The prompt's ids as a server encodes a completions prompt: with the tokenizer's BOS where it
        adds one (Llama, Mistral, Gemma), never an end-of-text mark."""
        return self.prefix_ids + self.tokenizer(prompt, add_special_tokens=False)["input_ids"] or [self.eos_id]

    # ------------------------------------------------------------------ sync: one batch on the model

    def sample_sync(self, prompt: str, n: int, *, temperature: float, max_tokens: int, top_logprobs: int,
                    seed: Optional[int] = None, stop: Optional[list[str]] = None) -> Completion:
        (result,) = self.sample_batch_sync([(prompt, n, seed)], temperature, max_tokens, top_logprobs, stop)
        if isinstance(result, BaseException):
            raise result
        return result

    def sample_batch_sync(self, requests: list[tuple[str, int, Optional[int]]], temperature: float,
                          max_tokens: int, top_logprobs: int, stop=()) -> list:
        """One Completion (or the exception for that request) per (prompt, n, seed). A row ends at
        EOS, at its token limit, or once its text holds a stop string (finish_reason "stop"; the
        stop string stays in the text, and the generator's cut removes it with the rest)."""
        stop_bytes = [s.encode("utf-8") for s in (stop or ()) if s]
        import torch
        results: list = [None] * len(requests)
        live_reqs = []  # (request index, prompt ids, n, seed)
        for r, (prompt, n, seed) in enumerate(requests):
            ids = self.encode(prompt)
            if self.max_positions and len(ids) >= self.max_positions:
                results[r] = TeacherBackendError(f"prompt of {len(ids)} tokens does not fit the model's "
                                                 f"{self.max_positions} positions")
            else:
                live_reqs.append((r, ids, n, seed))
        if not live_reqs:
            return results
        row_ids = [ids for _, ids, n, _ in live_reqs for _ in range(n)]
        # Each row may run until max_tokens or the model's last position, whichever comes first.
        limits = [min(max_tokens, self.max_positions - len(ids)) if self.max_positions else max_tokens
                  for ids in row_ids]
        width = max(map(len, row_ids))
        k = max(0, min(top_logprobs, len(self.byte_table)))
        R = len(row_ids)
        out_ids = [[] for _ in range(R)]
        lps: list[list[float]] = [[] for _ in range(R)]
        tops: list[list] = [[] for _ in range(R)]
        reasons = ["length"] * R
        written = [bytearray() for _ in range(R)]  # each row's output bytes, for the stop strings
        live = [r for r in range(R) if limits[r] > 0]
        gens = []
        for _, _, _, seed in live_reqs:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(0 if seed is None else seed)
            gens.append(gen)
        spans, start = [], 0
        for _, _, n, _ in live_reqs:
            spans.append((start, start + n))
            start += n
        with self._lock, torch.no_grad():
            dev = self.device
            cur = torch.tensor([[self.pad_id] * (width - len(ids)) + ids for ids in row_ids], device=dev)
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in row_ids], device=dev)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            past = None
            for step in range(max(limits, default=0)):
                out = self.model(input_ids=cur, attention_mask=mask, position_ids=pos, past_key_values=past,
                                 use_cache=True, **({"logits_to_keep": 1} if self._last_logits_only else {}))
                past = out.past_key_values
                logits = out.logits[:, -1].float()
                logp = torch.log_softmax(logits, dim=-1)  # raw; the same ranking as any tempered one
                if temperature > 0:
                    drawn = logp if temperature == 1.0 else torch.log_softmax(logits / temperature, dim=-1)
                    probs = drawn.exp()
                    nxt = torch.cat([torch.multinomial(probs[a:b], 1, generator=g).squeeze(1)
                                     for (a, b), g in zip(spans, gens)])
                    if self.logprobs == "sampled":
                        logp = drawn
                else:
                    nxt = logp.argmax(-1)
                chosen = logp.gather(1, nxt[:, None]).squeeze(1).tolist()
                if k:
                    top_v, top_i = logp.topk(k, dim=-1)
                    top_v, top_i = top_v.tolist(), top_i.tolist()
                else:
                    top_v = top_i = [[] for _ in range(R)]
                nxt_l = nxt.tolist()
                for r in list(live):
                    if nxt_l[r] in self.end_ids:
                        reasons[r] = "stop"
                        live.remove(r)
                        continue
                    out_ids[r].append(nxt_l[r])
                    lps[r].append(chosen[r])
                    tops[r].append([(token_string(self.byte_table[i]), v) for i, v in zip(top_i[r], top_v[r])])
                    piece = self.byte_table[nxt_l[r]]
                    written[r] += piece
                    if stop_bytes and any(s in written[r][-(len(s) + len(piece)):] for s in stop_bytes):
                        reasons[r] = "stop"
                        live.remove(r)
                    elif len(out_ids[r]) >= limits[r]:
                        live.remove(r)
                if not live:
                    break
                cur = nxt[:, None]
                mask = torch.cat([mask, mask.new_ones(R, 1)], dim=1)
                pos = pos[:, -1:] + 1
        for j, (r, ids, n, _) in enumerate(live_reqs):
            a, b = spans[j]
            samples = []
            for row in range(a, b):
                raw = [self.byte_table[i] for i in out_ids[row]]
                text = "".join(decoded_pieces(raw))
                samples.append(build_sample(text, raw, lps[row], tops[row], reasons[row], f"hf sample {row - a}",
                                            token_ids=out_ids[row]))
            results[r] = Completion(samples=samples, prompt_tokens=len(ids),
                                    completion_tokens=sum(len(out_ids[row]) for row in range(a, b)),
                                    model=self.model_name)
        return results
