"""Training batches from the aligner's shards: prompt formats, length grouping, a seeded plan shared by all ranks.

One epoch's plan is a list of step slots, each `world` micro-batches (sample indices + one format each, or
a format per sample when mixing) computed from (seed, epoch) alone, so every rank builds the same plan
without talking; rank r takes micro-batch r of every slot (disjoint). The position is one integer — the
micro-batches each rank has consumed — which is all a resume needs to continue the same order.

Per sample: encoder input = build_prompt(question, fmt, exemplars), tokenized (cached per question and
format: a question's many teacher samples share one prompt). Decoder labels: CoT formats use the shard's
labels (the teacher's CoT in student tokens) and, for distribution matching, its top-k; answer-only
formats use the tokenized "The answer is N." and CE only (top-k all −1).
Length balance: inside windows of `group_steps` slots the samples are sorted by length, and each slot
takes `world` neighbouring micro-batches, so padding is small inside a micro-batch and the ranks of one
step wait little for each other; then the slots are shuffled, so the order stays random.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from specialize.engine.data import COT_FORMATS, FORMATS, build_prompt, build_target, draw_exemplars
from specialize.engine.io_helpers import stable_int

IN_CONTEXT = ("in_context_answer_only", "in_context_cot")


@dataclass
class MicroBatch:
    indices: list[int]
    formats: list[str]


_stable_int = stable_int


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
        # the same counts as a tensor that travels (pinned, non-blocking) with the batch: the engine sums
        # them on the device instead of building a host tensor per micro-batch
        batch["token_counts"] = torch.tensor([batch["n_src_tokens"], batch["n_tgt_tokens"]], dtype=torch.long)
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
        from specialize.kernels import check_teacher_inputs
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


def sample_lengths(shards, part: str = "both") -> np.ndarray:
    """Per-sample length, the grouping key: question + CoT ("both") or the question alone ("input").
    Read from each shard's index.npy (columns 1 and 3 hold the input and label lengths, as
    aligner/shards.py documents) instead of decoding every record; any other random-access dataset is
    measured item by item."""
    if part not in ("both", "input"):
        raise ValueError(f"part must be 'both' or 'input', got {part!r}")
    dirs = getattr(shards, "shard_dirs", None)
    if dirs is not None:
        parts = [np.load(d / "index.npy", mmap_mode="r") for d in dirs]
        lengths = np.concatenate([p[:, 1] + (p[:, 3] if part == "both" else 0) for p in parts]).astype(np.int64)
        if len(lengths) == len(shards):
            return lengths
    return np.asarray([len(shards[i]["input_ids"]) + (len(shards[i]["labels"]) if part == "both" else 0)
                       for i in range(len(shards))], dtype=np.int64)


def first_sample_per_question(shards) -> np.ndarray:
    """Index of each question's first kept sample (lowest teacher sample_index), in index order: the one
    sample answer-only formats train on (the paper's rule; its other samples only repeat the answer)."""
    if hasattr(shards, "qids_and_sample_indices"):
        qids, sample_index = shards.qids_and_sample_indices()
    else:
        recs = [shards[i] for i in range(len(shards))]
        qids, sample_index = [r["qid"] for r in recs], np.asarray([r["sample_index"] for r in recs])
    best: dict[str, int] = {}
    for i, q in enumerate(qids):
        j = best.get(q)
        if j is None or sample_index[i] < sample_index[j]:
            best[q] = i
    return np.asarray(sorted(best.values()), dtype=np.int64)


class BatchPlan:
    """The seeded order of micro-batches; `rank`'s n-th micro-batch is `micro_batch(n)`.

    An epoch is `per_rank` optimizer-step slots; each slot holds `world` micro-batches (one per rank) of
    one format, cut from neighbouring positions of a length-sorted window, so the ranks of one step pad
    to similar lengths and none waits long at the gradient all-reduce. Slots are shuffled, so the order
    stays random. Everything is a pure function of (seed, epoch).

    micro_batch_sizes: rows per micro-batch by format (others use micro_batch_size), so that an
    answer-only micro-batch can hold as many tokens as a CoT one. answer_pool: the sample indices
    answer-only formats draw from (e.g. `first_sample_per_question`); None = every sample.
    In per_batch mixing, formats are drawn per step slot with the ratios of `formats`; CoT formats share
    one permutation of the samples per epoch (no sample twice), answer-only formats one of `answer_pool`
    (cycled when an epoch asks for more)."""

    def __init__(self, lengths: np.ndarray, formats: dict[str, float], mixing: str, micro_batch_size: int,
                 seed: int, rank: int, world_size: int, group_steps: int = 64,
                 micro_batch_sizes: Optional[dict[str, int]] = None, answer_pool: Optional[np.ndarray] = None,
                 answer_lengths: Optional[np.ndarray] = None):
        unknown = [f for f in formats if f not in FORMATS]
        if unknown:
            raise ValueError(f"data.formats: unknown format {unknown[0]!r}; known: {', '.join(FORMATS)}")
        weights = np.asarray([formats[f] for f in formats], dtype=np.float64)
        if len(weights) == 0 or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"data.formats: ratios must be >= 0 and not all zero, got {formats}")
        sizes = dict(micro_batch_sizes or {})
        extra = [f for f in sizes if f not in formats]
        if extra:
            raise ValueError(f"data.micro_batch_sizes: {extra[0]!r} is not one of data.formats ({', '.join(formats)})")
        if mixing == "mixed" and any(v != micro_batch_size for v in sizes.values()):
            raise ValueError("data.micro_batch_sizes: per-format sizes need format_mixing=per_batch "
                             "(a mixed micro-batch holds several formats)")
        self.format_names = list(formats)
        self.probs = weights / weights.sum()
        self.sizes = [int(sizes.get(f, micro_batch_size)) for f in self.format_names]
        if min(self.sizes) < 1:
            raise ValueError(f"micro-batch sizes must be >= 1, got {dict(zip(self.format_names, self.sizes))}")
        self.lengths, self.mixing, self.B = np.asarray(lengths, dtype=np.int64), mixing, micro_batch_size
        # answer-only batches pad to their prompt length, not to the CoT they do not train on
        self.answer_lengths = self.lengths if answer_lengths is None else np.asarray(answer_lengths, np.int64)
        self.answer_pool_is_all = answer_pool is None
        self.answer_pool = (np.arange(len(self.lengths)) if answer_pool is None
                            else np.asarray(answer_pool, dtype=np.int64))
        self.seed, self.rank, self.world, self.group_steps = seed, rank, world_size, group_steps
        # an epoch: as many step slots as the samples fill at the default micro-batch size
        self.per_rank = len(self.lengths) // (micro_batch_size * world_size)
        if self.per_rank == 0:
            raise ValueError(f"{len(self.lengths)} aligned samples cannot fill one micro-batch of {micro_batch_size} "
                             f"on each of {world_size} ranks")
        if len(self.answer_pool) == 0 and any(f not in COT_FORMATS for f in self.format_names):
            raise ValueError("no samples for the answer-only formats")
        self._epoch, self._plan = None, None

    def _slots(self, idx: np.ndarray, rng: np.random.Generator, key: np.ndarray, B: int) -> list[np.ndarray]:
        """Cut `idx` into step slots ([world, B] arrays of sample indices): sort inside windows of
        `group_steps` slots by `key`, take `world` neighbouring micro-batches per slot, shuffle the slots
        (and which rank gets which micro-batch of a slot)."""
        per_slot = B * self.world
        window = per_slot * self.group_steps
        out = []
        for s in range(0, len(idx) - per_slot + 1, window):
            w = idx[s: s + window]
            w = w[: len(w) // per_slot * per_slot]
            w = w[np.argsort(key[w], kind="stable")]
            for slot in w.reshape(-1, self.world, B):
                out.append(slot[rng.permutation(self.world)])
        order = rng.permutation(len(out))
        return [out[i] for i in order]

    @staticmethod
    def _take(pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        """n indices from `pool` without repeats while it lasts: one or more permutations, concatenated."""
        parts, have = [], 0
        while have < n:
            parts.append(rng.permutation(pool))
            have += len(pool)
        return np.concatenate(parts)[:n] if parts else np.zeros(0, np.int64)

    def epoch_plan(self, epoch: int) -> list[MicroBatch]:
        rng = np.random.default_rng([self.seed, epoch])
        n_slots, F = self.per_rank, len(self.format_names)
        if self.mixing == "mixed":
            perm = rng.permutation(len(self.lengths))
            fmt_of = rng.choice(F, size=len(perm), p=self.probs)
            # answer-only samples are short whatever the CoT length: group on the length they will have
            cot = np.array([self.format_names[f] in COT_FORMATS for f in fmt_of])
            key = np.zeros(len(self.lengths), dtype=np.int64)
            key[perm] = np.where(cot, self.lengths[perm], self.answer_lengths[perm])
            fmt_by_index = np.empty(len(self.lengths), dtype=np.int64)
            fmt_by_index[perm] = fmt_of
            slots = self._slots(perm[: n_slots * self.world * self.B], rng, key, self.B)
            return [MicroBatch(mb.tolist(), [self.format_names[fmt_by_index[i]] for i in mb])
                    for slot in slots for mb in slot]
        # per_batch: a format per step slot; each format cuts its slots from its pool's permutation
        slot_fmt = rng.choice(F, size=n_slots, p=self.probs)
        pools = {"all": np.arange(len(self.lengths)), "answer": self.answer_pool}
        streams = {"all": rng.permutation(pools["all"])}
        used = {"all": 0, "answer": 0}
        plan: list[Optional[np.ndarray]] = [None] * n_slots
        names: list[Optional[str]] = [None] * n_slots
        for f, name in enumerate(self.format_names):
            where = np.flatnonzero(slot_fmt == f)
            if len(where) == 0:
                continue
            cot, B = name in COT_FORMATS, self.sizes[f]
            pool = "all" if cot or self.answer_pool_is_all else "answer"
            if pool not in streams:
                streams[pool] = rng.permutation(pools[pool])
            need = len(where) * self.world * B
            if used[pool] + need <= len(streams[pool]):  # the epoch's permutation still lasts
                idx = streams[pool][used[pool]: used[pool] + need]
                used[pool] += need
            else:
                idx = self._take(pools[pool], need, rng)
            for slot_no, slot in zip(where, self._slots(idx, rng, self.lengths if cot else self.answer_lengths, B)):
                plan[slot_no], names[slot_no] = slot, name
        return [MicroBatch(mb.tolist(), [name] * len(mb)) for slot, name in zip(plan, names) for mb in slot]

    def micro_batch(self, n: int) -> MicroBatch:
        """This rank's n-th micro-batch (counting across epochs)."""
        epoch, k = divmod(n, self.per_rank)
        if epoch != self._epoch:
            self._epoch, self._plan = epoch, self.epoch_plan(epoch)
        return self._plan[k * self.world + self.rank]


class MicroBatches(torch.utils.data.Dataset):
    """This rank's micro-batch n, collated: a pure function of n, so a DataLoader's workers can build them in
    any process and a resume at position n continues the same sequence."""

    def __init__(self, builder: "BatchBuilder", plan: BatchPlan):
        self.builder, self.plan = builder, plan

    def __len__(self) -> int:
        return 2 ** 62  # positions count across epochs; the sampler says which ones are read

    def __getitem__(self, n: int) -> dict:
        return self.builder.collate(self.plan.micro_batch(int(n)))


def micro_batch_loader(builder: "BatchBuilder", plan: BatchPlan, start: int, stop: int, workers: int,
                       pin_memory: bool, prefetch: int = 4, seed: int = 0) -> torch.utils.data.DataLoader:
    """Micro-batches start..stop-1 of this rank, collated ahead of use by `workers` processes (0 = in the
    training process), in pinned memory when the model is on CUDA so copies can be non-blocking."""
    # its own generator: a DataLoader draws a base seed when iterated, and drawing it from the global RNG
    # would shift the dropout stream of a resumed run against the uninterrupted one
    generator = torch.Generator().manual_seed(_stable_int(seed, start))
    return torch.utils.data.DataLoader(
        MicroBatches(builder, plan), batch_size=None, sampler=range(start, stop), num_workers=workers,
        pin_memory=pin_memory, prefetch_factor=prefetch if workers else None, generator=generator,
        worker_init_fn=functools.partial(_seed_worker, seed, start) if workers else None)


def _seed_worker(seed: int, start: int, worker_id: int) -> None:
    # collation is deterministic; seeding each worker from the position keeps any randomness in it exact too
    np.random.seed(_stable_int(seed, start, worker_id))
    torch.manual_seed(_stable_int(seed, start, worker_id))


def open_shards(path: str):
    """The aligner's shards (memory-mapped, cheap to open in every rank)."""
    from specialize.aligner.shards import AlignedShards
    return AlignedShards(path)
