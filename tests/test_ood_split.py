"""The OOD dev/test split: seeded, disjoint, covering each set, the same in every stage, and the
engine's dev sets are the dev part while the test stage scores the test part."""
import pytest

from specialize.engine.config import recipe_from_dict
from specialize.engine.data import OOD_DATASETS, load_dataset_by_name, split_label
from specialize.engine.pipeline import load_examples

DATA = "/work/shared/data"
COUNTS = {"multiarith": (200, 400), "asdiv": (200, 2105), "svamp": (200, 800)}


@pytest.mark.parametrize("name", OOD_DATASETS)
def test_real_sets_split_into_disjoint_documented_parts(name):
    full = load_dataset_by_name(name, DATA, split="all")
    dev = load_dataset_by_name(name, DATA, split="dev")
    test = load_dataset_by_name(name, DATA)  # the default is the test part
    assert (len(dev), len(test)) == COUNTS[name]
    # no question (by id, nor by text) is in both parts, and together they are the whole set
    assert not {e.id for e in dev} & {e.id for e in test}
    assert not {e.question for e in dev} & {e.question for e in test} - {e.question for e in _dupes(full)}
    assert sorted(e.id for e in dev + test) == sorted(e.id for e in full)
    # the split does not move with the training seed (the test stage and the engine agree)
    assert [e.id for e in load_dataset_by_name(name, DATA, split="dev", seed=123)] == [e.id for e in dev]
    assert len(load_dataset_by_name(name, DATA, split="dev", ood_dev_size=50)) == 50


def _dupes(examples):
    seen, out = set(), []
    for e in examples:
        if e.question in seen:
            out.append(e)
        seen.add(e.question)
    return out


def test_synthetic_ood_split_and_what_each_stage_loads():
    r = recipe_from_dict({"data": {"dataset": "synthetic", "ood_dev_size": 64}, "train": {"seed": 5}})
    test = load_examples(r, "synthetic/ood_steps", split="test")
    dev = load_dataset_by_name("synthetic/ood_steps", None, "dev", r.data.dev_size, r.train.seed, None,
                               ood_dev_size=r.data.ood_dev_size)  # the engine's dev-set call (engine/train.py)
    full = load_dataset_by_name("synthetic/ood_steps", seed=5, split="all")
    assert (len(dev), len(test)) == (64, len(full) - 64)
    assert not {e.question for e in dev} & {e.question for e in test}
    # in-distribution dev sets are not split (split names the GSM8K file there)
    assert len(load_dataset_by_name("synthetic/dev", split="dev")) == len(load_dataset_by_name("synthetic/dev"))
    assert split_label("synthetic/ood_steps", "test", 64) == "test part (OOD split: 64 dev held out, seed 0)"
    assert split_label("synthetic/test") == "test"
    with pytest.raises(ValueError, match="ood_dev_size"):
        load_dataset_by_name("synthetic/ood_steps", split="dev", ood_dev_size=10_000)
    with pytest.raises(ValueError, match="split"):
        load_dataset_by_name("multiarith", DATA, split="train")


def test_gsm8k_dev_split_name_is_the_held_out_train_part():
    dev = load_dataset_by_name("gsm8k", DATA, split="dev", dev_size=300, seed=3)
    assert [e.id for e in dev] == [e.id for e in load_dataset_by_name("gsm8k_dev", DATA, dev_size=300, seed=3)]

