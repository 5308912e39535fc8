"""The `openai` backend against a server that answers as vLLM and SGLang do (tests/teacher_server.py,
wire="vllm"): a stop string cut from the text but its tokens kept in the logprobs, the end-of-sequence
token listed last, each token decoded on its own (U+FFFD for part of a character). Every request must
succeed at the first attempt and give the records an OpenAI-style server gives for the same samples."""
import itertools

import pytest
from teacher_server import RamblingTeacher, TeacherServer, client_config, tiny_teacher

from specialize.engine.data import load_dataset_by_name
from specialize.engine.teacher import generate, iter_records
from specialize.engine.teacher.hf_backend import HFBackend


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("TEACHER_TEST_KEY", "sk-test")


def config(server, **kw):
    return client_config(server, **{**dict(samples=3, max_tokens=200, top_logprobs=3, concurrency=2, timeout=10.0,
                                           max_retries=0), **kw})


def records(folder) -> list[dict]:
    return sorted(iter_records(folder), key=lambda r: (r["qid"], r["sample_index"]))


class EndingTeacher(RamblingTeacher):
    """Some samples that would go on without a stop string end right after their answer instead, on
    the end-of-sequence token (finish_reason "stop")."""

    ended = 0

    def sample_sync(self, prompt, n, *, seed=None, **kw):
        comp = super().sample_sync(prompt, n, seed=seed, **kw)
        for i, s in enumerate(comp.samples):
            if ((seed or 0) + i) % 3 == 2 and len(prompt) % 2 == 0:  # the continuation with no stop string
                end = s.text.index(".", s.text.index("The answer is")) + 1
                k = next(k for k, e in enumerate(itertools.accumulate(map(len, s.tokens)), 1) if e >= end)
                s.text, s.tokens, s.token_bytes = "".join(s.tokens[:k]), s.tokens[:k], s.token_bytes[:k]
                s.token_logprobs, s.top_logprobs, s.finish_reason = s.token_logprobs[:k], s.top_logprobs[:k], "stop"
                EndingTeacher.ended += 1
        return comp


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_stop_string_and_end_token_past_the_text(tmp_path, api):
    questions = load_dataset_by_name("synthetic/train")[:40]
    out = {}
    for wire in ("openai", "vllm"):
        # OpenAI ends the text at a stop string and sends logprobs for that text only
        with TeacherServer(EndingTeacher(questions, honour_stop=(wire == "openai")), wire=wire, lifetime=120) as srv:
            s = generate(config(srv, api=api), questions, str(tmp_path / wire), progress=False)
        assert (s["stored"], s["failures"], s["retries"]) == (120, 0, 0), wire
        out[wire] = records(tmp_path / wire)
    assert out["vllm"] == out["openai"]
    reasons = [r["finish_reason"] for r in out["vllm"]]
    assert reasons.count("length") > 5 and reasons.count("stop") > 60 and EndingTeacher.ended > 10
    assert all("".join(r["tokens"]) == r["text"] and "\nQ:" not in r["text"] for r in out["vllm"])


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_characters_split_over_tokens_decoded_one_token_at_a_time(tmp_path, api):
    model, tok = tiny_teacher()  # a random model on a byte-level BPE: it writes many partial characters
    hf = HFBackend(model, tok, device="cpu", model_name="m")
    questions = load_dataset_by_name("synthetic/train")[:6]
    out = {}
    for wire in ("openai", "vllm"):
        with TeacherServer(hf, wire=wire, lifetime=120) as srv:
            s = generate(config(srv, api=api, max_tokens=24, stop=[], cut_at_answer=False), questions,
                         str(tmp_path / wire), progress=False)
        assert (s["stored"], s["failures"], s["retries"]) == (18, 0, 0), wire
        out[wire] = records(tmp_path / wire)
    split = plain = 0
    for a, b in zip(out["openai"], out["vllm"], strict=True):
        assert b["text"] == a["text"] and "".join(b["tokens"]) == b["text"]
        assert len(b["tokens"]) == len(a["tokens"]) and b["token_logprobs"] == pytest.approx(a["token_logprobs"])
        split += sum(t != u for t, u in zip(a["tokens"], b["tokens"])) + sum(t == "" for t in a["tokens"])
        # a token that is whole characters, after one that is too, reads the same on both wires
        whole = [_is_utf8(raw) and "\ufffd" not in t for raw, t in zip(a["token_bytes"], a["tokens"])]
        same = [i for i in range(1, len(whole)) if whole[i] and whole[i - 1]]
        assert [a["tokens"][i] for i in same] == [b["tokens"][i] for i in same]
        plain += len(same)
    assert split > 0 and plain > 10  # the check saw characters split over tokens, and whole ones


def _is_utf8(raw) -> bool:
    try:
        bytes(raw).decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_tokens_spelled_as_ids_are_refused_by_name(monkeypatch):
    import openai

    from specialize.engine.teacher.backends import TeacherBackendError
    from specialize.engine.teacher.openai_backend import OpenAIBackend
    backend = OpenAIBackend("m", base_url="http://127.0.0.1:9/v1", api_key_env="TEACHER_TEST_KEY")
    resp = openai.types.Completion.model_validate({
        "id": "c", "object": "text_completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "text": " 12.", "finish_reason": "stop", "logprobs": {
            "tokens": ["token_id:220", "token_id:717"], "token_logprobs": [-0.1, -0.2],
            "top_logprobs": [{"token_id:220": -0.1}, {"token_id:717": -0.2}], "text_offset": [0, 1]}}]})
    with pytest.raises(TeacherBackendError, match="return-tokens-as-token-ids"):
        backend._parse(resp, 1, 1)
