"""The demo's two starting models, trained from random init on a CPU in minutes.

- `train_toy_teacher`: a small Llama-style causal LM (transformers `LlamaForCausalLM`) trained on
  "prompt + CoT target" text until it solves most in-distribution problems. It stands in for
  code-davinci-002: larger than the student, and the only model that has *seen* the CoT task.
- `train_toy_student`: a small T5 "instruction-tuned" on generic tasks plus a little math,
  the stand-in for FlanT5's start (broad but shallow: it knows the formats, not the skill).

Both loops are plain PyTorch on purpose: they are set-up for the demo, not the engine under
test, and must stay fast on 2 cores. The loss is taken on the target tokens only (prompt
tokens masked) because on a model this small, fitting the prompt wastes most of the steps.
"""
from __future__ import annotations

import functools
import json
import math
import multiprocessing
import os
import random
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm


@dataclass
class ToyTrainConfig:
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 50
    weight_decay: float = 0.01
    seed: int = 0
    # Stop early once a held-out greedy accuracy reaches this (checked every `check_every` steps).
    target_accuracy: float = 0.9
    check_every: int = 250
    # Each batch is cut into this many pieces of neighbouring lengths, each padded to its own longest
    # row, and their gradients summed into one step. The step is the same (the loss stays the batch's
    # mean over its labelled tokens); less padding is computed. In the demo's student mix (short
    # generic tasks beside long math) 58% of the padded tokens are real in one piece, 74% in two; in
    # the teacher's, 84% and 92%. Measured on one core: 0.35 -> 0.26 s per student step, 0.41 -> 0.34
    # per teacher step; more pieces were no faster (smaller matmuls).
    length_pieces: int = 2


def _lr_at(step: int, cfg: ToyTrainConfig) -> float:
    # Linear warm-up then cosine to 10%: the small models are sensitive to a high final lr.
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _targets(model, labels: torch.Tensor) -> torch.Tensor:
    """The labels the logits are scored against: a causal LM's position t predicts token t + 1."""
    return labels if model.config.is_encoder_decoder else labels[:, 1:]


def _label_loss_sum(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """Summed cross-entropy over the labelled tokens of one piece (labels -100 elsewhere)."""
    if model.config.is_encoder_decoder:
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       decoder_input_ids=model.prepare_decoder_input_ids_from_labels(labels=labels)).logits
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                             _targets(model, labels).reshape(-1), ignore_index=-100,
                                             reduction="sum")


def _train_step(model, opt, cfg: ToyTrainConfig, step: int, pieces: Sequence[tuple]) -> float:
    """One optimizer step of either toy loop over a batch given as pieces (input_ids, attention_mask,
    labels): the scheduled lr; the mean loss over the batch's labelled tokens, each piece's summed loss
    divided by the whole batch's count, so the summed gradients are the batch's; the gradient clipped to
    norm 1. Returns the loss."""
    for group in opt.param_groups:
        group["lr"] = _lr_at(step, cfg)
    n_labels = max(1, sum(int((_targets(model, labels) != -100).sum()) for _, _, labels in pieces))
    total = 0.0
    for input_ids, attention_mask, labels in pieces:
        loss = _label_loss_sum(model, input_ids, attention_mask, labels) / n_labels
        loss.backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total


def _length_pieces(batch: Sequence[int], lengths: Sequence[int], pieces: int) -> list[list[int]]:
    """`batch` (row indices) sorted by length and cut into `pieces` runs of neighbouring lengths whose
    sizes differ by at most one (fewer when the batch has fewer rows)."""
    ordered = sorted(batch, key=lambda i: lengths[i])
    n = max(1, min(pieces, len(ordered)))
    bounds = [len(ordered) * k // n for k in range(n + 1)]
    return [ordered[bounds[k]:bounds[k + 1]] for k in range(n)]


def _padded_batch(rows: Sequence[tuple[list[int], list[int]]], pad: int):
    """(input_ids, attention_mask, labels) of `_causal_rows` or `_seq2seq_rows`: inputs right-padded
    with `pad`, labels with -100."""
    inputs = [torch.tensor(ids) for ids, _ in rows]
    ids = pad_sequence(inputs, batch_first=True, padding_value=pad)
    mask = pad_sequence([torch.ones_like(x) for x in inputs], batch_first=True)
    labels = pad_sequence([torch.tensor(lab) for _, lab in rows], batch_first=True, padding_value=-100)
    return ids, mask, labels


def _causal_rows(pairs: Sequence[tuple[str, str]], tokenizer, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) per (prompt, target) pair, tokenized once: the target ends in EOS and the labels
    are -100 on the prompt (the loss is on the target only)."""
    eos = tokenizer.eos_token_id
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    targets = tokenizer([t for _, t in pairs], add_special_tokens=False)["input_ids"]
    return [((p + t + [eos])[:max_len], ([-100] * len(p) + t + [eos])[:max_len]) for p, t in zip(prompts, targets)]


def _seq2seq_rows(pairs: Sequence[tuple[str, str]], tokenizer, max_source: int, max_target: int):
    """(source ids, target ids) per pair, tokenized once, each truncated and ending in EOS."""
    src = tokenizer([p for p, _ in pairs], truncation=True, max_length=max_source)["input_ids"]
    tgt = tokenizer([t for _, t in pairs], truncation=True, max_length=max_target)["input_ids"]
    return list(zip(src, tgt))


def build_toy_teacher(tokenizer, n_layer: int = 4, n_embd: int = 128, n_head: int = 4, n_positions: int = 320):
    """A Llama-style causal LM (rotary positions, SwiGLU, tied embeddings). Rotary positions are why:
    the teacher must copy the question's numbers into its CoT, and a GPT-2 of the same size with
    learned absolute positions learned that copy far later (37% held-out after 1,200 steps, against
    42% after 600 for this one on the same world)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=n_embd, intermediate_size=2 * n_embd,
                      num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_head,
                      max_position_embeddings=n_positions, tie_word_embeddings=True,
                      bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(cfg)


@torch.no_grad()
def greedy_accuracy_causal(model, tokenizer, prompts: Sequence[str], golds: Sequence[str],
                           is_correct: Callable[[str, str], bool], max_new_tokens: int = 160,
                           batch_size: int = 32) -> float:
    """Share of prompts whose greedy continuation `is_correct` (left-padded batched generation)."""
    model.eval()
    tokenizer.padding_side = "left"
    hits = 0
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        hits += sum(is_correct(t, g) for t, g in zip(texts, golds[start:start + batch_size]))
    tokenizer.padding_side = "right"
    model.train()
    return hits / max(1, len(prompts))


def train_toy_teacher(pairs: Sequence[tuple[str, str]], tokenizer, out_dir: str | Path, cfg: ToyTrainConfig,
                      check: tuple[Sequence[str], Sequence[str], Callable[[str, str], bool]] | None = None,
                      model_kwargs: dict | None = None, max_len: int = 320, bar_position: int = 0) -> dict:
    """Train the causal teacher on (prompt, CoT target) pairs; save it with its tokenizer to out_dir.

    `check` = (prompts, golds, is_correct) held out for the early stop; returns a summary dict
    (also written to out_dir/toy_train.json) with the final held-out accuracy.
    """
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model = build_toy_teacher(tokenizer, **(model_kwargs or {}))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    model.train()
    log, acc, t0 = [], None, time.time()
    bar = tqdm(range(cfg.steps), desc="toy teacher", leave=False, position=bar_position)
    rows = _causal_rows(pairs, tokenizer, max_len)
    lengths = [len(ids) for ids, _ in rows]
    for step in bar:
        batch = rng.sample(range(len(rows)), min(cfg.batch_size, len(rows)))
        pieces = [_padded_batch([rows[i] for i in piece], tokenizer.eos_token_id)
                  for piece in _length_pieces(batch, lengths, cfg.length_pieces)]
        loss = _train_step(model, opt, cfg, step, pieces)
        bar.set_postfix(loss=f"{loss:.3f}")
        if check is not None and ((step + 1) % cfg.check_every == 0 or step + 1 == cfg.steps):
            acc = greedy_accuracy_causal(model, tokenizer, *check)
            log.append({"step": step + 1, "loss": loss, "heldout_acc": acc, "seconds": time.time() - t0})
            if acc >= cfg.target_accuracy:
                break
    summary = _save(model, tokenizer, out_dir, cfg, log, acc, params=sum(p.numel() for p in model.parameters()))
    return summary


def build_toy_student(tokenizer, config_name: str = "tiny", **overrides):
    """A random-init T5 of a named shape (specialize.engine.models) sized to the student tokenizer."""
    from transformers import T5ForConditionalGeneration

    from specialize.engine.models import t5_config
    cfg = t5_config(config_name, vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1,
                    decoder_start_token_id=0, **overrides)
    return T5ForConditionalGeneration(cfg)


def train_toy_student(pairs: Sequence[tuple[str, str]], tokenizer, out_dir: str | Path, cfg: ToyTrainConfig,
                      config_name: str = "tiny", overrides: dict | None = None,
                      max_source: int = 256, max_target: int = 192) -> dict:
    """"Instruction-tune" a random-init T5 on (input, target) pairs; save_pretrained to out_dir."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model = build_toy_student(tokenizer, config_name, **(overrides or {}))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    log, t0 = [], time.time()
    bar = tqdm(range(cfg.steps), desc="toy student", leave=False)
    rows = _seq2seq_rows(pairs, tokenizer, max_source, max_target)
    lengths = [len(src) + len(tgt) for src, tgt in rows]
    for step in bar:
        batch = rng.sample(range(len(rows)), min(cfg.batch_size, len(rows)))
        pieces = [_padded_batch([rows[i] for i in piece], tokenizer.pad_token_id)
                  for piece in _length_pieces(batch, lengths, cfg.length_pieces)]
        loss = _train_step(model, opt, cfg, step, pieces)
        bar.set_postfix(loss=f"{loss:.3f}")
        if (step + 1) % cfg.check_every == 0:
            log.append({"step": step + 1, "loss": loss, "seconds": time.time() - t0})
    return _save(model, tokenizer, out_dir, cfg, log, None, params=sum(p.numel() for p in model.parameters()))


def _save(model, tokenizer, out_dir, cfg: ToyTrainConfig, log: list, acc, params: int) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    summary = {"config": asdict(cfg), "params": params, "heldout_acc": acc, "log": log}
    (out / "toy_train.json").write_text(json.dumps(summary, indent=1))
    return summary


# ----------------------------------------------------------------------------- the demo's starting point

@dataclass
class ToyScale:
    """How much of everything the toy stage builds (the demo's default vs --tiny for tests)."""
    # 600 steps reached 72-81% greedy held-out accuracy on the synthetic world (stops early at 90%)
    teacher_steps: int = 600
    teacher_layers: int = 4
    teacher_width: int = 128
    student_steps: int = 600
    student_config: str = "tiny"
    # ~0.8M parameters with an 800-piece vocabulary; three layers each side (on gold CoTs, 600 steps:
    # 38% held-out with a two-layer decoder, 47% with three).
    student_overrides: dict = field(default_factory=lambda: {"d_model": 96, "d_ff": 256, "num_heads": 4, "d_kv": 24,
                                                             "num_layers": 3})
    teacher_vocab: int = 800
    student_vocab: int = 800
    # "A little math" in the instruction-tuning mix, per split of the practice draw: in-distribution
    # problems, and problems in the OOD splits' phrasings and lengths. FlanT5's mix held many math
    # datasets' styles; the OOD splits are out of the *specialization* data's distribution, as
    # MultiArith and SVAMP are out of GSM8K's, not unseen by the start. Measured, specializing on gold
    # CoTs for 750 steps: without ood_templates in this mix the student stays at 11-15% on them while
    # in-distribution dev reaches 65%; with 100, 17% -> 24-26%. (In the demo's 500 DM steps on teacher
    # samples it stayed near its start, 19.5 -> 20%.)
    student_math: dict = field(default_factory=lambda: {"train": 100, "ood_templates": 100, "ood_steps": 100})
    heldout_check: int = 100
    # The practice draw's train split: fresh questions, so the teacher learns the arithmetic rather
    # than memorising a few thousand stories (2,000 questions x 19 epochs reached 23% held-out).
    practice_questions: int = 20000
    # None: every practice question; a number caps the teacher's / the student's training sets.
    teacher_examples: int | None = None
    student_examples: int | None = None
    # Tests only: the teacher trains on the very questions it will answer, so that a few seconds of
    # training still yield correct samples for the filter (a memorising teacher, not a reasoning one).
    teacher_sees_questions: bool = False


GENERIC = ("generic_sort", "generic_count", "generic_bool")


def toy_key(seed: int = 0, sizes: dict | None = None, scale: ToyScale | None = None) -> str:
    """Hash of everything the toy models depend on: the scale, the seed, the split sizes, and a
    fingerprint of the two synthetic draws they learn from (so a change to the world's generator
    retrains them rather than reusing models of an older world), and the source of the code that
    builds them (this module and the tokenizer builders). The demo keeps the toy stage's outputs
    under toy/<key>/, so a second `make demo` reuses them and a changed scale or recipe does not."""
    from specialize.engine import tokenizers
    from specialize.engine.data.synthetic import make_splits
    from specialize.engine.teacher.records import config_hash
    fingerprint = [(e.question, e.rationale) for s in (seed, seed + 1)
                   for split in make_splits(seed=s, sizes=sizes).values() for e in split[:5]]
    code = [Path(f).read_text() for f in (__file__, tokenizers.__file__)]
    return config_hash({"scale": asdict(scale or ToyScale()), "seed": seed, "sizes": dict(sizes or {}),
                        "world": fingerprint, "code": code})


def _train_teacher_job(threads: int, pairs, tokenizer, out_dir, cfg, check, model_kwargs, bar_position: int = 0) -> dict:
    """train_toy_teacher on `threads` torch threads (module level, so a spawned process can run it)."""
    torch.set_num_threads(threads)
    return train_toy_teacher(pairs, tokenizer, out_dir, cfg, check=check, model_kwargs=model_kwargs,
                             bar_position=bar_position)


def _pairs(examples, fmt: str) -> list[tuple[str, str]]:
    from specialize.engine.data import build_prompt, build_target
    return [(build_prompt(e.question, fmt), build_target(e, e.answer, fmt)) for e in examples]


def prepare_toy_models(toy_dir: str | Path, seed: int = 0, sizes: dict | None = None,
                       scale: ToyScale | None = None) -> dict:
    """Tokenizers, the causal teacher and the "instruction-tuned" T5 start, under toy_dir.

    Both models learn from a *second* draw of the synthetic world (seed + 1): the teacher has
    seen the task's distribution but not the questions it will later answer, as code-davinci-002
    had not seen GSM8K's, and the student's generic tasks are not the instances it is evaluated on.
    """
    from specialize.engine.data.synthetic import make_splits
    from specialize.engine.tokenizers import train_byte_bpe, word_count_unigram
    scale = scale or ToyScale()
    toy_dir = Path(toy_dir)
    world = make_splits(seed=seed, sizes=sizes)
    practice = make_splits(seed=seed + 1, sizes={**(sizes or {}), "train": scale.practice_questions})
    seen = {e.question for split in world.values() for e in split}

    def fresh(split: str, n: int | None = None) -> list:
        """Practice questions of a split that the demo's own world does not hold."""
        return [e for e in practice.get(split, []) if e.question not in seen][:n]

    source = world["train"] if scale.teacher_sees_questions else fresh("train")
    teacher_pairs = [(p, " " + t) for p, t in _pairs(source[: scale.teacher_examples], "zero_shot_cot")]
    generic = [e for name in GENERIC for e in fresh(name)]
    # Generic tasks with their CoT, as FlanT5 was tuned on CoT data too: the start then answers them
    # under the same CoT prompt the evaluation uses (tuned answer-only, it wrote arithmetic for them).
    student_pairs = (_pairs(generic[: scale.student_examples], "zero_shot_cot")
                     + _pairs([e for split, n in scale.student_math.items() for e in fresh(split, n)], "zero_shot_cot"))
    # Each tokenizer is trained on its own side's text only, so the vocabularies really differ (BPE
    # merges vs whole words; newlines kept vs collapsed). The student's is built from word counts, as
    # a pretrained T5's 32k pieces spell this world's words and small numbers whole (see
    # word_count_unigram for why not the Unigram trainer).
    t_tok = train_byte_bpe([p + t for p, t in teacher_pairs], scale.teacher_vocab)
    s_tok = word_count_unigram([p + " " + t for p, t in student_pairs + _pairs(world["train"], "zero_shot_cot")],
                             scale.student_vocab)

    dev = (world["train"] if scale.teacher_sees_questions else world["dev"])[: scale.heldout_check]
    from specialize.engine.data import build_prompt, is_correct
    check = ([build_prompt(e.question, "zero_shot_cot") for e in dev], [e.answer for e in dev],
             functools.partial(is_correct, dataset="synthetic/dev"))
    teacher_job = (teacher_pairs, t_tok, toy_dir / "teacher",
                   ToyTrainConfig(steps=scale.teacher_steps, seed=seed, check_every=max(1, scale.teacher_steps // 6)),
                   check, dict(n_layer=scale.teacher_layers, n_embd=scale.teacher_width,
                               n_head=max(1, scale.teacher_width // 32)))
    student_job = dict(pairs=student_pairs, tokenizer=s_tok, out_dir=toy_dir / "student_start",
                       cfg=ToyTrainConfig(steps=scale.student_steps, lr=1e-3, seed=seed,
                                          check_every=max(1, scale.student_steps // 5)),
                       config_name=scale.student_config, overrides=scale.student_overrides)
    cores, busy = os.cpu_count() or 1, os.getloadavg()[0] >= 1.0
    threads = torch.get_num_threads()
    if cores >= 2:
        # The two models are independent: train them side by side, the teacher in a spawned process,
        # each on half the cores. Measured on 2 idle cores: one thread each trains both in 15 s per 60
        # steps, where one model after the other with two threads took 24 s (small matmuls do not
        # scale to a second thread). On a busy machine one thread each, as two threads thrash there.
        each = 1 if busy else cores // 2
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            # the teacher's progress bar on the line below the student's
            teacher_future = pool.submit(_train_teacher_job, each, *teacher_job, bar_position=1)
            torch.set_num_threads(each)
            student = train_toy_student(**student_job)
            teacher = teacher_future.result()
    else:
        teacher = _train_teacher_job(1, *teacher_job)
        student = train_toy_student(**student_job)
    torch.set_num_threads(threads)
    return {"teacher_params": teacher["params"], "teacher_dev_acc": teacher["heldout_acc"],
            "student_params": student["params"], "teacher_dir": str(toy_dir / "teacher"),
            "student_dir": str(toy_dir / "student_start")}
