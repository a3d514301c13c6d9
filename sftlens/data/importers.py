"""`sftlens data import`: a QA set, in the shape its source ships it, as a fact-set folder.

Formats: `entityquestions` (the authors' folder; ids, splits, subjects and templates exactly those of
`load_facts`), `popqa` (TSV, or CSV/JSON/JSONL/Parquet exports; `prop` is the relation, the object's
possible answers and aliases its aliases), `triviaqa` (rc.nocontext: `{"Data": [...]}` JSON or JSONL;
`answer.value` with `answer.aliases` and `answer.normalized_aliases`) and `jsonl` (the native format).
Every converted row is checked as a native line, errors naming the source row; the folder
(`facts.jsonl`, `relations.json`, `factset.json`) appears only when the whole import succeeded.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from sftlens.data.facts import SPLITS, load_facts, load_templates
from sftlens.data.factset import (
    FACTS_FILE,
    FORMAT,
    META_FILE,
    RELATIONS_FILE,
    SHARES,
    LineReader,
    fact_set_files,
    load_fact_set,
    read_relations,
)
from sftlens.errors import SftlensError
from sftlens.io import atomic_directory, atomic_write_json

POPQA_COLUMNS = ("subj", "prop", "obj", "s_aliases", "o_aliases", "question", "possible_answers")
TRIVIA_TOPIC = "trivia"


def _aliases_of(answer: str, *lists: Iterable[str]) -> list[str]:
    return [a for a in dict.fromkeys(x for items in lists for x in items) if a != answer and a.strip()]


# --- reading the source's files -----------------------------------------------------------------


def _table_rows(src: Path) -> Iterator[tuple[str, dict]]:
    """(label naming the row, row) of a TSV, CSV, JSON (a list, or {"Data"/"data": [...]}),
    JSONL or Parquet file."""
    suffix = src.suffix.lower()
    if suffix in (".tsv", ".csv"):
        with open(src, encoding="utf-8", newline="") as f:
            for number, row in enumerate(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","), 2):
                yield f"{src}:{number}", row
    elif suffix == ".jsonl":
        with open(src, encoding="utf-8") as f:
            for number, text in enumerate(f, 1):
                if text.strip():
                    yield f"{src}:{number}", _json_line(text, f"{src}:{number}")
    elif suffix == ".json":
        data = _json_line(src.read_text(encoding="utf-8"), str(src))
        rows = data.get("Data", data.get("data")) if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise SftlensError(f"{src}: expected a list of rows, or {{\"Data\": [...]}}")
        for number, row in enumerate(rows):
            yield f"{src}: row {number}", row
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SftlensError(f"{src}: reading Parquet needs pyarrow (pip install pyarrow), or export the table "
                               "as TSV, CSV, JSON or JSONL") from None
        for number, row in enumerate(pq.read_table(src).to_pylist()):
            yield f"{src}: row {number}", row
    else:
        raise SftlensError(f"{src}: unknown file type {suffix or '(none)'} (tsv, csv, json, jsonl or parquet)")


def _json_line(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise SftlensError(f"{where}: not JSON ({err.msg})") from None


def _json_list(row: dict, column: str, where: str) -> list[str]:
    """A column holding a JSON list, stored as a string (PopQA's TSV) or already a list."""
    value = row.get(column)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SftlensError(f"{where}: column {column} is not a JSON list of strings: {str(row.get(column))[:80]!r}")
    return value


def _record(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise SftlensError(f"{where}: expected an object with named fields, got {type(row).__name__}")
    return row


# --- the formats --------------------------------------------------------------------------------


def popqa_lines(src: Path) -> tuple[Iterator[tuple[str, dict]], dict]:
    def lines():
        for where, row in _table_rows(src):
            row = _record(row, where)
            missing = [c for c in POPQA_COLUMNS if c not in row]
            if missing:
                raise SftlensError(f"{where}: no column {missing[0]} (PopQA has {', '.join(POPQA_COLUMNS)})")
            possible = _json_list(row, "possible_answers", where)
            o_aliases = _json_list(row, "o_aliases", where)
            _json_list(row, "s_aliases", where)  # checked: a broken export shows here, not later
            obj = row["obj"] or (possible[0] if possible else "")
            line = {"subject": row["subj"], "relation": row["prop"], "question": row["question"],
                    "answers": [{"answer": obj, "aliases": _aliases_of(obj, possible, o_aliases)}]}
            if row.get("id") not in (None, ""):
                line["id"] = str(row["id"])
            yield where, line

    return lines(), {}


def _field(row: dict, dotted: str):
    """A nested field (`answer.value`) or its flattened column."""
    if dotted in row:
        return row[dotted]
    value = row
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def triviaqa_lines(src: Path) -> tuple[Iterator[tuple[str, dict]], dict]:
    def lines():
        for where, row in _table_rows(src):
            row = _record(row, where)
            value = _field(row, "answer.value")
            aliases = [*(_field(row, "answer.aliases") or []), *(_field(row, "answer.normalized_aliases") or [])]
            if not isinstance(value, str) or not all(isinstance(a, str) for a in aliases):
                raise SftlensError(f"{where}: answer.value must be a string and answer.aliases a list of strings")
            line = {"question": row.get("question"), "topic": TRIVIA_TOPIC,
                    "answers": [{"answer": value, "aliases": _aliases_of(value, aliases)}]}
            if row.get("question_id") not in (None, ""):
                line["id"] = str(row["question_id"])
            yield where, line

    return lines(), {}


def entityquestions_lines(src: Path) -> tuple[Iterator[tuple[str, dict]], dict]:
    """The authors' folder through `load_facts`, so ids (`relation/split/index`), subjects and
    splits are today's; questions that do not fit their template are left out, as there."""
    facts = load_facts(src, splits=SPLITS, progress=True)
    for (relation, split), questions in sorted(facts.unmatched.items()):
        print(f"left out {len(questions)} question(s) of {relation}/{split} that do not fit its template, "
              f"e.g. {questions[0]!r}", file=sys.stderr)
    templates = load_templates()
    relations = {r: {"question": templates[r].question, "templates": list(templates[r].mapping_templates),
                     "domain": templates[r].domain}
                 for r in dict.fromkeys(f.relation for f in facts.facts)}
    lines = ((f"{src}/{f.split}/{f.relation}.{f.split}.json: {f.id}",
              {"id": f.id.rsplit("/", 1)[1], "relation": f.relation, "split": f.split, "subject": f.subject,
               "question": f.question, "answers": list(f.answers)}) for f in facts.facts)
    return lines, relations


IMPORTERS: dict[str, Callable[[Path], tuple[Iterator[tuple[str, dict]], dict]]] = {
    "entityquestions": entityquestions_lines, "popqa": popqa_lines, "triviaqa": triviaqa_lines,
}
FORMATS = (*IMPORTERS, "jsonl")


def import_facts(fmt: str, src: str | Path, out: str | Path, name: str | None = None) -> Path:
    """Write `src` (in format `fmt`) as a fact-set folder `out`; nothing is written unless it all checks."""
    src, out = Path(src).expanduser(), Path(out)
    if fmt not in FORMATS:
        raise SftlensError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    if not src.exists():
        raise SftlensError(f"{src}: no such file or folder")
    if out.exists():
        raise SftlensError(f"{out}: already exists (import into a new folder)")
    meta = {"format": FORMAT, "name": name or out.name, "source": {"format": fmt, "path": str(src)},
            "shares": dict(SHARES)}
    with atomic_directory(out) as tmp:
        if fmt == "jsonl":
            files = fact_set_files(src)
            load_fact_set(src)  # every line checked where the user can find it
            shutil.copyfile(files.facts, tmp / FACTS_FILE)
            if files.relations is not None:
                shutil.copyfile(files.relations, tmp / RELATIONS_FILE)
        else:
            lines, relations = IMPORTERS[fmt](src)
            _write_checked(tmp, src, lines, relations)
        atomic_write_json(tmp / META_FILE, meta)
        load_fact_set(tmp)
    return out


def _write_checked(tmp: Path, src: Path, lines: Iterator[tuple[str, dict]], relations: dict) -> None:
    if relations:
        atomic_write_json(tmp / RELATIONS_FILE, {"relations": relations})
    reader = LineReader(src, read_relations(tmp / RELATIONS_FILE if relations else None), unit="")
    with open(tmp / FACTS_FILE, "w", encoding="utf-8") as f:
        for where, line in lines:
            reader.fact(line, where, where)
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    if not reader.first_line:
        raise SftlensError(f"{src}: no facts to import")
