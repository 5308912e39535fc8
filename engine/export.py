"""Plain Hugging Face models out of the engine: gathered weights, `save_pretrained` (safetensors) + tokenizer.

`rank0_state_dict` gives the full weights of the (possibly ZeRO-3 partitioned) training module on rank 0
only; `model_from_state` makes an ordinary T5ForConditionalGeneration of them for `export_model`.
`export_model` writes the folder atomically (tmp dir, then rename), so a
crash never leaves a half-written best/. `export_checkpoint` converts a saved DeepSpeed checkpoint offline.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch


def _host_copy(state: dict) -> dict:
    """Host copies of a state dict; tied entries (embedding / lm_head) share one copy, as in the model."""
    copies: dict[int, torch.Tensor] = {}
    out = {}
    for k, v in state.items():
        key = v.data_ptr() if v.numel() else id(v)
        if key not in copies:
            copies[key] = v.detach().to("cpu", copy=True)
        out[k] = copies[key]
    return out


def rank0_state_dict(engine, t5, rank: int) -> Optional[dict]:
    """The full weights of the training module as host tensors on rank 0, None on every other rank.

    ZeRO-3 (a collective: every rank calls it): DeepSpeed's consolidated 16-bit state dict, gathered
    one module at a time and kept on rank 0 alone, so no rank ever holds the whole model on the GPU and
    only rank 0 holds it on the host. ZeRO 0-2: every rank has the full weights already; rank 0 copies
    them to the host, the others do nothing."""
    if any(hasattr(p, "ds_id") for p in t5.parameters()):
        state = engine._zero3_consolidated_16bit_state_dict()
        if state is None:
            return None
        prefix = "t5."  # the engine wraps t5 in the loss module (train.Distill)
        return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    return _host_copy(t5.state_dict()) if rank == 0 else None


def has_own_lm_head(state: dict) -> bool:
    """Whether `state` holds an lm_head apart from the shared embedding, as every T5 v1.1 / FlanT5
    checkpoint does. transformers >= 5 builds every T5 with lm_head tied to it (T5Config forces
    tie_word_embeddings) and unties a loaded checkpoint only when the two differ."""
    head, shared = state.get("lm_head.weight"), state.get("shared.weight")
    if head is None or shared is None:
        return False
    same_memory = head.numel() and head.device == shared.device and head.data_ptr() == shared.data_ptr()
    return not same_memory and not torch.equal(head, shared.to(head.device))


def model_from_state(config, state: dict, device: Optional[torch.device] = None):
    """An ordinary T5ForConditionalGeneration holding `state` (eval mode). Built on the meta device and
    filled in place, so the only full copy is `state` itself. An lm_head of its own stays its own:
    `tie_weights()` would put the input embedding in its place (a FlanT5 export would be another model)."""
    from transformers import T5ForConditionalGeneration
    with torch.device("meta"):
        model = T5ForConditionalGeneration(config)
    own_head = has_own_lm_head(state)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.encoder.embed_tokens.weight = model.shared.weight
    model.decoder.embed_tokens.weight = model.shared.weight
    if not own_head:
        model.lm_head.weight = model.shared.weight
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left or unexpected:
        raise RuntimeError(f"exported weights do not fit the model: missing {left or missing}, "
                           f"unexpected {unexpected}")
    return model.to(device or "cpu").eval()


def plain_model(t5, device: Optional[torch.device] = None):
    """An ordinary T5ForConditionalGeneration with the (not partitioned) `t5`'s config and weights."""
    if any(hasattr(p, "ds_id") for p in t5.parameters()):
        raise ValueError("plain_model: ZeRO-3 partitioned weights; use rank0_state_dict (rank 0 only)")
    return model_from_state(t5.config, _host_copy(t5.state_dict()), device)


def export_model(model, tokenizer, out_dir: str | Path, info: Optional[dict] = None) -> Path:
    """save_pretrained (safetensors) + tokenizer + specialize.json (step, scores) into out_dir, atomically."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    (tmp / "specialize.json").write_text(json.dumps(info or {}, indent=1))
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def export_checkpoint(checkpoint_dir: str | Path, run_dir: str | Path | None = None,
                      out_dir: str | Path | None = None, info: Optional[dict] = None) -> Path:
    """A DeepSpeed checkpoint (<run>/checkpoints/step-XXXXXX) as a HF model, offline, in one process.

    Called as (checkpoint, run_dir, out_dir) or (checkpoint, out_dir): with two arguments the second is
    the output and the run is the checkpoint's own (<run>/checkpoints/step-X). ZeRO shards are merged by
    DeepSpeed's zero_to_fp32 (the fp32 master weights) and written in the run's precision, as best/ is
    (bf16: 22 GB for xxl, not 44); the model is built on the meta device around them, so the merged
    weights are the only full copy in host memory. The model config and the tokenizer come from the
    run dir's resolved recipe.yaml."""
    if out_dir is None:
        if run_dir is None:
            raise TypeError("export_checkpoint needs an output folder")
        run_dir, out_dir = None, run_dir
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from specialize.engine.models import model_config, torch_dtype
    from specialize.engine.rundir import RunDir
    from specialize.engine.tokenizers import load_tokenizer
    ckpt = Path(checkpoint_dir)
    recipe = RunDir(run_dir or ckpt.parent.parent, find_train=False).recipe()
    if recipe is None:
        raise FileNotFoundError(f"{run_dir or ckpt.parent.parent}: no recipe.yaml (the run dir the engine wrote)")
    tokenizer = load_tokenizer(recipe.model.tokenizer or recipe.model.name_or_path)
    if list(ckpt.glob("*zero_pp_rank_*optim_states.pt")):
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    else:  # ZeRO stage 0: no shards, rank 0's model states hold the whole module
        state = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
        state = {k: v.float() for k, v in state.items()}
    dtype = torch_dtype(recipe.train.precision)
    for k in list(state):  # one tensor at a time: the fp32 copy of each goes as its cast comes
        v = state.pop(k)
        state[k[len("t5."):] if k.startswith("t5.") else k] = v.to(dtype)  # without the engine's wrapper
    try:
        model = model_from_state(model_config(recipe.model, len(tokenizer)), state)
    except RuntimeError as err:
        raise RuntimeError(f"{ckpt}: {err}") from None
    return export_model(model, tokenizer, out_dir, {**(info or {}), "checkpoint": str(ckpt)})


def main(argv: list[str] | None = None) -> int:
    import argparse

    from specialize.engine.cli import HelpFormatter
    p = argparse.ArgumentParser(formatter_class=HelpFormatter, prog="python -m specialize.engine.export",
                                description="Convert a DeepSpeed checkpoint of a run into a Hugging Face model.")
    p.add_argument("checkpoint", help="<train.output_dir>/checkpoints/step-XXXXXX")
    p.add_argument("out", help="output folder (save_pretrained + tokenizer)")
    args = p.parse_args(argv)
    print(export_checkpoint(args.checkpoint, None, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
