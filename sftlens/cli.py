"""`sftlens` command line: one subcommand per pipeline stage, registered by the stage itself.

`COMMANDS` is the one table of verbs: each names the module whose `add_cli(subparsers)` defines it
and a one-line summary for `sftlens --help`. Only the module of the verb being run is imported, so
`sftlens --help` does not import torch.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys

from sftlens import __version__
from sftlens.errors import SftlensError
from sftlens.io import exclusive_writer

COMMANDS = {
    "models": ("sftlens.models", "prepare the built-in models"),
    "data": ("sftlens.data.stats", "fact sets: check, import (EntityQuestions, PopQA, TriviaQA, JSONL), stats"),
    "inject": ("sftlens.inject", "teach the base model a known set of facts in statement form (a knowledge testbed)"),
    "probe": ("sftlens.probe.cli", "measure the base model's mastery of facts (R_k, levels)"),
    "split": ("sftlens.split", "divide probed facts into SFT sets by mastery level"),
    "train": ("sftlens.train", "supervised fine-tuning on an SFT set (JSONL)"),
    "eval": ("sftlens.evaluate", "accuracy per mastery level (greedy decoding)"),
    "kl": ("sftlens.analysis.kl", "first-token KL between a fine-tuned model and its base (Figure 5)"),
    "deltas": ("sftlens.analysis.deltas", "how concentrated the fine-tuning update is (Table 3)"),
    "restore": ("sftlens.restore", "restore the most changed parameters to their base values"),
    "repair": ("sftlens.repair", "undo SFT's harm in weight space: restore, wise, dare, trim or spectral, for a sweep of values"),
    "study": ("sftlens.study", "the whole grid as one resumable study"),
    "demo": ("sftlens.study", "the demo study on SmolLM2-135M (CPU), then its report"),
    "report": ("sftlens.study.report.page", "a study's report (HTML + Markdown), rebuilt from its database"),
    "audit": ("sftlens.audit", "audit a fine-tune made elsewhere against its base: forgotten, learned, which repair helps"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with `command`'s module loaded (every module with None); other verbs are
    listed with their summary only."""
    parser = argparse.ArgumentParser(
        prog="sftlens",
        description="What supervised fine-tuning did to your model's knowledge, and how to undo the harm.",
    )
    parser.add_argument("--version", action="version", version=f"sftlens {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = {COMMANDS[command][0]} if command in COMMANDS else {m for m, _ in COMMANDS.values()}
    if command is not None and command not in COMMANDS:
        wanted = set()  # argparse names the unknown verb
    loaded = set()
    for name, (module, summary) in COMMANDS.items():
        if module in wanted:
            if module not in loaded:
                importlib.import_module(module).add_cli(subparsers)
                loaded.add(module)
        else:
            subparsers.add_parser(name, help=summary)
    return parser


def _command(argv: list[str]) -> str | None:
    """The verb of a command line (the first argument that is not an option), if any."""
    return next((arg for arg in argv if not arg.startswith("-")), "")


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _one_writer(args):
    """A subcommand that writes a folder in place (`writes` names its argument) holds that folder's
    lock; under `accelerate launch` / `torchrun` only rank 0 takes it, as the ranks share the folder."""
    writes = getattr(args, "writes", None)
    target = getattr(args, writes) if writes else None
    if target is None or int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    return exclusive_writer(target, f"{args.command} output")


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_command(argv)).parse_args(argv)
    try:
        with _one_writer(args):
            result = args.func(args)
    except SftlensError as err:
        print(f"sftlens: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno is None:
            raise
        # a full disk, a read-only folder, a missing permission: the file and the reason, no traceback
        where = f"{err.filename}: " if err.filename else ""
        print(f"sftlens: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sftlens: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
