"""Fact sets: any closed-book QA set with aliases, in one native format.

A fact set is a JSONL file, one fact a line (schema: `sftlens/resources/factset.schema.json`):
`answers` (each a string or `{"answer": ..., "aliases": [...]}`), and either `question` or
`subject` + `relation` (or `topic`) whose templates are in the side file; optional `id`, `domain`,
`split`. The side file (`relations.json` in a fact-set folder, `<stem>.relations.json` beside a
bare JSONL file) maps a relation to its `question` template, its mapping `templates` (the probe's)
and optionally its `domain`. A topic without templates is question-only: its one probe template is
the question, asked as a question (the paper's QA format, or the model's chat template:
`ProbeConfig.question_prompt`).

Ids: `topic/split/key`, key = the line's `id` or a digest of its content, so appending lines never
changes an id. A fact without `split` gets one from its key (`SHARES`), the same on every machine.
Domains: `in_domain` (topics) when given, else what the set declares, else every topic is in-domain.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sftlens.data.facts import QUESTION_TEMPLATE, SPLITS, Fact, FactSet, RelationTemplates, parse_relations
from sftlens.errors import SftlensError

FORMAT = 1
FACTS_FILE = "facts.jsonl"
RELATIONS_FILE = "relations.json"
META_FILE = "factset.json"
# The share of each split for facts without one: a fact's split is fixed by its key alone.
SHARES = (("train", 0.8), ("dev", 0.1), ("test", 0.1))
DEFAULT_TOPIC = "facts"
DOMAINS = ("in", "out")
SPLIT_NAMES = {s: s for s in SPLITS}  # one string object per split across a million facts


@dataclass(frozen=True)
class FactSetFiles:
    facts: Path
    relations: Path | None  # None: no side file (every topic question-only)
    name: str


def fact_set_files(path: str | os.PathLike) -> FactSetFiles:
    """The files of a fact set: a folder written by `data import`, or a native JSONL file."""
    path = Path(path).expanduser()
    if path.is_dir():
        facts, relations, name = path / FACTS_FILE, path / RELATIONS_FILE, path.name
        meta = path / META_FILE
        if meta.is_file():
            name = _read_json(meta).get("name", name)
    elif path.is_file():
        facts, relations, name = path, path.with_name(f"{path.name.removesuffix('.jsonl')}.relations.json"), path.stem
    else:
        raise SftlensError(f"{path}: no such fact set (a folder from `sftlens data import`, or a JSONL file)")
    if not facts.is_file():
        raise SftlensError(f"{path}: no {FACTS_FILE} (a fact-set folder is written by `sftlens data import`)")
    return FactSetFiles(facts, relations if relations.is_file() else None, name)


def split_of(key: str) -> str:
    """The split of a fact without one, from its key alone (see `SHARES`)."""
    point = int.from_bytes(hashlib.sha256(b"split\0" + key.encode()).digest()[:8], "big") / 2**64
    total = 0.0
    for split, share in SHARES:
        total += share
        if point < total:
            return split
    return SHARES[-1][0]


def content_key(line: dict) -> str:
    """The key of a fact without `id`: a digest of what it asks and answers."""
    content = [line.get("relation") or line.get("topic"), line.get("subject"), line.get("question"), line["answers"]]
    return hashlib.sha256(json.dumps(content, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:16]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SftlensError(f"{path}: cannot read JSON ({err})") from None


def _name(value, where: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip() or "/" in value:
        raise SftlensError(f"{where}: {what} must be a non-empty string without '/', got {value!r}")
    return value


def read_relations(path: Path | None) -> dict[str, dict]:
    """relation -> {question, templates, domain} from a side file, every template checked."""
    if path is None:
        return {}
    raw = _read_json(path)
    table = raw.get("relations") if isinstance(raw, dict) else None
    if not isinstance(table, dict):
        raise SftlensError(f"{path}: expected {{\"relations\": {{name: {{question, templates}}}}}}")
    out = {}
    for name, entry in table.items():
        where = f"{path}: relation {name}"
        _name(name, str(path), "a relation name")
        if not isinstance(entry, dict) or not isinstance(entry.get("templates"), list) or not entry["templates"]:
            raise SftlensError(f"{where} has no templates (give \"templates\": [\"{{subject}} ...\", ...])")
        question = entry.get("question")
        for i, text in enumerate([*entry["templates"], *([question] if question is not None else [])]):
            what = "question template" if i == len(entry["templates"]) else f"template {i}"
            if not isinstance(text, str) or "{subject}" not in text:
                raise SftlensError(f"{where}: {what} {text!r} has no {{subject}}")
        domain = entry.get("domain")
        if domain is not None and domain not in DOMAINS:
            raise SftlensError(f"{where}: domain must be in or out, got {domain!r}")
        out[name] = {"question": question, "templates": tuple(entry["templates"]), "domain": domain}
    return out


class _Bad(Exception):
    """A line's fault, without its location (added once, by `LineReader.fact`)."""


def _answers(value) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    if value is None:
        raise _Bad("missing `answers`")
    if not isinstance(value, list) or not value:
        raise _Bad(f"`answers` must be a non-empty list, got {value!r}"[:200])
    answers, aliases = [], []
    for item in value:
        if isinstance(item, dict):
            answer, extra = item.get("answer"), item.get("aliases", [])
            if not isinstance(extra, list) or not all(isinstance(a, str) and a.strip() for a in extra):
                raise _Bad(f"aliases of {answer!r} must be a list of non-empty strings")
        else:
            answer, extra = item, ()
        if not isinstance(answer, str) or not answer.strip():
            raise _Bad(f"empty answer {answer!r} (an answer is a non-empty string)")
        answers.append(answer)
        aliases.append(tuple(extra))
    return tuple(answers), tuple(aliases) if any(aliases) else ()


class LineReader:
    """Turns native lines into Facts, one topic table and one duplicate check for the whole file."""

    def __init__(self, path: Path, relations: dict[str, dict], unit: str = "line"):
        self.path, self.relations, self.unit = path, relations, unit  # unit: what `number` counts
        self.declared: dict[str, str] = {}  # topic -> domain the lines or the side file declare
        self.first_line: dict[str, int] = {}  # fact id -> line
        self.topics: dict[str, str] = {}  # checked topic names, one object each

    def fact(self, line: dict, number, where: str | None = None) -> tuple:
        """(id, topic, subject, answers, split, question, aliases): a Fact but for its domain.
        `where` names the line in errors (default `file:number`)."""
        try:
            return self._fact(line, number)
        except _Bad as bad:
            raise SftlensError(f"{where or f'{self.path}:{number}'}: {bad}") from None

    def _fact(self, line: dict, number) -> tuple:
        answers, aliases = _answers(line.get("answers"))
        relation, topic = line.get("relation"), line.get("topic")
        if relation is not None and topic is not None and relation != topic:
            raise _Bad(f"relation {relation!r} and topic {topic!r} differ (give one)")
        topic = self._topic(relation or topic or DEFAULT_TOPIC)
        subject, question = line.get("subject", ""), line.get("question")
        entry = self.relations.get(topic)
        if entry is not None:
            if not isinstance(subject, str) or not subject.strip():
                raise _Bad(f"relation {topic} has mapping templates: give the fact's `subject`")
            if question is None:
                if entry["question"] is None:
                    raise _Bad(f"no `question`, and relation {topic} has no question template")
                question = entry["question"].format(subject=subject)
        elif question is None:
            raise _Bad(f"no `question`, and relation {topic} has no templates "
                       f"({'no side file' if not self.relations else 'not in the side file'})")
        if not isinstance(question, str) or not question.strip():
            raise _Bad("`question` must be a non-empty string")
        if not isinstance(subject, str):
            raise _Bad("`subject` must be a string")
        key = line.get("id")
        key = content_key(line) if key is None else _key(key)
        split = line.get("split") or split_of(key)
        if split not in SPLITS:
            raise _Bad(f"unknown split {split!r} (one of {', '.join(SPLITS)})")
        domain = line.get("domain")
        if domain is not None:
            self._declare(topic, domain)
        fact_id = f"{topic}/{split}/{key}"
        if fact_id in self.first_line:
            raise _Bad(f"duplicate id {fact_id} (first at {f'{self.unit} ' if self.unit else ''}{self.first_line[fact_id]})")
        self.first_line[fact_id] = number
        return fact_id, topic, subject, answers, SPLIT_NAMES[split], question, aliases

    def _topic(self, name) -> str:
        known = self.topics.get(name) if isinstance(name, str) else None
        if known is None:
            if not isinstance(name, str) or not name.strip() or "/" in name:
                raise _Bad(f"relation/topic must be a non-empty string without '/', got {name!r}")
            known = self.topics[name] = name
        return known

    def _declare(self, topic: str, domain) -> None:
        if domain not in DOMAINS:
            raise _Bad(f"domain must be in or out, got {domain!r}")
        if self.declared.setdefault(topic, domain) != domain:
            raise _Bad(f"domain {domain!r}, but topic {topic} was {self.declared[topic]!r} before")


def _key(value) -> str:
    key = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(key, str) or not key.strip() or "/" in key:
        raise _Bad(f"id must be a non-empty string (or an integer) without '/', got {value!r}")
    return key


def _lines(path: Path) -> Iterable[tuple[int, dict]]:
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                line = json.loads(text)
            except json.JSONDecodeError as err:
                raise SftlensError(f"{path}:{number}: not JSON ({err.msg})") from None
            if not isinstance(line, dict):
                raise SftlensError(f"{path}:{number}: expected a JSON object, got {type(line).__name__}")
            yield number, line


def _domains(topics: Sequence[str], declared: dict[str, str], in_domain, name: str) -> dict[str, str]:
    if in_domain is None or in_domain == "all":
        return {t: declared.get(t, "in") for t in topics}
    templates = {t: RelationTemplates(t, "in", "", ()) for t in topics}
    try:
        chosen = set(parse_relations(in_domain, templates))
    except SftlensError as err:
        raise SftlensError(f"{name}: --in-domain: {err}") from None
    return {t: "in" if t in chosen else "out" for t in topics}


def load_fact_set(path: str | os.PathLike, in_domain: str | Sequence[str] | None = None) -> FactSet:
    """Read and check a fact set; every bad line is a one-line error naming file and line."""
    files = fact_set_files(path)
    relations = read_relations(files.relations)
    reader = LineReader(files.facts, relations)
    for name, entry in relations.items():
        if entry["domain"]:
            reader.declared[name] = entry["domain"]
    try:
        rows = [reader.fact(line, number) for number, line in _lines(files.facts)]
    except UnicodeDecodeError as err:
        raise SftlensError(f"{files.facts}: not UTF-8 text ({err.reason})") from None
    if not rows:
        raise SftlensError(f"{files.facts}: no facts")
    topics = list(dict.fromkeys(row[1] for row in rows))
    domains = _domains(topics, reader.declared, in_domain, files.name)
    templates = {}
    for topic in topics:
        entry = relations.get(topic)
        templates[topic] = RelationTemplates(topic, domains[topic], entry["question"] or "", entry["templates"]) \
            if entry else RelationTemplates(topic, domains[topic], "", (QUESTION_TEMPLATE,))
    facts = [Fact(fid, topic, subject, answers, split, templates[topic].domain, question, aliases, templates[topic])
             for fid, topic, subject, answers, split, question, aliases in rows]
    return FactSet(facts, templates=templates, name=files.name)


def fingerprint(path: str | os.PathLike, in_domain: str | None = None) -> str:
    """sha256 over a fact set's files and its in-domain choice: what a study keys its facts by."""
    files = fact_set_files(path)
    digest = hashlib.sha256(f"in_domain:{in_domain}\0".encode())
    for file in (files.facts, files.relations):
        digest.update(file.read_bytes() if file is not None else b"<none>")
    return digest.hexdigest()[:16]


def fact_set_stats(facts: FactSet) -> dict:
    """What `data check` prints: counts of facts, topics, splits, domains, answers and aliases."""
    n = len(facts.facts)
    answers = [len(f.answers) for f in facts.facts]
    aliases = [sum(map(len, f.aliases)) for f in facts.facts]
    count = lambda key: dict(sorted(_counter(key(f) for f in facts.facts).items()))  # noqa: E731
    return {
        "name": facts.name, "facts": n, "topics": len(facts.topics()),
        "splits": {s: c for s, c in ((s, sum(1 for f in facts.facts if f.split == s)) for s in SPLITS) if c},
        "domains": count(lambda f: f.domain), "per_topic": count(lambda f: f.relation),
        "answers_per_fact": {"mean": sum(answers) / n, "max": max(answers)},
        "aliases_per_fact": {"mean": sum(aliases) / n, "max": max(aliases)},
        "probe_templates": {t: len(r.mapping_templates) for t, r in facts.topics().items()},
    }


def _counter(items) -> dict:
    out: dict = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out
