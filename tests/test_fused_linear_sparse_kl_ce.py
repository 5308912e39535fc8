"""fused_linear_sparse_kl_ce against the float64 reference (logits materialised from h and W). The Triton
backend runs compiled on the GPU when there is one (the CPU interpreter otherwise); references on the CPU."""
import math
import os

import pytest
import torch
from kernel_reference import assert_close, device_for, make_inputs, reference_linear

from specialize.kernels import FusedLinearSparseKLCELoss, fused_linear_sparse_kl_ce, sparse_kl_ce

BACKENDS = ["triton", "torch"]
TAILS = ["none", "renorm", "tail"]
KW = dict(alpha=0.5, temperature=1.7)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The machine's 2 cores are shared: spinning OpenMP threads make small ops ~100x slower when
    another process holds a core, so these small-shape tests run single-threaded."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture
def poison_empty(monkeypatch):
    """Float buffers from torch.empty/empty_like (grad_h, row losses) start as NaN."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(out):
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poisoned(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poisoned(real_empty_like(*a, **k)))


def make_linear(N, H, V, K, dtype=torch.float32, device="cpu", **rows):
    _, ids, lp, target = make_inputs(N, V, K, device=device, **rows)
    h = torch.randn(N, H).to(dtype).to(device)
    weight = (torch.randn(V, H) / math.sqrt(H) * 4).to(dtype).to(device)
    return h, weight, ids, lp, target


def run_both(h, weight, ids, lp, target, backend, hidden_scale, chunk_size=None, reduction="mean",
             lowp_torch=False, **kw):
    """Kernel (loss, ce, kl, grad_h, grad_W), float64 reference, and optionally the same naive torch
    computation in the inputs' dtype (the yardstick for bf16/fp16)."""
    h1, w1 = h.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, ce, kl = fused_linear_sparse_kl_ce(h1, w1, ids, lp, target, hidden_scale=hidden_scale,
                                             reduction=reduction, chunk_size=chunk_size,
                                             backend=backend, return_parts=True, **kw)
    go = torch.rand(loss.shape) + 0.5
    (loss * go.to(loss.device, loss.dtype)).sum().backward()
    out = [(loss, ce, kl, h1.grad, w1.grad)]
    ids, lp, target = ids.cpu(), lp.cpu(), target.cpu()
    for dt in [torch.float64] + ([h.dtype] if lowp_torch else []):
        h2, w2 = h.cpu().to(dt).requires_grad_(), weight.cpu().to(dt).requires_grad_()
        ref, rce, rkl = reference_linear(h2, w2, hidden_scale, ids, lp.to(dt), target,
                                         reduction=reduction, **kw)
        (ref * go.to(dt)).sum().backward()
        out.append((ref, rce, rkl, h2.grad, w2.grad))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("K", [1, 5, 20])
@pytest.mark.parametrize("N,H,V,chunk", [(37, 16, 1423, 8), (3, 8, 32128, None), (40, 256, 1423, None)])
def test_fp32_matches_reference(N, H, V, chunk, K, tail, backend, poison_empty):
    h, w, ids, lp, target = make_linear(N, H, V, K, ignore_rows=[1], no_teacher_rows=[N - 1],
                                        padded_rows=[0], device=device_for(backend))
    got, want = run_both(h, w, ids, lp, target, backend, H ** -0.5, chunk, tail=tail, **KW)
    # grad_h sums V terms of both signs (each row's logit gradient sums to 0) in fp32, hence atol 5e-6
    for name, g, r, atol, rtol in zip(("loss", "ce", "kl", "grad_h", "grad_W"), got, want,
                                      (2e-5, 2e-5, 2e-5, 5e-6, 1e-6), (2e-5, 2e-5, 2e-5, 1e-4, 1e-4)):
        assert_close(g, r, atol, rtol, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,H,V,K,chunk", [(37, 16, 1423, 20, 8), (3, 8, 32128, 5, None)])
def test_low_precision_error_within_twice_torch(N, H, V, K, chunk, dtype, backend, poison_empty):
    """bf16/fp16: the logits themselves are rounded by the matmul, so the yardstick is the naive torch
    computation in the same dtype (flash-attention's rule: kernel error <= 2x torch error + atol).
    The Triton interpreter converts fp32 -> bf16 by truncation (the GPU rounds to nearest even), which
    alone doubles the rounding error of the stored logit gradient, so that one case gets 3x."""
    factor = 3 if (backend == "triton" and dtype == torch.bfloat16
                   and os.environ.get("TRITON_INTERPRET") == "1") else 2
    h, w, ids, lp, target = make_linear(N, H, V, K, dtype, ignore_rows=[1], padded_rows=[0],
                                        device=device_for(backend))
    got, want, low = run_both(h, w, ids, lp, target, backend, H ** -0.5, chunk, tail="tail",
                              lowp_torch=True, **KW)
    for i, name in enumerate(("loss", "grad_h", "grad_W")):
        i = (0, 3, 4)[i]
        assert got[i].dtype == (torch.float32 if i == 0 else dtype)
        assert torch.isfinite(got[i]).all(), name
        err_kernel = float((got[i].detach().double().cpu() - want[i].detach()).abs().max())
        err_torch = float((low[i].detach().double() - want[i].detach()).abs().max())
        # atol: one rounding of the dtype at the tensor's scale (max-abs of a small tensor is noisy)
        atol = torch.finfo(dtype).eps * float(want[i].detach().abs().max())
        assert err_kernel <= factor * err_torch + atol, f"{name}: kernel {err_kernel:.3g} vs torch {err_torch:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("alpha,temperature", [(0.0, 2.0), (0.5, 1.0), (1.0, 0.7)])
def test_reductions_alpha_temperature(alpha, temperature, reduction, backend, poison_empty):
    h, w, ids, lp, target = make_linear(19, 12, 1423, 5, ignore_rows=[2, 3], no_teacher_rows=[7],
                                        device=device_for(backend))
    got, want = run_both(h, w, ids, lp, target, backend, 1.0, 6, reduction=reduction, alpha=alpha,
                         temperature=temperature, tail="renorm")
    assert got[0].shape == want[0].shape
    for name, g, r, atol in zip(("loss", "ce", "kl", "grad_h", "grad_W"), got, want,
                                (2e-5, 2e-5, 2e-5, 5e-6, 1e-6)):
        assert_close(g, r, atol, 1e-4, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_row_ignored(reduction, backend, poison_empty):
    h, w, ids, lp, target = make_linear(10, 8, 1423, 5, ignore_rows=range(10), device=device_for(backend))
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, ce, kl = fused_linear_sparse_kl_ce(h1, w1, ids, lp, target, reduction=reduction,
                                             chunk_size=4, backend=backend, return_parts=True)
    loss.sum().backward()
    assert torch.all(loss == 0) and float(ce) == 0.0 and float(kl) == 0.0
    assert torch.all(h1.grad == 0) and torch.all(w1.grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_as_sparse_kl_ce_on_materialised_logits(backend):
    h, w, ids, lp, target = make_linear(21, 16, 700, 5, ignore_rows=[0], device=device_for(backend))
    fused = fused_linear_sparse_kl_ce(h, w, ids, lp, target, hidden_scale=0.25, tail="tail",
                                      chunk_size=5, backend=backend, return_parts=True)
    plain = sparse_kl_ce((h * 0.25) @ w.T, ids, lp, target, tail="tail", backend=backend,
                         return_parts=True)
    for a, b in zip(fused, plain):
        assert math.isclose(float(a), float(b), rel_tol=1e-5)


@pytest.mark.parametrize("want_h,want_w", [(True, False), (False, True)])
def test_partial_requires_grad(want_h, want_w):
    h, w, ids, lp, target = make_linear(9, 8, 300, 5)
    h1, w1 = h.clone().requires_grad_(want_h), w.clone().requires_grad_(want_w)
    fused_linear_sparse_kl_ce(h1, w1, ids, lp, target, chunk_size=4).backward()
    h2, w2 = h.double().requires_grad_(want_h), w.double().requires_grad_(want_w)
    reference_linear(h2, w2, 1.0, ids, lp, target)[0].backward()
    for a, b, name in ((h1, h2, "grad_h"), (w1, w2, "grad_W")):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            assert_close(a.grad, b.grad, 5e-6, 1e-4, name)


def test_module_matches_functional():
    h, w, ids, lp, target = make_linear(9, 8, 300, 5, ignore_rows=[3])
    mod = FusedLinearSparseKLCELoss(hidden_scale=0.5, alpha=0.2, temperature=1.5, tail="tail", chunk_size=4)
    a = mod(h, w, ids, lp, target, return_parts=True)
    b = fused_linear_sparse_kl_ce(h, w, ids, lp, target, hidden_scale=0.5, alpha=0.2, temperature=1.5,
                                  tail="tail", chunk_size=4, return_parts=True)
    assert [float(x) for x in a] == [float(x) for x in b]


@pytest.mark.parametrize("make_bad,error,match", [
    (lambda h, w: (h[0], w), ValueError, "h must have shape"),
    (lambda h, w: (h, w[:, :5]), ValueError, "weight must have shape"),
    (lambda h, w: (h, w.double()), TypeError, "same dtype"),
    (lambda h, w: (h.long(), w.long()), TypeError, "h must be"),
    (lambda h, w: (h, w[:3]), ValueError, "larger than the vocabulary"),
])
def test_validation_errors(make_bad, error, match):
    h, w, ids, lp, target = make_linear(4, 8, 50, 5)
    h, w = make_bad(h, w)
    with pytest.raises(error, match=match):
        fused_linear_sparse_kl_ce(h, w, ids, lp, target)


def test_duplicate_ids_rejected():
    h, w, ids, lp, target = make_linear(4, 8, 50, 5)
    ids[2, 3] = ids[2, 1]
    with pytest.raises(ValueError, match="row 2 holds id"):
        fused_linear_sparse_kl_ce(h, w, ids, lp, target)


def test_bad_chunk_size():
    h, w, ids, lp, target = make_linear(4, 8, 50, 5)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_sparse_kl_ce(h, w, ids, lp, target, chunk_size=0)


# --- benchmark scripts: they run (CPU, tiny shapes) and parse their arguments (GPU) --------------

def test_cpu_benchmark_quick_runs(tmp_path):
    import json

    from specialize.benchmarks import bench_loss_cpu

    out = tmp_path / "loss_cpu.json"
    assert bench_loss_cpu.main(["--quick", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert {r["provider"] for r in payload["rows"]} == {"naive", "unfused", "fused"}
    assert payload["fused_over_naive_peak"] >= 0


def test_gpu_benchmark_args_and_no_cuda_exit():
    from specialize.benchmarks import bench_loss_gpu

    args = bench_loss_gpu.parse_args(["--quick", "--dtype", "fp16", "--skip-liger"])
    assert (args.N, args.H, args.V, args.dtype, args.skip_liger) == (1024, 512, 32128, "fp16", True)
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the script would run for real")
    assert bench_loss_gpu.main(["--quick"]) == 2


@pytest.mark.parametrize("fused", [False, True], ids=["sparse_kl_ce", "fused_linear"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_grad_output_scales_bf16_gradients_in_fp32(fused, reduction):
    """grad_output = 1/3 (DeepSpeed's 1/grad_accum) on bf16 gradients: each is the gradient for
    grad_output 1 times 1/3 in fp32, rounded once, bit for bit. Rounding 1/3 itself to bf16 (0.33398)
    first made every gradient 0.2 % too large. (The fused kernel with reduction="none" recomputes its
    chunks with the per-row grad_output as the rows' fp32 scale: the same value to within rounding.)"""
    torch.manual_seed(0)
    N, H, V, K = 48, 32, 512, 5
    logits, ids, lp, target = make_inputs(N, V, K)
    h = (torch.randn(N, H) / 4).to(torch.bfloat16)
    w = (torch.randn(V, H) / 4).to(torch.bfloat16)
    third = torch.full((N,) if reduction == "none" else (), 1 / 3)

    def grads(grad_output):
        if fused:
            hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
            loss = fused_linear_sparse_kl_ce(hh, ww, ids, lp, target, backend="torch", reduction=reduction)
            loss.backward(grad_output)
            return [hh.grad, ww.grad]
        x = logits.to(torch.bfloat16).requires_grad_()
        sparse_kl_ce(x, ids, lp, target, backend="torch", reduction=reduction).backward(grad_output)
        return [x.grad]

    for once, thirds in zip(grads(torch.ones_like(third)), grads(third)):
        if fused and reduction == "none":
            exact, got = once.double() / 3, thirds.double()
            scale = ((got * exact).sum() / (exact * exact).sum()).item()
            assert abs(scale - 1) < 1e-3, scale
        else:
            g = third[:, None] if reduction == "none" else third
            assert torch.equal(thirds, (once.float() * g).to(torch.bfloat16))


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_fp32_grad_weight_accumulation_is_closer_to_float64(reduction):
    """grad_weight_dtype=torch.float32 sums grad_weight over many chunks in fp32: against the float64
    reference its error is that of rounding each chunk's product and the total (about bf16's unit),
    where the bf16 running sum's grows with the chunk count. The returned gradient keeps the weight's
    dtype either way."""
    torch.manual_seed(0)
    N, H, V, K = 512, 32, 256, 5
    _, ids, lp, target = make_inputs(N, V, K)
    h = (torch.randn(N, H) / 2).to(torch.bfloat16)
    w = (torch.randn(V, H) / 2).to(torch.bfloat16)
    h64, w64 = h.double(), w.double().requires_grad_()
    out = reference_linear(h64, w64, 1.0, ids, lp.double(), target, reduction=reduction)[0]
    out.sum().backward()
    errors = {}
    for dtype in (None, torch.float32):
        ww = w.clone().requires_grad_()
        loss = fused_linear_sparse_kl_ce(h, ww, ids, lp, target, backend="torch", reduction=reduction,
                                         chunk_size=2, grad_weight_dtype=dtype)
        loss.sum().backward()
        assert ww.grad.dtype == torch.bfloat16
        errors[dtype] = ((ww.grad.double() - w64.grad).norm() / w64.grad.norm()).item()
    rounding = ((w64.grad.to(torch.bfloat16).double() - w64.grad).norm() / w64.grad.norm()).item()
    assert errors[torch.float32] < 3 * rounding, (errors, rounding)
    assert errors[torch.float32] < errors[None] / 3, (errors, rounding)


def test_engine_lm_head_passes_loss_grad_weight_fp32_to_the_kernel():
    """loss.grad_weight_fp32 reaches the kernel through the engine's FusedLMHead: its weight gradient is
    the kernel's with grad_weight_dtype=torch.float32, bit for bit, and not the default's."""
    from specialize.engine.config import LossConfig
    from specialize.engine.models import FusedLMHead
    torch.manual_seed(0)
    N, H, V, K = 256, 16, 128, 5
    _, ids, lp, target = make_inputs(N, V, K)
    h = torch.randn(N, H).to(torch.bfloat16)
    grads = {}
    for fp32 in (False, True):
        head = FusedLMHead(H, V, bias=False, dtype=torch.bfloat16)
        with torch.no_grad():
            head.weight.copy_((torch.randn(V, H) / 2).to(torch.bfloat16) if not grads else grads["w"])
        grads.setdefault("w", head.weight.detach().clone())
        head.configure(0.5, LossConfig(kind="dm", alpha=0.5, chunk_size=2, grad_weight_fp32=fp32))
        head(h, ids, lp, target)[0].backward()
        grads[fp32] = head.weight.grad
    ww = grads["w"].clone().requires_grad_()
    fused_linear_sparse_kl_ce(h, ww, ids, lp, target, hidden_scale=0.5, chunk_size=2,
                              grad_weight_dtype=torch.float32, validate=False).backward()
    assert torch.equal(grads[True], ww.grad) and not torch.equal(grads[False], ww.grad)
