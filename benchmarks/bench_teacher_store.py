"""Teacher sample folders at scale: opening a folder to resume (the done-key scan) and the correctness
filter, on records shaped like the paper's (GSM8K-length chains, top-5 logprobs per token).

    python -m specialize.benchmarks.bench_teacher_store            # 20,000 records, writes results/teacher_store.json
    python -m specialize.benchmarks.bench_teacher_store --quick    # 1,000 records, writes nothing

Providers, side by side on one folder:
  open: msgspec   `ShardStore(folder)`: streams each shard, decodes only (qid, sample_index)
  open: json      the same keys by `json.loads` of every whole line (what a plain reader does)
  filter          `filter_samples(folder, out)`: streams the judged fields, copies kept lines as bytes
Each row gives seconds, records/s, the peak of Python allocations (tracemalloc, a second pass so the
timing pass runs untraced) and the time extrapolated to the paper's 298,920 records (7,473 questions
x 40 samples; every provider is one streaming pass, so its time grows linearly with the records).
The records are random: about 1 in 3 states the gold answer, as a teacher of about that accuracy.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
import tracemalloc
from datetime import datetime, timezone
from pathlib import Path

from specialize.engine.cli import HelpFormatter

RESULTS = Path(__file__).resolve().parent / "results"
PAPER_RECORDS = 7_473 * 40
WORDS = ("she", "has", "apples", "then", "buys", "more", "so", "total", "each", "costs", "dollars", "left")


def fake_record(rng: random.Random, qid: int, index: int, tokens: int, k: int = 5) -> dict:
    """One teacher record with every field the teacher writes, of realistic size."""
    gold = str(rng.randint(2, 999))
    answer = gold if rng.random() < 1 / 3 else str(rng.randint(2, 999))
    words = [rng.choice(WORDS) if i % 4 else str(rng.randint(1, 99)) for i in range(tokens - 4)]
    pieces = [" " + w for w in words] + [" The", " answer", " is", f" {answer}."]
    top = [{p: -0.1 * j for j, p in enumerate([piece] + [" " + rng.choice(WORDS) for _ in range(k - 1)])}
           for piece in pieces]
    return {"qid": f"gsm8k/train/{qid}", "sample_index": index, "prompt_hash": "0" * 16,
            "question": "A question of about forty words. " * 5, "gold": gold, "dataset": "gsm8k",
            "text": "".join(pieces).strip(), "tokens": pieces, "token_bytes": [list(p.encode()) for p in pieces],
            "token_logprobs": [round(-rng.random(), 4) for _ in pieces], "top_logprobs": top,
            "finish_reason": "stop", "cut": None, "usage": {"prompt_tokens": 900, "completion_tokens": len(pieces)},
            "model": "bench"}


def write_folder(folder: Path, records: int, tokens: int, seed: int = 0) -> int:
    """A teacher folder of `records` samples (10 per question), written through ShardStore; its bytes."""
    from specialize.engine.teacher.records import ShardStore
    rng = random.Random(seed)
    store = ShardStore(folder, {"bench": True})
    batch = []
    for i in range(records):
        batch.append(fake_record(rng, i // 10, i % 10, tokens))
        if len(batch) == 1000:
            store.append(batch)
            batch = []
    store.append(batch)
    store.close()
    return sum(p.stat().st_size for p in folder.glob("samples-*.jsonl"))


def open_json(folder: Path) -> set:
    done = set()
    for path in sorted(folder.glob("samples-*.jsonl")):
        with open(path, "rb") as fh:
            for line in fh:
                if line.strip():
                    r = json.loads(line)
                    done.add((r["qid"], r["sample_index"]))
    return done


def measure(fn) -> tuple[float, float, object]:
    """(seconds untraced, peak MB of Python allocations in a traced second pass, the first pass's result)."""
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return seconds, peak, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(formatter_class=HelpFormatter, description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1,000 records, nothing written")
    p.add_argument("--records", type=int, default=None, help="default 20,000 (--quick: 1,000)")
    p.add_argument("--tokens", type=int, default=110, help="tokens per chain (GSM8K chains: about 100)")
    p.add_argument("--out", default=None, help=f"JSON path (default {RESULTS / 'teacher_store.json'}; --quick: none)")
    args = p.parse_args(argv)
    from specialize.engine.teacher.filter import filter_samples
    from specialize.engine.teacher.records import ShardStore
    n = args.records or (1_000 if args.quick else 20_000)
    with tempfile.TemporaryDirectory() as tmp:
        folder, kept_dir = Path(tmp) / "teacher", Path(tmp) / "teacher-correct"
        size = write_folder(folder, n, args.tokens)
        providers = {
            "open: msgspec": lambda: ShardStore(folder, {"bench": True}).done,
            "open: json": lambda: open_json(folder),
            "filter": lambda: filter_samples(str(folder), str(kept_dir), verbose=False),
        }
        rows, keys = [], {}
        for name, fn in providers.items():
            seconds, peak, out = measure(fn)
            row = {"provider": name, "records": n, "seconds": round(seconds, 3), "records_per_s": round(n / seconds),
                   "peak_python_mb": round(peak, 1), "paper_scale_s": round(seconds * PAPER_RECORDS / n, 1)}
            if name.startswith("open"):
                keys[name] = out
            else:
                row["kept"] = out["kept"]
            rows.append(row)
    same_keys = keys["open: msgspec"] == keys["open: json"] and len(keys["open: json"]) == n
    print(f"\n{n:,} records, {size / 2**20:.0f} MB ({size / n / 1024:.1f} KB each); paper scale = {PAPER_RECORDS:,}")
    print(f"{'provider':14s} {'seconds':>8s} {'records/s':>10s} {'peak MB':>8s} {'at paper scale':>15s}")
    for r in rows:
        print(f"{r['provider']:14s} {r['seconds']:8.2f} {r['records_per_s']:10,d} {r['peak_python_mb']:8.1f} "
              f"{r['paper_scale_s']:13.1f} s")
    print(f"same done keys from both readers: {same_keys}")
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "load_avg": os.getloadavg(),
              "cpus": len(os.sched_getaffinity(0)), "records": n, "tokens": args.tokens,
              "bytes_per_record": round(size / n), "same_done_keys": same_keys, "rows": rows}
    path = Path(args.out) if args.out else (None if args.quick else RESULTS / "teacher_store.json")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")
    return 0 if same_keys else 1


if __name__ == "__main__":
    raise SystemExit(main())
