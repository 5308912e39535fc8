"""Two nodes for real: the engine's entry point on two hosts (network namespaces joined by a veth, see
tests/netns.py), one CPU rank each, gloo over the veth, launched the way users launch on a cluster
without ssh: `deepspeed --hostfile H --no_ssh --node_rank R ...` and `torchrun --nnodes 2 --node_rank R ...`
once per node. The run dir is on the shared filesystem, as on a cluster.

What is checked: the two-node loss curve equals one host with two ranks; a node SIGKILLed mid-run makes
the survivor stop within train.dist_timeout_s + a margin with a message naming the step and the last
complete checkpoint, and every checkpoint marked complete loads; a hung node (SIGSTOP) is caught by the
timeout itself; --resume on both nodes continues the uninterrupted curve exactly, to identical final
weights; ZeRO-3 trains across the nodes and only node 0 writes the export. The commands are the
README's "Multi-node" section."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import netns
import pytest
import torch
from engine_fixtures import REPO, build_world, env, loss_curve, recipe_dict, torchrun, write_recipe

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
STEPS, SAVE_EVERY = 6, 2
DIST_TIMEOUT_S = 25     # short so the hung-peer test is quick; still far above any step here (< 1 s)
STOP_MARGIN_S = 45      # survivor's exit after a lost peer, beyond the timeout: launcher teardown, load
PORT = 29500            # each node has its own network stack: no clash with anything on the host
RUN_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


def need_namespaces() -> None:
    """Skip, saying why, where network namespaces cannot be made (not root, no iproute2, no netns)."""
    reason = netns.unavailable()
    if reason:
        print(f"\n[multinode] skipped: {reason}")
        pytest.skip(reason)


@pytest.fixture
def pair():
    """Fresh namespaces per test; down() kills every process and removes them, also when a test fails."""
    need_namespaces()
    with netns.TwoNodes() as nodes:
        yield nodes


def two_node_recipe(world: dict, root: Path, zero: int = 2, **train) -> Path:
    return write_recipe(root / "r.yaml", recipe_dict(world, root / "run", deepspeed={"zero_stage": zero}, train={
        "max_steps": STEPS, "save_every": SAVE_EVERY, "keep_last": STEPS, "eval_every": 0,
        "dist_timeout_s": DIST_TIMEOUT_S, **train}))


def write_hostfile(path: Path) -> Path:
    path.write_text("node0 slots=1\nnode1 slots=1\n")  # names are labels only under --no_ssh
    return path


def deepspeed_cmd(nodes: netns.TwoNodes, rank: int, hostfile: Path, recipe: Path, *extra: str) -> list[str]:
    return [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank),
            "--master_addr", nodes.master_addr, "--master_port", str(PORT),
            "--module", "specialize.engine.train", "--recipe", str(recipe), *extra]


def torchrun_launcher(nodes: netns.TwoNodes, rank: int) -> list[str]:
    return [str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank),
            "--master_addr", nodes.master_addr, "--master_port", str(PORT)]


def torchrun_cmd(nodes: netns.TwoNodes, rank: int, recipe: Path, *extra: str) -> list[str]:
    return [*torchrun_launcher(nodes, rank), "-m", "specialize.engine.train", "--recipe", str(recipe), *extra]


@dataclass
class Launched:
    procs: list[subprocess.Popen]
    logs: list[Path]

    def log(self, rank: int) -> str:
        return self.logs[rank].read_text(errors="replace")

    def report(self) -> str:
        return "".join(f"\n--- node {r} (exit {p.poll()})\n{self.log(r)[-5000:]}" for r, p in enumerate(self.procs))

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> list[int]:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"the nodes did not finish within {timeout} s{self.report()}") from None
        return [p.returncode for p in self.procs]


def launch(nodes: netns.TwoNodes, cmds: list[list[str]], logs: Path) -> Launched:
    logs.mkdir(parents=True, exist_ok=True)
    e = {**env(), "PATH": f"{BIN}:{env()['PATH']}"}  # the launchers start `python` / `deepspeed` by name
    paths = [logs / f"node{r}.log" for r in (0, 1)]
    return Launched([nodes.start(r, cmds[r], e, paths[r], cwd=REPO) for r in (0, 1)], paths)


def run_to_completion(nodes, cmds, logs) -> Launched:
    job = launch(nodes, cmds, logs)
    assert job.wait() == [0, 0], job.report()
    return job


def rank_files(ckpt: Path, world: int = 2) -> list[Path]:
    """What a checkpoint holds once every rank's save finished: each rank's RNG state and its ZeRO
    optimizer partition, and the model states DeepSpeed writes from rank 0."""
    return ([ckpt / f"rng-rank{r}.pt" for r in range(world)]
            + [ckpt / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]
            + [ckpt / "mp_rank_00_model_states.pt"])


def final_weights(run: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(run / "best" / "model.safetensors")


def same_curve(got: dict, want: dict, steps) -> None:
    for step in steps:
        assert abs(got[step] - want[step]) <= 1e-6, (step, got[step], want[step])


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory):
    """The reference two-node ZeRO-2 DM run (torchrun form), namespaces gone once it has finished."""
    need_namespaces()
    root = tmp_path_factory.mktemp("two_nodes")
    recipe = two_node_recipe(world, root)
    with netns.TwoNodes() as nodes:
        job = run_to_completion(nodes, [torchrun_cmd(nodes, r, recipe) for r in (0, 1)], root / "logs")
    return root / "run", job


def test_two_nodes_match_one_host_with_two_ranks(world, uninterrupted, tmp_path):
    run, job = uninterrupted
    log0 = job.log(0)
    assert "ZeRO-2 fp32; 2 rank(s) on cpu" in log0 and "done at step 6" in log0
    one_host = two_node_recipe(world, tmp_path)
    proc = torchrun(one_host, nproc=2, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-5000:]
    want, got = loss_curve(tmp_path / "run"), loss_curve(run)
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(want)
    same_curve(got, want, want)
    a, b = final_weights(run), final_weights(tmp_path / "run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _wait_for(predicate, timeout: float, job: Launched, what: str, poll_s: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if any(p.poll() is not None for p in job.procs):
            raise AssertionError(f"a node ended while waiting for {what}{job.report()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}{job.report()}")
        time.sleep(poll_s)


def _the_rank_in(nodes: netns.TwoNodes, rank: int) -> int:
    pids = nodes.rank_pids(rank)
    assert len(pids) == 1, (pids, nodes.pids(rank))
    return pids[0]


@dataclass
class Stop:
    rank_s: float       # peer lost -> the survivor rank printed its message
    launcher_s: float   # peer lost -> node 0's launcher exited (what a scheduler sees)


def _survivor_stopped(job: Launched, t_lost: float) -> Stop:
    """How long node 0 took to stop after its peer was lost; asserts it failed, within the bound."""
    bound = DIST_TIMEOUT_S + STOP_MARGIN_S
    said = None
    while job.procs[0].poll() is None:
        if said is None and "lost contact with another rank" in job.log(0):
            said = time.monotonic() - t_lost
        if time.monotonic() - t_lost > bound:
            raise AssertionError(f"node 0 still running {bound} s after losing its peer{job.report()}")
        time.sleep(0.05)
    took = time.monotonic() - t_lost
    assert job.procs[0].returncode != 0, job.report()
    return Stop(took if said is None else said, took)


def _message(log: str) -> re.Match:
    m = re.search(r"specialize train: lost contact with another rank after optimizer step (\d+) had "
                  r"finished: .*train\.dist_timeout_s = 25 s.*?(Last complete checkpoint: (\S+)"
                  r"|No checkpoint was completed yet)\. .*relaunch all of them with --resume", log)
    assert m, log[-5000:]
    return m


@pytest.fixture(scope="module")
def killed(world, tmp_path_factory):
    """The reference recipe under the deepspeed launcher; node 1's rank is SIGKILLed as soon as the
    second checkpoint (step 4) starts being written, i.e. after one complete checkpoint and, most times,
    in the middle of the next one's save."""
    need_namespaces()
    root = tmp_path_factory.mktemp("killed")
    recipe, hostfile = two_node_recipe(world, root), write_hostfile(root / "hostfile")
    ckpts = root / "run" / "checkpoints"
    with netns.TwoNodes() as nodes:
        job = launch(nodes, [deepspeed_cmd(nodes, r, hostfile, recipe) for r in (0, 1)], root / "logs")
        _wait_for(lambda: (ckpts / "step-000002" / "complete.json").is_file(), RUN_TIMEOUT_S, job,
                  "the first complete checkpoint")
        victim = _the_rank_in(nodes, 1)
        # step 4's save takes tens of ms: poll tightly so the kill usually lands inside it
        _wait_for(lambda: (ckpts / "step-000004").is_dir(), RUN_TIMEOUT_S, job, "step 4's save", poll_s=0.001)
        os.kill(victim, signal.SIGKILL)
        t_lost = time.monotonic()
        took = _survivor_stopped(job, t_lost)
        job.procs[1].wait(timeout=60)  # node 1's launcher notices its dead rank and ends too
        log0 = job.log(0)
    print(f"\n[multinode] SIGKILL of node 1's rank: node 0's rank stopped after {took.rank_s:.1f} s, its "
          f"launcher after {took.launcher_s:.1f} s")
    return root, recipe, hostfile, job, log0, took


def test_killed_node_stops_the_survivor_with_the_step_and_last_checkpoint(killed, tmp_path):
    root, _, _, job, log0, took = killed
    assert took.launcher_s < DIST_TIMEOUT_S + STOP_MARGIN_S
    assert job.procs[0].returncode == 4  # deepspeed's launcher passes the rank's LOST_PEER_EXIT on
    m = _message(log0)
    ckpts = root / "run" / "checkpoints"
    marked = sorted(d.name for d in ckpts.glob("step-*") if (d / "complete.json").is_file())
    assert "step-000002" in marked
    assert m.group(3) == str(ckpts / marked[-1])  # the message names the newest complete checkpoint
    assert int(m.group(1)) >= 4  # the kill came while step 4's checkpoint was being saved or later
    assert job.procs[1].returncode != 0
    # a checkpoint is marked complete only when every rank's files are there...
    for d in ckpts.glob("step-*"):
        if (d / "complete.json").is_file():
            missing = [f.name for f in rank_files(d) if not f.is_file()]
            assert not missing, f"{d.name} is marked complete but lacks {missing}"
        else:
            print(f"[multinode] {d.name} left partial (unmarked): "
                  f"{sorted(f.name for f in d.iterdir())}")
    # ...and every complete one loads: DeepSpeed's zero_to_fp32 merges both ranks' partitions
    from transformers import T5ForConditionalGeneration

    from specialize.engine.export import export_checkpoint
    for name in marked:
        conv = export_checkpoint(ckpts / name, root / "run", tmp_path / name)
        params = T5ForConditionalGeneration.from_pretrained(conv).state_dict()
        assert params and all(torch.isfinite(p).all() for p in params.values())


def test_resume_on_both_nodes_continues_the_uninterrupted_run(killed, uninterrupted, pair):
    root, recipe, hostfile, _, _, _ = killed
    job = run_to_completion(pair, [deepspeed_cmd(pair, r, hostfile, recipe, "--resume") for r in (0, 1)],
                            root / "logs-resume")
    m = re.search(r"resumed from \S+step-(\d+) \(step (\d+)\)", job.log(0))
    assert m, job.log(0)[-5000:]
    resumed_at = int(m.group(2))
    assert resumed_at >= 2
    want, got = loss_curve(uninterrupted[0]), loss_curve(root / "run")
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    same_curve(got, want, range(resumed_at + 1, STEPS + 1))
    a, b = final_weights(root / "run"), final_weights(uninterrupted[0])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hung_node_is_caught_by_the_collective_timeout(world, pair, tmp_path):
    """SIGSTOP, unlike SIGKILL, leaves node 1's sockets open (a hung host, a frozen process): nothing
    tells node 0, so only train.dist_timeout_s can end it, and not before that many seconds."""
    recipe = two_node_recipe(world, tmp_path)
    ckpts = tmp_path / "run" / "checkpoints"
    job = launch(pair, [torchrun_cmd(pair, r, recipe) for r in (0, 1)], tmp_path / "logs")
    _wait_for(lambda: (ckpts / "step-000002" / "complete.json").is_file(), RUN_TIMEOUT_S, job,
              "the first complete checkpoint")
    os.kill(_the_rank_in(pair, 1), signal.SIGSTOP)  # the fixture's teardown SIGKILLs it
    t_lost = time.monotonic()
    took = _survivor_stopped(job, t_lost)
    print(f"\n[multinode] SIGSTOP of node 1's rank: node 0's rank stopped after {took.rank_s:.1f} s, its "
          f"launcher after {took.launcher_s:.1f} s (dist_timeout_s {DIST_TIMEOUT_S})")
    # the step in flight may have begun just before the stop: a step here takes well under a second
    assert took.rank_s >= DIST_TIMEOUT_S - 2, job.report()
    m = _message(job.log(0))
    assert "Timed out waiting 25000ms" in job.log(0)
    assert re.search(r"exitcode\s*:\s*4\b", job.log(0)), job.log(0)[-3000:]  # torchrun's failure summary
    marked = sorted(d.name for d in ckpts.glob("step-*") if (d / "complete.json").is_file())
    assert m.group(3) == str(ckpts / marked[-1])


def _writes_under(trace: Path, folder: Path) -> list[str]:
    """Syscall lines in an strace log that create, open for writing or rename something under folder
    (folder itself, folder.tmp, folder.old: what export_model touches)."""
    hits = []
    for line in trace.read_text(errors="replace").splitlines():
        if str(folder) not in line:
            continue
        if re.search(r"\b(mkdir|mkdirat|rename|renameat2?)\(", line) or re.search(r"O_WRONLY|O_RDWR|O_CREAT", line):
            hits.append(line)
    return hits


def test_zero3_across_two_nodes_exports_from_node0_only(world, pair, tmp_path):
    """ZeRO-3 partitions every weight across the nodes: dev evaluation and the export gather them over the
    veth, and only rank 0 (node 0) writes best/ (checked from each node's syscalls, not from our code)."""
    recipe = two_node_recipe(world, tmp_path, zero=3, eval_every=STEPS)
    hostfile = write_hostfile(tmp_path / "hostfile")
    cmds = [deepspeed_cmd(pair, r, hostfile, recipe) for r in (0, 1)]
    traces = [tmp_path / f"node{r}.strace" for r in (0, 1)]
    if shutil.which("strace"):  # each node's launcher and everything it starts (-f)
        cmds = [["strace", "-f", "--seccomp-bpf", "-qq", "-o", str(traces[r]),
                 "-e", "trace=openat,creat,mkdir,mkdirat,rename,renameat,renameat2", *cmds[r]] for r in (0, 1)]
    job = run_to_completion(pair, cmds, tmp_path / "logs")
    run = tmp_path / "run"
    assert "ZeRO-3 fp32 (built under zero.Init); 2 rank(s) on cpu" in job.log(0)
    assert f"done at step {STEPS}; best step {STEPS}" in job.log(0)
    if traces[0].is_file():
        # node 0's trace does show the export being written (so an empty node 1 list means something)
        assert any("best.tmp/model.safetensors" in h for h in _writes_under(traces[0], run / "best"))
        assert _writes_under(traces[1], run / "best") == []
    else:
        print("\n[multinode] strace not installed: which node wrote best/ is not checked")
    # the export is the gathered model: it equals DeepSpeed's merge of both nodes' partitions
    from transformers import T5ForConditionalGeneration

    from specialize.engine.export import export_checkpoint
    conv = export_checkpoint(run / "checkpoints" / f"step-{STEPS:06d}", run, tmp_path / "converted")
    a = T5ForConditionalGeneration.from_pretrained(conv).state_dict()
    b = T5ForConditionalGeneration.from_pretrained(run / "best").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_specialize_run_trains_across_two_nodes(world, uninterrupted, pair, tmp_path):
    """`specialize run --stages train --launcher "torchrun --nnodes 2 ... --node_rank R"` on each node:
    the pipeline's train stage is the same two-node run as the engine launched by hand."""
    recipe = recipe_dict(world, tmp_path / "unused", deepspeed={"zero_stage": 2}, train={
        "max_steps": STEPS, "save_every": SAVE_EVERY, "keep_last": STEPS, "eval_every": 0,
        "dist_timeout_s": DIST_TIMEOUT_S})
    recipe.update(output_dir=str(tmp_path / "pipe"), stages=["train"], aligner={"out_dir": world["aligned"]})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    launcher = [" ".join(torchrun_launcher(pair, r)) for r in (0, 1)]
    run_to_completion(pair, [[str(BIN / "specialize"), "run", str(path), "--stages", "train", "--launcher",
                              launcher[r]] for r in (0, 1)], tmp_path / "logs")
    train_dir = tmp_path / "pipe" / "train"
    assert (train_dir / ".done-train.json").is_file()
    want, got = loss_curve(uninterrupted[0]), loss_curve(train_dir)
    assert sorted(got) == sorted(want)
    same_curve(got, want, want)


def test_specialize_run_passes_resume_and_the_launcher_through(tmp_path):
    from specialize.engine.pipeline import build_parser, train_command
    line = "torchrun --nnodes 2 --nproc_per_node 8 --node_rank 1 --master_addr 10.0.0.1 --master_port 29500"
    assert train_command(tmp_path / "r.yaml", line, 1, resume=True) == [
        *line.split(), "--module", "specialize.engine.train", "--recipe", str(tmp_path / "r.yaml"), "--resume"]
    assert build_parser().parse_args(["r.yaml", "--resume"]).resume


def test_harness_removes_namespaces_and_processes_when_a_test_fails(tmp_path):
    """What every test above relies on: leaving the pair, even by an exception, kills the processes
    started in it, also ones that left the launcher's session (torchrun starts its ranks in their own),
    and deletes both namespaces and so the veth."""
    need_namespaces()
    escaped = "setsid sleep 600 & echo $! > {out}; sleep 600"
    with pytest.raises(RuntimeError, match="the test failed"):
        with netns.TwoNodes() as nodes:
            names = [n.ns for n in nodes.nodes]
            for r in (0, 1):
                cmd = escaped.format(out=tmp_path / f"pid{r}")
                nodes.start(r, ["bash", "-c", cmd], env(), tmp_path / f"log{r}")
            _deadline = time.monotonic() + 30
            while not all((tmp_path / f"pid{r}").is_file() and len(nodes.pids(r)) >= 2 for r in (0, 1)):
                assert time.monotonic() < _deadline, [nodes.pids(r) for r in (0, 1)]
                time.sleep(0.05)
            started = [pid for r in (0, 1) for pid in nodes.pids(r)]
            assert all(int((tmp_path / f"pid{r}").read_text()) in started for r in (0, 1))  # outside the group
            raise RuntimeError("the test failed")
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in names)
    alive = [pid for pid in started if Path(f"/proc/{pid}").exists()
             and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"]
    assert alive == []


def test_only_collective_failures_count_as_a_lost_peer():
    from specialize.engine.distributed import is_lost_peer
    gloo = ["[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [10.213.1.2]:58060: Connection reset by peer",
            "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 25000ms for recv operation",
            "Application timeout caused pair closure"]
    assert all(is_lost_peer(RuntimeError(text)) for text in gloo)
    assert is_lost_peer(torch.distributed.DistNetworkError("failed to connect to 10.213.1.1:29500"))
    assert not is_lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x32 and 64x32)"))
    assert not is_lost_peer(ValueError("Connection reset by peer"))  # only errors torch raises from a collective


def test_the_timeout_does_not_change_what_a_run_is(tmp_path):
    """Raising train.dist_timeout_s changes how long ranks wait, not what they compute: a finished train
    stage stays reusable and --resume does not warn of a different recipe."""
    from specialize.engine import pipeline
    from specialize.engine.config import recipe_from_dict, recipe_hash
    recipes = [recipe_from_dict({"output_dir": str(tmp_path), "train": train})
               for train in ({}, {"dist_timeout_s": 60.0}, {"lr": 1e-3})]
    runs = [pipeline.Run(r, "", "r.yaml") for r in recipes]
    assert recipe_hash(recipes[0]) == recipe_hash(recipes[1]) != recipe_hash(recipes[2])
    keys = [pipeline.stage_key(run, "train") for run in runs]
    assert keys[0] == keys[1] != keys[2]


def test_a_hostfile_launch_forwards_the_shells_variables_to_the_other_nodes(tmp_path, monkeypatch):
    """deepspeed --hostfile starts the other nodes' ranks over pdsh with only PYTHON*/NCCL*/... and
    .deepspeed_env lines exported. Through DeepSpeed's own runner (pdsh and ssh stood in for): the
    pipeline's env file puts HF_HUB_OFFLINE, TORCH_EXTENSIONS_DIR and GLOO_SOCKET_IFNAME in the remote
    command, and the user's own .deepspeed_env lines win."""
    from deepspeed.launcher import multinode_runner, runner

    from specialize.engine.pipeline.stages import deepspeed_env_file
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / ".deepspeed_env").write_text("GLOO_SOCKET_IFNAME=ib0\nMY_SETTING=1\n")
    environ = {"HF_HUB_OFFLINE": "1", "TORCH_EXTENSIONS_DIR": "/shared/ext", "GLOO_SOCKET_IFNAME": "eth0",
               "SPECIALIZE_WORKER_START_TIMEOUT": "60", "PATH": "/usr/bin", "SECRET_TOKEN": "x"}
    assert deepspeed_env_file("deepspeed --hostfile hf --no_ssh --node_rank 0", tmp_path, environ) is None
    assert deepspeed_env_file("torchrun --nnodes 2", tmp_path, environ) is None
    path = deepspeed_env_file("deepspeed --hostfile hf", tmp_path / "run", environ)
    assert path.read_text().splitlines() == ["GLOO_SOCKET_IFNAME=ib0", "MY_SETTING=1", "HF_HUB_OFFLINE=1",
                                             "SPECIALIZE_WORKER_START_TIMEOUT=60", "TORCH_EXTENSIONS_DIR=/shared/ext"]
    (tmp_path / "hf").write_text("node0 slots=1\nnode1 slots=1\n")
    started = []

    class Started:
        returncode = 0

        def wait(self):
            return 0
    monkeypatch.setattr(runner.subprocess, "check_call", lambda *a, **k: 0)  # the ssh check
    monkeypatch.setattr(runner.subprocess, "check_output", lambda *a, **k: b"10.0.0.1\n")  # ssh node0 hostname -I
    monkeypatch.setattr(runner.subprocess, "Popen", lambda cmd, **k: started.append(cmd) or Started())
    monkeypatch.setattr(multinode_runner.PDSHRunner, "backend_exists", lambda self: True)
    monkeypatch.setenv("DS_ENV_FILE", str(path))
    monkeypatch.setattr(runner, "DEEPSPEED_ENVIRONMENT_NAME", os.environ["DS_ENV_FILE"])  # read at its import
    runner.main(["--hostfile", "hf", "--module", "specialize.engine.train", "--recipe", "r.yaml"])
    remote = " ".join(started[0])
    for var in ("export HF_HUB_OFFLINE=1", "export TORCH_EXTENSIONS_DIR=/shared/ext", "export GLOO_SOCKET_IFNAME=ib0",
                "export MY_SETTING=1"):
        assert var in remote, (var, remote)
    assert "SECRET_TOKEN" not in remote and "PATH=/usr/bin" not in remote
