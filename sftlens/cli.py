"""`sftlens` command line: one subcommand per pipeline stage, registered by the stage itself.

`COMMANDS` is the one table of verbs: each names the module whose `add_cli(subparsers)` defines it
and a one-line summary for `sftlens --help`. Only the module of the verb being run is imported, so
`sftlens --help` does not import torch.

Terminal output (`_terminal`): transformers' own bars ("Loading weights", "Writing model shards") are
always off; `--quiet` (before or after the verb) turns off every progress bar and a verb's step lines,
leaving warnings, errors and the verb's result lines.
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
    "demo": ("sftlens.demo", "minutes on a CPU: teach SmolLM2 facts, fine-tune it, audit what it forgot and the repairs"),
    "report": ("sftlens.study.report.page", "a study's report (HTML + Markdown), rebuilt from its database"),
    "audit": ("sftlens.audit", "audit a fine-tune made elsewhere against its base: forgotten, learned, which repair helps"),
}


QUIET_HELP = "no progress bars or step lines: only warnings, errors and the results"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with `command`'s module loaded (every module with None); other verbs are
    listed with their summary only."""
    parser = argparse.ArgumentParser(
        prog="sftlens",
        description="What supervised fine-tuning did to your model's knowledge, and how to undo the harm.",
    )
    parser.add_argument("--version", action="version", version=f"sftlens {__version__}")
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)
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
    for verb in _verb_parsers(parser):
        # after the verb too; SUPPRESS: a verb's parser without the flag leaves the top-level value alone
        verb.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP)
    return parser


def _verb_parsers(parser: argparse.ArgumentParser):
    """Every verb's parser under `parser`, nested ones (`study run`) included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for verb in dict.fromkeys(action.choices.values()):  # an alias shares its verb's parser
                yield verb
                yield from _verb_parsers(verb)


def _command(argv: list[str]) -> str | None:
    """The verb of a command line (the first argument that is not an option), if any."""
    return next((arg for arg in argv if not arg.startswith("-")), "")


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("transformers").setLevel(logging.ERROR)


@contextlib.contextmanager
def _terminal(quiet: bool):
    """The command's progress bars. transformers draws its own bars in `from_pretrained` ("Loading
    weights") and `save_pretrained` ("Writing model shards"), whatever its loggers' level: off (its switch
    turns off the hub's too, so downloads get theirs back). With `quiet`, every tqdm bar is off, whoever
    draws it and whatever `disable` it is given (sftlens's, the Trainer's, the hub's). All as it was after
    (`main` runs in-process in tests)."""
    from huggingface_hub import utils as hub
    from tqdm import std
    from transformers.utils import logging as hf_logging

    hub_bars, hf_bars = not hub.are_progress_bars_disabled(), hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if hub_bars and not quiet:
        hub.enable_progress_bars()
    init = vars(std.tqdm)["__init__"]
    if quiet:
        unbound = std.tqdm.__init__

        def silent(self, *args, **kwargs):
            unbound(self, *args, **{**kwargs, "disable": True})

        std.tqdm.__init__ = silent
    try:
        yield
    finally:
        std.tqdm.__init__ = init
        if hf_bars:
            hf_logging.enable_progress_bar()  # the hub's too
        if hub_bars:
            hub.enable_progress_bars()
        elif not hub.are_progress_bars_disabled():
            hub.disable_progress_bars()


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
        with _terminal(getattr(args, "quiet", False)), _one_writer(args):
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
