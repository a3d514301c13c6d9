"""`sftlens data stats`: per relation and split, record counts, multi-answer counts and
questions that do not match the relation's template."""

from __future__ import annotations

import argparse
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


def add_cli(subparsers) -> None:
    data = subparsers.add_parser("data", help="inspect EntityQuestions data")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    stats = data_sub.add_parser("stats", help="counts per relation and split")
    stats.add_argument("--data-dir", help="EntityQuestions folder (default: $SFTLENS_DATA_DIR)")
    stats.add_argument("--splits", default=",".join(SPLITS), help="comma list of train,dev,test")
    stats.add_argument("--relations", default=None, help="comma list of relation ids, or in/out/all")
    stats.set_defaults(func=_run_stats)
