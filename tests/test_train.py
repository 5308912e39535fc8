"""The real entry point with 2 CPU ranks (gloo) on a tiny T5 and tiny data: ZeRO 1/2/3, DM and SM, exact
resume, export reload, the deepspeed launcher form, and the NaN stop. fp32: see engine_fixtures."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_fixtures import REPO, build_world, env, loss_curve, read_jsonl, recipe_dict, torchrun, write_recipe

pytestmark = pytest.mark.slow
STEPS = 12


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


def _check(proc: subprocess.CompletedProcess, rc: int = 0) -> None:
    assert proc.returncode == rc, (f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                                   f"--- stderr\n{proc.stderr[-6000:]}")


def _falls(curve: dict[int, float]) -> None:
    losses = [curve[s] for s in sorted(curve)]
    start, end = sum(losses[:2]) / 2, sum(losses[-3:]) / 3
    assert end < 0.65 * start, f"loss did not fall well below its start: {losses}"


def _same_generations(run: Path, step: int) -> None:
    """best/ reloads in plain transformers and greedily generates what the engine's model generated
    for the dev questions at `step` (the engine wrote those predictions while training)."""
    from engine_fixtures import SIZES
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from specialize.engine.data.synthetic import make_splits
    from specialize.engine.evaluation.evaluate import evaluate_model
    info = json.loads((run / "best" / "specialize.json").read_text())
    assert info["step"] == step
    assert (run / "best" / "model.safetensors").is_file()
    model = T5ForConditionalGeneration.from_pretrained(run / "best", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(run / "best")
    engine_preds = {p["id"]: p["prediction"] for p in read_jsonl(run / "dev" / f"step-{step:06d}" / "synthetic_dev.jsonl")}
    dev = make_splits(seed=0, sizes=SIZES)["dev"][:4]
    res = evaluate_model(model, tok, dev, "synthetic/dev", fmt="zero_shot_cot", batch_size=8, max_new_tokens=8,
                         progress=False)
    assert {p["id"]: p["prediction"] for p in res.predictions} == engine_preds


@pytest.fixture(scope="module")
def zero1_run(world, tmp_path_factory):
    """ZeRO-1 distribution matching, uninterrupted, dev eval + export at the last step."""
    root = tmp_path_factory.mktemp("zero1")
    recipe = write_recipe(root / "r.yaml", recipe_dict(world, root / "run", train={"max_steps": STEPS,
                                                                                  "eval_every": STEPS}))
    proc = torchrun(recipe)
    _check(proc)
    return root / "run", proc


def test_zero1_dm_trains_and_writes_the_run_dir(zero1_run):
    run, proc = zero1_run
    _falls(loss_curve(run))
    assert "ZeRO-1 fp32; 2 rank(s) on cpu" in proc.stdout
    rows = read_jsonl(run / "train_log.jsonl")
    assert {"train/loss", "train/kl", "train/ce", "lr", "grad_norm", "tokens_per_second_per_gpu",
            "peak_mem_gb"} <= set(rows[0])
    assert rows[0]["train/kl"] > 0
    env_info = json.loads((run / "env.json").read_text())
    assert env_info["world_size"] == 2 and env_info["versions"]["deepspeed"] and "git" in env_info
    assert (run / "recipe.yaml").is_file() and list((run / "tb").glob("events.out.tfevents.*"))
    scores = read_jsonl(run / "dev_scores.jsonl")
    assert scores[-1]["step"] == STEPS and "dev/synthetic/dev_acc" in scores[-1]
    assert "dev/synthetic/ood_steps_acc" in scores[-1]
    kept = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert kept == ["step-000006", "step-000012"]


def _converted_equals_best(run: Path, step: int, out: Path) -> None:
    """Offline conversion of a DeepSpeed checkpoint (fp32 master weights) gives the exported weights."""
    from transformers import T5ForConditionalGeneration

    from specialize.engine.export import export_checkpoint
    conv = export_checkpoint(run / "checkpoints" / f"step-{step:06d}", run, out)
    a = T5ForConditionalGeneration.from_pretrained(conv).state_dict()
    b = T5ForConditionalGeneration.from_pretrained(run / "best").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_zero1_export_reloads_and_generates_the_same(zero1_run, tmp_path):
    _same_generations(zero1_run[0], STEPS)
    _converted_equals_best(zero1_run[0], STEPS, tmp_path / "converted")


def test_offline_export_writes_the_runs_precision_without_a_random_init(zero1_run, tmp_path, monkeypatch):
    """At 11B a random-init fp32 model beside the merged weights was 88 GB of host memory and minutes of
    init, and the export 44 GB of fp32 where best/ is bf16."""
    import shutil

    import yaml
    from safetensors import safe_open
    from transformers import T5PreTrainedModel

    from specialize.engine.export import export_checkpoint
    run = tmp_path / "run"
    shutil.copytree(zero1_run[0] / "checkpoints" / f"step-{STEPS:06d}", run / "checkpoints" / f"step-{STEPS:06d}")
    recipe = yaml.safe_load((zero1_run[0] / "recipe.yaml").read_text())
    recipe["train"]["precision"] = "bf16"  # as a GPU run records it
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))

    def no_init(*args, **kw):
        raise AssertionError("the export built a randomly initialised model")
    monkeypatch.setattr(T5PreTrainedModel, "_init_weights", no_init)
    conv = export_checkpoint(run / "checkpoints" / f"step-{STEPS:06d}", tmp_path / "conv")
    best = {}
    with safe_open(str(zero1_run[0] / "best" / "model.safetensors"), "pt") as f:
        best = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(str(conv / "model.safetensors"), "pt") as f:
        got = {k: f.get_tensor(k) for k in f.keys()}
    assert got.keys() == best.keys() and {v.dtype for v in got.values()} == {torch.bfloat16}
    assert all(torch.equal(got[k], best[k].to(torch.bfloat16)) for k in got)  # fp32 master weights, cast


def test_kill_and_resume_continues_the_same_loss_curve(world, zero1_run, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(world, tmp_path / "run", train={
        "max_steps": STEPS, "eval_every": STEPS}))
    # dies (like a kill) after step 8; the last checkpoint is step 6, so steps 7-8 are redone
    _check(torchrun(recipe, env_extra={"SPECIALIZE_EXIT_AFTER_STEP": "8"}))
    assert max(loss_curve(tmp_path / "run")) == 8
    proc = torchrun(recipe, "--resume")
    _check(proc)
    assert "resumed from" in proc.stdout and "step-000006" in proc.stdout
    want, got = loss_curve(zero1_run[0]), loss_curve(tmp_path / "run")
    assert sorted(got) == sorted(want)
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-5, (step, got[step], want[step])


def test_zero2_sm_under_the_deepspeed_launcher(world, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(world, tmp_path / "run", loss={"kind": "sm"},
                                                           deepspeed={"zero_stage": 2},
                                                           train={"max_steps": STEPS}))
    deepspeed = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    proc = subprocess.run([deepspeed, "--num_gpus", "2", "--master_port", "29731", "--module",
                           "specialize.engine.train", "--recipe", str(recipe)],
                          env=env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    _check(proc)
    log = proc.stdout + proc.stderr
    assert "dist_world_size=2" in log and log.count("spawned with command") == 2
    assert "--local_rank=1" in log and "sm loss; ZeRO-2 fp32; 2 rank(s) on cpu" in log
    curve = loss_curve(tmp_path / "run")
    _falls(curve)
    assert all(row["train/kl"] == 0 for row in read_jsonl(tmp_path / "run" / "train_log.jsonl"))


def test_zero3_dm_trains_and_exports_gathered_weights(world, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(world, tmp_path / "run", deepspeed={"zero_stage": 3},
                                                           train={"max_steps": STEPS, "eval_every": STEPS}))
    proc = torchrun(recipe)
    _check(proc)
    assert "ZeRO-3 fp32 (built under zero.Init)" in proc.stdout  # no rank held a full copy while starting
    _falls(loss_curve(tmp_path / "run"))
    _same_generations(tmp_path / "run", STEPS)
    _converted_equals_best(tmp_path / "run", STEPS, tmp_path / "converted")


def test_nan_loss_stops_cleanly_and_keeps_the_last_checkpoint(world, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(world, tmp_path / "run", deepspeed={"zero_stage": 0},
                                                           train={"max_steps": 6, "save_every": 2}))
    proc = torchrun(recipe, env_extra={"SPECIALIZE_INJECT_NAN_AT_STEP": "3"})
    _check(proc, rc=1)  # torchrun reports the ranks' exit status 3 as a failed job
    assert "non-finite loss in step 3" in proc.stderr and "step-000002" in proc.stderr
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert ckpts == ["step-000002"] and (tmp_path / "run" / "checkpoints" / "step-000002" / "complete.json").is_file()
    assert max(loss_curve(tmp_path / "run")) == 2
    assert not (tmp_path / "run" / "best").exists()
    from transformers import T5ForConditionalGeneration

    from specialize.engine.export import export_checkpoint
    conv = export_checkpoint(tmp_path / "run" / "checkpoints" / "step-000002", tmp_path / "conv")  # run implied
    params = T5ForConditionalGeneration.from_pretrained(conv).state_dict().values()
    assert all(torch.isfinite(p).all() for p in params)  # the kept checkpoint is the good one
    # a fresh start on top of it is refused on every rank (none hangs), pointing at --resume
    again = torchrun(recipe)
    _check(again, rc=1)
    assert "already holds checkpoints: pass --resume" in again.stderr
    assert "engine/rundir.py" not in again.stderr  # a message on every rank, no traceback of ours (torchrun prints its own)


def test_zero3_loads_pretrained_weights_into_partitions(world, tmp_path):
    """Under ZeRO-3, from_pretrained runs inside zero.Init: the checkpoint must land in the partitions
    intact, so the first loss equals a ZeRO-0 run's on the same weights and batch. The start is stored
    as FlanT5 is (an lm_head of its own): both runs' best/ keep it apart from the embedding (the export
    used to tie it back, so best/ was another model) and agree with each other."""
    from engine_fixtures import save_untied_t5
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from specialize.engine.models import t5_config
    tok = AutoTokenizer.from_pretrained(world["tokenizer"])
    cfg = t5_config("tiny", vocab_size=len(tok), d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=1,
                    num_decoder_layers=1, dropout_rate=0.0)
    torch.manual_seed(1)
    save_untied_t5(T5ForConditionalGeneration(cfg), tmp_path / "start")
    first = {}
    for zero in (0, 3):
        recipe = write_recipe(tmp_path / f"z{zero}.yaml", recipe_dict(
            world, tmp_path / f"run{zero}", model={"name_or_path": str(tmp_path / "start"), "overrides": {}},
            deepspeed={"zero_stage": zero}, train={"max_steps": 2}))
        proc = torchrun(recipe)
        _check(proc)
        first[zero] = loss_curve(tmp_path / f"run{zero}")[1]
    assert "(built under zero.Init)" in proc.stdout
    assert abs(first[3] - first[0]) <= 1e-4 * abs(first[0]), first
    best = {zero: load_file(tmp_path / f"run{zero}" / "best" / "model.safetensors") for zero in (0, 3)}
    start = load_file(tmp_path / "start" / "model.safetensors")
    for zero, state in best.items():
        assert "lm_head.weight" in state and not torch.allclose(state["lm_head.weight"], state["shared.weight"]), zero
        assert torch.allclose(state["lm_head.weight"], start["lm_head.weight"], atol=0.05), zero  # 2 small steps
    assert best[0].keys() == best[3].keys()
    assert all(torch.allclose(best[0][k], best[3][k], atol=1e-4) for k in best[0])


def test_a_resume_forgets_what_the_lost_steps_wrote(zero1_run, tmp_path):
    """Resuming from step 6 of a run that had reached step 12: its rows, dev predictions and best/ from
    after step 6 would otherwise mix two timelines (select would take the better of both)."""
    import shutil

    from safetensors.torch import load_file

    from specialize.engine.checkpoints import forget_lost_timeline
    from specialize.engine.export import export_checkpoint
    from specialize.engine.rundir import RunDir
    for best_step in (None, 6):
        root = tmp_path / f"run{best_step}"
        shutil.copytree(zero1_run[0], root)
        run = RunDir(root, find_train=False)
        assert json.loads((run.best / "specialize.json").read_text())["step"] == STEPS
        assert read_jsonl(run.dev_scores_path)[-1]["step"] == STEPS
        said = forget_lost_timeline(run, 6, best_step)
        assert max(r["step"] for r in read_jsonl(run.train_log)) == 6 and not read_jsonl(run.dev_scores_path)
        assert not (root / "dev" / f"step-{STEPS:06d}").exists()
        if best_step is None:
            assert not run.best.exists() and any("best/ (step 12" in line and "removed" in line for line in said)
        else:
            info = json.loads((run.best / "specialize.json").read_text())
            assert info["step"] == 6 and info["restored_on_resume"]
            ref = export_checkpoint(run.checkpoint(6), tmp_path / "ref6")
            a, b = load_file(run.best / "model.safetensors"), load_file(ref / "model.safetensors")
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert forget_lost_timeline(run, 6, best_step) == []  # nothing left to forget
