"""EntityQuestions as fact records.

Files are `{split}/{relation}.{split}.json`, each a list of {question, answers}. `answers` lists
valid objects of multi-valued relations, not aliases. The subject is recovered by matching the
relation's question template; questions that do not match are reported, never dropped silently.
Fact ids are `relation/split/index` (index in the file), stable across runs and machines: subjects
are ambiguous, so the question text could not serve as a key.

A `Fact`: `id`, `relation`, `subject`, `answers` (valid objects, not aliases), `split`, `domain` (`in`/`out`),
`question`, `aliases` (per answer; a fact set's own), `templates` (its topic's; None = the paper's).
`probe_prompt(t)` is mapping template t filled in (a question-only topic, `question_only`: its one
template `{question}`, asked as `sft_prompt(question)`, since a bare question is continued by a newline,
not answered); `accepted_answers` = answers then aliases. A `FactSet`: `facts`, `templates` (topic ->
`RelationTemplates`; empty = the paper's), `name`; `select(relations, splits, limit)` (a split the set
lacks is an error), `domains()`. The `entityquestions` importer writes `load_facts`' facts exactly.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from tqdm import tqdm

from sftlens.data.prompts import sft_prompt
from sftlens.errors import SftlensError

SPLITS = ("train", "dev", "test")
DATA_DIR_ENV = "SFTLENS_DATA_DIR"
QUESTION_TEMPLATE = "{question}"  # the one mapping template of a question-only topic (`sftlens.data.factset`)


@dataclass(frozen=True)
class RelationTemplates:
    relation: str
    domain: str  # "in" (the 10 location topics) or "out"
    question: str  # with one {subject} placeholder
    mapping_templates: tuple[str, ...]

    @property
    def question_only(self) -> bool:
        """A topic without mapping templates (TriviaQA, PopQA without templates, a user's Q/A pairs)."""
        return self.mapping_templates == (QUESTION_TEMPLATE,)

    @functools.cached_property
    def question_pattern(self) -> re.Pattern:
        before, after = (re.escape(part) for part in self.question.split("{subject}"))
        return re.compile(f"^{before}(.+){after}$", re.DOTALL)


@dataclass(frozen=True)
class Fact:
    id: str
    relation: str
    subject: str
    answers: tuple[str, ...]
    split: str
    domain: str
    question: str
    # Per answer, the strings that count as correct for it beside the answer itself (a fact set's
    # own aliases; the synonym table applies on top). Empty: none (EntityQuestions).
    aliases: tuple[tuple[str, ...], ...] = ()
    # The templates of a fact set's topic; None: the paper's templates of `relation`.
    templates: RelationTemplates | None = field(default=None, compare=False, repr=False)

    def alias_table(self) -> dict[str, tuple[str, ...]]:
        """answer -> its aliases, for `Matcher.accepted`."""
        return {a: extra for a, extra in zip(self.answers, self.aliases) if extra}

    @property
    def accepted_answers(self) -> tuple[str, ...]:
        """The answers, then every alias: the strings a split row's `answers` carries, so every
        consumer of split rows accepts the aliases too."""
        return tuple(dict.fromkeys((*self.answers, *(a for extra in self.aliases for a in extra))))

    def relation_templates(self) -> RelationTemplates:
        return self.templates or load_templates()[self.relation]

    @property
    def question_only(self) -> bool:
        return self.relation_templates().question_only

    def probe_prompt(self, template: int) -> str:
        """The text of mapping template `template` for this fact. A question-only topic's one
        template is the question, asked in the paper's QA format (`sft_prompt`): a model continues a
        bare question with a newline, not its answer (the chat style: `sftlens.probe.prompt_ids`)."""
        if self.question_only:
            return sft_prompt(self.question)
        return self.relation_templates().mapping_templates[template].format(subject=self.subject,
                                                                            question=self.question)


@dataclass
class FactSet:
    facts: list[Fact]
    # (relation, split) -> questions that did not match the relation's question template
    unmatched: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    # A fact set's own topics (`sftlens.data.factset`); empty: the paper's EntityQuestions relations.
    templates: dict[str, RelationTemplates] = field(default_factory=dict)
    name: str = "EntityQuestions"

    def by_id(self) -> dict[str, Fact]:
        return {f.id: f for f in self.facts}

    def topics(self) -> dict[str, RelationTemplates]:
        return self.templates or load_templates()

    def domains(self) -> dict[str, str]:
        """relation or topic -> in/out."""
        return {name: t.domain for name, t in self.topics().items()}

    def select(self, relations=None, splits: tuple[str, ...] | str | None = None, limit: int | None = None) -> list[Fact]:
        """The facts of `relations` (comma list, in/out/all; names checked) and `splits` (each one the
        set defines), the first `limit` per relation and split, in file order."""
        chosen = set(parse_relations(relations, self.topics()))
        defined = sorted({f.split for f in self.facts}, key=SPLITS.index)
        wanted = defined if splits is None else [s.strip() for s in (splits.split(",") if isinstance(splits, str) else splits)]
        for split in wanted:
            if split not in defined:
                raise SftlensError(f"{self.name}: split {split!r} is not in this fact set (it has {', '.join(defined)})")
        return first_per_relation((f for f in self.facts if f.relation in chosen and f.split in wanted), limit)


def available_templates(facts: Iterable[Fact]) -> int:
    """How many mapping templates every one of `facts` has (a fact set's topics may have fewer than
    the paper's 21): the valid template indices are 0 .. this - 1."""
    return min(len(f.relation_templates().mapping_templates) for f in facts)


@functools.lru_cache(maxsize=1)
def load_templates() -> dict[str, RelationTemplates]:
    """The paper's 24 relations (Appendix D.2): domain, question and 21 mapping templates."""
    raw = resources.files("sftlens.resources").joinpath("templates.json").read_text(encoding="utf-8")
    return {
        t["relation"]: RelationTemplates(t["relation"], t["domain"], t["question"], tuple(t["mapping_templates"]))
        for t in json.loads(raw)["topics"]
    }


def in_domain_relations() -> tuple[str, ...]:
    return tuple(r for r, t in load_templates().items() if t.domain == "in")


def parse_relations(spec: str | tuple[str, ...] | list[str] | None,
                    templates: dict[str, RelationTemplates] | None = None) -> tuple[str, ...]:
    """Relations (or a fact set's topics, given its `templates`) from a comma list or the aliases
    `all`, `in`, `out`; unknown ids are errors."""
    templates = templates or load_templates()
    if spec is None or spec == "all" or spec == ("all",):
        return tuple(templates)
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    chosen: list[str] = []
    for name in filter(None, names):
        if name in ("in", "out"):
            chosen += [r for r, t in templates.items() if t.domain == name]
        elif name == "all":
            chosen += list(templates)
        elif name in templates:
            chosen.append(name)
        else:
            raise SftlensError(f"unknown relation {name!r} (known: {_listing(templates)}, or in/out/all)")
    if not chosen:
        raise SftlensError("empty relation selection")
    return tuple(dict.fromkeys(chosen))


def _listing(names, shown: int = 30) -> str:
    names = list(names)
    return ", ".join(names[:shown]) + (f", ... ({len(names)} in all)" if len(names) > shown else "")


def data_dir_from(value: str | os.PathLike | None) -> Path:
    """The data directory from --data-dir or $SFTLENS_DATA_DIR, checked to exist."""
    value = value or os.environ.get(DATA_DIR_ENV)
    if not value:
        raise SftlensError(f"no data directory: pass --data-dir or set {DATA_DIR_ENV}")
    path = Path(value).expanduser()
    if not path.is_dir():
        raise SftlensError(f"data directory {path} does not exist")
    return path


def _read_records(path: Path) -> list[dict]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SftlensError(f"{path}: cannot read JSON ({err})") from None
    if not isinstance(records, list):
        raise SftlensError(f"{path}: expected a list of {{question, answers}}, got {type(records).__name__}")
    for i, rec in enumerate(records):
        ok = (
            isinstance(rec, dict)
            and isinstance(rec.get("question"), str)
            and isinstance(rec.get("answers"), list)
            and rec["answers"]
            and all(isinstance(a, str) for a in rec["answers"])
        )
        if not ok:
            raise SftlensError(f"{path}: record {i} is not {{question: str, answers: [str, ...]}}: {str(rec)[:80]}")
    return records


def load_facts(
    data_dir: str | os.PathLike | None,
    splits: tuple[str, ...] | str = SPLITS,
    relations: tuple[str, ...] | str | None = None,
    progress: bool = False,
) -> FactSet:
    """Load facts of the chosen splits and relations (default: all relations with files)."""
    root = data_dir_from(data_dir)
    splits = tuple(s.strip() for s in splits.split(",")) if isinstance(splits, str) else tuple(splits)
    for split in splits:
        if split not in SPLITS:
            raise SftlensError(f"unknown split {split!r} (one of {', '.join(SPLITS)})")
    explicit = relations is not None
    relations = parse_relations(relations)
    templates = load_templates()
    result = FactSet(facts=[])
    jobs = [(r, s) for s in splits for r in relations]
    for relation, split in tqdm(jobs, desc="loading facts", disable=not progress):
        path = root / split / f"{relation}.{split}.json"
        if not path.is_file():
            if explicit:
                raise SftlensError(f"{path}: missing data file for relation {relation}")
            continue
        tpl = templates[relation]
        for index, rec in enumerate(_read_records(path)):
            match = tpl.question_pattern.match(rec["question"])
            if match is None:
                result.unmatched.setdefault((relation, split), []).append(rec["question"])
                continue
            result.facts.append(
                Fact(
                    id=fact_id(relation, split, index), relation=relation, subject=match.group(1),
                    answers=tuple(rec["answers"]), split=split, domain=tpl.domain, question=rec["question"],
                )
            )
    if not result.facts and not result.unmatched:
        raise SftlensError(f"{root}: no data files for splits {','.join(splits)} (expected e.g. {splits[0]}/P17.{splits[0]}.json)")
    return result


def first_per_relation(facts: Iterable[Fact], limit: int | None) -> list[Fact]:
    """The first `limit` facts of each (relation, split), in input order (None: all): the one
    definition of "probe at most N facts per relation" for the CLI and studies."""
    if limit is None:
        return list(facts)
    taken: dict[tuple[str, str], int] = {}
    chosen = []
    for fact in facts:
        key = (fact.relation, fact.split)
        if taken.get(key, 0) < limit:
            taken[key] = taken.get(key, 0) + 1
            chosen.append(fact)
    return chosen


_FACT_ID = re.compile(r"^(?P<relation>[^/]+)/(?P<split>train|dev|test)/(?P<index>[^/]+)$")


def fact_id(relation: str, split: str, index: int) -> str:
    """The one spelling of a fact id: `relation/split/index` (e.g. P17/test/00042)."""
    return f"{relation}/{split}/{index:05d}"


def parse_fact_id(text: str) -> tuple[str, str, int | str]:
    """(relation, split, index) of a fact id; anything else is an error naming it. A fact set's
    own ids (`topic/split/key`) give their key in place of the index."""
    match = _FACT_ID.match(text)
    if match is None:
        raise SftlensError(f"{text!r}: not a relation/split/index fact id")
    index = match["index"]
    return match["relation"], match["split"], int(index) if index.isdigit() else index
