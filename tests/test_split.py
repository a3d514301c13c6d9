"""Data division: topic balance, shortfalls, SFT row format, test/dev division, no-op re-runs, CLI."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from sftlens.cli import main
from sftlens.data import Fact, in_domain_relations, load_facts, load_templates, sft_completion, sft_prompt
from sftlens.errors import SftlensError
from sftlens.io import JsonlAppender, atomic_write_json, read_jsonl
from sftlens.probe import ProbeRecord, store_meta
from sftlens.split import SplitConfig, balanced_sample, build_splits

TOTAL = 8  # samples per fact in the synthetic records: correct = 2 * level - 1 gives that level


def make_fact(relation: str, split: str, index: int) -> Fact:
    tpl = load_templates()[relation]
    subject = f"Subject {relation} {split} {index}"
    return Fact(id=f"{relation}/{split}/{index:05d}", relation=relation, subject=subject,
                answers=(f"Answer {index}", "Other"), split=split, domain=tpl.domain,
                question=tpl.question.format(subject=subject))


def record_at(fact: Fact, level: int) -> ProbeRecord:
    correct = 0 if level == 0 else 2 * level - 1
    return ProbeRecord(fact.id, correct, TOTAL, (correct,))


def dataset(per_topic: dict[str, int], level_of=lambda i: i % 5, splits=("train",)):
    facts, records = [], {}
    for split in splits:
        for relation, count in per_topic.items():
            for i in range(count):
                fact = make_fact(relation, split, i)
                facts.append(fact)
                records[fact.id] = record_at(fact, level_of(i))
    return facts, records


SMALL = SplitConfig(sizes=(20, 40), seeds=(0, 1), include_all=True)


def test_record_helper_levels():
    fact = make_fact("P17", "train", 0)
    assert [record_at(fact, level).level for level in range(5)] == [0, 1, 2, 3, 4]


def test_sets_are_balanced_across_the_ten_topics(tmp_path):
    facts, records = dataset({r: 25 for r in in_domain_relations()})  # 5 facts per topic and level
    manifest = build_splits(facts, records, SplitConfig(sizes=(30,), seeds=(0,), include_all=False), tmp_path / "out")
    entry = manifest["sets"]["train/level2-n30-seed0"]
    assert entry["composition"] == {r: 3 for r in sorted(in_domain_relations())}
    rows = read_jsonl(tmp_path / "out" / entry["path"])
    assert Counter(r["relation"] for r in rows) == Counter(entry["composition"])
    assert {r["level"] for r in rows} == {2} and len({r["fact_id"] for r in rows}) == 30


def test_short_topic_is_filled_from_the_others(tmp_path):
    counts = {r: 40 for r in in_domain_relations()}
    counts["P36"] = 4  # one level-1 fact in this topic (i % 5 == 1 for i = 1)
    facts, records = dataset(counts)
    manifest = build_splits(facts, records, SplitConfig(sizes=(37,), seeds=(3,), include_all=False), tmp_path / "out")
    composition = manifest["sets"]["train/level1-n37-seed3"]["composition"]
    assert composition["P36"] == 1 and sum(composition.values()) == 37
    others = [n for r, n in composition.items() if r != "P36"]
    assert max(others) - min(others) <= 1  # the deficit is spread evenly
    assert manifest["train_available"]["1"]["P36"] == 1


def test_level_smaller_than_size_is_flagged_short(tmp_path):
    facts, records = dataset({"P17": 10, "P19": 10})  # 2 facts per level per topic
    manifest = build_splits(facts, records, SplitConfig(sizes=(3, 6), seeds=(0,)), tmp_path / "out")
    assert manifest["sets"]["train/level0-n3-seed0"]["size"] == 3
    assert manifest["sets"]["train/level0-n3-seed0"]["short"] is False
    short = manifest["sets"]["train/level0-n6-seed0"]
    assert short["size"] == 4 and short["short"] is True and short["requested"] == "6"
    whole = manifest["sets"]["train/level4-nall-seed0"]
    assert sorted(whole["fact_ids"]) == sorted(f.id for f in facts if records[f.id].level == 4)


def test_rows_use_the_papers_sft_format(tmp_path):
    facts, records = dataset({"P17": 5})
    build_splits(facts, records, SplitConfig(sizes=(1,), seeds=(0,), include_all=False, mixed=False), tmp_path / "out")
    (row,) = read_jsonl(tmp_path / "out" / "train" / "level3-n1-seed0.jsonl")
    fact = {f.id: f for f in facts}[row["fact_id"]]
    assert row == {
        "fact_id": fact.id, "relation": "P17", "domain": "in", "level": 3, "question": fact.question,
        "answers": list(fact.answers), "prompt": sft_prompt(fact.question), "completion": sft_completion(fact.answers[0]),
    }
    assert row["prompt"] == f"<question> {fact.question} <answer>" and row["completion"] == f" {fact.answers[0]} "


def test_seeds_differ_and_same_seed_repeats(tmp_path):
    facts, records = dataset({r: 30 for r in in_domain_relations()})
    a = build_splits(facts, records, SMALL, tmp_path / "a")
    b = build_splits(list(reversed(facts)), records, SMALL, tmp_path / "b")
    assert a["sets"]["train/level1-n20-seed0"]["fact_ids"] == b["sets"]["train/level1-n20-seed0"]["fact_ids"]
    assert set(a["sets"]["train/level1-n20-seed0"]["fact_ids"]) != set(a["sets"]["train/level1-n20-seed1"]["fact_ids"])
    mixed = a["sets"]["train/mixed-n40-seed0"]
    assert len(mixed["levels"]) >= 3 and mixed["level"] == "mixed"


def test_test_and_dev_sets_partition_by_domain_and_level(tmp_path):
    relations = {"P17": 7, "P19": 6, "P106": 9, "P50": 4}
    facts, records = dataset(relations, level_of=lambda i: (i * 3) % 5, splits=("train", "dev", "test"))
    out = tmp_path / "out"
    manifest = build_splits(facts, records, SMALL, out)
    for split in ("test", "dev"):
        seen = {}
        for domain in ("in", "out"):
            for level in range(5):
                for row in read_jsonl(out / split / f"{domain}-level{level}.jsonl"):
                    assert row["domain"] == domain and row["level"] == level == records[row["fact_id"]].level
                    seen[row["fact_id"]] = row
        assert sorted(seen) == sorted(f.id for f in facts if f.split == split)
    assert manifest["sets"]["test/out-level0"]["composition"] == {"P106": 2, "P50": 1}
    # training sets come from in-domain training facts only
    train_ids = {i for name, e in manifest["sets"].items() if name.startswith("train/") for i in e["fact_ids"]}
    assert train_ids and all(i.split("/")[1] == "train" and i.split("/")[0] in ("P17", "P19") for i in train_ids)


def test_rerun_with_same_inputs_is_a_noop(tmp_path):
    facts, records = dataset({r: 10 for r in in_domain_relations()}, splits=("train", "test"))
    out = tmp_path / "out"
    first = build_splits(facts, records, SMALL, out)
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    inode = out.stat().st_ino
    assert build_splits(facts, records, SMALL, out) == first
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamp and out.stat().st_ino == inode
    changed = dict(records)
    changed[facts[0].id] = record_at(facts[0], (records[facts[0].id].level + 1) % 5)
    assert build_splits(facts, changed, SMALL, out)["inputs"] != first["inputs"]
    expected = {f"{s['path']}" for s in first["sets"].values()} | {"manifest.json"}
    assert {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} == expected


def test_unprobed_fact_is_an_error(tmp_path):
    facts, records = dataset({"P17": 3})
    del records[facts[1].id]
    with pytest.raises(SftlensError, match="1 facts have no probe record \\(e.g. P17/train/00001\\)"):
        build_splits(facts, records, SMALL, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_config_validation():
    with pytest.raises(ValueError, match="sizes must be positive"):
        SplitConfig(sizes=(0,))
    with pytest.raises(ValueError, match="levels: 5"):
        SplitConfig(levels=(5,))
    assert SplitConfig(sizes=[60], seeds=[1]).sizes == (60,)
    assert SplitConfig().sizes == (60, 120, 240, 480, 960, 1920) and SplitConfig().seeds == (0, 1, 2, 3, 4)


def test_balanced_sample_takes_everything_when_size_is_none():
    pools = {"A": [make_fact("P17", "train", i) for i in range(3)], "B": [make_fact("P19", "train", i) for i in range(1)]}
    assert sorted(f.id for f in balanced_sample(pools, None, 0, "x")) == sorted(f.id for p in pools.values() for f in p)


def test_cli_split_from_a_store(tiny_data_dir, tmp_path, capsys):
    store = tmp_path / "store"
    facts = [f for f in load_facts(tiny_data_dir, splits=("train", "test"), relations="P17,P19,P106").facts]
    atomic_write_json(store / "probe.json", store_meta("some-model", "f" * 16, _probe_config()))
    with JsonlAppender(store / "records-rank0.jsonl") as log:
        for i, fact in enumerate(facts):
            log.write(record_at(fact, i % 5).to_row())
    out = tmp_path / "sets"
    assert main(["split", "--store", str(store), "--data-dir", str(tiny_data_dir), "--out", str(out),
                 "--sizes", "4", "--seeds", "0,1", "--no-include-all"]) == 0
    printed = capsys.readouterr().out
    assert "| train/level0-n4-seed1 | 4 | 2 | 2-2 |" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["sizes"] == [4] and (out / "test" / "out-level2.jsonl").is_file()


def _probe_config():
    from sftlens.probe import ProbeConfig

    return ProbeConfig()
