"""Naive float64 reference for the sparse KL + CE loss: materialised log_softmax + gather, autograd
for the gradients. Written from the math in the issue, independent of the kernels' code. Also the
input generator and the comparison helper shared by the kernel tests.

Run in another dtype (pass bf16 logits) the same code is "the same torch computation done in that
dtype", the yardstick of the flash-attention tolerance rule used for bf16/fp16."""
import os

import torch

# The Triton backend runs where Triton compiles for: the GPU when there is one (compiled kernels; a
# CUDA host leaves TRITON_INTERPRET unset, see conftest.py), else the CPU interpreter. TRITON_INTERPRET=1
# set by hand on a GPU host keeps the interpreter (and CPU tensors) there too. The torch backend is
# the CPU path and stays on the CPU. References are always computed on the CPU.
TRITON_DEVICE = ("cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
                 else "cpu")


def device_for(backend: str) -> str:
    return TRITON_DEVICE if backend == "triton" else "cpu"


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
        lp = topk_logprobs[i][keep].to(z.dtype)
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


def make_inputs(N, V, K, dtype=torch.float32, ignore_rows=(), no_teacher_rows=(), padded_rows=(),
                one_hot_rows=(), logit_scale=3.0, device="cpu"):
    """Fresh random inputs: student logits [N, V]; teacher ids distinct per row with a top-k of a
    random distribution (sum p < 1, so the tail matters); some rows padded with -1, some without a
    teacher, some one-hot [label, logprob 0] like the aligner's unaligned positions; targets hit a
    teacher id half the time; -100 on `ignore_rows`."""
    logits = (torch.randn(N, V) * logit_scale).to(dtype)
    ids = torch.rand(N, V).argsort(dim=1)[:, :K].clone()
    teacher = torch.log_softmax(torch.randn(N, K + 4) * 2.0, dim=1)
    lp = teacher.sort(dim=1, descending=True).values[:, :K].contiguous()
    target = torch.randint(0, V, (N,))
    hit = torch.rand(N) < 0.5
    target[hit] = ids[hit, 0]
    for r in padded_rows:
        if K > 1:
            ids[r, K // 2 + 1:] = -1
            lp[r, K // 2 + 1:] = 0.0
    for r in no_teacher_rows:
        ids[r] = -1
    for r in one_hot_rows:
        ids[r] = -1
        ids[r, 0] = target[r]
        lp[r] = 0.0
    for r in ignore_rows:
        target[r] = -100
    return logits.to(device), ids.to(device), lp.to(device), target.to(device)


def assert_close(actual, expected, atol, rtol, name):
    """allclose that names the tensor and prints the first mismatching indices and values."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values at {(~torch.isfinite(actual)).nonzero()[:5].tolist()}"
    bad = (actual - expected).abs() > atol + rtol * expected.abs()
    if bad.any():
        idx = bad.nonzero()[:5]
        rows = [(tuple(i.tolist()), float(actual[tuple(i)]), float(expected[tuple(i)])) for i in idx]
        err = float((actual - expected).abs().max())
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.numel()} elements differ (max abs err "
                             f"{err:.3g}, atol {atol}, rtol {rtol}); first (index, got, want): {rows}")


def in_place_matches_out_of_place(logits, topk_ids, topk_logprobs, target, backend="triton", alpha=0.5,
                                  temperature=1.0, tail="none", ignore_index=-100):
    """Run the row kernel twice on the same inputs: gradient into a separate buffer, and gradient
    written over the logits themselves (what the fused-linear loss does per chunk). Each program
    reads every logit of its row before overwriting it, so the two must agree bit for bit; returns
    (equal, number of differing elements)."""
    from specialize.kernels.sparse_kl_ce import sparse_kl_ce_rows
    scale = torch.ones(1, dtype=torch.float32, device=logits.device)
    opts = (alpha, temperature, tail, ignore_index)
    separate = torch.full_like(logits, float("nan"))
    rows_a = sparse_kl_ce_rows(logits, topk_ids, topk_logprobs, target, separate, scale, *opts, backend=backend)
    aliased = logits.clone()
    rows_b = sparse_kl_ce_rows(aliased, topk_ids, topk_logprobs, target, aliased, scale, *opts, backend=backend)
    # bitwise: compare the raw bits, so NaN == NaN and -0.0 != 0.0 count as they are stored
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[logits.dtype]
    differ = int((separate.view(bits) != aliased.view(bits)).sum())
    differ += sum(int((a.view(torch.int32) != b.view(torch.int32)).sum()) for a, b in zip(rows_a, rows_b))
    return differ == 0, differ
