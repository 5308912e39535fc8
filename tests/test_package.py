"""The installed package: one `specialize.*` namespace, no top-level `kernels`, a working CLI."""
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_namespace_maps_the_folders():
    for name, folder in [("specialize.engine", "engine"), ("specialize.kernels", "kernels"),
                         ("specialize.aligner", "aligner"), ("specialize.benchmarks", "benchmarks")]:
        module = importlib.import_module(name)
        assert Path(module.__file__).resolve().parent == (REPO / folder).resolve()


def test_top_level_kernels_is_not_this_project():
    # Run from a neutral directory so the repo root is not on sys.path.
    code = ("import importlib.util, sys; s = importlib.util.find_spec('kernels'); "
            "print(s.origin if s and s.origin else (list(s.submodule_search_locations) if s else None))")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    assert str(REPO / "kernels") not in out.stdout, out.stdout


def _stand_in_hf_kernels(folder: Path) -> None:
    """An installed `kernels` distribution at a version transformers accepts, with the names it imports."""
    from transformers.utils.import_utils import KERNELS_MIN_VERSION
    pkg, info = folder / "kernels", folder / f"kernels-{KERNELS_MIN_VERSION}.dist-info"
    pkg.mkdir(parents=True)
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kernels\nVersion: {KERNELS_MIN_VERSION}\n")
    (info / "top_level.txt").write_text("kernels\n")
    names = ["CUDAProperties", "Device", "KernelizeFallback", "LayerRepository", "LocalLayerRepository", "Mode",
             "ROCMProperties"]
    funcs = ["register_kernel_mapping", "replace_kernel_forward_from_hub", "use_kernel_mapping", "get_kernel",
             "kernelize", "use_kernel_forward_from_hub", "use_kernelized_func"]
    (pkg / "__init__.py").write_text("STAND_IN = True\n" + "".join(f"class {n}: pass\n" for n in names)
                                     + "".join(f"def {f}(*a, **k):\n    return lambda cls: cls\n" for f in funcs))


def _from_checkout(code: str, **env) -> str:
    """`code` run with the checkout's root as the working directory (so on sys.path, as `python -m` puts it)."""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, HF_HUB_OFFLINE="1", **env))
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


LOAD_T5 = "import specialize.engine; import transformers.models.t5.modeling_t5, sys; "


@pytest.mark.parametrize("through_link", [False, True], ids=["installed", "gpu-check-link"])
def test_from_the_checkout_transformers_imports_hf_kernels_not_ours(tmp_path, through_link):
    """Run from the checkout, kernels/ sat first on sys.path as a top-level `kernels`: with Hugging Face's
    kernels installed, loading a T5 failed ("cannot import name 'CUDAProperties' from 'kernels'"). Also
    where the project is imported through the GPU check's `specialize -> checkout` link, not the install."""
    from specialize.benchmarks.gpu_check import source_path
    _stand_in_hf_kernels(tmp_path)
    path = ([str(source_path())] if through_link else []) + [str(tmp_path)]
    found = _from_checkout(LOAD_T5 + "print(sys.modules['kernels'].__file__, specialize.engine.__file__)",
                           PYTHONPATH=os.pathsep.join(path))
    assert found.split()[0] == str(tmp_path / "kernels" / "__init__.py")
    assert found.split()[1].startswith(str(source_path()) if through_link else str(REPO)), found


def test_from_the_checkout_without_hf_kernels_ours_is_never_loaded_under_that_name():
    assert _from_checkout(LOAD_T5 + "print('kernels' in sys.modules)") == "False"
    # imported under that name before specialize.engine: forgotten once it is imported
    assert _from_checkout("import kernels, specialize.engine, sys; print('kernels' in sys.modules, "
                          "str(sys.path))").startswith("False")


def _cli(*args, **kw):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "specialize.engine.cli", *args], capture_output=True,
                          text=True, env=env, **kw)


def test_help_lists_every_command():
    from specialize.engine.cli import COMMANDS
    out = _cli("--help")
    assert out.returncode == 0
    for name in COMMANDS:
        assert f"  {name} " in out.stdout


def test_env_reports_versions_and_interpreter():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-m", "specialize.engine.cli", "env", "--json"],
                         capture_output=True, text=True, env=env, check=True)
    import json
    info = json.loads(out.stdout)
    import torch
    assert info["versions"]["torch"].startswith(torch.__version__.split("+")[0])
    assert info["versions"]["deepspeed"] and info["versions"]["triton"] and info["versions"]["transformers"]
    assert info["cuda_available"] == torch.cuda.is_available()
    assert info["triton_interpreter"] is True


def test_unknown_command_fails():
    out = _cli("frobnicate")
    assert out.returncode == 2 and "unknown command" in out.stderr


def test_a_bad_recipe_is_a_message_not_a_traceback(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\ntrain:\n  max_stepz: 3\n")
    out = _cli("run", str(recipe), "--dry-run")
    assert out.returncode == 2 and "max_stepz" in out.stderr and "Traceback" not in out.stderr
    from specialize.engine import cli
    from specialize.engine.config import ConfigError
    class Raises:  # a subcommand whose work ends in a ConfigError deep inside (as the demo's stage checks do)
        @staticmethod
        def main(argv):
            raise ConfigError("out/demo/teacher holds 'teacher' outputs of a different configuration")
    monkeypatch.setattr(cli, "_load", lambda name: Raises)
    assert cli.main(["demo", "--out", str(tmp_path)]) == 2
    assert "specialize demo: out/demo/teacher holds" in capsys.readouterr().err


def test_console_script_installed():
    script = Path(sys.executable).parent / "specialize"
    if not script.exists():
        pytest.skip("console script not on this interpreter's bin/ (not installed with pip)")
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "specialize" in out.stdout


@pytest.mark.slow
def test_non_editable_install_ships_every_subpackage(tmp_path):
    """`pip install .` (not -e) lays out specialize.* with every sub-package of the mapped folders."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO)], check=True, capture_output=True)
    expected = []
    for folder, name in [("engine", "specialize.engine"), ("kernels", "specialize.kernels"),
                         ("aligner", "specialize.aligner"), ("benchmarks", "specialize.benchmarks")]:
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            expected.append(".".join([name, *rel.parts]))
    code = ("import importlib, sys; mods = sys.argv[1:]; "
            "[print(importlib.import_module(m).__file__) for m in mods]")
    env = dict(os.environ, PYTHONPATH=str(target), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code, *expected], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert all(line.startswith(str(target)) for line in out.stdout.split()), out.stdout


def test_setup_declares_ranges_and_constraints_pin_each():
    """`pip install` into a user's CUDA environment must not replace their torch: setup.py gives ranges;
    constraints.txt holds the exact tested version of every declared package (what `make` installs)."""
    import re
    setup = (REPO / "setup.py").read_text()
    declared = re.findall(r'"([A-Za-z0-9_.-]+)(==|>=|<=|~=|>|<)[^"]*"', setup)
    assert declared and not [n for n, op in declared if op == "=="], "exact pins belong in constraints.txt"
    pins = {line.split("==")[0].lower().replace("_", "-") for line in (REPO / "constraints.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#")}
    missing = sorted({n.lower().replace("_", "-") for n, _ in declared} - pins)
    assert not missing, f"declared in setup.py but not pinned in constraints.txt: {missing}"
