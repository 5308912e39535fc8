"""`specialize train`: DeepSpeed ZeRO training of a T5 student by sample matching (sm) or distribution matching (dm).

    specialize train --recipe R.yaml [--set train.max_steps=100] [--resume]
    deepspeed [--hostfile H] --num_gpus N --module specialize.engine.train --recipe R.yaml
    torchrun --nproc_per_node 2 -m specialize.engine.train --recipe R.yaml        # CPU ranks: gloo

Reads top to bottom: setup (ranks, recipe, run dir, model, DeepSpeed, data, dev sets, resume) → train
(micro-batches → fused lm_head + sparse KL/CE → step; log, evaluate, checkpoint) → save (best/ export) →
cleanup. A step is one optimizer step (grad_accum micro-batches on every rank).

Exactness of --resume: the data position, every rank's RNG states, optimizer and LR-schedule states and
the step all come from the last complete checkpoint (rank 0 picks it and tells the others), so the loss
curve continues as if never stopped.
The hot loop crosses to the host once per optimizer step: losses and token counts are summed on the
device (step_stats.py) and read at logging steps; the non-finite check is one all-reduced device flag,
read before `engine.step()`. A non-finite loss (on any rank) stops the run with exit status 3: no
optimizer step is taken with it and no checkpoint is written after it.
Batches come from a DataLoader over this rank's micro-batch positions (worker processes, pinned memory,
non-blocking copies); a step's micro-batches across ranks are cut from neighbouring lengths (batching.py).
A lost rank (killed, hung or unreachable for longer than train.dist_timeout_s) stops the others with
exit status 4 and a message naming the step and the last complete checkpoint, instead of a job hanging
until the scheduler kills it.
Test hooks (environment): SPECIALIZE_INJECT_NAN_AT_STEP=N makes rank 0's loss NaN in optimizer step N;
SPECIALIZE_EXIT_AFTER_STEP=N hard-exits every rank (like a kill) once step N is done.
MFU: see engine/mfu.py (the formula and the peak table); not logged on CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from specialize.engine.cli import HelpFormatter
from specialize.engine.config import ConfigError, Recipe, load_recipe, recipe_hash
from specialize.engine.distributed import (
    _running,
    check_ranks_agree,
    fingerprint,
    init_distributed,
    is_lost_peer,
    lost_peer_message,
    on_rank0,
    rng_state,
    seed_everything,
    set_rng_state,
)
from specialize.engine.models import Distill, FusedLMHead, additive_mask  # noqa: F401 — documented here too

NAN_EXIT = 3
# what the model's forward reads from a batch (the rest is bookkeeping: formats, host-side counts)
MODEL_INPUTS = ("input_ids", "attention_mask", "decoder_input_ids", "labels", "topk_ids", "topk_logprobs")
LOST_PEER_EXIT = 4


class NonFiniteLoss(RuntimeError):
    pass


# ----------------------------------------------------------------------------- optimizer

def _param_groups(model, weight_decay: float):
    """Weight decay on matrices only: layer-norm scales (1-D) stay undecayed. The shape is the
    parameter's real one: under ZeRO-3 every local tensor is a flat partition, `ds_shape` the original."""
    def is_matrix(p) -> bool:
        return len(getattr(p, "ds_shape", p.shape)) >= 2
    decay = [p for p in model.parameters() if p.requires_grad and is_matrix(p)]
    rest = [p for p in model.parameters() if p.requires_grad and not is_matrix(p)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def build_optimizer(model, t):
    if t.optimizer == "adafactor":
        from transformers.optimization import Adafactor
        return Adafactor(_param_groups(model, t.weight_decay), lr=t.lr, scale_parameter=False,
                         relative_step=False, warmup_init=False)
    return torch.optim.AdamW(_param_groups(model, t.weight_decay), lr=t.lr, betas=(0.9, 0.999), eps=1e-8)


def warmup_cosine(warmup_steps: int, max_steps: int):
    """LR multiplier per optimizer step: linear warmup from 0, then cosine decay to 0 at max_steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


# ----------------------------------------------------------------------------- metrics

def peak_mem_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def grad_norm_now(model) -> float:
    """2-norm of the gradients in `.grad` (ZeRO-0 keeps them there; DeepSpeed reports no norm there)."""
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


# ----------------------------------------------------------------------------- dev evaluation

def selection_score(scores: dict, recipe: Recipe) -> float | None:
    """train.selection's value of one evaluation: select.selection_value, the rule `specialize select`
    applies to the same dev_scores.jsonl (one rule, so best/ and select cannot disagree)."""
    from specialize.engine.evaluation.select import selection_value
    t = recipe.train
    return selection_value(scores, t.selection, t.dev_in_dist, list(t.dev_ood))


def dev_evaluate(model, tokenizer, dev_sets: dict, recipe: Recipe, exemplars, rank: int, world: int,
                 partitioned: bool = False) -> tuple[dict, dict]:
    """(accuracy per dev set, every rank's predictions per dev set): each rank generates for a slice
    (examples rank::world) and the predictions are gathered on every rank.

    partitioned (ZeRO-3): the training model generates as it is, each module's weights gathered around
    its forward (no full copy anywhere); all ranks then run the same number of batches in step, and
    the dev sets go through one generate stream: every forward gathers the weights over all ranks,
    and with 32 ranks each holds a few questions per set, so set after set cost a stream's forwards
    (up to max_new_tokens) per set."""
    from specialize.engine.evaluation.evaluate import evaluate_model, generate_texts, prompt_for, score_predictions
    e = recipe.eval
    mine = {name: examples[rank::world] for name, examples in dev_sets.items()}
    if partitioned:
        flat = [(name, ex) for name, examples in mine.items() for ex in examples]
        # rank 0's slice is the largest of every set: its batch count is the one every rank runs
        largest_slice = sum(math.ceil(len(examples) / world) for examples in dev_sets.values())
        filler = next((examples[0] for examples in dev_sets.values() if examples), None)
        texts, cut = generate_texts(
            model, tokenizer, [prompt_for(ex, e.format, exemplars, recipe.data.data_dir) for _, ex in flat],
            e.batch_size, e.max_new_tokens, e.num_beams, progress=rank == 0, desc="dev", synced_gpus=True,
            min_batches=math.ceil(largest_slice / e.batch_size),
            filler_prompt=prompt_for(filler, e.format, exemplars, recipe.data.data_dir) if filler else None)
        local = {}
        for name, examples in mine.items():
            picked = [k for k, (n, _) in enumerate(flat) if n == name]
            rows = score_predictions([texts[k] for k in picked], examples, name).predictions if examples else []
            for row, k in zip(rows, picked):
                row["truncated"] = cut[k]
            local[name] = rows
    else:
        local = {name: evaluate_model(model, tokenizer, examples, name, fmt=e.format, exemplars=exemplars,
                                      batch_size=e.batch_size, max_new_tokens=e.max_new_tokens,
                                      num_beams=e.num_beams, progress=rank == 0,
                                      data_dir=recipe.data.data_dir).predictions if examples else []
                 for name, examples in mine.items()}
    gathered = [None] * world
    dist.all_gather_object(gathered, local)
    scores, predictions = {}, {}
    for name in dev_sets:
        everything = [p for part in gathered for p in part[name]]
        scores[f"dev/{name}_acc"] = (sum(bool(p["correct"]) for p in everything) / len(everything)
                                     if everything else float("nan"))
        predictions[name] = everything
    return scores, predictions


def refuse_dev_questions(shards, dev_sets: dict, aligned_dir: str) -> None:
    """A dev question among the training samples would score the student on what it trained on and
    bias checkpoint selection (a teacher folder answered under another dev split, or shards built
    from a split the dev set comes from)."""
    dev_ids = {e.id: name for name, examples in dev_sets.items() for e in examples}
    qids, _ = shards.qids_and_sample_indices()
    leaked = sorted({q for q in qids if q in dev_ids})
    if leaked:
        names = sorted({dev_ids[q] for q in leaked})
        raise ConfigError(f"data.aligned_dir {aligned_dir}: {len(leaked)} of its questions are dev questions of "
                          f"{', '.join(names)} (e.g. {', '.join(leaked[:3])}): the student would train on them. "
                          "Were these shards built from a teacher folder of another dev split (data.dev_size)? "
                          "Re-run the filter and align stages for this recipe")


def write_dev_predictions(predictions: dict, out_dir: Path) -> None:
    """out_dir/<dev set>.jsonl, one prediction per line (for error analysis and export checks)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in predictions.items():
        with open(out_dir / f"{name.replace('/', '_')}.jsonl", "w", encoding="utf-8") as f:
            for p in rows:
                f.write(json.dumps(p) + "\n")


# ----------------------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(prog="specialize train", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--recipe", required=True, help="recipe YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field (repeatable), e.g. train.max_steps=10")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        recipe = load_recipe(args.recipe, args.set)
    except ConfigError as err:
        print(f"specialize train: {err}", file=sys.stderr)
        return 2
    try:
        return train(recipe, args.resume, args.local_rank)
    except ConfigError as err:
        print(f"specialize train: {err}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteLoss as err:
        print(f"specialize train: {err}", file=sys.stderr, flush=True)
        return NAN_EXIT
    except Exception as err:  # noqa: BLE001 — anything but a lost peer is re-raised unchanged
        if not is_lost_peer(err):
            raise
        # the newline ends a progress bar line the failed step left open
        print(f"\nspecialize train: {lost_peer_message(err, recipe)}", file=sys.stderr, flush=True)
        return LOST_PEER_EXIT
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def train(recipe: Recipe, resume: bool, local_rank_arg: int = -1) -> int:
    # ------------------------------------------------------------------ setup
    import deepspeed
    from tqdm import tqdm

    from specialize.engine.batching import (
        BatchBuilder,
        BatchPlan,
        ExemplarSets,
        first_sample_per_question,
        micro_batch_loader,
        open_shards,
        sample_lengths,
    )
    from specialize.engine.checkpoints import (
        Rotator,
        check_every_rank_can_load,
        check_same_launch,
        choose_resume_tag,
        forget_lost_timeline,
        mark_complete,
    )
    from specialize.engine.data import COT_FORMATS, draw_exemplars, first_items, load_dataset_by_name
    from specialize.engine.ds_config import build_ds_config, deepspeed_optimizer_block, uses_deepspeed_optimizer
    from specialize.engine.export import export_model, model_from_state, rank0_state_dict
    from specialize.engine.io_helpers import append_jsonl
    from specialize.engine.mfu import mfu, peak_tflops
    from specialize.engine.models import build_model, describe, param_counts, torch_dtype
    from specialize.engine.rundir import RunDir, prepare_run_dir
    from specialize.engine.step_stats import StepStats
    from specialize.engine.tokenizers import load_tokenizer

    rank, world, local_rank = init_distributed(local_rank_arg, recipe.train.dist_timeout_s)
    t, d = recipe.train, recipe.data
    is_main = rank == 0
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    run = RunDir(t.output_dir, find_train=False)  # this run's own folder (prepare_run_dir creates it)
    ckpt_root = run.checkpoints
    on_rank0(lambda: prepare_run_dir(recipe, world, resume), rank)

    ds_config = build_ds_config(recipe, world)
    zero_stage = ds_config["zero_optimization"]["stage"]
    if not d.aligned_dir:
        raise ConfigError("data.aligned_dir: the engine trains on aligned shards; set the aligner's out dir")
    tok_name = recipe.model.tokenizer or recipe.model.name_or_path
    if not tok_name:
        raise ConfigError("model.tokenizer: needed when model.name_or_path is not set")
    tokenizer = load_tokenizer(tok_name)
    with_teacher = recipe.loss.kind == "dm"
    shards = open_shards(d.aligned_dir)
    lengths = sample_lengths(shards)
    dev_names = ([t.dev_in_dist] if t.dev_in_dist else []) + list(t.dev_ood)
    dev_sets = {n: first_items(load_dataset_by_name(n, d.data_dir, "dev", d.dev_size, t.seed, d.synthetic_sizes or None,
                                                    ood_dev_size=d.ood_dev_size), t.dev_limit)
                for n in dev_names} if t.eval_every > 0 else {}
    check_ranks_agree({"tokenizer": f"{len(tokenizer)} tokens, {fingerprint(sorted(tokenizer.get_vocab().items()))}",
                       "aligned samples": f"{len(shards)}, lengths {fingerprint(lengths.tobytes())}",
                       **{f"dev set {n}": f"{len(v)} questions, {fingerprint([e.id for e in v])}"
                          for n, v in dev_sets.items()}}, run.root, rank)
    refuse_dev_questions(shards, dev_sets, d.aligned_dir)
    tag = None
    if resume:
        tag, written = choose_resume_tag(run, rank)  # rank 0 decides; every rank loads the same tag
        if tag is not None:
            check_same_launch(ckpt_root / tag, written, world, zero_stage)

            def forget() -> None:
                for line in forget_lost_timeline(run, written["step"], written.get("best_step")):
                    print(f"[train] resume: {line}", flush=True)
            on_rank0(forget, rank)

    seed_everything(t.seed)  # same init on every rank
    dtype = torch_dtype(t.precision)
    t5 = build_model(recipe.model, vocab_size=len(tokenizer), dtype=dtype, ds_config=ds_config)
    born_partitioned = hasattr(t5.shared.weight, "ds_id")  # ZeRO-3: zero.Init partitioned it at creation
    model = Distill(t5, recipe.loss)
    if uses_deepspeed_optimizer(recipe):
        ds_config["optimizer"] = deepspeed_optimizer_block(recipe)
        optimizer = None
    else:
        optimizer = build_optimizer(model, t)
    schedule = warmup_cosine(t.warmup_steps, t.max_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        model_parameters=None if optimizer else _param_groups(model, t.weight_decay),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    _running["engine"] = engine
    counts = param_counts(t5)
    partitioned = zero_stage == 3

    pool_name = f"{d.dataset}/train" if d.dataset == "synthetic" else f"{d.dataset}_train"
    needs_pool = any(f.startswith("in_context") for f in d.formats) or recipe.eval.format.startswith("in_context")
    pool = load_dataset_by_name(pool_name, d.data_dir, "train", d.dev_size, t.seed,
                                d.synthetic_sizes or None) if needs_pool and d.shots else []
    builder = BatchBuilder(shards, tokenizer, ExemplarSets(pool, d.shots, t.seed), d.max_source_len,
                           d.max_target_len, with_teacher, vocab_size=t5.config.vocab_size)
    answer_only = any(f not in COT_FORMATS for f in d.formats)
    plan = BatchPlan(lengths, d.formats, d.format_mixing, t.micro_batch_size, t.seed, rank, world,
                     micro_batch_sizes={f: d.micro_batch_size_for(f, t.micro_batch_size) for f in d.formats},
                     answer_pool=first_sample_per_question(shards) if answer_only else None,
                     answer_lengths=sample_lengths(shards, "input") if answer_only else None)

    eval_exemplars = (draw_exemplars(pool, d.shots, t.seed) if recipe.eval.format.startswith("in_context")
                      else ())

    step, consumed, best, best_step = 0, 0, None, None
    if tag is not None:
        last_dir = ckpt_root / tag
        check_every_rank_can_load(last_dir, rank, world, zero_stage)
        _, client = engine.load_checkpoint(str(ckpt_root), tag=tag)
        step, consumed = client["step"], client["micro_batches"]
        best, best_step = client.get("best"), client.get("best_step")
        if client.get("recipe_hash") != recipe_hash(recipe) and is_main:
            print(f"[train] warning: the recipe (hash {recipe_hash(recipe)}) differs from the one "
                  f"{tag} was trained with ({client.get('recipe_hash')}): the run will not "
                  f"continue exactly as an uninterrupted one", flush=True)
        set_rng_state(torch.load(last_dir / f"rng-rank{rank}.pt", weights_only=False))  # checked above
        if is_main:
            print(f"[train] resumed from {last_dir} (step {step})", flush=True)
    elif resume and is_main:
        print(f"[train] --resume: no complete checkpoint in {ckpt_root}, starting fresh", flush=True)

    # Rank 0 alone writes the run dir's files. Each such write is in on_rank0, which every rank
    # joins: if it fails (a full disk, say), every rank stops with its error at once, rather than
    # the others waiting in their next collective for dist_timeout_s.
    writer = None

    def open_writer() -> None:
        nonlocal writer
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: TensorBoard hides the lost timeline's events past the resumed step
        writer = SummaryWriter(str(run.tensorboard), purge_step=step + 1 if tag is not None else None)
    on_rank0(open_writer, rank)
    if is_main:
        print(f"[train] {describe(t5)}; {recipe.loss.kind} loss; ZeRO-{zero_stage} "
              f"{t.precision}{' (built under zero.Init)' if born_partitioned else ''}; {world} rank(s) on "
              f"{device.type}; {len(shards)} aligned samples; "
              f"batch {t.micro_batch_size} x {t.grad_accum} x {world}", flush=True)
        if t.optimizer == "adafactor" and zero_stage >= 1:
            print(f"[train] note: ZeRO-{zero_stage} steps the optimizer on flat 1-D partitions, so Adafactor "
                  f"keeps a full second moment (4 B/param, not factored) and clips its update per partition",
                  flush=True)
    inject_nan = int(os.environ.get("SPECIALIZE_INJECT_NAN_AT_STEP", "0"))
    exit_after = int(os.environ.get("SPECIALIZE_EXIT_AFTER_STEP", "0"))
    peak = peak_tflops()
    rotator = Rotator(run, t.keep_last)

    def save_checkpoint() -> None:
        tag = run.tag(step)
        engine.save_checkpoint(str(ckpt_root), tag=tag, client_state={
            "step": step, "micro_batches": consumed, "best": best, "best_step": best_step,
            "recipe_hash": recipe_hash(recipe)})
        torch.save(rng_state(), ckpt_root / tag / f"rng-rank{rank}.pt")
        dist.barrier()  # every rank's files are on disk before the checkpoint counts as complete

        def complete() -> None:
            mark_complete(ckpt_root / tag, step, best_step, world, zero_stage)
            rotator.rotate(best_step)  # in the background: the next collective does not wait for deletes
        on_rank0(complete, rank)

    def export_best(info: dict) -> None:
        """best/ from rank 0 alone; under ZeRO-3 the weights are gathered module by module onto rank 0."""
        state = rank0_state_dict(engine, t5, rank)  # freed when this returns
        on_rank0(lambda: export_model(model_from_state(t5.config, state), tokenizer, run.best, info), rank)

    def evaluate_and_select() -> None:
        nonlocal best, best_step
        engine.eval()
        with torch.no_grad():
            scores, predictions = dev_evaluate(t5, tokenizer, dev_sets, recipe, eval_exemplars, rank, world,
                                               partitioned=partitioned)
        engine.train()
        score = selection_score(scores, recipe)
        improved = score is not None and (best is None or score > best)
        if improved:
            best, best_step = score, step
            export_best({"step": step, "selection": t.selection, "score": score, **scores})

        def record() -> None:
            write_dev_predictions(predictions, run.dev_predictions(step))
            append_jsonl(run.dev_scores_path, {"step": step, **scores, "selection_score": score})
            for k, v in scores.items():
                writer.add_scalar(k, v, step)
            print(f"[train] step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
                  + (" (best)" if improved else ""), flush=True)
        on_rank0(record, rank)

    # ------------------------------------------------------------------ train
    engine.train()
    loader = iter(micro_batch_loader(builder, plan, consumed, consumed + (t.max_steps - step) * t.grad_accum,
                                     workers=d.num_workers, pin_memory=cuda, seed=t.seed))
    bar = tqdm(total=t.max_steps, initial=step, desc="train", disable=not is_main, dynamic_ncols=True)
    stats = StepStats(device)
    train_seconds = data_wait = 0.0  # time inside steps only: evaluation and saving do not count
    while step < t.max_steps:
        t_step = time.perf_counter()
        logging = (step + 1) % t.log_every == 0 or step + 1 == t.max_steps
        for micro in range(t.grad_accum):
            t_wait = time.perf_counter()
            batch = next(loader)
            data_wait += time.perf_counter() - t_wait
            consumed += 1
            tensors = {k: batch[k].to(device, non_blocking=True) for k in MODEL_INPUTS}
            loss, ce, kl = engine(**tensors)
            if inject_nan and step + 1 == inject_nan and rank == 0:
                loss = loss * float("nan")
            stats.add(loss, ce, kl, batch["token_counts"].to(device, non_blocking=True))
            engine.backward(loss)
            if micro < t.grad_accum - 1:
                engine.step()  # inside the accumulation: DeepSpeed only counts the micro-step
        finite, n_bad = stats.step_is_finite()  # all ranks agree before any optimizer step
        if not finite:
            last = run.complete_checkpoints()
            where = f"last good checkpoint: {last[-1][1]}" if last else "no checkpoint was saved yet"
            bar.close()
            raise NonFiniteLoss(f"non-finite loss in step {step + 1} ({n_bad} micro-batch(es) over all ranks); "
                                f"stopped before the optimizer step, without saving — {where}. Lower "
                                f"train.lr, check the data, or resume with --resume")
        own_norm = grad_norm_now(model) if logging and zero_stage == 0 else None
        engine.step()
        step += 1
        train_seconds += time.perf_counter() - t_step
        bar.update(1)

        if logging:
            w = stats.reduce_window()
            n, elapsed = w["micro_batches"], train_seconds
            norm = engine.get_global_grad_norm()
            row = {"step": step, "train/loss": w["loss"] / n, "train/ce": w["ce"] / n, "train/kl": w["kl"] / n,
                   "lr": scheduler.get_last_lr()[0],
                   "grad_norm": float(norm) if norm is not None else own_norm,
                   "tokens_per_second_per_gpu": (w["src_tokens"] + w["tgt_tokens"]) / world / elapsed,
                   "data_wait_ms_per_step": 1000 * data_wait / (n / world / t.grad_accum),
                   "peak_mem_gb": peak_mem_gb()}
            utilisation = mfu(counts, w["src_tokens"], w["tgt_tokens"], elapsed, world, peak)
            if utilisation is not None:
                row["mfu"] = utilisation

            def log_row() -> None:
                append_jsonl(run.train_log, row)
                for k, v in row.items():
                    if k != "step" and v is not None:
                        writer.add_scalar(k, v, step)
                bar.set_postfix(loss=f"{row['train/loss']:.4f}", lr=f"{row['lr']:.2e}")
            on_rank0(log_row, rank)
            train_seconds = data_wait = 0.0
        if t.eval_every > 0 and dev_sets and (step % t.eval_every == 0 or step == t.max_steps):
            evaluate_and_select()
        if step % t.save_every == 0 or step == t.max_steps:
            save_checkpoint()
        if exit_after and step == exit_after:
            sys.stdout.flush()
            os._exit(0)  # test hook: behave like a killed job (no cleanup, nothing more written)
    bar.close()

    # ------------------------------------------------------------------ save
    if best_step is None:  # no dev signal: the final weights are the export
        export_best({"step": step, "selection": None})
    rotator.wait()
    if is_main:
        print(f"[train] done at step {step}; best step {best_step} ({t.selection} {best}); "
              f"model in {run.best}", flush=True)

    # ------------------------------------------------------------------ cleanup
    if writer is not None:
        writer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
