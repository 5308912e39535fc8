"""Offsets of packed arrays: item i of a batch is flat[off[i]:off[i + 1]] (the layout every
bulk step of the aligner passes between its compiled cores)."""
from __future__ import annotations

import numpy as np


def offsets(lengths) -> np.ndarray:
    """int64 [len(lengths) + 1]: 0, then the running sums of `lengths` (a sequence or an array)."""
    off = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(np.asarray(lengths, np.int64), out=off[1:])
    return off
