"""Run the real engine on a synthetic world of fixed shape, for timing and memory.

The world: a small T5-style tokenizer and aligned shards whose every sample has exactly `src_len` source
tokens (a long question, cut by the engine's max_source_len) and `tgt_len` labels with a top-k teacher,
so every micro-batch is B × S → B × T with no padding and the token counts are known in advance.
Owned by the engine because `specialize memory --measure` uses it; benchmarks/bench_engine.py and
bench_host_syncs.py import it from here (benchmarks may import the product, never the reverse).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from specialize.engine.io_helpers import read_jsonl

REPO = Path(__file__).resolve().parents[1]


def synthetic_world(root: Path, n_samples: int, src_len: int, tgt_len: int, top_k: int = 5,
                    vocab_size: int = 600, seed: int = 0) -> dict:
    """<root>/tokenizer and <root>/aligned (reused when already built for the same shape)."""
    root = Path(root)
    stamp = root / "world.json"
    spec = dict(n_samples=n_samples, src_len=src_len, tgt_len=tgt_len, top_k=top_k, vocab_size=vocab_size,
                seed=seed)
    world = {"tokenizer": str(root / "tokenizer"), "aligned": str(root / "aligned"), **spec}
    if stamp.is_file() and json.loads(stamp.read_text()) == spec:
        return world
    from specialize.engine.tokenizers import train_t5_unigram
    rng = np.random.default_rng(seed)
    words = [str(w) for w in range(1000)]
    texts = [" ".join(rng.choice(words, 64)) for _ in range(300)]
    tok = train_t5_unigram(texts, vocab_size=vocab_size)
    tok.save_pretrained(root / "tokenizer")
    V = len(tok)
    records = []
    for i in range(n_samples):
        # more words than src_len tokens: the engine keeps the last max_source_len tokens (exactly S)
        question = " ".join(rng.choice(words, src_len + 8))
        labels = rng.integers(3, V, size=tgt_len).astype(np.int32)
        labels[-1] = tok.eos_token_id
        # top-k ids must be distinct per row: the label, then distinct non-zero offsets from it
        offsets = rng.permuted(np.tile(np.arange(1, V - 3), (tgt_len, 1)), axis=1)[:, : top_k - 1]
        others = (labels[:, None] - 3 + offsets) % (V - 3) + 3
        ids = np.concatenate([labels[:, None], others], 1).astype(np.int32)
        lps = np.log(np.full((tgt_len, top_k), 0.5 / max(1, top_k - 1), dtype=np.float32))
        lps[:, 0] = np.log(0.5)
        records.append(dict(qid=f"q{i}", sample_index=0, answer="1", question=question,
                            input_ids=np.asarray(tok(question)["input_ids"], dtype=np.int32),
                            labels=labels, topk_ids=ids, topk_logprobs=lps))
    from specialize.aligner.shards import write_shards
    write_shards(records, root / "aligned", shard_size=256)
    stamp.write_text(json.dumps(spec))
    return world


def engine_recipe(world: dict, out_dir: Path, *, model: str, overrides: dict | None = None, zero: int = 2,
                  offload: list[str] | None = None, optimizer: str = "adamw", precision: str = "bf16",
                  micro_batch: int = 8, steps: int = 5, fused: bool = True, loss: str = "dm",
                  checkpointing: bool = False) -> dict:
    """A recipe that trains `steps` steps on the synthetic world, logging every step, no dev evaluation."""
    return {
        "name": "bench",
        "model": {"config": model, "tokenizer": world["tokenizer"], "overrides": dict(overrides or {}),
                  "gradient_checkpointing": checkpointing},
        "data": {"dataset": "synthetic", "aligned_dir": world["aligned"], "formats": {"zero_shot_cot": 1.0},
                 "shots": 0, "max_source_len": world["src_len"], "max_target_len": world["tgt_len"]},
        "loss": {"kind": loss, "alpha": 0.5, "fused_linear": fused},
        "deepspeed": {"config": None, "zero_stage": zero, "offload": list(offload or [])},
        "train": {"output_dir": str(out_dir), "seed": 0, "micro_batch_size": micro_batch, "grad_accum": 1,
                  # one step more than measured: run_engine stops the engine after `steps` (see there)
                  "max_steps": steps + 1, "lr": 1e-4, "warmup_steps": 0, "optimizer": optimizer,
                  "precision": precision, "log_every": 1, "eval_every": 0, "save_every": 10 ** 9,
                  "keep_last": 1},
    }


def subprocess_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               TORCH_EXTENSIONS_DIR=str(REPO / ".venv" / "torch_extensions"))
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    env.update(extra or {})
    return env


def run_engine(recipe: dict, nproc: int = 1, timeout: int = 1800, env: dict | None = None) -> dict:
    """Run `specialize.engine.train` on the recipe in a fresh process; returns its per-step log rows and
    the peak host RSS of the whole process tree (see run_watched).

    The engine checkpoints and exports at its last step (minutes and tens of GB for a 3B model), which a
    throughput run does not want: the recipe asks for one step more than measured and the engine's own
    SPECIALIZE_EXIT_AFTER_STEP hook ends every rank right after the last measured step is logged."""
    import yaml
    out = Path(recipe["train"]["output_dir"])
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    cmd = launcher + ["-m", "specialize.engine.train", "--recipe", str(path)]
    stop = {"SPECIALIZE_EXIT_AFTER_STEP": str(recipe["train"]["max_steps"] - 1)}
    rc, peak_rss, stderr = run_watched(cmd, subprocess_env({**stop, **(env or {})}), timeout,
                                       out.parent / f"{out.name}.stderr")
    log = out / "train_log.jsonl"
    rows = read_jsonl(log)
    return {"returncode": rc, "rows": rows, "stderr_tail": stderr[-3000:], "peak_host_rss_gb": peak_rss / 2 ** 30}


def run_watched(cmd: list[str], env: dict, timeout: float, stderr_path: Path) -> tuple[int, int, str]:
    """Run `cmd` (stderr to a file, no pipes to fill up), sampling the RSS of its whole process tree;
    returns (exit status, peak RSS bytes, stderr text). Killed past `timeout` seconds."""
    import psutil
    peak = 0
    with open(stderr_path, "w") as err, open(os.devnull, "w") as devnull:
        proc = subprocess.Popen(cmd, env=env, stdout=devnull, stderr=err, cwd=REPO)
        t0 = time.monotonic()
        try:
            tree = psutil.Process(proc.pid)
            while proc.poll() is None:
                try:
                    peak = max(peak, sum(p.memory_info().rss for p in [tree, *tree.children(True)]))
                except psutil.Error:
                    pass
                try:
                    proc.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    pass
                if time.monotonic() - t0 > timeout:
                    proc.kill()
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    return proc.returncode, peak, Path(stderr_path).read_text()


def steady(rows: list[dict], key: str, skip: int) -> float | None:
    """Median of `key` over the log rows after the first `skip` (warm-up) steps."""
    vals = [r[key] for r in rows[skip:] if key in r] or [r[key] for r in rows if key in r]
    return float(np.median(vals)) if vals else None


def scratch_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
