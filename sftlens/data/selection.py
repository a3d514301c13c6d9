"""The fact-selection flags every stage's CLI shares: where the facts come from (`--data-dir` for
EntityQuestions, or `--facts` for any fact set) and which of them (`--relations`, `--split`, `--limit`)."""

from __future__ import annotations

import argparse

from sftlens.data.facts import Fact, FactSet, first_per_relation, load_facts
from sftlens.data.factset import load_fact_set
from sftlens.errors import SftlensError


def add_fact_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="EntityQuestions folder (default: $SFTLENS_DATA_DIR)")
    parser.add_argument("--facts", help="a fact set instead: a folder from `sftlens data import`, or a native JSONL file")
    parser.add_argument("--in-domain", help="with --facts: comma list of topics that count as in-domain "
                                            "(default: as the set declares, else all)")


def add_fact_arguments(parser: argparse.ArgumentParser, split: str = "test") -> None:
    """--data-dir / --facts / --in-domain, and --relations, --split, --limit."""
    add_fact_source_arguments(parser)
    parser.add_argument("--relations", default="all", help="comma list of relation ids (or a fact set's topics), or in/out/all")
    parser.add_argument("--split", default=split, help="comma list of train,dev,test")
    parser.add_argument("--limit", type=int, default=None, help="first N facts per relation (or topic) and split")


def fact_set_from_args(args: argparse.Namespace, splits=None, relations=None) -> FactSet:
    """The whole fact set of --facts, or the EntityQuestions facts of `splits` and `relations`."""
    if getattr(args, "facts", None):
        if args.data_dir:
            raise SftlensError("give --facts or --data-dir, not both")
        return load_fact_set(args.facts, args.in_domain)
    if getattr(args, "in_domain", None):
        raise SftlensError("--in-domain chooses a fact set's in-domain topics: give it with --facts")
    return load_facts(args.data_dir, splits=splits or ("train", "dev", "test"), relations=relations)


def facts_from_args(args: argparse.Namespace) -> list[Fact]:
    """The facts the flags select: first --limit per relation and split, in file order."""
    return select_from_args(args)[1]


def select_from_args(args: argparse.Namespace) -> tuple[FactSet, list[Fact]]:
    """(the fact set read, the facts the flags select from it)."""
    if args.limit is not None and args.limit < 1:
        raise SftlensError(f"--limit must be positive, got {args.limit}")
    if getattr(args, "facts", None):
        fact_set = fact_set_from_args(args)
        facts = fact_set.select(args.relations, args.split, args.limit)
    else:
        fact_set = fact_set_from_args(args, args.split, args.relations)
        facts = first_per_relation(fact_set.facts, args.limit)
    if not facts:
        raise SftlensError(f"no facts for relations {args.relations} in split {args.split}")
    return fact_set, facts
