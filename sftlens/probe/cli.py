"""`sftlens probe` (probe facts into a store) and `sftlens probe stats` (a store's level table)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sftlens.config import add_config_arguments, config_from_args
from sftlens.data import add_fact_arguments, fact_set_from_args, select_from_args
from sftlens.errors import SftlensError
from sftlens.probe.records import ProbeConfig
from sftlens.probe.store import default_store, load_probe, process_shard, read_store_meta, run_probe
from sftlens.probe.tables import write_level_tables


def _store_from_args(args, config: ProbeConfig) -> Path:
    if args.store:
        return Path(args.store)
    if not args.model:
        raise SftlensError("give --store, or --model (and the probe settings) to find the default store")
    return default_store(args.model, config)


def _run(args: argparse.Namespace) -> None:
    config = config_from_args(ProbeConfig, args)
    if args.action == "stats":
        store = _store_from_args(args, config)
        records = load_probe(store)
        if not records:
            raise SftlensError(f"{store}: no probe records yet")
        fact_set = fact_set_from_args(args) if args.facts else None
        # The prompt style the store was probed with (left out of its settings at the default, plain).
        style = read_store_meta(store)["settings"].get("question_prompt", "plain") if store.is_dir() \
            else config.question_prompt
        print(write_level_tables(records.values(), store if store.is_dir() else store.parent,
                                 fact_set and fact_set.domains(), fact_set and fact_set.topics(), style), end="")
        return
    if not args.model:
        raise SftlensError("--model is required to probe")
    fact_set, facts = select_from_args(args)
    domains, topics = (fact_set.domains(), fact_set.topics()) if args.facts else (None, None)
    store = _store_from_args(args, config)
    records = run_probe(args.model, facts, config, store)
    if process_shard()[0] != 0:  # under accelerate launch, the main process reports
        return
    print(f"store: {store} ({len(records)} facts of this selection)")
    print(write_level_tables(load_probe(store).values(), store, domains, topics, config.question_prompt), end="")


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "probe", help="measure the base model's mastery of facts (R_k, levels)",
        description="Probe facts (default action) or print the level table of a store (`probe stats`).",
        epilog="Defaults are the paper's (21 templates x 10 samples, 32 tokens). A quick CPU demo: "
               "--templates 0,1,2,3,4 --samples 4 --max-new-tokens 12 --stop-at-newline (= probe.FAST_PROBE). "
               "Several GPUs: accelerate launch -m sftlens probe ...; several CPU processes: "
               "torchrun --nproc_per_node N -m sftlens probe ...",
    )
    parser.add_argument("action", nargs="?", choices=("run", "stats"), default="run", help="run (default) or stats")
    parser.add_argument("--model", help="built-in name, local folder or hub id")
    add_fact_arguments(parser)
    parser.add_argument("--store", default=None, help="probe store folder (default: sftlens-probes/<model>-<settings key>)")
    add_config_arguments(parser, ProbeConfig)
    parser.set_defaults(func=_run)
