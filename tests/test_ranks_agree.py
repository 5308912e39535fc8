"""The start-up check that every rank loaded the same inputs (engine/distributed.check_ranks_agree), on two
real gloo ranks: it passes when they agree, and stops both ranks with a message naming the fact, the rank and
its host when one rank's tokenizer, data or run dir differs (a node whose disk is not the shared one)."""
import socket
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from specialize.engine.config import ConfigError
from specialize.engine.distributed import check_ranks_agree


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, dirs: list, facts: list, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        check_ranks_agree(facts[rank], Path(dirs[rank]), rank)
        result = "ok"
    except ConfigError as err:
        result = str(err)
    Path(out, f"rank{rank}.txt").write_text(result)
    dist.destroy_process_group()


def run_two(tmp_path, dirs, facts) -> list[str]:
    for d in dirs:
        Path(d).mkdir(parents=True, exist_ok=True)
    mp.spawn(_rank, args=(_free_port(), [str(d) for d in dirs], facts, str(tmp_path)), nprocs=2, join=True)
    return [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]


def test_ranks_that_agree_pass(tmp_path):
    facts = {"tokenizer": "370 tokens, abc", "dev set synthetic/dev": "200 questions, def"}
    assert run_two(tmp_path, [tmp_path / "run"] * 2, [facts, facts]) == ["ok", "ok"]


def test_a_rank_with_other_inputs_stops_both_by_name(tmp_path):
    a = {"tokenizer": "370 tokens, abc", "dev set synthetic/dev": "200 questions, def"}
    b = {**a, "dev set synthetic/dev": "199 questions, 123"}
    for message in run_two(tmp_path, [tmp_path / "run"] * 2, [a, b]):
        assert "dev set synthetic/dev: rank 0 on" in message and "200 questions, def" in message
        assert "rank 1 on" in message and "199 questions, 123" in message and "tokenizer:" not in message


def test_a_run_dir_rank_0_did_not_write_is_caught_at_start(tmp_path):
    facts = {"tokenizer": "370 tokens, abc"}
    # each "node" its own folder at the same path: what node-local disks look like
    messages = run_two(tmp_path, [tmp_path / "node0" / "run", tmp_path / "node1" / "run"], [facts, facts])
    for message in messages:
        assert "run dir shared with rank 0: rank 0 on" in message and "rank 1 on" in message
        assert "shared by all nodes" in message
