"""One prepared GPU acceptance run (issue #14): every GPU figure of the project in <= 10 minutes on a bare
H100/H200, one summary table last, one JSON file.

    python3 benchmarks/gpu_check.py --install .whl --out benchmarks/results/gpu_check.json   # make gpu-check
    python3 benchmarks/gpu_check.py --dry --out /tmp/gpu_check_dry.json     # the same plumbing on a CPU

Stages, in order; each runs in its own process under its own time budget (seconds, `--budget NAME=S`),
and is skipped with a note when the run's total (`--total`) cannot cover it any more:
  install        the wheels from benchmarks/gpu_wheels.sh into a --target folder put on the path
                 (pip --no-index --no-deps; a wheel whose distribution is already there at that version
                 or newer is left out). The project itself is always imported from this checkout.
  env            GPU, memory, torch / Triton / CUDA / DeepSpeed versions; measured device-to-device copy
                 GB/s (read + written) and bf16 8192^3 matmul TFLOP/s: the ceilings later figures use
  kernel_tests   tests/test_sparse_kl_ce.py + tests/test_fused_linear_sparse_kl_ce.py with compiled
                 Triton on the GPU (TRITON_INTERPRET unset)
  kernel_checks  on fresh random inputs at V=32128: in-place vs separate-buffer gradient, bit for bit;
                 fp32 and bf16 loss/gradients vs the float64 reference (relative error ||out-ref||/||ref||)
  loss           bench_loss_gpu: sparse_kl_ce N=8192 V=32128 K=20 bf16 (median, p20/p80, GB/s, % of copy);
                 fused-linear vs naive PyTorch vs Liger at N=8192 H=4096 V=32128 (time, peak memory)
  engine_xl      bench_engine --mode gpu-xl (FlanT5-XL shapes, random init, bf16, ZeRO-2, 512->256, 20
                 steps, fused loss) vs HF Seq2SeqTrainer + DeepSpeed on the same batches
  teacher        bench_teacher --device cuda: the hf teacher (toy Llama shape, random init) sampling 512
                 questions in this process on cuda:0 and through a replica pool of one spawned copy on
                 cuda:0 (teacher.replicas' path), samples/s and whether the two wrote the same records
  engine_xxl     if time is left: bench_engine --mode gpu-xxl, a few steps (ZeRO-3 + offload, Adafactor)
--dry: CPU, Triton interpreter, toy sizes (a kernel-test subset, N=16 losses, the tiny engine world),
budgets in seconds; it measures nothing worth keeping and exists so that the suite runs this script
(tests/test_gpu_check.py). Exit status: 0 when no stage failed or ran out of its budget.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "gpu_check.json"


def source_path() -> Path:
    """A folder holding `specialize` -> this checkout, so `import specialize.*` needs no pip install (the
    project's pins, torch==2.13 among them, must not touch the GPU machine's packages)."""
    import hashlib
    tag = hashlib.sha1(str(REPO).encode()).hexdigest()[:10]  # one folder per checkout, stable across processes
    root = Path(tempfile.gettempdir()) / f"specialize-src-{os.getuid()}-{tag}"
    link = root / "specialize"
    root.mkdir(parents=True, exist_ok=True)
    if not (link.is_symlink() and Path(os.readlink(link)) == REPO):
        if link.is_symlink():
            link.unlink()
        link.symlink_to(REPO, target_is_directory=True)
    return root


# name -> (GPU budget s, dry budget s, least seconds worth starting with)
STAGES = {
    "install": (45, 60, 5),
    "env": (40, 60, 5),
    "kernel_tests": (120, 120, 20),
    "kernel_checks": (60, 60, 5),
    "loss": (75, 90, 10),
    "engine_xl": (240, 240, 90),
    "teacher": (45, 60, 15),
    "engine_xxl": (None, None, 90),  # None: whatever the total leaves
}
# 560 s: the whole run fits a 10-minute command slot with room for the start and the JSON
TOTAL = {"gpu": 560, "dry": 600}
OPTIONAL = {"engine_xxl"}  # "if time is left": running out of budget there is a figure, not a failure
RESERVE_S = 3  # kept back for the table and the JSON
# METHOD.md's yardsticks for ||out - ref|| / ||ref|| against float64: fp32 arithmetic lands far under
# 1e-3, bf16 operands between 1e-3 and 1e-2
REL_ERR_LIMIT = {"fp32": 1e-4, "bf16": 1e-2}
BW_TARGET = 0.80  # sparse_kl_ce fwd+bwd at >= 80 % of the measured copy bandwidth (issue #14)


# ----------------------------------------------------------------------------- workers (own processes)

def worker_env(out: Path, dry: bool) -> None:
    from importlib import metadata

    import torch

    from specialize.benchmarks.bench_loss_gpu import measure_bandwidth, measure_matmul_tflops
    cuda = torch.cuda.is_available()
    fig = {"python": platform.python_version(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda}
    for name in ("triton", "deepspeed", "transformers", "accelerate", "liger_kernel", "pydantic"):
        try:
            mod = __import__(name)
            fig[name] = getattr(mod, "__version__", None) or metadata.version(name.replace("_", "-"))
            fig[name + "_from"] = str(Path(mod.__file__).parent)
        except Exception as err:  # noqa: BLE001 (a missing or broken package is a figure, not a crash)
            fig[name] = f"missing ({type(err).__name__}: {err})"[:200]
    site = os.environ.get("SPECIALIZE_GPU_SITE")
    if site:
        fig["site"] = site
    if site:  # every top-level module the install stage put there, and where it is imported from now
        fig["site_imports"] = {}
        for entry in sorted(Path(site).iterdir()):
            name = entry.name[:-3] if entry.suffix == ".py" else entry.name
            if not name.isidentifier() or not (entry.suffix == ".py" or (entry / "__init__.py").is_file()):
                continue
            try:
                fig["site_imports"][name] = str(Path(__import__(name).__file__).resolve())
            except Exception as err:  # noqa: BLE001
                fig["site_imports"][name] = f"import failed: {type(err).__name__}: {err}"[:200]
    if cuda:
        p = torch.cuda.get_device_properties(0)
        fig.update(device=p.name, memory_gib=round(p.total_memory / 2 ** 30, 1), sms=p.multi_processor_count,
                   capability=f"{p.major}.{p.minor}", gpus=torch.cuda.device_count())
        try:
            fig["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            fig["driver"] = "nvidia-smi not available"
        fig["copy_gbs"] = measure_bandwidth("cuda", 2 ** 31)
        fig["matmul_tflops"] = measure_matmul_tflops("cuda", 8192, "bf16")
        fig["matmul_dtype"] = "bf16"
    else:
        fig.update(device=f"cpu {platform.machine()} x{os.cpu_count()}", memory_gib=None)
        fig["copy_gbs"] = measure_bandwidth("cpu", 2 ** 25)
        fig["matmul_tflops"] = measure_matmul_tflops("cpu", 256, "fp32")
        fig["matmul_dtype"] = "fp32"
    out.write_text(json.dumps(fig))


def _rel_err(out, ref) -> float:
    out, ref = out.detach().double().cpu().reshape(-1), ref.detach().double().cpu().reshape(-1)
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def worker_kernel_checks(out: Path, dry: bool) -> None:
    """Fresh random inputs (a new seed each run, recorded): bitwise in-place check and float64 errors."""
    import torch
    sys.path.insert(0, str(REPO / "tests"))
    from kernel_reference import (
        TRITON_DEVICE,
        in_place_matches_out_of_place,
        make_inputs,
        reference_linear,
        reference_loss,
    )

    from specialize.kernels import fused_linear_sparse_kl_ce, sparse_kl_ce
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    dev = TRITON_DEVICE
    N, V, K, H = (8, 300, 20, 16) if dry else (256, 32128, 20, 512)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    fig = {"seed": seed, "device": dev, "N": N, "V": V, "K": K, "H": H, "in_place": [], "rel_err": []}
    rows = dict(ignore_rows=[1], no_teacher_rows=[N - 1], padded_rows=[0], one_hot_rows=[2])
    # V = 32768 + 77 makes each program loop over two blocks of its row
    for v in (V, 300 if dry else 32768 + 77):
        for name, dt in dtypes.items():
            for tail in ("none", "tail"):
                logits, ids, lp, target = make_inputs(N, v, K, dt, device=dev, **rows)
                equal, differ = in_place_matches_out_of_place(logits, ids, lp, target, alpha=0.5,
                                                              temperature=1.5, tail=tail)
                fig["in_place"].append(dict(dtype=name, V=v, tail=tail, bitwise_equal=equal, differ=differ))
    # The float64 references run on the host, row by row, and their backward grows with rows squared
    # (27 s at 256 rows, 0.5 s at 64, one thread): 64 rows keep the eight of them within the budget.
    N = min(N, 64)
    rows = dict(ignore_rows=[1], no_teacher_rows=[N - 1], padded_rows=[0], one_hot_rows=[2])
    fig["N_float64"] = N
    for name, dt in dtypes.items():
        for tail in ("none", "tail"):
            kw = dict(alpha=0.5, temperature=1.5, tail=tail)
            logits, ids, lp, target = make_inputs(N, V, K, dt, device=dev, **rows)
            x = logits.clone().requires_grad_()
            loss = sparse_kl_ce(x, ids, lp, target, backend="triton", **kw)
            loss.backward()
            x64 = logits.double().cpu().requires_grad_()
            ref = reference_loss(x64, ids.cpu(), lp.cpu(), target.cpu(), **kw)[0]
            ref.backward()
            fig["rel_err"].append(dict(kernel="sparse_kl_ce", dtype=name, tail=tail, loss=_rel_err(loss, ref),
                                       grad=_rel_err(x.grad, x64.grad), limit=REL_ERR_LIMIT[name]))
            h = torch.randn(N, H, device=dev).to(dt).requires_grad_()
            w = (torch.randn(V, H, device=dev) * H ** -0.5 * 4).to(dt).requires_grad_()
            loss = fused_linear_sparse_kl_ce(h, w, ids, lp, target, backend="triton", **kw)
            loss.backward()
            h64 = h.detach().double().cpu().requires_grad_()
            w64 = w.detach().double().cpu().requires_grad_()
            ref = reference_linear(h64, w64, 1.0, ids.cpu(), lp.cpu(), target.cpu(), **kw)[0]
            ref.backward()
            fig["rel_err"].append(dict(kernel="fused_linear_sparse_kl_ce", dtype=name, tail=tail,
                                       loss=_rel_err(loss, ref), grad_h=_rel_err(h.grad, h64.grad),
                                       grad_w=_rel_err(w.grad, w64.grad), limit=REL_ERR_LIMIT[name]))
    out.write_text(json.dumps(fig))


ERROR_KEYS = ("loss", "grad", "grad_h", "grad_w")


def kernel_check_failures(fig: dict) -> list[str]:
    """What of worker_kernel_checks' figures misses its bar (NaN misses every bar)."""
    bad = [f"in-place != separate buffer: {r['dtype']} V={r['V']} tail={r['tail']} ({r['differ']} elements)"
           for r in fig["in_place"] if not r["bitwise_equal"]]
    for r in fig["rel_err"]:
        bad += [f"{r['kernel']} {r['dtype']} tail={r['tail']} {k}: {v:.2e} > {r['limit']:.0e}"
                for k, v in r.items() if k in ERROR_KEYS and not v <= r["limit"]]
    return bad


WORKERS = {"env": worker_env, "kernel_checks": worker_kernel_checks}


# ----------------------------------------------------------------------------- running a stage

class Run:
    def __init__(self, dry: bool, total: float, budgets: dict, work: Path, site: Path | None):
        self.dry, self.total, self.budgets, self.work, self.site = dry, total, budgets, work, site
        self.t0 = time.monotonic()
        self.stages: list[dict] = []
        self.on_stage = None  # called after each stage: the JSON is rewritten, so a later crash keeps it

    def left(self) -> float:
        return self.total - (time.monotonic() - self.t0) - RESERVE_S

    def env(self) -> dict:
        env = dict(os.environ)
        paths = [str(source_path())] + ([str(self.site)] if self.site else [])
        if self.site:
            env["SPECIALIZE_GPU_SITE"] = str(self.site)
        env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        if self.dry:
            env["TRITON_INTERPRET"] = "1"
        else:  # compiled kernels: an interpreter flag left in the shell would hide them
            env.pop("TRITON_INTERPRET", None)
        return env

    def stage(self, name: str, fn) -> dict:
        gpu_b, dry_b, least = STAGES[name]
        budget = self.budgets.get(name, dry_b if self.dry else gpu_b)
        left = self.left()
        budget = left if budget is None else min(budget, left)
        rec = dict(stage=name, status="skipped", seconds=0.0, budget_s=round(max(budget, 0), 1), figures={})
        print(f"\n=== {name}: budget {max(budget, 0):.0f} s ({max(left, 0):.0f} s left of the {self.total:.0f} s run)",
              flush=True)
        if budget < least:
            why = (f"its budget is {budget:.0f} s" if budget < left
                   else f"{max(left, 0):.0f} s left of the {self.total:.0f} s run")
            rec["note"] = f"skipped: {why}, the stage needs at least {least} s"
            print(rec["note"])
        else:
            t = time.monotonic()
            try:
                rec.update(fn(budget))
            except Exception as err:  # noqa: BLE001 (one broken stage must not cost the table)
                rec.update(status="failed", note=f"{type(err).__name__}: {err}"[:800])
            rec["seconds"] = round(time.monotonic() - t, 1)
            note = f" ({rec['note']})" if rec.get("note") else ""
            print(f"--- {name}: {rec['status']} in {rec['seconds']:.0f} s" + note,
                  flush=True)
        self.stages.append(rec)
        if self.on_stage is not None:
            self.on_stage()
        return rec

    def child(self, name: str, cmd: list[str], budget: float) -> tuple[str, str]:
        """Run cmd in its own session under `budget` seconds; returns (status, output tail). Past the budget
        the whole process group (the engine's ranks and the HF worker too) is killed."""
        log = self.work / f"{name}.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, cwd=REPO, env=self.env(), stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=budget)
                status = "ok" if rc == 0 else f"exit {rc}"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                status = "timeout"
            except KeyboardInterrupt:  # its own session would outlive us: take it down first
                os.killpg(proc.pid, signal.SIGKILL)
                raise
        tail = log.read_text(errors="replace")[-6000:]
        print("\n".join(tail.splitlines()[-25:]))
        return status, tail

    def worker(self, name: str, budget: float) -> dict:
        out = self.work / f"{name}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--worker-out", str(out)]
        status, tail = self.child(name, cmd + (["--dry"] if self.dry else []), budget)
        if status != "ok" or not out.is_file():
            return dict(status="timeout" if status == "timeout" else "failed", note=_last_error(tail, status))
        return dict(status="ok", figures=json.loads(out.read_text()))


def _last_error(tail: str, status: str) -> str:
    lines = [x for x in tail.splitlines() if x.strip()]
    return f"{status}: " + " | ".join(lines[-3:])[-600:] if lines else status


# ----------------------------------------------------------------------------- stages

def stage_install(run: Run, wheels: Path):
    def go(budget):
        from importlib import metadata

        from packaging.version import Version
        files = sorted(wheels.glob("*.whl"))
        if not files:
            return dict(status="failed", note=f"no wheels in {wheels} (build them with benchmarks/gpu_wheels.sh)")
        todo, kept = [], []
        for f in files:
            dist, version = f.name.split("-")[:2]
            try:
                have = metadata.version(dist.replace("_", "-"))
                if Version(have) >= Version(version):
                    kept.append(f"{dist} {have}")
                    continue
            except metadata.PackageNotFoundError:
                pass
            todo.append(f)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(run.site)] + [str(f) for f in todo]
        status, tail = run.child("install", cmd, budget) if todo else ("ok", "")
        if status != "ok":
            return dict(status="timeout" if status == "timeout" else "failed", note=_last_error(tail, status))
        sys.path.insert(0, str(run.site))
        return dict(status="ok", figures=dict(site=str(run.site), installed=[f.name for f in todo],
                                              already_there=kept,
                                              wheels_mib=round(sum(f.stat().st_size for f in files) / 2 ** 20, 2)))
    return go


def stage_kernel_tests(run: Run):
    def go(budget):
        import xml.etree.ElementTree as ET
        junit = run.work / "kernel_tests.xml"
        cmd = [sys.executable, "-m", "pytest", "tests/test_sparse_kl_ce.py", "tests/test_fused_linear_sparse_kl_ce.py",
               "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
        if run.dry:  # a subset that still goes through the Triton path end to end
            cmd += ["-k", "(in_place_gradient and 9-1423) or grad_buffer_fully_written or "
                          "(same_as_sparse_kl_ce and triton)"]
        else:
            try:  # pytest-xdist: Triton's compilations are CPU-bound and run in parallel across workers
                import xdist  # noqa: F401
                cmd += ["-n", str(min(8, os.cpu_count() or 1))]
            except ImportError:
                pass
        status, tail = run.child("kernel_tests", cmd, budget)
        fig = {"triton": "interpreter (CPU)" if run.dry else "compiled (GPU)", "command": " ".join(cmd[1:])}
        if junit.is_file():
            suites = ET.parse(junit).getroot()
            suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
            n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                      if c.find("failure") is not None or c.find("error") is not None]
            fig.update(passed=n["tests"] - n["failures"] - n["errors"] - n["skipped"], failed=n["failures"],
                       errors=n["errors"], skipped=n["skipped"], first_failures=failed[:5])
        else:  # stopped at its budget: pytest wrote no report, so count its progress characters
            import re
            marks = "".join(m.group(1) for m in re.finditer(r"^([.FEsx]+)(?:\s+\[\s*\d+%\])?$", tail, re.M))
            fig.update(passed=marks.count("."), failed=marks.count("F"), errors=marks.count("E"),
                       skipped=marks.count("s") + marks.count("x"), first_failures=[],
                       counted="from the progress output (the run was stopped)")
        if status == "ok":
            return dict(status="ok", figures=fig)
        return dict(status="timeout" if status == "timeout" else "failed", figures=fig,
                    note=_last_error(tail, status))
    return go


def stage_kernel_checks(run: Run):
    def go(budget):
        rec = run.worker("kernel_checks", budget)
        failures = kernel_check_failures(rec["figures"]) if rec["status"] == "ok" else []
        if failures:
            rec.update(status="failed", note=f"{len(failures)} checks failed")
        return rec
    return go


def stage_loss(run: Run):
    def go(budget):
        out = run.work / "loss_gpu.json"
        cmd = [sys.executable, "-m", "specialize.benchmarks.bench_loss_gpu", "--out", str(out)]
        status, tail = run.child("loss", cmd + (["--dry"] if run.dry else []), budget)
        if status != "ok" or not out.is_file():
            return dict(status="timeout" if status == "timeout" else "failed", note=_last_error(tail, status))
        return dict(status="ok", figures=json.loads(out.read_text()))
    return go


def stage_teacher(run: Run):
    def go(budget):
        out = run.work / "teacher.json"
        args = (["--device", "cpu", "--questions", "16", "--max-tokens", "8"] if run.dry
                else ["--device", "cuda", "--questions", "512"])
        cmd = [sys.executable, "-m", "specialize.benchmarks.bench_teacher", *args, "--replicas", "1", "--out", str(out)]
        status, tail = run.child("teacher", cmd, budget)
        figures = json.loads(out.read_text()) if out.is_file() else {}
        if status == "ok":
            return dict(status="ok", figures=figures)
        # bench_teacher exits 1 when a provider's records differ from the one copy's; its rows say which
        return dict(status="timeout" if status == "timeout" else "failed", figures=figures,
                    note=_last_error(tail, status))
    return go


def stage_engine(run: Run, name: str, args: list[str]):
    def go(budget):
        out = run.work / name
        out.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "specialize.benchmarks.bench_engine", *args, "--out", str(out)]
        status, tail = run.child(name, cmd, budget)
        found = sorted(out.glob("engine_*.json"))
        payload = json.loads(found[0].read_text()) if found else {"rows": []}
        payload["command"] = "python -m specialize.benchmarks.bench_engine " + " ".join(args)
        if status == "ok":
            return dict(status="ok", figures=payload)
        # bench_engine exits 1 when a row failed; its rows still say which and why
        return dict(status="timeout" if status == "timeout" else "failed", figures=payload,
                    note=_last_error(tail, status))
    return go


# ----------------------------------------------------------------------------- the summary

def summary_lines(rec: dict) -> list[str]:
    """Each stage's figures as short lines: what the table shows (the JSON keeps everything)."""
    try:
        lines = _figure_lines(rec)
    except Exception as err:  # noqa: BLE001 (a partial result must not cost the table)
        lines = [f"(figures incomplete, see the JSON: {type(err).__name__}: {err})"[:200]]
    if rec.get("note"):
        lines.append(rec["note"][:300])
    return lines or ["-"]


def _figure_lines(rec: dict) -> list[str]:
    f, name = rec.get("figures") or {}, rec["stage"]
    lines = []
    if name == "install" and f:
        lines.append(f"{len(f['installed'])} of {len(f['installed']) + len(f['already_there'])} wheels "
                     f"({f['wheels_mib']} MiB in the set) into {f['site']}")
        lines.append(f"already there: {', '.join(f['already_there']) or '-'}")
    elif name == "env" and f:
        lines.append(f"{f['device']}" + (f", {f['memory_gib']} GiB" if f.get("memory_gib") else "")
                     + f"; torch {f['torch']}, triton {f['triton']}, CUDA {f['cuda_runtime']}")
        lines.append(f"deepspeed {f['deepspeed']}; liger {f['liger_kernel']}")
        if "site_imports" in f:
            own = sorted(k for k, v in f["site_imports"].items() if v.startswith(str(Path(f["site"]).resolve())))
            other = sorted(set(f["site_imports"]) - set(own))
            lines.append(f"from {f['site']}: {', '.join(own) or 'nothing'}"
                         + (f"; NOT from there: {', '.join(other)}" if other else ""))
        lines.append(f"copy {f['copy_gbs']:.0f} GB/s (read + written); {f['matmul_dtype']} matmul "
                     f"{f['matmul_tflops']:.1f} TFLOP/s")
    elif name == "kernel_tests" and "passed" in f:
        lines.append(f"{f['passed']} passed, {f['failed']} failed, {f['errors']} errors, {f['skipped']} skipped "
                     f"({f['triton']})")
        lines += [f"FAILED {x}" for x in f["first_failures"]]
    elif name == "kernel_checks" and f:
        eq = sum(r["bitwise_equal"] for r in f["in_place"])
        lines.append(f"in-place == separate-buffer gradient, bitwise: {eq}/{len(f['in_place'])} "
                     f"(on {f['device']}, seed {f['seed']}, N={f['N']} V={f['V']})")
        for dt in REL_ERR_LIMIT:
            errs = [v for r in f["rel_err"] if r["dtype"] == dt for k, v in r.items() if k in ERROR_KEYS]
            worst = float("nan") if any(e != e for e in errs) else max(errs, default=float("nan"))
            lines.append(f"{dt} vs float64: worst ||out-ref||/||ref|| {worst:.2e} (limit {REL_ERR_LIMIT[dt]:.0e})")
        lines += [f"FAILED {x}" for x in kernel_check_failures(f)[:5]]
    elif name == "loss" and f.get("rows"):
        rows = f["rows"]
        get = lambda **k: next((r for r in rows if all(r.get(a) == b for a, b in k.items())), None)  # noqa: E731
        copy = get(kernel="device_copy")
        full = get(kernel="sparse_kl_ce", mode="full", metric="time")
        pct = get(kernel="sparse_kl_ce", mode="full", metric="pct_of_copy_bandwidth")
        gbs = get(kernel="sparse_kl_ce", mode="full", metric="bandwidth")
        c = full["config"]
        lines.append(f"sparse_kl_ce N={c['N']} V={c['V']} K={c['K']} {c['dtype']} fwd+bwd {full['median']:.3f} ms "
                     f"[p20 {full['p20']:.3f}, p80 {full['p80']:.3f}], {gbs['median']:.0f} GB/s = "
                     f"{pct['median']:.1f}% of copy {copy['median']:.0f} GB/s"
                     + ("" if f.get("dry") else f" (target >= {100 * BW_TARGET:.0f}%: "
                                              f"{'met' if pct['median'] >= 100 * BW_TARGET else 'NOT met'})"))
        for r in rows:
            if r["kernel"] != "fused_linear_sparse_kl_ce":
                continue
            if r["metric"] == "time":
                peak = get(kernel=r["kernel"], provider=r["provider"], metric="peak_memory_above_inputs")
                mem = f", peak {peak['median']:.0f} MiB" if peak and peak["median"] is not None else ""
                lines.append(f"{r['provider']} (N={c['N']} H={c['H']}): {r['median']:.2f} ms "
                             f"[p20 {r['p20']:.2f}, p80 {r['p80']:.2f}]{mem}")
            elif r["metric"] == "unavailable":
                lines.append(f"{r['provider']}: {r['note']}")
    elif name == "teacher" and f.get("rows"):
        for r in f["rows"]:
            lines.append(f"{r['provider']} on {f.get('gpu', r['device'])}: {r['samples_per_s']:.0f} samples/s "
                         f"({r['samples']} in {r['seconds']:.1f} s, {r.get('start_up_s', 0):.1f} s of it start-up), "
                         f"records equal to one copy's: {r['records_equal_one_copy']}")
    elif name.startswith("engine") and f.get("rows") is not None:
        from specialize.benchmarks.bench_engine import verdicts
        rows = f["rows"]
        for r in rows:
            if r.get("error"):
                lines.append(f"{r['provider']} ({r['loss']}): failed: {r['error'][:200]}")
                continue
            mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
            vs = f", {r['speedup_vs_hf']:.2f}x HF" if r.get("speedup_vs_hf") else ""
            lines.append(f"{r['provider']} ({r['loss']}, ZeRO-{r['zero']}): {r['tokens_per_s_per_gpu']:.0f} tokens/s"
                         f"{mfu}, GPU/rank peak {r['peak_mem_gb']:.2f} GiB, host {r.get('peak_host_rss_gb', 0):.1f} GiB{vs}")
            if r.get("mfu") and r.get("peak_tflops") and rec.get("matmul_tflops"):
                # the same work over the matmul rate measured in the env stage, beside the datasheet MFU
                lines.append(f"  = {100 * r['mfu'] * r['peak_tflops'] / rec['matmul_tflops']:.1f}% of the measured "
                             f"matmul rate {rec['matmul_tflops']:.3g} TFLOP/s (MFU uses {r['peak_tflops']:.3g})")
        if rows:
            r0 = rows[0]
            lines.insert(0, f"{r0['model']} {r0['precision']}, micro-batch {r0['micro_batch']}, "
                            f"seq {r0['src_len']}->{r0['tgt_len']}, {r0['steps']} steps")
            lines += verdicts(r0["mode"], rows)
    return lines


def format_table(stages: list[dict]) -> str:
    out = [f"{'stage':<14}{'status':<10}{'s / budget':>12}  figures", "-" * 100]
    for rec in stages:
        lines = summary_lines(rec)
        used = f"{rec['seconds']:.0f}/{rec['budget_s']:.0f}"
        out.append(f"{rec['stage']:<14}{rec['status']:<10}{used:>12}  {lines[0]}")
        out += [f"{'':<36}  {x}" for x in lines[1:]]
    return "\n".join(out)


def commit() -> str:
    if os.environ.get("SPECIALIZE_COMMIT"):  # a copied tree without .git (a lent GPU machine)
        return os.environ["SPECIALIZE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown (no git checkout)"
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"


# ----------------------------------------------------------------------------- main

def parse_args(argv):
    ap = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="CPU, Triton interpreter, toy sizes (the suite's mode)")
    ap.add_argument("--install", type=Path, default=None, metavar="WHEELS",
                    help="folder of wheels (benchmarks/gpu_wheels.sh) to install with pip --no-index --no-deps --target")
    ap.add_argument("--site", type=Path, default=Path(tempfile.gettempdir()) / "specialize-gpu-site",
                    help="the --target folder for --install (default %(default)s)")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"JSON file (default {RESULTS.relative_to(REPO)}; --dry: a temp file)")
    ap.add_argument("--total", type=float, default=None, help="seconds for the whole run (default 600)")
    ap.add_argument("--budget", action="append", default=[], metavar="STAGE=SECONDS",
                    help=f"a stage's budget ({', '.join(STAGES)}); 0 skips it")
    ap.add_argument("--xxl-steps", type=int, default=4, help="steps of the optional gpu-xxl stage")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    budgets = {}
    for item in args.budget:
        name, _, secs = item.partition("=")
        if name not in STAGES or not secs:
            ap.error(f"--budget {item!r}: want STAGE=SECONDS with STAGE one of {', '.join(STAGES)}")
        budgets[name] = float(secs)
    args.budgets = budgets
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    sys.path.insert(0, str(source_path()))
    if args.worker:
        if args.dry:
            os.environ.setdefault("TRITON_INTERPRET", "1")
        WORKERS[args.worker](args.worker_out, args.dry)
        return 0
    if not args.dry:
        import torch
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA GPU is visible here, nothing was run (--dry runs the same stages on the "
                  "CPU at toy sizes)", file=sys.stderr)
            return 2
    out = args.out or (Path(tempfile.gettempdir()) / "gpu_check_dry.json" if args.dry else RESULTS)
    total = args.total or TOTAL["dry" if args.dry else "gpu"]
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory(prefix="specialize-gpu-check-") as work:
        run = Run(args.dry, total, args.budgets, Path(work), args.site if args.install else None)

        def save(complete: bool) -> None:
            env_fig = next((r["figures"] for r in run.stages if r["stage"] == "env" and r["status"] == "ok"), {})
            for r in run.stages:
                if r["stage"].startswith("engine") and env_fig.get("matmul_tflops"):
                    r["matmul_tflops"] = env_fig["matmul_tflops"]
            payload = dict(command="python3 benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
                           dry=args.dry, started=started, commit=commit(), total_budget_s=total,
                           wall_s=round(time.monotonic() - run.t0, 1), load_avg_1m=os.getloadavg()[0],
                           complete=complete, stages=run.stages,
                           summary={r["stage"]: summary_lines(r) for r in run.stages})
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(json.dumps(payload, indent=1))
            tmp.replace(out)
        # after every stage: a stage that takes the machine down (the optional xxl one may run out of
        # host memory) leaves the figures of the stages before it
        run.on_stage = lambda: save(False)
        print(f"gpu_check{' --dry' if args.dry else ''}: {total:.0f} s in all, checkout {REPO} at {commit()}")
        if args.install:
            run.stage("install", stage_install(run, args.install))
        run.stage("env", lambda b: run.worker("env", b))
        run.stage("kernel_tests", stage_kernel_tests(run))
        run.stage("kernel_checks", stage_kernel_checks(run))
        run.stage("loss", stage_loss(run))
        if args.dry:  # the tiny CPU world stands in for both engine modes
            xl = ["--mode", "cpu", "--quick", "--fused-only"]
            xxl = ["--mode", "cpu", "--quick", "--zero", "3", "--no-hf", "--steps", "2"]
        else:
            xl = ["--mode", "gpu-xl", "--steps", "20", "--fused-only"]
            xxl = ["--mode", "gpu-xxl", "--steps", str(args.xxl_steps)]
        run.stage("engine_xl", stage_engine(run, "engine_xl", xl))
        run.stage("teacher", stage_teacher(run))
        run.stage("engine_xxl", stage_engine(run, "engine_xxl", xxl))
        save(True)
        wall = time.monotonic() - run.t0
    bad = [r["stage"] for r in run.stages if r["status"] == "failed"
           or (r["status"] == "timeout" and r["stage"] not in OPTIONAL)]
    print(f"\nwrote {out}")
    print(f"\ngpu_check summary ({'dry run on the CPU: plumbing only, no figure to keep; ' if args.dry else ''}"
          f"{wall:.0f} s of {total:.0f} s)")
    print(format_table(run.stages))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
