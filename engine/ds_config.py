"""The DeepSpeed config of a run: the user's JSON (a path or inline in the recipe) completed from the recipe.

Rules: the recipe owns the batch shape, precision, clipping and ZeRO stage; a user JSON may set them too,
but then they must agree (a mismatch raises ConfigError naming both). Batch fields are always derived:
train_batch_size = micro_batch_size x grad_accum x world_size. The optimizer and the schedule come from
`train` (the engine passes them as client objects), so a JSON "optimizer"/"scheduler" block is refused,
except that optimizer offload with AdamW (`deepspeed.offload: [optimizer]`, or an offload_optimizer block
in the JSON) asks DeepSpeed for its CPU Adam (a C++ op).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from specialize.engine.config import ConfigError, Recipe

OFFLOADS = ("optimizer", "param")


def load_user_config(recipe: Recipe) -> tuple[dict, str]:
    """(the user's DeepSpeed dict, where it came from) — {} when the recipe gives none."""
    cfg = recipe.deepspeed.config
    if cfg is None:
        return {}, "deepspeed"
    if isinstance(cfg, dict):
        return copy.deepcopy(cfg), "deepspeed.config"
    path = Path(cfg)
    try:
        return json.loads(path.read_text()), str(path)
    except OSError as err:
        raise ConfigError(f"deepspeed.config: cannot read {cfg!r} ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{cfg}:{err.lineno}: invalid JSON ({err.msg})") from None


def effective_offload(recipe: Recipe) -> list[str]:
    """deepspeed.offload plus what the user's JSON offloads itself (offload_optimizer / offload_param
    with a device other than "none"): a JSON that offloads must get the same handling as the recipe key."""
    out = list(recipe.deepspeed.offload)
    zero = load_user_config(recipe)[0].get("zero_optimization", {})
    for what in OFFLOADS:
        block = zero.get(f"offload_{what}")
        if isinstance(block, dict) and block.get("device", "none") != "none" and what not in out:
            out.append(what)
    return out


def _agree(cfg: dict, key: str, want: Any, where: str, recipe_key: str) -> None:
    """Set cfg[key] = want, or check that the user's value is the same."""
    have = cfg.get(key)
    if have is None or have == "auto":
        cfg[key] = want
    elif have != want:
        raise ConfigError(f"{where}: {key}={have!r} disagrees with the recipe's {recipe_key}={want!r}")


def build_ds_config(recipe: Recipe, world_size: int) -> dict:
    """The complete DeepSpeed config dict for `world_size` ranks."""
    cfg, where = load_user_config(recipe)
    t = recipe.train
    for block in ("optimizer", "scheduler"):
        if block in cfg:
            raise ConfigError(f"{where}: remove the {block!r} block; the engine builds it from train.optimizer, "
                              f"train.lr, train.weight_decay and train.warmup_steps")
    _agree(cfg, "train_micro_batch_size_per_gpu", t.micro_batch_size, where, "train.micro_batch_size")
    _agree(cfg, "gradient_accumulation_steps", t.grad_accum, where, "train.grad_accum")
    _agree(cfg, "train_batch_size", t.micro_batch_size * t.grad_accum * world_size, where,
           f"micro_batch_size x grad_accum x {world_size} ranks")
    _agree(cfg, "gradient_clipping", float(t.grad_clip), where, "train.grad_clip")

    # precision: exactly one of bf16/fp16 enabled, or neither for fp32
    for name in ("bf16", "fp16"):
        block = cfg.setdefault(name, {})
        enabled = block.get("enabled")
        want = t.precision == name
        if enabled not in (None, "auto") and bool(enabled) != want:
            raise ConfigError(f"{where}: {name}.enabled={enabled} disagrees with train.precision={t.precision}")
        block["enabled"] = want

    zero = cfg.setdefault("zero_optimization", {})
    stage = zero.get("stage")
    if stage is None:
        zero["stage"] = recipe.deepspeed.zero_stage
    elif stage != recipe.deepspeed.zero_stage:
        raise ConfigError(f"{where}: zero_optimization.stage={stage} disagrees with "
                          f"deepspeed.zero_stage={recipe.deepspeed.zero_stage}")
    if zero["stage"] not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage: expected 0, 1, 2 or 3, got {zero['stage']}")
    for what in recipe.deepspeed.offload:
        if what not in OFFLOADS:
            raise ConfigError(f"deepspeed.offload: unknown {what!r} (known: {', '.join(OFFLOADS)})")
    offload = effective_offload(recipe)
    if "optimizer" in offload:
        if zero["stage"] == 0:
            raise ConfigError("deepspeed.offload: optimizer offload needs zero_stage >= 1")
        zero.setdefault("offload_optimizer", {"device": "cpu", "pin_memory": True})
        if t.optimizer != "adamw":
            # a torch optimizer stepping on the host copy; DeepSpeed otherwise insists on its CPU Adam
            cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    if "param" in offload:
        if zero["stage"] != 3:
            raise ConfigError("deepspeed.offload: param offload needs zero_stage 3")
        zero.setdefault("offload_param", {"device": "cpu", "pin_memory": True})
    if t.optimizer == "adafactor" and zero["stage"] > 0:
        # transformers' Adafactor is a plain torch optimizer; ZeRO shards its state like AdamW's
        cfg.setdefault("zero_allow_untested_optimizer", True)
    if zero["stage"] == 3:
        # export and eval gather the weights themselves; no 16-bit copy on every save
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", False)
    cfg.setdefault("steps_per_print", 10 ** 9)  # the engine logs; keep DeepSpeed's own step prints quiet
    cfg.setdefault("wall_clock_breakdown", False)
    # DeepSpeed's throughput timer (on by default) waits for the whole device at the start and end
    # of every micro-step, to time steps it prints only every steps_per_print; the engine times its own
    cfg.setdefault("timers", {"throughput": {"enabled": False}})
    return cfg


def uses_deepspeed_optimizer(recipe: Recipe) -> bool:
    """Optimizer offload with AdamW: DeepSpeed builds its CPU Adam (the fast host step) from the config."""
    return "optimizer" in effective_offload(recipe) and recipe.train.optimizer == "adamw"


def deepspeed_optimizer_block(recipe: Recipe) -> dict:
    t = recipe.train
    return {"type": "AdamW", "params": {"lr": t.lr, "betas": [0.9, 0.999], "eps": 1e-8,
                                        "weight_decay": t.weight_decay}}
