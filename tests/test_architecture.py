"""Import direction, read from the source: aligner/ and kernels/ depend on neither the engine nor the
benchmarks, the engine never on the benchmarks (aligner/kernels <- engine <- benchmarks)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# package -> the specialize.* packages it must not import
FORBIDDEN = {
    "aligner": ("specialize.engine", "specialize.benchmarks", "specialize.kernels"),
    "kernels": ("specialize.engine", "specialize.benchmarks", "specialize.aligner"),
    "engine": ("specialize.benchmarks",),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, function-local ones included."""
    package = "specialize." + ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
    return out


def test_imports_resolve_relative_ones():
    path = REPO / "engine" / "data" / "loaders.py"
    assert any(name == "specialize.engine.data.records" for _, name in imported_modules(path))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package):
    bad = []
    for path in sorted((REPO / package).rglob("*.py")):
        for line, name in imported_modules(path):
            if name.startswith(FORBIDDEN[package]) or name == "kernels" or name.startswith("kernels."):
                bad.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert not bad, "imports against the direction aligner/kernels <- engine <- benchmarks:\n" + "\n".join(bad)


# Inside the engine: the demo sits on top (only it and the pipeline's toy stage may import it), and
# evaluation does not reach into the pipeline, the demo or the training loop.
ENGINE_LAYERS = {
    "engine": (("specialize.engine.demo",), ("engine/demo", "engine/pipeline")),
    "engine/evaluation": (("specialize.engine.pipeline", "specialize.engine.demo", "specialize.engine.train"), ()),
}


@pytest.mark.parametrize("folder", sorted(ENGINE_LAYERS))
def test_engine_layers(folder):
    forbidden, exempt = ENGINE_LAYERS[folder]
    bad = []
    for path in sorted((REPO / folder).rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith(exempt):
            continue
        for line, name in imported_modules(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{rel}:{line} imports {name}")
    assert not bad, "imports against the engine's layers:\n" + "\n".join(bad)


def test_every_command_line_option_has_a_help_string():
    """`--help` must explain every option (engine/cli.HelpFormatter then appends its default)."""
    bare = []
    for package in ("engine", "aligner", "benchmarks"):
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "add_argument" and not any(k.arg == "help" for k in node.keywords)):
                    bare.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not bare, "options without help=: " + ", ".join(bare)


def test_help_shows_defaults():
    import argparse

    from specialize.engine.cli import HelpFormatter
    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    p.add_argument("--steps", type=int, default=12, help="optimizer steps")
    p.add_argument("--zero", type=int, default=2, help="ZeRO stage (default: the mode's)")
    p.add_argument("--out", default=None, help="folder")
    text = p.format_help()
    assert "optimizer steps (default: 12)" in text
    assert text.count("default") == 2 and "folder\n" in text
