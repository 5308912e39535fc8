"""Host syncs and data wait per optimizer step of the real entry point (CPU ranks, gloo).

    python -m specialize.benchmarks.bench_host_syncs [--steps 12] [--ranks 2] [--zero 2] [--out DIR]
    python -m specialize.benchmarks.bench_host_syncs --python OTHER/.venv/bin/python   # another checkout

Runs `specialize.engine.train` under benchmarks/engine_probe.py (PROBE=syncs) on the synthetic world of
engine/measure.py and reports, per steady-state optimizer step (first and last step left out):
  - host reads of tensor values by whose code asked: ours (specialize + transformers + torch outside the
    optimizer), DeepSpeed's step, torch.optim's step counters (host tensors on GPUs too). On a GPU each
    read of a device tensor drains the queue;
  - calls that wait for the whole device (`synchronize`; no-ops on a CPU, so counted by call);
  - collation time spent in the training process itself (zero with DataLoader workers), and the engine's
    own `data_wait_ms_per_step` (time blocked waiting for the next batch) where the engine logs it.
`--python` runs the same probe with another interpreter, e.g. one whose `specialize` is an older
checkout, so before/after are measured by one script.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from specialize.engine.cli import HelpFormatter
from specialize.engine.io_helpers import read_jsonl
from specialize.engine.measure import REPO, engine_recipe, scratch_dir, subprocess_env, synthetic_world

PROBE = REPO / "benchmarks" / "engine_probe.py"


def measure(python: str, steps: int, ranks: int, zero: int, workers: int) -> dict:
    import shutil

    import yaml
    root = scratch_dir("specialize-bench-syncs-")
    try:
        B, S, T = 4, 64, 32
        world = synthetic_world(root / "world", B * ranks * (steps + 2), S, T)
        recipe = engine_recipe(world, root / "run", model="tiny", zero=zero, precision="fp32", micro_batch=B,
                               steps=steps)
        recipe["train"].update(max_steps=steps, log_every=10 ** 6)  # one log row, at the last step
        if workers >= 0:  # older checkouts have no such field
            recipe["data"]["num_workers"] = workers
        path = root / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        cmd = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", str(PROBE),
               "--recipe", str(path)]
        ours = subprocess.run([python, "-c", "import specialize.engine as e, pathlib; "
                               "print(pathlib.Path(e.__file__).resolve().parents[1])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        env = subprocess_env({"PROBE": "syncs", "PROBE_OUT": str(root / "probe"), "OMP_NUM_THREADS": "1",
                              "PROBE_OURS": ours})
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"probe run failed ({proc.returncode}): {proc.stderr[-2000:]}")
        rec = json.loads((root / "probe" / "probe-rank0.json").read_text())
        marks = rec["reads_at_step"]
        per_step = {}
        for owner in ("ours", "deepspeed", "optimizer_step_counter"):
            diffs = np.diff([m.get(owner, 0) for m in marks])[:-1]  # steps 2..steps-1: no start-up, no log
            per_step[owner] = float(np.mean(diffs)) if len(diffs) else None
        syncs = np.diff(rec.get("device_syncs_at_step") or [0] * len(marks))[:-1]  # older probes: none counted
        per_step["device_sync"] = float(np.mean(syncs)) if len(syncs) else None
        log = read_jsonl(root / "run" / "train_log.jsonl")
        wait = log[-1].get("data_wait_ms_per_step") if log else None
        return {"reads_per_step": per_step, "collate_ms_per_step_in_training_process":
                1000 * rec.get("collate_s", 0.0) / steps, "data_wait_ms_per_step": wait}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_host_syncs", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--python", default=sys.executable, help="interpreter to run the engine with (default: this one)")
    ap.add_argument("--label", default="this checkout", help="name of the measured code in the table")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps (default 12)")
    ap.add_argument("--ranks", type=int, default=2, help="CPU ranks (default 2)")
    ap.add_argument("--zero", type=int, default=2, help="ZeRO stage (default 2)")
    ap.add_argument("--workers", type=int, default=2,
                    help="data.num_workers (default 2; -1 leaves it out, for checkouts without it)")
    ap.add_argument("--out", default=None, help="folder for host_syncs.json (default: print only)")
    args = ap.parse_args(argv)
    res = measure(args.python, args.steps, args.ranks, args.zero, args.workers)
    r = res["reads_per_step"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    print(f"host reads per optimizer step, ZeRO-{args.zero}, {args.ranks} CPU ranks, fp32, {args.steps} steps "
          f"(load {os.getloadavg()[0]:.2f})")
    print(f"{'code':<22}{'ours':>7}{'DeepSpeed':>11}{'optim ctr':>11}{'device sync':>13}{'collate ms':>12}"
          f"{'wait ms':>9}")
    print(f"{args.label:<22}{fmt(r['ours']):>7}{fmt(r['deepspeed']):>11}{fmt(r['optimizer_step_counter']):>11}"
          f"{fmt(r['device_sync']):>13}{res['collate_ms_per_step_in_training_process']:>12.2f}"
          f"{fmt(res['data_wait_ms_per_step']):>9}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        row = {**res, "label": args.label, "zero": args.zero, "ranks": args.ranks, "steps": args.steps,
               "load_avg_1m": os.getloadavg()[0], "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        path = out / "host_syncs.json"
        rows = json.loads(path.read_text())["rows"] if path.is_file() else []
        rows = [x for x in rows if x.get("label") != args.label] + [row]
        path.write_text(json.dumps({"command": "python -m specialize.benchmarks.bench_host_syncs", "rows": rows},
                                   indent=2))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
