"""The demo's toy training loops: a batch cut into pieces of neighbouring lengths takes the step the
whole batch takes, checked against transformers' own loss on the whole batch padded at once."""
import random

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence

from specialize.engine.data.synthetic import make_splits
from specialize.engine.demo import toy_models as tm
from specialize.engine.tokenizers import train_byte_bpe, word_count_unigram


def pairs(n: int = 12) -> list[tuple[str, str]]:
    """Prompts and CoT targets of very different lengths: generic tasks beside multi-step math."""
    world = make_splits(seed=3, sizes={"train": n, "generic_bool": n, "generic_sort": n})
    examples = world["train"][: n // 2] + world["generic_bool"][: n // 4] + world["generic_sort"][: n // 4]
    return tm._pairs(examples, "zero_shot_cot")


def gradients(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def hf_reference(model, input_ids, attention_mask, labels) -> tuple[float, torch.Tensor]:
    """transformers' mean loss over the labelled tokens of the whole batch, and its gradient."""
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    loss.backward()
    return loss.item(), gradients(model)


def pieces_step(model, batch, make_piece, lengths, n_pieces: int) -> tuple[float, torch.Tensor]:
    """_train_step's loss and the gradient it clips and applies (the optimizer step is a no-op: lr 0)."""
    model.zero_grad(set_to_none=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    seen = {}
    real_clip = torch.nn.utils.clip_grad_norm_

    def record(params, max_norm):  # the gradient just before clipping changes it
        seen["grad"] = gradients(model).clone()
        return real_clip(params, max_norm)

    torch.nn.utils.clip_grad_norm_ = record
    try:
        cfg = tm.ToyTrainConfig(steps=10, warmup=0, lr=0.0, length_pieces=n_pieces)
        pieces = [make_piece(piece) for piece in tm._length_pieces(batch, lengths, n_pieces)]
        assert len(pieces) == min(n_pieces, len(batch))
        loss = tm._train_step(model, opt, cfg, 0, pieces)
    finally:
        torch.nn.utils.clip_grad_norm_ = real_clip
    return loss, seen["grad"]


@pytest.mark.parametrize("n_pieces", [1, 2, 3, 12])
def test_causal_pieces_take_the_whole_batch_step(n_pieces):
    torch.manual_seed(0)
    data = pairs()
    tok = train_byte_bpe([p + t for p, t in data], 300)
    model = tm.build_toy_teacher(tok, n_layer=2, n_embd=32, n_head=2)
    rows = tm._causal_rows(data, tok, max_len=320)
    batch = random.Random(0).sample(range(len(rows)), len(rows))
    # reference: prompt ids + target ids + EOS per pair, padded at once, labels on the target only
    eos = tok.eos_token_id
    ids, labels = [], []
    for prompt, target in data:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        t = tok(target, add_special_tokens=False)["input_ids"] + [eos]
        ids.append(torch.tensor(p + t))
        labels.append(torch.tensor([-100] * len(p) + t))
    lengths = [len(x) for x in ids]
    assert max(lengths) > 1.5 * min(lengths)  # pieces really differ in width
    full = pad_sequence(ids, batch_first=True, padding_value=eos)
    mask = pad_sequence([torch.ones_like(x) for x in ids], batch_first=True)
    ref_loss, ref_grad = hf_reference(model, full, mask, pad_sequence(labels, batch_first=True, padding_value=-100))

    loss, grad = pieces_step(model, batch, lambda piece: tm._padded_batch([rows[i] for i in piece], eos),
                             [len(r) for r, _ in rows], n_pieces)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n_pieces", [1, 2, 4])
def test_seq2seq_pieces_take_the_whole_batch_step(n_pieces):
    torch.manual_seed(0)
    data = pairs()
    tok = word_count_unigram([p + " " + t for p, t in data], 300)
    model = tm.build_toy_student(tok, "tiny", d_model=32, d_ff=64, num_heads=2, d_kv=16, num_layers=2)
    rows = tm._seq2seq_rows(data, tok, max_source=256, max_target=192)
    batch = random.Random(1).sample(range(len(rows)), len(rows))
    # reference: the tokenizer's own padding of the whole batch, padding labelled -100
    src = tok([p for p, _ in data], return_tensors="pt", padding=True, truncation=True, max_length=256)
    tgt = tok([t for _, t in data], return_tensors="pt", padding=True, truncation=True, max_length=192)
    labels = tgt["input_ids"].masked_fill(tgt["attention_mask"] == 0, -100)
    ref_loss, ref_grad = hf_reference(model, src["input_ids"], src["attention_mask"], labels)

    loss, grad = pieces_step(model, batch, lambda piece: tm._padded_batch([rows[i] for i in piece], tok.pad_token_id),
                             [len(s) + len(t) for s, t in rows], n_pieces)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_length_pieces_are_sorted_runs_of_near_equal_size():
    lengths = [5, 1, 9, 3, 7, 2, 8]
    pieces = tm._length_pieces([0, 1, 2, 3, 4, 5, 6], lengths, 3)
    assert [len(p) for p in pieces] == [2, 2, 3]
    flat = [i for p in pieces for i in p]
    assert sorted(flat) == list(range(7)) and [lengths[i] for i in flat] == sorted(lengths)
    assert tm._length_pieces([2, 4], lengths, 5) == [[4], [2]]  # never an empty piece; 7 < 9
