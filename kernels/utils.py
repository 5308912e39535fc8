"""Shared helpers for the loss kernels: input checks, launch sizes, the loss semantics in one place."""
from __future__ import annotations

import torch

TAIL_MODES = {"none": 0, "renorm": 1, "tail": 2}
REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Below this the student's tail mass 1 - sum(q_topk) is indistinguishable from fp32 rounding
# noise, so the tail bucket's log and its gradient are clamped (same constant in every path).
TAIL_EPS = 1e-6
# Widest block one program loads at a time; Liger uses the same cap for its CE kernel.
MAX_BLOCK_V = 32768


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def launch_sizes(V: int, K: int) -> tuple[int, int, int]:
    """(BLOCK_V, BLOCK_K, num_warps): wide blocks keep the row loop short, warps grow with the block."""
    block_v = min(MAX_BLOCK_V, next_power_of_2(V))
    block_k = max(2, next_power_of_2(K))
    if block_v >= 16384:
        num_warps = 32
    elif block_v >= 4096:
        num_warps = 16
    elif block_v >= 1024:
        num_warps = 8
    else:
        num_warps = 4
    return block_v, block_k, num_warps


MIN_CHUNK_LOGITS_BYTES = 32 * 2 ** 20


def default_chunk_rows(N: int, H: int, V: int) -> int:
    """Rows per chunk: a chunk's [rows, V] logits about the size of the [N, H] input (Liger's rule), but
    at least ~32 MiB of fp32 logits. Without that floor a small-H model (T5-small, H=512, V=32128) gets
    8-row chunks: GEMMs too thin to run at speed, and grad_weight ([V, H]) re-read and re-written once
    per chunk — the fused loss then ran at 0.7x the unfused one. The floor costs 32 MiB at most."""
    inc_factor = max(1, -(-V // max(H, 1)))
    liger = next_power_of_2(-(-N // inc_factor))
    floor = 1 << max(0, (MIN_CHUNK_LOGITS_BYTES // (4 * max(V, 1))).bit_length() - 1)  # a power of 2
    return max(1, min(max(liger, floor), next_power_of_2(max(N, 1))))


def check_options(alpha: float, temperature: float, tail: str, reduction: str) -> None:
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if tail not in TAIL_MODES:
        raise ValueError(f"tail must be one of {sorted(TAIL_MODES)}, got {tail!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_teacher_inputs(N: int, V: int, device: torch.device, topk_ids: torch.Tensor,
                         topk_logprobs: torch.Tensor, target: torch.Tensor, ignore_index: int,
                         check_values: bool = True) -> None:
    """Shapes, dtypes and devices of the teacher side; with check_values also id ranges and duplicates
    (those cost a host sync on CUDA, so callers in a hot loop may turn them off)."""
    if topk_ids.dim() != 2 or topk_ids.shape[0] != N:
        raise ValueError(f"topk_ids must have shape [N={N}, K], got {tuple(topk_ids.shape)}")
    if topk_logprobs.shape != topk_ids.shape:
        raise ValueError(f"topk_logprobs shape {tuple(topk_logprobs.shape)} != topk_ids shape "
                         f"{tuple(topk_ids.shape)}")
    if target.dim() != 1 or target.shape[0] != N:
        raise ValueError(f"target must have shape [N={N}], got {tuple(target.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if target.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"target must be int32 or int64, got {target.dtype}")
    if topk_logprobs.dtype not in FLOAT_DTYPES:
        raise TypeError(f"topk_logprobs must be float32/bfloat16/float16, got {topk_logprobs.dtype}")
    for name, t in (("topk_ids", topk_ids), ("topk_logprobs", topk_logprobs), ("target", target)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the logits/hidden states are on {device}")
    K = topk_ids.shape[1]
    if K > V:
        raise ValueError(f"top-k width K={K} is larger than the vocabulary V={V}")
    if not check_values or N == 0:
        return
    bad = (topk_ids < -1) | (topk_ids >= V)
    if bool(bad.any()):
        row, col = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"topk_ids[{row}, {col}] = {int(topk_ids[row, col])} is outside [0, V={V}) "
                         f"and is not the padding id -1")
    bad_t = (target != ignore_index) & ((target < 0) | (target >= V))
    if bool(bad_t.any()):
        row = int(bad_t.nonzero()[0, 0])
        raise ValueError(f"target[{row}] = {int(target[row])} is outside [0, V={V}) and is not "
                         f"ignore_index={ignore_index}")
    if K > 1:
        ids_sorted = topk_ids.sort(dim=1).values
        dup = (ids_sorted[:, 1:] == ids_sorted[:, :-1]) & (ids_sorted[:, 1:] >= 0)
        if bool(dup.any()):
            row, col = (int(x) for x in dup.nonzero()[0])
            raise ValueError(f"topk_ids row {row} holds id {int(ids_sorted[row, col + 1])} more than "
                             f"once (only the padding id -1 may repeat)")


def row_scale(target: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """Per-row gradient weight as a 1-element fp32 tensor (broadcast over rows): 1/n_valid for mean,
    1 otherwise. Stays on the device, so no host sync."""
    if reduction == "mean":
        n_valid = (target != ignore_index).sum().clamp_min(1).to(torch.float32)
        return (1.0 / n_valid).reshape(1)
    return torch.ones(1, dtype=torch.float32, device=target.device)


def reduce_rows(row_loss: torch.Tensor, row_ce: torch.Tensor, row_kl: torch.Tensor,
                has_teacher: torch.Tensor, valid: torch.Tensor, reduction: str):
    """Loss by the reduction; (ce, kl) always as means for logging: ce over valid rows, kl over valid
    rows that have a teacher (0 when there are none)."""
    n_valid = valid.sum().clamp_min(1)
    if reduction == "mean":
        loss = row_loss.sum() / n_valid
    elif reduction == "sum":
        loss = row_loss.sum()
    else:
        loss = row_loss
    ce = row_ce.sum() / n_valid
    kl = row_kl.sum() / (valid & has_teacher).sum().clamp_min(1)
    return loss, ce, kl


# fp32 elements per piece when a gradient is scaled in fp32 (64 MiB of temporary)
SCALE_PIECE_ELEMENTS = 1 << 24


def scale_by_grad_output(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """grad * grad_output (a 0-dim tensor, or one value per row of grad), multiplied in fp32 and rounded
    once to grad's dtype. `grad * grad_output.to(grad.dtype)` would first round grad_output itself to
    bf16: DeepSpeed's 1/grad_accum = 1/3 becomes 0.3340, every gradient 0.2 % too large. The rows are
    scaled a piece at a time so the fp32 temporary stays bounded (grad may be [N, V] logits). Never
    reads grad_output on the host (no sync)."""
    g = grad_output.float()
    g = g[:, None] if g.dim() == 1 else g
    if grad.dtype == torch.float32:
        return grad * g
    out = torch.empty_like(grad)
    rows = max(1, SCALE_PIECE_ELEMENTS // max(1, grad[0].numel())) if len(grad) else 1
    for s in range(0, len(grad), rows):
        e = min(len(grad), s + rows)
        out[s:e] = grad[s:e].float() * (g[s:e] if g.dim() else g)
    return out
