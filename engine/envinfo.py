"""`specialize env`: what this machine offers the engine."""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import sys

from specialize.engine.cli import HelpFormatter

PACKAGES = ["torch", "triton", "deepspeed", "transformers", "datasets", "numba", "tokenizers", "tiktoken", "openai"]


def collect() -> dict:
    import torch

    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {},
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "triton_interpreter": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "cpu_count": os.cpu_count(),
    }
    for name in PACKAGES:
        try:
            info["versions"][name] = md.version(name)
        except md.PackageNotFoundError:
            info["versions"][name] = None
    return info


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter, prog="specialize env", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"python              {info['python']}  ({info['platform']})")
    for name, version in info["versions"].items():
        print(f"{name:<19} {version or 'not installed'}")
    devices = ", ".join(info["cuda_devices"]) or "-"
    print(f"cuda available      {info['cuda_available']}  ({devices})")
    print(f"triton interpreter  {'active (TRITON_INTERPRET=1)' if info['triton_interpreter'] else 'off'}")
    print(f"cpu cores           {info['cpu_count']}")
    return 0
