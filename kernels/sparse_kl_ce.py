"""Sparse top-k KL + CE distillation loss over student logits [N, V].

Per row i with student logits z (fp32 math whatever the input dtype), target t, teacher top-k ids S
(−1 = padding) and logprobs l_j (p_j = exp l_j), temperature τ:

    CE_i  = logsumexp(z) − z_t                              (τ does not touch the CE)
    q     = softmax(z / τ)                                  (the tempered student)
    KL_i  = τ² · KL(p ‖ q) over S, where the teacher mass outside S is treated by `tail`:
        none   : Σ_{j∈S} p_j (l_j − log q_j)                (p as given, Σp ≤ 1; the paper's choice)
        renorm : the same with p renormalised to Σ_S p = 1
        tail   : none + p_r (log p_r − log q_r), p_r = max(1 − Σp, 0), q_r = max(1 − Σ_S q, TAIL_EPS)
    loss_i = a_i · CE_i + (1 − a_i) · KL_i,  a_i = alpha, or 1 for rows with no teacher id (pure CE)

The KL is scaled by τ² (Hinton et al.) so its gradient keeps the same size as τ changes.
Rows with target == ignore_index give loss 0 and zero gradient; "mean" divides by the number of
other rows (0 rows → loss 0). The gradient w.r.t. z is computed during the forward pass (second
sweep over V in the same program) and stored, so backward only scales it by grad_output:

    dloss_i/dz_v = a·(softmax(z)_v − [v=t]) + (1−a)·τ·(c·q_v + [v∈S]·(r·q_v − p_v))

with c = Σp (none), 1 (renorm, p normalised), Σp − r·Σ_S q (tail) and r = p_r / (1 − Σ_S q) in tail
mode (0 where the clamp is active), r = 0 otherwise.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import (
    TAIL_EPS,
    TAIL_MODES,
    check_options,
    check_teacher_inputs,
    launch_sizes,
    reduce_rows,
    row_scale,
    scale_by_grad_output,
)


@triton.jit
def _sparse_kl_ce_fwd_kernel(
    # pointers: inputs, then per-row outputs, then the gradient buffer (may alias logits)
    logits_ptr, ids_ptr, logprobs_ptr, target_ptr, scale_ptr,
    loss_ptr, ce_ptr, kl_ptr, grad_ptr,
    # sizes
    V, K,
    # strides (rows; the vocabulary / top-k dimension is contiguous)
    stride_logits, stride_ids, stride_logprobs, stride_scale, stride_grad,
    # scalars
    alpha, inv_tau, tau, ignore_index, tail_eps,
    # compile-time
    TAIL_MODE: tl.constexpr, COMPUTE_GRAD: tl.constexpr, HAS_TAU: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program per row: sweep 1 = online max / two logsumexps (z and z/τ) over V; then the
    gather of z at the target and the K teacher ids; sweep 2 (COMPUTE_GRAD) = dense softmax terms
    written to grad, then the K + 1 sparse positions overwritten with their exact values."""
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * stride_logits
    grad_ptr += row * stride_grad
    target = tl.load(target_ptr + row).to(tl.int64)

    if target == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        tl.store(ce_ptr + row, 0.0)
        tl.store(kl_ptr + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                tl.store(grad_ptr + offs, tl.zeros((BLOCK_V,), dtype=tl.float32).to(
                    grad_ptr.dtype.element_ty), mask=offs < V)
        return

    # sweep 1: running max m, Σ exp(z − m) and Σ exp((z − m)/τ), all fp32
    m = float("-inf")
    s1 = 0.0
    st = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        z = tl.load(logits_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s1 = s1 * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        if HAS_TAU:  # τ = 1 shares the exponentials: one exp per element instead of two
            st = st * tl.exp((m - m_new) * inv_tau) + tl.sum(tl.exp((z - m_new) * inv_tau), axis=0)
        m = m_new
    if not HAS_TAU:
        st = s1
    # Work relative to the max: (z − m) is exact near the max and log(s) is small, so log q and
    # 1 − Σq keep their precision even when m/τ is large.
    log_s1 = tl.log(s1)
    log_st = tl.log(st)

    # gather: target and teacher ids
    z_t = tl.load(logits_ptr + target).to(tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    ids = tl.load(ids_ptr + row * stride_ids + offs_k, mask=offs_k < K, other=-1).to(tl.int64)
    has = ids >= 0
    lp = tl.load(logprobs_ptr + row * stride_logprobs + offs_k, mask=has, other=0.0).to(tl.float32)
    p = tl.where(has, tl.exp(lp), 0.0)
    z_k = tl.load(logits_ptr + ids, mask=has, other=0.0).to(tl.float32)
    log_q = (z_k - m) * inv_tau - log_st
    q = tl.where(has, tl.exp(log_q), 0.0)
    n_teacher = tl.sum(has.to(tl.int32), axis=0)
    a = tl.where(n_teacher > 0, alpha, 1.0)
    p_sum = tl.sum(p, axis=0)
    q_sum = tl.sum(q, axis=0)

    ce = (m - z_t) + log_s1
    # p·(l − log q) with 0·log 0 = 0 so −inf teacher logprobs and padding add nothing
    kl_terms = tl.where(p > 0.0, p * (lp - log_q), 0.0)
    r = 0.0
    c = p_sum
    p_w = p
    if TAIL_MODE == 1:
        p_norm = tl.where(p_sum > 0.0, p_sum, 1.0)
        p_w = p / p_norm
        kl = tl.sum(kl_terms, axis=0) / p_norm - tl.log(p_norm) * tl.where(p_sum > 0.0, 1.0, 0.0)
        c = tl.where(p_sum > 0.0, 1.0, 0.0)
    elif TAIL_MODE == 2:
        p_r = tl.maximum(1.0 - p_sum, 0.0)
        q_r_raw = 1.0 - q_sum
        q_r = tl.maximum(q_r_raw, tail_eps)
        kl_tail = tl.where(p_r > 0.0, p_r * (tl.log(tl.where(p_r > 0.0, p_r, 1.0)) - tl.log(q_r)), 0.0)
        kl = tl.sum(kl_terms, axis=0) + kl_tail
        r = tl.where(q_r_raw > tail_eps, p_r / q_r, 0.0)
        c = p_sum - r * q_sum
    else:
        kl = tl.sum(kl_terms, axis=0)
    kl = tl.where(n_teacher > 0, kl * tau * tau, 0.0)
    tl.store(loss_ptr + row, a * ce + (1.0 - a) * kl)
    tl.store(ce_ptr + row, ce)
    tl.store(kl_ptr + row, kl)

    if COMPUTE_GRAD:
        scale = tl.load(scale_ptr + row * stride_scale).to(tl.float32)
        coef_soft = scale * a
        coef_q = scale * (1.0 - a) * tau * c
        coef_sparse = scale * (1.0 - a) * tau
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            z = tl.load(logits_ptr + offs, mask=offs < V, other=0.0).to(tl.float32)
            if HAS_TAU:
                g = coef_soft * tl.exp(z - m - log_s1) + coef_q * tl.exp((z - m) * inv_tau - log_st)
            else:
                g = (coef_soft + coef_q) * tl.exp(z - m - log_s1)
            tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=offs < V)
        # The sparse positions are rewritten from the values gathered before sweep 2 (so an in-place
        # grad buffer is safe); barriers order the dense, target and top-k stores of this program.
        tl.debug_barrier()
        g_t = (coef_soft * (tl.exp(z_t - m - log_s1) - 1.0)
               + coef_q * tl.exp((z_t - m) * inv_tau - log_st))
        tl.store(grad_ptr + target, g_t.to(grad_ptr.dtype.element_ty))
        tl.debug_barrier()
        is_t = tl.where(ids == target, 1.0, 0.0)
        g_k = (coef_soft * (tl.exp(z_k - m - log_s1) - is_t) + coef_q * q
               + coef_sparse * (r * q - p_w))
        tl.store(grad_ptr + ids, g_k.to(grad_ptr.dtype.element_ty), mask=has)


def rows_triton(logits, topk_ids, topk_logprobs, target, grad, scale, alpha, temperature, tail,
                ignore_index):
    """Launch the kernel: per-row (loss, ce, kl) in fp32; the gradient goes into `grad` (which may be
    `logits` itself) when `grad` is not None, weighted per row by `scale` ([1] broadcast or [N])."""
    N, V = logits.shape
    K = topk_ids.shape[1]
    loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    ce = torch.empty_like(loss)
    kl = torch.empty_like(loss)
    if N == 0:
        return loss, ce, kl
    block_v, block_k, num_warps = launch_sizes(V, K)
    compute_grad = grad is not None
    grad_arg = grad if compute_grad else logits
    _sparse_kl_ce_fwd_kernel[(N,)](
        logits, topk_ids, topk_logprobs, target, scale,
        loss, ce, kl, grad_arg,
        V, K,
        logits.stride(0), topk_ids.stride(0), topk_logprobs.stride(0),
        scale.stride(0) if scale.numel() > 1 else 0, grad_arg.stride(0),
        float(alpha), 1.0 / float(temperature), float(temperature), int(ignore_index), TAIL_EPS,
        TAIL_MODE=TAIL_MODES[tail], COMPUTE_GRAD=compute_grad, HAS_TAU=float(temperature) != 1.0,
        BLOCK_V=block_v, BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return loss, ce, kl


def rows_torch(logits, topk_ids, topk_logprobs, target, grad, scale, alpha, temperature, tail,
               ignore_index):
    """The kernel's math in plain PyTorch (fp32) for CPU tensors; same contract as `rows_triton`.
    Callers chunk the rows so the fp32 temporaries stay small."""
    tau = float(temperature)
    z = logits.float()
    valid = target != ignore_index
    t = torch.where(valid, target, torch.zeros_like(target)).long()
    has = topk_ids >= 0
    ids = torch.where(has, topk_ids, torch.zeros_like(topk_ids)).long()
    lp = torch.where(has, topk_logprobs.float(), torch.zeros((), dtype=torch.float32))
    p = torch.where(has, lp.exp(), torch.zeros(()))
    # relative to the row max, as in the kernel (keeps log q precise when max/τ is large)
    zs = z - z.max(dim=1, keepdim=True).values
    log_s1 = torch.logsumexp(zs, dim=1)
    zt = zs / tau if tau != 1.0 else zs
    log_st = torch.logsumexp(zt, dim=1)
    ce = log_s1 - zs.gather(1, t[:, None])[:, 0]
    log_q = zt.gather(1, ids) - log_st[:, None]
    q = torch.where(has, log_q.exp(), torch.zeros(()))
    p_sum, q_sum = p.sum(1), q.sum(1)
    kl_terms = torch.where(p > 0, p * (lp - log_q), torch.zeros(()))
    r = torch.zeros_like(p_sum)
    c = p_sum
    p_w = p
    if tail == "renorm":
        pos = p_sum > 0
        p_norm = torch.where(pos, p_sum, torch.ones_like(p_sum))
        p_w = p / p_norm[:, None]
        kl = kl_terms.sum(1) / p_norm - torch.where(pos, p_norm.log(), torch.zeros(()))
        c = pos.float()
    elif tail == "tail":
        p_r = (1.0 - p_sum).clamp_min(0.0)
        q_r_raw = 1.0 - q_sum
        q_r = q_r_raw.clamp_min(TAIL_EPS)
        safe_p_r = torch.where(p_r > 0, p_r, torch.ones_like(p_r))
        kl = kl_terms.sum(1) + torch.where(p_r > 0, p_r * (safe_p_r.log() - q_r.log()), torch.zeros(()))
        r = torch.where(q_r_raw > TAIL_EPS, p_r / q_r, torch.zeros(()))
        c = p_sum - r * q_sum
    else:
        kl = kl_terms.sum(1)
    n_teacher = has.sum(1)
    a = torch.where(n_teacher > 0, torch.full((), float(alpha)), torch.ones(()))
    kl = torch.where(n_teacher > 0, kl * tau * tau, torch.zeros(()))
    zero = torch.zeros(())
    loss = torch.where(valid, a * ce + (1 - a) * kl, zero)
    ce = torch.where(valid, ce, zero)
    kl = torch.where(valid, kl, zero)
    if grad is not None:
        w = scale.float().expand(z.shape[0]) * valid.float()
        g = torch.softmax(zs, dim=1).mul_((w * a)[:, None])
        g.add_(torch.softmax(zt, dim=1).mul_((w * (1 - a) * tau * c)[:, None]))
        g.scatter_add_(1, t[:, None], -(w * a)[:, None])
        sparse = torch.where(has, (w * (1 - a) * tau)[:, None] * (r[:, None] * q - p_w), torch.zeros(()))
        g.scatter_add_(1, ids, sparse)
        grad.copy_(g)
    return loss, ce, kl


def _torch_chunk_rows(N: int, V: int) -> int:
    # ~4M fp32 elements per chunk keeps the CPU temporaries (softmax, exp) near 16 MB each.
    return max(1, (1 << 22) // max(V, 1))


def sparse_kl_ce_rows(logits, topk_ids, topk_logprobs, target, grad, scale, alpha, temperature, tail,
                      ignore_index, backend="auto"):
    """Dispatch: Triton for CUDA tensors (or backend="triton", e.g. the CPU interpreter in tests),
    chunked PyTorch otherwise."""
    use_triton = backend == "triton" or (backend == "auto" and logits.is_cuda)
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be auto, triton or torch, got {backend!r}")
    args = (alpha, temperature, tail, ignore_index)
    if use_triton:
        return rows_triton(logits, topk_ids, topk_logprobs, target, grad, scale, *args)
    N, V = logits.shape
    step = _torch_chunk_rows(N, V)
    parts = []
    for s in range(0, N, step):
        e = min(N, s + step)
        sc = scale[s:e] if scale.numel() > 1 else scale
        parts.append(rows_torch(logits[s:e], topk_ids[s:e], topk_logprobs[s:e], target[s:e],
                                None if grad is None else grad[s:e], sc, *args))
    if not parts:
        empty = torch.zeros(0, dtype=torch.float32, device=logits.device)
        return empty, empty, empty
    return tuple(torch.cat(x) for x in zip(*parts))


def _prepare(topk_ids, topk_logprobs, target):
    return topk_ids.contiguous(), topk_logprobs.contiguous(), target.contiguous()


class SparseKLCEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, topk_ids, topk_logprobs, target, alpha, temperature, tail, ignore_index,
                reduction, backend, validate):
        if logits.dim() != 2:
            raise ValueError(f"logits must have shape [N, V], got {tuple(logits.shape)}")
        if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"logits must be float32/bfloat16/float16, got {logits.dtype}")
        N, V = logits.shape
        check_options(alpha, temperature, tail, reduction)
        check_teacher_inputs(N, V, logits.device, topk_ids, topk_logprobs, target, ignore_index,
                             check_values=validate)
        topk_ids, topk_logprobs, target = _prepare(topk_ids, topk_logprobs, target)
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        needs_grad = ctx.needs_input_grad[0]
        # "none" stores the unweighted per-row gradient; backward weights rows by grad_output.
        scale = row_scale(target, ignore_index, "sum" if reduction == "none" else reduction)
        grad = torch.empty_like(logits) if needs_grad else None
        row_loss, row_ce, row_kl = sparse_kl_ce_rows(
            logits, topk_ids, topk_logprobs, target, grad, scale, alpha, temperature, tail,
            ignore_index, backend)
        valid = target != ignore_index
        has_teacher = (topk_ids >= 0).any(dim=1)
        loss, ce, kl = reduce_rows(row_loss, row_ce, row_kl, has_teacher, valid, reduction)
        ctx.reduction = reduction
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        (grad,) = ctx.saved_tensors
        if grad is None:
            return (None,) * 11
        # always scale, never test grad_loss == 1 first (a host sync per backward); x * 1.0 is exact
        return (scale_by_grad_output(grad, grad_loss),) + (None,) * 10


def sparse_kl_ce(logits, topk_ids, topk_logprobs, target, alpha=0.5, temperature=1.0, tail="none",
                 ignore_index=-100, reduction="mean", return_parts=False, backend="auto", validate=True):
    """Sparse top-k KL + CE (see the module docstring for the exact math). Returns the loss, or
    (loss, ce, kl) with ce/kl detached means when return_parts=True. backend: auto (Triton on CUDA,
    chunked PyTorch on CPU), triton, torch. validate=False skips the id range/duplicate checks."""
    loss, ce, kl = SparseKLCEFunction.apply(logits, topk_ids, topk_logprobs, target, alpha,
                                            temperature, tail, ignore_index, reduction, backend,
                                            validate)
    return (loss, ce, kl) if return_parts else loss


class SparseKLCELoss(torch.nn.Module):
    def __init__(self, alpha=0.5, temperature=1.0, tail="none", ignore_index=-100, reduction="mean",
                 backend="auto", validate=True):
        super().__init__()
        check_options(alpha, temperature, tail, reduction)
        self.alpha, self.temperature, self.tail = alpha, temperature, tail
        self.ignore_index, self.reduction = ignore_index, reduction
        self.backend, self.validate = backend, validate

    def forward(self, logits, topk_ids, topk_logprobs, target, return_parts=False):
        return sparse_kl_ce(logits, topk_ids, topk_logprobs, target, self.alpha, self.temperature,
                            self.tail, self.ignore_index, self.reduction, return_parts, self.backend,
                            self.validate)
