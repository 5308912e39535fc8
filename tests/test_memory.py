"""`specialize memory`: the estimator against hand-computed figures and real PyTorch objects.

References are independent of engine/memory.py: the T5 parameter count from the architecture written
out here and from a real T5ForConditionalGeneration, ZeRO bytes per stage written out by hand, Adafactor's
state from a real Adafactor step, activations from the tensors autograd actually saves.
"""
import json
import os

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from specialize.engine import memory
from specialize.engine.memory import Setup, activation_bytes, count_params, estimate

SHAPES = [  # d_model, d_ff, heads, d_kv, enc layers, dec layers, vocab, feed-forward
    (64, 128, 4, 16, 2, 2, 512, "gated-gelu"),
    (48, 80, 3, 8, 1, 3, 301, "gated-gelu"),
    (32, 64, 2, 16, 2, 1, 128, "relu"),
]


def t5(d, ff, h, kv, le, ld, V, act, dropout=0.1):
    return T5Config(vocab_size=V, d_model=d, d_ff=ff, num_heads=h, d_kv=kv, num_layers=le,
                    num_decoder_layers=ld, feed_forward_proj=act, dropout_rate=dropout,
                    tie_word_embeddings=False)


def hand_count(d, ff, h, kv, le, ld, V, act, buckets=32, tied=True):
    """T5 by hand: embedding; per layer 4 attention matrices d x (h*kv), FF (3 matrices gated, 2 plain),
    one RMSNorm scale per sub-layer; relative bias in the first layer of each stack; final norms."""
    inner = h * kv
    ffn = (3 if act.startswith("gated") else 2) * d * ff
    enc = le * (4 * d * inner + ffn + 2 * d) + buckets * h + d
    dec = ld * (8 * d * inner + ffn + 3 * d) + buckets * h + d
    return V * d + enc + dec + (0 if tied else V * d)


@pytest.mark.parametrize("shape", SHAPES)
def test_param_count_matches_formula_and_real_model(shape):
    cfg = t5(*shape)
    real = sum(p.numel() for p in T5ForConditionalGeneration(cfg).parameters())  # tied params once
    tied = memory.lm_head_is_tied(cfg)
    assert count_params(cfg) == hand_count(*shape, tied=tied) == real
    assert count_params(cfg, tied_lm_head=False) == hand_count(*shape, tied=False)


def test_named_shapes_have_published_sizes():
    from specialize.engine.models import t5_config
    # untied lm_head: the published FlanT5-XL / XXL sizes (2.85B / 11.1B)
    assert count_params(t5_config("flan-t5-xl"), tied_lm_head=False) == pytest.approx(2.85e9, rel=0.01)
    assert count_params(t5_config("flan-t5-xxl"), tied_lm_head=False) == pytest.approx(11.14e9, rel=0.01)


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_model_state_bytes_per_zero_stage(zero, precision):
    cfg = t5(*SHAPES[0])
    P, ranks = count_params(cfg), 4
    est = estimate(cfg, Setup("x", zero=zero, gpus_per_node=2, nodes=2, precision=precision))
    p = 2 if precision == "bf16" else 4
    # AdamW m+v (8 B) + for bf16 an fp32 master (4 B) and fp32 gradient partition (4 B)
    opt = (16 if p == 2 else 8) * P
    largest = 512 * 64  # the embedding is the largest single matrix
    want = {0: (p * P, p * P, opt), 1: (p * P, p * P, opt / ranks), 2: (p * P, p * P / ranks, opt / ranks),
            3: (p * P / ranks + p * largest, p * P / ranks, opt / ranks)}[zero]
    g = est["per_gpu"]
    assert (g["parameters"], g["gradients"], g["optimizer"]) == pytest.approx(want)
    assert est["per_node_gpus"]["total"] == pytest.approx(2 * g["total"])


@pytest.mark.parametrize("ranks", [1, 4])
def test_zero2_model_states_equal_deepspeed_estimator(ranks):
    cfg = t5(*SHAPES[0])
    est = estimate(cfg, Setup("x", zero=2, gpus_per_node=ranks, precision="bf16"))
    g = est["per_gpu"]
    # DeepSpeed: 2 B fp16 params + 18 B / ranks (fp16 + fp32 grads, fp32 params, Adam m + v)
    assert est["deepspeed"]["gpu"] == int(2 * est["params"] + int(18 * est["params"] / ranks))
    assert g["parameters"] + g["gradients"] + g["optimizer"] == pytest.approx(est["deepspeed"]["gpu"], abs=1)


def test_offload_moves_optimizer_and_params_to_host():
    cfg = t5(*SHAPES[0])
    P = count_params(cfg)
    est = estimate(cfg, Setup("x", zero=3, offload=["optimizer", "param"], gpus_per_node=2,
                              precision="bf16", optimizer="adamw"))
    g, host = est["per_gpu"], est["per_node_host"]
    assert g["optimizer"] == 0 and g["gradients"] == 0 and g["parameters"] == 2 * 512 * 64
    assert host["optimizer"] == pytest.approx(16 * P / 2 * 2) and host["parameters"] == pytest.approx(2 * P)
    with pytest.raises(ValueError, match="param needs --zero 3"):
        estimate(cfg, Setup("x", zero=2, offload=["param"]))


def test_adafactor_states_match_a_real_adafactor_step():
    from transformers.optimization import Adafactor
    cfg = t5(*SHAPES[1])
    model = T5ForConditionalGeneration(cfg)
    opt = Adafactor(model.parameters(), lr=1e-3, scale_parameter=False, relative_step=False)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    real = sum(v.numel() for st in opt.state.values() for k, v in st.items()
               if torch.is_tensor(v) and k in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"))
    assert memory.adafactor_state_elems(cfg) == real
    est = estimate(cfg, Setup("x", zero=0, optimizer="adafactor", precision="fp32"))
    assert est["per_gpu"]["optimizer"] == 4 * real


ADAFACTOR_UNDER_ZERO = """import json, os, sys, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
from transformers import T5Config, T5ForConditionalGeneration
from transformers.optimization import Adafactor
model = T5ForConditionalGeneration(T5Config(**json.loads(sys.argv[3])))
opt = Adafactor(model.parameters(), lr=1e-3, scale_parameter=False, relative_step=False, warmup_init=False)
cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": int(sys.argv[1])},
       "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
engine, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
ids = torch.ones(1, 4, dtype=torch.long)
engine.backward(engine(input_ids=ids, decoder_input_ids=ids).logits.float().square().mean())
engine.step()
inner = getattr(ds_opt, "optimizer", ds_opt)
print(json.dumps(sum(v.numel() for st in inner.state.values() for k, v in st.items()
                     if torch.is_tensor(v) and k.startswith("exp_avg_sq"))))
"""


@pytest.mark.parametrize("zero", [0, 1])
def test_adafactor_states_under_deepspeed_zero(zero, tmp_path):
    """DeepSpeed's ZeRO optimizers step on flat 1-D partitions, so Adafactor factors nothing there: the
    estimate follows what a real engine (one CPU rank) holds, factored under ZeRO-0 only (ZeRO-2 and -3
    partition the same way)."""
    import socket
    import subprocess
    import sys
    cfg = t5(*SHAPES[1])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = tmp_path / "ada.py"
    script.write_text(ADAFACTOR_UNDER_ZERO)
    proc = subprocess.run([sys.executable, str(script), str(zero), str(port), cfg.to_json_string()],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    real = json.loads(proc.stdout.strip().splitlines()[-1])
    est = estimate(cfg, Setup("x", zero=zero, gpus_per_node=1, optimizer="adafactor", precision="fp32"))
    assert est["per_gpu"]["optimizer"] == 4 * real
    assert (real == memory.count_params(cfg)) == (zero > 0)


def saved_activation_bytes(cfg, B, S, T, checkpointing):
    """Bytes of the distinct non-parameter storages autograd saves in a real forward (CPU, fp32)."""
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(cfg).train()
    if checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and (t.is_floating_point() or t.dtype == torch.bool):
            seen[st.data_ptr()] = st.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        enc = model.encoder(input_ids=torch.randint(2, cfg.vocab_size, (B, S)))[0]
        model.decoder(input_ids=torch.randint(2, cfg.vocab_size, (B, T)), encoder_hidden_states=enc,
                      use_cache=False)
    return sum(seen.values())


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("shape,B,S,T,dropout", [(SHAPES[0], 2, 24, 12, 0.1), (SHAPES[1], 3, 40, 20, 0.1),
                                                 (SHAPES[0], 2, 24, 12, 0.0)])
def test_activation_formula_against_saved_tensors(shape, B, S, T, dropout, checkpointing):
    cfg = t5(*shape, dropout=dropout)
    real = saved_activation_bytes(cfg, B, S, T, checkpointing)
    # CPU dropout keeps its mask in the training dtype (4 B here); CUDA keeps bool masks
    est = activation_bytes(cfg, B, S, T, 4, checkpointing, mask_bytes=4)["stored"]
    assert est == pytest.approx(real, rel=0.12)


def test_fused_logits_buffer_is_a_chunk_not_all_rows():
    from specialize.engine.models import t5_config
    cfg = t5_config("flan-t5-xl")
    est = estimate(cfg, Setup("xl", micro_batch=8, src_len=512, tgt_len=256))
    rows = est["fused_chunk_rows"]
    assert est["per_gpu"]["logits_buffer"] == 2 * rows * 32128 * 4
    assert est["naive_logits_bytes"] == 8 * 256 * 32128 * (2 + 4 + 4)
    assert rows < 8 * 256


def test_cli_table_and_json(capsys):
    assert memory.main(["--model", "xl", "--zero", "2", "--micro-batch", "4", "--seq-len", "512,256"]) == 0
    out = capsys.readouterr().out
    assert "flan-t5-xl" in out and "optimizer" in out and "DeepSpeed" in out
    assert memory.main(["--model", "xxl", "--zero", "3", "--offload", "optimizer,param", "--optimizer",
                        "adafactor", "--activation-checkpointing", "--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["setup"]["zero"] == 3 and est["per_node_host"]["total"] > 0
    assert memory.main(["--model", "xl", "--offload", "gpu"]) == 2
    assert "unknown 'gpu'" in capsys.readouterr().err
    assert memory.main(["--model", "xl", "--seq-len", "512"]) == 2


def test_measure_runs_engine_steps_on_cpu(capsys):
    """--measure trains a tiny model for real and reports its peak RSS beside the estimate."""
    assert memory.main(["--model", "tiny", "--zero", "1", "--micro-batch", "2", "--seq-len", "32,16",
                        "--precision", "fp32", "--measure", "--steps", "2", "--no-baseline", "--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    m = est["measured"]
    assert "error" not in m, m.get("error")
    assert m["kind"].startswith("peak RSS") and m["peak_gb"] > est["per_gpu"]["total"] / 2 ** 30
    assert m["tokens_per_second_per_gpu"] > 0
    from specialize.engine.models import t5_config
    ran = T5ForConditionalGeneration(t5_config("tiny", vocab_size=m["vocab_size"]))  # what the engine built
    assert est["params"] == sum(p.numel() for p in ran.parameters())
