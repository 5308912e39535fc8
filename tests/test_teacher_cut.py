"""The teacher's output is cut at its first answer line, over real HTTP (tests/teacher_server.py)
against a scripted model that keeps writing past the answer (an invented next exemplar answered
with another number), and the sampled token joins its top-k when it is outside it."""
import json
import re
from pathlib import Path

import pytest
from teacher_server import RamblingTeacher, TeacherServer, client_config, tiny_teacher

from specialize.engine.config import TeacherConfig
from specialize.engine.data import load_dataset_by_name
from specialize.engine.teacher import filter_samples, generate, iter_records
from specialize.engine.teacher.backends import Sample, token_string
from specialize.engine.teacher.hf_backend import HFBackend
from specialize.engine.teacher.records import ResumeError
from specialize.engine.teacher.truncate import DEFAULT_STOP, cut_sample

K = 3


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("TEACHER_TEST_KEY", "sk-test")


@pytest.fixture(scope="module")
def questions():
    return load_dataset_by_name("synthetic/train")[:150]


def config(server, **kw) -> TeacherConfig:
    return client_config(server, **{**dict(samples=4, max_tokens=200, top_logprobs=K, concurrency=4, timeout=10.0,
                                           max_retries=1), **kw})


def _check_record(rec):
    toks = rec["tokens"]
    assert "".join(toks) == rec["text"]
    assert len(toks) == len(rec["token_bytes"]) == len(rec["token_logprobs"]) == len(rec["top_logprobs"])
    assert [bytes(b).decode() for b in rec["token_bytes"]] == toks
    assert rec["text"].rstrip().endswith(f"The answer is {rec['gold']}.")
    assert "\nQ:" not in rec["text"] and "Question:" not in rec["text"]
    for tok, lp, alts in zip(toks, rec["token_logprobs"], rec["top_logprobs"]):
        # the sampled token is always in the distribution: K slots, or K + 1 when it was outside
        assert [tok, lp] in alts and len(alts) in (K, K + 1)
        assert (len(alts) == K + 1) == (alts[-1] == [tok, lp] and all(t != tok for t, _ in alts[:-1]))


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_server_that_ignores_stop_keeps_correct_samples_cut_at_the_answer(questions, tmp_path, api):
    with TeacherServer(RamblingTeacher(questions), model_name="rambling", lifetime=120) as srv:
        summary = generate(config(srv, api=api), questions, str(tmp_path / "raw"), retry_base_delay=0.01,
                           progress=False)
        assert (summary["stored"], summary["failures"]) == (600, 0)
        assert all(s == list(DEFAULT_STOP) for s in srv.stops)  # the stop sequences went over the wire
    result = filter_samples(str(tmp_path / "raw"), str(tmp_path / "kept"), verbose=False)
    assert result["kept"] >= 0.95 * 600
    assert result["kept_without_cut"] < 0.01 * 600  # what the unfixed pipeline kept: the invented answer wins
    kept = list(iter_records(tmp_path / "kept"))
    assert len(kept) == result["kept"]
    widened = 0
    for rec in kept:
        _check_record(rec)
        assert rec["finish_reason"] == "length"  # the server's own reason, kept
        cut = rec["cut"]
        assert cut["reason"] == "answer_line" and cut["dropped_tokens"] > 0
        assert cut["kept_tokens"] == len(rec["tokens"]) and cut["dropped_chars"] == len(cut["dropped_text"])
        widened += sum(len(a) == K + 1 for a in rec["top_logprobs"])
    assert widened > 0.2 * sum(len(r["tokens"]) for r in kept)  # every third step is outside the top-k


def test_server_that_honours_stop_and_the_cut_switched_off(questions, tmp_path):
    few = questions[:30]
    with TeacherServer(RamblingTeacher(few, honour_stop=True), model_name="rambling", lifetime=120) as srv:
        generate(config(srv, samples=3, stop=["\nQ:", "\nQuestion:", "\nThe answer"]), few, str(tmp_path / "a"),
                 progress=False)
        generate(config(srv, samples=3, stop=[], cut_at_answer=False), few, str(tmp_path / "b"), progress=False)
        # stop and cut are part of the folder's configuration: another setting is refused
        with pytest.raises(ResumeError, match="stop"):
            generate(config(srv, samples=3), few, str(tmp_path / "a"), progress=False)
        assert srv.stops[: 30] == [["\nQ:", "\nQuestion:", "\nThe answer"]] * 30 and srv.stops[-2] is None
    a = list(iter_records(tmp_path / "a"))
    assert all(r["finish_reason"] == "stop" for r in a) and len(a) == 90
    for rec in a:
        _check_record(rec)
    assert filter_samples(str(tmp_path / "a"), str(tmp_path / "ka"), verbose=False)["kept"] == 90
    b = list(iter_records(tmp_path / "b"))
    assert all(r["cut"] is None for r in b)
    assert filter_samples(str(tmp_path / "b"), str(tmp_path / "kb"), verbose=False)["kept"] < 5


def test_cut_keeps_token_data_aligned_when_a_token_straddles_the_line_end():
    pieces = ["So", " 3", ".", " The", " answer", " is", " 4", ".\n\n", "Q", ":", " more"]
    text = "".join(pieces)
    s = Sample(text, pieces, [list(p.encode()) for p in pieces], [-0.1] * 11, [[[p, -0.1]] for p in pieces], "length",
               token_ids=list(range(11)))
    kept, cut = cut_sample(s, DEFAULT_STOP)
    assert kept.tokens == pieces[:8] and kept.text == "So 3. The answer is 4.\n\n" and kept.token_ids == list(range(8))
    assert len(kept.token_logprobs) == len(kept.top_logprobs) == len(kept.token_bytes) == 8
    assert cut == {"reason": "answer_line", "kept_tokens": 8, "dropped_tokens": 3, "dropped_chars": 7}
    # a stop sequence before any answer line cuts there; a sample ending at its answer is left alone
    assert cut_sample(Sample("a\nQ: b", ["a", "\nQ:", " b"], [[97], [10, 81, 58], [32, 98]], [-1.0] * 3,
                             [[]] * 3, "stop"), DEFAULT_STOP)[1]["reason"] == "stop_sequence"
    assert cut_sample(Sample("The answer is 4.", ["The answer is 4."], [list(b"The answer is 4.")], [-1.0], [[]],
                             "stop"))[1] is None


@pytest.fixture(scope="module")
def hf():
    model, tok = tiny_teacher()
    return HFBackend(model, tok, device="cpu", model_name="tiny-gpt2")


def test_hf_backend_stops_rows_at_a_stop_string_and_generate_cuts_it(hf, tmp_path):
    prompt = "Q: Ann has 3 apples.\nA:"
    free = hf.sample_sync(prompt, 4, temperature=1.0, max_tokens=30, top_logprobs=K, seed=3)
    # a stop string the random model is sure to write: two ASCII letters of the first sample
    stop = re.search(r"[A-Za-z]{2}", free.samples[0].text).group()
    got = hf.sample_sync(prompt, 4, temperature=1.0, max_tokens=30, top_logprobs=K, seed=3, stop=[stop])
    s0 = got.samples[0]
    assert s0.finish_reason == "stop" and stop in s0.text and len(s0.tokens) < len(free.samples[0].tokens)
    assert free.samples[0].text.startswith(s0.text)  # same seed: the same draw, only stopped
    for s in got.samples:  # each row stops right after the token that completes the stop string
        if s.finish_reason == "stop":
            assert stop in s.text and stop not in "".join(s.tokens[:-1])
    widened = 0
    for s in got.samples:  # the sampled token joins the top-k (T = 1 on a random model: often outside it)
        for raw, lp, alts in zip(s.token_bytes, s.token_logprobs, s.top_logprobs):
            assert [token_string(bytes(raw)), lp] in alts and len(alts) in (K, K + 1)
            widened += len(alts) == K + 1
    assert widened > 0
    qs = load_dataset_by_name("synthetic/train")[:2]
    cfg = TeacherConfig(backend="hf", dataset="synthetic", samples=2, max_tokens=30, top_logprobs=K,
                        format="zero_shot_cot", shots=0, stop=[stop])
    generate(cfg, qs, str(tmp_path / "hf"), backend=hf, progress=False)
    recs = list(iter_records(tmp_path / "hf"))
    assert len(recs) == 4
    for r in recs:
        assert stop not in r["text"] and "".join(r["tokens"]) == r["text"]
        assert len(r["tokens"]) == len(r["token_logprobs"]) == len(r["top_logprobs"])
        if r["finish_reason"] == "stop":
            assert r["cut"]["reason"] == "stop_sequence"
    settings = json.loads((Path(tmp_path) / "hf" / "manifest.json").read_text())["settings"]
    assert settings["stop"] == [stop] and settings["cut_at_answer"] is True


def test_cli_sends_the_complex_prompt_and_hashes_it(tmp_path, capsys):
    from specialize.engine.data.prompts import build_complex_prompt, complex_exemplars
    from specialize.engine.teacher.cli import main
    data = "/work/shared/data"
    train = load_dataset_by_name("gsm8k_train", data, dev_size=300, seed=42)
    teacher = RamblingTeacher(train[:3])
    with TeacherServer(teacher, model_name="rambling", lifetime=60) as srv:
        argv = ["generate", "--backend", "openai", "--model", "rambling", "--base-url", srv.base_url,
                "--api-key-env", "TEACHER_TEST_KEY", "--dataset", "gsm8k", "--split", "train", "--data-dir", data,
                "--samples", "2", "--max-tokens", "300", "--top-logprobs", str(K), "--format", "in_context_cot",
                "--shots", "8", "--prompt", "complex", "--limit", "3", "--seed", "42", "--no-progress",
                "--out", str(tmp_path / "t")]
        assert main(argv) == 0
        assert main(argv[:-3] + ["--no-progress", "--prompt", "seeded", "--out", str(tmp_path / "t")]) == 2
    assert "differs in" in capsys.readouterr().err  # another prompt is another configuration
    shots = complex_exemplars(train)
    # requests run concurrently, so they arrive in any order: every question's prompt, each the complex one
    assert set(teacher.prompts) >= {build_complex_prompt(e.question, shots) for e in train[:3]}
    settings = json.loads((tmp_path / "t" / "manifest.json").read_text())["settings"]
    assert settings["prompt"] == "complex" and "exemplar_seed" not in settings
    recs = list(iter_records(tmp_path / "t"))
    assert len(recs) == 6 and all(r["cut"]["reason"] == "answer_line" for r in recs)
    assert filter_samples(str(tmp_path / "t"), str(tmp_path / "k"), verbose=False)["kept"] == 6
