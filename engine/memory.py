"""`specialize memory`: will a T5 fit? Per-GPU and per-node bytes for parameters, gradients, optimizer
states, activations and the loss's logits buffer, beside DeepSpeed's own estimators; `--measure` runs a
few real engine steps and puts the measured peak next to the estimate.

    specialize memory --model xl --zero 2 --gpus-per-node 1 --micro-batch 8 --seq-len 512,256
    specialize memory --model xxl --zero 3 --offload optimizer,param --optimizer adafactor --seq-len 512,256
    specialize memory --model tiny --zero 1 --micro-batch 4 --seq-len 64,32 --precision fp32 --measure

Formulas (Ψ = parameter count, N_d = data-parallel ranks = gpus_per_node × nodes, p = bytes of the
training dtype: 2 for bf16, 4 for fp32):
  parameters   p·Ψ (ZeRO-3: p·Ψ/N_d, plus the largest layer gathered at a time)
  gradients    p·Ψ (ZeRO-2/3: p·Ψ/N_d)
  optimizer    AdamW: m + v in fp32 (8 B/param); Adafactor (no momentum): factored, 4·(rows + cols) per
               matrix and 4·n per vector, under ZeRO-0 only; ZeRO ≥ 1 hands the optimizer flat 1-D
               partitions, so its second moment is not factored there (4 B/param). When p = 2, also an
               fp32 master copy and the fp32 gradient partition DeepSpeed builds at step time
               (4 + 4 B/param; DeepSpeed's estimator counts the same).
               Always /N_d (ZeRO ≥ 1). `--offload optimizer` moves it to host memory; `--offload param`
               (ZeRO-3) moves the parameter shards too. With optimizer offload the gradients go to the host
               in fp32 (the partition above) and the device keeps only reduce buckets (not counted).
  activations  the tensors autograd saves, counted per layer (see `activation_bytes`); with
               checkpointing, one block input per layer plus one layer recomputed at a time.
  logits       fused loss: one chunk of rows × V in fp32, twice (logits, then their gradient in place
               is the same buffer; the fp32 softmax working copy is the second); naive: the B·T·V logits
               in p plus their fp32 log-softmax and gradient.
The parameter count comes from the T5 v1.1 architecture (`param_shapes`), not from building the model,
so an 11B estimate takes milliseconds; tests check it against the real `T5ForConditionalGeneration`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field

from specialize.engine.cli import HelpFormatter

GiB = 2 ** 30


# ----------------------------------------------------------------------------- the model's shapes

def lm_head_is_tied(cfg) -> bool:
    """transformers >= 5 ties T5's lm_head to the shared embedding whatever the config says."""
    import transformers
    return bool(getattr(cfg, "tie_word_embeddings", True)) or int(transformers.__version__.split(".")[0]) >= 5


def param_shapes(cfg, tied_lm_head: bool | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """Every parameter of T5ForConditionalGeneration(cfg) by name and shape, from the architecture alone."""
    d, ff, V, h = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.num_heads
    inner = h * cfg.d_kv
    gated = cfg.is_gated_act if hasattr(cfg, "is_gated_act") else "gated" in cfg.feed_forward_proj
    shapes = [("shared", (V, d))]

    def attention(prefix, rel_bias):
        out = [(f"{prefix}.{w}", (inner, d)) for w in ("q", "k", "v")] + [(f"{prefix}.o", (d, inner))]
        if rel_bias:  # only the first layer of each stack owns the relative position buckets
            out.append((f"{prefix}.relative_attention_bias", (cfg.relative_attention_num_buckets, h)))
        return out

    def feed_forward(prefix):
        wi = [(f"{prefix}.wi_0", (ff, d)), (f"{prefix}.wi_1", (ff, d))] if gated else [(f"{prefix}.wi", (ff, d))]
        return wi + [(f"{prefix}.wo", (d, ff))]

    for i in range(cfg.num_layers):
        p = f"encoder.{i}"
        shapes += attention(f"{p}.self", i == 0) + [(f"{p}.ln_self", (d,))]
        shapes += feed_forward(f"{p}.ff") + [(f"{p}.ln_ff", (d,))]
    shapes.append(("encoder.final_ln", (d,)))
    for i in range(cfg.num_decoder_layers):
        p = f"decoder.{i}"
        shapes += attention(f"{p}.self", i == 0) + [(f"{p}.ln_self", (d,))]
        shapes += attention(f"{p}.cross", False) + [(f"{p}.ln_cross", (d,))]
        shapes += feed_forward(f"{p}.ff") + [(f"{p}.ln_ff", (d,))]
    shapes.append(("decoder.final_ln", (d,)))
    if not (lm_head_is_tied(cfg) if tied_lm_head is None else tied_lm_head):
        shapes.append(("lm_head", (V, d)))
    return shapes


def count_params(cfg, tied_lm_head: bool | None = None) -> int:
    return sum(math.prod(s) for _, s in param_shapes(cfg, tied_lm_head))


def largest_layer_params(cfg) -> int:
    """Largest single module (what ZeRO-3 gathers at once): the embedding, or an FF matrix if wider."""
    return max(math.prod(s) for _, s in param_shapes(cfg))


def adafactor_state_elems(cfg) -> int:
    """Adafactor (beta1=None) second moments: a row and a column vector per matrix, full size for vectors."""
    return sum(s[0] + s[1] if len(s) == 2 else math.prod(s) for _, s in param_shapes(cfg))


# ----------------------------------------------------------------------------- activations

def activation_bytes(cfg, batch: int, src_len: int, tgt_len: int, p: int, checkpointing: bool,
                     mask_bytes: int = 1) -> dict:
    """Bytes autograd keeps for backward in one micro-batch (eager attention, as transformers runs T5).

    Counted tensor by tensor from what T5's modules save (checked against saved_tensors_hooks in the
    tests). N = B·S, M = B·T tokens; inner = heads·d_kv; m = mask_bytes per dropout mask (1: CUDA's bool
    masks; CPU keeps them in the training dtype) when dropout > 0, else 0; r = 4 (the fp32 rsqrt per token
    each RMSNorm keeps). A dropped tensor keeps its own copy (p) next to the mask, so a dropout costs p + m.
      RMSNorm (input, input·rsqrt, output)                 3p per element + r per token
      self-attention: q, k, v, output                       4p·inner per token
                      softmax + dropped probabilities       B·heads·L²·(p + [p + m])
      gated-GELU FF (gelu_new keeps x, tanh, 1 + tanh, 0.5·x·(…), the linear branch, the product,
                     the dropped product)                   ff·(6p + [p + m]) per token
      residual dropouts                                     m·d per token each
    Encoder layer: N·[d·(6p + 2m) + 2r + 4p·inner + FF] + B·heads·S²·(p + [p + m])
    Decoder layer: the same over M and T², plus cross-attention
                   M·[d·(3p + m) + r + 2p·inner] + 2p·N·inner + B·heads·T·S·(p + [p + m])
                   (its k and v project the encoder output, per layer)
    Stack edges: embedding and final dropout masks, final norms, the encoder output and the decoder
    output kept by the loss: (N + M)·(d·(3p + 2m) + r).
    Checkpointing (HF, per T5Block): the stacks keep each block's input (N·d·p, M·d·p per layer) and the
    edges; backward recomputes one block at a time, so the largest block is added once ("recompute").
    """
    d, ff, h, inner = cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.num_heads * cfg.d_kv
    drop = cfg.dropout_rate > 0
    m = mask_bytes if drop else 0
    dropped = p + m if drop else 0  # a dropout's output copy and its mask
    r = 4
    B, S, T = batch, src_len, tgt_len
    N, M = B * S, B * T
    gated = cfg.is_gated_act if hasattr(cfg, "is_gated_act") else "gated" in cfg.feed_forward_proj
    ff_part = ff * ((6 * p if gated else 2 * p) + dropped)
    enc_layer = N * (d * (6 * p + 2 * m) + 2 * r + 4 * p * inner + ff_part) + B * h * S * S * (p + dropped)
    dec_self_ff = M * (d * (6 * p + 2 * m) + 2 * r + 4 * p * inner + ff_part) + B * h * T * T * (p + dropped)
    dec_cross = M * (d * (3 * p + m) + r + 2 * p * inner) + 2 * p * N * inner + B * h * T * S * (p + dropped)
    dec_layer = dec_self_ff + dec_cross
    edges = (N + M) * (d * (3 * p + 2 * m) + r)
    L_enc, L_dec = cfg.num_layers, cfg.num_decoder_layers
    if checkpointing:
        stored = L_enc * N * d * p + L_dec * M * d * p + edges
        recompute = max(enc_layer, dec_layer)
    else:
        stored, recompute = L_enc * enc_layer + L_dec * dec_layer + edges, 0
    return {"total": stored + recompute, "stored": stored, "recompute": recompute,
            "encoder_layer": enc_layer, "decoder_layer": dec_layer}


def logits_bytes(cfg, batch: int, tgt_len: int, p: int, fused: bool, chunk_rows: int | None = None) -> dict:
    """The loss's [rows, V] buffer: fused = one chunk of rows in fp32 (logits, overwritten in place by
    their gradient, plus the softmax working copy); naive = all B·T rows: logits in p, fp32 log-softmax
    kept for backward, fp32 gradient."""
    V, M = cfg.vocab_size, batch * tgt_len
    if fused:
        from specialize.kernels import default_chunk_rows
        rows = chunk_rows or default_chunk_rows(M, cfg.d_model, V)
        return {"rows": rows, "bytes": 2 * rows * V * 4}
    return {"rows": M, "bytes": M * V * (p + 4 + 4)}


# ----------------------------------------------------------------------------- the estimate

@dataclass
class Setup:
    model: str
    zero: int = 2
    offload: list[str] = field(default_factory=list)
    gpus_per_node: int = 1
    nodes: int = 1
    micro_batch: int = 8
    src_len: int = 512
    tgt_len: int = 256
    checkpointing: bool = False
    optimizer: str = "adamw"
    precision: str = "bf16"
    fused_loss: bool = True
    chunk_rows: int | None = None


def estimate(cfg, s: Setup) -> dict:
    """Bytes per GPU (device) and per node (device total and host) for the setup; see the module docstring."""
    if s.zero not in (0, 1, 2, 3):
        raise ValueError(f"--zero: expected 0, 1, 2 or 3, got {s.zero}")
    if "param" in s.offload and s.zero != 3:
        raise ValueError("--offload param needs --zero 3")
    if "optimizer" in s.offload and s.zero < 1:
        raise ValueError("--offload optimizer needs --zero >= 1")
    p = {"bf16": 2, "fp16": 2, "fp32": 4}[s.precision]
    P = count_params(cfg)
    ranks = s.gpus_per_node * s.nodes
    shard = lambda nbytes, stage: nbytes / ranks if s.zero >= stage else nbytes  # noqa: E731
    # mixed precision: an fp32 master copy and, at step time, an fp32 copy of the gradient partition
    master = 8 * P if p < 4 else 0
    if s.optimizer == "adamw":
        opt_states = 8 * P
    else:  # DeepSpeed's ZeRO optimizers step on flat partitions: Adafactor factors nothing there
        opt_states = 4 * (adafactor_state_elems(cfg) if s.zero == 0 else P)
    params = shard(p * P, 3)
    gathered = p * largest_layer_params(cfg) if s.zero == 3 else 0  # the layer in use, fully gathered
    grads = shard(p * P, 2)
    optim = shard(opt_states + master, 1)
    act = activation_bytes(cfg, s.micro_batch, s.src_len, s.tgt_len, p, s.checkpointing)
    logits = logits_bytes(cfg, s.micro_batch, s.tgt_len, p, s.fused_loss, s.chunk_rows)
    device = {"parameters": params + gathered, "gradients": grads, "optimizer": optim,
              "activations": act["total"], "logits_buffer": logits["bytes"]}
    host = {"parameters": 0.0, "gradients": 0.0, "optimizer": 0.0}
    if "optimizer" in s.offload:
        # ZeRO-Offload: fp32 states, master copy and the fp32 gradient partition live on the host; the
        # device keeps only reduce buckets of gradients (ignored here)
        host["optimizer"], device["optimizer"] = optim, 0.0
        # (mixed precision: that fp32 partition is already in `optimizer`; fp32 training moves `grads`)
        host["gradients"], device["gradients"] = (0.0 if p < 4 else grads), 0.0
    if "param" in s.offload:
        host["parameters"], device["parameters"] = params, gathered
    device["total"] = sum(device.values())
    host_per_node = {k: v * s.gpus_per_node for k, v in host.items()}
    host_per_node["total"] = sum(host_per_node.values())
    return {"setup": asdict(s), "params": P, "largest_layer_params": largest_layer_params(cfg),
            "ranks": ranks, "bytes_per_param": p, "per_gpu": device,
            "per_node_gpus": {k: v * s.gpus_per_node for k, v in device.items()},
            "per_node_host": host_per_node, "naive_logits_bytes": logits_bytes(cfg, s.micro_batch, s.tgt_len,
                                                                               p, False)["bytes"],
            "fused_chunk_rows": logits["rows"] if s.fused_loss else None,
            "activation_layers": act, "deepspeed": deepspeed_estimate(cfg, s)}


def deepspeed_estimate(cfg, s: Setup) -> dict | None:
    """DeepSpeed's own model-state estimators (no activations) for the same setup, where one exists."""
    import contextlib
    try:
        # DeepSpeed's logger binds to the stdout of its first import and warns there: keep --json clean
        with contextlib.redirect_stdout(sys.stderr):
            import deepspeed  # noqa: F401
        if s.zero in (1, 2):
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
            cpu, gpu = estimate_zero2_model_states_mem_needs(
                count_params(cfg), s.gpus_per_node, s.nodes, cpu_offload="optimizer" in s.offload)
            return {"estimator": "estimate_zero2_model_states_mem_needs", "gpu": gpu, "cpu_per_node": cpu}
        if s.zero == 3:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
            cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
                count_params(cfg), largest_layer_params(cfg), s.gpus_per_node, s.nodes,
                cpu_offload="optimizer" in s.offload, cpu_offload_params="param" in s.offload)
            return {"estimator": "estimate_zero3_model_states_mem_needs", "gpu": gpu, "cpu_per_node": cpu}
    except ImportError:
        return None
    return None


# ----------------------------------------------------------------------------- measurement

def runtime_baseline_gb() -> float:
    """Peak RSS of a process that only imports what the engine imports: the floor under any CPU peak."""
    import subprocess
    code = ("import resource, torch, deepspeed, transformers, specialize.engine.train; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    from specialize.engine.measure import subprocess_env
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env())
    try:
        return int(out.stdout.strip().splitlines()[-1]) / 2 ** 20
    except (ValueError, IndexError):
        return float("nan")


def measure(s: Setup, steps: int = 3, keep: bool = False, baseline: bool = True) -> dict:
    """Run `steps` real engine steps with this setup on a synthetic world of its shape (one node: one
    process per GPU, or per CPU rank without CUDA) and return the peak memory the engine logged."""
    import shutil

    import torch

    from specialize.engine.measure import engine_recipe, run_engine, scratch_dir, steady, synthetic_world
    if s.nodes != 1:
        return {"error": "--measure runs on one node (use --nodes 1)"}
    ranks = s.gpus_per_node
    root = scratch_dir("specialize-memory-")
    try:
        world = synthetic_world(root / "world", s.micro_batch * ranks * (steps + 1), s.src_len, s.tgt_len)
        recipe = engine_recipe(world, root / "run", model=s.model, zero=s.zero, offload=s.offload,
                               optimizer=s.optimizer, precision=s.precision, micro_batch=s.micro_batch,
                               steps=steps, fused=s.fused_loss, checkpointing=s.checkpointing)
        run = run_engine(recipe, nproc=ranks)
        from specialize.engine.tokenizers import load_tokenizer
        vocab = len(load_tokenizer(world["tokenizer"]))
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    cuda = torch.cuda.is_available()
    result = {"kind": "torch.cuda.max_memory_allocated" if cuda else "peak RSS (rank 0 process)",
              "steps": steps, "vocab_size": vocab if s.model == "tiny" else None}
    if run["returncode"] != 0 or not run["rows"]:
        result["error"] = f"engine exited with {run['returncode']}: {run['stderr_tail'][-1500:]}"
        return result
    result["peak_gb"] = max(r["peak_mem_gb"] for r in run["rows"])
    result["peak_host_rss_gb"] = run["peak_host_rss_gb"]  # the whole process tree, sampled
    result["tokens_per_second_per_gpu"] = steady(run["rows"], "tokens_per_second_per_gpu", 1)
    if not cuda and baseline:
        base = runtime_baseline_gb()
        result["runtime_baseline_gb"] = base
        result["peak_minus_runtime_gb"] = result["peak_gb"] - base
        result["note"] = (f"RSS includes the Python/torch/DeepSpeed runtime ({base:.3f} GiB after imports "
                          f"alone); above it: {result['peak_gb'] - base:.3f} GiB")
    return result


# ----------------------------------------------------------------------------- report

def format_table(est: dict, measured: dict | None = None) -> str:
    s = est["setup"]
    g = lambda b: f"{b / GiB:10.3f}"  # noqa: E731
    lines = [f"{s['model']}: {est['params'] / 1e6:.1f}M params, ZeRO-{s['zero']}"
             f"{' + offload ' + ','.join(s['offload']) if s['offload'] else ''}, {s['precision']}, "
             f"{s['optimizer']}, {s['gpus_per_node']} GPU/node x {s['nodes']} node(s), micro-batch "
             f"{s['micro_batch']}, seq {s['src_len']}->{s['tgt_len']}, checkpointing "
             f"{'on' if s['checkpointing'] else 'off'}",
             f"{'GiB':<16}{'per GPU':>10}{'per node':>10}"]
    for k in ("parameters", "gradients", "optimizer", "activations", "logits_buffer", "total"):
        lines.append(f"{k:<16}{g(est['per_gpu'][k])}{g(est['per_node_gpus'][k])}")
    lines.append(f"{'host (offload)':<16}{'':>10}{g(est['per_node_host']['total'])}")
    lines.append(f"logits buffer: fused {est['per_gpu']['logits_buffer'] / GiB:.3f} GiB "
                 f"(chunk {est['fused_chunk_rows']} rows) vs naive B*T*V {est['naive_logits_bytes'] / GiB:.3f} GiB")
    ds = est.get("deepspeed")
    if ds:
        lines.append(f"DeepSpeed {ds['estimator']}: model states {ds['gpu'] / GiB:.3f} GiB per GPU, "
                     f"{ds['cpu_per_node'] / GiB:.3f} GiB host per node (fp16 grads + fp32 grads, no activations)")
    if measured and measured.get("error"):
        lines.append(f"measured: failed ({measured['error'][:300]})")
    elif measured:
        lines.append(f"measured peak ({measured['kind']}): {measured['peak_gb']:.3f} GiB over "
                     f"{measured['steps']} steps" + (f"; {measured['note']}" if measured.get("note") else ""))
    return "\n".join(lines)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="specialize memory", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--model", required=True, help="xl, xxl, a named config (t5-v1_1-small, ...) or CONFIG.json")
    ap.add_argument("--zero", type=int, default=2, choices=(0, 1, 2, 3), help="ZeRO stage")
    ap.add_argument("--offload", default="", help="comma list of: optimizer, param")
    ap.add_argument("--gpus-per-node", type=int, default=1, help="GPUs per node (ranks sharing a host)")
    ap.add_argument("--nodes", type=int, default=1, help="nodes (ZeRO partitions over gpus-per-node x nodes)")
    ap.add_argument("--micro-batch", type=int, default=8, help="sequences per micro-batch per GPU")
    ap.add_argument("--seq-len", default="512,256", help="source,target tokens")
    ap.add_argument("--activation-checkpointing", action="store_true", help="recompute activations in backward")
    ap.add_argument("--optimizer", default="adamw", choices=("adamw", "adafactor"), help="optimizer (its state size)")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"), help="weight and activation dtype")
    ap.add_argument("--naive-loss", action="store_true", help="estimate the unfused loss (full B*T*V logits)")
    ap.add_argument("--measure", action="store_true", help="run a few real engine steps and report the peak")
    ap.add_argument("--steps", type=int, default=3, help="engine steps for --measure")
    ap.add_argument("--no-baseline", action="store_true",
                    help="CPU --measure: skip the imports-only process that measures the runtime's own RSS")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return ap.parse_args(argv)


SHORT_NAMES = {"small": "t5-v1_1-small", "base": "t5-v1_1-base", "large": "t5-v1_1-large",
               "xl": "flan-t5-xl", "xxl": "flan-t5-xxl"}


def resolve_model(name: str) -> tuple[str, object]:
    from specialize.engine.models import t5_config
    name = SHORT_NAMES.get(name, name)
    return name, t5_config(name)


def setup_from_args(args) -> Setup:
    try:
        src, tgt = (int(x) for x in args.seq_len.split(","))
    except ValueError:
        raise ValueError(f"--seq-len: expected SOURCE,TARGET like 512,256, got {args.seq_len!r}") from None
    offload = [x for x in args.offload.split(",") if x]
    bad = [x for x in offload if x not in ("optimizer", "param")]
    if bad:
        raise ValueError(f"--offload: unknown {bad[0]!r} (known: optimizer, param)")
    return Setup(model=SHORT_NAMES.get(args.model, args.model), zero=args.zero, offload=offload,
                 gpus_per_node=args.gpus_per_node, nodes=args.nodes, micro_batch=args.micro_batch,
                 src_len=src, tgt_len=tgt, checkpointing=args.activation_checkpointing,
                 optimizer=args.optimizer, precision=args.precision, fused_loss=not args.naive_loss)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from specialize.engine.config import ConfigError
    try:
        setup = setup_from_args(args)
        _, cfg = resolve_model(args.model)
        est = estimate(cfg, setup)
    except (ValueError, ConfigError) as err:
        print(f"specialize memory: {err}", file=sys.stderr)
        return 2
    measured = None
    if args.measure:
        measured = measure(setup, steps=args.steps, baseline=not args.no_baseline)
        if measured.get("vocab_size") and measured["vocab_size"] != cfg.vocab_size:
            # `tiny` takes the tokenizer's vocab in the engine: estimate the model that actually ran
            from specialize.engine.models import t5_config
            est = estimate(t5_config(setup.model, vocab_size=measured["vocab_size"]), setup)
        est["measured"] = measured
        if measured.get("error"):
            print(f"specialize memory: --measure failed: {measured['error']}", file=sys.stderr)
    print(json.dumps(est, indent=2) if args.json else format_table(est, measured))
    return 0


if __name__ == "__main__":
    sys.exit(main())
