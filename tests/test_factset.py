"""Fact sets: the native format, every importer on fixtures in its source's schema, bad input,
EntityQuestions through the importer = today's loader, and properties of splits and aliases."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sftlens.cli import main
from sftlens.data import Matcher, default_matcher, load_fact_set, load_facts, load_templates, sft_prompt
from sftlens.data.factset import SHARES, fact_set_stats, split_of
from sftlens.data.importers import import_facts
from sftlens.errors import SftlensError

FIXTURES = Path(__file__).parent / "fixtures" / "factsets"
SHARED_DATA = Path(os.environ.get("SFTLENS_DATA_DIR")
                   or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "entityquestions")


def write_lines(path: Path, lines: list, relations: dict | None = None) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    if relations is not None:
        path.with_name(path.name.removesuffix(".jsonl") + ".relations.json").write_text(json.dumps({"relations": relations}))
    return path


def as_native(fact_set_dir: Path, tmp: Path) -> Path:
    """The imported set's own files as a bare native JSONL file (+ side file)."""
    target = tmp / "again.jsonl"
    shutil.copyfile(fact_set_dir / "facts.jsonl", target)
    if (fact_set_dir / "relations.json").is_file():
        shutil.copyfile(fact_set_dir / "relations.json", tmp / "again.relations.json")
    return target


# --- importers --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["popqa.tsv", "popqa.csv", "popqa.json", "popqa.jsonl"])
def test_popqa_in_every_shape_it_ships_gives_the_same_facts_and_round_trips(name, tmp_path):
    out = import_facts("popqa", FIXTURES / name, tmp_path / "popqa")
    facts = load_fact_set(out)
    russia = next(f for f in facts.facts if f.subject == "Saint Petersburg")
    assert russia.relation == "country" and russia.answers == ("Russia",)
    assert russia.aliases == (("Russian Federation", "RU", "RUS"),)
    assert russia.id == f"country/{split_of('6152445')}/6152445", "PopQA's id column keys the fact"
    assert russia.question == "In what country is Saint Petersburg?"
    assert russia.question_only and russia.probe_prompt(0) == sft_prompt(russia.question), \
        "no templates: the probe asks the question in the paper's QA format"
    assert {f.relation for f in facts.facts} == {"occupation", "country", "author", "capital of", "genre"}
    reference = load_fact_set(import_facts("popqa", FIXTURES / "popqa.tsv", tmp_path / "reference"))
    assert facts.facts == reference.facts
    again = load_fact_set(import_facts("jsonl", as_native(out, tmp_path), tmp_path / "native"))
    assert again.facts == facts.facts


@pytest.mark.parametrize("name", ["triviaqa.json", "triviaqa.jsonl"])
def test_triviaqa_takes_value_and_every_alias_once(name, tmp_path):
    out = import_facts("triviaqa", FIXTURES / name, tmp_path / "tq")
    facts = {f.id.rsplit("/", 1)[1]: f for f in load_fact_set(out).facts}
    assert sorted(facts) == ["tc_1", "tc_2", "tc_3", "tc_4"]
    sunset = facts["tc_1"]
    assert sunset.answers == ("Sunset Boulevard",)
    assert sunset.aliases == (("Sunset Blvd", "Sunset Bulevard", "West Sunset Boulevard", "sunset boulevard",
                                "sunset blvd", "west sunset boulevard", "sunset bulevard"),)
    assert facts["tc_2"].aliases == (("david seville",),)
    assert default_matcher().is_correct("it was sunset blvd.", sunset.answers, sunset.alias_table())
    again = load_fact_set(import_facts("jsonl", as_native(out, tmp_path), tmp_path / "native"))
    assert [f.id for f in again.facts] == [f.id for f in load_fact_set(out).facts]


def test_native_jsonl_import_keeps_every_fact_and_template(tmp_path):
    direct = load_fact_set(FIXTURES / "native.jsonl")
    imported = load_fact_set(import_facts("jsonl", FIXTURES / "native.jsonl", tmp_path / "n"))
    assert imported.facts == direct.facts
    by_subject = {f.subject: f for f in direct.facts if f.subject}
    assert by_subject["Spain"].id == f"capital/{split_of('es')}/es"
    assert by_subject["Kenya"].split == "test"
    assert by_subject["Japan"].question == "What is the capital of Japan?", "from the question template"
    assert [by_subject["Japan"].probe_prompt(t) for t in (0, 1)] == ["The capital of Japan is", "Japan's capital city is"]
    assert direct.domains() == {"capital": "in", "art": "in", "science": "out"}
    stats = fact_set_stats(direct)
    assert stats["facts"] == 6 and stats["topics"] == 3 and stats["aliases_per_fact"]["max"] == 2


def _entityquestions_folder(root: Path) -> Path:
    """Two relations x three splits x three records in EntityQuestions' schema (written here: the real
    data stays outside the repository), plus one question that fits no template."""
    templates = load_templates()
    for split in ("train", "dev", "test"):
        (root / split).mkdir(parents=True)
        for relation in ("P17", "P106"):
            records = [{"question": templates[relation].question.format(subject=f"Item {split} {i}"),
                        "answers": ["France"] if i % 2 else ["France", "Belgium"]} for i in range(3)]
            if (split, relation) == ("dev", "P17"):
                records.append({"question": "Where on earth is this?", "answers": ["Peru"]})
            (root / split / f"{relation}.{split}.json").write_text(json.dumps(records))
    return root


def test_entityquestions_importer_fixture_drops_what_the_loader_drops(tmp_path):
    source = _entityquestions_folder(tmp_path / "src")
    imported = load_fact_set(import_facts("entityquestions", source, tmp_path / "eq"))
    loaded = load_facts(source)
    assert imported.facts == loaded.facts
    assert sum(map(len, loaded.unmatched.values())) == 1 and len(imported.facts) == 18


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="EntityQuestions not in ../shared")
def test_entityquestions_importer_gives_todays_ids_splits_rows_and_probe_records(tmp_path, tiny):
    from sftlens.data.rows import split_row
    from sftlens.probe import ProbeConfig, probe_facts

    source = tmp_path / "src"
    for split in ("train", "dev", "test"):
        (source / split).mkdir(parents=True)
        for relation in ("P17", "P106", "P26"):
            name = f"{split}/{relation}.{split}.json"
            shutil.copyfile(SHARED_DATA / name, source / name)
    loaded = load_facts(source)
    imported = load_fact_set(import_facts("entityquestions", source, tmp_path / "eq"))
    assert [f.id for f in imported.facts] == [f.id for f in loaded.facts]
    assert imported.facts == loaded.facts  # subjects, answers, splits, domains, questions
    rows = lambda facts: [json.dumps(split_row(f, 2)) for f in facts]  # noqa: E731
    assert rows(imported.facts) == rows(loaded.facts)
    model, tokenizer = tiny
    config = ProbeConfig(samples=2, templates=(0, 3), max_new_tokens=4)
    pick = lambda facts: [f for f in facts if f.id.endswith(("/00000", "/00001"))]  # noqa: E731
    assert probe_facts(model, tokenizer, pick(imported.facts), config, progress=False) == \
        probe_facts(model, tokenizer, pick(loaded.facts), config, progress=False)


def test_parquet_without_pyarrow_is_one_line_naming_it(tmp_path):
    try:
        import pyarrow  # noqa: F401
        pytest.skip("pyarrow is installed")
    except ImportError:
        pass
    source = tmp_path / "popqa.parquet"
    source.write_bytes(b"PAR1")
    with pytest.raises(SftlensError, match="pyarrow"):
        import_facts("popqa", source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fixture_lines_follow_the_shipped_json_schema():
    jsonschema = pytest.importorskip("jsonschema")
    from importlib import resources

    schema = json.loads(resources.files("sftlens.resources").joinpath("factset.schema.json").read_text())
    for line in (FIXTURES / "native.jsonl").read_text().splitlines():
        jsonschema.validate(json.loads(line), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"question": "q?", "answers": []}, schema)


# --- bad input --------------------------------------------------------------------------------

CAPITAL = {"capital": {"question": "What is the capital of {subject}?", "templates": ["The capital of {subject} is"]}}
BAD_LINES = [
    ([{"question": "q?", "answers": ["a"]}, {"question": "r?"}], None, r"bad\.jsonl:2: missing `answers`"),
    ([{"question": "q?", "answers": ["a", "  "]}], None, r"bad\.jsonl:1: empty answer"),
    ([{"question": "q?", "answers": [{"answer": "", "aliases": ["x"]}]}], None, r"bad\.jsonl:1: empty answer"),
    ([{"subject": "Oslo", "relation": "capital", "answers": ["Norway"]}], None,
     r"bad\.jsonl:1: no `question`, and relation capital has no templates"),
    ([{"subject": "Oslo", "relation": "capital", "answers": ["Norway"]}], {"capital": {"question": "{subject}?"}},
     r"bad\.relations\.json: relation capital has no templates"),
    ([{"subject": "Oslo", "relation": "capital", "answers": ["Norway"]}],
     {"capital": {"templates": ["The capital of {subject} is", "The capital is"]}},
     r"bad\.relations\.json: relation capital: template 1 'The capital is' has no \{subject\}"),
    ([{"question": "q?", "answers": ["a"], "id": "x"}, {"question": "r?", "answers": ["b"], "id": "x", "split": "train"},
      {"question": "s?", "answers": ["c"], "id": "x", "split": "train"}], None,
     r"bad\.jsonl:3: duplicate id facts/train/x \(first at line 2\)"),
    ([{"question": "q?", "answers": ["a"]}, '{"question": "r?", "answers": ["b"]'], None, r"bad\.jsonl:2: not JSON"),
    ([{"question": "q?", "answers": ["a"], "split": "validation"}], None, r"bad\.jsonl:1: unknown split 'validation'"),
    ([{"subject": "Oslo", "relation": "capital", "answers": ["Norway"], "question": "Q?"}, {"relation": "capital",
      "answers": ["x"], "question": "Q2?"}], CAPITAL, r"bad\.jsonl:2: relation capital has mapping templates: give"),
]


@pytest.mark.parametrize("lines,relations,message", BAD_LINES)
def test_bad_input_is_one_line_naming_file_and_line_and_writes_nothing(lines, relations, message, tmp_path, capsys):
    source = write_lines(tmp_path / "bad.jsonl", lines, relations)
    with pytest.raises(SftlensError, match=message) as err:
        load_fact_set(source)
    assert "\n" not in str(err.value)
    assert main(["data", "import", "--format", "jsonl", str(source), "--out", str(tmp_path / "out")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bad.jsonl", *(["bad.relations.json"] if relations else [])])
    assert "sftlens: error:" in capsys.readouterr().err


def test_a_popqa_row_whose_lists_do_not_parse_is_named(tmp_path):
    with pytest.raises(SftlensError, match=r"popqa-bad\.tsv:3: column possible_answers is not a JSON list"):
        import_facts("popqa", FIXTURES / "popqa-bad.tsv", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_split_the_set_does_not_define_is_refused_by_the_selection(tmp_path):
    facts = load_fact_set(write_lines(tmp_path / "s.jsonl", [{"question": f"q{i}?", "answers": ["a"], "split": "train"}
                                                            for i in range(3)]))
    with pytest.raises(SftlensError, match=r"s: split 'dev' is not in this fact set \(it has train\)"):
        facts.select(None, "dev")
    assert len(facts.select("all", "train", 2)) == 2


# --- properties ------------------------------------------------------------------------------


def test_split_shares_are_the_stated_ones():
    counts = Counter(split_of(f"key{i}") for i in range(20000))
    for split, share in SHARES:
        assert counts[split] / 20000 == pytest.approx(share, abs=0.012)


line_strategy = st.fixed_dictionaries(
    {"question": st.text(min_size=1, max_size=20).filter(str.strip),
     "answers": st.lists(st.text(min_size=1, max_size=8).filter(str.strip), min_size=1, max_size=3)},
    optional={"topic": st.sampled_from(["a", "b", "c"])})


@settings(max_examples=30, deadline=None)
@given(st.lists(line_strategy, min_size=1, max_size=12, unique_by=lambda d: json.dumps(d, sort_keys=True)),
       st.lists(line_strategy, max_size=6))
def test_ids_and_splits_do_not_change_when_lines_are_appended(tmp_path_factory, first, more):
    tmp = tmp_path_factory.mktemp("append")
    seen = {json.dumps(d, sort_keys=True) for d in first}
    more = [d for d in more if json.dumps(d, sort_keys=True) not in seen and not seen.add(json.dumps(d, sort_keys=True))]
    before = load_fact_set(write_lines(tmp / "f.jsonl", first)).facts
    after = load_fact_set(write_lines(tmp / "f.jsonl", [*first, *more])).facts
    assert [(f.id, f.split) for f in after[:len(before)]] == [(f.id, f.split) for f in before]
    assert all(f.split == split_of(f.id.rsplit("/", 1)[1]) for f in after), "a split is a function of the key alone"


words = st.text(alphabet="abcdefgh XYZ.-", min_size=1, max_size=10).filter(lambda s: s.strip())


@settings(max_examples=200, deadline=None)
@given(st.lists(words, min_size=1, max_size=3), st.lists(st.lists(words, max_size=3), min_size=3, max_size=3),
       words, words, st.data())
def test_an_alias_counts_exactly_as_the_answer_it_belongs_to(answers, alias_lists, before, after, data):
    matcher = Matcher({"Paris": ["City of Light"]})
    table = {a: tuple(aliases) for a, aliases in zip(answers, alias_lists) if aliases}
    flat = [*answers, *(x for extra in table.values() for x in extra)]
    assert matcher.accepted(answers, table) == matcher.accepted(flat)
    chosen = data.draw(st.sampled_from(flat))
    assert matcher.is_correct(f"{before} {chosen} {after}", answers, table)
    # brute force: correct iff some accepted string, normalised, is inside the normalised output
    from sftlens.data.matching import normalize

    output = f"{before}{after}"
    expected = any(normalize(x) and normalize(x) in normalize(output) for x in flat)
    assert matcher.is_correct(output, answers, table) == expected


# --- the CLI ------------------------------------------------------------------------------------


def test_data_check_prints_the_counts(capsys):
    assert main(["data", "check", str(FIXTURES / "native.jsonl"), "--in-domain", "art"]) == 0
    out = capsys.readouterr().out
    assert "native: 6 facts, 3 relations/topics (art 1, capital 3, science 2)" in out
    assert "domains: in 1, out 5" in out and "aliases per fact: mean 0.67, max 2" in out


def test_probe_and_split_take_a_fact_set(tiny_model_dir, tmp_path, capsys):
    facts = str(FIXTURES / "native.jsonl")
    assert main(["probe", "--model", str(tiny_model_dir), "--facts", facts, "--split", "train,dev,test",
                 "--samples", "1", "--max-new-tokens", "3", "--templates", "0", "--store", str(tmp_path / "p")]) == 0
    assert "D_train" in capsys.readouterr().out
    assert main(["split", "--store", str(tmp_path / "p"), "--facts", facts, "--out", str(tmp_path / "s"),
                 "--sizes", "3", "--seeds", "0", "--levels", "0"]) == 0
    rows = [json.loads(line) for path in (tmp_path / "s").rglob("*.jsonl") for line in path.read_text().splitlines()]
    japan = [r for r in rows if r["question"] == "What is the capital of Japan?"]
    assert japan and all(r["answers"] == ["Tokyo", "Tokio", "Edo"] for r in japan)
    assert all(r["completion"] == " Tokyo " for r in japan), "the completion stays the first answer"
