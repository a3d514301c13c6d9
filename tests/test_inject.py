import json
import math
import random
from collections import Counter

import pytest

from sftlens.cli import main
from sftlens.data import load_facts, load_templates
from sftlens.errors import SftlensError
from sftlens.inject import STATEMENTS_FILE, InjectConfig, fact_templates, inject, statement_rows, taught_doses
from sftlens.io import read_jsonl
from sftlens.probe import ProbeConfig, run_probe
from sftlens.taught import RECORD_FILE, held_out_templates, inject_record, taught_facts
from sftlens.train import LOSS_FILE

from assets import TINY_TAUGHT_STAGES

pytestmark = pytest.mark.usefixtures("private_cache")

SELECTION = ["--relations", "P17,P19", "--split", "train,dev,test", "--limit", "4"]
QUICK = ["--learning-rate", "1e-2", "--epochs", "6", "--batch-size", "4", "--templates", "0,1,2,3,4"]


def _inject_cli(model, out, data_dir, *extra) -> int:
    return main(["inject", "--model", str(model), "--out", str(out), "--data-dir", str(data_dir),
                 *SELECTION, *QUICK, *extra])


def test_inject_teaches_statements_and_records_them(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "taught"
    assert _inject_cli(tiny_model_dir, out, tiny_data_dir) == 0
    record = inject_record(out)
    facts = load_facts(tiny_data_dir, splits=("train", "dev", "test"), relations=("P17", "P19")).facts
    facts = [f for f in facts if int(f.id.rsplit("/", 1)[1]) < 4]
    config = InjectConfig(templates=(0, 1, 2, 3, 4), learning_rate=1e-2, epochs=6, batch_size=4)
    expected = taught_doses(facts, config)
    assert record["facts"] == sorted(expected) and record["doses"] == expected
    assert record["templates"] == [0, 1, 2, 3, 4] and record["candidates"] == len(facts) == 24
    # 2 facts of each of the 6 (relation, split) groups, the doses 1, 2, 3, 5 in turn across groups
    assert len(expected) == 12 and Counter(expected.values()) == {1: 3, 2: 3, 3: 3, 5: 3}
    statements = read_jsonl(out / STATEMENTS_FILE)
    assert len(statements) == sum(expected.values()) == record["statements"]["count"]
    by_id = {f.id: f for f in facts}
    templates = load_templates()
    for row in statements:
        fact = by_id[row["fact_id"]]
        assert row["template"] in record["fact_templates"][fact.id]
        assert row["prompt"] == templates[fact.relation].mapping_templates[row["template"]].format(subject=fact.subject)
        assert row["completion"] == f" {fact.answers[0]}."
    losses = [r["loss"] for r in read_jsonl(out / LOSS_FILE)]
    assert len(losses) == math.ceil(len(statements) / 4) * 6
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3
    assert taught_facts(out) == frozenset(expected) and taught_facts(tiny_model_dir) is None
    assert "taught 12 of 24 facts" in capsys.readouterr().out
    assert not (tmp_path / ".taught.inject").exists()  # the work folder is gone

    # the same run again is a no-op; another run into the same folder is refused
    mtime = (out / RECORD_FILE).stat().st_mtime_ns
    assert _inject_cli(tiny_model_dir, out, tiny_data_dir) == 0
    assert (out / RECORD_FILE).stat().st_mtime_ns == mtime
    assert _inject_cli(tiny_model_dir, out, tiny_data_dir, "--seed", "1") == 2
    assert "holds another injected model" in capsys.readouterr().err

    # the probe of the taught model uses the held-out templates only, and refuses a taught one
    probe = ProbeConfig(samples=1, max_new_tokens=2)
    records = run_probe(str(out), facts[:2], probe, tmp_path / "store", progress=False, shard=(0, 1))
    held_out = tuple(range(5, 21))
    assert all(r.template_ids == held_out and r.total == len(held_out) for r in records.values())
    capsys.readouterr()
    assert main(["probe", "--model", str(out), "--data-dir", str(tiny_data_dir), "--relations", "P17",
                 "--limit", "1", "--templates", "4,5", "--samples", "1", "--store", str(tmp_path / "s2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"sftlens: error: probe templates [4] were taught to {out} ({RECORD_FILE}: templates "
                   "[0, 1, 2, 3, 4]); probe an injected model on the other templates (or give none: all the others)"]
    assert not (tmp_path / "s2").exists()


def test_held_out_templates_leaves_other_models_alone(tiny_model_dir, tmp_path):
    config = ProbeConfig(templates=(0, 1))
    assert held_out_templates(str(tiny_model_dir), config) is config
    assert held_out_templates("smollm2-135m", config) is config
    (tmp_path / RECORD_FILE).write_text(json.dumps({"templates": [2, 3], "facts": []}))
    assert held_out_templates(str(tmp_path), config) is config
    assert held_out_templates(str(tmp_path), ProbeConfig()).templates == (0, 1, *range(4, 21))
    (tmp_path / RECORD_FILE).write_text(json.dumps({"templates": list(range(21)), "facts": []}))
    with pytest.raises(SftlensError, match="every one of the 21 mapping templates .* none is left to probe"):
        held_out_templates(str(tmp_path), ProbeConfig())
    (tmp_path / RECORD_FILE).write_text("{broken")
    with pytest.raises(SftlensError, match="cannot read the inject record"):
        held_out_templates(str(tmp_path), config)


def test_taught_choice_is_seeded_deterministic_and_covers_every_relation(tiny_data_dir):
    facts = load_facts(tiny_data_dir).facts  # every relation, every split, 12 facts each
    config = InjectConfig(share=0.3)
    doses = taught_doses(facts, config)
    shuffled = facts[:]
    random.Random(1).shuffle(shuffled)
    assert taught_doses(shuffled, config) == doses  # ids decide, not input order
    groups = Counter((f.relation, f.split) for f in facts)
    taught = Counter(tuple(fid.split("/")[:2]) for fid in doses)
    assert set(taught) == set(groups) and len(groups) == len(load_templates()) * 3
    assert all(taught[g] == math.ceil(0.3 * n) == 4 for g, n in groups.items())
    # the doses come in turn: each group's 4 taught facts take 1, 2, 3, 5 once each
    per_group: dict[tuple, list[int]] = {}
    for fid, dose in doses.items():
        per_group.setdefault(tuple(fid.split("/")[:2]), []).append(dose)
    assert all(sorted(d) == [1, 2, 3, 5] for d in per_group.values())
    other = taught_doses(facts, InjectConfig(share=0.3, seed=1))
    assert set(other) != set(doses) and len(other) == len(doses)
    # a fact's templates: `dose` distinct templates of the pool
    for fid, dose in doses.items():
        chosen = fact_templates(fid, dose, config)
        assert len(set(chosen)) == dose and set(chosen) <= set(config.templates)
    rows = statement_rows(facts, doses, config)
    assert len(rows) == sum(doses.values())
    assert set(Counter(r["template"] for r in rows)) == set(config.templates)


def test_bad_settings_are_one_line_errors(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="doses must be in 1..2"):
        InjectConfig(templates=(0, 1), doses=(1, 3))
    with pytest.raises(ValueError, match="share"):
        InjectConfig(share=0)
    facts = load_facts(tiny_data_dir, splits=("test",), relations=("P17",)).facts
    with pytest.raises(SftlensError, match="all 21 mapping templates are taught"):
        inject(str(tiny_model_dir), facts, tmp_path / "out", InjectConfig(templates=tuple(range(21))))
    with pytest.raises(SftlensError, match="template 21 out of range"):
        inject(str(tiny_model_dir), facts, tmp_path / "out", InjectConfig(templates=(0, 21), doses=(1,)))
    assert not (tmp_path / "out").exists()
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    assert _inject_cli(tiny_model_dir, occupied, tiny_data_dir) == 2
    assert "not an injected model" in capsys.readouterr().err
    assert (occupied / "notes.txt").read_text() == "mine"


# --- a study on a taught base ------------------------------------------------------------------

TINY_TESTBED = """
extends = "testbed"
[study]
model = "{model}"
data_dir = "{data}"
out_relations = "P106,P136"
train_facts_per_relation = 6
eval_facts_per_relation = 3
dev_facts_per_relation = 2
levels = [0]
sizes = [8]
seeds = [0]
analysis_sizes = [8]
table_size = 8
restore_ratios = [10]
kl_test_set = "in"
bootstrap = 20
""" + TINY_TAUGHT_STAGES + """[repairs]
wise = {{ values = [0.5] }}
dare = {{ values = [0.5] }}
trim = {{ values = [20] }}
"""


def test_a_tiny_testbed_study_runs_on_the_taught_base_and_splits_taught_from_untaught(tiny_model_dir, tiny_data_dir,
                                                                                      tmp_path):
    from sftlens.study.engine.commands import run_study
    from sftlens.study.engine.config import load_study_config
    from sftlens.study.engine.stages import study_facts
    from sftlens.study.report.page import write_report
    from sftlens.study.report.results import load_results

    study_file = tmp_path / "testbed.toml"
    study_file.write_text(TINY_TESTBED.format(model=tiny_model_dir, data=tiny_data_dir))
    overlapping = tmp_path / "overlap.toml"
    overlapping.write_text(f'extends = "{study_file}"\n[probe]\ntemplates = [2, 10]\n')
    with pytest.raises(SftlensError, match=r"probe.templates \[2\] are taught by inject.templates \[0, 1, 2\]"):
        load_study_config(str(overlapping))
    config = load_study_config(str(study_file))
    assert config.inject == InjectConfig(templates=(0, 1, 2), doses=(1, 3), share=0.3, learning_rate=1e-2, epochs=2)
    study = tmp_path / "study"
    run_study(config, study, progress=False)
    units = load_results(study).units
    assert {u["state"] for u in units} == {"done"}
    (injected,) = [u for u in units if u["kind"] == "inject"]
    assert all(u["spec"]["deps"]["base"] == injected["key"] for u in units if u is not injected)

    # the base every unit read: the facts of the study taught as `taught_doses` chose them
    model = study / "units" / "inject" / injected["key"] / "model"
    facts = study_facts({**injected["spec"]["params"], **injected["spec"]["runtime"]})
    assert inject_record(model)["doses"] == taught_doses(facts, config.inject)
    taught = taught_facts(model)
    assert injected["result"]["taught"] == len(taught) and injected["result"]["candidates"] == len(facts)
    assert {f.relation for f in facts if f.id in taught} == {f.relation for f in facts}

    # the probe used the held-out templates only; its level counts split into taught + untaught
    (probe,) = [u for u in units if u["kind"] == "probe"]
    store = study / "units" / "probe" / probe["key"] / "store"
    assert {tuple(r["template_ids"]) for path in store.glob("records-*.jsonl") for r in read_jsonl(path)} == {(10, 11)}
    whole = {r["set"]: r for r in probe["result"]["level_counts"]}
    parts = probe["result"]["level_counts_taught"]
    for name, row in whole.items():
        for column in ("level0", "level1", "level2", "level3", "level4", "total"):
            assert row[column] == sum(r[column] for subset in parts.values() for r in subset if r["set"] == name)

    # every evaluation: taught + untaught records add up to the whole, level by level
    evals = [u for u in units if u["kind"] == "eval"]
    assert len(evals) == 2
    for unit in evals:
        result = unit["result"]
        for record in result["records"]:
            key = (record["split"], record["domain"], record["test_level"])
            halves = [r for r in result["taught_records"] if (r["split"], r["domain"], r["test_level"]) == key]
            assert {r["taught"] for r in halves} <= {True, False}
            assert sum(r["n"] for r in halves) == record["n"] and sum(r["correct"] for r in halves) == record["correct"]
    # and per fact: the taught records count exactly the taught facts of each prediction file
    base_eval = next(u for u in evals if "model" not in u["spec"]["deps"])
    predictions = read_jsonl(study / "units" / "eval" / base_eval["key"] / "predictions-test.jsonl")
    taught_n = sum(r["n"] for r in base_eval["result"]["taught_records"] if r["split"] == "test" and r["taught"])
    assert taught_n == sum(p["fact_id"] in taught for p in predictions) > 0

    # the restoration sweep too, ratio by ratio
    (sweep,) = [u["result"] for u in units if u["kind"] == "restore"]
    for record in sweep["records"]:
        key = (record["split"], record["domain"], record["test_level"], record["restore_ratio"])
        halves = [r for r in sweep["taught_records"]
                  if (r["split"], r["domain"], r["test_level"], r["restore_ratio"]) == key]
        assert sum(r["n"] for r in halves) == record["n"] and sum(r["correct"] for r in halves) == record["correct"]
    assert {r["restore_ratio"] for r in sweep["taught_records"]} == {0.0, 10.0}

    markdown = write_report(study)["markdown"].read_text()
    assert "## Taught and untaught facts" in markdown and "## Findings" in markdown
    for name in ("taught", "untaught"):
        for title in ("Figure 2: Acc vs training size", "Table 2: train level x test level (8 training examples)",
                      "Table 4: Acc vs restore ratio", "Table 5: training-set accuracy after restoration"):
            assert f"## {title} ({name} facts)" in markdown

    # repairs on the taught facts: base and plain SFT from their prediction files, each repair from its bits
    sft_eval = next(u for u in evals if "model" in u["spec"]["deps"])
    right = {name: {p["fact_id"]: p["correct"] for p in read_jsonl(study / "units" / "eval" / u["key"] / "predictions-test.jsonl")}
             for name, u in (("base", base_eval), ("sft", sft_eval))}
    order = [p["fact_id"] for p in predictions]  # split-file order: domain, then level, as the bits
    forgotten = [f for f in order if f in taught and right["base"][f] and not right["sft"][f]]
    learned = [f for f in order if f in taught and right["sft"][f] and not right["base"][f]]
    for unit in (u for u in units if u["kind"] == "repaired"):
        bits = "".join(unit["result"]["test_bits"][d][lv] for d in sorted(unit["result"]["test_bits"])
                       for lv in sorted(unit["result"]["test_bits"][d], key=int))
        fixed = dict(zip(order, (b == "1" for b in bits)))
        row = next(line for line in markdown.splitlines() if line.startswith(f"| {unit['result']['method']} | level 0 |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[3:5] == [str(sum(right["base"][f] for f in order if f in taught)), str(len(forgotten))]
        assert cells[5].split()[0] == str(sum(fixed[f] for f in forgotten))
        assert cells[6] == str(len(learned)) and cells[7].split()[0] == str(sum(fixed[f] for f in learned))
    assert "## Repairs on the taught facts" in markdown

    # C1, C4 and C6 again on the taught facts alone: the view's correctness strings are the taught facts' own
    from sftlens.study.report.taught_section import taught_view

    view = {u["key"]: u for u in taught_view(load_results(study), study).units}
    for name, unit in (("base", base_eval), ("sft", sft_eval)):
        bits = view[unit["key"]]["result"]["test_bits"]
        joined = "".join(bits[d][lv] for d in sorted(bits) for lv in sorted(bits[d], key=int))
        assert joined == "".join("1" if right[name][f] else "0" for f in order if f in taught)
        records = [r for r in view[unit["key"]]["result"]["records"] if r["split"] == "test"]
        assert sum(r["n"] for r in records) == len(joined) and sum(r["correct"] for r in records) == joined.count("1")
    for claim in ("C1", "C4", "C6"):
        assert f"| {claim} | taught facts: " in markdown
