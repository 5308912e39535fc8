"""Student models: named T5 shapes (no download needed) and `build_model` from the recipe's model section.

The named shapes are the published T5 v1.1 / FlanT5 configurations (gated-GELU, untied lm_head so the
decoder output is not rescaled). FlanT5 is T5 v1.1 (LM-adapted) fine-tuned, so the shapes coincide;
they are listed under both names so recipes read like the checkpoints they stand for.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from specialize.engine.config import ConfigError, ModelConfig

_V11 = dict(vocab_size=32128, d_kv=64, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
            relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
            layer_norm_epsilon=1e-6, initializer_factor=1.0, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0)

_SHAPES = {
    # d_model, d_ff, heads, layers (published parameter counts, with a separate 32128 x d_model lm_head;
    # transformers >= 5 ties lm_head to the shared embedding for every T5, so it counts that matrix once)
    "small": (512, 1024, 6, 8),      # 77M
    "base": (768, 2048, 12, 12),     # 248M
    "large": (1024, 2816, 16, 24),   # 783M
    "xl": (2048, 5120, 32, 24),      # 2.85B
    "xxl": (4096, 10240, 64, 24),    # 11.1B
}

NAMED_CONFIGS: dict[str, dict[str, Any]] = {}
for _size, (_d, _ff, _h, _l) in _SHAPES.items():
    _cfg = dict(_V11, d_model=_d, d_ff=_ff, num_heads=_h, num_layers=_l, num_decoder_layers=_l)
    NAMED_CONFIGS[f"t5-v1_1-{_size}"] = _cfg
    NAMED_CONFIGS[f"flan-t5-{_size}"] = dict(_cfg)
# For tests and the demo: a few hundred K parameters; vocab_size follows the tokenizer (build_model).
NAMED_CONFIGS["tiny"] = dict(_V11, vocab_size=512, d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2,
                             num_decoder_layers=2, dropout_rate=0.0)


def t5_config(name_or_path: str, **overrides):
    """A `T5Config` from a named shape, a config.json / model folder, or a hub id; `overrides` win."""
    from transformers import T5Config
    if "num_layers" in overrides and "num_decoder_layers" not in overrides:
        # T5Config's own rule (the decoder has num_layers unless told otherwise), kept for overrides:
        # the named shapes and saved configs spell num_decoder_layers out, so num_layers alone would
        # otherwise change the encoder only
        overrides = {**overrides, "num_decoder_layers": overrides["num_layers"]}
    if name_or_path in NAMED_CONFIGS:
        return T5Config(**{**NAMED_CONFIGS[name_or_path], **overrides})
    path = Path(name_or_path)
    if path.is_file():
        import json
        return T5Config(**{**json.loads(path.read_text()), **overrides})
    try:
        return T5Config.from_pretrained(name_or_path, **overrides)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.config: {name_or_path!r} is neither a named shape "
                          f"({', '.join(NAMED_CONFIGS)}) nor a loadable config ({err})") from None


def torch_dtype(precision: str):
    """The torch dtype of a train.precision (bf16, fp16, fp32)."""
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def hidden_scale(config) -> float:
    """Factor T5 applies to the decoder output before the lm_head (tied-embedding models: d_model**-0.5).
    Newer transformers keep it as `scale_decoder_outputs`; older ones derive it from `tie_word_embeddings`."""
    scaled = getattr(config, "scale_decoder_outputs", None)
    if scaled is None:
        scaled = bool(getattr(config, "tie_word_embeddings", True))
    return config.d_model ** -0.5 if scaled else 1.0


def model_config(model_cfg: ModelConfig, vocab_size: Optional[int] = None):
    """The T5Config a run trains: the pretrained model's, or the named/file config with the overrides.

    vocab_size: the tokenizer's size; a random-init model whose named vocab is smaller grows to it (the
    `tiny` shape always takes it), unless `overrides.vocab_size` is set."""
    from transformers import T5Config
    if model_cfg.name_or_path:
        try:
            config = T5Config.from_pretrained(model_cfg.name_or_path, **model_cfg.overrides)
        except OSError as err:
            raise ConfigError(f"model.name_or_path: cannot load {model_cfg.name_or_path!r} ({err})") from None
    else:
        overrides = dict(model_cfg.overrides)
        if vocab_size and "vocab_size" not in overrides:
            named = NAMED_CONFIGS.get(model_cfg.config, {}).get("vocab_size", 0)
            if model_cfg.config == "tiny" or vocab_size > named:
                overrides["vocab_size"] = vocab_size
        config = t5_config(model_cfg.config, **overrides)
    if vocab_size and config.vocab_size < vocab_size:
        raise ConfigError(f"model: vocab_size {config.vocab_size} is smaller than the tokenizer's "
                          f"{vocab_size} (set model.overrides.vocab_size)")
    return config


def _checkpoint_tensor(name_or_path: str, key: str):
    """One tensor of a checkpoint (local folder or hub id; safetensors or .bin, sharded or not), read alone,
    or None where the checkpoint does not store it."""
    import json

    import torch
    from transformers.utils import cached_file

    def find(filename):
        return cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = find(index_name)
        filename = json.loads(Path(index).read_text())["weight_map"].get(key) if index else single
        path = find(filename) if filename else None
        if path is None:
            continue
        if path.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(path, "pt") as f:
                return f.get_tensor(key) if key in f.keys() else None
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True).get(key)
    return None


def checkpoint_has_own_lm_head(name_or_path: str) -> bool:
    """Whether the checkpoint stores an lm_head apart from its shared embedding (T5 v1.1 and FlanT5 do)."""
    import torch
    head = _checkpoint_tensor(name_or_path, "lm_head.weight")
    if head is None:
        return False
    shared = _checkpoint_tensor(name_or_path, "shared.weight")
    return shared is None or not torch.equal(head, shared)


def _t5_class(own_lm_head: bool):
    """T5ForConditionalGeneration, or for a checkpoint with its own lm_head one that ties only the
    encoder and decoder embeddings to `shared`. transformers >= 5 builds every T5 with lm_head tied and
    unties it on load when the checkpoint's two matrices differ; under ZeRO-3 that check compares
    empty partitions, finds them equal and ties: FlanT5's lm_head was replaced by its embedding."""
    from transformers import T5ForConditionalGeneration
    if not own_lm_head:
        return T5ForConditionalGeneration

    class T5WithOwnLMHead(T5ForConditionalGeneration):
        _tied_weights_keys = {k: v for k, v in T5ForConditionalGeneration._tied_weights_keys.items()
                              if k != "lm_head.weight"}
    return T5WithOwnLMHead


def build_model(model_cfg: ModelConfig, vocab_size: Optional[int] = None, dtype=None, ds_config: Optional[dict] = None):
    """T5ForConditionalGeneration from `name_or_path` (pretrained weights) or random-init from `config`
    (see model_config). With a ZeRO-3 `ds_config` the model is built under DeepSpeed's zero.Init
    (through transformers' DeepSpeed integration): each parameter is partitioned as it is created, so
    no rank ever holds a full copy (11B in bf16 would be 22 GB of host RAM per rank)."""
    import torch
    from transformers import T5ForConditionalGeneration
    dtype = dtype or torch.float32
    config = model_config(model_cfg, vocab_size)
    zero3 = bool(ds_config) and ds_config.get("zero_optimization", {}).get("stage") == 3
    if zero3:
        from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config
        hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841 — transformers sees ZeRO-3 while this object lives
    try:
        if model_cfg.name_or_path:
            cls = _t5_class(zero3 and checkpoint_has_own_lm_head(model_cfg.name_or_path))
            model = cls.from_pretrained(model_cfg.name_or_path, config=config, dtype=dtype)
        elif zero3:
            model = T5ForConditionalGeneration._from_config(config, dtype=dtype)  # zero.Init + gathered init
        else:
            model = T5ForConditionalGeneration(config).to(dtype)
    finally:
        if zero3:
            # later models of this process (eval/export copies) are plain ones
            unset_hf_deepspeed_config()
            del hf_ds
    if model_cfg.gradient_checkpointing:
        model.config.use_cache = False  # the cache is useless in training and clashes with recomputation
        # transformers >= 5 renamed it; the old name still works there but warns
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    return model


def _numel(p) -> int:
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()  # ZeRO-3 leaves an empty local tensor


def param_counts(model) -> dict[str, int]:
    """Matmul parameters by part, for the MFU estimate (engine/mfu.py): encoder and decoder stacks without
    the embedding (a lookup, not a matmul), the decoder's cross-attention K/V projections among them
    (they run on source tokens), and the lm_head ([V, H], one matmul per target token even when tied)."""
    emb = _numel(model.shared.weight)
    cross_kv = sum(_numel(p) for name, p in model.decoder.named_parameters()
                   if ".EncDecAttention.k." in f".{name}" or ".EncDecAttention.v." in f".{name}")
    return {"encoder": sum(_numel(p) for p in model.encoder.parameters()) - emb,
            "decoder": sum(_numel(p) for p in model.decoder.parameters()) - emb,
            "cross_kv": cross_kv,
            "lm_head": _numel(model.lm_head.weight)}


def describe(model) -> str:
    n = sum(_numel(p) for p in model.parameters())
    c = model.config
    return (f"T5 {n / 1e6:.2f}M params (d_model {c.d_model}, layers {c.num_layers}/{c.num_decoder_layers}, "
            f"heads {c.num_heads}, vocab {c.vocab_size}, hidden_scale {hidden_scale(c):.4g})")


# ----------------------------------------------------------------------------- the training module

class FusedLMHead(torch.nn.Linear):
    """T5's lm_head that, given the loss inputs, returns (loss, ce, kl) from the fused kernel instead of logits.

    Being the module that owns lm_head.weight (tied to the embedding) matters under ZeRO-3: DeepSpeed
    gathers a module's parameters around its forward, so the kernel sees the full [V, H] weight. Called
    with hidden states alone it is a plain Linear, so `generate` keeps working on the same model."""

    def configure(self, hidden_scale: float, loss_cfg) -> "FusedLMHead":
        # sample matching is CE on the sampled tokens alone; distribution matching weighs CE by alpha
        self.hidden_scale, self.alpha = hidden_scale, loss_cfg.alpha if loss_cfg.kind == "dm" else 1.0
        self.temperature, self.tail = loss_cfg.temperature, loss_cfg.tail
        self.fused, self.chunk_size = loss_cfg.fused_linear, loss_cfg.chunk_size
        self.grad_weight_dtype = torch.float32 if loss_cfg.grad_weight_fp32 else None
        return self

    def forward(self, h, topk_ids=None, topk_logprobs=None, target=None):
        if target is None:
            return super().forward(h)
        from specialize.kernels import fused_linear_sparse_kl_ce, sparse_kl_ce
        # ids were checked on the host by BatchBuilder; validating here would sync the device every step
        kw = dict(alpha=self.alpha, temperature=self.temperature, tail=self.tail, return_parts=True, validate=False)
        if self.fused:
            return fused_linear_sparse_kl_ce(h, self.weight, topk_ids, topk_logprobs, target,
                                             hidden_scale=self.hidden_scale, chunk_size=self.chunk_size,
                                             grad_weight_dtype=self.grad_weight_dtype, **kw)
        return sparse_kl_ce((h * self.hidden_scale) @ self.weight.T, topk_ids, topk_logprobs, target, **kw)


class Distill(torch.nn.Module):
    """The T5 student with its loss: encoder → decoder → fused lm_head + sparse KL/CE (no [N, V] logits).
    T5's own forward would scale the decoder output and build logits; here the scale goes to the kernel."""

    def __init__(self, t5, loss_cfg):
        super().__init__()
        old = t5.lm_head
        head = FusedLMHead(old.in_features, old.out_features, bias=False, device="meta")
        head.weight = old.weight  # the same Parameter: stays tied to the shared embedding
        t5.lm_head = head.configure(hidden_scale(t5.config), loss_cfg)
        self.t5 = t5

    def forward(self, input_ids, attention_mask, decoder_input_ids, labels, topk_ids, topk_logprobs):
        mask = additive_mask(attention_mask, self.t5.shared.weight.dtype)
        enc = self.t5.encoder(input_ids=input_ids, attention_mask=mask)[0]
        h = self.t5.decoder(input_ids=decoder_input_ids, encoder_hidden_states=enc,
                            encoder_attention_mask=mask, use_cache=False)[0]
        K = topk_ids.shape[-1]
        return self.t5.lm_head(h.reshape(-1, h.shape[-1]), topk_ids.reshape(-1, K),
                               topk_logprobs.reshape(-1, K), labels.reshape(-1))


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, S] 0/1 padding mask -> [B, 1, 1, S] additive mask (0 kept, dtype-min masked), on the device.
    Given a 2-D mask, transformers asks `mask.all()` on the host (to skip masking when nothing is
    padded) three times per forward; a prepared 4-D mask is used as it is, so the step never waits."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


__all__ = ["NAMED_CONFIGS", "t5_config", "model_config", "build_model", "hidden_scale", "param_counts", "describe",
           "FusedLMHead", "Distill", "additive_mask"]
