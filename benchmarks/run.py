"""Run the CPU benchmarks in one go, print what each measured and a summary, write a JSON summary.

    python -m specialize.benchmarks.run [--quick] [--only NAME[,NAME]] [--out DIR]

Entries (each a module with `main(argv) -> int` taking `--quick`; one that is not installed yet gets a
"not available" row instead of failing the run):
  aligner   aligned pairs/s                 specialize.benchmarks.bench_aligner or specialize.aligner.bench
  loss_cpu  fused vs naive loss time/memory specialize.benchmarks.bench_loss_cpu
  engine    engine vs HF tokens/s, MFU, mem specialize.benchmarks.bench_engine (CPU mode)
  teacher   hf teacher samples/s, 1 vs N copies specialize.benchmarks.bench_teacher
  store     teacher folder open + filter speed  specialize.benchmarks.bench_teacher_store
The GPU benchmarks (bench_loss_gpu, bench_engine --mode gpu-xl / gpu-xxl) are run by hand on a GPU.
--out DIR: every entry writes its JSON there and the summary goes to DIR/run.json; without it a full run
writes to benchmarks/results/ and a --quick run writes nothing (quick figures are not results).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from specialize.engine.cli import HelpFormatter

RESULTS = Path(__file__).resolve().parent / "results"

# name -> candidate modules, and how to tell the entry where its JSON goes (None: the entry's default)
ENTRIES = {
    "aligner": (("specialize.benchmarks.bench_aligner", "specialize.aligner.bench"),
                lambda d: ["--out", str(d / "aligner.json")]),
    "loss_cpu": (("specialize.benchmarks.bench_loss_cpu",), lambda d: ["--out", str(d / "loss_cpu.json")]),
    "engine": (("specialize.benchmarks.bench_engine",), lambda d: ["--out", str(d)]),
    "teacher": (("specialize.benchmarks.bench_teacher",), lambda d: ["--out", str(d / "teacher_cpu.json")]),
    "store": (("specialize.benchmarks.bench_teacher_store",), lambda d: ["--out", str(d / "teacher_store.json")]),
}


def find_module(candidates):
    """The first candidate that imports; (None, reason) when none does. A module that exists but fails
    to import for another reason is reported as such, not hidden as 'not available'."""
    for name in candidates:
        try:
            return importlib.import_module(name), name
        except ModuleNotFoundError as err:
            if err.name and not name.startswith(err.name) and not err.name.startswith(name):
                return None, f"{name}: needs missing module {err.name!r}"
    return None, "not available (none of " + ", ".join(candidates) + " is installed yet)"


def run_entry(name: str, quick: bool, out: Path | None) -> dict:
    candidates, out_args = ENTRIES[name]
    module, where = find_module(candidates)
    row = {"entry": name, "module": where if module else None}
    if module is None:
        return dict(row, status="not available", detail=where, seconds=0.0)
    argv = (["--quick"] if quick else []) + (out_args(out) if out is not None and out_args else [])
    print(f"\n=== {name}: python -m {where} {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    try:
        rc = module.main(argv)
    except SystemExit as stop:  # argparse errors and explicit exits
        rc = stop.code if isinstance(stop.code, int) else 1
    except Exception as err:  # one broken entry must not hide the others' figures
        rc, row["detail"] = 1, f"{type(err).__name__}: {err}"
    row.update(argv=argv, returncode=rc, seconds=round(time.perf_counter() - t0, 2),
               status="ok" if rc == 0 else "failed")
    return row


def format_table(rows: list[dict]) -> str:
    lines = [f"{'entry':<10}{'status':<15}{'seconds':>9}  detail"]
    for r in rows:
        detail = r.get("detail") or (r.get("module") or "")
        lines.append(f"{r['entry']:<10}{r['status']:<15}{r['seconds']:>9.1f}  {detail}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m specialize.benchmarks.run", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, seconds per entry (the test suite's mode)")
    ap.add_argument("--only", default=None, help=f"comma list of entries ({', '.join(ENTRIES)})")
    ap.add_argument("--out", type=Path, default=None, help="folder for every JSON (see above)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    names = [n for n in args.only.split(",") if n] if args.only else list(ENTRIES)
    unknown = [n for n in names if n not in ENTRIES]
    if unknown:
        print(f"--only: unknown entry {unknown[0]!r} (known: {', '.join(ENTRIES)})", file=sys.stderr)
        return 2
    out = args.out if args.out else (None if args.quick else RESULTS)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    rows = [run_entry(n, args.quick, out) for n in names]
    print("\n" + format_table(rows))
    if out is not None:
        summary = {"command": "python -m specialize.benchmarks.run " + " ".join(
            sys.argv[1:] if argv is None else argv), "quick": args.quick,
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), "entries": rows}
        (out / "run.json").write_text(json.dumps(summary, indent=2))
        print(f"wrote {out / 'run.json'}")
    return 0 if all(r["status"] in ("ok", "not available") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
