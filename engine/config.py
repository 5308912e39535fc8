"""Recipe configuration: one YAML file -> typed dataclasses.

A recipe has the sections model, data, teacher, aligner, loss, deepspeed, train, eval
and plot. Loading is strict: an unknown key or a value of the wrong type raises
`ConfigError` naming the full key path (`train.lr: expected float, got 'fast'`).
`--set key.path=value` overrides are parsed as YAML scalars/lists and go through the
same checks.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A recipe value is missing, unknown or of the wrong type; the message names the key path."""


@dataclass
class ModelConfig:
    # Hub id or local directory of a pretrained T5/FlanT5; None builds a random-init model from `config`.
    name_or_path: Optional[str] = None
    # Named shape (t5-v1_1-small/base/large/xl/xxl, flan-t5-*, tiny) or a path to a config.json.
    config: str = "t5-v1_1-small"
    # T5Config fields to override when building from `config` (e.g. {num_layers: 2}).
    overrides: dict[str, Any] = field(default_factory=dict)
    # Student tokenizer: hub id or local directory / tokenizer.json.
    tokenizer: Optional[str] = None
    # Recompute activations in backward: less memory, ~30% more compute.
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    # gsm8k | synthetic
    dataset: str = "gsm8k"
    # Local folder holding the benchmark files (offline); None loads from the hub.
    data_dir: Optional[str] = None
    # GSM8K train questions held out as in-distribution dev (the paper used a few hundred).
    dev_size: int = 300
    # Items of each OOD set (multiarith, asdiv, svamp, synthetic/ood_*) held out as its dev part,
    # seeded and disjoint from the test part the test stage scores (engine/data/loaders.py).
    ood_dev_size: int = 200
    # Output of the aligner (shards the engine trains on).
    aligned_dir: Optional[str] = None
    # Mixture of prompt formats and their sampling ratios.
    formats: dict[str, float] = field(default_factory=lambda: {"in_context_cot": 1.0})
    # per_batch: one format per micro-batch (the paper); mixed: formats mixed inside a batch.
    format_mixing: Literal["per_batch", "mixed"] = "per_batch"
    # Per-format micro-batch size per GPU ({format: int}), so that a micro-batch holds a similar
    # number of tokens whatever its format (the paper's conf/batch_size); a format not named, or
    # an empty mapping, uses train.micro_batch_size. Keys must be formats of data.formats.
    micro_batch_sizes: dict[str, int] = field(default_factory=dict)
    # Exemplars prepended by the in-context formats, drawn from train by seed.
    shots: int = 4
    max_source_len: int = 512
    max_target_len: int = 256
    # Synthetic mini-world only: how many questions per split.
    synthetic_sizes: dict[str, int] = field(default_factory=dict)
    # DataLoader worker processes that collate micro-batches ahead of the step (0: in the training process).
    num_workers: int = 2

    def micro_batch_size_for(self, fmt: str, default: int) -> int:
        """The micro-batch size of `fmt`: data.micro_batch_sizes[fmt], else `default`
        (train.micro_batch_size)."""
        return self.micro_batch_sizes.get(fmt, default)

    def __post_init__(self):
        for fmt, size in self.micro_batch_sizes.items():
            if fmt not in self.formats:
                raise ConfigError(f"data.micro_batch_sizes.{fmt}: not a format of data.formats "
                                  f"({', '.join(self.formats)})")
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ConfigError(f"data.micro_batch_sizes.{fmt}: expected a positive int, got {size!r}")
        if self.ood_dev_size < 0:
            raise ConfigError(f"data.ood_dev_size: expected an int >= 0, got {self.ood_dev_size}")


@dataclass
class TeacherConfig:
    backend: Literal["openai", "hf"] = "openai"
    model: Optional[str] = None
    base_url: Optional[str] = None
    # Name of the environment variable holding the API key (the key itself never enters a file).
    api_key_env: str = "OPENAI_API_KEY"
    api: Literal["completions", "chat"] = "completions"
    dataset: str = "gsm8k"
    split: str = "train"
    samples: int = 40
    temperature: float = 0.5
    max_tokens: int = 256
    top_logprobs: int = 5
    # Which distribution the stored logprobs describe. raw: the model's own softmax(logits), whatever
    # the sampling temperature; it is what OpenAI and vLLM (its default --logprobs-mode raw_logprobs)
    # return, and what the paper distilled from. sampled: the temperature-scaled distribution the
    # tokens were drawn from; SGLang returns that, and vLLM with --logprobs-mode processed_logprobs.
    # The hf backend computes the one named; for a server this declares what it returns (the API
    # cannot tell), so that two teachers' folders say what their soft targets are. Part of the
    # teacher folder's configuration hash.
    logprobs: Literal["raw", "sampled"] = "raw"
    format: str = "in_context_cot"
    shots: int = 8
    # In-context exemplars: seeded (a seeded draw from GSM8K train minus dev), complex (the 8
    # train exemplars with the most rationale lines, Fu et al. 2022's complexity-based prompt, in
    # its "Question: ... Let's think step by step" style; GSM8K only) or file (teacher.prompt_file).
    prompt: Literal["seeded", "complex", "file"] = "seeded"
    # prompt: file. A text file holding the few-shot prefix, such as the paper's own teacher prompt
    # (lib_prompt/prompt_complex.txt in FranxYao/FlanT5-CoT-Specialization, which you download: it is
    # not shipped here). Each question is appended as the paper's code does: "\nQuestion: <q>\nLet's
    # think step by step". Its content (not its path) is part of the teacher folder's hash.
    prompt_file: Optional[str] = None
    # Stop sequences sent with every request; None = the prompt style's ("\nQ:", "\nQuestion:"),
    # [] = none. Part of the teacher folder's configuration hash.
    stop: Optional[list[str]] = None
    # Cut each sample (text, tokens, logprobs, top-k) at the end of its first answer line, as the
    # paper did; the record keeps what was cut in its "cut" field.
    cut_at_answer: bool = True
    limit: Optional[int] = None
    concurrency: int = 16
    # hf backend: copies of the model, each in its own process, sampling batches at once (replica i
    # on cuda:i; on a CPU each gets its share of the threads). Each request has its own seeded
    # generator, so the samples are those of one copy up to the float rounding of batch shapes.
    replicas: int = 1
    requests_per_minute: Optional[float] = None
    tokens_per_minute: Optional[float] = None
    timeout: float = 60.0
    max_retries: int = 6
    # Optional USD per 1k tokens, for the running cost and the usage ledger.
    price_prompt_per_1k: Optional[float] = None
    price_completion_per_1k: Optional[float] = None
    out_dir: Optional[str] = None

    def __post_init__(self):
        if (self.prompt == "file") != (self.prompt_file is not None):
            raise ConfigError("teacher.prompt_file: set it exactly when teacher.prompt is file "
                              f"(prompt {self.prompt!r}, prompt_file {self.prompt_file!r})")
        if self.replicas < 1:
            raise ConfigError(f"teacher.replicas: expected an int >= 1, got {self.replicas}")
        if self.replicas > 1 and self.backend != "hf":
            raise ConfigError("teacher.replicas: only the hf backend runs model copies (a server scales "
                              "with teacher.concurrency)")


@dataclass
class AlignerConfig:
    # tiktoken name (p50k_base), a .tiktoken file, or a Hugging Face tokenizer path.
    teacher_tokenizer: str = "p50k_base"
    student_tokenizer: Optional[str] = None
    workers: int = 1
    # Half-width of the DP band for long sequences; 0 aligns the full N x M table.
    band: int = 0
    out_dir: Optional[str] = None


@dataclass
class LossConfig:
    # dm: distribution matching (sparse top-k KL + CE); sm: sample matching (CE only).
    kind: Literal["dm", "sm"] = "dm"
    # Weight of the CE on the sampled tokens; (1 - alpha) weighs the KL.
    alpha: float = 0.5
    temperature: float = 1.0
    # Teacher mass outside the top-k: none (paper), renorm, or tail (one extra bucket).
    tail: Literal["none", "renorm", "tail"] = "none"
    # Fuse lm_head + loss so the [tokens, vocab] logits never exist.
    fused_linear: bool = True
    chunk_size: Optional[int] = None
    # Sum the fused kernel's lm_head gradient over its row chunks in fp32 rather than the weight's
    # dtype: a more exact gradient when there are many chunks, for 2 bytes x vocab x d_model more memory.
    grad_weight_fp32: bool = False


@dataclass
class DeepSpeedConfig:
    # Path to a DeepSpeed JSON, or the config inline; batch fields are derived from `train`.
    config: Union[str, dict[str, Any], None] = None
    zero_stage: int = 2
    # Any of: optimizer, param.
    offload: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    output_dir: str = "runs/specialize"
    seed: int = 42
    micro_batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    grad_clip: float = 1.0
    # bf16 is the default: T5 overflows in fp16.
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    log_every: int = 10
    eval_every: int = 200
    save_every: int = 200
    keep_last: int = 2
    # Which dev signal picks the best checkpoint: in_dist, ood, or mean of the two.
    selection: Literal["in_dist", "ood", "mean"] = "in_dist"
    # Dev sets evaluated during training: one in-distribution, the rest OOD.
    dev_in_dist: str = "gsm8k_dev"
    dev_ood: list[str] = field(default_factory=lambda: ["multiarith"])
    dev_limit: Optional[int] = 200
    # Seconds a collective may wait for the other ranks before the run stops with an error naming the
    # step and the last complete checkpoint (a lost or hung node). Torch's own default: it must cover the
    # longest rank-0-only pause (dev evaluation, export of the best model) that the others wait through.
    dist_timeout_s: float = 1800.0

    def __post_init__(self):
        # keep_last 0 would delete the checkpoint just completed (a --resume then starts from step 0);
        # a zero period divides by zero after the first step. eval_every 0 turns dev evaluation off.
        for name in ("micro_batch_size", "grad_accum", "max_steps", "log_every", "save_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: expected an int >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}: expected an int >= 0, got {getattr(self, name)}")
        if self.dev_limit is not None and self.dev_limit < 1:
            raise ConfigError(f"train.dev_limit: expected an int >= 1 or null (every dev question), got {self.dev_limit}")
        if self.precision == "fp16":  # refused when the recipe loads, before any other check can hide why
            raise ConfigError(
                "train.precision=fp16: not supported. The loss kernels write the logit gradient during forward, "
                "in the logits' dtype and before DeepSpeed's loss scale is applied; its elements are about "
                "1/(vocab x tokens), below fp16's smallest value, so every gradient would silently be zero (and "
                "T5 activations overflow fp16 besides). Use train.precision=bf16 (Ampere or newer) or fp32.")


@dataclass
class EvalConfig:
    datasets: list[str] = field(default_factory=lambda: ["gsm8k", "multiarith", "asdiv", "svamp", "bbh"])
    format: str = "zero_shot_cot"
    limit: Optional[int] = None
    batch_size: int = 32
    max_new_tokens: int = 256
    num_beams: int = 1
    out_dir: Optional[str] = None
    # Questions per dataset when the eval stage scores *every* kept checkpoint for the trade-off
    # plot (RQ4); None: train.dev_limit. The selected checkpoints are scored on `limit`.
    tradeoff_limit: Optional[int] = None
    # Processes scoring models side by side in the eval stage, one model each at a time (worker i on
    # cuda:i; on a CPU each gets its share of the threads). Scores as one process does (a model is
    # scored whole by one worker).
    workers: int = 1

    def __post_init__(self):
        if self.workers < 1:
            raise ConfigError(f"eval.workers: expected an int >= 1, got {self.workers}")


@dataclass
class PlotConfig:
    # Any of: scaling, tradeoff, in_dist_vs_ood, training_curves.
    plots: list[str] = field(default_factory=list)
    out_dir: Optional[str] = None


@dataclass
class Recipe:
    name: str = "recipe"
    description: str = ""
    # Stages `specialize run` executes, in order; a stage whose outputs exist is skipped.
    stages: list[str] = field(default_factory=lambda: ["teacher", "filter", "align", "train", "eval", "plot"])
    output_dir: str = "runs/recipe"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    aligner: AlignerConfig = field(default_factory=AlignerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    plot: PlotConfig = field(default_factory=PlotConfig)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{path}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path}: expected one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        kt, vt = typing.get_args(tp)
        return {_coerce(k, kt, f"{path}.<key>"): _coerce(v, vt, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected bool, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads `1e-4` as a string: accept text that is a number.
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{path}: expected float, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected float, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected int, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected str, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported annotation {tp!r}")


def _build(cls, data: Any, path: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or '<root>'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown key {where}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def recipe_from_dict(data: dict, source: str = "<dict>") -> Recipe:
    try:
        return _build(Recipe, data, "")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (["train", "lr"], 1e-4); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"--set {text!r}: empty key path")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({err})") from None
    return keys, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `--set` strings to the raw recipe mapping (before type checks)."""
    for text in overrides or []:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k, {}), dict):
                raise ConfigError(f"--set {text!r}: {k} is not a section")
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML, apply `--set` overrides, and type-check every key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read recipe ({err.strerror})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections")
    data = apply_overrides(data, overrides or [])
    return recipe_from_dict(data, source=str(path))


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def dump_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe (every default filled in) as YAML."""
    Path(path).write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False), encoding="utf-8")


# Fields that change how a run waits or how many processes share the work, not what it computes: left
# out of every hash that decides reuse (`specialize run`'s done-markers) or warns on --resume, so
# raising a timeout or adding a teacher copy never invalidates a run.
UNHASHED = {"train": ("dist_timeout_s",), "teacher": ("replicas",), "eval": ("workers",)}
# Fields added after runs existed, hashed only away from their default, so a finished stage of those
# runs stays done across the upgrade that added them.
HASHED_WHEN_SET = {"loss": {"grad_weight_fp32": False}}


# What the hf backend stored before teacher.logprobs existed: the distribution it sampled from.
HF_LEGACY_LOGPROBS = "sampled"


def logprobs_change_the_samples(backend: str, logprobs: str) -> bool:
    """Whether teacher.logprobs changes what the teacher stage computes: only on the hf backend, which
    computes the distribution it names, and there not at the value it had before the setting existed.
    For a server it declares what the server sends, and the samples are the same whatever it says."""
    return backend == "hf" and logprobs != HF_LEGACY_LOGPROBS


def hashed_dict(recipe: Recipe) -> dict:
    """The recipe as a mapping, without the UNHASHED fields, and without teacher.logprobs where it does
    not change what is computed (`logprobs_change_the_samples`): a recipe's finished stages stay done
    across the upgrade that added it."""
    d = recipe_to_dict(recipe)
    for section, names in UNHASHED.items():
        d[section] = {k: v for k, v in d[section].items() if k not in names}
    for section, defaults in HASHED_WHEN_SET.items():
        d[section] = {k: v for k, v in d[section].items() if k not in defaults or v != defaults[k]}
    if not logprobs_change_the_samples(d["teacher"]["backend"], d["teacher"]["logprobs"]):
        del d["teacher"]["logprobs"]
    prompt_file = d["teacher"].pop("prompt_file")
    if prompt_file is not None:  # what the prompt says, not where the file lies
        d["teacher"]["prompt_file_sha256"] = prompt_file_sha256(prompt_file)
    return d


def read_prompt_file(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"teacher.prompt_file: cannot read {path} ({err.strerror})") from None


def prompt_file_sha256(path: str) -> str:
    import hashlib
    return hashlib.sha256(read_prompt_file(path).encode("utf-8")).hexdigest()[:16]


def recipe_hash(recipe: Recipe) -> str:
    from specialize.engine.io_helpers import settings_hash
    return settings_hash(hashed_dict(recipe))
