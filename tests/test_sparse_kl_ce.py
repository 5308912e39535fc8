"""sparse_kl_ce against the float64 reference: the Triton kernel (compiled on the GPU when there is one,
the CPU interpreter otherwise) and the PyTorch path (CPU)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_reference import (
    TAIL_EPS,
    assert_close,
    device_for,
    in_place_matches_out_of_place,
    make_inputs,
    reference_loss,
)

from specialize.kernels import SparseKLCELoss, sparse_kl_ce
from specialize.kernels.sparse_kl_ce import sparse_kl_ce_rows

BACKENDS = ["triton", "torch"]
TAILS = ["none", "renorm", "tail"]
# (dtype, atol, rtol) for the logit gradient. Loss is accumulated in fp32 from the exact input
# values, so its tolerance is the same for every dtype; the gradient is stored in the input dtype,
# so its error is one rounding of that dtype (bf16 2^-8, fp16 2^-11, relative) plus the rounding of
# backward's multiply by grad_output. bf16 is looser: the Triton interpreter converts fp32 -> bf16 by
# truncation (up to 2^-7; the GPU rounds to nearest even).
GRAD_TOL = [
    (torch.float32, 1e-7, 1e-4),
    (torch.bfloat16, 1e-7, 1.6e-2),
    (torch.float16, 1e-7, 2e-3),
]
LOSS_ATOL, LOSS_RTOL = 2e-5, 2e-5


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
    """Every float buffer the kernels allocate with torch.empty/empty_like starts as NaN, so an element
    the kernel forgets to write shows up in the comparison."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(out):
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poisoned(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poisoned(real_empty_like(*a, **k)))


def run_both(logits, ids, lp, target, backend, **kw):
    """(loss, ce, kl, grad) from the kernel and the float64 reference for one random grad_output.
    The kernel runs where its inputs are; the reference always on the CPU."""
    x = logits.clone().requires_grad_()
    loss, ce, kl = sparse_kl_ce(x, ids, lp, target, backend=backend, return_parts=True, **kw)
    go = torch.rand_like(loss) + 0.5
    (loss * go).sum().backward()
    x64 = logits.double().cpu().requires_grad_()
    ref, ref_ce, ref_kl = reference_loss(x64, ids.cpu(), lp.cpu(), target.cpu(), **kw)
    (ref * go.double().cpu()).sum().backward()
    return (loss, ce, kl, x.grad), (ref, ref_ce, ref_kl, x64.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("dtype,atol,rtol", GRAD_TOL)
@pytest.mark.parametrize("K", [1, 5, 20])
@pytest.mark.parametrize("N,V", [(3, 1423), (37, 1423), (4, 32128)])
def test_matches_reference(N, V, K, dtype, atol, rtol, tail, backend, poison_empty):
    logits, ids, lp, target = make_inputs(N, V, K, dtype, ignore_rows=[1], no_teacher_rows=[N - 1],
                                          padded_rows=[0], one_hot_rows=[2] if N > 3 else [],
                                          device=device_for(backend))
    got, want = run_both(logits, ids, lp, target, backend, alpha=0.5, temperature=1.7, tail=tail)
    for name, g, w in zip(("loss", "ce", "kl"), got[:3], want[:3]):
        assert_close(g, w, LOSS_ATOL, LOSS_RTOL, name)
    assert got[3].dtype == dtype
    assert_close(got[3], want[3], atol, rtol, "grad_logits")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_alpha_and_temperature(alpha, temperature, tail, backend, poison_empty):
    logits, ids, lp, target = make_inputs(37, 1423, 5, ignore_rows=[4, 9], no_teacher_rows=[3],
                                          padded_rows=[0, 1], one_hot_rows=[5], device=device_for(backend))
    got, want = run_both(logits, ids, lp, target, backend, alpha=alpha, temperature=temperature,
                         tail=tail)
    for name, g, w in zip(("loss", "ce", "kl"), got[:3], want[:3]):
        assert_close(g, w, LOSS_ATOL, LOSS_RTOL, name)
    assert_close(got[3], want[3], 1e-7, 1e-4, "grad_logits")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(reduction, backend, poison_empty):
    logits, ids, lp, target = make_inputs(11, 1423, 5, ignore_rows=[2], no_teacher_rows=[7],
                                          device=device_for(backend))
    got, want = run_both(logits, ids, lp, target, backend, alpha=0.3, temperature=1.5, tail="tail",
                         reduction=reduction)
    assert got[0].shape == want[0].shape
    assert_close(got[0], want[0], LOSS_ATOL, LOSS_RTOL, "loss")
    assert_close(got[3], want[3], 1e-7, 1e-4, "grad_logits")
    if reduction == "none":
        assert float(got[0][2].detach()) == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_error_within_twice_torch(dtype, backend):
    """flash-attention's rule: the kernel's error vs float64 is at most ~2x the error of the same
    naive torch computation done in the input dtype."""
    logits, ids, lp, target = make_inputs(16, 1423, 20, dtype, ignore_rows=[3], padded_rows=[0],
                                          device=device_for(backend))
    got, want = run_both(logits, ids, lp, target, backend, alpha=0.5, temperature=2.0, tail="tail")
    x_low = logits.cpu().clone().requires_grad_()
    low, _, _ = reference_loss(x_low, ids.cpu(), lp.cpu().to(dtype), target.cpu(), alpha=0.5, temperature=2.0,
                               tail="tail")
    low.backward()
    for name, g, lo, w in (("loss", got[0], low, want[0]), ("grad", got[3], x_low.grad, want[3])):
        err_kernel = float((g.detach().double().cpu() - w.detach()).abs().max())
        err_torch = float((lo.detach().double() - w.detach()).abs().max())
        assert err_kernel <= 2 * err_torch + 1e-6, f"{name}: kernel {err_kernel:.3g} vs torch {err_torch:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_row_ignored(reduction, backend, poison_empty):
    logits, ids, lp, target = make_inputs(6, 1423, 5, ignore_rows=range(6), device=device_for(backend))
    x = logits.clone().requires_grad_()
    loss, ce, kl = sparse_kl_ce(x, ids, lp, target, backend=backend, reduction=reduction,
                                return_parts=True)
    loss.sum().backward()
    assert torch.all(loss == 0) and float(ce) == 0.0 and float(kl) == 0.0
    assert torch.all(x.grad == 0), "ignored rows must get an exactly zero (and written) gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_teacher_are_pure_ce(backend):
    logits, ids, lp, target = make_inputs(9, 1423, 5, no_teacher_rows=range(9), ignore_rows=[4],
                                          device=device_for(backend))
    x = logits.clone().requires_grad_()
    loss = sparse_kl_ce(x, ids, lp, target, alpha=0.0, temperature=3.0, backend=backend)
    x_ce = logits.double().cpu().requires_grad_()
    ce = torch.nn.functional.cross_entropy(x_ce, target.cpu(), ignore_index=-100)
    loss.backward(), ce.backward()
    assert_close(loss, ce, 1e-5, 1e-5, "loss")
    assert_close(x.grad, x_ce.grad, 1e-7, 1e-4, "grad_logits")


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_is_scaled_by_tau_squared(backend):
    """alpha=0, tail none: loss = τ² · mean_i Σ_j p_ij (log p_ij − log softmax(z_i/τ)_j), by hand."""
    tau = 2.5
    logits, ids, lp, target = make_inputs(5, 300, 4, device=device_for(backend))
    loss = sparse_kl_ce(logits, ids, lp, target, alpha=0.0, temperature=tau, backend=backend)
    logits, ids, lp = logits.cpu(), ids.cpu(), lp.cpu()
    logq = torch.log_softmax(logits.double() / tau, dim=1).gather(1, ids)
    by_hand = tau ** 2 * (lp.double().exp() * (lp.double() - logq)).sum(1).mean()
    assert math.isclose(float(loss), float(by_hand), rel_tol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_buffer_fully_written(backend):
    """The low-level launcher writes every element of a NaN-filled grad buffer, ignored rows included."""
    logits, ids, lp, target = make_inputs(7, 1423, 5, ignore_rows=[0, 6], no_teacher_rows=[3],
                                          device=device_for(backend))
    grad = torch.full_like(logits, float("nan"))
    scale = torch.ones(1, device=logits.device)
    sparse_kl_ce_rows(logits, ids, lp, target, grad, scale, 0.5, 1.3, "tail", -100, backend=backend)
    assert torch.isfinite(grad).all()
    assert torch.all(grad[[0, 6]] == 0)
    # rows with a target are (softmax − teacher) mixtures: they sum to 0
    assert_close(grad.sum(1), torch.zeros(7), 1e-5, 0, "grad row sums")


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_functional(backend):
    logits, ids, lp, target = make_inputs(8, 500, 5, ignore_rows=[1], device=device_for(backend))
    mod = SparseKLCELoss(alpha=0.2, temperature=1.3, tail="renorm", backend=backend)
    a = mod(logits, ids, lp, target)
    b = sparse_kl_ce(logits, ids, lp, target, alpha=0.2, temperature=1.3, tail="renorm", backend=backend)
    assert float(a) == float(b)


def test_int32_inputs_and_noncontiguous_logits():
    logits, ids, lp, target = make_inputs(6, 400, 5, ignore_rows=[2])
    dev = device_for("triton")
    wide = torch.randn(400, 6, device=dev).T  # non-contiguous [6, 400]
    wide.copy_(logits)
    a = sparse_kl_ce(wide, ids.int().to(dev), lp.to(dev), target.int().to(dev), backend="triton")
    b = sparse_kl_ce(logits, ids, lp, target, backend="torch")
    assert math.isclose(float(a), float(b), rel_tol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    N=st.integers(1, 6), V=st.integers(2, 300), K=st.integers(1, 8),
    alpha=st.floats(0.0, 1.0), temperature=st.floats(0.3, 4.0),
    tail=st.sampled_from(TAILS), reduction=st.sampled_from(["mean", "sum", "none"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_torch_path(N, V, K, alpha, temperature, tail, reduction, seed):
    torch.manual_seed(seed)
    K = min(K, V)
    logits, ids, lp, target = make_inputs(N, V, K, ignore_rows=[0] if N > 2 else [],
                                          padded_rows=[N - 1])
    got, want = run_both(logits, ids, lp, target, "torch", alpha=alpha, temperature=temperature,
                         tail=tail, reduction=reduction)
    extra = tail_error_bound(logits, ids, lp, temperature) * N if tail == "tail" else 0.0
    assert_close(got[0], want[0], 1e-4 + extra, 1e-4, "loss")
    assert_close(got[3], want[3], 1e-6 + 2 * extra / temperature, 1e-4, "grad_logits")


@settings(max_examples=12, deadline=None)
@given(
    N=st.integers(1, 4), V=st.integers(2, 3000), K=st.integers(1, 8),
    alpha=st.floats(0.0, 1.0), temperature=st.floats(0.3, 4.0),
    tail=st.sampled_from(TAILS), seed=st.integers(0, 2**31 - 1),
)
def test_property_triton_kernel(N, V, K, alpha, temperature, tail, seed):
    """Odd V against the block size (V < BLOCK, V = BLOCK + 1, ...), K up to V."""
    torch.manual_seed(seed)
    K = min(K, V)
    logits, ids, lp, target = make_inputs(N, V, K, padded_rows=[0], device=device_for("triton"))
    got, want = run_both(logits, ids, lp, target, "triton", alpha=alpha, temperature=temperature,
                         tail=tail)
    extra = tail_error_bound(logits, ids, lp, temperature) * N if tail == "tail" else 0.0
    assert_close(got[0], want[0], 1e-4 + extra, 1e-4, "loss")
    assert_close(got[3], want[3], 1e-6 + 2 * extra / temperature, 1e-4, "grad_logits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("N,V", [(9, 1423), (5, 32768 + 77)])  # one block per row, and a row loop of two
def test_in_place_gradient_is_bitwise_equal(N, V, dtype, tail):
    """The fused-linear loss lets the kernel write each chunk's gradient over its logits: the result
    must be bit for bit the one written to a separate buffer (no program reads a logit after a
    store to it, including the K + 1 sparse positions it rewrites)."""
    logits, ids, lp, target = make_inputs(N, V, 20, dtype, ignore_rows=[1], no_teacher_rows=[N - 1],
                                          padded_rows=[0], one_hot_rows=[2], device=device_for("triton"))
    equal, differ = in_place_matches_out_of_place(logits, ids, lp, target, alpha=0.4, temperature=1.3,
                                                  tail=tail)
    assert equal, f"{differ} elements differ between the in-place and the separate-buffer gradient"


def tail_error_bound(logits, ids, lp, temperature, delta=1e-6):
    """In tail mode the student's tail mass q_r = 1 − Σ_S q is a difference computed in fp32, with an
    absolute error of a few 1e-8 (delta = 1e-6 is generous), so the tail term τ²·p_r·log q_r and its
    gradient carry a relative error ~ delta / q_r: large only when the student puts nearly all its
    mass on the teacher's ids (q_r is clamped at TAIL_EPS)."""
    has = ids >= 0
    q = torch.log_softmax(logits.double() / temperature, dim=1).exp()
    q_r = (1 - torch.where(has, q.gather(1, ids.clamp_min(0)), 0).sum(1)).clamp_min(TAIL_EPS)
    p_r = (1 - torch.where(has, lp.double().exp(), 0).sum(1)).clamp_min(0)
    return float((temperature ** 2 * p_r * delta / q_r).max())


# --- input validation -------------------------------------------------------------------------

def _bad(**change):
    logits, ids, lp, target = make_inputs(4, 50, 3)
    args = dict(logits=logits, topk_ids=ids, topk_logprobs=lp, target=target)
    for key, fn in change.items():
        args[key] = fn(args[key])
    return args


@pytest.mark.parametrize("change,error,match", [
    (dict(logits=lambda x: x[0]), ValueError, "logits must have shape"),
    (dict(logits=lambda x: x.long()), TypeError, "logits must be"),
    (dict(topk_ids=lambda x: x[:3]), ValueError, "topk_ids must have shape"),
    (dict(topk_logprobs=lambda x: x[:, :2]), ValueError, "topk_logprobs shape"),
    (dict(target=lambda x: x[:3]), ValueError, "target must have shape"),
    (dict(topk_ids=lambda x: x.float()), TypeError, "topk_ids must be int"),
    (dict(topk_logprobs=lambda x: x.long()), TypeError, "topk_logprobs must be"),
    (dict(target=lambda x: x.float()), TypeError, "target must be int"),
    (dict(topk_ids=lambda x: x.index_fill(1, torch.tensor([1]), 50)), ValueError, r"outside \[0, V=50\)"),
    (dict(topk_ids=lambda x: x.index_fill(1, torch.tensor([1]), -2)), ValueError, "padding id -1"),
    (dict(target=lambda x: x.index_fill(0, torch.tensor([2]), 50)), ValueError, r"target\[2\] = 50"),
    (dict(topk_ids=lambda x: torch.cat([x[:, :2], x[:, :1]], 1)), ValueError, "more than once"),
    (dict(logits=lambda x: x[:, :2]), ValueError, "larger than the vocabulary"),
])
def test_validation_errors(change, error, match):
    args = _bad(**change)
    with pytest.raises(error, match=match):
        sparse_kl_ce(args["logits"], args["topk_ids"], args["topk_logprobs"], args["target"])


def test_padding_may_repeat():
    logits, ids, lp, target = make_inputs(4, 50, 5, padded_rows=[0, 1])
    assert torch.isfinite(sparse_kl_ce(logits, ids, lp, target))


@pytest.mark.parametrize("kw,match", [
    (dict(alpha=1.5), "alpha"), (dict(temperature=0.0), "temperature"),
    (dict(tail="all"), "tail"), (dict(reduction="avg"), "reduction"), (dict(backend="cuda"), "backend"),
])
def test_option_errors(kw, match):
    logits, ids, lp, target = make_inputs(4, 50, 3)
    with pytest.raises(ValueError, match=match):
        sparse_kl_ce(logits, ids, lp, target, **kw)
