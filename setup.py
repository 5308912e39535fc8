"""Install `specialize`: the repo's top-level folders become one import namespace.

    specialize.engine     <- engine/
    specialize.kernels    <- kernels/
    specialize.aligner    <- aligner/
    specialize.benchmarks <- benchmarks/

`specialize` itself is an implicit namespace package. A top-level `kernels` package is
never installed: it would shadow Hugging Face's `kernels`, which transformers imports.
"""
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
FOLDERS = {"engine": "specialize.engine", "kernels": "specialize.kernels",
           "aligner": "specialize.aligner", "benchmarks": "specialize.benchmarks"}


def _packages():
    """Every folder with an __init__.py below the mapped top-level folders."""
    packages, package_dir = [], {}
    for folder, name in FOLDERS.items():
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, folder)):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
            if "__init__.py" not in filenames:
                continue
            rel = os.path.relpath(dirpath, ROOT)
            sub = os.path.relpath(dirpath, os.path.join(ROOT, folder))
            pkg = name if sub == "." else name + "." + sub.replace(os.sep, ".")
            packages.append(pkg)
            package_dir[pkg] = rel
    return packages, package_dir


packages, package_dir = _packages()

setup(
    name="specialize",
    version="0.1.0",
    description="Distil multi-step reasoning from a large teacher into a small T5: "
                "Numba aligner, Triton sparse-KL kernels, DeepSpeed ZeRO engine.",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    install_requires=[
        # CPU build on machines without CUDA; CUDA users install their own torch first.
        "torch==2.13.0",
        "triton==3.9.0",
        "deepspeed==0.19.8",
        "transformers==5.23.0",
        "datasets==5.2.0",
        "numba==0.68.1",
        "numpy>=1.26",  # triton's interpreter needs it and does not declare it
        "openai==3.51.0",
        "tiktoken==0.14.0",
        "tokenizers==0.23.3",
        "msgspec==0.22.0",  # aligner: typed JSON decoding of teacher records (parse + check in C)
        "safetensors==0.8.0",
        "tensorboard==2.21.0",
        "matplotlib==3.11.2",
        "tqdm==4.70.1",
        "PyYAML==6.0.3",
        "psutil>=5.9",
    ],
    extras_require={
        # accelerate: the Seq2SeqTrainer baseline of benchmarks/bench_engine.py needs it (the engine does not).
        "bench": ["accelerate==1.15.0"],
        "test": ["pytest==9.2.0", "pytest-benchmark==5.3.1", "hypothesis==6.170.15", "accelerate==1.15.0"],
    },
    entry_points={"console_scripts": ["specialize=specialize.engine.cli:main"]},
)
