"""The `openai` teacher backend over real HTTP against tests/teacher_server.py (the official client,
no mocks): both APIs give the records the local backend gives, faults are survived or reported,
the API key is in no output, a changed configuration is refused, and SIGKILL at random points
followed by a rerun leaves every (qid, sample_index) exactly once."""
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from teacher_server import TeacherServer, client_config, tiny_teacher

from specialize.engine.config import TeacherConfig
from specialize.engine.data import load_dataset_by_name
from specialize.engine.teacher import ResumeError, generate, iter_records
from specialize.engine.teacher.generate import _stable_int, make_backend
from specialize.engine.teacher.hf_backend import HFBackend

SECRET = "sk-test-Zq81Xv0-do-not-leak"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hf_backend():
    model, tok = tiny_teacher()
    return HFBackend(model, tok, device="cpu", model_name="tiny-gpt2")


@pytest.fixture(scope="module")
def server(hf_backend):
    with TeacherServer(hf_backend, model_name="tiny-gpt2", lifetime=240, slow_seconds=3.0) as srv:
        yield srv


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("TEACHER_TEST_KEY", SECRET)


@pytest.fixture
def questions():
    return load_dataset_by_name("synthetic/train")[:3]


def config(server, **kw) -> TeacherConfig:
    return client_config(server, **{**dict(samples=3, max_tokens=10, top_logprobs=3, concurrency=2, timeout=2.0,
                                           max_retries=3), **kw})


def lines(folder) -> list[str]:
    return sorted(line for p in Path(folder).glob("samples-*.jsonl") for line in p.read_text().splitlines())


def assert_secret_absent(folder, *texts):
    for path in Path(folder).rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    for text in texts:
        assert SECRET not in text


def test_completions_and_chat_give_the_local_backends_records(server, hf_backend, questions, tmp_path):
    server.faults.clear()
    for api in ("completions", "chat"):
        s = generate(config(server, api=api), questions, str(tmp_path / api), retry_base_delay=0.001, progress=False)
        assert (s["stored"], s["failures"]) == (9, 0)
    generate(config(server, backend="hf"), questions, str(tmp_path / "hf"), backend=hf_backend, progress=False)
    assert lines(tmp_path / "completions") == lines(tmp_path / "chat")
    # The local backend batched the three prompts (left padding), so its floats may differ in the last bits.
    served, local = (sorted(iter_records(tmp_path / d), key=lambda r: (r["qid"], r["sample_index"]))
                     for d in ("chat", "hf"))
    for a, b in zip(served, local, strict=True):
        floats = ("token_logprobs", "top_logprobs")
        assert {k: v for k, v in a.items() if k not in floats} == {k: v for k, v in b.items() if k not in floats}
        assert a["token_logprobs"] == pytest.approx(b["token_logprobs"], abs=1e-5)
        assert [t for alts in a["top_logprobs"] for t, _ in alts] == [t for alts in b["top_logprobs"] for t, _ in alts]
    # The key really went over the wire, as a bearer token.
    assert server.log[-1]["authorization"] == f"Bearer {SECRET}"


def test_faults_are_retried_and_nothing_leaks(server, questions, tmp_path, capfd):
    server.faults.clear()
    faults = ["429", "500", "slow", "badjson", "nologprobs", "short"]
    server.faults.extend(faults)
    before = len(server.log)
    # Enough retries for one request to meet every fault (two workers share them out).
    s = generate(config(server, max_retries=len(faults)), questions, str(tmp_path), retry_base_delay=0.001,
                 progress=False)
    assert [e["fault"] for e in server.log[before:]][:len(faults)] == faults
    assert (s["stored"], s["expected"], s["failures"]) == (9, 9, 0)
    assert s["retries"] == len(faults)
    assert not (tmp_path / "failures.jsonl").exists()
    ledger = json.loads((tmp_path / "usage.json").read_text())
    assert ledger["total"]["completion_tokens"] == sum(len(r["tokens"]) for r in iter_records(tmp_path))
    out, err = capfd.readouterr()
    assert_secret_absent(tmp_path, out, err)


def test_a_request_is_retried_with_its_seed_until_a_reply_is_malformed(server, questions, tmp_path):
    """A request lost in transit (429, 500) is asked again as it was; after a malformed reply it goes with
    a new seed each time, because a seeded server (vLLM) sends the same broken sample for the same seed.
    The first attempt keeps the seed teacher folders were made with."""
    server.faults.clear()
    server.faults.extend(["429", "500", "short", "nologprobs"])
    before = len(server.log)
    s = generate(config(server, max_retries=4, concurrency=1), questions[:1], str(tmp_path), retry_base_delay=0.001,
                 progress=False)
    assert (s["stored"], s["failures"]) == (3, 0)
    seeds = [e["seed"] for e in server.log[before:]]
    assert len(seeds) == 5 and seeds[0] == seeds[1] == seeds[2] == _stable_int(questions[0].id, 0)
    assert len(set(seeds[2:])) == 3, seeds


def test_top_k_entries_merged_by_the_completions_api_are_counted_and_warned(server, questions, tmp_path, capsys):
    """A completions server keys each position's top-k by token text, so tokens spelled alike arrive as one
    entry: the run counts the positions with fewer entries than asked for and says why."""
    server.faults.clear()
    cfg = config(server, concurrency=1)
    s = generate(cfg, questions[:1], str(tmp_path / "clean"), retry_base_delay=0.001, progress=False)
    assert s["short_topk_positions"] == 0 and s["topk_positions"] > 0
    assert "fewer top-k entries" not in capsys.readouterr().out
    server.faults.append("mergedtopk")
    s = generate(cfg, questions[:1], str(tmp_path / "merged"), retry_base_delay=0.001, progress=False)
    positions = sum(len(r["top_logprobs"]) for r in iter_records(tmp_path / "merged"))
    assert s["short_topk_positions"] == s["topk_positions"] == positions
    assert f"{positions} of {positions} positions came with fewer top-k entries" in capsys.readouterr().out
    ledger = json.loads((tmp_path / "merged" / "usage.json").read_text())
    assert ledger["runs"][-1]["short_topk_positions"] == positions


def test_persistent_malformed_response_goes_to_failures_not_samples(server, questions, tmp_path, capfd):
    server.faults.clear()
    cfg = config(server, max_retries=2, concurrency=1)
    server.faults.extend(["short", "nologprobs", "badjson"])  # the first request's three attempts
    s = generate(cfg, questions, str(tmp_path), retry_base_delay=0.001, progress=False)
    assert (s["stored"], s["failures"]) == (6, 1)
    failures = [json.loads(line) for line in (tmp_path / "failures.jsonl").read_text().splitlines()]
    assert [(f["qid"], f["sample_indices"], f["kind"], f["attempts"]) for f in failures] == [
        (questions[0].id, [0, 1, 2], "malformed", 3)]
    assert questions[0].id not in {r["qid"] for r in iter_records(tmp_path)}
    # A rerun of the same configuration asks for exactly the missing samples.
    s = generate(cfg, questions, str(tmp_path), retry_base_delay=0.001, progress=False)
    assert (s["requests"], s["samples"], s["stored"]) == (1, 3, 9)
    assert_secret_absent(tmp_path, *capfd.readouterr())


def test_a_run_that_stops_on_an_error_still_records_what_it_paid_for(server, questions, tmp_path):
    server.faults.clear()
    cfg = config(server, concurrency=1)
    backend = make_backend(cfg)
    real, calls = backend.sample, []

    async def sample(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")  # not a teacher error: the run stops
        return await real(*args, **kw)
    backend.sample = sample
    with pytest.raises(OSError, match="No space"):
        generate(cfg, questions, str(tmp_path), backend=backend, samples_per_request=1, retry_base_delay=0.001,
                 progress=False)
    ledger = json.loads((tmp_path / "usage.json").read_text())
    run = ledger["runs"][-1]
    assert run["interrupted"] is True and run["requests"] == 3 and run["samples"] == 2
    assert run["completion_tokens"] == sum(len(r["tokens"]) for r in iter_records(tmp_path)) > 0
    # the resume adds its own run; the total covers both
    backend.sample = real
    generate(cfg, questions, str(tmp_path), backend=backend, progress=False)
    ledger = json.loads((tmp_path / "usage.json").read_text())
    assert len(ledger["runs"]) == 2 and "interrupted" not in ledger["runs"][1]
    assert ledger["total"]["completion_tokens"] == sum(len(r["tokens"]) for r in iter_records(tmp_path))


def test_a_prompt_file_is_sent_as_the_papers_code_builds_it(server, questions, tmp_path, capfd):
    """teacher.prompt file: the file's text, then "\nQuestion: <q>\nLet's think step by step"; a question
    the file works through is not asked; the folder's hash follows the text, not the path."""
    from specialize.engine.config import ConfigError
    server.faults.clear()
    shot = f"Question: {questions[1].question}\nLet's think step by step\nShe has 5.\nThe answer is 5\n"
    (tmp_path / "a.txt").write_text(shot)
    cfg = config(server, format="in_context_cot", prompt="file", prompt_file=str(tmp_path / "a.txt"), concurrency=1)
    backend = make_backend(cfg)
    sent, real = [], backend.sample

    async def sample(prompt, *args, **kw):
        sent.append(prompt)
        return await real(prompt, *args, **kw)
    backend.sample = sample
    s = generate(cfg, questions, str(tmp_path / "t"), backend=backend, progress=False)
    asked = [questions[0], questions[2]]
    assert sorted(sent) == sorted(f"{shot}\nQuestion: {q.question}\nLet's think step by step" for q in asked)
    assert (s["stored"], s["expected"]) == (6, 6) and "are exemplars of" in capfd.readouterr().out
    (tmp_path / "b.txt").write_text(shot)  # the same prompt elsewhere: the folder resumes
    moved = dataclasses.replace(cfg, prompt_file=str(tmp_path / "b.txt"))
    assert generate(moved, questions, str(tmp_path / "t"), backend=backend, progress=False)["requests"] == 0
    (tmp_path / "b.txt").write_text(shot.replace("5", "6"))  # another prompt: refused
    with pytest.raises(ResumeError, match="prompt_file_sha256"):
        generate(moved, questions, str(tmp_path / "t"), backend=backend, progress=False)
    with pytest.raises(ConfigError, match="prompt_file"):
        config(server, prompt="file")


def test_resume_with_another_configuration_is_refused(server, questions, tmp_path, capfd):
    server.faults.clear()
    generate(config(server, samples=1), questions[:1], str(tmp_path), progress=False)
    with pytest.raises(ResumeError, match="temperature"):
        generate(config(server, samples=1, temperature=0.9), questions[:1], str(tmp_path), progress=False)
    from specialize.engine.teacher.cli import main
    argv = ["generate", "--backend", "openai", "--model", "tiny-gpt2", "--base-url", server.base_url,
            "--api-key-env", "TEACHER_TEST_KEY", "--dataset", "synthetic", "--samples", "1", "--limit", "1",
            "--format", "zero_shot_cot", "--shots", "0", "--max-tokens", "10", "--top-logprobs", "2",
            "--no-progress", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "another configuration" in capfd.readouterr().err


def test_missing_api_key_is_named_not_shown(server, questions, tmp_path, monkeypatch, capfd):
    monkeypatch.delenv("TEACHER_TEST_KEY")
    from specialize.engine.teacher.cli import main
    assert main(["generate", "--backend", "openai", "--model", "m", "--api-key-env", "TEACHER_TEST_KEY",
                 "--dataset", "synthetic", "--format", "zero_shot_cot", "--out", str(tmp_path)]) == 2
    assert "TEACHER_TEST_KEY is not set" in capfd.readouterr().err


def _count_lines(folder: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in folder.glob("samples-*.jsonl"))


def test_sigkill_at_random_points_then_resume_gives_each_key_once(server, tmp_path):
    server.faults.clear()
    server.delay = 0.02  # spread the run so the kills land mid-run
    out = tmp_path / "out"
    limit, samples = 5, 6
    cmd = [sys.executable, "-m", "specialize.engine.teacher.cli", "generate", "--backend", "openai",
           "--model", "tiny-gpt2", "--base-url", server.base_url, "--api", "chat", "--api-key-env",
           "TEACHER_TEST_KEY", "--dataset", "synthetic", "--split", "train", "--limit", str(limit),
           "--samples", str(samples), "--samples-per-request", "2", "--max-tokens", "10", "--top-logprobs", "3",
           "--format", "in_context_cot", "--shots", "2", "--concurrency", "3", "--timeout", "10",
           "--retry-base-delay", "0.001", "--no-progress", "--out", str(out)]
    env = {**os.environ, "TEACHER_TEST_KEY": SECRET, "HF_HUB_OFFLINE": "1"}
    rng = random.Random(5)
    expected = limit * samples
    logs, killed_mid_run = [], []
    try:
        # Kill once this many samples are on disk (a batch is 2, so each leaves work undone).
        for round_, kill_after in enumerate(sorted(rng.sample(range(1, expected - 2), 3))):
            proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                if out.exists() and _count_lines(out) >= kill_after:
                    break
                time.sleep(0.01)
            killed_mid_run.append((proc.poll() is None, _count_lines(out) if out.exists() else 0))
            proc.send_signal(signal.SIGKILL)
            logs.append(proc.communicate()[0].decode())
            if round_ == 1:  # what a kill inside write() leaves: half a line
                shard = sorted(out.glob("samples-*.jsonl"))[-1]
                with open(shard, "ab") as fh:
                    fh.write(b'{"qid": "synthetic/train/0", "sample_index": 0, "te')
        final = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    finally:
        server.delay = 0.0
    logs += [final.stdout, final.stderr]
    assert final.returncode == 0, final.stderr[-2000:]
    # (running when killed, lines on disk then): every kill landed with part of the work done.
    assert all(running and 0 < done < expected for running, done in killed_mid_run), killed_mid_run
    raw = [line for p in sorted(out.glob("samples-*.jsonl")) for line in p.read_text().splitlines()]
    keys = [(r["qid"], r["sample_index"]) for r in map(json.loads, raw)]  # every line parses: no torn line left
    assert sorted(keys) == sorted((f"synthetic/train/{q}", i) for q in range(limit) for i in range(samples))
    assert len(keys) == len(set(keys)) == expected
    assert_secret_absent(out, *logs)


@pytest.mark.parametrize("mode", ["raw", "sampled"])
def test_the_manifest_says_which_distribution_the_server_returned(hf_backend, questions, tmp_path, mode):
    """A vLLM-like server (raw logprobs, its default) and an SGLang-like one (the temperature-scaled
    distribution): at T = 0.6 the records hold what the server sent, checked against a forward pass of
    the model behind it, and the folder's manifest carries the declared `teacher.logprobs`."""
    import torch
    served = HFBackend(hf_backend.model, hf_backend.tokenizer, device="cpu", model_name="tiny-gpt2", logprobs=mode)
    with TeacherServer(served, model_name="tiny-gpt2", lifetime=60) as srv:
        generate(config(srv, samples=1, temperature=0.6, logprobs=mode), questions[:1], str(tmp_path), progress=False)
    assert json.loads((tmp_path / "manifest.json").read_text())["settings"]["logprobs"] == mode
    (rec,) = iter_records(tmp_path)
    from specialize.engine.data import build_prompt
    prompt_ids = served.encode(build_prompt(rec["question"], "zero_shot_cot"))
    id_of = {raw: i for i, raw in reversed(list(enumerate(served.byte_table)))}  # the lowest id of each piece
    ids = [id_of[bytes(raw)] for raw in rec["token_bytes"]]
    with torch.no_grad():
        logits = hf_backend.model(torch.tensor([prompt_ids + ids])).logits[0].double()
    ref = torch.log_softmax(logits / (0.6 if mode == "sampled" else 1.0), dim=-1)
    top1 = ref[len(prompt_ids) - 1: len(prompt_ids) - 1 + len(ids)].max(-1).values
    got = torch.tensor([alts[0][1] for alts in rec["top_logprobs"]], dtype=torch.float64)
    torch.testing.assert_close(got, top1, atol=1e-4, rtol=0)
