"""benchmarks/gpu_check.py, the one-command GPU acceptance run, in its --dry form on the CPU (the Triton
interpreter, toy sizes): every stage runs through the same plumbing it uses on a GPU, so the script
cannot rot while no GPU is around. No figure is judged here (no timed asserts), only that each stage
ran, reported what it measured, and that the table comes last."""
import base64
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from specialize.benchmarks import gpu_check

REPO = Path(__file__).resolve().parents[1]
ORDER = ["install", "env", "kernel_tests", "kernel_checks", "loss", "engine_xl", "teacher", "engine_xxl"]


def write_wheel(folder: Path, dist: str, version: str, module: str | None = None) -> Path:
    """A real (minimal, PEP 427) wheel: optional top-level module, METADATA, WHEEL and a hashed RECORD."""
    info = f"{dist}-{version}.dist-info"
    files = {f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    if module is not None:
        files[f"{dist}/__init__.py"] = module
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join(record + [f"{info}/RECORD,,"]) + "\n"
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return path


def run_check(*args, timeout=900):
    return subprocess.run([sys.executable, "benchmarks/gpu_check.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_dry_run_every_stage_json_and_table(tmp_path):
    import tqdm
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    probe = write_wheel(wheels, "gpucheck_probe", "0.1", "ANSWER = 42\n")
    write_wheel(wheels, "tqdm", tqdm.__version__)  # already installed at that version: must be left out
    site, out = tmp_path / "site", tmp_path / "gpu_check.json"
    proc = run_check("--dry", "--install", str(wheels), "--site", str(site), "--out", str(out),
                     "--budget", "engine_xxl=0")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    payload = json.loads(out.read_text())
    assert payload["dry"] is True and payload["wall_s"] <= payload["total_budget_s"]
    by = {r["stage"]: r for r in payload["stages"]}
    assert [r["stage"] for r in payload["stages"]] == ORDER
    for name in ORDER[:-1]:
        assert by[name]["status"] == "ok", (name, by[name].get("note"))
        assert 0 < by[name]["seconds"] <= by[name]["budget_s"] + 5

    inst = by["install"]["figures"]
    assert inst["installed"] == [probe.name] and inst["already_there"] == [f"tqdm {tqdm.__version__}"]
    env = by["env"]["figures"]
    # the stages' processes import what the install stage put in the --target folder
    assert env["site_imports"]["gpucheck_probe"].startswith(str(site.resolve()))
    assert env["copy_gbs"] > 0 and env["matmul_tflops"] > 0 and env["torch"]

    tests = by["kernel_tests"]["figures"]
    assert tests["passed"] >= 5 and tests["failed"] == tests["errors"] == 0
    assert tests["triton"] == "interpreter (CPU)"

    checks = by["kernel_checks"]["figures"]
    assert checks["in_place"] and all(r["bitwise_equal"] for r in checks["in_place"])
    assert {r["dtype"] for r in checks["rel_err"]} == {"fp32", "bf16"}
    for r in checks["rel_err"]:
        errs = [v for k, v in r.items() if k in ("loss", "grad", "grad_h", "grad_w")]
        assert errs and all(0 <= e <= r["limit"] for e in errs), r

    rows = by["loss"]["figures"]["rows"]
    full = [r for r in rows if r["kernel"] == "sparse_kl_ce" and r["mode"] == "full" and r["metric"] == "time"]
    assert full and full[0]["median"] > 0 and full[0]["p20"] <= full[0]["p80"]
    providers = {r["provider"] for r in rows if r["kernel"] == "fused_linear_sparse_kl_ce"}
    assert {"naive_torch", "specialize_fused", "liger_flce_ce_only"} <= providers
    liger = [r for r in rows if r["provider"] == "liger_flce_ce_only"]
    assert any(r["metric"] == "time" for r in liger) or "not importable" in liger[0]["note"]

    eng = {r["provider"]: r for r in by["engine_xl"]["figures"]["rows"]}
    assert set(eng) == {"specialize", "hf-seq2seq+deepspeed"}
    assert all("error" not in r and r["tokens_per_s_per_gpu"] > 0 for r in eng.values())

    teacher = {r["provider"]: r for r in by["teacher"]["figures"]["rows"]}
    # one copy in the stage's process and a spawned pool of one, on the same device, write the same records
    assert set(teacher) == {"one copy", "1 replica"} and all(r["records_equal_one_copy"] for r in teacher.values())
    assert all(r["samples"] == 16 and r["samples_per_s"] > 0 for r in teacher.values())
    assert any("1 replica on cpu" in line for line in payload["summary"]["teacher"])

    xxl = by["engine_xxl"]
    assert xxl["status"] == "skipped" and "budget is 0 s" in xxl["note"]

    # the table is the last thing printed, one row per stage, in order
    tail = proc.stdout[proc.stdout.rindex("gpu_check summary"):].splitlines()
    starts = [next(i for i, line in enumerate(tail) if line.startswith(name)) for name in ORDER]
    assert starts == sorted(starts) and tail[1].startswith("stage")
    assert payload["summary"]["engine_xl"][0].startswith("tiny fp32")


def test_spent_total_skips_every_stage_but_still_writes_the_table(tmp_path):
    out = tmp_path / "gc.json"
    proc = run_check("--dry", "--total", "4", "--out", str(out), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stages = json.loads(out.read_text())["stages"]
    assert [r["stage"] for r in stages] == ORDER[1:]  # no --install, no install stage
    assert all(r["status"] == "skipped" and "left of the 4 s run" in r["note"] for r in stages)
    assert "engine_xxl" in proc.stdout.splitlines()[-1]


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"  # a zombie is gone
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_stage_past_its_budget_is_killed_with_its_children(tmp_path):
    import time
    run = gpu_check.Run(dry=True, total=60, budgets={}, work=tmp_path, site=None)
    # a shell that starts a child sleeper (as bench_engine starts ranks): both must go at the budget
    cmd = ["bash", "-c", f"sleep 60 & echo $! > {tmp_path}/child.pid; wait"]
    t0 = time.monotonic()
    status, _ = run.child("sleeper", cmd, budget=2)
    assert status == "timeout" and time.monotonic() - t0 < 30
    pid = int((tmp_path / "child.pid").read_text())
    for _ in range(50):
        if not _running(pid):
            break
        time.sleep(0.1)
    assert not _running(pid), "the stage's child process outlived the stage"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message shown without CUDA")
def test_without_cuda_only_dry_runs(capsys):
    assert gpu_check.main(["--out", "/nonexistent/never-written.json"]) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err


def test_bad_budget_is_refused():
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--budget", "nope=3"])


def test_kernel_check_failures_catch_bit_differences_errors_and_nan():
    good = dict(in_place=[dict(dtype="bf16", V=300, tail="none", bitwise_equal=True, differ=0)],
                rel_err=[dict(kernel="sparse_kl_ce", dtype="bf16", tail="none", loss=1e-6, grad=4e-3, limit=1e-2)])
    assert gpu_check.kernel_check_failures(good) == []
    bad = json.loads(json.dumps(good))
    bad["in_place"][0].update(bitwise_equal=False, differ=3)
    bad["rel_err"].append(dict(kernel="fused_linear_sparse_kl_ce", dtype="fp32", tail="tail", loss=float("nan"),
                               grad_h=2e-4, grad_w=1e-7, limit=1e-4))
    found = gpu_check.kernel_check_failures(bad)
    assert len(found) == 3 and "3 elements" in found[0]
    assert any("loss: nan" in x for x in found) and any("grad_h" in x for x in found)


def test_gpu_shaped_figures_give_targets_in_the_table():
    """The lines only a GPU run produces: the bandwidth target and bench_engine's gpu-xl verdicts."""
    cfg = dict(N=8192, H=4096, V=32128, K=20, dtype="bf16")
    loss_rows = [dict(kernel="device_copy", provider="torch", mode="full", metric="bandwidth", median=4300.0),
                 dict(kernel="sparse_kl_ce", mode="full", metric="time", median=0.5, p20=0.49, p80=0.52, config=cfg),
                 dict(kernel="sparse_kl_ce", mode="full", metric="bandwidth", median=3600.0),
                 dict(kernel="sparse_kl_ce", mode="full", metric="pct_of_copy_bandwidth", median=83.7),
                 dict(kernel="fused_linear_sparse_kl_ce", provider="liger_flce_ce_only", mode="full",
                      metric="unavailable", median=None, note="not importable (No module named 'liger_kernel')")]
    lines = gpu_check.summary_lines(dict(stage="loss", status="ok", figures=dict(rows=loss_rows)))
    assert "83.7% of copy 4300 GB/s (target >= 80%: met)" in lines[0]
    assert lines[1].startswith("liger_flce_ce_only: not importable")
    base = dict(mode="gpu-xl", model="flan-t5-xl", precision="bf16", micro_batch=4, src_len=512, tgt_len=256,
                steps=20, zero=2, peak_mem_gb=60.0, peak_host_rss_gb=20.0, peak_tflops=989.0)
    rows = [dict(base, provider="specialize", loss="dm fused", tokens_per_s_per_gpu=9000.0, mfu=0.35,
                 speedup_vs_hf=1.4),
            dict(base, provider="hf-seq2seq+deepspeed", loss="ce (full logits)", tokens_per_s_per_gpu=6400.0,
                 mfu=0.25)]
    lines = gpu_check.summary_lines(dict(stage="engine_xl", status="ok", figures=dict(rows=rows),
                                         matmul_tflops=790.0))
    assert lines[0] == "flan-t5-xl bf16, micro-batch 4, seq 512->256, 20 steps"
    assert "43.8% of the measured matmul rate 790 TFLOP/s" in "\n".join(lines)
    assert "target MFU >= 40%: 35.0% (NOT met)" in lines and "target >= 1.3x HF tokens/s: 1.40x (met)" in lines
    teacher = dict(gpu="NVIDIA H200", rows=[
        dict(provider="one copy", device="cuda", samples=512, seconds=3.1, start_up_s=0.9, samples_per_s=165.2,
             records_equal_one_copy=True),
        dict(provider="1 replica", device="cuda", samples=512, seconds=14.0, start_up_s=11.5, samples_per_s=36.6,
             records_equal_one_copy=False)])
    lines = gpu_check.summary_lines(dict(stage="teacher", status="failed", figures=teacher, note="exit 1: ..."))
    assert lines[0] == ("one copy on NVIDIA H200: 165 samples/s (512 in 3.1 s, 0.9 s of it start-up), "
                        "records equal to one copy's: True")
    assert lines[1].endswith("records equal to one copy's: False") and lines[2] == "exit 1: ..."
