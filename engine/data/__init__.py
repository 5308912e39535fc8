"""Data layer: benchmark loaders, answer extraction, prompt formats and the synthetic mini-world."""
from .answers import answers_match, extract_answer, is_correct
from .loaders import (
    BBH_TASKS,
    DATASET_NAMES,
    GSM8K_DEV_SPLIT_SEED,
    OOD_DATASETS,
    OOD_DEV_SIZE,
    OOD_SPLIT_SEED,
    DataError,
    first_indices,
    first_items,
    has_ood_split,
    load_asdiv,
    load_bbh,
    load_bbh_cot_prompt,
    load_dataset_by_name,
    load_gsm8k,
    load_multiarith,
    load_svamp,
    split_gsm8k_dev,
    split_label,
    split_ood,
)
from .prompts import (
    COT_FORMATS,
    FORMATS,
    build_bbh_prompt,
    build_prompt,
    build_target,
    draw_exemplars,
)
from .records import Example

__all__ = [
    "Example", "BBH_TASKS", "DATASET_NAMES", "DataError", "load_asdiv", "load_bbh",
    "load_bbh_cot_prompt", "load_dataset_by_name", "load_gsm8k", "load_multiarith", "load_svamp",
    "split_gsm8k_dev", "answers_match", "extract_answer", "is_correct", "COT_FORMATS", "FORMATS",
    "build_bbh_prompt", "build_prompt", "build_target", "draw_exemplars",
    "GSM8K_DEV_SPLIT_SEED", "OOD_DATASETS", "OOD_DEV_SIZE", "OOD_SPLIT_SEED", "first_indices", "first_items",
    "has_ood_split", "split_label", "split_ood",
]
