"""The `specialize` command. Each subcommand lives in the module that owns it, which exposes
`main(argv: list[str]) -> int`; the module is imported only when its command runs, so `specialize
--help` does not load torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "env": ("specialize.engine.envinfo", "print versions, CUDA and Triton-interpreter status"),
    "teacher": ("specialize.engine.teacher.cli", "sample CoT with top-k logprobs (generate) and keep correct ones (filter)"),
    "align": ("specialize.aligner.cli", "align teacher top-k distributions onto student tokens, in bulk"),
    "train": ("specialize.engine.train", "specialize a T5 student with the DeepSpeed engine"),
    "eval": ("specialize.engine.evaluation.evaluate",
             "evaluate a model (or scored predictions) on GSM8K, MultiArith, ASDiv, SVAMP, BBH"),
    "select": ("specialize.engine.evaluation.select", "pick checkpoints by in-distribution vs OOD dev signal"),
    "plot": ("specialize.engine.evaluation.plots", "draw scaling, trade-off, in-dist vs OOD and training-curve PNGs"),
    "run": ("specialize.engine.pipeline", "run a recipe's stages (teacher -> filter -> align -> train -> eval -> plot)"),
    "demo": ("specialize.engine.demo.run", "the whole paper in miniature, offline on a CPU"),
    "memory": ("specialize.engine.memory", "estimate (and --measure) memory per GPU for a model and ZeRO setup"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every parser's formatter: descriptions as written, and each option's default appended to its help
    where it has one and the help does not already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or action.default in (None, False, argparse.SUPPRESS, [])
                or "default" in text or text == argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: specialize <command> [options]", "",
             "Specialize a small T5 at multi-step reasoning by distilling a large teacher's CoT.", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `specialize <command> --help` for a command's options."]
    return "\n".join(lines)


def _load(name: str):
    return importlib.import_module(COMMANDS[name][0])


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
