"""hf teacher throughput: one copy in this process vs `teacher.replicas` copies in spawned processes,
on the same questions and model, in one run.

    python -m specialize.benchmarks.bench_teacher            # 4,096 questions, writes results/teacher_cpu.json
    python -m specialize.benchmarks.bench_teacher --quick    # 128 questions, writes nothing
    python -m specialize.benchmarks.bench_teacher --device cuda --replicas 1,8   # copies on cuda:0..N-1

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
    p.add_argument("--replicas", default="2",
                   help="comma list of replica-pool sizes to compare with one copy in this process (1: a pool of "
                        "one, the spawned path on its own)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (copies share the threads) or cuda (copy i on cuda:i, the in-process copy on cuda:0)")
    p.add_argument("--out", default=None,
                   help=f"JSON path (default {RESULTS / 'teacher_<device>.json'}; --quick: none)")
    args = p.parse_args(argv)
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible here")

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
        pools = [int(c) for c in args.replicas.split(",") if c.strip()]
        for copies, pooled in [(1, False)] + [(n, True) for n in pools]:
            out = str(Path(tmp) / f"out-{copies}-{pooled}")
            start = time.perf_counter()
            backend = (ReplicatedHFBackend(model_dir, copies, device=args.device) if pooled
                       else HFBackend.from_pretrained(str(model_dir), device="cuda:0" if args.device == "cuda" else "cpu"))
            ready = time.perf_counter()
            try:
                summary = generate(cfg, examples, out, backend, progress=False)
            finally:
                if pooled:
                    backend.close()
            seconds = time.perf_counter() - start
            got = _records(out)
            reference = reference or got
            threads = max(1, torch.get_num_threads() // copies) if args.device == "cpu" else None
            rows.append({"provider": f"{copies} replica{'s' * (copies > 1)}" if pooled else "one copy",
                         "copies": copies, "device": args.device, "threads_per_copy": threads,
                         "samples": summary["samples"], "seconds": round(seconds, 2),
                         "start_up_s": round(ready - start, 2),
                         "samples_per_s": round(summary["samples"] / seconds, 1),
                         "records_equal_one_copy": got == reference})
    base = rows[0]["samples_per_s"]
    print(f"\n{'provider':12s} {'threads':>7s} {'samples':>8s} {'seconds':>8s} {'samples/s':>10s} {'vs one':>7s} equal")
    for r in rows:
        r["speedup_vs_one_copy"] = round(r["samples_per_s"] / base, 2)
        threads = "-" if r["threads_per_copy"] is None else str(r["threads_per_copy"])
        print(f"{r['provider']:12s} {threads:>7s} {r['samples']:8d} {r['seconds']:8.1f} "
              f"{r['samples_per_s']:10.1f} {r['speedup_vs_one_copy']:7.2f} {r['records_equal_one_copy']}")
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "load_avg": os.getloadavg(),
              "cpus": len(os.sched_getaffinity(0)), "questions": n, "max_tokens": args.max_tokens, "rows": rows}
    if args.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name(0)
    path = Path(args.out) if args.out else (None if args.quick else RESULTS / f"teacher_{args.device}.json")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")
    return 0 if all(r["records_equal_one_copy"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
