"""Checkpoints across ranks and nodes: the complete ones, the one to resume, whether every rank can read
it, and rotation that never holds up a collective.

A checkpoint is `<output_dir>/checkpoints/step-XXXXXX/` (paths: rundir.RunDir): DeepSpeed's files, one
`rng-rank{r}.pt` per rank
and, written by rank 0 after every rank's files are on disk, `complete.json`. Only rank 0 lists the
folder and picks the tag to resume; it broadcasts it, so ranks that see the filesystem differently
(node-local disks, a slow shared mount) cannot load different steps and hang. Each rank then checks that
its own files of that tag exist, and all ranks stop with one message if any rank's are missing.
"""
from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from specialize.engine.config import ConfigError
from specialize.engine.rundir import RunDir


class CheckpointUnreadable(ConfigError):
    """A rank cannot see its files of the checkpoint rank 0 chose (the run folder is not shared)."""


def mark_complete(ckpt_dir: Path, step: int, best_step: Optional[int], world: int, zero_stage: int) -> None:
    (ckpt_dir / "complete.json").write_text(json.dumps({"step": step, "best_step": best_step, "world": world,
                                                        "zero_stage": zero_stage}))


def choose_resume_tag(run: RunDir, rank: int) -> tuple[Optional[str], dict]:
    """Rank 0's newest complete checkpoint tag (None: there is none) and its complete.json, the same on
    every rank."""
    box = [(None, {})]
    if rank == 0:
        done = run.complete_checkpoints()
        if done:
            box[0] = (done[-1][1].name, json.loads((done[-1][1] / "complete.json").read_text()))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def check_same_launch(ckpt_dir: Path, written: dict, world: int, zero_stage: int) -> None:
    """Refuse a checkpoint written by another world size or ZeRO stage, before the model is built (at
    11B that takes minutes). DeepSpeed's optimizer partitions are cut for the world that saved them
    (it refuses another one after initialize; at ZeRO-3 a rank beyond it fails on a missing file),
    and the batch plan deals samples by rank, so even ZeRO-0 would see some samples twice and skip
    others for the rest of the epoch."""
    saved_world, saved_stage = written.get("world", world), written.get("zero_stage", zero_stage)
    if (saved_world, saved_stage) != (world, zero_stage):
        raise ConfigError(
            f"cannot resume from {ckpt_dir}: it was written by {saved_world} rank(s) under ZeRO-{saved_stage}, "
            f"this launch has {world} rank(s) under ZeRO-{zero_stage}. The optimizer state is partitioned for "
            f"the world that saved it and the data order is dealt by rank, so resume with the same launch "
            f"({saved_world} ranks, deepspeed.zero_stage {saved_stage}). To go on with another world, start a "
            f"new run (another train.output_dir) from this checkpoint's weights: python -m "
            f"specialize.engine.export {ckpt_dir} OUT, then model.name_or_path=OUT")


def files_this_rank_reads(ckpt_dir: Path, rank: int, zero_stage: int) -> list[str]:
    """What `engine.load_checkpoint` opens on `rank` (DeepSpeed's naming), plus its RNG state: the
    module states of rank 0 under ZeRO 0-2 (every rank loads them), the rank's own partition of
    the model (ZeRO-3) and of the optimizer (ZeRO >= 1). Globs name the ZeRO files, whose dtype prefix
    (bf16_/fp16_/none) depends on the precision."""
    wanted = [f"rng-rank{rank}.pt"]
    if zero_stage <= 2:
        wanted.append("mp_rank_00_model_states.pt")
    else:
        wanted.append(f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
    if zero_stage >= 1:
        wanted.append(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    return wanted


def check_every_rank_can_load(ckpt_dir: Path, rank: int, world: int, zero_stage: int) -> None:
    """Every rank checks its own files of `ckpt_dir`; if any rank misses one, every rank raises
    CheckpointUnreadable naming the ranks and paths (a collective: all ranks call it)."""
    info = {}
    if (ckpt_dir / "complete.json").is_file():
        info = json.loads((ckpt_dir / "complete.json").read_text())
    written_by = info.get("world", world)
    missing = []
    if not (ckpt_dir / "complete.json").is_file():
        missing.append(str(ckpt_dir / "complete.json"))
    elif rank < written_by:  # a rank beyond the world that wrote it has no files of its own there
        for pattern in files_this_rank_reads(ckpt_dir, rank, zero_stage):
            if not list(ckpt_dir.glob(pattern)):
                missing.append(str(ckpt_dir / pattern))
    everyone = [missing]
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, missing)
    lines = [f"  rank {r}: {', '.join(m)}" for r, m in enumerate(everyone) if m]
    if lines:
        raise CheckpointUnreadable(
            f"cannot resume from {ckpt_dir} (chosen by rank 0): files missing on\n" + "\n".join(lines) +
            "\nEvery rank reads the checkpoint rank 0 chose, so train.output_dir must be one folder on a "
            "filesystem shared by all nodes (and fully written: check that no copy or sync is still running)")


def forget_lost_timeline(run: RunDir, step: int, best_step: Optional[int]) -> list[str]:
    """Resuming from `step`: what the run wrote after it (log and dev-score rows, dev predictions, a
    best/ exported after it) belongs to steps that will be trained again, and on a GPU the replay need
    not match bit for bit. Left in place, `specialize select` would take the best of both timelines
    (maybe a step whose checkpoint never completed) and best/ would disagree with the resumed best_step.
    Rows and predictions past `step` go; such a best/ is rebuilt from the best_step checkpoint (which
    rotation keeps) or removed. Rank 0 alone; returns what it did, for the log."""
    from specialize.engine.io_helpers import read_jsonl
    done = []
    for path in (run.train_log, run.dev_scores_path):
        if path.is_file():
            rows = read_jsonl(path)
            kept = [r for r in rows if r.get("step", 0) <= step]
            if len(kept) < len(rows):
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
                tmp.replace(path)
                done.append(f"{len(rows) - len(kept)} row(s) after step {step} dropped from {path.name}")
    for d in sorted((run.root / "dev").glob("step-*")):
        if (run.step_of(d) or 0) > step:
            shutil.rmtree(d, ignore_errors=True)
            done.append(f"dev predictions {d.name} removed")
    info_path = run.best / "specialize.json"
    exported = json.loads(info_path.read_text()).get("step") if info_path.is_file() else None
    if exported is not None and exported > step:
        if best_step is not None and run.is_complete(run.checkpoint(best_step)):
            from specialize.engine.export import export_checkpoint
            scores = [r for r in read_jsonl(run.dev_scores_path) if r.get("step") == best_step] \
                if run.dev_scores_path.is_file() else []
            export_checkpoint(run.checkpoint(best_step), run.root, run.best,
                              info={**(scores[-1] if scores else {}), "step": best_step, "restored_on_resume": True})
            done.append(f"best/ (step {exported}, after the resumed step) re-exported from step {best_step}")
        else:
            shutil.rmtree(run.best, ignore_errors=True)
            done.append(f"best/ (step {exported}, after the resumed step) removed")
    return done


class Rotator:
    """Deletes old checkpoints on rank 0 in a background thread: removing 100+ GB can take longer than
    the collective timeout, and the other ranks must not wait for it in a barrier."""

    def __init__(self, run: RunDir, keep_last: int):
        self.run, self.keep_last = run, keep_last
        self._thread: Optional[threading.Thread] = None

    def rotate(self, best_step: Optional[int]) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._delete_old, args=(best_step,), name="rotate-checkpoints",
                                        daemon=False)
        self._thread.start()

    def _delete_old(self, best_step: Optional[int]) -> None:
        done = self.run.complete_checkpoints()
        for step, d in done[: max(0, len(done) - self.keep_last)]:
            if step != best_step:
                # not complete first: an interrupted delete never leaves a "complete" half checkpoint
                (d / "complete.json").unlink(missing_ok=True)
                shutil.rmtree(d, ignore_errors=True)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
