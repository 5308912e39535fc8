"""Training batches from the aligner's shards: prompt formats, length grouping, a seeded plan shared by all ranks.

One epoch's plan is a list of micro-batches (sample indices + one format each, or a format per sample when
mixing) computed from (seed, epoch) alone, so every rank builds the same plan without talking; rank r
takes micro-batches r, r + world, r + 2·world, ... (disjoint slices). The position is one integer — the
micro-batches each rank has consumed — which is all a resume needs to continue the same order.

Per sample: encoder input = build_prompt(question, fmt, exemplars), tokenized (cached per question and
format: a question's many teacher samples share one prompt). Decoder labels: CoT formats use the shard's
labels (the teacher's CoT in student tokens) and, for distribution matching, its top-k; answer-only
formats use the tokenized "The answer is N." and CE only (top-k all −1).
Length grouping: inside windows of `group_batches` micro-batches the samples are sorted by length before
cutting, then the batches are shuffled, so padding is small and order stays random.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from specialize.engine.data import COT_FORMATS, FORMATS, build_prompt, build_target, draw_exemplars

IN_CONTEXT = ("in_context_answer_only", "in_context_cot")


@dataclass
class MicroBatch:
    indices: list[int]
    formats: list[str]


def _stable_int(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little")


class ExemplarSets:
    """A few fixed exemplar sets drawn by seed; a question uses set hash(qid) % n, or the next one when it
    would be its own exemplar. Fixed sets keep prompts (and their tokenizations) shared across samples."""

    def __init__(self, pool: Sequence, k: int, seed: int, n_sets: int = 8):
        self.sets = [draw_exemplars(pool, k, seed + j) for j in range(n_sets)] if k and pool else []

    def for_question(self, qid: str) -> tuple:
        if not self.sets:
            return ()
        start = _stable_int(qid) % len(self.sets)
        for j in range(len(self.sets)):
            chosen = self.sets[(start + j) % len(self.sets)]
            if all(ex.id != qid for ex in chosen):
                return tuple(chosen)
        return tuple(chosen)


class BatchBuilder:
    """Turns micro-batch plans into padded tensors for the model and the loss."""

    def __init__(self, shards, tokenizer, exemplars: ExemplarSets, max_source_len: int, max_target_len: int,
                 with_teacher: bool, vocab_size: int | None = None):
        self.shards, self.tok, self.exemplars = shards, tokenizer, exemplars
        self.vocab_size = vocab_size  # when given, every batch's ids are checked here, on the host
        self.max_source_len, self.max_target_len = max_source_len, max_target_len
        self.with_teacher = with_teacher
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_id = tokenizer.eos_token_id
        self._prompt_cache: dict[tuple[str, str], list[int]] = {}
        self._answer_cache: dict[tuple[str, str], list[int]] = {}

    def _encode(self, text: str) -> list[int]:
        ids = self.tok(text, add_special_tokens=True)["input_ids"]
        if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids = ids + [self.eos_id]
        return ids

    def prompt_ids(self, qid: str, question: str, fmt: str) -> list[int]:
        key = (qid, fmt)
        ids = self._prompt_cache.get(key)
        if ids is None:
            exemplars = self.exemplars.for_question(qid) if fmt in IN_CONTEXT else ()
            ids = self._encode(build_prompt(question, fmt, exemplars))
            if len(ids) > self.max_source_len:
                # keep the question (at the end) and eos; drop the oldest exemplar tokens
                ids = ids[-self.max_source_len:]
            self._prompt_cache[key] = ids
        return ids

    def answer_ids(self, answer: str, fmt: str) -> list[int]:
        key = (answer, fmt)
        if key not in self._answer_cache:
            self._answer_cache[key] = self._encode(build_target(None, answer, fmt))[: self.max_target_len]
        return self._answer_cache[key]

    def sample(self, index: int, fmt: str) -> dict:
        rec = self.shards[index]
        src = self.prompt_ids(rec["qid"], rec["question"], fmt)
        if fmt in COT_FORMATS:
            labels = np.asarray(rec["labels"], dtype=np.int64)[: self.max_target_len]
            topk_ids = np.asarray(rec["topk_ids"])[: self.max_target_len]
            topk_lp = np.asarray(rec["topk_logprobs"])[: self.max_target_len]
        else:
            labels = np.asarray(self.answer_ids(str(rec["answer"]), fmt), dtype=np.int64)
            topk_ids = topk_lp = None
        return {"src": src, "labels": labels, "topk_ids": topk_ids, "topk_logprobs": topk_lp}

    def collate(self, mb: MicroBatch) -> dict:
        samples = [self.sample(i, f) for i, f in zip(mb.indices, mb.formats)]
        B = len(samples)
        S = max(len(s["src"]) for s in samples)
        T = max(len(s["labels"]) for s in samples)
        input_ids = torch.full((B, S), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((B, S), dtype=torch.long)
        labels = torch.full((B, T), -100, dtype=torch.long)
        for b, s in enumerate(samples):
            input_ids[b, : len(s["src"])] = torch.as_tensor(s["src"])
            attention_mask[b, : len(s["src"])] = 1
            labels[b, : len(s["labels"])] = torch.as_tensor(s["labels"])
        # T5 decoder input: labels shifted right, starting from pad (decoder_start_token_id = 0)
        decoder_input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        decoder_input_ids[:, 1:] = labels[:, :-1].clamp(min=0)
        decoder_input_ids[:, 1:][labels[:, :-1] == -100] = self.pad_id
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                 "decoder_input_ids": decoder_input_ids, "formats": mb.formats,
                 "n_src_tokens": int(attention_mask.sum()), "n_tgt_tokens": int((labels != -100).sum())}
        K = max((s["topk_ids"].shape[1] for s in samples if s["topk_ids"] is not None), default=1)
        if not self.with_teacher:
            K = 1
        topk_ids = torch.full((B, T, K), -1, dtype=torch.long)
        topk_lp = torch.zeros((B, T, K), dtype=torch.float32)
        if self.with_teacher:
            for b, s in enumerate(samples):
                if s["topk_ids"] is not None:
                    t, k = s["topk_ids"].shape
                    ids = s["topk_ids"].astype(np.int64)
                    # the shards pad logprobs with -inf; the loss reads only ids >= 0, keep padding finite
                    lps = np.where(ids >= 0, s["topk_logprobs"], 0.0).astype(np.float32)
                    topk_ids[b, :t, :k] = torch.as_tensor(ids)
                    topk_lp[b, :t, :k] = torch.as_tensor(lps)
        batch["topk_ids"], batch["topk_logprobs"] = topk_ids, topk_lp
        if self.vocab_size is not None:
            self._check_ids(mb, labels, topk_ids, topk_lp)
        return batch

    def _check_ids(self, mb: MicroBatch, labels, topk_ids, topk_lp) -> None:
        """Id ranges and duplicate top-k ids, on the CPU tensors: the loss then runs with validate=False,
        which spares a device-to-host sync per micro-batch on CUDA. The error names the sample."""
        from specialize.kernels.utils import check_teacher_inputs
        B, T, K = topk_ids.shape
        for b in range(B):
            try:
                check_teacher_inputs(T, self.vocab_size, topk_ids.device, topk_ids[b], topk_lp[b], labels[b], -100)
            except ValueError as err:
                i = mb.indices[b]
                rec = self.shards[i]
                where = ""
                if hasattr(self.shards, "locate"):
                    shard, row = self.shards.locate(i)
                    where = f", row {row} of shard {shard}"
                raise ValueError(f"aligned sample {i} (qid {rec['qid']!r}{where}): {err} "
                                 f"(student vocabulary {self.vocab_size})") from None


def sample_lengths(shards) -> np.ndarray:
    """Question + CoT length of every sample (the grouping key). Read from each shard's index.npy (columns
    1 and 3 hold the input and label lengths, as aligner/shards.py documents) instead of decoding every
    record; any other random-access dataset is measured item by item."""
    dirs = getattr(shards, "shard_dirs", None)
    if dirs is not None:
        parts = [np.load(d / "index.npy", mmap_mode="r") for d in dirs]
        lengths = np.concatenate([p[:, 1] + p[:, 3] for p in parts]).astype(np.int64)
        if len(lengths) == len(shards):
            return lengths
    return np.asarray([len(shards[i]["input_ids"]) + len(shards[i]["labels"]) for i in range(len(shards))],
                      dtype=np.int64)


class BatchPlan:
    """The seeded order of micro-batches; `rank`'s n-th micro-batch is `micro_batch(n)`."""

    def __init__(self, lengths: np.ndarray, formats: dict[str, float], mixing: str, micro_batch_size: int,
                 seed: int, rank: int, world_size: int, group_batches: int = 32):
        unknown = [f for f in formats if f not in FORMATS]
        if unknown:
            raise ValueError(f"data.formats: unknown format {unknown[0]!r}; known: {', '.join(FORMATS)}")
        weights = np.asarray([formats[f] for f in formats], dtype=np.float64)
        if len(weights) == 0 or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"data.formats: ratios must be >= 0 and not all zero, got {formats}")
        self.format_names = list(formats)
        self.probs = weights / weights.sum()
        self.lengths, self.mixing, self.B = lengths, mixing, micro_batch_size
        self.seed, self.rank, self.world, self.group = seed, rank, world_size, group_batches
        n_batches = len(lengths) // micro_batch_size
        self.per_rank = n_batches // world_size
        if self.per_rank == 0:
            raise ValueError(f"{len(lengths)} aligned samples cannot fill one micro-batch of {micro_batch_size} "
                             f"on each of {world_size} ranks")
        self._epoch, self._plan = None, None

    def _grouped(self, idx: np.ndarray, rng: np.random.Generator, key: np.ndarray) -> list[np.ndarray]:
        """Cut `idx` into micro-batches of similar `key`, sorted inside windows, then shuffled."""
        out = []
        window = self.B * self.group
        for s in range(0, len(idx) - self.B + 1, window):
            w = idx[s: s + window]
            w = w[: len(w) // self.B * self.B]
            w = w[np.argsort(key[w], kind="stable")]
            out.extend(w.reshape(-1, self.B))
        rng.shuffle(out)
        return out

    def epoch_plan(self, epoch: int) -> list[MicroBatch]:
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(len(self.lengths))
        n_batches = self.per_rank * self.world
        F = len(self.format_names)
        if self.mixing == "mixed":
            fmt_of = rng.choice(F, size=len(perm), p=self.probs)
            # answer-only samples are short whatever the CoT length: group on the length they will have
            cot = np.array([self.format_names[f] in COT_FORMATS for f in fmt_of])
            key = np.zeros(len(self.lengths), dtype=np.int64)
            key[perm] = np.where(cot, self.lengths[perm], 0)
            batches = self._grouped(perm, rng, key)[:n_batches]
            fmt_by_index = np.empty(len(self.lengths), dtype=np.int64)
            fmt_by_index[perm] = fmt_of
            return [MicroBatch(b.tolist(), [self.format_names[fmt_by_index[i]] for i in b]) for b in batches]
        # per_batch: draw a format per micro-batch slot, give each format its share of the permutation
        slot_fmt = rng.choice(F, size=n_batches, p=self.probs)
        plan: list[Optional[MicroBatch]] = [None] * n_batches
        start = 0
        for f in range(F):
            slots = np.flatnonzero(slot_fmt == f)
            if len(slots) == 0:
                continue
            idx = perm[start: start + len(slots) * self.B]
            start += len(slots) * self.B
            batches = self._grouped(idx, rng, self.lengths)
            for slot, b in zip(slots, batches):
                plan[slot] = MicroBatch(b.tolist(), [self.format_names[f]] * self.B)
        return [mb for mb in plan if mb is not None]

    def micro_batch(self, n: int) -> MicroBatch:
        """This rank's n-th micro-batch (counting across epochs)."""
        epoch, k = divmod(n, self.per_rank)
        if epoch != self._epoch:
            self._epoch, self._plan = epoch, self.epoch_plan(epoch)
        return self._plan[(k * self.world + self.rank) % len(self._plan)]


def open_shards(path: str):
    """The aligner's shards (memory-mapped, cheap to open in every rank)."""
    from specialize.aligner.shards import AlignedShards
    return AlignedShards(path)
