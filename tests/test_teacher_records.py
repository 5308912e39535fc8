"""Teacher plumbing without a model: token strings, sample checks, the shard store (torn lines,
config hash), the filter, backoff and the token bucket, and the CLI's recipe/flag merge."""
import json

import pytest

from specialize.engine.teacher import filter_samples
from specialize.engine.teacher.backends import (
    ZERO_LOGPROB,
    MalformedResponse,
    build_sample,
    decoded_pieces,
    pieces_for_text,
    token_bytes_from_string,
    token_string,
)
from specialize.engine.teacher.cli import _config, build_parser, main
from specialize.engine.teacher.ratelimit import _Bucket, backoff_delay
from specialize.engine.teacher.records import RECORD_FIELDS, ResumeError, ShardStore, iter_records

SETTINGS = {"backend": "openai", "model": "m", "temperature": 0.5}


def record(qid, i, text="x", gold="12", dataset="gsm8k", cut=None):
    pieces = [text]
    return {"qid": qid, "sample_index": i, "prompt_hash": "p", "question": f"question {qid}", "gold": gold,
            "dataset": dataset, "text": text, "tokens": pieces, "token_bytes": [list(text.encode())],
            "token_logprobs": [-0.5], "top_logprobs": [[[text, -0.5]]], "finish_reason": "stop", "cut": cut,
            "usage": {"prompt_tokens": 3, "completion_tokens": 1}, "model": "m"}


def test_partial_characters_spelled_like_openai_and_back():
    e_acute = "é".encode()  # two bytes, split over two tokens below
    assert token_string(e_acute[:1]) == "bytes:\\xc3"
    assert token_bytes_from_string("bytes:\\xc3") == e_acute[:1]
    assert token_bytes_from_string("héllo") == "héllo".encode()
    # The character belongs to the token that completes it, so the pieces spell the text.
    assert decoded_pieces([b"a", e_acute[:1], e_acute[1:] + b"b"]) == ["a", "", "éb"]


def test_build_sample_rejects_logprobs_that_do_not_cover_the_text():
    ok = build_sample("ab", [b"a", b"b"], [-1.0, -2.0], [[("a", -1.0)], [("b", -2.0)]], "stop", "t")
    assert ok.tokens == ["a", "b"] and ok.token_bytes == [[97], [98]]
    with pytest.raises(MalformedResponse, match="spell 2 characters, the text has 3"):
        build_sample("abc", [b"a", b"b"], [-1.0, -2.0], [[], []], "stop", "t")
    with pytest.raises(MalformedResponse, match="differ from character 1 on"):
        build_sample("abc", [b"a", b"x", b"c"], [-1.0] * 3, [[]] * 3, "stop", "t")
    with pytest.raises(MalformedResponse, match="2 tokens but 1 logprobs"):
        build_sample("ab", [b"a", b"b"], [-1.0], [[], []], "stop", "t")
    with pytest.raises(MalformedResponse, match="null"):
        build_sample("ab", [b"a", b"b"], [-1.0, None], [[], []], "stop", "t")


R = "\ufffd"  # what a server that decodes each token on its own writes for part of a character


@pytest.mark.parametrize("text, pieces, expected", [
    (" 12.", [" 12", ".", "</s>"], [" 12", "."]),                     # an end token the text leaves out
    (" 12.\n", [" 12", ".\n", "\n", "Q", ":"], [" 12", ".\n"]),       # a stop string cut from the text
    (" 12.", [" 12", ".\n", "Q", ":"], [" 12"]),                      # ... that starts inside a token
    (" 5€ ok", [" 5", R, R, " ok"], [" 5", "", "€", " ok"]),           # € in two tokens
    (" 5€", [" 5", R, R, "<|im_end|>"], [" 5", "", "€"]),
    ("é€x", [R, R + R, R + "x"], ["", "", "é€x"]),                     # the run holds two characters
    ("a\ufffdb", ["a", R, R, "b"], ["a", "", R, "b"]),                # a real U+FFFD in the text
    ("a\ufffd", ["a", R, R, R], ["a", "", "", R]),                     # invalid bytes: fewer U+FFFD in the text
    ("", ["</s>"], []),
    ("abc", ["a", "b"], None),                                         # tokens short of the text
    ("abc", ["a", "x", "c"], None),
    ("ab", ["a", R], None),                                            # part of a character is never ASCII
])
def test_pieces_for_text_matches_what_servers_send(text, pieces, expected):
    got = pieces_for_text(text, pieces)
    assert got == expected
    if got is not None:
        assert text.startswith("".join(got))


def test_build_sample_keeps_the_tokens_that_spell_the_text():
    lps, tops = [-0.1, -0.2, -0.3, -0.4], [[(" 5", -0.1)], [(R, -0.2)], [(R, -0.3)], [("</s>", -0.4)]]
    raw = [b" 5", R.encode(), R.encode(), b"</s>"]
    s = build_sample(" 5€", raw, lps, tops, "stop", "t", token_ids=[1, 2, 3, 4])
    assert (s.text, s.tokens, s.token_ids) == (" 5€", [" 5", "", "€"], [1, 2, 3])
    assert s.token_bytes == [[32, 53], [], list("€".encode())]  # the re-spelled token owns the character's bytes
    assert s.token_logprobs == [-0.1, -0.2, -0.3] and len(s.top_logprobs) == 3
    # The text ends inside a token (".\n" starts the stop string "\nQ:"): that token goes, with its text.
    s = build_sample("is 12.", [b"is", b" 12", b".\n", b"Q:"], [-1.0] * 4, [[]] * 4, "stop", "t")
    assert (s.text, s.tokens) == ("is 12", ["is", " 12"])


def test_build_sample_logprobs_are_finite_and_not_positive():
    s = build_sample("ab", [b"a", b"b"], [1e-8, float("-inf")], [[("a", -0.0)], [("b", float("-inf")), ("c", -1.0)]],
                     "stop", "t")
    assert s.token_logprobs == [0.0, ZERO_LOGPROB]
    assert s.top_logprobs == [[["a", 0.0]], [["c", -1.0], ["b", ZERO_LOGPROB]]]  # best first
    json.dumps(s.top_logprobs, allow_nan=False)  # the shard stays JSON the aligner reads
    for bad in (float("nan"), float("inf")):
        with pytest.raises(MalformedResponse, match="a logprob is"):
            build_sample("ab", [b"a", b"b"], [-1.0, bad], [[], []], "stop", "t")
        with pytest.raises(MalformedResponse, match="a logprob is"):
            build_sample("ab", [b"a", b"b"], [-1.0, -1.0], [[], [("b", bad)]], "stop", "t")


def test_store_drops_torn_last_line_and_never_duplicates(tmp_path):
    store = ShardStore(tmp_path, SETTINGS)
    assert store.append([record("q1", 0), record("q1", 1)]) == 2
    assert store.append([record("q1", 1), record("q2", 0)]) == 1  # (q1, 1) is already stored
    store.close()
    shard = tmp_path / "samples-00000.jsonl"
    with open(shard, "ab") as fh:  # what a SIGKILL in the middle of a write leaves
        fh.write(json.dumps(record("q2", 1)).encode()[:40])
    assert len(list(iter_records(tmp_path))) == 3  # readers skip the torn tail too
    store = ShardStore(tmp_path, SETTINGS)
    assert store.torn_bytes == 40
    assert store.done == {("q1", 0), ("q1", 1), ("q2", 0)}
    store.append([record("q2", 1)])
    store.close()
    keys = [(r["qid"], r["sample_index"]) for r in iter_records(tmp_path)]
    assert sorted(keys) == [("q1", 0), ("q1", 1), ("q2", 0), ("q2", 1)]
    assert all(line.endswith("}") for line in shard.read_text().splitlines())


def test_store_rotates_shards(tmp_path):
    store = ShardStore(tmp_path, SETTINGS, shard_lines=2)
    for i in range(5):
        store.append([record("q", i)])
    store.close()
    assert sorted(p.name for p in tmp_path.glob("samples-*.jsonl")) == [
        "samples-00000.jsonl", "samples-00001.jsonl", "samples-00002.jsonl"]
    assert ShardStore(tmp_path, SETTINGS, shard_lines=2).done == {("q", i) for i in range(5)}


def test_filter_warns_when_every_sample_of_a_question_is_one_text(tmp_path, capsys):
    """At a temperature > 0, several samples per question that are all one text mean one seed for the
    whole request (SGLang with n > 1 and a seed): forty copies would pass as forty samples."""
    store = ShardStore(tmp_path / "in", {**SETTINGS, "temperature": 0.7})
    store.append([record(q, i, "The answer is 12.") for q in ("q1", "q2", "q3") for i in range(3)])
    store.close()
    result = filter_samples(str(tmp_path / "in"), str(tmp_path / "out"))
    assert (result["questions_with_several_samples"], result["questions_all_samples_identical"]) == (3, 3)
    assert "3 of the 3 questions with several samples got the same text" in capsys.readouterr().out
    store = ShardStore(tmp_path / "in2", {**SETTINGS, "temperature": 0.7})
    store.append([record(q, i, f"{i} so the answer is 12.") for q in ("q1", "q2", "q3") for i in range(3)])
    store.close()
    assert filter_samples(str(tmp_path / "in2"), str(tmp_path / "out2"))["questions_all_samples_identical"] == 0
    assert "warning" not in capsys.readouterr().out


def test_resume_with_another_configuration_is_refused(tmp_path):
    ShardStore(tmp_path, SETTINGS).append([record("q", 0)])
    with pytest.raises(ResumeError, match="differs in: temperature"):
        ShardStore(tmp_path, {**SETTINGS, "temperature": 0.7})
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(ResumeError, match="no manifest.json"):
        ShardStore(tmp_path, SETTINGS)


def test_filter_keeps_correct_samples_and_counts_questions(tmp_path, capsys):
    store = ShardStore(tmp_path / "in", SETTINGS)
    invented = {"reason": "answer_line", "dropped_text": "\nQ: more?\nA: The answer is 5."}
    store.append([record("q1", 0, "3 + 9 = 12. The answer is 12.", cut=invented), record("q1", 1, "The answer is 13."),
                  record("q2", 0, "The answer is 7."), record("q3", 0, "So 1,200 in all. The answer is 1200.",
                                                                    gold="1200")])
    # cut off at max_tokens: its last number is the gold, but it never states an answer
    store.append([{**record("q3", 1, "3 * 400 = 1200 dollars. Then she", gold="1200"), "finish_reason": "length"}])
    store.close()
    result = filter_samples(str(tmp_path / "in"), str(tmp_path / "out"))
    assert result == {"samples": 5, "kept": 2, "accuracy": 0.4, "questions": 3, "questions_kept": 2,
                      "per_question_mean_accuracy": pytest.approx((0.5 + 0 + 0.5) / 3),
                      # uncut, q1's first sample ends on the invented question's answer and is lost
                      "cut_samples": 1, "kept_without_cut": 1, "accuracy_without_cut": 0.2,
                      "dropped_without_answer_line": 1, "stopped_by_max_tokens": 1,
                      "questions_with_several_samples": 2, "questions_all_samples_identical": 0}
    kept = list(iter_records(tmp_path / "out"))
    assert [(r["qid"], r["sample_index"]) for r in kept] == [("q1", 0), ("q3", 0)]
    assert all(tuple(r) == RECORD_FIELDS for r in kept)
    per_q = [json.loads(line) for line in (tmp_path / "out" / "per_question.jsonl").read_text().splitlines()]
    assert [(p["qid"], p["correct"], p["samples"]) for p in per_q] == [("q1", 1, 2), ("q2", 0, 1), ("q3", 1, 2)]
    out = capsys.readouterr().out
    assert "2/5 samples correct (40.0%)" in out and "questions with >= 1 kept sample: 2/3" in out
    assert "1 samples stopped at max_tokens; 1 whose last number is the gold were dropped" in out
    # The CLI says the same and rebuilding is idempotent.
    assert main(["filter", "--in", str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 0
    assert len(list(iter_records(tmp_path / "out"))) == 2
    # Kept samples are spread over shards (so the aligner's workers get several); a rebuild with a
    # larger shard size leaves no stale shard behind.
    filter_samples(str(tmp_path / "in"), str(tmp_path / "out"), verbose=False, shard_lines=1)
    assert sorted(p.name for p in (tmp_path / "out").glob("samples-*.jsonl")) == \
        ["samples-00000.jsonl", "samples-00001.jsonl"]
    assert [(r["qid"], r["sample_index"]) for r in iter_records(tmp_path / "out")] == [("q1", 0), ("q3", 0)]
    filter_samples(str(tmp_path / "in"), str(tmp_path / "out"), verbose=False)
    assert [p.name for p in (tmp_path / "out").glob("samples-*.jsonl")] == ["samples-00000.jsonl"]


def test_filter_output_does_not_depend_on_the_order_requests_finished(tmp_path):
    """A server with requests in flight, or several hf replicas, stores records as they finish; the
    kept samples come out in (question, sample) order, ids' numbers compared as numbers, so the same
    samples align and train alike whatever order they were stored in."""
    keys = [("synthetic/train/10", 1), ("synthetic/train/2", 0), ("synthetic/train/10", 0), ("synthetic/train/9", 0)]
    outs = []
    for name, order in (("a", keys), ("b", keys[::-1])):
        store = ShardStore(tmp_path / name, SETTINGS)
        store.append([record(qid, i, "The answer is 7.", gold="7") for qid, i in order])
        store.close()
        filter_samples(str(tmp_path / name), str(tmp_path / f"{name}-out"), verbose=False)
        outs.append([(p.name, p.read_bytes()) for p in sorted((tmp_path / f"{name}-out").glob("*.jsonl"))])
    assert outs[0] == outs[1]
    assert [(r["qid"], r["sample_index"]) for r in iter_records(tmp_path / "a-out")] == \
        [("synthetic/train/2", 0), ("synthetic/train/9", 0), ("synthetic/train/10", 0), ("synthetic/train/10", 1)]


def test_backoff_grows_with_jitter_and_honours_retry_after():
    delays = [backoff_delay(a, 0.1, cap=1.0) for a in range(6)]
    assert 0.05 <= delays[0] < 0.15 and 0.2 <= delays[2] < 0.6  # base x 2^attempt x [0.5, 1.5)
    assert all(d < 1.5 for d in delays)  # capped (before jitter)
    assert backoff_delay(0, 0.01, retry_after=2.0) == 2.0


def test_retry_after_headers_are_read():
    from types import SimpleNamespace

    from specialize.engine.teacher.openai_backend import _retry_after
    # (the client's header mapping is case-insensitive; lower case stands in for it here)
    reply = lambda **h: SimpleNamespace(headers={k.replace("_", "-"): v for k, v in h.items()})  # noqa: E731
    assert _retry_after(reply(retry_after="2")) == 2.0
    assert _retry_after(reply(retry_after_ms="250", retry_after="9")) == 0.25
    assert _retry_after(reply(retry_after="Wed, 21 Oct 2015 07:28:00 GMT")) is None
    assert _retry_after(reply()) is None


def test_token_bucket_delays(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("specialize.engine.teacher.ratelimit.time.monotonic", lambda: now[0])
    bucket = _Bucket(per_minute=60)  # one per second, bursts of 60
    assert all(bucket.wait_for(1) == 0 for _ in range(60))
    assert bucket.wait_for(1) == pytest.approx(1.0)
    now[0] += 2.0
    assert bucket.wait_for(2) == 0


def test_cli_flags_override_recipe_and_set(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("teacher:\n  samples: 8\n  temperature: 0.3\n  model: from-recipe\n")
    args = build_parser().parse_args(["generate", "--recipe", str(recipe), "--set", "teacher.samples=9",
                                      "--temperature", "0.9", "--format", "in-context-cot", "--out", "o"])
    _, cfg = _config(args)
    assert (cfg.samples, cfg.temperature, cfg.model, cfg.format, cfg.out_dir) == (
        9, 0.9, "from-recipe", "in_context_cot", "o")


@pytest.mark.parametrize("flags, field", [(["--logprobs", "tempered"], "teacher.logprobs"),
                                          (["--backend", "local"], "teacher.backend"),
                                          (["--api", "responses"], "teacher.api")])
def test_cli_flags_are_checked_like_recipe_fields(tmp_path, capsys, flags, field):
    """A bad flag value stops before any model is loaded or request sent, naming the recipe field."""
    assert main(["generate", *flags, "--model", "m", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"command line: {field}: expected one of" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("declared", ["raw", "sampled"])
def test_a_server_folder_from_before_the_logprobs_setting_takes_the_declared_kind(tmp_path, declared):
    """Only the user knows what an old server sent (SGLang: the tempered distribution): an openai folder
    written before teacher.logprobs existed resumes under either declaration and records it; an hf one
    holds the sampled distribution, so "raw" is refused there."""
    old = {k: v for k, v in SETTINGS.items() if k != "logprobs"}
    ShardStore(tmp_path / "server", {**old, "backend": "openai"}).append([record("q", 0)])
    store = ShardStore(tmp_path / "server", {**old, "backend": "openai", "logprobs": declared})
    assert ("q", 0) in store.done
    assert json.loads((tmp_path / "server" / "manifest.json").read_text())["settings"]["logprobs"] == declared
    ShardStore(tmp_path / "local", {**old, "backend": "hf"}).append([record("q", 0)])
    if declared == "raw":
        with pytest.raises(ResumeError, match="logprobs"):
            ShardStore(tmp_path / "local", {**old, "backend": "hf", "logprobs": "raw"})
    else:
        assert ("q", 0) in ShardStore(tmp_path / "local", {**old, "backend": "hf", "logprobs": "sampled"}).done


def test_the_last_line_is_found_from_the_end_and_the_filter_streams_lines(tmp_path):
    """The torn-tail check reads a shard from its end in chunks (a shard is ~1.6 GB): its answer equals a
    plain search at any chunk size; the filter names a corrupt middle line and skips a torn last one."""
    import random

    from specialize.engine.teacher.records import _last_line_start
    rng = random.Random(0)
    for trial in range(200):
        data = b"".join(rng.choice([b"\n", b"ab", b"c" * rng.randint(1, 30)]) for _ in range(rng.randint(1, 12)))
        path = tmp_path / f"f{trial}"
        path.write_bytes(data)
        body = data[:-1] if data.endswith(b"\n") else data
        with open(path, "rb") as fh:
            for chunk in (1, 3, 7, 1 << 20):
                assert _last_line_start(fh, len(data), chunk) == body.rfind(b"\n") + 1, (data, chunk)
    store = ShardStore(tmp_path / "in", SETTINGS)
    store.append([record("q1", 0, "The answer is 12."), record("q2", 0, "The answer is 12.")])
    store.close()
    shard = next((tmp_path / "in").glob("samples-*.jsonl"))
    with open(shard, "ab") as fh:
        fh.write(b'{"qid": "q3", "sample_ind')  # torn by a crash
    assert filter_samples(str(tmp_path / "in"), str(tmp_path / "out"), verbose=False)["samples"] == 2
    lines = shard.read_bytes().split(b"\n")
    shard.write_bytes(lines[0] + b"\n{garbage}\n" + lines[1] + b"\n")
    with pytest.raises(ValueError, match=r"samples-00000\.jsonl at byte \d+: not a teacher record"):
        filter_samples(str(tmp_path / "in"), str(tmp_path / "out"), verbose=False)
