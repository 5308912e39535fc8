"""GPU benchmark of the loss kernels (needs CUDA; exits with code 2 and a message otherwise).

    python -m specialize.benchmarks.bench_loss_gpu                # N=8192 H=4096 V=32128 K=20 bf16
    python -m specialize.benchmarks.bench_loss_gpu --quick        # small shapes, a smoke run
    python -m specialize.benchmarks.bench_loss_gpu --dry          # CPU, Triton interpreter, toy shapes:
                                                                  # the plumbing only, no figure to keep

1. HBM bandwidth, measured here: do_bench of a 2 GiB device-to-device copy (bytes read + written).
2. sparse_kl_ce on [N, V] logits: forward-only (no grad) and forward+backward time; achieved GB/s
   under the minimum-traffic model (forward: read logits once; fwd+bwd: read logits + write the
   logit gradient once), and that as % of the measured copy bandwidth.
3. lm_head + loss, forward+backward time and peak memory (max_memory_allocated above the inputs):
   naive PyTorch (materialised logits, fp32 log_softmax), this package's fused_linear_sparse_kl_ce
   (alpha=0.5: the distillation loss; alpha=1: CE only, the same math as Liger's), and Liger-Kernel's
   LigerFusedLinearCrossEntropyLoss (CE only); where Liger is not importable its row says so.
Times: triton.testing.do_bench, median with p20/p80, ms (--dry: host timer on the CPU). Results go to
benchmarks/results/loss_gpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from specialize.engine.cli import HelpFormatter

RESULTS = Path(__file__).resolve().parent / "results" / "loss_gpu.json"
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def parse_args(argv):
    ap = argparse.ArgumentParser(formatter_class=HelpFormatter, description=__doc__.splitlines()[0])
    ap.add_argument("--N", type=int, default=8192, help="rows (target tokens)")
    ap.add_argument("--H", type=int, default=4096, help="hidden size")
    ap.add_argument("--V", type=int, default=32128, help="vocabulary size")
    ap.add_argument("--K", type=int, default=20, help="teacher top-k")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="logits / weights dtype")
    ap.add_argument("--tail", choices=["none", "renorm", "tail"], default="none", help="teacher tail mode")
    ap.add_argument("--quick", action="store_true", help="N=1024 H=512 V=32128: a smoke run")
    ap.add_argument("--dry", action="store_true",
                    help="CPU with the Triton interpreter, N=16 H=32 V=1000 K=20: checks the script, measures nothing")
    ap.add_argument("--skip-liger", action="store_true", help="leave out the Liger-Kernel baseline")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for loss_gpu.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.N, args.H = 1024, 512
    if args.dry:
        args.N, args.H, args.V = 16, 32, 1000
    return args


def _inputs(N, H, V, K, dtype, device, seed=0):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(N, H, device=device, dtype=dtype, generator=g)
    weight = (torch.randn(V, H, device=device, generator=g) * H ** -0.5).to(dtype)
    ids = torch.rand(N, V, device=device, generator=g).argsort(dim=1)[:, :K].contiguous()
    lp = torch.log_softmax(torch.randn(N, K + 4, device=device, generator=g) * 2, 1)[:, :K].contiguous()
    target = torch.randint(0, V, (N,), device=device, generator=g)
    target[::7] = -100
    return h, weight, ids, lp, target


def _bench(fn, grad_to_none=None, device="cuda", reps=5):
    """{median, p20, p80} in ms: do_bench (CUDA events) on the GPU; a host timer on the CPU (--dry)."""
    if device == "cuda":
        from triton.testing import do_bench

        med, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=grad_to_none)
        return dict(median=med, p20=p20, p80=p80)
    import numpy as np

    times = []
    for i in range(reps + 1):
        for t in grad_to_none or []:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        if i:  # the first call is the warm-up
            times.append((time.perf_counter() - t0) * 1e3)
    med, p20, p80 = np.quantile(times, [0.5, 0.2, 0.8])
    return dict(median=float(med), p20=float(p20), p80=float(p80))


def _peak_mib(fn, device="cuda"):
    import torch

    if device != "cuda":  # no allocator statistics on the host
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _naive_loss(h, weight, ids, lp, target, alpha, tau):
    import torch

    logits = (h @ weight.T).float()
    valid = target != -100
    ce = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="none")
    logq = torch.log_softmax(logits / tau, dim=1).gather(1, ids)
    kl = (lp.exp() * (lp - logq)).sum(1) * tau ** 2
    return ((alpha * ce + (1 - alpha) * kl) * valid).sum() / valid.sum()


def measure_bandwidth(device="cuda", nbytes=2**31):
    """Device-to-device copy GB/s counting bytes read + written (2 GiB buffers: many times the L2)."""
    import torch

    src = torch.randint(-2**15, 2**15, (nbytes // 2,), dtype=torch.int16, device=device)  # not zeros
    dst = torch.empty_like(src)
    t = _bench(lambda: dst.copy_(src), device=device)
    return 2 * src.numel() * src.element_size() / (t["median"] * 1e-3) / 1e9


def measure_matmul_tflops(device="cuda", n=8192, dtype_name="bf16"):
    """TFLOP/s of one n x n x n matmul on random data (random, not zeros: zeros run faster)."""
    import torch

    dtype = getattr(torch, DTYPES[dtype_name])
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = _bench(lambda: a @ b, device=device)
    return 2 * n ** 3 / (t["median"] * 1e-3) / 1e12


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not args.dry:
        print("bench_loss_gpu: CUDA is not available on this machine, nothing measured. Run it on a "
              "GPU host (the CPU benchmark is specialize.benchmarks.bench_loss_cpu; --dry checks this "
              "script on the CPU).", file=sys.stderr)
        return 2
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":  # --dry: the Triton kernels through the interpreter (set before triton is imported)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from specialize.kernels import fused_linear_sparse_kl_ce, sparse_kl_ce

    backend = "auto" if dev == "cuda" else "triton"
    dtype = getattr(torch, DTYPES[args.dtype])
    N, H, V, K = args.N, args.H, args.V, args.K
    h, weight, ids, lp, target = _inputs(N, H, V, K, dtype, dev)
    esize = torch.finfo(dtype).bits // 8
    device = torch.cuda.get_device_name() if dev == "cuda" else "cpu (--dry)"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    config = dict(N=N, H=H, V=V, K=K, dtype=args.dtype, tail=args.tail, alpha=0.5, temperature=1.0)
    rows = []

    def row(kernel, provider, mode, metric, unit, stats, note=None):
        rows.append(dict(kernel=kernel, provider=provider, mode=mode, metric=metric, unit=unit, x=N,
                         median=stats["median"], p20=stats.get("p20"), p80=stats.get("p80"),
                         config=config, device=device, timestamp=stamp, version=torch.__version__,
                         **({"note": note} if note else {})))

    hbm = measure_bandwidth(dev, 2**31 if dev == "cuda" else 2**25)
    row("device_copy", "torch", "full", "bandwidth", "GB/s", dict(median=hbm))
    print(f"{device}: measured copy bandwidth {hbm:.0f} GB/s")

    # --- sparse_kl_ce on materialised logits ---
    logits = (h @ weight.T).contiguous()
    kw = dict(alpha=0.5, tail=args.tail, validate=False, backend=backend)
    t_fwd = _bench(lambda: sparse_kl_ce(logits, ids, lp, target, **kw), device=dev)
    x = logits.clone().requires_grad_()
    t_full = _bench(lambda: sparse_kl_ce(x, ids, lp, target, **kw).backward(), grad_to_none=[x], device=dev)
    print(f"\nsparse_kl_ce [{N} x {V}] {args.dtype}   median ms  p20   p80    GB/s  % of copy")
    # The bytes each mode really moves. forward: the logits of the rows not ignored, read once (an
    # ignored row is skipped). full: the kernel reads those rows and writes the whole gradient (zeros
    # for ignored rows), then autograd's backward scales it by grad_output (a read and a write of
    # [N, V]): counting only 2 N V, a perfect kernel would show half the copy bandwidth.
    valid = int((target != -100).sum())
    moved = {"forward": valid * V * esize, "full": (valid + 3 * N) * V * esize}
    for mode, t, nbytes in (("forward", t_fwd, moved["forward"]), ("full", t_full, moved["full"])):
        gbs = nbytes / (t["median"] * 1e-3) / 1e9
        print(f"  {mode:<8} {t['median']:16.3f} {t['p20']:5.3f} {t['p80']:5.3f} {gbs:7.0f} {100 * gbs / hbm:7.1f}")
        row("sparse_kl_ce", "specialize", mode, "time", "ms", t)
        row("sparse_kl_ce", "specialize", mode, "bandwidth", "GB/s", dict(median=gbs))
        row("sparse_kl_ce", "specialize", mode, "pct_of_copy_bandwidth", "%", dict(median=100 * gbs / hbm))
    logits = x = None  # free the [N, V] buffers before the fused-linear rows (the lambdas above are done)

    # --- lm_head + loss ---
    h_req = h.clone().requires_grad_()
    w_req = weight.clone().requires_grad_()
    providers = {
        "naive_torch": lambda: _naive_loss(h_req, w_req, ids, lp, target, 0.5, 1.0).backward(),
        "specialize_fused": lambda: fused_linear_sparse_kl_ce(h_req, w_req, ids, lp, target,
                                                              **kw).backward(),
        "specialize_fused_ce_only": lambda: fused_linear_sparse_kl_ce(
            h_req, w_req, ids, lp, target, alpha=1.0, validate=False, backend=backend).backward(),
    }
    liger_missing = "skipped (--skip-liger)" if args.skip_liger else None
    if not args.skip_liger:
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            liger = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
            providers["liger_flce_ce_only"] = lambda: liger(w_req, h_req, target).backward()
        except Exception as err:  # noqa: BLE001 (ImportError, or a Liger built for another transformers)
            liger_missing = f"not importable ({type(err).__name__}: {err})"[:300]
    print(f"\nlm_head + loss fwd+bwd, N={N} H={H} V={V} K={K} {args.dtype}")
    print(f"  {'provider':<26} {'median ms':>9} {'p20':>7} {'p80':>7} {'peak MiB':>9}")
    for name, fn in providers.items():
        h_req.grad = w_req.grad = None  # every provider's peak from the same baseline (no grads held)
        try:
            peak = _peak_mib(fn, dev)
            t = _bench(fn, grad_to_none=[h_req, w_req], device=dev)
        except torch.cuda.OutOfMemoryError:
            print(f"  {name:<26} out of memory")
            row("fused_linear_sparse_kl_ce", name, "full", "unavailable", "", dict(median=None), "out of memory")
            torch.cuda.empty_cache()
            continue
        except Exception as err:  # e.g. Liger on a Triton it was not written for: say so, keep the rest
            print(f"  {name:<26} failed: {type(err).__name__}: {str(err)[:200]}")
            row("fused_linear_sparse_kl_ce", name, "full", "unavailable", "", dict(median=None),
                f"failed: {type(err).__name__}: {str(err)[:300]}")
            continue
        peak_txt = f"{peak:9.0f}" if peak is not None else f"{'-':>9}"
        print(f"  {name:<26} {t['median']:9.2f} {t['p20']:7.2f} {t['p80']:7.2f} {peak_txt}")
        row("fused_linear_sparse_kl_ce", name, "full", "time", "ms", t)
        row("fused_linear_sparse_kl_ce", name, "full", "peak_memory_above_inputs", "MiB", dict(median=peak))
    if liger_missing:
        print(f"  {'liger_flce_ce_only':<26} {liger_missing}")
        row("fused_linear_sparse_kl_ce", "liger_flce_ce_only", "full", "unavailable", "", dict(median=None),
            liger_missing)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(
        command="python -m specialize.benchmarks.bench_loss_gpu " + " ".join(argv or []), dry=args.dry,
        bytes_model="sparse_kl_ce forward: N*V*elem read; full: N*V*elem read + N*V*elem grad written "
                    "(the kernel itself reads the logits twice; the second sweep mostly hits L2)",
        rows=rows), indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
