"""`specialize teacher generate|filter`.

  specialize teacher generate --dataset gsm8k --split train --backend openai --model M [--base-url URL]
      [--api completions|chat] --samples 40 --temperature 0.5 --max-tokens 256 --top-logprobs 5 [--logprobs raw|sampled]
      --format in_context_cot --shots 8 [--prompt seeded|complex] [--no-cut] [--data-dir DIR] [--limit N] --out DIR
      (stop sequences: --set 'teacher.stop=["\nQ:"]'; default the prompt style's, [] for none)
  specialize teacher generate --recipe R.yaml [--set teacher.samples=8] [flags override the recipe]
  specialize teacher filter --in DIR --out DIR
"""
from __future__ import annotations

import argparse
import sys

from specialize.engine.cli import HelpFormatter

# flag -> (TeacherConfig field, type, what it sets); every flag defaults to None so only the given ones
# override the recipe, and its help names the recipe field and that field's default.
_FLAGS = {
    "--backend": ("backend", str, "openai (any OpenAI-compatible server) or hf (a local transformers LM)"),
    "--model": ("model", str, "the teacher model: the server's model name, or an HF path / hub id"),
    "--base-url": ("base_url", str, "the server's URL, e.g. http://host:8000/v1 for vLLM or SGLang"),
    "--api": ("api", str, "completions (few-shot prompt, the paper's setting) or chat"),
    "--api-key-env": ("api_key_env", str, "environment variable holding the API key"),
    "--dataset": ("dataset", str, "questions to answer: gsm8k, or synthetic"),
    "--split": ("split", str, "split of --dataset (GSM8K train leaves out the dev questions)"),
    "--samples": ("samples", int, "samples per question"),
    "--temperature": ("temperature", float, "sampling temperature"),
    "--max-tokens": ("max_tokens", int, "most tokens per sample"),
    "--top-logprobs": ("top_logprobs", int, "top-k logprobs kept per sampled token"),
    "--logprobs": ("logprobs", str, "what the logprobs are: raw (the model's softmax; OpenAI, vLLM's default) "
                                    "or sampled (temperature-scaled; SGLang, vLLM processed_logprobs)"),
    "--format": ("format", str, "prompt format (in_context_cot, zero_shot_cot, ...)"),
    "--shots": ("shots", int, "in-context exemplars per prompt"),
    "--prompt": ("prompt", str, "exemplar choice: seeded, complex (the most reasoning steps) or file"),
    "--prompt-file": ("prompt_file", str, "with --prompt file: the few-shot prefix, e.g. the paper's "
                                          "lib_prompt/prompt_complex.txt"),
    "--limit": ("limit", int, "answer only the first N questions"),
    "--concurrency": ("concurrency", int, "requests in flight"),
    "--replicas": ("replicas", int, "hf backend: model copies sampling at once, one process each (cuda:0..N-1)"),
    "--requests-per-minute": ("requests_per_minute", float, "client-side request rate limit"),
    "--tokens-per-minute": ("tokens_per_minute", float, "client-side token rate limit"),
    "--timeout": ("timeout", float, "seconds per request before it is retried"),
    "--max-retries": ("max_retries", int, "retries of a failed request (exponential backoff)"),
    "--price-prompt-per-1k": ("price_prompt_per_1k", float, "USD per 1k prompt tokens, for the cost ledger"),
    "--price-completion-per-1k": ("price_completion_per_1k", float, "USD per 1k completion tokens"),
    "--out": ("out_dir", str, "output folder (resumable: rerun the same command to continue)"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(formatter_class=HelpFormatter, prog="specialize teacher", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", formatter_class=HelpFormatter,
                       help="sample CoT solutions with top-k logprobs (resumable)")
    g.add_argument("--recipe", help="recipe YAML; its teacher section gives the defaults")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override (repeatable)")
    from specialize.engine.config import TeacherConfig
    defaults = TeacherConfig()
    for flag, (field, kind, what) in _FLAGS.items():
        g.add_argument(flag, dest=field, type=kind, default=None,
                       help=f"{what} (recipe: teacher.{field}, default {getattr(defaults, field)!r})")
    g.add_argument("--data-dir", help="folder holding gsm8k/, multiarith/, ... (default: the recipe's data.data_dir)")
    g.add_argument("--seed", type=int, default=None,
                   help="seed of the exemplar draw (default: the recipe's train.seed, 42 without a recipe, "
                        "as `specialize run` uses; part of the folder's configuration hash)")
    g.add_argument("--samples-per-request", type=int, default=None,
                   help="samples asked for in one request (default: all of a question's)")
    g.add_argument("--retry-base-delay", type=float, default=1.0, help="first backoff delay in seconds")
    g.add_argument("--no-cut", dest="cut_at_answer", action="store_false", default=None,
                   help="keep each sample whole instead of cutting it after its first answer line")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    f = sub.add_parser("filter", formatter_class=HelpFormatter, help="keep the samples whose answer matches the gold")
    f.add_argument("--in", dest="in_dir", required=True, help="folder written by `teacher generate`")
    f.add_argument("--out", dest="out_dir", required=True, help="folder for the kept samples (shards)")
    return p


def _config(args):
    from specialize.engine.config import apply_overrides, load_recipe, recipe_from_dict, recipe_to_dict
    recipe = load_recipe(args.recipe, args.set) if args.recipe else recipe_from_dict(apply_overrides({}, args.set))
    given = {field: getattr(args, field) for field, *_ in _FLAGS.values() if getattr(args, field) is not None}
    if getattr(args, "cut_at_answer", None) is not None:
        given["cut_at_answer"] = args.cut_at_answer
    if "format" in given:
        given["format"] = given["format"].replace("-", "_")  # in-context-cot == in_context_cot
    if given:  # through the recipe's own checks, so a bad flag is named like a bad recipe field
        data = recipe_to_dict(recipe)
        data["teacher"].update(given)
        recipe = recipe_from_dict(data, source="command line")
    return recipe, recipe.teacher


def load_questions(name: str, split: str, data_dir, recipe) -> list:
    """The split the teacher answers; GSM8K train leaves out the held-out dev questions."""
    from specialize.engine.data import load_dataset_by_name
    if name == "synthetic":
        name = f"synthetic/{split}"
    if name == "gsm8k" and split == "train":
        name = "gsm8k_train"
    return list(load_dataset_by_name(name, data_dir=data_dir, split=split, dev_size=recipe.data.dev_size,
                                     seed=recipe.train.seed, sizes=recipe.data.synthetic_sizes or None))


def _generate(args) -> int:
    from .generate import generate
    recipe, cfg = _config(args)
    if not cfg.out_dir:
        raise ValueError("no output folder: give --out (or teacher.out_dir in the recipe)")
    pool = load_questions(cfg.dataset, cfg.split, args.data_dir or recipe.data.data_dir, recipe)
    questions = pool[: cfg.limit] if cfg.limit else pool
    seed = recipe.train.seed if args.seed is None else args.seed
    summary = generate(cfg, questions, cfg.out_dir, exemplar_pool=pool, seed=seed,
                       samples_per_request=args.samples_per_request, retry_base_delay=args.retry_base_delay,
                       progress=not args.no_progress)
    if summary["stored"] < summary["expected"]:
        print(f"specialize teacher: {summary['expected'] - summary['stored']} samples still missing "
              f"(see {cfg.out_dir}/failures.jsonl); rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    from specialize.engine.config import ConfigError

    from .backends import TeacherBackendError
    from .records import ResumeError
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        from .filter import filter_samples
        filter_samples(args.in_dir, args.out_dir)
        return 0
    except (ConfigError, ResumeError, TeacherBackendError, FileNotFoundError, ValueError) as e:
        print(f"specialize teacher: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
