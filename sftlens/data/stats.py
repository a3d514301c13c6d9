"""`sftlens data`: `stats` (EntityQuestions: per relation and split, record counts, multi-answer
counts and questions that do not match the relation's template), `check` (any fact set: validated,
with its counts) and `import` (a QA set as a fact set)."""

from __future__ import annotations

import argparse
import json
from collections import Counter

from sftlens.data.facts import SPLITS, FactSet, load_facts, load_templates
from sftlens.markdown import markdown_table


def stats_rows(facts: FactSet) -> list[dict]:
    records = Counter((f.relation, f.split) for f in facts.facts)
    multi = Counter((f.relation, f.split) for f in facts.facts if len(f.answers) > 1)
    unmatched = {key: len(qs) for key, qs in facts.unmatched.items()}
    templates = load_templates()
    keys = sorted(set(records) | set(unmatched), key=lambda k: (list(templates).index(k[0]), SPLITS.index(k[1])))
    return [
        {
            "relation": rel, "domain": templates[rel].domain, "split": split,
            "records": records[(rel, split)] + unmatched.get((rel, split), 0),
            "multi_answer": multi[(rel, split)], "unmatched": unmatched.get((rel, split), 0),
        }
        for rel, split in keys
    ]


def format_stats(rows: list[dict], facts: FactSet) -> str:
    cols = ["relation", "domain", "split", "records", "multi_answer", "unmatched"]
    lines = [markdown_table(cols, [[r[c] for c in cols] for r in rows]), ""]
    for split in SPLITS:
        part = [r for r in rows if r["split"] == split]
        if part:
            lines.append(
                f"{split}: {sum(r['records'] for r in part)} records, "
                f"{sum(r['multi_answer'] for r in part)} multi-answer, {sum(r['unmatched'] for r in part)} unmatched"
            )
    for (rel, split), questions in sorted(facts.unmatched.items()):
        lines.append(f"unmatched in {rel}/{split}: {len(questions)}, e.g. {questions[0]!r}")
    return "\n".join(lines)


def _run_stats(args: argparse.Namespace) -> None:
    facts = load_facts(args.data_dir, splits=args.splits, relations=args.relations, progress=True)
    print(format_stats(stats_rows(facts), facts))


def format_check(stats: dict) -> str:
    per_topic = ", ".join(f"{t} {n}" for t, n in list(stats["per_topic"].items())[:20])
    more = f", ... ({stats['topics']} in all)" if stats["topics"] > 20 else ""
    templates = sorted(set(stats["probe_templates"].values()))
    return "\n".join([
        f"{stats['name']}: {stats['facts']} facts, {stats['topics']} relations/topics ({per_topic}{more})",
        "splits: " + ", ".join(f"{s} {n}" for s, n in stats["splits"].items()),
        "domains: " + ", ".join(f"{d} {n}" for d, n in stats["domains"].items()),
        f"answers per fact: mean {stats['answers_per_fact']['mean']:.2f}, max {stats['answers_per_fact']['max']}",
        f"aliases per fact: mean {stats['aliases_per_fact']['mean']:.2f}, max {stats['aliases_per_fact']['max']}",
        f"probe templates per topic: {', '.join(map(str, templates))}",
    ])


def _run_check(args: argparse.Namespace) -> None:
    from sftlens.data.factset import fact_set_stats, load_fact_set

    stats = fact_set_stats(load_fact_set(args.path, args.in_domain))
    print(json.dumps(stats, indent=1) if args.json else format_check(stats))


def _run_import(args: argparse.Namespace) -> None:
    from sftlens.data.factset import fact_set_stats, load_fact_set
    from sftlens.data.importers import import_facts

    out = import_facts(args.format, args.src, args.out, args.name)
    print(format_check(fact_set_stats(load_fact_set(out))))
    print(f"written to {out}")


def add_cli(subparsers) -> None:
    from sftlens.data.importers import FORMATS

    data = subparsers.add_parser("data", help="inspect EntityQuestions data, check and import fact sets")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    stats = data_sub.add_parser("stats", help="counts per relation and split")
    stats.add_argument("--data-dir", help="EntityQuestions folder (default: $SFTLENS_DATA_DIR)")
    stats.add_argument("--splits", default=",".join(SPLITS), help="comma list of train,dev,test")
    stats.add_argument("--relations", default=None, help="comma list of relation ids, or in/out/all")
    stats.set_defaults(func=_run_stats)
    check = data_sub.add_parser("check", help="validate a fact set and print its counts")
    check.add_argument("path", help="a fact-set folder (from `data import`) or a native JSONL file")
    check.add_argument("--in-domain", help="comma list of topics that count as in-domain (default: as declared, else all)")
    check.add_argument("--json", action="store_true", help="print the counts as JSON")
    check.set_defaults(func=_run_check)
    imp = data_sub.add_parser("import", help="write a QA set as a fact-set folder")
    imp.add_argument("src", help="the source's file (or EntityQuestions folder)")
    imp.add_argument("--format", required=True, choices=FORMATS, help="the source's format")
    imp.add_argument("--out", required=True, help="the fact-set folder to write (must not exist)")
    imp.add_argument("--name", help="the set's name in reports (default: the folder's name)")
    imp.set_defaults(func=_run_import)
