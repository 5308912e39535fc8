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
    # Compatible ranges, so `pip install` into an existing CUDA environment keeps the user's torch. The
    # lower bounds are the oldest releases with the APIs used here; the tested set is constraints.txt
    # (exact pins, what `make` installs and CI runs).
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "deepspeed>=0.15",
        "transformers>=4.56",  # from_pretrained(dtype=...), masking_utils' prepared 4-D masks
        "datasets>=2.19",
        "numba>=0.59",
        "numpy>=1.26",  # triton's interpreter needs it and does not declare it
        "openai>=1.40",
        "tiktoken>=0.7",
        "tokenizers>=0.19",
        "msgspec>=0.18",  # aligner: typed JSON decoding of teacher records (parse + check in C)
        "safetensors>=0.4",
        "tensorboard>=2.14",
        "matplotlib>=3.7",
        "tqdm>=4.66",
        "PyYAML>=6.0",
        "psutil>=5.9",
    ],
    extras_require={
        # accelerate: the Seq2SeqTrainer baseline of benchmarks/bench_engine.py needs it (the engine does not).
        "bench": ["accelerate>=1.0"],
        # the Liger-Kernel baseline of benchmarks/bench_loss_gpu.py and gpu_check.py (a CUDA machine)
        "gpu": ["accelerate>=1.0", "liger-kernel>=0.5"],
        "test": ["pytest>=8.0", "pytest-benchmark>=4.0", "hypothesis>=6.100", "accelerate>=1.0", "ruff>=0.5"],
    },
    entry_points={"console_scripts": ["specialize=specialize.engine.cli:main"]},
)
