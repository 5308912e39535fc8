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
