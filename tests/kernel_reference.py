"""Naive float64 reference for the sparse KL + CE loss: materialised log_softmax + gather, autograd
for the gradients. Written from the math in the issue, independent of the kernels' code."""
import torch

TAIL_EPS = 1e-6  # must match specialize.kernels.utils.TAIL_EPS (the documented clamp)


def reference_rows(logits, topk_ids, topk_logprobs, target, alpha, temperature, tail, ignore_index):
    """Per-row (loss, ce, kl) in float64, differentiable w.r.t. `logits` (already float64)."""
    z = logits
    logp_student = torch.log_softmax(z, dim=-1)
    logq_all = torch.log_softmax(z / temperature, dim=-1)
    losses, ces, kls = [], [], []
    for i in range(z.shape[0]):
        t = int(target[i])
        if t == ignore_index:
            zero = z[i].sum() * 0.0
            losses.append(zero), ces.append(zero.detach()), kls.append(zero.detach())
            continue
        ce = -logp_student[i, t]
        keep = topk_ids[i] >= 0
        ids = topk_ids[i][keep].long()
        if ids.numel() == 0:
            losses.append(ce), ces.append(ce.detach()), kls.append(torch.zeros((), dtype=z.dtype))
            continue
        lp = topk_logprobs[i][keep].double()
        p = lp.exp()
        logq = logq_all[i, ids]
        if tail == "renorm":
            lp = lp - torch.log(p.sum())
            p = lp.exp()
        kl = (p * (lp - logq)).sum()
        if tail == "tail":
            p_r = (1.0 - p.sum()).clamp_min(0.0)
            q_r = (1.0 - logq.exp().sum()).clamp_min(TAIL_EPS)
            if p_r > 0:
                kl = kl + p_r * (torch.log(p_r) - torch.log(q_r))
        kl = kl * temperature ** 2
        losses.append(alpha * ce + (1 - alpha) * kl)
        ces.append(ce.detach()), kls.append(kl.detach())
    return torch.stack(losses), torch.stack(ces), torch.stack(kls)


def reference_loss(logits, topk_ids, topk_logprobs, target, alpha=0.5, temperature=1.0, tail="none",
                   ignore_index=-100, reduction="mean"):
    """(loss, ce_mean, kl_mean) in float64; ce over valid rows, kl over valid rows with a teacher."""
    rows, ce, kl = reference_rows(logits, topk_ids, topk_logprobs, target, alpha, temperature, tail,
                                  ignore_index)
    valid = target != ignore_index
    n = max(int(valid.sum()), 1)
    n_t = max(int((valid & (topk_ids >= 0).any(1)).sum()), 1)
    if reduction == "mean":
        loss = rows.sum() / n
    elif reduction == "sum":
        loss = rows.sum()
    else:
        loss = rows
    return loss, ce.sum() / n, kl.sum() / n_t


def reference_linear(h, weight, hidden_scale, *args, **kwargs):
    """Reference for the fused version: logits = (h·s) @ Wᵀ in float64, then `reference_loss`."""
    return reference_loss((h * hidden_scale) @ weight.T, *args, **kwargs)
