"""Distributed set-up and the helpers every rank runs: the process group (with its timeout), rank-0-only
work that fails on every rank, the start-up check that every rank loaded the same inputs, lost-peer
detection for a clear stop, and the RNG state a resume restores."""
from __future__ import annotations

import hashlib
import os
import random
import socket
import uuid

import numpy as np
import torch
import torch.distributed as dist

from specialize.engine.config import ConfigError, Recipe

# The DeepSpeed engine of the run in progress, so main() can name the step when a collective fails:
# its global_steps counts finished optimizer steps and comes back from the checkpoint on --resume.
_running: dict = {}


# Launchers that start every process themselves and set no RANK (torchrun and DeepSpeed's own
# launcher do): name -> (world size, rank, local rank) variables. DeepSpeed's --launcher openmpi and
# --launcher slurm start the script this way (mpirun / srun), as does a plain srun in a batch script.
LAUNCHER_VARS = {
    "Open MPI": ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"),
    "MVAPICH": ("MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_LOCAL_RANK"),
    "Intel MPI / MPICH": ("PMI_SIZE", "PMI_RANK", "MPI_LOCALRANKID"),
    # srun sets SLURM_STEP_NUM_TASKS in the tasks it starts, not in the batch script (SLURM_NTASKS is in both)
    "Slurm (srun)": ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_LOCALID"),
}
MPI_LAUNCHERS = ("Open MPI", "MVAPICH", "Intel MPI / MPICH")


def launch_env(environ) -> dict:
    """The variables torch.distributed needs that `environ` lacks, for a process started without RANK.
    Alone (no launcher, or a launcher's world of one): a world of one. Under an MPI launcher or srun
    with several processes, its rank variables, given MASTER_ADDR; MPI without it is left to
    DeepSpeed's discovery through mpi4py. Faking a world of one there would turn 32 processes into 32
    single-rank runs on cuda:0, all writing one run dir."""
    if "RANK" in environ:
        return {}
    found = next(((name, names) for name, names in LAUNCHER_VARS.items() if int(environ.get(names[0], "1")) > 1), None)
    if found is None:  # plain `specialize train`: a world of one
        return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                **({} if "MASTER_ADDR" in environ else {"MASTER_ADDR": "127.0.0.1"}),
                **({} if "MASTER_PORT" in environ else {"MASTER_PORT": str(29500 + os.getpid() % 1000)})}
    name, (size_var, rank_var, local_var) = found
    if "MASTER_ADDR" not in environ:
        if name in MPI_LAUNCHERS and _has_mpi4py():
            # deepspeed.init_distributed finds rank, world and rank 0's address through MPI; the GPU is
            # picked before that, from the launcher's local rank
            return {"LOCAL_RANK": environ[local_var]} if local_var in environ else {}
        raise ConfigError(
            f"started by {name} as one of {environ[size_var]} processes, without RANK or MASTER_ADDR: export "
            "MASTER_ADDR (the first node's address) and MASTER_PORT to every process"
            + (" (e.g. MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1))"
               if name.startswith("Slurm") else ", or install mpi4py") + ", or launch with torchrun or deepspeed")
    if local_var not in environ:
        raise ConfigError(f"started by {name} without {local_var} or LOCAL_RANK: set LOCAL_RANK (the process's "
                          "index on its node, which picks its GPU)")
    return {"RANK": environ[rank_var], "WORLD_SIZE": environ[size_var], "LOCAL_RANK": environ[local_var],
            **({} if "MASTER_PORT" in environ else {"MASTER_PORT": "29500"})}


def _has_mpi4py() -> bool:
    import importlib.util
    return importlib.util.find_spec("mpi4py") is not None


def init_distributed(local_rank_arg: int, timeout_s: float = 1800.0) -> tuple[int, int, int]:
    """(rank, world, local_rank) under deepspeed / torchrun / MPI / srun / a plain single process; gloo
    without CUDA. Every collective (and the rendezvous) fails after timeout_s instead of waiting forever
    on a lost rank."""
    from datetime import timedelta

    import deepspeed
    os.environ.update(launch_env(os.environ))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_arg if local_rank_arg >= 0 else 0))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    if not timeout_s > 0:
        raise ConfigError(f"train.dist_timeout_s: must be > 0 seconds, got {timeout_s}")
    timeout = timedelta(seconds=timeout_s)
    # DeepSpeed runs its collectives on process groups of its own (ZeRO's data-parallel group is a clone
    # of the world), and torch gives a new group its *default* timeout (30 min), not the world group's:
    # without this, a rank lost during backward would hang the others for half an hour.
    from torch.distributed import distributed_c10d
    distributed_c10d.default_pg_timeout = timeout
    if hasattr(distributed_c10d, "default_pg_nccl_timeout"):
        distributed_c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), local_rank


def is_lost_peer(err: BaseException) -> bool:
    """A collective failed because another rank died, hung or became unreachable. Gloo raises a plain
    RuntimeError ("Connection reset by peer", "Timed out waiting 20000ms for recv"); NCCL and the
    TCP store raise torch's DistError family."""
    if isinstance(err, dist.DistError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(mark in text for mark in (
        "gloo/transport", "Connection reset by peer", "Connection closed by peer", "pair closure",
        "Timed out waiting"))


def lost_peer_message(err: BaseException, recipe: Recipe) -> str:
    engine = _running.get("engine")
    done = engine.global_steps if engine is not None else None
    # the failed collective may be in step done + 1 or in the checkpoint/evaluation after step done
    where = f"after optimizer step {done} had finished" if done is not None else "while starting, before step 1"
    from specialize.engine.rundir import RunDir
    last = RunDir(recipe.train.output_dir, find_train=False).complete_checkpoints()
    ckpt = f"Last complete checkpoint: {last[-1][1]}" if last else "No checkpoint was completed yet"
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"lost contact with another rank {where}: a collective failed or waited longer than "
            f"train.dist_timeout_s = {recipe.train.dist_timeout_s:g} s ({first_line}). {ckpt}. Bring every "
            f"node back and relaunch all of them with --resume")


def on_rank0(fn, rank: int) -> None:
    """Run fn on rank 0 only; when it raises, every rank raises, so no rank is left waiting in a collective."""
    error = None
    if rank == 0:
        try:
            fn()
        except Exception as err:  # noqa: BLE001 — re-raised below on every rank
            error = err
    box = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[0] is not None:
        # a usage error (ConfigError) ends every rank with its message, not a traceback
        kind = ConfigError if box[0].startswith("ConfigError: ") else RuntimeError
        raise kind(f"rank 0 failed: {box[0]}")


def fingerprint(*parts) -> str:
    """A short digest of bytes, or of anything with a stable repr (ids, vocab items)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else repr(part).encode("utf-8"))
    return digest.hexdigest()[:12]


def check_ranks_agree(facts: dict, run_dir, rank: int) -> None:
    """Every rank reads its tokenizer, shards and dev sets from its own node's disks. If one node's
    copy differs, its model or batch plan differs, and the ranks crash or hang in a collective later
    (ZeRO-3's generate, say). A run dir that is not shared would leave each node's checkpoint files on
    its own disk, to be found only at --resume. So at start-up every rank's `facts` must equal rank
    0's, and every rank must see a file rank 0 just wrote into `run_dir`; otherwise every rank stops
    with a ConfigError that names the facts, ranks and hosts."""
    token = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    marker = run_dir / ".rank0-wrote"
    on_rank0(lambda: marker.write_text(token[0]), rank)
    sees = marker.is_file() and marker.read_text() == token[0]
    mine = {"host": socket.gethostname(), "run dir shared with rank 0": sees, **facts}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    ref, bad = every[0], {}
    for r, theirs in enumerate(every[1:], 1):
        for key, value in theirs.items():
            if key != "host" and (value != ref[key] or value is False):
                bad.setdefault(key, []).append(f"rank {r} on {theirs['host']}: {value}")
    if bad:
        lines = [f"{key}: rank 0 on {ref['host']}: {ref[key]}; " + "; ".join(v) for key, v in bad.items()]
        raise ConfigError(f"the ranks did not load the same inputs ({'; '.join(lines)}). Every node must see "
                          f"the same tokenizer, aligned shards, data and run dir (train.output_dir): a "
                          f"filesystem shared by all nodes, fully synced")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
