"""The evaluator: generate, extract the final answer, score with a bootstrap interval.

One implementation serves `specialize eval`, the pipeline's eval stage and the engine's dev
evaluation during training (`evaluate_model`). Scoring alone (`score_predictions`) serves
existing generations, e.g. the teacher's samples.

Generation is batched with length bucketing: prompts are sorted by token length so a batch pads
to similar lengths (BBH's 3-shot prompts are ~10x longer than a GSM8K question), generated, and
put back in the original order. BBH items always get the official 3-shot CoT prompt of their
task, whatever `fmt` says, because that is how BBH is reported (Suzgun et al.; the paper's RQ4).

Files written by `specialize eval --out DIR`:
  DIR/results.json              {"model", "format", "datasets": {name: EvalResult.to_dict() without predictions}}
  DIR/results.md                markdown table: dataset, accuracy, 95% CI, n (BBH: one row per task too)
  DIR/predictions-<name>.jsonl  one {"id", "prediction", "extracted", "gold", "correct"} per example
With `--run RUN` every checkpoint kept in RUN/checkpoints/step-*/ is scored (DeepSpeed ones are exported
to RUN/checkpoints-hf/step-*/ first, once) and one line per step is appended to RUN/test_scores.jsonl:
{"step": int, "<dataset>_acc": float, "<dataset>_ci": [lo, hi], "<dataset>_n": int, ..., "settings": {...}}
(read by `specialize select` and `specialize plot`; a later line adds to a step's earlier ones). A
(step, dataset) already scored on as many items with the same settings is skipped, so a rerun resumes
and a new dataset or --limit scores only what is missing. The format, shots, seed, max_new_tokens,
num_beams and batch size default to the run's recipe.yaml, as the pipeline's eval stage uses them (the
tokenizer is the run's best/ one, where the checkpoints have none).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from specialize.engine.cli import HelpFormatter
from specialize.engine.data import (
    FORMATS,
    OOD_DEV_SIZE,
    Example,
    build_bbh_prompt,
    build_prompt,
    draw_exemplars,
    extract_answer,
    first_indices,
    first_items,
    has_ood_split,
    is_correct,
    load_dataset_by_name,
    split_label,
)
from specialize.engine.data.loaders import SPLIT_PARTS
from specialize.engine.rundir import RunDir
from specialize.engine.workers import worker_device

DEFAULT_DATASETS = "gsm8k,multiarith,asdiv,svamp,bbh"
BOOTSTRAP_SAMPLES = 2000
CI_LEVEL = 0.95


# ---------------------------------------------------------------- results

@dataclass
class EvalResult:
    dataset: str
    accuracy: float
    ci_low: float
    ci_high: float
    n: int
    n_correct: int
    predictions: list = field(default_factory=list)  # dict(id, prediction, extracted, gold, correct)
    per_task: dict = field(default_factory=dict)     # BBH: task -> {accuracy, ci_low, ci_high, n, n_correct}
    seconds: float = 0.0
    split: str = ""  # which part of the dataset was scored (data.split_label), for reports
    # outputs that reached max_new_tokens without ending (None: not known, e.g. scored from a file);
    # their answer is whatever the extraction finds in the cut-off text
    truncated: Optional[int] = None

    def to_dict(self, with_predictions: bool = True) -> dict:
        d = {"dataset": self.dataset, "accuracy": self.accuracy, "ci_low": self.ci_low,
             "ci_high": self.ci_high, "n": self.n, "n_correct": self.n_correct, "seconds": round(self.seconds, 3)}
        if self.per_task:
            d["per_task"] = self.per_task
        if self.split:
            d["split"] = self.split
        if self.truncated is not None:
            d["truncated"] = self.truncated
        if with_predictions:
            d["predictions"] = self.predictions
        return d


def bootstrap_ci(groups: Sequence[Sequence[bool]], seed: int = 0, samples: int = BOOTSTRAP_SAMPLES,
                 level: float = CI_LEVEL) -> tuple[float, float, float]:
    """(macro accuracy, low, high): the mean over groups of each group's accuracy, with a percentile
    bootstrap that resamples every group separately (one group = plain accuracy; BBH = one per task).
    Resampling n 0/1 outcomes with replacement and counting the 1s is exactly Binomial(n, p), so we
    draw that count directly instead of materialising samples x n indices."""
    groups = [list(g) for g in groups if len(g)]
    if not groups:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    point = float(np.mean([np.mean(g) for g in groups]))
    draws = np.zeros(samples)
    for g in groups:
        draws += rng.binomial(len(g), float(np.mean(g)), size=samples) / len(g)
    draws /= len(groups)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return point, float(low), float(high)


def _answer_dataset(example: Example, dataset: str) -> str:
    """The name answer extraction should use: an item's own source where it is finer (bbh/<task>)."""
    src = example.source or ""
    if src.startswith("bbh/") or (dataset.startswith("synthetic") and src.startswith("synthetic/")):
        return src
    return dataset


def score_predictions(predictions: Sequence[str], examples: Sequence[Example], dataset: str,
                      seed: int = 0) -> EvalResult:
    """Score generated texts against the examples' gold answers (same order, same length)."""
    if len(predictions) != len(examples):
        raise ValueError(f"{dataset}: {len(predictions)} predictions for {len(examples)} examples")
    rows, by_task = [], {}
    for text, ex in zip(predictions, examples):
        name = _answer_dataset(ex, dataset)
        ok = bool(is_correct(text, ex.answer, name))
        rows.append({"id": ex.id, "prediction": text, "extracted": extract_answer(text, name),
                     "gold": ex.answer, "correct": ok})
        by_task.setdefault(name, []).append(ok)
    per_task = {}
    if dataset == "bbh" or len(by_task) > 1 and all(k.startswith("bbh/") for k in by_task):
        # BBH is reported as the average over its tasks, each task with its own interval.
        for i, (name, oks) in enumerate(by_task.items()):
            acc, lo, hi = bootstrap_ci([oks], seed=seed + 1 + i)
            per_task[name.split("/", 1)[-1]] = {"accuracy": acc, "ci_low": lo, "ci_high": hi,
                                               "n": len(oks), "n_correct": sum(oks)}
        groups = list(by_task.values())
    else:
        groups = [[r["correct"] for r in rows]]
    acc, lo, hi = bootstrap_ci(groups, seed=seed)
    return EvalResult(dataset, acc, lo, hi, len(rows), sum(r["correct"] for r in rows), rows, per_task)


# ---------------------------------------------------------------- prompts and generation

_QUESTION_SLOT = "\x00question\x00"


@lru_cache(maxsize=64)
def _bbh_template(task: str, data_dir: Optional[str]) -> str:
    # Built by the data layer once per task with a slot for the question: without a local copy the
    # prompt comes over the network, and BBH has 6511 questions.
    return build_bbh_prompt(task, _QUESTION_SLOT, data_dir)


def prompt_for(example: Example, fmt: str, exemplars: Sequence[Example] = (), data_dir=None) -> str:
    """The model input of one example: BBH items get their task's 3-shot CoT prompt."""
    if example.source.startswith("bbh/"):
        template = _bbh_template(example.source[4:], None if data_dir is None else str(data_dir))
        return template.replace(_QUESTION_SLOT, example.question.strip())
    return build_prompt(example.question, fmt, exemplars)


def generate(model, tokenizer, prompts: Sequence[str], batch_size: int = 32, max_new_tokens: int = 256,
             num_beams: int = 1, progress: bool = True, desc: str = "generate", synced_gpus: bool = False,
             min_batches: int = 0, filler_prompt: Optional[str] = None) -> list[str]:
    """Greedy (num_beams=1) or beam-search outputs for `prompts`, in their order (see generate_texts)."""
    return generate_texts(model, tokenizer, prompts, batch_size, max_new_tokens, num_beams, progress, desc,
                          synced_gpus, min_batches, filler_prompt)[0]


def generate_texts(model, tokenizer, prompts: Sequence[str], batch_size: int = 32, max_new_tokens: int = 256,
                   num_beams: int = 1, progress: bool = True, desc: str = "generate", synced_gpus: bool = False,
                   min_batches: int = 0, filler_prompt: Optional[str] = None) -> tuple[list[str], list[bool]]:
    """(outputs, truncated): greedy (num_beams=1) or beam-search outputs for `prompts`, in their order, and
    for each whether it reached max_new_tokens without an end-of-sequence token.

    synced_gpus: the model is ZeRO-3 partitioned and every rank takes part in each forward (DeepSpeed
    gathers a module's weights on all ranks around its forward). Then every rank must run the same
    number of `generate` calls with the same number of forwards: HF's synced_gpus keeps finished ranks
    stepping, and `min_batches` pads a rank with fewer prompts with batches of `filler_prompt`, whose
    outputs are dropped."""
    import torch
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts and not min_batches:
        return [], []
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]] if prompts else []
    # Longest first: the slowest batch comes first, so the rate on the bar settles quickly and an
    # out-of-memory error shows up at once rather than at the end.
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if len(batches) < min_batches:
        if filler_prompt is None:
            raise ValueError("generate: min_batches needs a filler_prompt")
        batches += [None] * (min_batches - len(batches))
    out: list[Optional[str]] = [None] * len(prompts)
    cut = [False] * len(prompts)
    end_id = tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    padding_side = tokenizer.padding_side
    if not encoder_decoder:
        tokenizer.padding_side = "left"  # a decoder-only model continues from the last position
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    bar = tqdm(total=len(prompts), desc=desc, unit="ex", disable=not progress, dynamic_ncols=True)
    try:
        # no_grad, not inference_mode, around a partitioned model: DeepSpeed's gathered weights must stay
        # ordinary tensors that training can write to again
        with torch.no_grad() if synced_gpus else torch.inference_mode():
            for idx in batches:
                texts = [filler_prompt] if idx is None else [prompts[i] for i in idx]
                enc = tokenizer(texts, return_tensors="pt", padding=True).to(device)
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, num_beams=num_beams,
                                     do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                     synced_gpus=synced_gpus)
                if idx is None:
                    continue
                if not encoder_decoder:
                    gen = gen[:, enc["input_ids"].shape[1]:]
                # a row that ended holds EOS; a batch that stopped early ended every row
                full = gen.shape[1] >= max_new_tokens + encoder_decoder  # T5's rows start with the decoder start
                ended = (gen == end_id).any(dim=1).tolist() if end_id is not None else [True] * len(idx)
                for i, text, done in zip(idx, tokenizer.batch_decode(gen, skip_special_tokens=True), ended):
                    out[i] = text.strip()
                    cut[i] = bool(full and not done)
                bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
        tokenizer.padding_side = padding_side
    return out, cut  # type: ignore[return-value]


def evaluate_model(model, tokenizer, examples: Sequence[Example], dataset: str, fmt: str = "zero_shot_cot",
                   exemplars: Sequence[Example] = (), batch_size: int = 32, max_new_tokens: int = 256,
                   num_beams: int = 1, progress: bool = True, data_dir=None, seed: int = 0,
                   synced_gpus: bool = False, min_batches: int = 0, filler: Optional[Example] = None) -> EvalResult:
    """Generate for every example and score it. `data_dir` locates BBH's CoT prompts offline
    (None = fetched); `seed` seeds the bootstrap interval. synced_gpus / min_batches / filler: see
    `generate` (ZeRO-3 dev evaluation, every rank in step)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    t0 = time.perf_counter()
    prompts = [prompt_for(ex, fmt, exemplars, data_dir) for ex in examples]
    filler_prompt = prompt_for(filler, fmt, exemplars, data_dir) if filler is not None else None
    texts, cut = generate_texts(model, tokenizer, prompts, batch_size, max_new_tokens, num_beams, progress,
                                desc=dataset, synced_gpus=synced_gpus, min_batches=min_batches,
                                filler_prompt=filler_prompt)
    result = score_predictions(texts, examples, dataset, seed=seed)
    for row, was_cut in zip(result.predictions, cut):
        row["truncated"] = was_cut
    result.truncated = sum(cut)
    for task, t in result.per_task.items():
        t["truncated"] = sum(r["truncated"] for r in result.predictions if r["id"].startswith(f"bbh/{task}/"))
    result.seconds = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------- reports

def markdown_table(results: dict[str, EvalResult]) -> str:
    lines = ["| dataset | split | accuracy (%) | 95% CI | n |", "|---|---|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r.split or 'test'} | {100 * r.accuracy:.1f} | "
                     f"{100 * r.ci_low:.1f}–{100 * r.ci_high:.1f} | {r.n} |")
        for task, t in r.per_task.items():
            lines.append(f"| &nbsp;&nbsp;{task} | | {100 * t['accuracy']:.1f} | "
                         f"{100 * t['ci_low']:.1f}–{100 * t['ci_high']:.1f} | {t['n']} |")
    cut = [f"{name} {r.truncated}/{r.n}" + (" (" + ", ".join(f"{task} {t['truncated']}" for task, t in r.per_task.items()
                                                           if t.get("truncated")) + ")" if r.per_task else "")
           for name, r in results.items() if r.truncated]
    if cut:
        lines += ["", "Outputs cut off at max_new_tokens (scored on the cut-off text; raise eval.max_new_tokens): "
                  + "; ".join(cut)]
    return "\n".join(lines) + "\n"


def write_results(out_dir, results: dict[str, EvalResult], meta: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {**meta, "datasets": {k: r.to_dict(with_predictions=False) for k, r in results.items()}}
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    (out / "results.md").write_text(markdown_table(results))
    for name, r in results.items():
        with open(out / f"predictions-{name.replace('/', '_')}.jsonl", "w", encoding="utf-8") as f:
            for row in r.predictions:
                f.write(json.dumps(row) + "\n")
    return out / "results.json"


# ---------------------------------------------------------------- models, prediction files, checkpoints

def load_model_and_tokenizer(model_path: str, tokenizer_path: Optional[str] = None, device: Optional[str] = None):
    """A seq2seq (T5) or causal LM and its tokenizer, from a dir or hub id, in eval mode on `device`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    ckpt = Path(model_path)
    if ckpt.is_dir() and not (ckpt / "config.json").exists() and RunDir.is_complete(ckpt):
        # a DeepSpeed checkpoint of a run (RUN/checkpoints/step-XXXXXX): use its HF export, made once
        step = RunDir.step_of(ckpt)
        model_path = str(checkpoint_steps(ckpt.parent.parent, convert=True, only=step)[step])
    config = AutoConfig.from_pretrained(model_path)
    cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    device = device or worker_device() or ("cuda" if torch.cuda.is_available() else "cpu")
    # T5 is trained in bf16 (fp16 overflows); loaded straight in it, so eval.workers copies of a large
    # model do not each hold an fp32 copy in host memory first
    bf16 = str(device).startswith("cuda") and torch.cuda.is_bf16_supported()
    model = cls.from_pretrained(model_path, dtype=torch.bfloat16 if bf16 else torch.float32)
    return model.to(device).eval(), AutoTokenizer.from_pretrained(tokenizer_path or model_path)


def read_prediction_file(path, names: Sequence[str], data_dir=None,
                         filter_records: bool = True) -> dict[str, tuple[list[str], list[Example]]]:
    """dataset -> (texts, examples) from a JSONL of either
    {"id", "prediction"} lines (golds come from the dataset(s) named in `names`, matched by id), or
    teacher records {"qid", "sample_index", "text", "gold", "dataset", ...} (every sample is scored;
    the record's own gold and dataset are used; `names` filters them when `filter_records`)."""
    from specialize.engine.data.loaders import read_jsonl_objects
    rows = read_jsonl_objects(Path(path), ValueError)
    out: dict[str, tuple[list[str], list[Example]]] = {}
    if rows and "text" in rows[0][1] and "gold" in rows[0][1]:
        for lineno, row in rows:
            for key in ("qid", "text", "gold"):
                if key not in row:
                    raise ValueError(f"{path}:{lineno}: teacher record without field {key!r}")
            name = row.get("dataset") or (names[0] if len(names) == 1 else None)
            if name is None:
                raise ValueError(f"{path}:{lineno}: record has no 'dataset'; pass exactly one --datasets name")
            if filter_records and names and name not in names:
                continue
            qid = str(row["qid"])
            source = "/".join(qid.split("/")[:2]) if qid.startswith("bbh/") else name
            ex = Example(f"{qid}#{row.get('sample_index', 0)}", row.get("question", ""), str(row["gold"]), None, source)
            texts, examples = out.setdefault(name, ([], []))
            texts.append(row["text"])
            examples.append(ex)
        return out
    by_id = {}
    for lineno, row in rows:
        text = row.get("prediction", row.get("text"))
        if "id" not in row or not isinstance(text, str):
            raise ValueError(f"{path}:{lineno}: expected fields 'id' and 'prediction' (a string)")
        by_id[str(row["id"])] = text
    for name in names:
        # every item of the set: a prediction file may cover the OOD dev part as well as the test part
        examples = [ex for ex in load_dataset_by_name(name, data_dir, split="all") if ex.id in by_id]
        if examples:
            out[name] = ([by_id[ex.id] for ex in examples], examples)
    matched = sum(len(e) for _, e in out.values())
    if matched < len(by_id):
        missing = sorted(set(by_id) - {ex.id for _, e in out.values() for ex in e})
        raise ValueError(f"{path}: {len(missing)} prediction id(s) match no example of {', '.join(names)} "
                         f"(first: {missing[0]!r})")
    return out


SPLIT_NAMES = ("train", "dev", "test")


def scored_part(name: str, examples: Sequence[Example], data_dir=None, ood_dev_size: int = OOD_DEV_SIZE) -> str:
    """Which part of `name` examples read from a prediction file are, for the table: the split their
    ids name (teacher records "gsm8k/train/5#0" are samples of the train split; GSM8K ids name theirs),
    or for a set split into dev and test parts here, the part the ids lie in ("all" where they span
    both); else "test" (BBH, the generic families: test sets only)."""
    named = {ex.id.split("#")[0].split("/")[1] for ex in examples if ex.id.count("/") >= 2}
    if len(named) == 1 and (named & set(SPLIT_NAMES)):
        return named.pop()
    if has_ood_split(name) and examples:
        ids = {ex.id for ex in examples}
        for part in ("test", "dev"):
            if ids <= {ex.id for ex in load_dataset_by_name(name, data_dir, split=part, ood_dev_size=ood_dev_size)}:
                return split_label(name, part, ood_dev_size)
        return "all"
    return "test"


def checkpoint_steps(run_dir, convert: bool = False, only: Optional[int] = None) -> dict[int, Path]:
    """step -> HF model dir for RUN/checkpoints/step-XXXXXX/: the dir itself or its hf/ when they hold a
    config.json; with `convert`, a complete DeepSpeed checkpoint (complete.json, as the engine writes) is
    exported once to RUN/checkpoints-hf/step-XXXXXX/ by the engine's exporter and that dir is used.
    `only`: look at that step alone."""
    run = RunDir(run_dir, find_train=False)
    found = {}
    for step, d in run.checkpoint_dirs():
        if only is not None and step != only:
            continue
        hf = next((c for c in (d, d / "hf", run.hf_checkpoint(step)) if (c / "config.json").exists()), None)
        if hf is None and convert and run.is_complete(d):
            from specialize.engine.export import export_checkpoint
            hf = export_checkpoint(d, run.root, run.hf_checkpoint(step))
        if hf is not None:
            found[step] = Path(hf)
    return found


def evaluate_checkpoints(run_dir, datasets: Sequence[str], fmt: str = "zero_shot_cot", limit: Optional[int] = None,
                         tokenizer: Optional[str] = None, device: Optional[str] = None, shots: int = 4,
                         seed: int = 0, data_dir=None, pool=None, **gen) -> list[dict]:
    """Score every kept checkpoint of a run on `datasets` (DeepSpeed ones exported to HF first, see
    `checkpoint_steps`; with `pool`, an engine.workers.DevicePool, several at once); append one row per step to
    RUN/test_scores.jsonl ({"step", "<dataset>_acc", "<dataset>_ci": [lo, hi], "<dataset>_n", "<dataset>_split"}).
    A (step, dataset) the file already holds on as many items with the same `score_settings` is
    skipped (resumable; a step's row holds only the datasets it lacked). Returns the rows written."""
    rd = RunDir(run_dir)  # a pipeline run dir opens its train/
    run = rd.root
    steps = checkpoint_steps(run, convert=True)
    if not steps:
        raise FileNotFoundError(f"{rd.checkpoints}: no step-*/ dir with an HF model (config.json) or a "
                                f"complete DeepSpeed checkpoint (complete.json) to evaluate")
    scores_file = rd.test_scores_path
    tok_path = tokenizer or (str(rd.best) if (rd.best / "tokenizer_config.json").exists() else None)
    # The run's own data options: the synthetic world and the GSM8K dev split depend on them, and
    # scoring on differently drawn items could overlap the training data.
    opts = run_data_options(run)
    recipe_data_dir = opts.pop("data_dir", None)
    data_dir = data_dir if data_dir is not None else recipe_data_dir
    data = {name: first_items(load_dataset_by_name(name, data_dir, **opts), limit) for name in datasets}
    exemplars = {name: _exemplars(fmt, shots, seed, data_dir, name, opts) for name in datasets}
    ood_dev_size = opts.get("ood_dev_size", OOD_DEV_SIZE)
    job_device = None if pool is not None else device  # a pool's worker runs on its own device
    settings = score_settings(fmt, shots, seed, gen)
    done = scored_before(rd.test_scores())
    jobs = []
    for step, path in sorted(steps.items()):
        left = {name: items for name, items in data.items()
                if (step, name, len(items), _settings_key(settings)) not in done}
        if left:
            jobs.append((step, str(path), tok_path, job_device, left, exemplars, fmt, data_dir, seed, ood_dev_size,
                         gen, settings))
    # with a pool, the checkpoints are scored side by side; each row is written once it and the
    # earlier steps' are done, so an interrupted run keeps what it scored
    if pool is not None:
        futures = [pool.submit(_score_step, *job) for job in jobs]
        rows = (f.result() for f in futures)
    else:
        rows = (_score_step(*job) for job in jobs)
    written = []
    for row in rows:
        with open(scores_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        written.append(row)
    return written


def score_settings(fmt: str, shots: int, seed: int, gen: dict) -> dict:
    """What decides a test_scores.jsonl row's numbers besides the checkpoint and the items (progress
    bars and batch size do not; shots only for in-context formats)."""
    return {"format": fmt, "shots": shots if fmt.startswith("in_context") else 0, "seed": seed,
            "max_new_tokens": gen.get("max_new_tokens", CLI_DEFAULTS["max_new_tokens"]),
            "num_beams": gen.get("num_beams", CLI_DEFAULTS["num_beams"])}


def scored_before(rows: Sequence[dict]) -> set:
    """(step, dataset, n, settings) of every score in test_scores.jsonl rows; rows written before
    settings were recorded match no settings, so they are scored again."""
    done = set()
    for row in rows:
        settings = row.get("settings")
        key = _settings_key(settings) if isinstance(settings, dict) else None
        done.update((row["step"], k[:-4], row.get(f"{k[:-4]}_n"), key) for k in row if k.endswith("_acc"))
    return done


def _settings_key(settings: dict) -> tuple:
    return tuple(sorted(settings.items()))


def _score_step(step: int, path: str, tok_path, device, data: dict, exemplars: dict, fmt: str, data_dir, seed: int,
                ood_dev_size: int, gen: dict, settings: dict) -> dict:
    """One checkpoint's test_scores.jsonl row (module level, so a DevicePool worker can run it)."""
    model, tok = load_model_and_tokenizer(path, tok_path, device)
    row: dict = {"step": step}
    for name, examples in data.items():
        r = evaluate_model(model, tok, examples, name, fmt=fmt, exemplars=exemplars[name], data_dir=data_dir,
                           seed=seed, **gen)
        row.update({f"{name}_acc": r.accuracy, f"{name}_ci": [r.ci_low, r.ci_high], f"{name}_n": r.n,
                    f"{name}_split": split_label(name, "test", ood_dev_size)})
    row["settings"] = settings
    return row


# ---------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(formatter_class=HelpFormatter, prog="specialize eval", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF model dir or hub id (the tokenizer is read from it too), "
                                     "or a run's DeepSpeed checkpoints/step-XXXXXX (exported to HF first)")
    src.add_argument("--predictions", help="JSONL of {id, prediction} or teacher records {qid, text, gold}")
    src.add_argument("--run", help="a training run dir: score every checkpoint, append RUN/test_scores.jsonl")
    p.add_argument("--datasets", default=None,
                   help=f"comma list of gsm8k, multiarith, asdiv, svamp, bbh, bbh/<task>, gsm8k_dev, synthetic/<split> "
                        f"(default {DEFAULT_DATASETS}; for teacher records: every dataset in the file)")
    p.add_argument("--format", default=None,
                   help=f"one of {', '.join(FORMATS)} (hyphens accepted; default: zero_shot_cot, with --run the "
                        f"recipe's eval.format)")
    p.add_argument("--shots", type=int, default=None,
                   help="exemplars for in-context formats, from the training pool (GSM8K train minus dev; "
                        "synthetic/train; default 4, with --run the recipe's data.shots)")
    p.add_argument("--limit", type=int, default=None, help="first N examples of each dataset")
    p.add_argument("--split", choices=SPLIT_PARTS, default="test",
                   help="for the OOD sets (multiarith, asdiv, svamp, synthetic/ood_*): their test part (default), "
                        "the dev part held out for model selection, or all items")
    p.add_argument("--ood-dev-size", type=int, default=OOD_DEV_SIZE,
                   help=f"size of each OOD set's dev part (default {OOD_DEV_SIZE}, the recipes' data.ood_dev_size)")
    p.add_argument("--data-dir", default=None, help="local folder laid out like shared/data (default: the hub)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir when the model dir has none")
    p.add_argument("--batch-size", type=int, default=None, help="prompts per generate call (default 32; with --run "
                                                                 "the recipe's eval.batch_size)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="most generated tokens per answer (default 256; with --run the recipe's eval.max_new_tokens)")
    p.add_argument("--num-beams", type=int, default=None,
                   help="beam width (1 = greedy, as the paper reports; with --run the recipe's eval.num_beams)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--workers", type=int, default=1,
                   help="with --run: checkpoints scored at once, one process each (cuda:0..N-1, or a share "
                        "of the CPU threads each)")
    p.add_argument("--seed", type=int, default=None,
                   help="exemplar draw and bootstrap seed (default 0; with --run the recipe's train.seed)")
    p.add_argument("--out", default=None, help="output dir for results.json, results.md, predictions-*.jsonl")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    defaults = CLI_DEFAULTS
    if args.run:
        try:
            defaults = {**CLI_DEFAULTS, **run_eval_options(args.run)}
        except (OSError, ValueError) as e:
            print(f"specialize eval: {e}", file=sys.stderr)
            return 2
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    fmt = args.format.replace("-", "_")
    if fmt not in FORMATS:
        print(f"specialize eval: unknown --format {args.format!r}; known: {', '.join(FORMATS)}", file=sys.stderr)
        return 2
    names = [d.strip() for d in (args.datasets or DEFAULT_DATASETS).split(",") if d.strip()]
    opts = dict(fmt=fmt, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                num_beams=args.num_beams, data_dir=args.data_dir, seed=args.seed, progress=not args.quiet)
    if args.workers < 1 or (args.workers > 1 and not args.run):
        print("specialize eval: --workers must be >= 1, and more than 1 needs --run", file=sys.stderr)
        return 2
    if args.run:
        run_opts = dict(limit=args.limit, tokenizer=args.tokenizer, device=args.device, shots=args.shots, **opts)
        if args.workers > 1:
            from specialize.engine.workers import DevicePool
            with DevicePool(args.workers, args.device, what="--workers") as pool:
                rows = evaluate_checkpoints(args.run, names, pool=pool, **run_opts)
        else:
            rows = evaluate_checkpoints(args.run, names, **run_opts)
        for row in rows:
            print(json.dumps(row))
        if not rows:
            print(f"specialize eval: nothing left to score: {RunDir(args.run).test_scores_path} already holds "
                  f"{', '.join(names)} for every checkpoint, on as many items, with format {fmt}, "
                  f"max_new_tokens {args.max_new_tokens}, num_beams {args.num_beams}, seed {args.seed}",
                  file=sys.stderr)
        return 0
    if args.out is None:
        print("specialize eval: --out DIR is required with --model / --predictions", file=sys.stderr)
        return 2
    results: dict[str, EvalResult] = {}
    if args.predictions:
        # Teacher records carry their own dataset names: only an explicit --datasets filters them.
        wanted = names if args.datasets else ()
        try:
            found = read_prediction_file(args.predictions, wanted or names, args.data_dir, filter_records=bool(wanted))
        except (OSError, ValueError) as e:
            print(f"specialize eval: {e}", file=sys.stderr)
            return 2
        for name, (texts, examples) in found.items():
            keep = first_indices(examples, args.limit)
            texts, examples = [texts[i] for i in keep], [examples[i] for i in keep]
            results[name] = score_predictions(texts, examples, name, args.seed)
            results[name].split = scored_part(name, examples, args.data_dir, args.ood_dev_size)
        if not results:
            print(f"specialize eval: {args.predictions}: nothing to score for {', '.join(names)}", file=sys.stderr)
            return 2
        meta = {"predictions": str(args.predictions)}
    else:
        model, tok = load_model_and_tokenizer(args.model, args.tokenizer, args.device)
        for name in names:
            examples = first_items(load_dataset_by_name(name, args.data_dir, split=args.split,
                                                        ood_dev_size=args.ood_dev_size), args.limit)
            exemplars = _exemplars(fmt, args.shots, args.seed, args.data_dir, name)
            results[name] = evaluate_model(model, tok, examples, name, exemplars=exemplars, **opts)
            results[name].split = split_label(name, args.split, args.ood_dev_size)
        meta = {"model": args.model, "format": fmt, "num_beams": args.num_beams, "limit": args.limit}
    path = write_results(args.out, results, meta)
    print(markdown_table(results))
    print(f"[eval] wrote {path}")
    return 0


def _exemplars(fmt: str, shots: int, seed: int, data_dir, dataset: str, opts: Optional[dict] = None) -> list[Example]:
    """In-context exemplars from the training pool of `dataset`'s world (never its test items):
    synthetic/train for the synthetic world, GSM8K train minus dev for everything else."""
    if not fmt.startswith("in_context"):
        return []
    pool = "synthetic/train" if dataset.startswith("synthetic") else "gsm8k_train"
    return draw_exemplars(load_dataset_by_name(pool, data_dir, **(opts or {})), shots, seed)


# The CLI's defaults without --run; with --run the run's recipe.yaml gives them (run_eval_options).
CLI_DEFAULTS = {"format": "zero_shot_cot", "shots": 4, "seed": 0, "batch_size": 32, "max_new_tokens": 256,
                "num_beams": 1}


def run_eval_options(run_dir) -> dict:
    """The evaluation settings the pipeline's eval stage uses for that run (stages.score_every_checkpoint),
    from RUN/recipe.yaml (RUN: the engine's folder or a pipeline run dir), keyed like the CLI's options;
    {} without a recipe."""
    recipe = RunDir(run_dir).recipe()
    if recipe is None:
        return {}
    e = recipe.eval
    opts = {"format": e.format, "shots": recipe.data.shots, "seed": recipe.train.seed, "batch_size": e.batch_size,
            "max_new_tokens": e.max_new_tokens, "num_beams": e.num_beams}
    return {k: v for k, v in opts.items() if v is not None}


def run_data_options(run_dir) -> dict:
    """data_dir, dev_size, seed (train.seed) and synthetic sizes from RUN/recipe.yaml, as the pipeline
    loads data for that run; {} without a recipe."""
    recipe = RunDir(run_dir, find_train=False).recipe()
    if recipe is None:
        return {}
    data = recipe.data
    opts = {"data_dir": data.data_dir, "dev_size": data.dev_size, "seed": recipe.train.seed,
            "sizes": data.synthetic_sizes or None, "ood_dev_size": data.ood_dev_size}
    return {k: v for k, v in opts.items() if v is not None}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
