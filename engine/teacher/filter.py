"""`filter_samples`: keep the teacher samples that end on an answer line ("The answer is N") whose
answer equals the gold answer. Without the line the extraction falls back to the text's last number,
which a chain cut off at max_tokens ("... 3 * 5 = 15 dollars. Then she") can match: the student
would learn targets that never state an answer. Such samples are counted, not kept.

Writes the kept records (same schema) to `<out>/samples-NNNNN.jsonl`, `shard_lines` per shard so that
`specialize align --workers N` has shards to spread over processes, the input manifest plus
filter counts to `<out>/manifest.json`, and per-question accuracy to `<out>/per_question.jsonl`.
The output is rebuilt from scratch on every call (written to temporary files, then renamed), so
rerunning after a crash or on a grown input is safe.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Optional

import msgspec

from .records import MANIFEST, SHARD_GLOB, iter_record_lines, read_manifest, shard_name

_BUCKETS = ("0%", "(0,25%]", "(25,50%]", "(50,75%]", "(75,100%)", "100%")


def _bucket(acc: float) -> str:
    """Histogram bucket of one question's accuracy; 0% and 100% get their own."""
    if acc <= 0.0:
        return _BUCKETS[0]
    if acc >= 1.0:
        return _BUCKETS[-1]
    return _BUCKETS[1 + min(3, int((acc - 1e-12) // 0.25))]


def _write_atomic(path: Path, lines, binary: bool = False) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8") as fh:
        for line in lines:
            fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def record_order(key: tuple[str, int]) -> tuple:
    """Sort key of a record's (qid, sample_index): the qid's numbers compared as numbers, so
    "synthetic/train/10" follows ".../9" (file order of the question set for the usual ids)."""
    qid, index = key
    parts = re.split(r"(\d+)", qid)  # text, number, text, ...: the odd places are the numbers
    return tuple(int(part) if i % 2 else part for i, part in enumerate(parts)), index


class _Judged(msgspec.Struct):
    """The fields of a record the filter reads (msgspec skips the top-k, most of each line)."""
    qid: str
    sample_index: int
    gold: str
    dataset: str
    text: str
    finish_reason: Optional[str] = None
    cut: Optional[dict] = None


_JUDGED = msgspec.json.Decoder(_Judged)


def filter_samples(in_dir: str, out_dir: str, verbose: bool = True, shard_lines: int = 20_000) -> dict:
    """Keep correct samples of `in_dir` in `out_dir`; returns {samples, kept, accuracy, questions,
    questions_kept, per_question_mean_accuracy, cut_samples, kept_without_cut, accuracy_without_cut,
    dropped_without_answer_line, stopped_by_max_tokens}."""
    from specialize.engine.data import is_correct
    from specialize.engine.data.answers import ANSWER_IS

    def states_gold(text: str, record: _Judged) -> bool:
        """The filter's rule: an answer line, and its answer is the gold."""
        return bool(ANSWER_IS.search(text)) and is_correct(text, record.gold, record.dataset)

    in_dir, out = Path(in_dir), Path(out_dir)
    if not any(in_dir.glob(SHARD_GLOB)):
        raise FileNotFoundError(f"no teacher shards samples-*.jsonl in {in_dir}")
    out.mkdir(parents=True, exist_ok=True)
    per_q: dict[str, list[int]] = {}  # qid -> [samples, correct]
    texts: dict[str, set[int]] = {}  # qid -> its distinct sample texts (hashed)
    # kept: (order, shard, offset, length); the lines are copied from the shards at the end, so that
    # 300k records (~5 GB) are never all in memory
    seen, kept_lines = set(), []
    # What the filter would keep on the uncut text (record text + the cut's dropped_text): the
    # share the answer-line cut saves, reported beside the real count.
    kept_uncut = cut_count = 0
    no_answer_line = truncated = 0  # right by the last number but no answer line; finish_reason "length"
    for path, offset, line in iter_record_lines(in_dir):
        try:
            judged = _JUDGED.decode(line)
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            raise ValueError(f"{path} at byte {offset}: not a teacher record ({err})") from None
        key = (judged.qid, judged.sample_index)
        if key in seen:  # defensive: generate never writes a key twice
            continue
        seen.add(key)
        ok = states_gold(judged.text, judged)
        # right by the last number alone: looked at only where the answer line is missing (rare)
        no_answer_line += (not ok and not ANSWER_IS.search(judged.text)
                           and is_correct(judged.text, judged.gold, judged.dataset))
        truncated += judged.finish_reason == "length"
        cut = judged.cut
        cut_count += cut is not None
        kept_uncut += ok if cut is None else states_gold(judged.text + cut.get("dropped_text", ""), judged)
        texts.setdefault(judged.qid, set()).add(hash(judged.text))
        counts = per_q.setdefault(judged.qid, [0, 0])
        counts[0] += 1
        counts[1] += ok
        if ok:
            kept_lines.append((record_order(key), path, offset, len(line)))
    # The teacher stores records in the order requests finish (a server with many requests in flight,
    # or several hf replicas), so that order changes from run to run. Kept in (question, sample) order,
    # the same samples always align and train alike.
    kept_lines = [ref for _, *ref in sorted(kept_lines, key=lambda k: k[0])]
    per_q = dict(sorted(per_q.items(), key=lambda item: record_order((item[0], 0))))
    for stale in out.glob(SHARD_GLOB):
        stale.unlink()
    if shard_lines < 1:
        raise ValueError(f"shard_lines must be >= 1, got {shard_lines}")
    with contextlib.ExitStack() as files:
        opened: dict = {}

        def copied(refs):
            for path, offset, length in refs:
                if path not in opened:
                    opened[path] = files.enter_context(open(path, "rb"))
                opened[path].seek(offset)
                yield opened[path].read(length)
        for n, start in enumerate(range(0, max(1, len(kept_lines)), shard_lines)):
            _write_atomic(out / shard_name(n), copied(kept_lines[start:start + shard_lines]), binary=True)
    _write_atomic(out / "per_question.jsonl",
                  (json.dumps({"qid": q, "samples": n, "correct": c, "accuracy": c / n}) + "\n"
                   for q, (n, c) in per_q.items()))
    samples, kept = len(seen), len(kept_lines)
    accs = [c / n for n, c in per_q.values()]
    result = {"samples": samples, "kept": kept, "accuracy": kept / samples if samples else 0.0,
              "questions": len(per_q), "questions_kept": sum(c > 0 for _, c in per_q.values()),
              "per_question_mean_accuracy": sum(accs) / len(accs) if accs else 0.0,
              "cut_samples": cut_count, "kept_without_cut": kept_uncut,
              "accuracy_without_cut": kept_uncut / samples if samples else 0.0,
              "dropped_without_answer_line": no_answer_line, "stopped_by_max_tokens": truncated,
              # of the questions with several samples, those whose samples are all one text: near all of
              # them at a temperature > 0 means the server gave every sample of a request one seed
              "questions_with_several_samples": sum(n > 1 for n, _ in per_q.values()),
              "questions_all_samples_identical": sum(per_q[q][0] > 1 and len(t) == 1 for q, t in texts.items())}
    manifest = read_manifest(in_dir) or {}
    _write_atomic(out / MANIFEST, [json.dumps({**manifest, "filtered_from": str(in_dir), "filter": result}, indent=1)])
    if verbose:
        hist = dict.fromkeys(_BUCKETS, 0)
        for a in accs:
            hist[_bucket(a)] += 1
        print(f"teacher accuracy: {kept}/{samples} samples correct ({100 * result['accuracy']:.1f}%), "
              f"mean per question {100 * result['per_question_mean_accuracy']:.1f}%")
        print(f"answer-line cut: {cut_count} samples cut; without the cut {kept_uncut}/{samples} would be kept "
              f"({100 * result['accuracy_without_cut']:.1f}%)")
        multi, same = result["questions_with_several_samples"], result["questions_all_samples_identical"]
        temperature = (manifest.get("settings") or {}).get("temperature")
        if multi and same >= 0.9 * multi and (temperature or 0) > 0:
            print(f"warning: {same} of the {multi} questions with several samples got the same text in every "
                  f"sample at temperature {temperature}: does the server give each sample of a request its own "
                  "seed? (SGLang with n > 1 and a seed may not)")
        if no_answer_line or truncated:
            print(f"{truncated} samples stopped at max_tokens; {no_answer_line} whose last number is the gold "
                  "were dropped for lack of an answer line (raise teacher.max_tokens if many were cut off)")
        print("questions by teacher accuracy: " + ", ".join(f"{k}: {v}" for k, v in hist.items()))
        print(f"questions with >= 1 kept sample: {result['questions_kept']}/{result['questions']} "
              f"(per question: {out / 'per_question.jsonl'})")
    return result
