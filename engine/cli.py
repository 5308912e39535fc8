"""The `specialize` command. Each subcommand lives in the module that owns it.

A subcommand's module exposes `main(argv: list[str]) -> int`. Where that module does not
exist yet, the command says which capability is missing and exits 2: it never pretends
to work.
"""
from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help, issue that delivers it)
COMMANDS = {
    "env": ("specialize.engine.envinfo", "print versions, CUDA and Triton-interpreter status", 2),
    "teacher": ("specialize.engine.teacher.cli", "sample CoT with top-k logprobs (generate) and keep correct ones (filter)", 5),
    "align": ("specialize.aligner.cli", "align teacher top-k distributions onto student tokens, in bulk", 3),
    "train": ("specialize.engine.train", "specialize a T5 student with the DeepSpeed engine", 6),
    "eval": ("specialize.engine.evaluate", "evaluate a model (or scored predictions) on GSM8K, MultiArith, ASDiv, SVAMP, BBH", 7),
    "select": ("specialize.engine.select", "pick checkpoints by in-distribution vs OOD dev signal", 7),
    "plot": ("specialize.engine.plots", "draw scaling, trade-off, in-dist vs OOD and training-curve PNGs", 7),
    "run": ("specialize.engine.pipeline", "run a recipe's stages (teacher -> filter -> align -> train -> eval -> plot)", 8),
    "demo": ("specialize.engine.demo", "the whole paper in miniature, offline on a CPU", 8),
    "memory": ("specialize.engine.memory", "estimate (and --measure) memory per GPU for a model and ZeRO setup", 9),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: specialize <command> [options]", "",
             "Specialize a small T5 at multi-step reasoning by distilling a large teacher's CoT.", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_, _) in COMMANDS.items()]
    lines += ["", "Run `specialize <command> --help` for a command's options."]
    return "\n".join(lines)


def _load(name: str):
    module = COMMANDS[name][0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        # Only a missing *subcommand module* means "not available"; a missing dependency is a real error.
        if err.name and (module == err.name or module.startswith(err.name + ".")):
            return None
        raise


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"specialize: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = _load(name)
    if module is None:
        _, help_, issue = COMMANDS[name]
        print(f"specialize {name}: not yet available ({help_}; tracked in issue #{issue}).", file=sys.stderr)
        return 2
    from specialize.engine.config import ConfigError
    from specialize.engine.data import DataError
    try:
        return int(module.main(rest) or 0)
    except (ConfigError, DataError) as err:
        # bad recipes and bad input files are the user's to fix: the message, not a traceback
        print(f"specialize {name}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
