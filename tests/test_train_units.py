"""Engine pieces in one process: model shapes, the fused head's loss against transformers' own forward,
export round trip, DeepSpeed config derivation, the seeded batch plan and the collated tensors."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_fixtures import SIZES, build_world, recipe_dict

from specialize.engine.config import ConfigError, recipe_from_dict
from specialize.engine.models import NAMED_CONFIGS, build_model, hidden_scale, t5_config
from specialize.engine.train import Distill, selection_score, warmup_cosine


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


def tiny_t5(scaled: bool, vocab: int = 97, seed: int = 0):
    from transformers import T5ForConditionalGeneration
    torch.manual_seed(seed)
    cfg = t5_config("tiny", vocab_size=vocab, d_model=32, d_ff=48, d_kv=8, num_heads=4, num_layers=2,
                    num_decoder_layers=2, dropout_rate=0.0, tie_word_embeddings=scaled)
    return T5ForConditionalGeneration(cfg).eval()


# ----------------------------------------------------------------------------- models

def test_num_layers_alone_sets_the_decoder_too():
    """T5Config's rule: the decoder has num_layers unless num_decoder_layers is given, also over a
    named shape that spells num_decoder_layers out."""
    for name in ("tiny", "flan-t5-base"):
        cfg = t5_config(name, num_layers=3)
        assert (cfg.num_layers, cfg.num_decoder_layers) == (3, 3)
    cfg = t5_config("tiny", num_layers=3, num_decoder_layers=1)
    assert (cfg.num_layers, cfg.num_decoder_layers) == (3, 1)
    assert t5_config("flan-t5-base").num_decoder_layers == 12


@pytest.mark.parametrize("name,d_model,layers,heads,d_ff", [
    ("t5-v1_1-small", 512, 8, 6, 1024), ("flan-t5-base", 768, 12, 12, 2048), ("flan-t5-large", 1024, 24, 16, 2816),
    ("t5-v1_1-xl", 2048, 24, 32, 5120), ("flan-t5-xxl", 4096, 24, 64, 10240)])
def test_named_configs_have_the_published_shapes(name, d_model, layers, heads, d_ff):
    cfg = t5_config(name)
    assert (cfg.d_model, cfg.num_layers, cfg.num_decoder_layers, cfg.num_heads, cfg.d_ff, cfg.d_kv) == \
        (d_model, layers, layers, heads, d_ff, 64)
    assert cfg.vocab_size == 32128 and cfg.feed_forward_proj == "gated-gelu"
    assert hidden_scale(cfg) == 1.0  # v1.1 / Flan: untied head, no rescaling of the decoder output
    assert set(NAMED_CONFIGS) >= {f"{p}-{s}" for p in ("t5-v1_1", "flan-t5")
                                  for s in ("small", "base", "large", "xl", "xxl")} | {"tiny"}


def test_named_xxl_has_11b_parameters_on_meta():
    from transformers import T5ForConditionalGeneration
    with torch.device("meta"):
        model = T5ForConditionalGeneration(t5_config("flan-t5-xxl"))
    n = sum(p.numel() for p in model.parameters())
    # 11.0B with the lm_head tied (transformers >= 5 always ties it), 11.1B untied
    assert 10.9e9 < n < 11.2e9


def test_param_counts_split_the_matmul_weights():
    from specialize.engine.models import param_counts
    model = tiny_t5(scaled=False)
    c = param_counts(model)
    total = sum(p.numel() for p in model.parameters())  # a tied embedding/lm_head is counted once here
    untied_embedding = 0 if model.lm_head.weight is model.shared.weight else model.shared.weight.numel()
    assert c["lm_head"] == model.config.vocab_size * model.config.d_model
    assert c["encoder"] + c["decoder"] + c["lm_head"] == total - untied_embedding


def test_build_model_tiny_takes_the_tokenizer_vocab_and_checkpointing():
    from specialize.engine.config import ModelConfig
    model = build_model(ModelConfig(config="tiny", overrides={"d_model": 32}, gradient_checkpointing=True),
                        vocab_size=301)
    assert model.config.vocab_size == 301 and model.config.d_model == 32
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    with pytest.raises(ConfigError, match="vocab_size"):
        build_model(ModelConfig(config="tiny", overrides={"vocab_size": 100}), vocab_size=301)


# ----------------------------------------------------------------------------- loss through the fused head

def _batch(vocab, B=3, S=7, T=6, K=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (B, S), generator=g)
    attention_mask = torch.ones(B, S, dtype=torch.long)
    attention_mask[0, 5:] = 0
    labels = torch.randint(3, vocab, (B, T), generator=g)
    labels[1, 4:] = -100
    dec = torch.zeros_like(labels)
    dec[:, 1:] = labels[:, :-1].clamp(min=0)
    topk_ids = torch.stack([torch.randperm(vocab, generator=g)[:K] for _ in range(B * T)]).view(B, T, K)
    topk_ids[..., 0] = labels.clamp(min=0)
    topk_ids[2] = -1  # a sample with no teacher: pure CE
    lp = torch.log_softmax(torch.randn(B, T, K, generator=g), -1) - 0.1
    return dict(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=dec, labels=labels,
                topk_ids=topk_ids, topk_logprobs=lp)


def _reference_loss(logits, batch, alpha):
    """float64 alpha·CE + (1−alpha)·Σ_S p (log p − log q), tail 'none', τ=1; rows without teacher: CE."""
    z = logits.double().reshape(-1, logits.shape[-1])
    logq = torch.log_softmax(z, -1)
    tgt = batch["labels"].reshape(-1)
    ids = batch["topk_ids"].reshape(tgt.numel(), -1)
    lp = batch["topk_logprobs"].reshape(tgt.numel(), -1).double()
    total, rows = 0.0, 0
    for i in range(tgt.numel()):
        if tgt[i] == -100:
            continue
        ce = -logq[i, tgt[i]]
        valid = ids[i] >= 0
        if valid.any():
            kl = (lp[i][valid].exp() * (lp[i][valid] - logq[i, ids[i][valid]])).sum()
            total += alpha * ce + (1 - alpha) * kl
        else:
            total += ce
        rows += 1
    return total / rows


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("kind", ["sm", "dm"])
def test_fused_head_loss_matches_transformers_logits(scaled, kind):
    from specialize.engine.config import LossConfig
    t5 = tiny_t5(scaled)
    batch = _batch(t5.config.vocab_size)
    with torch.no_grad():
        hf = t5(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                decoder_input_ids=batch["decoder_input_ids"], labels=batch["labels"])
    model = Distill(t5, LossConfig(kind=kind, alpha=0.3))
    loss, ce, kl = model(**batch)
    if kind == "sm":  # CE only: transformers' own loss is the reference
        assert torch.allclose(loss.double(), hf.loss.double(), rtol=1e-5, atol=1e-5)
    want = _reference_loss(hf.logits, batch, alpha=1.0 if kind == "sm" else 0.3)
    assert abs(loss.item() - want.item()) < 1e-4 * max(1.0, abs(want.item()))
    loss.backward()
    assert t5.shared.weight.grad is not None and torch.isfinite(t5.shared.weight.grad).all()


def test_exported_model_generates_the_same_tokens(tmp_path):
    from transformers import T5ForConditionalGeneration

    from specialize.engine.config import LossConfig
    from specialize.engine.export import export_model, plain_model
    t5 = tiny_t5(scaled=False, seed=3)
    Distill(t5, LossConfig())  # the engine swaps in its fused head
    ids = torch.randint(3, t5.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    want = t5.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
    export_model(plain_model(t5), None, tmp_path / "best", {"step": 1})
    assert (tmp_path / "best" / "model.safetensors").is_file()
    again = T5ForConditionalGeneration.from_pretrained(tmp_path / "best").eval()
    assert type(again.lm_head) is torch.nn.Linear
    assert torch.equal(again.generate(input_ids=ids, max_new_tokens=12, do_sample=False), want)


# ----------------------------------------------------------------------------- DeepSpeed config

def _recipe(world, tmp_path, **sections):
    return recipe_from_dict(recipe_dict(world, tmp_path / "run", **sections))


def test_ds_config_derives_batch_fields_and_zero_blocks(world, tmp_path):
    from specialize.engine.ds_config import build_ds_config
    r = _recipe(world, tmp_path, train={"micro_batch_size": 3, "grad_accum": 5, "precision": "bf16"},
                deepspeed={"zero_stage": 3, "offload": ["optimizer", "param"]})
    cfg = build_ds_config(r, world_size=4)
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) \
        == (60, 3, 5)
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    z = cfg["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert cfg["gradient_clipping"] == 1.0
    ada = build_ds_config(_recipe(world, tmp_path, train={"optimizer": "adafactor"},
                                  deepspeed={"zero_stage": 2, "offload": ["optimizer"]}), 1)
    # a torch Adafactor under ZeRO: allowed explicitly, and not forced onto DeepSpeed's CPU Adam
    assert ada["zero_allow_untested_optimizer"] and ada["zero_force_ds_cpu_optimizer"] is False


def test_ds_config_user_json_must_agree(world, tmp_path):
    import json

    from specialize.engine.ds_config import build_ds_config
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 4}))
    r = _recipe(world, tmp_path, deepspeed={"config": str(path), "zero_stage": 2})
    assert build_ds_config(r, 2)["train_batch_size"] == 8
    with pytest.raises(ConfigError, match="train_batch_size=9"):
        build_ds_config(_recipe(world, tmp_path, deepspeed={"config": {"train_batch_size": 9}}), 2)
    with pytest.raises(ConfigError, match="zero_optimization.stage=2 disagrees with deepspeed.zero_stage=3"):
        build_ds_config(_recipe(world, tmp_path, deepspeed={"config": str(path), "zero_stage": 3}), 2)
    with pytest.raises(ConfigError, match="param offload needs zero_stage 3"):
        build_ds_config(_recipe(world, tmp_path, deepspeed={"zero_stage": 2, "offload": ["param"]}), 2)
    with pytest.raises(ConfigError, match="optimizer"):
        build_ds_config(_recipe(world, tmp_path, deepspeed={"config": {"optimizer": {"type": "Adam"}}}), 2)
    # fp16: the fused/sparse loss gradients would underflow to zero — refused when the recipe loads, naming
    # bf16, even beside a DeepSpeed JSON whose own precision disagrees (that mismatch is not the reason)
    with pytest.raises(ConfigError, match=r"fp16.*silently be zero.*bf16"):
        build_ds_config(_recipe(world, tmp_path, train={"precision": "fp16"}), 1)
    with pytest.raises(ConfigError, match=r"fp16.*silently be zero.*bf16"):
        _recipe(world, tmp_path, train={"precision": "fp16"}, deepspeed={"config": {"bf16": {"enabled": True}}})


# ----------------------------------------------------------------------------- batches

def _plan(lengths, rank, world=2, formats=None, mixing="per_batch", seed=0):
    from specialize.engine.batching import BatchPlan
    return BatchPlan(np.asarray(lengths), formats or {"zero_shot_cot": 0.5, "zero_shot_answer_only": 0.5},
                     mixing, micro_batch_size=4, seed=seed, rank=rank, world_size=world)


def test_plan_is_seeded_disjoint_across_ranks_and_one_format_per_batch():
    lengths = np.random.default_rng(0).integers(5, 200, size=203)
    per_rank = [[_plan(lengths, r).micro_batch(n) for n in range(25)] for r in (0, 1)]  # one epoch each
    epoch = [i for r in per_rank for mb in r for i in mb.indices]
    assert len(epoch) == len(set(epoch)) == 200  # disjoint, 3 left over
    assert all(len(set(mb.formats)) == 1 for r in per_rank for mb in r)
    # the same position gives the same batch from a fresh plan (what --resume relies on), epochs differ
    fresh = _plan(lengths, 1)
    assert fresh.micro_batch(37).indices == _plan(lengths, 1).micro_batch(37).indices
    assert [fresh.micro_batch(n).indices for n in range(25)] != [fresh.micro_batch(n).indices for n in range(25, 50)]
    assert _plan(lengths, 0, seed=1).micro_batch(0).indices != per_rank[0][0].indices


def test_plan_groups_lengths_and_follows_ratios():
    lengths = np.random.default_rng(1).integers(5, 400, size=4000)
    plan = _plan(lengths, 0, world=1, formats={"zero_shot_cot": 3.0, "in_context_cot": 1.0})
    batches = [plan.micro_batch(n) for n in range(1000)]
    share = sum(mb.formats[0] == "zero_shot_cot" for mb in batches) / len(batches)
    assert 0.70 < share < 0.80
    padded = sum(4 * max(lengths[mb.indices]) for mb in batches)
    random_padded = sum(4 * max(lengths[c]) for c in np.random.default_rng(2).permutation(4000).reshape(-1, 4))
    assert padded < 0.7 * random_padded
    mixed = _plan(lengths, 0, world=1, mixing="mixed")
    assert any(len(set(mixed.micro_batch(n).formats)) == 2 for n in range(50))


def test_collate_cot_uses_shards_and_answer_only_is_ce(world):
    from transformers import AutoTokenizer

    from specialize.engine.batching import BatchBuilder, ExemplarSets, MicroBatch, open_shards
    from specialize.engine.data import build_target
    from specialize.engine.data.synthetic import make_splits
    tok = AutoTokenizer.from_pretrained(world["tokenizer"])
    shards = open_shards(world["aligned"])
    pool = make_splits(seed=0, sizes=SIZES)["train"]
    b = BatchBuilder(shards, tok, ExemplarSets(pool, 1, 0), max_source_len=512, max_target_len=512,
                     with_teacher=True)
    batch = b.collate(MicroBatch([0, 5], ["zero_shot_cot", "zero_shot_answer_only"]))
    rec0, rec5 = shards[0], shards[5]
    n0 = len(rec0["labels"])
    assert batch["labels"][0, :n0].tolist() == list(rec0["labels"])
    assert torch.equal(batch["topk_ids"][0, :n0, :3], torch.tensor(np.array(rec0["topk_ids"]), dtype=torch.long))
    answer = tok(build_target(None, rec5["answer"], "zero_shot_answer_only"))["input_ids"]
    assert batch["labels"][1, :len(answer)].tolist() == answer and (batch["labels"][1, len(answer):] == -100).all()
    assert (batch["topk_ids"][1] == -1).all()
    assert batch["decoder_input_ids"][0, 0] == 0
    assert batch["decoder_input_ids"][0, 1:n0].tolist() == list(rec0["labels"][:-1])
    prompt = tok.decode(batch["input_ids"][0], skip_special_tokens=True)
    assert prompt.endswith("Let's think step by step.") and rec0["question"].split()[0] in prompt
    ic = b.collate(MicroBatch([0], ["in_context_cot"]))
    assert ic["input_ids"].shape[1] > batch["input_ids"].shape[1]  # exemplar prepended
    assert torch.isfinite(batch["topk_logprobs"]).all()  # -inf padding of the shards never reaches the loss
    assert (batch["topk_ids"][0, 4, 1:] == -1).all()
    from specialize.engine.batching import sample_lengths
    by_item = [len(shards[i]["input_ids"]) + len(shards[i]["labels"]) for i in range(len(shards))]
    assert sample_lengths(shards).tolist() == by_item
    sm = BatchBuilder(shards, tok, ExemplarSets(pool, 1, 0), 512, 512, with_teacher=False)
    assert sm.collate(MicroBatch([0], ["zero_shot_cot"]))["topk_ids"].shape[-1] == 1


def test_collate_checks_ids_on_the_host_and_names_the_sample(world):
    from transformers import AutoTokenizer

    from specialize.engine.batching import BatchBuilder, ExemplarSets, MicroBatch, open_shards
    tok = AutoTokenizer.from_pretrained(world["tokenizer"])
    shards = open_shards(world["aligned"])
    rec = shards[3]
    top = int(np.max(np.asarray(rec["topk_ids"])))
    ok = BatchBuilder(shards, tok, ExemplarSets([], 0, 0), 512, 512, with_teacher=True, vocab_size=len(tok))
    ok.collate(MicroBatch([3], ["zero_shot_cot"]))
    # a student vocabulary smaller than the ids the aligner wrote: caught before the loss, sample named
    small = BatchBuilder(shards, tok, ExemplarSets([], 0, 0), 512, 512, with_teacher=True, vocab_size=top)
    shard, row = shards.locate(3)
    with pytest.raises(ValueError, match=rf"aligned sample 3 \(qid '{rec['qid']}', row {row} of shard "
                                         rf"{re.escape(str(shard))}\).*outside \[0, V={top}\)"):
        small.collate(MicroBatch([0, 3], ["zero_shot_answer_only", "zero_shot_cot"]))


# ----------------------------------------------------------------------------- schedule, selection

def test_warmup_then_cosine_to_zero():
    f = warmup_cosine(4, 20)
    assert [round(f(s), 3) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert f(4) == 1.0 and abs(f(12) - 0.5) < 1e-9 and f(20) == 0.0


def test_selection_metric(world, tmp_path):
    scores = {"dev/synthetic/dev_acc": 0.5, "dev/synthetic/ood_steps_acc": 0.1}
    pick = {s: selection_score(scores, _recipe(world, tmp_path, train={"selection": s}))
            for s in ("in_dist", "ood", "mean")}
    assert pick["in_dist"] == 0.5 and pick["ood"] == 0.1 and math.isclose(pick["mean"], 0.3)


def test_engine_best_and_specialize_select_apply_one_rule(world, tmp_path):
    """The engine keeps best/ at the first step whose train.selection value beats every earlier one;
    `specialize select` over the same dev_scores.jsonl must pick that step for that rule, also where an
    OOD set is missing from a row or scored NaN (neither rule may average what is left)."""
    from specialize.engine.config import dump_recipe
    from specialize.engine.evaluation.select import select
    from specialize.engine.io_helpers import append_jsonl
    ind, o1, o2 = "dev/synthetic/dev_acc", "dev/synthetic/ood_steps_acc", "dev/synthetic/ood_numbers_acc"
    rows = [{"step": 2, ind: 0.30, o1: 0.10, o2: 0.20},
            {"step": 4, ind: 0.50, o1: 0.90},                      # o2 missing: no OOD value here
            {"step": 6, ind: 0.40, o1: 0.30, o2: float("nan")},    # NaN: no OOD value either
            {"step": 8, ind: 0.50, o1: 0.25, o2: 0.35},            # in-dist ties step 4: the earlier wins
            {"step": 10, ind: 0.20, o1: 0.50, o2: 0.20}]
    picks = {}
    for rule in ("in_dist", "ood", "mean"):
        run = tmp_path / rule
        run.mkdir()
        recipe = _recipe(world, tmp_path, train={"selection": rule, "output_dir": str(run),
                                                 "dev_ood": ["synthetic/ood_steps", "synthetic/ood_numbers"]})
        dump_recipe(recipe, run / "recipe.yaml")
        best = best_step = None
        for row in rows:
            append_jsonl(run / "dev_scores.jsonl", row)
            score = selection_score(row, recipe)  # as train.evaluate_and_select applies it
            if score is not None and (best is None or score > best):
                best, best_step = score, row["step"]
        picks[rule] = best_step
        assert select([str(run)], rules=[rule])[rule].step == best_step, rule
    assert picks == {"in_dist": 4, "ood": 10, "mean": 8}


def test_offload_in_the_user_json_is_handled_like_the_recipe_key(world, tmp_path):
    from specialize.engine.ds_config import build_ds_config, effective_offload, uses_deepspeed_optimizer
    repo_json = Path(__file__).resolve().parents[1] / "recipes" / "ds_zero3_offload_bf16.json"
    r = _recipe(world, tmp_path, train={"precision": "bf16"}, deepspeed={"config": str(repo_json), "zero_stage": 3})
    assert effective_offload(r) == ["optimizer"]
    assert uses_deepspeed_optimizer(r)  # AdamW + optimizer offload: DeepSpeed's CPU Adam, as with the recipe key
    ada = _recipe(world, tmp_path, train={"precision": "bf16", "optimizer": "adafactor"},
                  deepspeed={"config": str(repo_json), "zero_stage": 3})
    assert not uses_deepspeed_optimizer(ada) and build_ds_config(ada, 1)["zero_force_ds_cpu_optimizer"] is False
    off = _recipe(world, tmp_path, deepspeed={"config": {"zero_optimization": {
        "stage": 2, "offload_optimizer": {"device": "none"}}}, "zero_stage": 2})
    assert effective_offload(off) == [] and not uses_deepspeed_optimizer(off)
    bad = _recipe(world, tmp_path, deepspeed={"config": {"zero_optimization": {
        "stage": 2, "offload_param": {"device": "cpu"}}}, "zero_stage": 2})
    with pytest.raises(ConfigError, match="param offload needs zero_stage 3"):
        build_ds_config(bad, 1)


def test_training_samples_of_dev_questions_are_refused(world):
    from specialize.engine.batching import open_shards
    from specialize.engine.config import ConfigError
    from specialize.engine.data.synthetic import make_splits
    from specialize.engine.train import refuse_dev_questions
    shards = open_shards(world["aligned"])
    dev = {"synthetic/dev": make_splits(seed=0, sizes=SIZES)["dev"]}
    refuse_dev_questions(shards, dev, world["aligned"])  # disjoint: nothing to say
    trained = make_splits(seed=0, sizes=SIZES)["train"]
    leaky = {**dev, "gsm8k_dev": dev["synthetic/dev"][:2] + trained[3:5]}  # two trained questions in a dev set
    with pytest.raises(ConfigError, match=r"2 of its questions are dev questions of gsm8k_dev \(e\.g\. "):
        refuse_dev_questions(shards, leaky, world["aligned"])


def test_a_checkpoint_of_another_world_or_zero_stage_is_refused(tmp_path):
    from specialize.engine.checkpoints import check_same_launch, choose_resume_tag, mark_complete
    from specialize.engine.config import ConfigError
    from specialize.engine.rundir import RunDir
    run = RunDir(tmp_path / "run", find_train=False)
    for step in (2, 4):
        (run.checkpoints / f"step-{step:06d}").mkdir(parents=True)
        mark_complete(run.checkpoints / f"step-{step:06d}", step, 2, world=32, zero_stage=3)
    tag, written = choose_resume_tag(run, 0)
    assert tag == "step-000004" and written["world"] == 32
    check_same_launch(run.checkpoints / tag, written, world=32, zero_stage=3)
    with pytest.raises(ConfigError, match=r"written by 32 rank\(s\) under ZeRO-3, this launch has 24 rank\(s\)"):
        check_same_launch(run.checkpoints / tag, written, world=24, zero_stage=3)
    with pytest.raises(ConfigError, match="under ZeRO-2"):
        check_same_launch(run.checkpoints / tag, written, world=32, zero_stage=2)
    check_same_launch(run.checkpoints / tag, {"step": 4}, world=8, zero_stage=1)  # from before the fields


def _dev_eval_rank(rank: int, port: int, tok_dir: str, out: str) -> None:
    import json as _json

    import torch.distributed as dist

    from specialize.engine.config import Recipe
    from specialize.engine.data import load_dataset_by_name
    from specialize.engine.tokenizers import load_tokenizer
    from specialize.engine.train import dev_evaluate
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    tok = load_tokenizer(tok_dir)
    model = tiny_t5(scaled=False, vocab=len(tok))
    recipe = Recipe()
    recipe.eval.format, recipe.eval.max_new_tokens, recipe.eval.batch_size = "zero_shot_cot", 6, 64
    dev = {"synthetic/dev": load_dataset_by_name("synthetic/dev", sizes=SIZES)[:5],
           "synthetic/ood_steps": load_dataset_by_name("synthetic/ood_steps", split="dev", sizes=SIZES, ood_dev_size=3)[:3],
           "synthetic/ood_numbers": load_dataset_by_name("synthetic/ood_numbers", split="dev", sizes=SIZES,
                                                        ood_dev_size=3)[:1]}
    calls, generate = [], model.generate
    model.generate = lambda *a, **k: calls.append(1) or generate(*a, **k)
    together = dev_evaluate(model, tok, dev, recipe, (), rank, 2, partitioned=True)
    streams = len(calls)
    per_set = dev_evaluate(model, tok, dev, recipe, (), rank, 2, partitioned=False)
    Path(out, f"rank{rank}.json").write_text(_json.dumps({"streams": streams, "together": together,
                                                          "per_set": per_set}))
    dist.destroy_process_group()


def test_zero3_dev_evaluation_runs_every_dev_set_in_one_generate_stream(world, tmp_path):
    """Under ZeRO-3 every forward gathers the weights over all ranks: the dev sets share one stream
    (rank 1 holds no ood_numbers question and still runs it in step), with the same scores and
    predictions as set by set."""
    import json as _json
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_dev_eval_rank, args=(port, world["tokenizer"], str(tmp_path)), nprocs=2, join=True)
    ranks = [_json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["streams"] for r in ranks] == [1, 1]  # set by set: 3 on rank 0
    for r in ranks:
        assert r["together"] == r["per_set"] == ranks[0]["per_set"]
    assert [len(ranks[0]["together"][1][n]) for n in ("synthetic/dev", "synthetic/ood_steps", "synthetic/ood_numbers")] \
        == [5, 3, 1]


def test_an_export_keeps_an_lm_head_of_its_own(tmp_path):
    """FlanT5 stores its lm_head apart from the embedding. transformers >= 5 builds T5 tied, and the
    export's tie_weights() put the embedding in the head's place: best/ was another model."""
    from engine_fixtures import save_untied_t5
    from transformers import T5ForConditionalGeneration

    from specialize.engine.export import export_model, model_from_state
    from specialize.engine.models import checkpoint_has_own_lm_head
    save_untied_t5(tiny_t5(scaled=False), tmp_path / "flan")
    tiny_t5(scaled=False).save_pretrained(tmp_path / "tied")
    assert checkpoint_has_own_lm_head(str(tmp_path / "flan")) and not checkpoint_has_own_lm_head(str(tmp_path / "tied"))
    flan = T5ForConditionalGeneration.from_pretrained(tmp_path / "flan").eval()
    assert not torch.equal(flan.lm_head.weight, flan.shared.weight)
    state = {k: v.detach().clone() for k, v in flan.state_dict().items()}
    exported = export_model(model_from_state(flan.config, state), None, tmp_path / "best")
    back = T5ForConditionalGeneration.from_pretrained(exported).eval()
    x, y = torch.tensor([[5, 6, 7, 1]]), torch.tensor([[0, 8, 9]])
    assert torch.equal(back.lm_head.weight, flan.lm_head.weight)
    assert torch.allclose(back(input_ids=x, decoder_input_ids=y).logits, flan(input_ids=x, decoder_input_ids=y).logits)
    tied = T5ForConditionalGeneration.from_pretrained(tmp_path / "tied")
    again = model_from_state(tied.config, {k: v.detach().clone() for k, v in tied.state_dict().items()})
    assert again.lm_head.weight is again.shared.weight  # a tied model stays tied
