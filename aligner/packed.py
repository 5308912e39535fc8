"""The bulk path: one teacher shard → one aligned shard, chunk by chunk, on packed arrays.

Per chunk of CHUNK records (records.Chunk): one compiled pass over the chunk's lines reads
every top_logprobs value, numbers included (top_logprobs.py, json_numbers.py), and msgspec
decodes the other fields; the student tokenizer takes the chunk's texts in one batch
(piece_cache.py: words looked up in compiled code, the same ids as the full tokenizer);
teacher codes from the `Codebook` (one C-level dict look-up per token, a compiled walk);
every alternative's student id through the codebook's compiled raw-string table; the Numba
DP over the packed pairs (`dp.align_packed`); the compiled mapping (`mapping.map_packed`).
A chunk the compiled reader refuses is decoded line by line (lists per record) and takes
the same steps. The chunk's lines and parsed fields are dropped once its arrays exist, so
the peak memory of a shard is its output arrays (labels, input ids, and topk ids +
logprobs: 8·K bytes per label position, ~2.8 MB per 1,000 GSM8K samples at K = 5; twice
that for a moment while the chunks are joined) plus one chunk of lines, their joined bytes
and scan arrays (~40 MB for 1,024 GSM8K records with top-5). Measured: ~270 MiB peak RSS
per worker for 3,737-record shards, ~510 MiB for 37,365-record ones (issue #18's run),
most of the first figure being the interpreter, NumPy, Numba and the tokenizer.

The result is the per-record path's (`bulk.align_records` + `shards.write_shard`), byte for
byte: same arrays, same stats (the float sums are made in the same order). `PhaseClock`
records where the time goes (read/parse, tokenize, encode, dp, map, write).
"""
from __future__ import annotations

import gc
import time
from itertools import chain
from operator import itemgetter
from pathlib import Path

import numpy as np

from .codebook import Codebook
from .dp import align_packed
from .mapping import PAD_ID, PAD_LOGPROB, MappingStats, map_packed
from .offsets import offsets
from .records import TeacherRecord, TeacherRecordError, iter_packed_chunks
from .shards import save_shard_arrays
from .student import StudentTokenizer
from .top_logprobs import PackedTopK

CHUNK = 1024  # records per packed call (bounds the parsed JSON alive at once)
PHASES = ("read", "tokenize", "encode", "dp", "map", "write")


class PhaseClock:
    """Wall and CPU seconds (all threads of the process) per phase: `lap(name)` charges the
    time since the previous lap. On a shared machine the CPU figures are the steadier ones."""

    def __init__(self):
        self.wall = dict.fromkeys(PHASES, 0.0)
        self.cpu = dict.fromkeys(PHASES, 0.0)
        self._last = (time.perf_counter(), time.process_time())

    def lap(self, phase: str) -> None:
        now = (time.perf_counter(), time.process_time())
        self.wall[phase] += now[0] - self._last[0]
        self.cpu[phase] += now[1] - self._last[1]
        self._last = now

    def to_dict(self) -> dict:
        return {"wall": dict(self.wall), "cpu": dict(self.cpu)}


def _encode(student: StudentTokenizer, texts: list[str], wheres: list[str], field: str, packed: bool = False):
    """`student.encode(texts)` (or `encode_packed` with `packed`); a text the tokenizer refuses
    raises TeacherRecordError naming its record."""
    try:
        return student.encode_packed(texts) if packed else student.encode(texts)
    except Exception as batch_error:  # find the record the tokenizer refuses, and name it
        for text, where in zip(texts, wheres):
            try:
                student.encode([text])
            except Exception as e:
                raise TeacherRecordError(f"{where}: field {field!r}: the student tokenizer refuses it "
                                         f"({type(e).__name__}: {e})") from None
        raise batch_error


def _questions(student: StudentTokenizer, records, wheres, cache: dict | None) -> list[list[int]]:
    """Student ids of each record's question; with `cache`, each distinct question is
    tokenized once (a teacher folder holds several samples per question)."""
    if cache is None:
        return _encode(student, [r.question for r in records], wheres, "question")
    new = {r.question: w for r, w in zip(records, wheres) if r.question not in cache}
    if new:
        ids, off = _encode(student, list(new), list(new.values()), "question", packed=True)
        cache.update(zip(new, (ids[a:b].tolist() for a, b in zip(off[:-1].tolist(), off[1:].tolist()))))
    return [cache[r.question] for r in records]


def align_chunk(records: list[TeacherRecord], wheres: list[str], student: StudentTokenizer, book: Codebook,
                band: int = 0, threads: int = 1, clock: PhaseClock | None = None,
                question_cache: dict | None = None, top: PackedTopK | None = None) -> dict | None:
    """Packed outputs of checked records: labels/input_ids (flat, with offsets), topk_ids and
    topk_logprobs [Σ T, k] (k: the chunk's widest top-k, at least 1) and per-record stats.
    The alternatives come from the records' `top_logprobs` lists, or packed from `top`
    (records.Chunk); None when the codebook refuses a string of `top` (nothing done yet:
    decode the chunk line by line and call again)."""
    clock = clock or PhaseClock()
    if top is not None:
        alt_rows = book.raw_rows(top)
        if alt_rows is None:
            return None
        clock.lap("map")
    lab_flat, lab_off = _encode(student, [r.text for r in records], wheres, "text", packed=True)
    questions = _questions(student, records, wheres, question_cache)
    clock.lap("tokenize")

    s_len = np.maximum(np.diff(lab_off) - 1, 0)  # the eos stays one-hot: not aligned
    s_off = offsets(s_len)
    not_eos = np.ones(len(lab_flat), bool)
    not_eos[lab_off[1:][s_len < np.diff(lab_off)] - 1] = False
    s_codes = book.student(lab_flat[not_eos], s_off)
    t_off = offsets([len(r.tokens) for r in records])
    t_codes, t_gaps, pending = book.teacher(list(chain.from_iterable(r.tokens for r in records)), t_off)
    clock.lap("encode")

    s2t = align_packed(t_codes, t_off, s_codes, s_off, t_gaps, band=band, threads=threads)
    clock.lap("dp")

    if top is None:
        per_token = list(chain.from_iterable(r.top_logprobs for r in records))
        counts = np.fromiter(map(len, per_token), np.int64, len(per_token))
        alts = list(chain.from_iterable(per_token))
        # itemgetter over the flat list: zip(*alts) would be one call with a million arguments
        strings = list(map(itemgetter(0), alts))
        logprobs = np.fromiter(map(itemgetter(1), alts), np.float64, len(alts))
        alt_ids = book.alternatives(strings, np.repeat(pending, counts))
    else:
        counts, logprobs = top.counts, top.logprobs
        alt_ids = book.by_rows(alt_rows, np.repeat(pending, counts))
    k = int(max(1, counts.max(initial=1)))
    ids, lps, mapped, kept, listed = map_packed(lab_flat, lab_off, s2t, s_off, t_off, offsets(counts), alt_ids,
                                                logprobs, k)
    clock.lap("map")
    return {"labels": lab_flat, "lab_off": lab_off, "questions": questions, "topk_ids": ids, "topk_logprobs": lps,
            "positions": s_len, "mapped": mapped, "kept": kept, "listed": listed}


_BOOK: dict[str, Codebook] = {}


def _codebook_for(student: StudentTokenizer) -> Codebook:
    """One Codebook per process and student vocabulary, so a worker's later shards start
    with the strings its earlier ones met (the last vocabulary's only: memory stays bounded)."""
    book = _BOOK.get(student.fingerprint)
    if book is None:
        _BOOK.clear()
        book = _BOOK[student.fingerprint] = Codebook(student.pieces, student.vocab, student.unk_id)
    return book


def _pad_k(a: np.ndarray, k: int, value) -> np.ndarray:
    return a if a.shape[1] == k else np.pad(a, ((0, 0), (0, k - a.shape[1])), constant_values=value)


def align_shard_packed(in_path: str, out_path: str, student: StudentTokenizer, band: int = 0, threads: int = 1,
                       teacher_enc=None, progress=None, extra_meta: dict | None = None) -> tuple[MappingStats, dict]:
    """Align one `samples-*.jsonl` into the shard folder `out_path` (atomic, as write_shard).
    Returns the summed stats and the seconds per phase (PhaseClock.to_dict)."""
    clock = PhaseClock()
    book = _codebook_for(student)
    question_cache: dict[str, list[int]] = {}  # bounded by the shard's distinct questions
    rows, inputs, labels, ids, lps, strings = [], [], [], [], [], []
    positions = mapped = n_samples = 0
    kept = listed = 0.0
    off_in = off_lab = off_str = 0
    # The parsed records hold no reference cycles and are freed chunk by chunk; the cyclic
    # collector would otherwise rescan every live container at each allocation threshold
    # (measured: ~3x the cost of parsing itself).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for chunk in iter_packed_chunks(Path(in_path), CHUNK, teacher_enc):
            clock.lap("read")
            out = align_chunk(chunk.records, chunk.wheres, student, book, band, threads, clock, question_cache,
                              chunk.top)
            if out is None:
                chunk.per_line()
                out = align_chunk(chunk.records, chunk.wheres, student, book, band, threads, clock, question_cache)
            records = chunk.records
            n = len(records)
            texts = [t.encode("utf-8") for rec in records for t in (rec.qid, rec.question, str(rec.gold))]
            row = np.empty((n, 11), np.int64)
            q_len = np.fromiter(map(len, out["questions"]), np.int64, n)
            lab_len = np.diff(out["lab_off"])
            row[:, 0], row[:, 1] = off_in + offsets(q_len)[:-1], q_len
            row[:, 2], row[:, 3] = off_lab + out["lab_off"][:-1], lab_len
            row[:, 4] = [rec.sample_index for rec in records]
            text_len = np.fromiter(map(len, texts), np.int64, len(texts))
            row[:, 5::2] = (off_str + offsets(text_len)[:-1]).reshape(n, 3)
            row[:, 6::2] = text_len.reshape(n, 3)
            rows.append(row)
            strings += texts
            off_in += int(q_len.sum())
            off_lab += int(lab_len.sum())
            off_str += int(text_len.sum())
            # the float sums in record order, one addition at a time, as MappingStats.__add__ makes them
            positions += int(out["positions"].sum())
            mapped += int(out["mapped"].sum())
            kept = float(np.cumsum(np.concatenate([[kept], out["kept"]]))[-1])
            listed = float(np.cumsum(np.concatenate([[listed], out["listed"]]))[-1])
            n_samples += n
            inputs.append(np.fromiter(chain.from_iterable(out["questions"]), np.int32, int(q_len.sum())))
            labels.append(out["labels"])
            ids.append(out["topk_ids"])
            lps.append(out["topk_logprobs"])
            del chunk, records, out  # drop this chunk's parsed JSON before reading the next
            clock.lap("write")
            if progress is not None:
                progress(n)
    finally:
        if gc_was_enabled:
            gc.enable()
    total = MappingStats(positions, mapped, kept, listed, n_samples)
    k = max((a.shape[1] for a in ids), default=1)
    arrays = {
        "index": np.concatenate(rows) if rows else np.zeros((0, 11), np.int64),
        "input_ids": np.concatenate(inputs) if inputs else np.zeros(0, np.int32),
        "labels": np.concatenate(labels) if labels else np.zeros(0, np.int32),
        "topk_ids": np.concatenate([_pad_k(a, k, PAD_ID) for a in ids]) if ids else np.zeros((0, k), np.int32),
        "topk_logprobs": (np.concatenate([_pad_k(a, k, PAD_LOGPROB) for a in lps]) if lps
                          else np.zeros((0, k), np.float32)),
        "strings": np.frombuffer(b"".join(strings), np.uint8),
    }
    save_shard_arrays(arrays, out_path, extra_meta(total) if callable(extra_meta) else extra_meta)
    clock.lap("write")
    return total, clock.to_dict()
