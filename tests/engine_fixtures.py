"""Tiny world for engine tests: a T5-style tokenizer, aligned shards with a made-up teacher, a recipe.

The "teacher" distribution at each label position puts most mass on the label and the rest on a few
seeded other ids, so distribution matching has a real KL term; the shards go through the aligner's own
writer so the engine reads exactly what `specialize align` produces.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
TOP_K = 3
SIZES = {"train": 48, "dev": 8, "test": 4, "ood_steps": 8, "ood_templates": 4, "ood_numbers": 4,
         "generic_sort": 2, "generic_count": 2, "generic_bool": 2}


def build_world(root: Path, vocab_size: int = 600, samples_per_question: int = 2) -> dict:
    """<root>/tokenizer and <root>/aligned; returns their paths. Deterministic."""
    from specialize.aligner.shards import write_shards
    from specialize.engine.data import build_target
    from specialize.engine.data.synthetic import make_splits
    from specialize.engine.tokenizers import train_t5_unigram
    splits = make_splits(seed=0, sizes=SIZES)
    texts = [f"Q: {ex.question}\nA: Let's think step by step. {build_target(ex, None, 'zero_shot_cot')}"
             for split in splits.values() for ex in split]
    tok = train_t5_unigram(texts, vocab_size=vocab_size)
    tok.save_pretrained(root / "tokenizer")
    rng = np.random.default_rng(0)
    V = len(tok)
    records = []
    for ex in splits["train"]:
        target = build_target(ex, None, "zero_shot_cot")
        labels = np.asarray(tok(target)["input_ids"], dtype=np.int32)
        for s in range(samples_per_question):
            T = len(labels)
            ids = np.full((T, TOP_K), -1, dtype=np.int32)
            lps = np.zeros((T, TOP_K), dtype=np.float32)
            ids[:, 0] = labels
            for t in range(T):
                if t % 5 == 4:  # unaligned position: one-hot on the label, padding as the aligner writes it
                    lps[t] = [0.0, -np.inf, -np.inf]
                    continue
                others = rng.choice(np.setdiff1d(np.arange(3, V), [labels[t]]), TOP_K - 1, replace=False)
                ids[t, 1:] = others
                lps[t] = np.log([0.7, 0.2, 0.1])
            records.append(dict(qid=ex.id, sample_index=s, answer=ex.answer, question=ex.question,
                                input_ids=np.asarray(tok(ex.question)["input_ids"], dtype=np.int32),
                                labels=labels, topk_ids=ids, topk_logprobs=lps))
    write_shards(records, root / "aligned", shard_size=40)
    return {"tokenizer": str(root / "tokenizer"), "aligned": str(root / "aligned")}


def recipe_dict(world: dict, out_dir: Path, **sections) -> dict:
    """A fp32 CPU recipe on the tiny world; `sections` update single fields, e.g. train={"max_steps": 4}."""
    recipe = {
        "name": "engine_test",
        "model": {"config": "tiny", "tokenizer": world["tokenizer"],
                  "overrides": {"d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 4, "num_layers": 1,
                                "num_decoder_layers": 1, "dropout_rate": 0.1}},
        "data": {"dataset": "synthetic", "aligned_dir": world["aligned"],
                 "formats": {"zero_shot_cot": 0.5, "in_context_cot": 0.25, "zero_shot_answer_only": 0.25},
                 "format_mixing": "per_batch", "shots": 1, "max_source_len": 160, "max_target_len": 96,
                 "synthetic_sizes": SIZES, "ood_dev_size": 4},  # half of each 8-item synthetic OOD set
        "loss": {"kind": "dm", "alpha": 0.5, "temperature": 1.0, "tail": "none"},
        # CPU test runs use fp32: bf16 matmuls on this CPU are slow and add nothing to what is tested
        "deepspeed": {"config": None, "zero_stage": 1, "offload": []},
        "train": {"output_dir": str(out_dir), "seed": 0, "micro_batch_size": 4, "grad_accum": 1,
                  "max_steps": 12, "lr": 3e-3, "warmup_steps": 2, "precision": "fp32", "log_every": 1,
                  "eval_every": 0, "save_every": 6, "keep_last": 2, "dev_in_dist": "synthetic/dev",
                  "dev_ood": ["synthetic/ood_steps"], "dev_limit": 4},
        "eval": {"format": "zero_shot_cot", "batch_size": 8, "max_new_tokens": 8},
    }
    for section, fields in sections.items():
        recipe[section].update(fields)
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def env() -> dict:
    e = dict(os.environ)
    # CUDA_VISIBLE_DEVICES="": these are CPU (gloo) ranks; on a GPU host each rank would otherwise
    # pick cuda:LOCAL_RANK (set_device(1) fails with one GPU) and mix CUDA tensors into gloo collectives.
    e.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
             TORCH_EXTENSIONS_DIR=str(REPO / ".venv" / "torch_extensions"), PYTHONUNBUFFERED="1",
             CUDA_VISIBLE_DEVICES="")
    e.pop("SPECIALIZE_INJECT_NAN_AT_STEP", None)
    e.pop("SPECIALIZE_EXIT_AFTER_STEP", None)
    return e


def torchrun(recipe_path: Path, *extra: str, nproc: int = 2, env_extra: dict | None = None,
             timeout: int = 240) -> subprocess.CompletedProcess:
    """The engine under torchrun with `nproc` CPU ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "specialize.engine.train", "--recipe", str(recipe_path), *extra]
    return subprocess.run(cmd, env={**env(), **(env_extra or {})}, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def read_jsonl(path: Path) -> list[dict]:
    import json
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def loss_curve(run_dir: Path) -> dict[int, float]:
    """step -> train/loss from train_log.jsonl; a resumed run's later lines win for repeated steps."""
    return {row["step"]: row["train/loss"] for row in read_jsonl(Path(run_dir) / "train_log.jsonl")}


def save_untied_t5(model, path: Path, seed: int = 0) -> None:
    """Save `model` as a T5 v1.1 / FlanT5 checkpoint is stored: an lm_head of its own (random, apart from
    the shared embedding) and tie_word_embeddings false in config.json. transformers >= 5 builds every
    T5 tied, so a model of ours saves tied; the real checkpoints a user starts from are not."""
    import json

    import torch
    from safetensors.torch import save_file
    model.save_pretrained(path)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
             if k not in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")}
    gen = torch.Generator().manual_seed(seed)
    state["lm_head.weight"] = torch.randn(state["shared.weight"].shape, generator=gen) * 0.05
    save_file(state, str(Path(path) / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((Path(path) / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    cfg.pop("scale_decoder_outputs", None)
    (Path(path) / "config.json").write_text(json.dumps(cfg, indent=1))
