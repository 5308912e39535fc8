"""Training statistics kept on the device, so the hot loop crosses to the host once per optimizer step.

Per micro-batch, `StepStats.add` sums the loss, its CE and KL parts and the token counts into a window
on the loss's device and raises a device-side count of non-finite losses: no `.item()`, no host-built
tensor (NCCL serves only CUDA tensors; a host tensor in a collective works with gloo and fails on GPUs).
Once per optimizer step, `step_is_finite` all-reduces that count and reads it: the single host sync of a
steady-state step, and the point where all ranks agree before any of them calls `engine.step()`.
At logging steps `reduce_window` all-reduces the window and reads it once.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

FIELDS = ("loss", "ce", "kl", "micro_batches", "src_tokens", "tgt_tokens")


class StepStats:
    def __init__(self, device: torch.device):
        # float64: a window of many micro-batches of token counts stays exact
        self.window = torch.zeros(len(FIELDS), dtype=torch.float64, device=device)
        self.non_finite = torch.zeros(1, dtype=torch.float64, device=device)

    def add(self, loss: torch.Tensor, ce: torch.Tensor, kl: torch.Tensor, token_counts: torch.Tensor) -> None:
        """One micro-batch: `token_counts` = [source tokens, target tokens] (a tensor on the same device)."""
        loss = loss.detach()
        one = torch.ones((), dtype=torch.float64, device=loss.device)
        row = torch.stack([loss.to(torch.float64), ce.detach().to(torch.float64), kl.detach().to(torch.float64),
                           one, token_counts[0].to(torch.float64), token_counts[1].to(torch.float64)])
        self.window.add_(row)
        self.non_finite.add_((~torch.isfinite(loss)).to(torch.float64).reshape(1))

    def step_is_finite(self) -> tuple[bool, int]:
        """(every rank's losses of this step were finite, how many micro-batches over all ranks were not).
        A collective: every rank calls it once per optimizer step."""
        flag = self.non_finite.clone()
        self.non_finite.zero_()
        if dist.is_initialized():
            dist.all_reduce(flag)
        bad = int(flag.item())  # the one host sync of the step
        return bad == 0, bad

    def reduce_window(self) -> dict[str, float]:
        """Sums over every rank since the last call, as floats; resets the window. A collective."""
        total = self.window.clone()
        self.window.zero_()
        if dist.is_initialized():
            dist.all_reduce(total)
        return dict(zip(FIELDS, total.tolist()))
