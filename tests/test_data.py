import json

import pytest

from sftlens.data import in_domain_relations, load_facts, load_templates, parse_relations
from sftlens.errors import SftlensError


def test_templates_have_24_relations_21_mappings_and_10_in_domain():
    templates = load_templates()
    assert len(templates) == 24
    assert all(len(t.mapping_templates) == 21 for t in templates.values())
    assert all(t.question.count("{subject}") == 1 for t in templates.values())
    assert len(in_domain_relations()) == 10 and sum(t.domain == "out" for t in templates.values()) == 14
    assert "P17" in in_domain_relations() and templates["P26"].domain == "out"


def test_subject_is_recovered_from_the_question(tiny_data_dir):
    facts = load_facts(tiny_data_dir, splits="test", relations="P17").facts
    assert facts[3].subject == "Entity P17 test 3"
    assert facts[3].question == "Which country is Entity P17 test 3 located in?"
    assert facts[3].id == "P17/test/00003" and facts[3].domain == "in"


def test_ids_are_stable_and_unique(tiny_data_dir):
    a = [f.id for f in load_facts(tiny_data_dir).facts]
    b = [f.id for f in load_facts(tiny_data_dir).facts]
    assert a == b and len(set(a)) == len(a) == 24 * 3 * 12


def test_unmatched_questions_are_reported_not_dropped_silently(tiny_data_dir):
    path = tiny_data_dir / "train" / "P19.train.json"
    records = json.loads(path.read_text())
    records.append({"question": "Who painted this?", "answers": ["X"]})
    path.write_text(json.dumps(records))
    fs = load_facts(tiny_data_dir, splits="train", relations="P19")
    assert len(fs.facts) == 12
    assert fs.unmatched == {("P19", "train"): ["Who painted this?"]}


def test_missing_data_dir_names_it(tmp_path):
    with pytest.raises(SftlensError, match="does-not-exist"):
        load_facts(tmp_path / "does-not-exist")


def test_data_dir_from_environment(tiny_data_dir, monkeypatch):
    monkeypatch.setenv("SFTLENS_DATA_DIR", str(tiny_data_dir))
    assert len(load_facts(None, splits="dev", relations="P17").facts) == 12


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"question": "q"}', "expected a list"),
        ('[{"question": "Which country is X located in?"}]', "record 0"),
        ('[{"question": "Which country is X located in?", "answers": "France"}]', "record 0"),
        ("not json", "cannot read JSON"),
    ],
)
def test_malformed_files_name_the_file(tiny_data_dir, content, message):
    path = tiny_data_dir / "dev" / "P17.dev.json"
    path.write_text(content)
    with pytest.raises(SftlensError, match=message) as err:
        load_facts(tiny_data_dir, splits="dev", relations="P17")
    assert "P17.dev.json" in str(err.value)


def test_unknown_relation_and_split_are_errors(tiny_data_dir):
    with pytest.raises(SftlensError, match="unknown relation 'P999'"):
        load_facts(tiny_data_dir, relations="P17,P999")
    with pytest.raises(SftlensError, match="unknown split 'validation'"):
        load_facts(tiny_data_dir, splits="validation")


def test_relation_aliases():
    assert parse_relations("in") == in_domain_relations()
    assert parse_relations("P17,out")[0] == "P17" and len(parse_relations("P17,out")) == 15
    with pytest.raises(SftlensError, match="empty"):
        parse_relations(" , ")


def test_shared_data_counts(shared_data_dir):
    from collections import Counter

    fs = load_facts(shared_data_dir)
    per_split = Counter(f.split for f in fs.facts)
    assert per_split == {"train": 176560, "dev": 22068, "test": 22075}
    assert not fs.unmatched
    assert sum(len(f.answers) > 1 for f in fs.facts) == 9159
