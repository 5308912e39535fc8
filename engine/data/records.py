"""The one record schema every dataset loader produces."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional


@dataclass(frozen=True)
class Example:
    id: str                          # unique within its source, e.g. "gsm8k/train/17"
    question: str                    # the full question text the model sees
    answer: str                      # gold final answer, normalised text ("18", "(B)", "True")
    rationale: Optional[str] = None  # gold chain of thought when the dataset has one
    source: str = ""                 # dataset name: gsm8k, multiarith, asdiv, svamp, bbh/<task>, synthetic/<split>

    def to_dict(self) -> dict:
        return asdict(self)
