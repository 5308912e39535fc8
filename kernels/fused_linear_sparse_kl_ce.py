"""lm_head + sparse top-k KL + CE, chunked over rows so the [N, V] logits never exist.

logits = (h · hidden_scale) @ weightᵀ, one chunk of rows at a time; the loss math on each chunk is
`sparse_kl_ce`'s (Triton on CUDA, chunked PyTorch on CPU; same semantics, see sparse_kl_ce.py). The
chunk's logit gradient is written in place over its logits, then turned into grad_h (rows of the
chunk) and accumulated into grad_weight, all during forward; backward only scales by grad_output.
T5 with tied embeddings multiplies the decoder output by d_model**-0.5 before the lm_head: pass
that factor as hidden_scale.

grad_weight is accumulated across chunks in the weight's dtype with addmm_ by default (each chunk's
matmul accumulates in fp32 inside the GEMM; only the cross-chunk sum rounds to bf16/fp16), to avoid
an fp32 [V, H] buffer. `grad_weight_dtype=torch.float32` keeps that sum in an fp32 buffer instead
(each chunk's product rounded once to the weight's dtype, the total once at the end): 2 bytes x V x H
more memory, for many chunks (small chunk_size, long batches) a more exact grad_weight.
reduction="none" cannot know grad_output during forward, so it recomputes the chunks in backward
(one more pass of matmuls).
"""
from __future__ import annotations

import torch

from .sparse_kl_ce import sparse_kl_ce_rows
from .utils import (
    check_options,
    check_teacher_inputs,
    default_chunk_rows,
    reduce_rows,
    row_scale,
    scale_by_grad_output,
)


def _chunk_loop(h, weight, topk_ids, topk_logprobs, target, hidden_scale, scale, opts, chunk_rows,
                backend, want_grad_h, want_grad_w, grad_weight_dtype=None):
    """Rows (loss, ce, kl) and, if asked, grad_h / grad_weight weighted per row by `scale`."""
    N = h.shape[0]
    row_loss = torch.empty(N, dtype=torch.float32, device=h.device)
    row_ce = torch.empty_like(row_loss)
    row_kl = torch.empty_like(row_loss)
    grad_h = torch.empty_like(h) if want_grad_h else None
    grad_w = torch.zeros_like(weight, dtype=grad_weight_dtype or weight.dtype) if want_grad_w else None
    compute_grad = want_grad_h or want_grad_w
    for s in range(0, N, chunk_rows):
        e = min(N, s + chunk_rows)
        h_c = h[s:e] * hidden_scale if hidden_scale != 1.0 else h[s:e]
        logits = h_c @ weight.T
        sc = scale[s:e] if scale.numel() > 1 else scale
        # in place: the kernel reads each logit before overwriting it with its gradient
        l, c, k = sparse_kl_ce_rows(logits, topk_ids[s:e], topk_logprobs[s:e], target[s:e],
                                    logits if compute_grad else None, sc, *opts, backend=backend)
        row_loss[s:e], row_ce[s:e], row_kl[s:e] = l, c, k
        if want_grad_h:
            torch.mm(logits, weight, out=grad_h[s:e])
            if hidden_scale != 1.0:
                grad_h[s:e].mul_(hidden_scale)
        if want_grad_w and grad_w.dtype == logits.dtype:
            grad_w.addmm_(logits.T, h_c)
        elif want_grad_w:
            grad_w += logits.T @ h_c
    return row_loss, row_ce, row_kl, grad_h, grad_w


class FusedLinearSparseKLCEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, topk_ids, topk_logprobs, target, hidden_scale, alpha, temperature, tail,
                ignore_index, reduction, chunk_size, backend, validate, grad_weight_dtype):
        if h.dim() != 2:
            raise ValueError(f"h must have shape [N, H], got {tuple(h.shape)}")
        if weight.dim() != 2 or weight.shape[1] != h.shape[1]:
            raise ValueError(f"weight must have shape [V, H={h.shape[1]}], got {tuple(weight.shape)}")
        if h.dtype != weight.dtype:
            raise TypeError(f"h ({h.dtype}) and weight ({weight.dtype}) must have the same dtype")
        if h.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"h must be float32/bfloat16/float16, got {h.dtype}")
        if weight.device != h.device:
            raise ValueError(f"weight is on {weight.device} but h is on {h.device}")
        if grad_weight_dtype not in (None, torch.float32, weight.dtype):
            raise TypeError(f"grad_weight_dtype must be None, torch.float32 or the weight's dtype, got {grad_weight_dtype}")
        if chunk_size is not None and int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
        N, H = h.shape
        V = weight.shape[0]
        check_options(alpha, temperature, tail, reduction)
        check_teacher_inputs(N, V, h.device, topk_ids, topk_logprobs, target, ignore_index,
                             check_values=validate)
        h, weight = h.contiguous(), weight.contiguous()
        topk_ids, topk_logprobs, target = (topk_ids.contiguous(), topk_logprobs.contiguous(),
                                           target.contiguous())
        chunk_rows = int(chunk_size) if chunk_size else default_chunk_rows(N, H, V)
        opts = (alpha, temperature, tail, ignore_index)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_now = reduction != "none" and (want_h or want_w)
        scale = row_scale(target, ignore_index, reduction)
        row_loss, row_ce, row_kl, grad_h, grad_w = _chunk_loop(
            h, weight, topk_ids, topk_logprobs, target, float(hidden_scale), scale, opts, chunk_rows,
            backend, want_h and grad_now, want_w and grad_now, grad_weight_dtype)
        valid = target != ignore_index
        has_teacher = (topk_ids >= 0).any(dim=1)
        loss, ce, kl = reduce_rows(row_loss, row_ce, row_kl, has_teacher, valid, reduction)
        ctx.reduction, ctx.weight_dtype = reduction, weight.dtype
        if reduction == "none":
            ctx.recompute = (float(hidden_scale), opts, chunk_rows, backend, grad_weight_dtype)
            ctx.save_for_backward(h, weight, topk_ids, topk_logprobs, target)
        else:
            ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.reduction == "none":
            h, weight, topk_ids, topk_logprobs, target = ctx.saved_tensors
            hidden_scale, opts, chunk_rows, backend, grad_weight_dtype = ctx.recompute
            *_, grad_h, grad_w = _chunk_loop(h, weight, topk_ids, topk_logprobs, target, hidden_scale,
                                             grad_loss.float().contiguous(), opts, chunk_rows, backend,
                                             want_h, want_w, grad_weight_dtype)
        else:
            grad_h, grad_w = ctx.saved_tensors
            # Always scale, never test grad_loss == 1 first: that test reads the device from the host
            # (a sync per backward), and DeepSpeed's 1/grad_accum makes it != 1 anyway. x * 1.0 is exact.
            grad_h = None if grad_h is None else scale_by_grad_output(grad_h, grad_loss)
            grad_w = None if grad_w is None else scale_by_grad_output(grad_w, grad_loss)
        if grad_w is not None:
            grad_w = grad_w.to(ctx.weight_dtype)  # an fp32 accumulator is rounded once, here
        return (grad_h, grad_w) + (None,) * 13


def fused_linear_sparse_kl_ce(h, weight, topk_ids, topk_logprobs, target, *, hidden_scale=1.0,
                              alpha=0.5, temperature=1.0, tail="none", ignore_index=-100,
                              reduction="mean", return_parts=False, chunk_size=None, backend="auto",
                              validate=True, grad_weight_dtype=None):
    """sparse_kl_ce((h · hidden_scale) @ weightᵀ, ...) without the [N, V] logits. chunk_size = rows
    per chunk (default: chunk logits about the size of h); grad_weight_dtype: the dtype grad_weight is
    summed over chunks in (None: the weight's; torch.float32, see the module docstring). Returns the
    loss, or (loss, ce, kl)."""
    loss, ce, kl = FusedLinearSparseKLCEFunction.apply(
        h, weight, topk_ids, topk_logprobs, target, hidden_scale, alpha, temperature, tail,
        ignore_index, reduction, chunk_size, backend, validate, grad_weight_dtype)
    return (loss, ce, kl) if return_parts else loss


class FusedLinearSparseKLCELoss(torch.nn.Module):
    """Loss module; the lm_head weight is passed in forward so it can stay tied to the embeddings."""

    def __init__(self, hidden_scale=1.0, alpha=0.5, temperature=1.0, tail="none", ignore_index=-100,
                 reduction="mean", chunk_size=None, backend="auto", validate=True, grad_weight_dtype=None):
        super().__init__()
        check_options(alpha, temperature, tail, reduction)
        self.hidden_scale, self.alpha, self.temperature, self.tail = hidden_scale, alpha, temperature, tail
        self.ignore_index, self.reduction, self.chunk_size = ignore_index, reduction, chunk_size
        self.backend, self.validate, self.grad_weight_dtype = backend, validate, grad_weight_dtype

    def forward(self, h, weight, topk_ids, topk_logprobs, target, return_parts=False):
        return fused_linear_sparse_kl_ce(
            h, weight, topk_ids, topk_logprobs, target, hidden_scale=self.hidden_scale,
            alpha=self.alpha, temperature=self.temperature, tail=self.tail,
            ignore_index=self.ignore_index, reduction=self.reduction, return_parts=return_parts,
            chunk_size=self.chunk_size, backend=self.backend, validate=self.validate,
            grad_weight_dtype=self.grad_weight_dtype)
