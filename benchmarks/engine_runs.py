"""Run the real engine (and the HF baseline) on a synthetic world of fixed shape, for timing and memory.

The world: a small T5-style tokenizer and aligned shards whose every sample has exactly `src_len` source
tokens (a long question, cut by the engine's max_source_len) and `tgt_len` labels with a top-k teacher,
so every micro-batch is B × S → B × T with no padding and the token counts are known in advance.
Shared by `specialize memory --measure` and benchmarks/bench_engine.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

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
    try:
        from specialize.aligner.shards import write_shards
        write_shards(records, root / "aligned", shard_size=256)
    except ModuleNotFoundError:  # the engine's own fallback reader (engine.batching.open_shards)
        import pickle
        (root / "aligned").mkdir(parents=True, exist_ok=True)
        (root / "aligned" / "records.pkl").write_bytes(pickle.dumps(records))
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
                  "max_steps": steps, "lr": 1e-4, "warmup_steps": 0, "optimizer": optimizer,
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


def run_engine(recipe: dict, nproc: int = 1, timeout: int = 900, env: dict | None = None) -> dict:
    """Run `specialize.engine.train` on the recipe in a fresh process; returns its per-step log rows.

    The engine saves a checkpoint and the best/ export at its last step; the recipe's output_dir is a
    throwaway directory for that reason."""
    import yaml
    out = Path(recipe["train"]["output_dir"])
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    cmd = launcher + ["-m", "specialize.engine.train", "--recipe", str(path)]
    proc = subprocess.run(cmd, env=subprocess_env(env), capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)
    log = out / "train_log.jsonl"
    rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.is_file() else []
    return {"returncode": proc.returncode, "rows": rows, "stderr_tail": proc.stderr[-3000:]}


def steady(rows: list[dict], key: str, skip: int) -> float | None:
    """Median of `key` over the log rows after the first `skip` (warm-up) steps."""
    vals = [r[key] for r in rows[skip:] if key in r] or [r[key] for r in rows if key in r]
    return float(np.median(vals)) if vals else None


def scratch_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
