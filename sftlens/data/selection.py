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
    return _fact_set(args.data_dir, getattr(args, "facts", None), getattr(args, "in_domain", None), splits, relations)


def _fact_set(data_dir, facts, in_domain, splits=None, relations=None) -> FactSet:
    if facts:
        if data_dir:
            raise SftlensError("give --facts or --data-dir, not both")
        return load_fact_set(facts, in_domain)
    if in_domain:
        raise SftlensError("--in-domain chooses a fact set's in-domain topics: give it with --facts")
    return load_facts(data_dir, splits=splits or ("train", "dev", "test"), relations=relations)


def facts_from_args(args: argparse.Namespace) -> list[Fact]:
    """The facts the flags select: first --limit per relation and split, in file order."""
    return select_from_args(args)[1]


def select_from_args(args: argparse.Namespace) -> tuple[FactSet, list[Fact]]:
    """(the fact set read, the facts the flags select from it)."""
    return fact_selection(args.data_dir, getattr(args, "facts", None), getattr(args, "in_domain", None),
                        args.relations, args.split, args.limit)


def fact_selection(data_dir: str | None, facts: str | None, in_domain: str | None, relations: str, split: str,
                 limit: int | None) -> tuple[FactSet, list[Fact]]:
    """The one fact selection (the flags' values, as the audit records them): (the fact set read, the
    first `limit` facts per relation and split of `relations` in `split`, in file order)."""
    if limit is not None and limit < 1:
        raise SftlensError(f"--limit must be positive, got {limit}")
    if facts:
        fact_set = _fact_set(data_dir, facts, in_domain)
        chosen = fact_set.select(relations, split, limit)
    else:
        fact_set = _fact_set(data_dir, facts, in_domain, split, relations)
        chosen = first_per_relation(fact_set.facts, limit)
    if not chosen:
        raise SftlensError(f"no facts for relations {relations} in split {split}")
    return fact_set, chosen
