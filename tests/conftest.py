"""Shared test set-up: offline hub, the Triton interpreter on a CPU-only host (a CUDA host runs the compiled
kernels on the GPU: see kernel_reference.TRITON_DEVICE), the ../shared/data folder."""
import os
from pathlib import Path

# Both must be set before transformers / triton are imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
try:
    import torch as _torch
    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import pytest

import specialize.engine  # noqa: F401  (takes the checkout off sys.path: its kernels/ would shadow HF's kernels)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SPECIALIZE_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"reference data not found at {SHARED_DATA} (set SPECIALIZE_SHARED_DATA)")
    return SHARED_DATA
