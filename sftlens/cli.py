"""`sftlens` command line: one subcommand per pipeline stage, registered by the stage itself.

Each module below exposes `add_cli(subparsers)`; a stage appears in `sftlens --help` only once
its module exists, so the help lists working subcommands only.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from sftlens import __version__
from sftlens.errors import SftlensError

COMMAND_MODULES = (
    "sftlens.models",
    "sftlens.data.stats",
    "sftlens.probe",
    "sftlens.split",
    "sftlens.train",
    "sftlens.evaluate",
    "sftlens.analysis.kl",
    "sftlens.analysis.deltas",
    "sftlens.restore",
    "sftlens.study",
    "sftlens.report",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sftlens",
        description="What supervised fine-tuning did to your model's knowledge, and how to undo the harm.",
    )
    parser.add_argument("--version", action="version", version=f"sftlens {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli(subparsers)
    return parser


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("transformers").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except SftlensError as err:
        print(f"sftlens: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sftlens: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
