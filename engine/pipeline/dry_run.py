"""`specialize run --dry-run`: check that the stages wire together, on true shapes and tiny data."""
from __future__ import annotations

from pathlib import Path

from specialize.engine.config import (
    ConfigError,
)
from specialize.engine.pipeline.runs import STAGES, Run
from specialize.engine.pipeline.stages import is_done, load_examples, marker_path, training_pool, wanted_stages

# The stage whose finished outputs each stage reads (the teacher reads the toy stage's model only in
# recipes that have a toy stage).
READS = {"teacher": "toy", "filter": "teacher", "align": "filter", "train": "align", "eval": "train"}

# ----------------------------------------------------------------------------- dry run

def _check_deepspeed(run: Run, world_size: int) -> str:
    """The engine's own DeepSpeed config builder, so the dry run fails exactly where training would."""
    from specialize.engine.ds_config import build_ds_config
    r = run.recipe
    if isinstance(r.deepspeed.config, str) and not Path(r.deepspeed.config).is_file():
        raise ConfigError(f"{run.source}: deepspeed.config: file {r.deepspeed.config!r} not found (paths are "
                          f"relative to the directory `specialize run` is started from)")
    try:
        ds = build_ds_config(r, world_size)
    except ConfigError as err:
        raise ConfigError(f"{run.source}: {err}") from None
    zero = ds["zero_optimization"]
    precision = "bf16" if ds["bf16"]["enabled"] else "fp16" if ds["fp16"]["enabled"] else "fp32"
    offload = [k for k in ("offload_optimizer", "offload_param") if k in zero]
    return (f"ZeRO-{zero['stage']} {precision}, offload={offload or 'none'}, train_batch_size="
            f"{ds['train_batch_size']} = {ds['train_micro_batch_size_per_gpu']} x "
            f"{ds['gradient_accumulation_steps']} x {world_size} ranks")


def _meta_model(run: Run):
    """The student's true shapes, random-init on the meta device (no memory is allocated)."""
    import torch
    from transformers import T5ForConditionalGeneration

    from specialize.engine.models import t5_config
    cfg = t5_config(run.recipe.model.config, **run.recipe.model.overrides)
    with torch.device("meta"):
        model = T5ForConditionalGeneration(cfg)
    return cfg, model


def stages_to_run(run: Run, stages: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(the stages a real `specialize run` would run, notes on the inputs they read from stages it would
    not). Raises ConfigError where that run would fail: a finished stage of another configuration, or
    an input that is not there (a stage left out by --stages that never finished, a missing folder)."""
    r = run.recipe
    to_run = [s for s in wanted_stages(run, stages) if s == "plot" or not is_done(run, s)]
    notes = []
    for stage in to_run:
        source = READS.get(stage)
        if source is None or source in to_run or (source == "toy" and "toy" not in r.stages):
            continue
        folder = run.dir(source)
        if source in r.stages and not is_done(run, source):
            raise ConfigError(f"{run.source}: the {stage} stage reads the {source} stage's outputs from {folder}, "
                              f"which holds none finished (no {marker_path(folder, source).name}); run the "
                              f"{source} stage too (it is left out by --stages)")
        if not folder.exists():
            raise ConfigError(f"{run.source}: the {stage} stage reads {folder}, which does not exist (the recipe "
                              f"has no {source} stage to write it)")
        notes.append(f"{stage} reads {folder}")
    return to_run, notes


def _check_inputs(run: Run, to_run: list[str]) -> str:
    """What the stages that will run need from this machine: the teacher's API key, the local data files
    (data.data_dir) of every set they read. Without data_dir the sets come from the hub at run time,
    which an offline dry run cannot check."""
    import os
    r = run.recipe
    found = []
    if "teacher" in to_run and r.teacher.backend == "openai":
        if not os.environ.get(r.teacher.api_key_env):
            raise ConfigError(f"{run.source}: teacher.api_key_env: environment variable {r.teacher.api_key_env} "
                              f"is not set; the teacher stage needs it")
        found.append(f"API key in ${r.teacher.api_key_env}")
    if not r.data.data_dir:
        return "; ".join(found + ["data from the hub at run time (data.data_dir null: not checked offline)"])
    reads = [("teacher", r.teacher.dataset, r.teacher.split), ("train", r.data.dataset, "train")]
    reads += [("eval", name, "test") for name in r.eval.datasets]
    for stage, name, split in reads:
        if stage not in to_run or name.startswith("synthetic"):
            continue
        try:
            n = len(load_examples(r, name, split))
        except (OSError, ValueError) as err:
            raise ConfigError(f"{run.source}: data.data_dir {r.data.data_dir}: the {stage} stage reads {name} "
                              f"({split}): {err}") from None
        found.append(f"{name} {split} {n:,}")
    return "; ".join(found) or "nothing read from data.data_dir"


def _tiny_examples(run: Run, n: int = 6) -> tuple[list, str]:
    """A few training examples: the recipe's own data when it is on disk, else the synthetic stand-in."""
    r = run.recipe
    if r.data.dataset == "synthetic" or r.data.data_dir:
        try:
            return training_pool(r)[:n], r.data.dataset
        except (OSError, FileNotFoundError):
            pass
    from specialize.engine.data.synthetic import make_splits
    return list(make_splits(seed=0)["train"][:n]), "synthetic stand-in (recipe data not on disk)"


def _tiny_tokenizer(run: Run, texts: list[str]):
    """The recipe's student tokenizer when it loads offline, else a small T5-style one trained here."""
    from specialize.engine.tokenizers import load_tokenizer, train_t5_unigram
    name = run.recipe.aligner.student_tokenizer or run.recipe.model.tokenizer
    if name:
        try:
            return load_tokenizer(name), name
        except (OSError, ValueError):
            pass
    return train_t5_unigram(texts * 4, vocab_size=200), f"stand-in ({name} not available offline)"


def dry_run(run: Run, world_size: int = 8, stages: list[str] | None = None) -> list[tuple[str, str]]:
    """Check that the stages wire together and that what the stages to run (`stages`: --stages, default
    the recipe's; finished ones are skipped as a real run skips them) read is there; returns (check,
    detail) rows, raises on the first mismatch."""
    import numpy as np
    import torch

    from specialize.engine.data import FORMATS, build_prompt, build_target, draw_exemplars, extract_answer
    r, rows = run.recipe, []
    bad = [s for s in r.stages if s not in STAGES]
    if bad:
        raise ConfigError(f"{run.source}: stages: unknown stage {bad[0]!r} (known: {', '.join(STAGES)})")
    if "toy" in r.stages and r.teacher.backend != "hf":
        raise ConfigError(f"{run.source}: the toy stage trains a local teacher, so teacher.backend must be hf")
    to_run, notes = stages_to_run(run, stages)
    rows.append(("stages", (" -> ".join(to_run) or "none left") + f"  (run dir {run.run_dir})"
                 + "".join(f"; {note}" for note in notes)))
    rows.append(("deepspeed", _check_deepspeed(run, world_size)))

    cfg, model = _meta_model(run)
    params = sum(p.numel() for p in model.parameters())
    rows.append(("model", f"{r.model.config}: {params / 1e6:,.{0 if params > 1e8 else 2}f}M params, d_model={cfg.d_model}, "
                          f"layers={cfg.num_layers}+{cfg.num_decoder_layers}, vocab={cfg.vocab_size} (meta device)"))

    examples, data_note = _tiny_examples(run)
    for fmt in list(r.data.formats) + [r.teacher.format, r.eval.format]:
        if fmt not in FORMATS:
            raise ConfigError(f"{run.source}: prompt format {fmt!r} unknown (known: {', '.join(FORMATS)})")
    tok, tok_note = _tiny_tokenizer(run, [e.question + " " + (e.rationale or "") for e in examples])
    if len(tok) > cfg.vocab_size and r.model.name_or_path and r.model.config != "tiny":
        # A pretrained checkpoint cannot grow its embedding: ids past vocab_size would index out of range.
        raise ConfigError(f"{run.source}: tokenizer has {len(tok)} ids but {r.model.config} has vocab_size "
                          f"{cfg.vocab_size}")
    lengths = []
    for fmt in r.data.formats:
        ex = examples[0]
        in_context = fmt.startswith("in_context")
        shots = draw_exemplars(examples, r.data.shots, r.train.seed, exclude_id=ex.id) if in_context else ()
        source, target = build_prompt(ex.question, fmt, shots), build_target(ex, ex.answer, fmt)
        if extract_answer(target, "gsm8k" if r.data.dataset == "gsm8k" else r.data.dataset) is None:
            raise ValueError(f"{run.source}: data format {fmt}: no answer can be read back from target {target!r}")
        lengths.append(f"{fmt} src={len(tok(source)['input_ids'])} tgt={len(tok(target)['input_ids'])}")
    rows.append(("data", f"{data_note}; tokenizer {tok_note}; " + ", ".join(lengths)))
    rows.append(("teacher", f"{r.teacher.backend}:{r.teacher.model} {r.teacher.format} {r.teacher.shots}-shot "
                            f"({r.teacher.prompt} prompt{', cut at the answer' if r.teacher.cut_at_answer else ''}), "
                            f"{r.teacher.samples} samples, T={r.teacher.temperature}, top-{r.teacher.top_logprobs} "
                            f"({r.teacher.logprobs} logprobs)"))

    # Aligned shards in the layout the engine reads, ids drawn from the true vocabulary.
    import tempfile

    from specialize.aligner.shards import AlignedShards, write_shards
    k, rng = r.teacher.top_logprobs, np.random.default_rng(0)
    records = []
    for i, ex in enumerate(examples[:3]):
        labels = np.asarray(tok(build_target(ex, ex.answer, "zero_shot_cot"))["input_ids"], dtype=np.int32)
        ids = rng.integers(3, cfg.vocab_size, size=(len(labels), k)).astype(np.int32)
        ids[:, 0] = labels
        logp = np.log(np.full((len(labels), k), 1.0 / k, dtype=np.float32))
        records.append({"qid": ex.id, "sample_index": 0, "answer": ex.answer, "question": ex.question,
                        "input_ids": np.asarray(tok(ex.question)["input_ids"], dtype=np.int32), "labels": labels,
                        "topk_ids": ids, "topk_logprobs": logp})
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(records, tmp)
        shards = AlignedShards(tmp)
        item = shards[0]
        if item["topk_ids"].shape != (len(item["labels"]), k):
            raise ValueError(f"aligned shards: topk_ids {item['topk_ids'].shape} vs labels {item['labels'].shape}, K={k}")
        rows.append(("aligned", f"{len(shards)} records read back, K={k}, labels {item['labels'].shape}"))
        # copies: the shards are read-only memory maps
        topk_ids = torch.tensor(np.array(item["topk_ids"]), dtype=torch.long)
        topk_lp = torch.tensor(np.array(item["topk_logprobs"]))
        target = torch.tensor(np.array(item["labels"]), dtype=torch.long)

    # The loss on the true hidden size and vocabulary, a few rows only, through the engine's own lm_head
    # module (models.FusedLMHead: the kernel it picks, hidden_scale, alpha for sm/dm), not a copy of it.
    from specialize.engine.models import FusedLMHead, hidden_scale
    n = min(4, len(target))
    h = torch.randn(n, cfg.d_model)
    head = FusedLMHead(cfg.d_model, cfg.vocab_size, bias=False)
    with torch.no_grad():
        head.weight.normal_(std=cfg.d_model ** -0.5)
    head.configure(hidden_scale(cfg), r.loss)
    alpha = head.alpha
    loss, _, _ = head(h, topk_ids[:n], topk_lp[:n], target[:n])
    if not torch.isfinite(loss):
        raise ValueError(f"{run.source}: loss kernel returned {loss.item()} on true shapes")
    kernel = "fused_linear_sparse_kl_ce" if r.loss.fused_linear else "sparse_kl_ce"
    rows.append(("loss", f"{r.loss.kind}: {kernel} via FusedLMHead h[{n},{cfg.d_model}] "
                         f"W[{cfg.vocab_size},{cfg.d_model}] K={k} alpha={alpha} -> {loss.item():.3f}"))
    rows.append(("eval", f"{', '.join(r.eval.datasets)} ({r.eval.format}); plots: {', '.join(r.plot.plots) or 'none'}"))
    # last: the wiring above holds for any machine, this is about this one
    rows.append(("inputs", _check_inputs(run, to_run)))
    return rows


