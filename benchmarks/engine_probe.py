"""The engine's real entry point, instrumented (run under torchrun like the engine itself), for the tests
that guard the GPU path and for bench_host_syncs.

    PROBE=syncs PROBE_OUT=DIR torchrun --nproc_per_node 2 benchmarks/engine_probe.py --recipe R.yaml

PROBE=syncs: counts host reads of tensor values (`Tensor.item`, `__float__`, `__int__`, `__bool__`,
`tolist`, `torch.equal`) made in the training process, by whose code asked (see _owner), and their running
totals at each optimizer step; on a GPU each read of a device tensor waits for the device. Calls that wait
for the whole device (the accelerator's and torch.cuda's `synchronize`, no-ops on a CPU) are counted
apart (`device_syncs`, also at each optimizer step), since on a CPU they cost nothing to notice. It also times
batch collation done in the training process itself (`collate_s`): with DataLoader workers that is zero,
and the wait for a batch is `data_wait_ms_per_step` in train_log.jsonl.
PROBE=gathers: records every ZeRO-3 parameter gather (its size) and every
full host state dict built, per rank. Each rank writes <PROBE_OUT>/probe-rank<r>.json at exit.
"""
from __future__ import annotations

import atexit
import json
import os
import sys
import time
from pathlib import Path

import torch

MODE, OUT = os.environ["PROBE"], Path(os.environ["PROBE_OUT"])
# checkouts whose code counts as ours: this one, and the one being measured (PROBE_OURS) if another
OURS = tuple(p for p in (str(Path(__file__).resolve().parents[1]), os.environ.get("PROBE_OURS")) if p)
record: dict = {"reads": {}, "where": {}, "reads_at_step": [], "gathers": [], "full_state_dicts": 0, "training": False,
                 "collate_s": 0.0, "in_collate": False, "device_syncs": {}, "device_syncs_at_step": []}


def _owner(frame) -> str:
    """Whose code asked for the value: batch collation (host tensors, never a device sync), the nearest
    caller that is DeepSpeed's, torch.optim's step counter (a host tensor on GPUs too, unless
    fused/capturable), or anything else (ours, transformers', torch's)."""
    if record["in_collate"]:
        return "collate_host"
    while frame is not None:
        name = frame.f_code.co_filename
        if "/deepspeed/" in name:
            return "deepspeed"
        if name.endswith("torch/optim/optimizer.py"):
            return "optimizer_step_counter"
        if "/transformers/" in name or "/specialize/" in name or name.startswith(OURS):
            return "ours"
        frame = frame.f_back
    return "ours"


def _counted(fn):
    def wrapper(*args, **kwargs):
        caller = sys._getframe(1)
        owner = _owner(caller)
        record["reads"][owner] = record["reads"].get(owner, 0) + 1
        where = f"{owner} {caller.f_code.co_filename}:{caller.f_lineno}"
        record["where"][where] = record["where"].get(where, 0) + 1  # which code reads, when over budget
        return fn(*args, **kwargs)
    return wrapper


def _counted_device_sync(fn):
    def wrapper(*args, **kwargs):
        owner = _owner(sys._getframe(1))
        record["device_syncs"][owner] = record["device_syncs"].get(owner, 0) + 1
        return fn(*args, **kwargs)
    return wrapper


def _install_sync_counters() -> None:
    for name in ("item", "__float__", "__int__", "__bool__", "tolist"):
        setattr(torch.Tensor, name, _counted(getattr(torch.Tensor, name)))
    torch.equal = _counted(torch.equal)
    from deepspeed.accelerator import get_accelerator
    accelerator = type(get_accelerator())
    accelerator.synchronize = _counted_device_sync(accelerator.synchronize)
    torch.cuda.synchronize = _counted_device_sync(torch.cuda.synchronize)
    from deepspeed.runtime.engine import DeepSpeedEngine
    step = DeepSpeedEngine.step

    def counted_step(self, *args, **kwargs):
        if self.is_gradient_accumulation_boundary():  # an optimizer step, not a micro-step
            record["reads_at_step"].append(dict(record["reads"]))
            record["device_syncs_at_step"].append(sum(record["device_syncs"].values()))
        return step(self, *args, **kwargs)
    DeepSpeedEngine.step = counted_step
    from specialize.engine.batching import BatchBuilder
    collate = BatchBuilder.collate

    def timed_collate(self, *args, **kwargs):
        t0 = time.perf_counter()
        record["in_collate"] = True
        try:
            return collate(self, *args, **kwargs)
        finally:
            record["in_collate"] = False
            record["collate_s"] += time.perf_counter() - t0
    BatchBuilder.collate = timed_collate  # a worker's copy adds to the worker's record, not this one


def _install_gather_recorder() -> None:
    import deepspeed

    from specialize.engine import export
    gathered = deepspeed.zero.GatheredParameters

    class Recorded(gathered):
        def __init__(self, params, *args, **kwargs):
            if record["training"]:  # evaluation and export; the start-up init gathers are transformers'
                params_list = [params] if isinstance(params, torch.nn.Parameter) else list(params or [])
                unique = {id(p): p for p in params_list}.values()  # a tied weight is one tensor
                record["gathers"].append(sum(getattr(p, "ds_numel", p.numel()) for p in unique))
            super().__init__(params, *args, **kwargs)
    deepspeed.zero.GatheredParameters = Recorded
    from deepspeed.runtime.engine import DeepSpeedEngine
    step = DeepSpeedEngine.step

    def marked_step(self, *args, **kwargs):
        record["training"] = True
        return step(self, *args, **kwargs)
    DeepSpeedEngine.step = marked_step
    import deepspeed.runtime.engine as ds_engine
    ds_engine.deepspeed.zero.GatheredParameters = Recorded  # the name DeepSpeed's consolidation calls
    host_copy = export._host_copy

    def counted_copy(state):
        record["full_state_dicts"] += 1
        return host_copy(state)
    export._host_copy = counted_copy
    consolidated = ds_engine.DeepSpeedEngine._zero3_consolidated_16bit_state_dict

    def counted_consolidated(self, *args, **kwargs):
        state = consolidated(self, *args, **kwargs)
        if state is not None:
            record["full_state_dicts"] += 1
        return state
    ds_engine.DeepSpeedEngine._zero3_consolidated_16bit_state_dict = counted_consolidated


def _write() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rank = os.environ.get("RANK", "0")
    (OUT / f"probe-rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    {"syncs": _install_sync_counters, "gathers": _install_gather_recorder}[MODE]()
    atexit.register(_write)
    from specialize.engine.train import main
    code = main(sys.argv[1:])
    _write()
    sys.exit(code)
