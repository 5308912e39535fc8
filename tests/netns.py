"""Two "nodes" on one machine: two Linux network namespaces joined by a veth pair.

Each namespace sees only its own loopback and one end of the veth, with an address on a private /24
that exists nowhere but inside the two namespaces (10.213.<n>.1 and .2), so a rank started in one can
reach the other only over the veth, as across hosts; nothing outside the pair is ever contacted. The
filesystem stays shared, as on a cluster with a shared home/scratch.

    with TwoNodes() as pair:              # namespaces + link up; on exit every process and both gone
        proc = pair.start(0, argv, env, log)
        pair.rank_pids(1)                 # the training ranks running in node 1, to kill by pid

`unavailable()` says why namespaces cannot be made here (not root, no `ip`, no CLONE_NEWNET), so the
tests that need them skip with that reason.
"""
from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SUBNET = "10.213"
_serial = itertools.count()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable() -> str | None:
    """None when network namespaces can be created here, else why not (for pytest.skip)."""
    if shutil.which("ip") is None:
        return "the `ip` tool (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"spz-probe-{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@dataclass
class Node:
    rank: int
    ns: str       # namespace name (host-unique)
    ifname: str   # its end of the veth, the interface gloo must use (GLOO_SOCKET_IFNAME)
    addr: str     # its address on the private subnet


class TwoNodes:
    """Node 0 and node 1; node 0's address is the master address."""

    def __init__(self) -> None:
        n = next(_serial)
        third = (os.getpid() + n) % 250 + 1  # a different /24 per pair: any two pairs stay apart
        tag = f"spz{os.getpid()}-{n}"
        self.nodes = [Node(r, f"{tag}-n{r}", f"spzveth{r}", f"{SUBNET}.{third}.{r + 1}") for r in (0, 1)]
        self.procs: list[subprocess.Popen] = []

    @property
    def master_addr(self) -> str:
        return self.nodes[0].addr

    def __enter__(self) -> "TwoNodes":
        try:
            for node in self.nodes:
                _ip("netns", "add", node.ns)
            a, b = self.nodes
            # both ends are created inside the namespaces: the host's own links are never touched
            _ip("link", "add", a.ifname, "netns", a.ns, "type", "veth", "peer", "name", b.ifname, "netns", b.ns)
            for node in self.nodes:
                _ip("-n", node.ns, "addr", "add", f"{node.addr}/24", "dev", node.ifname)
                _ip("-n", node.ns, "link", "set", node.ifname, "up")
                _ip("-n", node.ns, "link", "set", "lo", "up")
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def start(self, rank: int, argv: list[str], env: dict, log: Path, cwd: Path | None = None) -> subprocess.Popen:
        """argv inside node `rank`'s namespace, in its own session (so its process group can be killed),
        stdout+stderr to `log` (a file, not a pipe: nothing blocks when no one reads)."""
        node = self.nodes[rank]
        env = {**env, "GLOO_SOCKET_IFNAME": node.ifname}
        with open(log, "wb") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", node.ns, *argv], env=env, cwd=cwd, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def pids(self, rank: int) -> list[int]:
        """Every process living in node `rank`'s namespace."""
        got = _ip("netns", "pids", self.nodes[rank].ns, check=False)
        return [int(p) for p in got.stdout.split()] if got.returncode == 0 else []

    def rank_pids(self, rank: int, module: str = "specialize.engine.train") -> list[int]:
        """The training ranks in node `rank`: processes running `module` that a launcher gave a RANK
        (the launchers themselves have none)."""
        found = []
        for pid in self.pids(rank):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:  # exited meanwhile
                continue
            if module.encode() in cmd and any(v.startswith(b"RANK=") for v in environ):
                found.append(pid)
        # a rank's DataLoader workers are forks of it (same command line, same environment): keep the ranks
        return [pid for pid in found if _parent(pid) not in found]

    def down(self) -> None:
        """Kill every process this pair started (their groups, then anything left in the namespaces),
        then delete the namespaces; deleting them removes the veth pair. Safe to call twice."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for node in self.nodes:
            for _ in range(50):
                left = self.pids(node.rank)
                if not left:
                    break
                for pid in left:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.1)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for node in self.nodes:
            _ip("netns", "del", node.ns, check=False)


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state, past the (comm) name
