"""CPU benchmark: fused lm_head + sparse KL/CE (chunked) vs naive PyTorch, forward + backward.

    python -m specialize.benchmarks.bench_loss_cpu            # N=4096 H=512 V=32128 K=20, writes JSON
    python -m specialize.benchmarks.bench_loss_cpu --quick    # tiny shapes, seconds, writes nothing

Providers, all fp32 on the same inputs:
  naive    logits = h @ Wᵀ, full log_softmax (τ=1 for CE, τ for KL), gather, autograd
  unfused  logits = h @ Wᵀ materialised, then this package's sparse_kl_ce (row-chunked torch path)
  fused    fused_linear_sparse_kl_ce (chunks of rows; no [N, V] tensor)

Memory method: each provider runs in a fresh spawned process; peak = the kernel's RSS high-water mark
(getrusage ru_maxrss) after one forward+backward minus the high-water mark once the inputs exist.
Inputs are built without temporaries so the baseline is not inflated. Time: median / p20 / p80 of
wall-clock forward+backward over --repeats runs after that first (warm-up) run.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

from specialize.engine.cli import HelpFormatter

RESULTS = Path(__file__).resolve().parent / "results" / "loss_cpu.json"
PROVIDERS = ("naive", "unfused", "fused")


def _inputs(N, H, V, K, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).requires_grad_()
    weight = torch.randn(V, H, generator=g).mul_(H ** -0.5).requires_grad_()
    ids = torch.empty(N, K, dtype=torch.int64)
    for i in range(N):  # distinct ids per row without an [N, V] permutation buffer
        ids[i] = torch.randperm(V, generator=g)[:K]
    lp = torch.log_softmax(torch.randn(N, K + 4, generator=g) * 2, dim=1)[:, :K].contiguous()
    target = torch.randint(0, V, (N,), generator=g)
    target[::7] = -100
    return h, weight, ids, lp, target


def _naive(h, weight, ids, lp, target, hidden_scale, alpha, tau):
    import torch

    logits = (h * hidden_scale) @ weight.T
    valid = target != -100
    ce = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="none")
    logq = torch.log_softmax(logits / tau, dim=1).gather(1, ids.clamp_min(0))
    p = torch.where(ids >= 0, lp.exp(), torch.zeros(()))
    kl = (p * (lp - logq)).sum(1) * tau ** 2
    return ((alpha * ce + (1 - alpha) * kl) * valid).sum() / valid.sum().clamp_min(1)


def _step(provider, inputs, hidden_scale, alpha, tau):
    from specialize.kernels import fused_linear_sparse_kl_ce, sparse_kl_ce

    h, weight, ids, lp, target = inputs
    if provider == "naive":
        loss = _naive(h, weight, ids, lp, target, hidden_scale, alpha, tau)
    elif provider == "unfused":
        loss = sparse_kl_ce((h * hidden_scale) @ weight.T, ids, lp, target, alpha=alpha, temperature=tau)
    else:
        loss = fused_linear_sparse_kl_ce(h, weight, ids, lp, target, hidden_scale=hidden_scale,
                                         alpha=alpha, temperature=tau)
    loss.backward()
    h.grad = weight.grad = None
    return float(loss.detach())


def _maxrss_bytes() -> int:
    # ru_maxrss is in KiB on Linux (bytes on macOS)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _measure(provider, shape, repeats, seed, threads, queue):
    """Runs in a fresh process: peak RSS delta of the first step, then timed repeats."""
    import torch

    torch.set_num_threads(threads)
    # Imports and one tiny step first, so libraries and thread pools are not counted as loss memory.
    _step(provider, _inputs(8, 16, 64, 4, seed), 0.25, 0.5, 1.5)
    N, H, V, K = shape
    inputs = _inputs(N, H, V, K, seed)
    base = _maxrss_bytes()
    t0 = time.perf_counter()
    loss = _step(provider, inputs, H ** -0.5, 0.5, 1.5)
    first = time.perf_counter() - t0
    peak = _maxrss_bytes() - base
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _step(provider, inputs, H ** -0.5, 0.5, 1.5)
        times.append(time.perf_counter() - t0)
    queue.put(dict(provider=provider, loss=loss, peak_bytes=peak, first_s=first, times_s=times,
                   threads=torch.get_num_threads()))


def _quantile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def run(shape, repeats, seed, threads):
    ctx = mp.get_context("spawn")
    out = {}
    for provider in PROVIDERS:
        queue = ctx.Queue()
        proc = ctx.Process(target=_measure, args=(provider, shape, repeats, seed, threads, queue))
        proc.start()
        result = queue.get()
        proc.join()
        out[provider] = result
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(formatter_class=HelpFormatter, description=__doc__.splitlines()[0])
    ap.add_argument("--N", type=int, default=4096, help="rows (target tokens)")
    ap.add_argument("--H", type=int, default=512, help="hidden size")
    ap.add_argument("--V", type=int, default=32128, help="vocabulary size")
    ap.add_argument("--K", type=int, default=20, help="teacher top-k")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per provider")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine OpenMP threads that spin "
                         "while another process holds a core make small ops 100x slower)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (N=64 H=32 V=1000 K=5), 1 repeat")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"JSON output (default {RESULTS} for a full run, none for --quick)")
    args = ap.parse_args(argv)
    if args.quick:
        args.N, args.H, args.V, args.K, args.repeats = 64, 32, 1000, 5, 1
    out_path = args.out if (args.out or args.quick) else RESULTS
    shape = (args.N, args.H, args.V, args.K)

    results = run(shape, args.repeats, args.seed, args.threads)
    naive = results["naive"]
    config = dict(N=args.N, H=args.H, V=args.V, K=args.K, dtype="float32", alpha=0.5, temperature=1.5,
                  hidden_scale=args.H ** -0.5, repeats=args.repeats, threads=naive["threads"])
    device = f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    import torch

    rows = []
    print(f"fwd+bwd, N={args.N} H={args.H} V={args.V} K={args.K} fp32, {naive['threads']} threads")
    print(f"{'provider':<9} {'median s':>9} {'p20 s':>8} {'p80 s':>8} {'peak MiB':>9} {'peak/naive':>10} "
          f"{'time/naive':>10} {'loss':>10}")
    for name, r in results.items():
        ts = r["times_s"]
        med = statistics.median(ts)
        peak_ratio = r["peak_bytes"] / max(naive["peak_bytes"], 1)
        time_ratio = med / statistics.median(naive["times_s"])
        print(f"{name:<9} {med:9.3f} {_quantile(ts, 0.2):8.3f} {_quantile(ts, 0.8):8.3f} "
              f"{r['peak_bytes'] / 2**20:9.1f} {peak_ratio:10.3f} {time_ratio:10.3f} {r['loss']:10.5f}")
        common = dict(kernel="fused_linear_sparse_kl_ce", provider=name, mode="full", x=args.N,
                      config=config, device=device, timestamp=stamp, version=torch.__version__)
        rows.append(dict(common, metric="time", unit="s", median=med, p20=_quantile(ts, 0.2),
                         p80=_quantile(ts, 0.8)))
        rows.append(dict(common, metric="peak_rss_delta", unit="MiB", median=r["peak_bytes"] / 2**20,
                         p20=None, p80=None))
    fused_ratio = results["fused"]["peak_bytes"] / max(naive["peak_bytes"], 1)
    verdict = "meets" if fused_ratio <= 0.25 else "MISSES"
    print(f"fused peak / naive peak = {fused_ratio:.3f} ({verdict} the <= 1/4 target)")
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        payload = dict(command="python -m specialize.benchmarks.bench_loss_cpu " + " ".join(argv or sys.argv[1:]),
                       memory_method="peak RSS delta: ru_maxrss high-water mark of a fresh spawned process "
                                     "after one fwd+bwd minus the mark after the inputs were built",
                       time_method="wall clock fwd+bwd, median/p20/p80 over repeats after one warm-up",
                       fused_over_naive_peak=fused_ratio,
                       fused_over_naive_time=statistics.median(results["fused"]["times_s"])
                       / statistics.median(naive["times_s"]),
                       rows=rows)
        out_path.write_text(json.dumps(payload, indent=1))
        print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
