"""Summaries of probe records: the paper's Table 1 (facts per mastery level and set, headed by the prompt
each topic was probed with) and the best mapping template per relation (KL's prompts)."""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from sftlens.data import Fact, RelationTemplates, load_templates, parse_fact_id
from sftlens.errors import SftlensError
from sftlens.io import atomic_write_text
from sftlens.markdown import markdown_table
from sftlens.probe.records import LEVELS, ProbeRecord


def best_templates(records: dict[str, ProbeRecord], facts: Iterable[Fact]) -> dict[str, int]:
    """Per relation, the mapping-template index with the highest success rate (ties: lowest index)."""
    hits: dict[str, Counter] = {}
    for fact in facts:
        record = records.get(fact.id)
        if record is None:
            continue
        counts = hits.setdefault(fact.relation, Counter())
        for template, correct in record.per_template().items():
            counts[template] += correct
    return {rel: min(c, key=lambda t: (-c[t], t)) for rel, c in hits.items() if c}


def _group_of(fact_id: str, domains: dict[str, str] | None = None) -> tuple[str, str]:
    relation, split, _ = parse_fact_id(fact_id)
    domains = domains or {r: t.domain for r, t in load_templates().items()}
    if relation not in domains:
        raise SftlensError(f"probe record {fact_id!r}: unknown relation {relation} (a fact set's: give --facts)")
    return split, domains[relation]


def _group_name(split: str, domain: str) -> str:
    paper = {("train", "in"): "D_train", ("test", "in"): "D_test", ("test", "out"): "D_testood"}
    return paper.get((split, domain), f"D_{split}{'ood' if domain == 'out' else ''}")


_GROUP_ORDER = [("train", "in"), ("dev", "in"), ("test", "in"), ("train", "out"), ("dev", "out"), ("test", "out")]


def level_counts(records: Iterable[ProbeRecord], domains: dict[str, str] | None = None) -> list[dict]:
    """Rows of the paper's Table 1: per set (train, test in-domain, test out-of-domain, and any
    other probed split) the number of facts at each mastery level. `domains`: a fact set's
    (`FactSet.domains()`); default the paper's relations."""
    counts: dict[tuple[str, str], Counter] = {}
    domains = domains or {r: t.domain for r, t in load_templates().items()}
    for record in records:
        counts.setdefault(_group_of(record.fact_id, domains), Counter())[record.level] += 1
    order = [g for g in _GROUP_ORDER if g in counts] + sorted(set(counts) - set(_GROUP_ORDER))
    return [
        {"set": _group_name(*g), "split": g[0], "domain": g[1], **{f"level{i}": counts[g][i] for i in LEVELS},
         "total": sum(counts[g].values())}
        for g in order
    ]


def level_counts_table(records: Iterable[ProbeRecord], fmt: str = "markdown",
                       domains: dict[str, str] | None = None) -> str:
    """The level distribution as a Markdown table or CSV text."""
    rows = level_counts(records, domains)
    columns = ["set", *(f"level{i}" for i in LEVELS), "total"]
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()
    if fmt != "markdown":
        raise SftlensError(f"unknown table format {fmt!r} (markdown or csv)")
    header = ["set", *(f"level {i}" for i in LEVELS), "total"]
    return markdown_table(header, [[r[c] for c in columns] for r in rows], "l" + "r" * (len(header) - 1)) + "\n"


QUESTION_PROMPTS = {"plain": "the question in the paper's QA format (`<question> q <answer>`)",
                    "chat": "the question in the model's chat template"}
TEMPLATE_PROMPT = "mapping templates filled in (the paper's probe)"


def probe_prompts(topics: dict[str, RelationTemplates], style: str) -> dict[str, str]:
    """topic -> the prompt the probe asks it with (`sftlens.probe.prompt_ids`), in words."""
    return {name: QUESTION_PROMPTS[style] if t.question_only else TEMPLATE_PROMPT for name, t in topics.items()}


def prompt_lines(topics: Iterable[str], prompts: dict[str, str]) -> list[str]:
    """One line per kind of prompt, naming the topics asked with it."""
    by_prompt: dict[str, list[str]] = {}
    for topic in sorted(set(topics) & set(prompts)):
        by_prompt.setdefault(prompts[topic], []).append(topic)
    return [f"Probe prompt: {text}: {', '.join(names)}." for text, names in by_prompt.items()]


def write_level_tables(records: Iterable[ProbeRecord], store_dir: Path, domains: dict[str, str] | None = None,
                       topics: dict[str, RelationTemplates] | None = None, style: str = "plain") -> str:
    """Table 1 of a store to `level_counts.md` (with the prompt each topic was probed with: `topics`,
    a fact set's, default the paper's; `style`, the store's `question_prompt`) and `level_counts.csv`."""
    records = list(records)
    table = level_counts_table(records, domains=domains)  # first: it names a record of an unknown topic
    used = {parse_fact_id(r.fact_id)[0] for r in records}
    markdown = "\n".join(prompt_lines(used, probe_prompts(topics or load_templates(), style))) + "\n\n" + table
    atomic_write_text(store_dir / "level_counts.md", markdown)
    atomic_write_text(store_dir / "level_counts.csv", level_counts_table(records, "csv", domains))
    return markdown
