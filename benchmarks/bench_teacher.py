"""hf teacher throughput: one copy in this process vs `teacher.replicas` copies in spawned processes,
on the same questions and model, in one run.

    python -m specialize.benchmarks.bench_teacher            # 4,096 questions, writes results/teacher_cpu.json
    python -m specialize.benchmarks.bench_teacher --quick    # 128 questions, writes nothing

The model has the demo's toy teacher shape (Llama-style, 4 layers, width 128; random init, so every
sample runs to --max-tokens and all providers do the same work) with a byte-level BPE trained on
the synthetic world. Each provider samples every question once through `teacher.generate`, start-up
included (a replica pool spawns and loads its copies). Rows are compared by samples/s; each
provider's records are checked equal to the one-copy provider's (text and tokens).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from specialize.engine.cli import HelpFormatter

RESULTS = Path(__file__).resolve().parent / "results"


def _teacher(folder: Path) -> None:
    import torch

    from specialize.engine.data import load_dataset_by_name
    from specialize.engine.demo.toy_models import build_toy_teacher
    from specialize.engine.tokenizers import train_byte_bpe
    texts = [f"{e.question} {e.rationale}" for e in load_dataset_by_name("synthetic/train")[:500]]
    tok = train_byte_bpe(texts, 500)
    torch.manual_seed(0)
    model = build_toy_teacher(tok)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def _records(folder: str) -> dict:
    from specialize.engine.teacher import iter_records
    return {(r["qid"], r["sample_index"]): (r["text"], r["tokens"]) for r in iter_records(folder)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(formatter_class=HelpFormatter, description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="128 questions, nothing written")
    p.add_argument("--questions", type=int, default=None, help="default 4096 (--quick: 128)")
    p.add_argument("--max-tokens", type=int, default=48, help="most tokens per sample (a random model rarely stops sooner)")
    p.add_argument("--replicas", default="2", help="comma list of copy counts to compare with one copy")
    p.add_argument("--out", default=None, help=f"JSON path (default {RESULTS / 'teacher_cpu.json'}; --quick: none)")
    args = p.parse_args(argv)
    import torch

    from specialize.engine.config import TeacherConfig
    from specialize.engine.data import load_dataset_by_name
    from specialize.engine.teacher import generate
    from specialize.engine.teacher.hf_backend import HFBackend
    from specialize.engine.teacher.hf_replicas import ReplicatedHFBackend
    n = args.questions or (128 if args.quick else 4096)
    examples = load_dataset_by_name("synthetic/train", sizes={"train": max(n, 2000)})[:n]
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "teacher"
        _teacher(model_dir)
        cfg = TeacherConfig(backend="hf", model=str(model_dir), dataset="synthetic", format="zero_shot_cot",
                            shots=0, samples=1, temperature=0.7, max_tokens=args.max_tokens, top_logprobs=5)
        for copies in [1] + [int(c) for c in args.replicas.split(",") if c.strip()]:
            out = str(Path(tmp) / f"out-{copies}")
            start = time.perf_counter()
            backend = (HFBackend.from_pretrained(str(model_dir), device="cpu") if copies == 1
                       else ReplicatedHFBackend(model_dir, copies, device="cpu"))
            try:
                summary = generate(cfg, examples, out, backend, progress=False)
            finally:
                if copies > 1:
                    backend.close()
            seconds = time.perf_counter() - start
            got = _records(out)
            reference = reference or got
            rows.append({"provider": "one copy" if copies == 1 else f"{copies} replicas", "copies": copies,
                         "threads_per_copy": max(1, torch.get_num_threads() // copies), "samples": summary["samples"],
                         "seconds": round(seconds, 2), "samples_per_s": round(summary["samples"] / seconds, 1),
                         "records_equal_one_copy": got == reference})
    base = rows[0]["samples_per_s"]
    print(f"\n{'provider':12s} {'threads':>7s} {'samples':>8s} {'seconds':>8s} {'samples/s':>10s} {'vs one':>7s} equal")
    for r in rows:
        r["speedup_vs_one_copy"] = round(r["samples_per_s"] / base, 2)
        print(f"{r['provider']:12s} {r['threads_per_copy']:7d} {r['samples']:8d} {r['seconds']:8.1f} "
              f"{r['samples_per_s']:10.1f} {r['speedup_vs_one_copy']:7.2f} {r['records_equal_one_copy']}")
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "load_avg": os.getloadavg(),
              "cpus": len(os.sched_getaffinity(0)), "questions": n, "max_tokens": args.max_tokens, "rows": rows}
    path = Path(args.out) if args.out else (None if args.quick else RESULTS / "teacher_cpu.json")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")
    return 0 if all(r["records_equal_one_copy"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
