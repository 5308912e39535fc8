"""Align a whole teacher output folder (`samples-*.jsonl`) into aligned shards.

One output shard `aligned-NNNNN/` per input shard `samples-NNNNN.jsonl`, built by the
packed path (packed.py: chunked, compiled, bounded memory) or by the per-record path
below (`align_records`, kept as the readable comparison; same bytes), and written
atomically (`shards.save_shard_arrays`): on a rerun a finished shard is skipped, a partial one
(left as `*.tmp`) is redone. `workers` > 1 aligns several input shards at once in
separate processes; with a single pending shard, or fewer than SPAWN_MIN_LINES pending
lines, the workers become Numba threads of the pair-parallel DP instead. Stats per shard
are kept in its meta.json so a resumed run can still print the full summary.
"""
from __future__ import annotations

import json
import os
import resource
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

from tqdm import tqdm

from .dp import align_codes_many
from .mapping import MappingStats, StudentVocab, map_distributions
from .normalise import encode_surfaces, student_surfaces, teacher_surfaces
from .packed import align_shard_packed
from .records import TeacherRecordError, read_teacher_records  # noqa: F401 (TeacherRecordError: public here)
from .shards import is_complete, write_shard
from .student import StudentTokenizer, load_student_tokenizer
from .teacher_tokenizers import load_teacher_tokenizer

CHUNK = 512  # samples aligned per Numba call in the per-record path
IMPLEMENTATIONS = ("packed", "per-record")
# Below this many pending lines the shards are aligned in this process (`workers` then
# become Numba threads of the DP): a spawned worker costs ~0.9 s CPU before its first
# record (interpreter, NumPy/Numba/tokenizers imports, Numba cache loads; measured for
# issue #18), as much as ~6,000 records of packed work, so two of them only pay off
# on larger folders.
SPAWN_MIN_LINES = 12_000


def _load_student(student_tokenizer):
    if isinstance(student_tokenizer, (str, os.PathLike)):
        return load_student_tokenizer(student_tokenizer)
    return student_tokenizer


def align_records(records: list[dict], student, band: int = 0, threads: int = 1, vocab: StudentVocab | None = None,
                  progress=None) -> tuple[list[dict], MappingStats]:
    """Aligned sample dicts (shards.py fields) and their summed stats."""
    vocab = vocab or StudentVocab(student.get_vocab())
    k = max([1] + [len(a) for r in records for a in r["top_logprobs"]])
    out, total = [], MappingStats()
    for start in range(0, len(records), CHUNK):
        chunk = records[start:start + CHUNK]
        labels = student([r["text"] for r in chunk])["input_ids"]
        questions = student([r["question"] for r in chunk])["input_ids"]
        t_codes, s_codes, gaps, pendings = [], [], [], []
        for rec, lab in zip(chunk, labels):
            pieces = student.convert_ids_to_tokens(lab[:-1])  # the eos stays one-hot
            t_surf, pending = teacher_surfaces(rec["tokens"])
            unknown = [i == student.unk_token_id for i in lab[:-1]]
            t, s, g = encode_surfaces(t_surf, student_surfaces(pieces), unknown)
            t_codes.append(t), s_codes.append(s), gaps.append(g), pendings.append(pending)
        results = align_codes_many(t_codes, s_codes, gaps, band=band, threads=threads)
        for rec, lab, q, pending, (_, _, s2t) in zip(chunk, labels, questions, pendings, results):
            ids, lps, stats = map_distributions(lab, s2t, rec["top_logprobs"], pending, vocab, k)
            total = total + stats
            out.append({"qid": rec["qid"], "sample_index": rec["sample_index"], "question": rec["question"],
                        "answer": str(rec["gold"]), "input_ids": q, "labels": lab,
                        "topk_ids": ids, "topk_logprobs": lps})
        if progress is not None:
            progress(len(chunk))
    return out, total


def _align_shard(in_path: str, out_path: str, student_tokenizer, band: int, threads: int,
                 teacher_tokenizer: str | None, progress=None, implementation: str = "packed") -> dict:
    start = time.perf_counter()
    enc = load_teacher_tokenizer(teacher_tokenizer) if teacher_tokenizer else None
    name = Path(in_path).name

    written = {}

    def meta(stats: MappingStats) -> dict:  # what meta.json keeps: the summary row, timed before the write
        summary = {"shard": name, **stats.to_dict(), "seconds": time.perf_counter() - start}
        written.update({"source": str(in_path), "band": band, "stats": summary})
        return written

    if implementation == "packed":
        student = StudentTokenizer.load(student_tokenizer)
        _, phases = align_shard_packed(in_path, out_path, student, band, threads, enc, progress, meta)
        return {**written["stats"], "phase_seconds": phases, "peak_rss_mib": _peak_rss_mib()}
    records = read_teacher_records(Path(in_path), enc)
    aligned, stats = align_records(records, _load_student(student_tokenizer), band, threads, progress=progress)
    write_shard(aligned, out_path, extra_meta=meta(stats))
    return {**written["stats"], "peak_rss_mib": _peak_rss_mib()}


def _peak_rss_mib() -> float:
    """High-water resident memory of this process so far (a worker's: its shards and imports).
    VmHWM where Linux has it: ru_maxrss also counts the parent's size copied before a spawned
    worker's exec."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker_init() -> None:
    # one worker per core already: the tokenizer's own thread pool would only oversubscribe
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


_WORKER_STUDENT: dict[str, StudentTokenizer] = {}


def _align_shard_in_worker(in_path, out_path, student: StudentTokenizer, *args) -> dict:
    """`_align_shard` in a pool worker: each task brings its own unpickled copy of the
    student, so the first copy of each vocabulary is kept and used for every later shard
    of this worker, whose piece and word caches the earlier shards filled."""
    kept = _WORKER_STUDENT.get(student.fingerprint)
    if kept is None:
        _WORKER_STUDENT.clear()
        kept = _WORKER_STUDENT[student.fingerprint] = student
    return _align_shard(in_path, out_path, kept, *args)


def _lines_at_least(paths: list[Path], limit: int = SPAWN_MIN_LINES) -> int:
    """min(limit, newlines in the files), reading no further than the limit needs."""
    lines = 0
    for path in paths:
        with open(path, "rb") as fh:
            while lines < limit and (block := fh.read(1 << 20)):
                lines += block.count(b"\n")
        if lines >= limit:
            return limit
    return lines


def _count_lines(path: Path) -> int:
    """Lines of a file, for the progress bar (blank lines included: the bar's total only),
    counted in blocks: a Python loop over the lines of a 300,000-record folder cost ~3 s CPU."""
    lines, last = 0, b"\n"
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n")


def _out_name(in_path: Path) -> str:
    return "aligned-" + in_path.stem.split("-", 1)[-1]


def align_teacher_dir(teacher_dir, student_tokenizer, out_dir, workers: int = 1, band: int = 0,
                      teacher_tokenizer: str | None = None, progress: bool = True,
                      implementation: str = "packed") -> list[dict]:
    """Align every `samples-*.jsonl` in `teacher_dir` into `out_dir`; returns one summary
    row per input shard (status "aligned" or "skipped" when already done).

    `implementation`: "packed" (packed.py, the default) or "per-record" (a dict per record
    through `align_records`, the slower path kept for comparison); both write the same bytes."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    teacher_dir, out_dir = Path(teacher_dir), Path(out_dir)
    inputs = sorted(teacher_dir.glob("samples-*.jsonl"))
    if not inputs:
        raise FileNotFoundError(f"no teacher shards samples-*.jsonl in {teacher_dir}")
    if workers < 1 or band < 0:
        raise ValueError(f"workers must be >= 1 and band >= 0 (got workers={workers}, band={band})")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, pending = {}, []
    for p in inputs:
        target = out_dir / _out_name(p)
        if is_complete(target):
            meta = json.loads((target / "meta.json").read_text())
            rows[p.name] = {**meta.get("stats", {"shard": p.name}), "status": "skipped"}
        else:
            pending.append(p)
    # bytes: a line that is not UTF-8 is the readers' to report (naming file:line), not the progress bar's.
    # The count is one more pass over the folder (~2 s CPU for 300,000 GSM8K records), made
    # only for a bar that is shown; whether to spawn workers needs only a lower bound
    lines = sum(map(_count_lines, pending)) if progress else None
    spawn = workers > 1 and len(pending) > 1 and _lines_at_least(pending) >= SPAWN_MIN_LINES
    bar = tqdm(total=lines, unit="sample", desc="align", disable=not progress)
    try:
        # the packed path hands workers a ready StudentTokenizer (no transformers import there)
        prepare = StudentTokenizer.load if implementation == "packed" else _load_student
        if spawn:
            student = prepare(student_tokenizer)
            procs = min(workers, len(pending))
            task = _align_shard_in_worker if implementation == "packed" else _align_shard
            with ProcessPoolExecutor(procs, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
                futures = {pool.submit(task, str(p), str(out_dir / _out_name(p)), student, band,
                                       max(1, workers // procs), teacher_tokenizer, None, implementation): p
                           for p in pending}
                for fut in as_completed(futures):
                    row = fut.result()
                    rows[futures[fut].name] = {**row, "status": "aligned"}
                    bar.update(row["samples"])
        else:
            student = prepare(student_tokenizer)
            for p in pending:
                row = _align_shard(str(p), str(out_dir / _out_name(p)), student, band, workers,
                                   teacher_tokenizer, bar.update, implementation)
                rows[p.name] = {**row, "status": "aligned"}
    finally:
        bar.close()
    ordered = [rows[p.name] for p in inputs]
    (out_dir / "summary.json").write_text(json.dumps(ordered, indent=1))
    return ordered


def format_summary(rows: list[dict]) -> str:
    """A plain-text table: one line per shard and a total."""
    head = f"{'shard':<24} {'status':<8} {'samples':>8} {'positions':>10} {'mapped':>7} {'kept mass':>9} {'sec':>7}"
    lines = [head, "-" * len(head)]
    tot = MappingStats()
    secs = 0.0
    for r in rows:
        lines.append(f"{r.get('shard', '?'):<24} {r.get('status', ''):<8} {r.get('samples', 0):>8} "
                     f"{r.get('positions', 0):>10} {r.get('mapped_share', 0):>7.1%} "
                     f"{r.get('mean_kept_mass', 0):>9.3f} {r.get('seconds', 0):>7.1f}")
        tot = tot + MappingStats(r.get("positions", 0), r.get("mapped", 0),
                                 r.get("mean_kept_mass", 0) * r.get("mapped", 0), 0.0, r.get("samples", 0))
        secs += r.get("seconds", 0)
    lines.append("-" * len(head))
    lines.append(f"{'total':<24} {'':<8} {tot.samples:>8} {tot.positions:>10} {tot.mapped_share:>7.1%} "
                 f"{tot.mean_kept_mass:>9.3f} {secs:>7.1f}")
    return "\n".join(lines)
