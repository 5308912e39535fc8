"""Benchmark loaders: GSM8K, MultiArith, ASDiv, SVAMP and BIG-Bench Hard into `Example` records.

Every loader reads a local copy when given `path` (offline runs, tests: the folder laid out like
/work/shared/data) and otherwise fetches the same data from the Hugging Face hub. Malformed input
raises `DataError` naming the file and the line (JSONL) or the record index / ID (JSON, XML):
nothing is skipped silently, because a silently shorter test set changes every reported accuracy.

Hub ids (normal use):
  gsm8k       openai/gsm8k, config "main", splits train/test
  multiarith  ChilleD/MultiArith, splits train+test concatenated (600), fields question/final_ans
  asdiv       EleutherAI/asdiv, split validation (2305), fields body/question/answer
  svamp       ChilleD/SVAMP, splits train+test concatenated (1000), fields ID/Body/Question/Answer
  bbh         lukaemon/bbh, one config per task, split test, fields input/target
  bbh prompts the official BIG-Bench-Hard repository on GitHub (cot-prompts/<task>.txt)
"""
from __future__ import annotations

import itertools
import json
import math
import random
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterable, Optional, Sequence

from specialize.engine.io_helpers import read_jsonl_objects as _read_jsonl_objects

from .records import Example

GSM8K_HUB = "openai/gsm8k"
MULTIARITH_HUB = "ChilleD/MultiArith"
ASDIV_HUB = "EleutherAI/asdiv"
SVAMP_HUB = "ChilleD/SVAMP"
BBH_HUB = "lukaemon/bbh"
BBH_PROMPTS_URL = "https://raw.githubusercontent.com/suzgunmirac/BIG-Bench-Hard/main/cot-prompts/{task}.txt"

BBH_TASKS = (
    "boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa",
    "dyck_languages", "formal_fallacies", "geometric_shapes", "hyperbaton",
    "logical_deduction_five_objects", "logical_deduction_seven_objects",
    "logical_deduction_three_objects", "movie_recommendation", "multistep_arithmetic_two",
    "navigate", "object_counting", "penguins_in_a_table", "reasoning_about_colored_objects",
    "ruin_names", "salient_translation_error_detection", "snarks", "sports_understanding",
    "temporal_sequences", "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects",
    "web_of_lies", "word_sorting",
)

_CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")
_GSM8K_FINAL = re.compile(r"\n?####\s*(.+?)\s*$", re.S)


class DataError(ValueError):
    """A data file (or hub row) does not have the documented shape."""


# ---------------------------------------------------------------- small shared helpers

def _number_text(value, where: str) -> str:
    """Gold numbers as canonical text: 39.0 -> "39", 2.50 -> "2.5", "1,000" -> "1000"."""
    try:
        x = float(str(value).replace(",", ""))
    except ValueError:
        raise DataError(f"{where}: answer {value!r} is not a number") from None
    if not math.isfinite(x):
        raise DataError(f"{where}: answer {value!r} is not a finite number")
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))
    return repr(x)


def read_jsonl_objects(path: Path, error: type[ValueError] = None) -> list[tuple[int, dict]]:
    """engine.io_helpers.read_jsonl_objects raising the data layer's DataError by default."""
    return _read_jsonl_objects(path, error or DataError)


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def _field(row: dict, names: Sequence[str], where: str, kind=str):
    """The first of `names` present in `row` (hub copies differ in capitalisation), type-checked."""
    for name in names:
        if name in row:
            value = row[name]
            if kind is not None and not isinstance(value, kind):
                want = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
                raise DataError(f"{where}: field {name!r} should be {want}, got {type(value).__name__}")
            return value
    raise DataError(f"{where}: missing field {names[0]!r}")


def _hub_rows(hub_id: str, config: Optional[str], splits: Iterable[str]) -> list[tuple[str, dict]]:
    import datasets  # imported lazily: loading from a local path must not need the hub stack

    rows = []
    for split in splits:
        ds = datasets.load_dataset(hub_id, config, split=split) if config else \
            datasets.load_dataset(hub_id, split=split)
        rows.extend((f"{hub_id}[{split}] row {i}", dict(r)) for i, r in enumerate(ds))
    return rows


def _resolve(path, *candidates: str) -> Path:
    """Accept the dataset's own folder/file or the data root that holds it (/work/shared/data)."""
    p = Path(path)
    for c in candidates:
        if (p / c).exists():
            return p / c
    if p.is_file():
        return p
    raise FileNotFoundError(f"{p}: no data file there (looked for {', '.join(candidates)} inside)")


# ---------------------------------------------------------------- GSM8K

def parse_gsm8k_solution(solution: str, where: str) -> tuple[str, str]:
    """Split a GSM8K solution into (rationale without calculator notes, final answer)."""
    m = _GSM8K_FINAL.search(solution)
    if not m:
        raise DataError(f"{where}: answer has no '#### N' final line")
    answer = _number_text(m.group(1), where)
    rationale = _CALCULATOR_NOTE.sub("", solution[: m.start()]).strip()
    return rationale, answer


def load_gsm8k(split: str, path=None, hub_id: str = GSM8K_HUB) -> list[Example]:
    if split not in ("train", "test"):
        raise ValueError(f"gsm8k split must be 'train' or 'test', got {split!r}")
    if path is not None:
        file = _resolve(path, f"{split}.jsonl", f"gsm8k/{split}.jsonl")
        rows = [(f"{file}:{lineno}", r) for lineno, r in read_jsonl_objects(file)]
    else:
        rows = _hub_rows(hub_id, "main", [split])
    out = []
    for i, (where, row) in enumerate(rows):
        question = _field(row, ["question"], where)
        rationale, answer = parse_gsm8k_solution(_field(row, ["answer"], where), where)
        out.append(Example(f"gsm8k/{split}/{i}", question.strip(), answer, rationale, "gsm8k"))
    return out


# The GSM8K dev split's seed is fixed, not train.seed: runs of one recipe with different seeds share
# one teacher folder (the teacher answers the train questions), and with a seeded split a run with
# another seed would train on teacher samples of its own dev questions. `specialize eval` draws
# the same dev part for the same reason.
GSM8K_DEV_SPLIT_SEED = 0


def split_gsm8k_dev(train: Sequence[Example], dev_size: int = 300, seed: int = GSM8K_DEV_SPLIT_SEED
                    ) -> tuple[list[Example], list[Example]]:
    """Hold `dev_size` train questions out as dev, chosen by seed; both parts keep file order."""
    if not 0 < dev_size < len(train):
        raise ValueError(f"dev_size must be in 1..{len(train) - 1}, got {dev_size}")
    dev_idx = set(random.Random(seed).sample(range(len(train)), dev_size))
    rest = [e for i, e in enumerate(train) if i not in dev_idx]
    dev = [e for i, e in enumerate(train) if i in dev_idx]
    return rest, dev


# ---------------------------------------------------------------- MultiArith, SVAMP, ASDiv

def load_multiarith(path=None, hub_id: str = MULTIARITH_HUB) -> list[Example]:
    if path is not None:
        file = _resolve(path, "MultiArith.json", "multiarith/MultiArith.json")
        data = _read_json(file)
        if not isinstance(data, list):
            raise DataError(f"{file}: expected a JSON list of problems")
        out = []
        for i, row in enumerate(data):
            where = f"{file}: record {i}"
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected an object")
            idx = _field(row, ["iIndex"], where, int)
            where = f"{file}: record {i} (iIndex {idx})"
            solutions = _field(row, ["lSolutions"], where, list)
            if len(solutions) != 1:
                raise DataError(f"{where}: expected one solution, got {len(solutions)}")
            out.append(Example(f"multiarith/{idx}", _field(row, ["sQuestion"], where).strip(),
                               _number_text(solutions[0], where), None, "multiarith"))
        return out
    out = []
    for i, (where, row) in enumerate(_hub_rows(hub_id, None, ["train", "test"])):
        out.append(Example(f"multiarith/{i}", _field(row, ["question", "sQuestion"], where).strip(),
                           _number_text(_field(row, ["final_ans", "answer"], where, None), where),
                           None, "multiarith"))
    return out


def load_svamp(path=None, hub_id: str = SVAMP_HUB) -> list[Example]:
    if path is not None:
        file = _resolve(path, "SVAMP.json", "svamp/SVAMP.json")
        data = _read_json(file)
        if not isinstance(data, list):
            raise DataError(f"{file}: expected a JSON list of problems")
        rows = [(f"{file}: record {i}", r) for i, r in enumerate(data)]
    else:
        rows = _hub_rows(hub_id, None, ["train", "test"])
    out = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object")
        pid = str(_field(row, ["ID", "id"], where, None))
        where = f"{where} (ID {pid})"
        body = _field(row, ["Body", "body"], where).strip()
        question = _field(row, ["Question", "question"], where).strip()
        answer = _number_text(_field(row, ["Answer", "answer"], where, (int, float, str)), where)
        out.append(Example(f"svamp/{pid}", f"{body} {question}", answer, None, "svamp"))
    return out


_UNIT = re.compile(r"\s*\((?=[^()]*[A-Za-z])[^()]*\)")


def normalise_asdiv_answer(raw: str) -> str:
    """"9 (apples)" -> "9"; "5 (years old); 15 (years old)" -> "5; 15"; text answers unchanged."""
    return re.sub(r"\s+", " ", _UNIT.sub("", raw)).strip()


def load_asdiv(path=None, hub_id: str = ASDIV_HUB) -> list[Example]:
    if path is not None:
        file = _resolve(path, "ASDiv.xml", "asdiv/ASDiv.xml")
        try:
            root = ET.parse(file).getroot()
        except ET.ParseError as e:
            raise DataError(f"{file}:{e.position[0]}: invalid XML ({e})") from None
        rows = []
        for i, problem in enumerate(root.iter("Problem")):
            row = {"ID": problem.get("ID")}
            for tag in ("Body", "Question", "Answer"):
                node = problem.find(tag)
                if node is not None:
                    row[tag] = node.text or ""
            rows.append((f"{file}: Problem {i} (ID {row['ID']})", row))
        if not rows:
            raise DataError(f"{file}: no <Problem> elements")
    else:
        rows = [(w, dict(r, ID=f"{i}")) for i, (w, r) in enumerate(_hub_rows(hub_id, None, ["validation"]))]
    out = []
    for where, row in rows:
        pid = row.get("ID")
        if not pid:
            raise DataError(f"{where}: missing ID attribute")
        body = _field(row, ["Body", "body"], where)
        question = _field(row, ["Question", "question"], where)
        answer = normalise_asdiv_answer(_field(row, ["Answer", "answer"], where))
        if not answer:
            raise DataError(f"{where}: empty answer")
        out.append(Example(f"asdiv/{pid}", f"{body.strip()} {question.strip()}", answer, None, "asdiv"))
    return out


# ---------------------------------------------------------------- BIG-Bench Hard

def _check_tasks(tasks) -> list[str]:
    tasks = list(BBH_TASKS if tasks is None else tasks)
    unknown = [t for t in tasks if t not in BBH_TASKS]
    if unknown:
        raise ValueError(f"unknown BBH task(s) {unknown}; known: {', '.join(BBH_TASKS)}")
    return tasks


def load_bbh(path=None, tasks: Optional[Sequence[str]] = None, hub_id: str = BBH_HUB) -> list[Example]:
    """All 27 tasks (or `tasks`) in BBH_TASKS order; ids "bbh/<task>/<i>", source "bbh/<task>"."""
    out = []
    for task in _check_tasks(tasks):
        if path is not None:
            file = _resolve(path, f"tasks/{task}.json", f"bbh/tasks/{task}.json", f"{task}.json")
            data = _read_json(file)
            if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
                raise DataError(f"{file}: expected an object with an 'examples' list")
            rows = [(f"{file}: example {i}", r) for i, r in enumerate(data["examples"])]
        else:
            rows = _hub_rows(hub_id, task, ["test"])
        for i, (where, row) in enumerate(rows):
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected an object")
            target = _field(row, ["target"], where).strip()
            if not target:
                raise DataError(f"{where}: empty target")
            out.append(Example(f"bbh/{task}/{i}", _field(row, ["input"], where), target, None, f"bbh/{task}"))
    return out


def load_bbh_cot_prompt(task: str, path=None) -> str:
    """The official 3-shot CoT prompt of `task`, without the canary header (line + "-----")."""
    _check_tasks([task])
    if path is not None:
        file = _resolve(path, f"cot-prompts/{task}.txt", f"bbh/cot-prompts/{task}.txt", f"{task}.txt")
        text = file.read_text(encoding="utf-8")
    else:
        import urllib.request
        with urllib.request.urlopen(BBH_PROMPTS_URL.format(task=task), timeout=30) as r:
            text = r.read().decode("utf-8")
    lines = text.splitlines()
    if lines and "canary" in lines[0].lower():
        lines = lines[1:]
        if lines and set(lines[0].strip()) == {"-"}:
            lines = lines[1:]
    prompt = "\n".join(lines).strip()
    if "Q:" not in prompt:
        raise DataError(f"BBH prompt for {task}: no 'Q:' exemplar found")
    return prompt


# ---------------------------------------------------------------- OOD dev/test split

# The OOD math sets have no dev split of their own. Model selection on OOD dev accuracy (the
# paper's RQ5) must not look at the items the test stage scores, so each set is split once into a
# dev part (train-time evaluation, checkpoint selection) and a disjoint test part (the test
# stage), as the paper held its MultiArith validation indices out of its test set. The seed is
# fixed, not train.seed, so the engine, `specialize run` and `specialize eval` all draw the same
# parts whatever seed a run trains with.
OOD_DATASETS = ("multiarith", "asdiv", "svamp")
OOD_SPLIT_SEED = 0
OOD_DEV_SIZE = 200  # multiarith 200 dev / 400 test, asdiv 200 / 2105, svamp 200 / 800
SPLIT_PARTS = ("dev", "test", "all")


def has_ood_split(name: str) -> bool:
    """Datasets split into dev/test parts here: the OOD math sets and the synthetic world's ood_*."""
    return name in OOD_DATASETS or name.startswith("synthetic/ood_")


def split_ood(examples: Sequence[Example], dev_size: int = OOD_DEV_SIZE, name: str = "",
              seed: int = OOD_SPLIT_SEED) -> tuple[list[Example], list[Example]]:
    """(dev, test): `dev_size` items drawn by `seed` and the dataset's name, the rest test; both keep
    file order. dev_size 0 leaves the whole set as test."""
    if not 0 <= dev_size < len(examples):
        raise ValueError(f"{name or 'OOD dataset'}: ood_dev_size must be in 0..{len(examples) - 1} "
                         f"(the set has {len(examples)} items), got {dev_size}")
    dev_idx = set(random.Random(f"{seed}/{name}").sample(range(len(examples)), dev_size))
    return ([e for i, e in enumerate(examples) if i in dev_idx],
            [e for i, e in enumerate(examples) if i not in dev_idx])


def split_label(name: str, split: str = "test", ood_dev_size: int = OOD_DEV_SIZE) -> str:
    """Which part of `name` a number comes from, for reports: "test", "dev", or for the split sets
    "test part (OOD split: 200 dev held out, seed 0)"."""
    if not has_ood_split(name) or split == "all" or ood_dev_size == 0:
        return "all" if split == "all" else split
    return f"{split} part (OOD split: {ood_dev_size} dev held out, seed {OOD_SPLIT_SEED})"


# ---------------------------------------------------------------- the first N items

def first_indices(examples: Sequence[Example], limit: Optional[int]) -> list[int]:
    """Indices of the first `limit` items (None or 0: all), in file order. A set of several tasks (BBH's
    27, listed task by task) gives each task its share, one item of each in turn, so that a limit
    does not keep the first two tasks of the file under the set's name."""
    if not limit or limit >= len(examples):
        return list(range(len(examples)))
    by_task: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_task.setdefault(ex.source, []).append(i)
    if len(by_task) == 1:
        return list(range(limit))
    in_turn = [i for row in itertools.zip_longest(*by_task.values()) for i in row if i is not None]
    return sorted(in_turn[:limit])


def first_items(examples: Sequence[Example], limit: Optional[int]) -> list[Example]:
    """The items `first_indices` picks: what every `limit` (eval.limit, train.dev_limit, --limit) keeps."""
    return [examples[i] for i in first_indices(examples, limit)]


# ---------------------------------------------------------------- one entry point by name

DATASET_NAMES = ("gsm8k", "gsm8k_train", "gsm8k_dev", "multiarith", "asdiv", "svamp", "bbh")


def load_dataset_by_name(name: str, data_dir=None, split: str = "test", dev_size: int = 300, seed: int = 0,
                         sizes: Optional[dict] = None, ood_dev_size: int = OOD_DEV_SIZE) -> list[Example]:
    """name: gsm8k (split train/test/dev: the files, dev = the held-out train questions), gsm8k_train
    (train minus dev), gsm8k_dev, multiarith, asdiv, svamp, bbh, bbh/<task>, synthetic/<split>.
    data_dir: folder holding gsm8k/, ... (e.g. /work/shared/data); None = the hub. For gsm8k `split`
    picks the file; for the OOD sets (multiarith, asdiv, svamp, synthetic/ood_*) it picks the part
    of the OOD split: test (default, what the test stage scores), dev (train-time selection) or
    all; other sets ignore it. `dev_size` is the GSM8K dev part's size (drawn with the fixed
    GSM8K_DEV_SPLIT_SEED); `seed` is the synthetic world's seed (the recipe's train.seed); `sizes`
    overrides synthetic split sizes; `ood_dev_size` is the OOD dev part's size."""
    if has_ood_split(name):
        if split not in SPLIT_PARTS:
            raise ValueError(f"{name}: split must be one of {', '.join(SPLIT_PARTS)}, got {split!r}")
        full = _load_plain(name, data_dir, split, dev_size, seed, sizes)
        if split == "all":
            return full
        dev, test = split_ood(full, ood_dev_size, name)
        return dev if split == "dev" else test
    return _load_plain(name, data_dir, split, dev_size, seed, sizes)


def _load_plain(name: str, data_dir, split: str, dev_size: int, seed: int, sizes: Optional[dict]) -> list[Example]:
    root = Path(data_dir) if data_dir is not None else None

    def sub(folder):
        return root / folder if root is not None else None

    if name == "gsm8k" and split == "dev":
        name = "gsm8k_dev"
    if name == "gsm8k":
        return load_gsm8k(split, sub("gsm8k"))
    if name in ("gsm8k_train", "gsm8k_dev"):
        rest, dev = split_gsm8k_dev(load_gsm8k("train", sub("gsm8k")), dev_size)
        return rest if name == "gsm8k_train" else dev
    if name == "multiarith":
        return load_multiarith(sub("multiarith"))
    if name == "asdiv":
        return load_asdiv(sub("asdiv"))
    if name == "svamp":
        return load_svamp(sub("svamp"))
    if name == "bbh":
        return load_bbh(sub("bbh"))
    if name.startswith("bbh/"):
        return load_bbh(sub("bbh"), tasks=[name[4:]])
    if name.startswith("synthetic/"):
        from . import synthetic
        splits = synthetic.make_splits(seed=seed, sizes=sizes)
        part = name.split("/", 1)[1]
        if part not in splits:
            raise ValueError(f"unknown synthetic split {part!r}; known: {', '.join(splits)}")
        return splits[part]
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)}, bbh/<task>, synthetic/<split>")
