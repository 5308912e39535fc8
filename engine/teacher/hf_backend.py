"""`hf` backend: a local transformers causal LM sampled with its KV cache, n samples per prompt.

The n samples of one prompt run as one batch of n identical rows (no padding, so the cache and the
positions are exact). Logprobs are those of the distribution actually sampled from, i.e. the
temperature-scaled softmax(logits / T) (at T = 0, greedy, the plain softmax): `token_logprobs[t]`
equals log_softmax(model(prompt + sampled ids).logits / T) at the sampled id, which the tests check
against a direct forward pass. Token strings are the decoded text pieces (see backends.decoded_pieces).
"""
from __future__ import annotations

import asyncio
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


class HFBackend:
    name = "hf"

    def __init__(self, model, tokenizer, device: Optional[str] = None, model_name: Optional[str] = None):
        import torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.model_name = model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.eos_id = tokenizer.eos_token_id
        self.byte_table = _token_byte_table(tokenizer)
        cfg = model.config
        self.max_positions = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
        # One generation at a time: torch already uses every core, and the model is not re-entrant.
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, path: str, device: Optional[str] = None) -> "HFBackend":
        from transformers import AutoModelForCausalLM, AutoTokenizer
        return cls(AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path),
                   device=device, model_name=str(path))

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"] or [self.eos_id]

    async def sample(self, prompt: str, n: int, *, temperature: float, max_tokens: int, top_logprobs: int,
                     seed: Optional[int] = None) -> Completion:
        return await asyncio.to_thread(self.sample_sync, prompt, n, temperature=temperature,
                                       max_tokens=max_tokens, top_logprobs=top_logprobs, seed=seed)

    def sample_sync(self, prompt: str, n: int, *, temperature: float, max_tokens: int, top_logprobs: int,
                    seed: Optional[int] = None) -> Completion:
        import torch
        ids = self.encode(prompt)
        steps = max_tokens
        if self.max_positions:
            if len(ids) >= self.max_positions:
                raise TeacherBackendError(f"prompt of {len(ids)} tokens does not fit the model's "
                                          f"{self.max_positions} positions")
            steps = min(steps, self.max_positions - len(ids))
        gen = torch.Generator(device=self.device)
        gen.manual_seed(0 if seed is None else seed)
        k = max(0, min(top_logprobs, len(self.byte_table)))
        rows = [[] for _ in range(n)]
        lps: list[list[float]] = [[] for _ in range(n)]
        tops: list[list] = [[] for _ in range(n)]
        reasons = ["length"] * n
        live = list(range(n))
        with self._lock, torch.no_grad():
            cur = torch.tensor([ids] * n, device=self.device)
            past = None
            for _ in range(steps):
                out = self.model(input_ids=cur, past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits = out.logits[:, -1].float()
                if temperature > 0:
                    logp = torch.log_softmax(logits / temperature, dim=-1)
                    nxt = torch.multinomial(logp.exp(), 1, generator=gen).squeeze(1)
                else:
                    logp = torch.log_softmax(logits, dim=-1)
                    nxt = logp.argmax(-1)
                chosen = logp.gather(1, nxt[:, None]).squeeze(1).tolist()
                top_v, top_i = logp.topk(k, dim=-1) if k else (logp[:, :0], nxt[:, None][:, :0])
                nxt_l, top_v, top_i = nxt.tolist(), top_v.tolist(), top_i.tolist()
                for r in list(live):
                    if nxt_l[r] == self.eos_id:
                        reasons[r] = "stop"
                        live.remove(r)
                        continue
                    rows[r].append(nxt_l[r])
                    lps[r].append(chosen[r])
                    tops[r].append([(token_string(self.byte_table[i]), v) for i, v in zip(top_i[r], top_v[r])])
                if not live:
                    break
                cur = nxt[:, None]
        samples = []
        for r in range(n):
            raw = [self.byte_table[i] for i in rows[r]]
            text = "".join(decoded_pieces(raw))
            samples.append(build_sample(text, raw, lps[r], tops[r], reasons[r], f"hf sample {r}", token_ids=rows[r]))
        return Completion(samples=samples, prompt_tokens=len(ids), completion_tokens=sum(map(len, rows)),
                          model=self.model_name)
