"""How a rank learns its place when a launcher other than torchrun or DeepSpeed's own starts it (mpirun
from `deepspeed --launcher openmpi`, srun from `--launcher slurm` or a batch script): those set no RANK,
and taking that for a world of one would make every process its own single-rank run."""
import os
import socket
import subprocess
import sys

import pytest

from specialize.engine.config import ConfigError
from specialize.engine.distributed import launch_env

SRUN_TASK = {"SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}


def test_alone_or_with_rank_set_nothing_changes_but_a_world_of_one():
    assert launch_env({"RANK": "3", "WORLD_SIZE": "8", "OMPI_COMM_WORLD_SIZE": "8"}) == {}
    alone = launch_env({})
    assert (alone["RANK"], alone["WORLD_SIZE"], alone["LOCAL_RANK"], alone["MASTER_ADDR"]) == ("0", "1", "0",
                                                                                              "127.0.0.1")
    # a plain run inside an sbatch script with 8 tasks: the batch step is one process
    assert launch_env({"SLURM_NTASKS": "8", "SLURM_PROCID": "0"})["WORLD_SIZE"] == "1"


def test_srun_and_mpi_ranks_are_taken_from_the_launcher():
    got = launch_env({**SRUN_TASK, "MASTER_ADDR": "10.0.0.1"})
    assert got == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_PORT": "29500"}
    ompi = {"OMPI_COMM_WORLD_SIZE": "32", "OMPI_COMM_WORLD_RANK": "17", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "6000"}
    assert launch_env(ompi) == {"RANK": "17", "WORLD_SIZE": "32", "LOCAL_RANK": "1"}


def test_without_an_address_srun_is_refused_by_name(monkeypatch):
    with pytest.raises(ConfigError, match=r"Slurm \(srun\) as one of 8 processes.*MASTER_ADDR=\$\(scontrol"):
        launch_env(SRUN_TASK)
    import specialize.engine.distributed as distributed
    monkeypatch.setattr(distributed, "_has_mpi4py", lambda: False)
    with pytest.raises(ConfigError, match="Open MPI.*install mpi4py"):
        launch_env({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0"})
    monkeypatch.setattr(distributed, "_has_mpi4py", lambda: True)  # DeepSpeed's MPI discovery takes over
    assert launch_env({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}) == {}


PROBE = """import torch.distributed as dist
from specialize.engine.distributed import init_distributed
rank, world, local = init_distributed(-1, 60)
print(rank, world, local, dist.get_world_size(), flush=True)
dist.barrier()
"""


def test_two_srun_tasks_form_one_world_of_two():
    """init_distributed (the engine's own) in two processes as srun starts them: one world of two."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    procs = [subprocess.Popen([sys.executable, "-c", PROBE], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**base, "CUDA_VISIBLE_DEVICES": "", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
                                   "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r), "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port)}) for r in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert [out.split()[-4:] for out, _ in outs] == [["0", "2", "0", "2"], ["1", "2", "1", "2"]]
