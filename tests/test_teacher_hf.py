"""The `hf` teacher backend on a tiny random GPT-2: its logprobs are those of a direct forward
pass on the sampled ids (the model's own distribution, or with logprobs="sampled" the temperature-
scaled one the tokens were drawn from), its tokens spell the text, and `generate` writes the full
record set with prompts that never contain their own question."""
import dataclasses
import json

import pytest
import torch
from teacher_server import tiny_teacher

from specialize.engine.config import TeacherConfig
from specialize.engine.data import load_dataset_by_name
from specialize.engine.teacher import build_prompts, generate, iter_records
from specialize.engine.teacher.backends import token_string
from specialize.engine.teacher.hf_backend import HFBackend
from specialize.engine.teacher.records import RECORD_FIELDS, ResumeError

PROMPT = "Q: Ann has 3 apples and buys 4 more. How many apples does she have?\nA: Let's think step by step."


@pytest.fixture(scope="module")
def backend():
    model, tok = tiny_teacher()
    return HFBackend(model, tok, device="cpu", model_name="tiny-gpt2")


@pytest.fixture(scope="module")
def sampled_backend():
    model, tok = tiny_teacher()
    return HFBackend(model, tok, device="cpu", model_name="tiny-gpt2", logprobs="sampled")


@pytest.mark.parametrize("mode", ["raw", "sampled"])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 0.0])
def test_logprobs_equal_a_direct_forward_pass(backend, sampled_backend, mode, temperature):
    backend = backend if mode == "raw" else sampled_backend
    assert backend.logprobs == mode
    comp = backend.sample_sync(PROMPT, 3, temperature=temperature, max_tokens=24, top_logprobs=5, seed=7)
    prompt_ids = backend.encode(PROMPT)
    assert comp.prompt_tokens == len(prompt_ids)
    assert comp.completion_tokens == sum(len(s.tokens) for s in comp.samples)
    for s in comp.samples:
        assert s.token_ids and len(s.token_ids) == len(s.tokens) == len(s.token_logprobs) == len(s.top_logprobs)
        assert "".join(s.tokens) == s.text and "Ġ" not in s.text
        assert [bytes(b) for b in s.token_bytes] == [backend.byte_table[i] for i in s.token_ids]
        with torch.no_grad():
            logits = backend.model(torch.tensor([prompt_ids + s.token_ids])).logits[0].double()
        ref = torch.log_softmax(logits / (temperature if mode == "sampled" and temperature else 1.0), dim=-1)
        positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(s.token_ids))
        expected = ref[positions, torch.tensor(s.token_ids)]
        torch.testing.assert_close(torch.tensor(s.token_logprobs, dtype=torch.float64), expected, atol=1e-4, rtol=0)
        top_ref = ref[positions].topk(5, dim=-1).values
        got_top = torch.tensor([[lp for _, lp in alts[:5]] for alts in s.top_logprobs], dtype=torch.float64)
        torch.testing.assert_close(got_top, top_ref, atol=1e-4, rtol=0)
        # a sampled token outside the top-5 is listed after it (k + 1 entries), with its own logprob
        for raw, lp, alts in zip(s.token_bytes, s.token_logprobs, s.top_logprobs):
            name = token_string(bytes(raw))
            assert len(alts) == (5 if any(t == name for t, _ in alts[:5]) else 6) and [name, lp] in alts
        if temperature == 0.0:  # greedy: the sampled token is the top-1
            assert all(alts[0][1] == pytest.approx(lp, abs=1e-6) for alts, lp in zip(s.top_logprobs, s.token_logprobs))
    if temperature == 0.0:
        assert len({s.text for s in comp.samples}) == 1


def _assert_forward_pass_logprobs(backend, prompt, sample, temperature):
    prompt_ids = backend.encode(prompt)
    with torch.no_grad():
        logits = backend.model(torch.tensor([prompt_ids + sample.token_ids])).logits[0].double()
    ref = torch.log_softmax(logits / (temperature if backend.logprobs == "sampled" else 1.0), dim=-1)
    positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(sample.token_ids))
    torch.testing.assert_close(torch.tensor(sample.token_logprobs, dtype=torch.float64),
                               ref[positions, torch.tensor(sample.token_ids)], atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", ["raw", "sampled"])
def test_batched_prompts_of_different_lengths_are_exact(backend, sampled_backend, mode):
    """Left-padded rows of several requests: each sample's logprobs still match its own unpadded
    forward pass, and a request's samples are those it gets alone (its own seeded generator)."""
    backend = backend if mode == "raw" else sampled_backend
    prompts = [PROMPT, "Q: 2 + 2?\nA:", PROMPT + " First, 3 + 4 = 7."]
    results = backend.sample_batch_sync([(p, 2, 10 + i) for i, p in enumerate(prompts)], 0.8, 16, 3)
    for i, (prompt, comp) in enumerate(zip(prompts, results)):
        assert len(comp.samples) == 2
        for s in comp.samples:
            assert s.token_ids and "".join(s.tokens) == s.text
            _assert_forward_pass_logprobs(backend, prompt, s, 0.8)
        alone = backend.sample_sync(prompt, 2, temperature=0.8, max_tokens=16, top_logprobs=3, seed=10 + i)
        assert [s.token_ids for s in alone.samples] == [s.token_ids for s in comp.samples]


def test_prompt_longer_than_the_model_fails_only_its_request(backend):
    too_long = "Q: " + "one two three " * 400
    ok, bad = backend.sample_batch_sync([(PROMPT, 1, 0), (too_long, 1, 0)], 1.0, 4, 2)
    assert len(ok.samples) == 1 and "does not fit" in str(bad)


def test_same_seed_same_samples(backend):
    a = backend.sample_sync(PROMPT, 2, temperature=0.7, max_tokens=10, top_logprobs=2, seed=3)
    b = backend.sample_sync(PROMPT, 2, temperature=0.7, max_tokens=10, top_logprobs=2, seed=3)
    assert [s.token_ids for s in a.samples] == [s.token_ids for s in b.samples]


def test_prompts_never_contain_their_own_question():
    pool = load_dataset_by_name("synthetic/train")[:20]
    prompts = build_prompts(pool, "in_context_cot", 3, pool, seed=0)
    for ex, prompt in zip(pool, prompts):
        assert prompt.count(ex.question.strip()) == 1 and prompt.endswith(f"Q: {ex.question.strip()}\nA:")
        assert prompt.count("Q: ") == 4
    # The exemplar set is fixed by the seed, except for questions that are exemplars themselves.
    assert len(set(p.rsplit("\n\nQ: ", 1)[0] for p in prompts)) == 1 + 3


def test_generate_with_hf_backend_writes_every_key_once(backend, tmp_path, capsys):
    pool = load_dataset_by_name("synthetic/train")[:12]
    cfg = TeacherConfig(backend="hf", dataset="synthetic", samples=3, max_tokens=12, top_logprobs=4,
                        format="in_context_cot", shots=2, concurrency=2, price_prompt_per_1k=0.01,
                        price_completion_per_1k=0.02)
    summary = generate(cfg, pool[:4], str(tmp_path), backend=backend, exemplar_pool=pool, progress=False)
    assert (summary["stored"], summary["expected"], summary["failures"]) == (12, 12, 0)
    assert summary["cost_usd"] == pytest.approx(0.01 * summary["prompt_tokens"] / 1000
                                                + 0.02 * summary["completion_tokens"] / 1000)
    records = list(iter_records(tmp_path))
    assert sorted((r["qid"], r["sample_index"]) for r in records) == [(ex.id, i) for ex in pool[:4] for i in range(3)]
    for r in records:
        assert tuple(r) == RECORD_FIELDS
        assert "".join(r["tokens"]) == r["text"] and r["model"] == "tiny-gpt2" and r["dataset"] == "synthetic/train"
        assert len(r["top_logprobs"][0]) in (4, 5) and r["usage"]["completion_tokens"] == len(r["tokens"])
    assert "cost $" in capsys.readouterr().out
    # Run again: nothing is missing, so nothing is asked for.
    again = generate(cfg, pool[:4], str(tmp_path), backend=backend, exemplar_pool=pool, progress=False)
    assert (again["requests"], again["samples"], again["stored"]) == (0, 0, 12)
    # Another exemplar seed means other prompts: the folder refuses it rather than mixing the two.
    with pytest.raises(ResumeError, match="exemplar_seed"):
        generate(cfg, pool[:4], str(tmp_path), backend=backend, exemplar_pool=pool, progress=False, seed=7)


def test_the_logprobs_setting_changes_the_soft_targets_not_the_samples(backend, sampled_backend):
    """The same seed draws the same tokens in both modes; at T < 1 the raw distribution is the flatter
    one, so its top-1 holds less mass than the sampled one's wherever the teacher is not certain."""
    raw = backend.sample_sync(PROMPT, 2, temperature=0.5, max_tokens=16, top_logprobs=3, seed=11)
    hot = sampled_backend.sample_sync(PROMPT, 2, temperature=0.5, max_tokens=16, top_logprobs=3, seed=11)
    assert [s.token_ids for s in raw.samples] == [s.token_ids for s in hot.samples]
    top1 = lambda comp: [alts[0][1] for s in comp.samples for alts in s.top_logprobs]  # noqa: E731
    pairs = list(zip(top1(raw), top1(hot)))
    assert all(r <= h + 1e-6 for r, h in pairs) and any(r < h - 1e-3 for r, h in pairs)


def test_generate_records_the_logprobs_setting_and_refuses_a_mismatch(backend, sampled_backend, tmp_path):
    pool = load_dataset_by_name("synthetic/train")[:2]
    cfg = TeacherConfig(backend="hf", dataset="synthetic", samples=1, max_tokens=6, top_logprobs=2,
                        format="zero_shot_cot", shots=0, concurrency=1)
    generate(cfg, pool, str(tmp_path / "raw"), backend=backend, progress=False)
    assert json.loads((tmp_path / "raw" / "manifest.json").read_text())["settings"]["logprobs"] == "raw"
    # the other mode is another configuration: its folder does not resume this one
    with pytest.raises(ResumeError, match="logprobs"):
        generate(dataclasses.replace(cfg, logprobs="sampled"), pool, str(tmp_path / "raw"), backend=sampled_backend,
                 progress=False)
    # a backend that computes other logprobs than the configuration says is refused before anything is written
    with pytest.raises(ValueError, match="backend computes 'sampled'"):
        generate(cfg, pool, str(tmp_path / "other"), backend=sampled_backend, progress=False)
    assert not (tmp_path / "other" / "manifest.json").exists()


def test_a_folder_from_before_the_logprobs_setting_resumes_as_what_it_holds(sampled_backend, tmp_path):
    """Old hf folders hold the sampled distribution: with logprobs "sampled" they resume (the manifest
    is rewritten to say so); with "raw" they are another configuration."""
    pool = load_dataset_by_name("synthetic/train")[:3]
    cfg = TeacherConfig(backend="hf", dataset="synthetic", samples=1, max_tokens=6, top_logprobs=2,
                        format="zero_shot_cot", shots=0, concurrency=1, logprobs="sampled")
    generate(cfg, pool[:2], str(tmp_path), backend=sampled_backend, progress=False)
    manifest = tmp_path / "manifest.json"
    old = json.loads(manifest.read_text())
    del old["settings"]["logprobs"]
    old["config_hash"] = "0123456789abcdef"  # what a folder written before the setting existed has
    manifest.write_text(json.dumps(old))
    with pytest.raises(ResumeError, match="logprobs"):
        generate(dataclasses.replace(cfg, logprobs="raw"), pool, str(tmp_path), progress=False,
                 backend=HFBackend(sampled_backend.model, sampled_backend.tokenizer, device="cpu", model_name="tiny-gpt2"))
    summary = generate(cfg, pool, str(tmp_path), backend=sampled_backend, progress=False)
    assert (summary["samples"], summary["stored"]) == (1, 3)  # only the missing question was asked for
    assert json.loads(manifest.read_text())["settings"]["logprobs"] == "sampled"


def test_prompts_are_encoded_as_a_server_encodes_them_bos_included():
    """vLLM and SGLang encode a completions prompt with the tokenizer's special tokens: Llama, Mistral and
    Gemma get their <bos> (Gemma degrades badly without it), GPT-2 nothing."""
    import copy

    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    model, tok = tiny_teacher()
    assert HFBackend(model, tok, device="cpu").encode(PROMPT) == tok(PROMPT)["input_ids"]  # GPT-2 style: no BOS
    raw = copy.deepcopy(tok.backend_tokenizer)
    bos = tok.eos_token  # the tiny vocabulary's one special token stands in for <s>
    raw.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.eos_token_id)])
    llama_like = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=bos, eos_token=bos, pad_token=bos)
    assert llama_like(PROMPT)["input_ids"][0] == tok.eos_token_id  # the stand-in adds its BOS
    backend = HFBackend(model, llama_like, device="cpu")
    assert backend.encode(PROMPT) == llama_like(PROMPT)["input_ids"] == [tok.eos_token_id] + tok(PROMPT)["input_ids"]
    comp = backend.sample_sync(PROMPT, 1, temperature=0.0, max_tokens=4, top_logprobs=2, seed=0)
    assert comp.prompt_tokens == len(backend.encode(PROMPT))


def test_only_the_last_positions_logits_are_computed_and_generation_config_ends_rows():
    model, tok = tiny_teacher()
    backend = HFBackend(model, tok, device="cpu")
    shapes, forward = [], model.forward

    def spy(*args, **kw):
        out = forward(*args, **kw)
        shapes.append(tuple(out.logits.shape))
        return out
    model.forward = spy
    first = backend.sample_sync(PROMPT, 2, temperature=0.0, max_tokens=6, top_logprobs=3, seed=0)
    assert shapes and all(s[:2] == (2, 1) for s in shapes), shapes  # [rows, 1, vocab], the prefill too
    # an end id of the generation config (Llama-3's <|eot_id|>) ends a row as the tokenizer's EOS does
    model.forward = forward
    with torch.no_grad():
        greedy_first = int(model(torch.tensor([backend.encode(PROMPT)])).logits[0, -1].argmax())
    assert first.samples[0].text and greedy_first != tok.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, greedy_first]
    stopped = HFBackend(model, tok, device="cpu").sample_sync(PROMPT, 1, temperature=0.0, max_tokens=6,
                                                              top_logprobs=3, seed=0)
    assert (stopped.samples[0].text, stopped.samples[0].finish_reason) == ("", "stop")
