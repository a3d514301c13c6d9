"""A study on a small native JSONL fact set, end to end on the tiny model, and the study's checks
of a fact set it cannot use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftlens.errors import SftlensError
from sftlens.study.engine.commands import plan, run_study
from sftlens.study.engine.config import load_study_config
from sftlens.study.report.page import write_report
from sftlens.study.report.results import load_results

COLOURS = ["red", "green", "blue", "yellow", "black", "white"]

STUDY = """
[data]
facts = "facts.jsonl"
in_domain = "capital,colour"
[study]
model = "{model}"
train_facts_per_relation = 12
eval_facts_per_relation = 5
levels = [0]
sizes = [{size}]
include_all = false
seeds = [0]
mixed = false
analysis_sizes = [{size}]
table_size = {size}
restore_ratios = [50]
concentration_ratios = [1, 10]
kl = {kl}
kl_test_set = "in"
random_control = false
bootstrap = 20
device = "cpu"
[probe]
samples = 1
templates = [0]
max_new_tokens = 4
[train]
batch_size = 4
learning_rate = 1e-3
[eval]
max_new_tokens = 4
"""


def write_fact_set(folder: Path) -> Path:
    """Three topics of 40 facts: one with templates (subject + relation), two question-only, with aliases."""
    lines = []
    for i in range(40):
        lines.append({"subject": f"Land {i}", "relation": "capital", "answers": [f"City {i}"], "id": i})
        lines.append({"question": f"What colour is thing {i}?", "topic": "colour",
                      "answers": [{"answer": COLOURS[i % 6], "aliases": [COLOURS[i % 6].upper() + "ISH"]}]})
        lines.append({"question": f"How many legs has animal {i}?", "topic": "legs", "answers": [str(i % 5 * 2)]})
    (folder / "facts.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (folder / "facts.relations.json").write_text(json.dumps({"relations": {"capital": {
        "question": "What is the capital of {subject}?", "templates": ["The capital of {subject} is"]}}}))
    return folder / "facts.jsonl"


def study_file(folder: Path, model_dir: Path, size: int = 8, kl: str = "false") -> Path:
    path = folder / f"study-{size}-{kl}.toml"
    path.write_text(STUDY.format(model=model_dir, size=size, kl=kl))
    return path


def test_a_study_on_a_native_fact_set_runs_end_to_end(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("SFTLENS_DATA_DIR", raising=False)  # the fact set alone: no EntityQuestions needed
    write_fact_set(tmp_path)
    config = load_study_config(str(study_file(tmp_path, tiny_model_dir, kl="true")))
    assert config.study.facts == str(tmp_path / "facts.jsonl"), "a [data] path is relative to the study file"
    run_study(config, tmp_path / "study", progress=False)
    units = load_results(tmp_path / "study").units
    assert {u["state"] for u in units} == {"done"}
    assert sorted({u["kind"] for u in units}) == ["deltas", "eval", "kl", "probe", "restore", "split", "train"]
    # KL prompts from the set's own templates: capital's mapping template, the other topics' questions
    kl = next(u["result"] for u in units if u["kind"] == "kl")
    assert kl["kl"]["n"] == sum(1 for path in (tmp_path / "study" / "units" / "split").rglob("test/in-level*.jsonl")
                                for _ in path.read_text().splitlines())
    probe = next(u["result"] for u in units if u["kind"] == "probe")
    assert probe["fact_set"]["name"] == "facts" and probe["fact_set"]["facts"] == 120
    assert {row["set"] for row in probe["level_counts"]} >= {"D_train", "D_test", "D_testood"}
    split_dir = next((tmp_path / "study" / "units" / "split").iterdir()) / "data"
    rows = [json.loads(line) for path in split_dir.rglob("*.jsonl") for line in path.read_text().splitlines()]
    assert {r["relation"] for r in rows if r["domain"] == "out"} == {"legs"}
    colour = [r for r in rows if r["relation"] == "colour"]
    assert colour and all(len(r["answers"]) == 2 and r["answers"][1].endswith("ISH") for r in colour)
    evaluated = next(u["result"] for u in units if u["kind"] == "eval" and u["label"] == "eval base")
    assert {r["domain"] for r in evaluated["records"]} == {"in", "out"}
    report = (write_report(tmp_path / "study")["markdown"]).read_text()
    splits = probe["fact_set"]["splits"]
    assert sum(splits.values()) == 120 and set(splits) == {"train", "dev", "test"}
    assert "Facts: fact set facts (120 facts, 3 topics; splits: " in report
    assert f"train {splits['train']}" in report and "domains: in 80, out 40)." in report
    assert "0 to run" in plan(config, tmp_path / "study"), "keyed by the set's bytes: nothing reruns"


def test_a_study_refuses_a_fact_set_it_cannot_use(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("SFTLENS_DATA_DIR", raising=False)
    write_fact_set(tmp_path)
    with pytest.raises(SftlensError, match=r"fact set facts: \d+ in-domain train facts .*fewer than the largest "
                                           r"of study.sizes \(500\)"):
        plan(load_study_config(str(study_file(tmp_path, tiny_model_dir, size=500))), tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_study_plan_takes_the_fact_set_on_the_command_line(tiny_model_dir, tmp_path, capsys):
    from sftlens.cli import main

    facts = write_fact_set(tmp_path)
    other = tmp_path / "other.jsonl"
    other.write_text(facts.read_text())  # the same facts under another name, without the side file
    (tmp_path / "other.relations.json").write_text((tmp_path / "facts.relations.json").read_text())
    config = study_file(tmp_path, tiny_model_dir, size=500)
    assert main(["study", "plan", str(config), "--out", str(tmp_path / "s"), "--facts", str(other)]) == 2
    assert "fact set other: " in capsys.readouterr().err, "--facts replaces the file's [data] facts"
