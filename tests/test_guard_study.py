"""The guards' arm of a study (`[guards]`, preset `guards`): candidates on the first seed, the dev-chosen value on
the others, every arm scored alike, and the report's "Prevention and cure" against values recomputed by hand."""

import json
import re
import statistics

import pytest

from sftlens.errors import SftlensError
from sftlens.guards import GUARDS, known_rows, parse_guard
from sftlens.study.engine.kinds import KINDS

from assets import TINY_TAUGHT_STAGES

pytestmark = pytest.mark.usefixtures("private_cache")

TINY_GUARDS = """
extends = "guards"
[study]
model = "{model}"
data_dir = "{data}"
out_relations = "P106,P136"
train_facts_per_relation = 6
eval_facts_per_relation = 3
dev_facts_per_relation = 2
sizes = [8]
seeds = [0, 1]
analysis_sizes = [8]
table_size = 8
lora_learning_rates = [1e-3, 1e-2]
bootstrap = 50
""" + TINY_TAUGHT_STAGES + """[repairs]
restore = {{ values = [5, 20] }}
wise = {{ values = [0.5, 0.75] }}
dare = {{ values = [0.3, 0.6] }}
trim = {{ values = [20, 50] }}
guided = {{ values = [5, 20] }}
[guards]
replay = {{ values = [0.25, 0.5] }}
l2 = {{ values = [0.1, 10.0] }}
kl = {{ values = [0.1, 10.0] }}
freeze = {{ values = [0.5, 1.0] }}
mofo = {{ values = [0.1, 0.5] }}
"""


def _dev_acc(result: dict) -> float:
    """In-domain dev Acc by hand: the mean over levels of each level's share right."""
    dev = [r for r in result["records"] if r["split"] == "dev" and r["domain"] == "in"]
    return statistics.fmean(r["correct"] / r["n"] for r in dev)


def test_a_guards_study_chooses_on_dev_and_reports_prevention_beside_cure(tiny_model_dir, known_data_dir, tmp_path):
    from sftlens.probe import load_probe
    from sftlens.study.engine.commands import run_study
    from sftlens.study.engine.config import load_study_config
    from sftlens.study.engine.stages import study_facts
    from sftlens.study.report.page import write_report
    from sftlens.study.report.results import load_results

    study_file = tmp_path / "guards.toml"
    study_file.write_text(TINY_GUARDS.format(model=tiny_model_dir, data=known_data_dir))
    config = load_study_config(str(study_file))
    assert list(config.guards) == list(GUARDS)
    study = tmp_path / "study"
    run_study(config, study, progress=False)
    results = load_results(study)
    units, keys = results.units, results.by_key()
    failed = [u["label"] for u in units if u["state"] != "done"]
    assert not failed
    # every kind's real result has exactly the fields its declaration names (`sftlens.study.engine.kinds`): read
    # typed, a field the unit function wrote and the declaration lacks would raise here
    assert {u["kind"] for u in units} >= {"inject", "probe", "split", "train", "eval", "deltas", "importance", "repair",
                                          "repaired", "lora", "lora-eval", "guard", "guarded", "guard-eval"}
    for unit in units:
        assert isinstance(results.outcome(unit), KINDS[unit["kind"]].result), unit["label"]

    candidates = [u for u in units if u["kind"] == "guard"]
    guarded = [u for u in units if u["kind"] == "guarded"]
    assert {u["spec"]["params"]["seed"] for u in candidates} == {0} and len(candidates) == 10
    assert {u["spec"]["params"]["seed"] for u in guarded} == {1} and len(guarded) == 5
    scores = {u["spec"]["deps"]["model"]: u["result"] for u in units if u["kind"] == "guard-eval"}
    for unit in guarded:  # the chosen value: a brute-force argmax over the candidates' dev scores
        name = unit["spec"]["params"]["guard"]
        dev = {parse_guard(c["spec"]["params"]["train"]["guard"])[1]: _dev_acc(scores[c["key"]])
               for c in candidates if c["spec"]["params"]["train"]["guard"].startswith(f"{name}=")}
        best = max(dev.values())
        expected = min((v for v, a in dev.items() if a == best), key=lambda v: abs(v - GUARDS[name].neutral))
        assert unit["result"]["value"] == expected, name
        assert unit["result"]["guard"]["value"] == expected

    # replay mixed in only facts the taught base answers right in the training split, never its own facts
    replay = [u for u in candidates if u["spec"]["params"]["train"]["guard"].startswith("replay=")]
    probe = next(u for u in units if u["kind"] == "probe")
    records = load_probe(study / "units" / "probe" / probe["key"] / "store")
    facts = study_facts({**replay[0]["spec"]["params"], **replay[0]["spec"]["runtime"]})
    pool = {r["fact_id"] for r in known_rows(records, facts)}
    assert all(0 < u["result"]["guard"]["replayed"] <= len(pool) for u in replay)
    assert all(f.split == "train" for f in facts if f.id in pool)

    # the report: the plain row's kept share recomputed from the units' correctness strings
    report = write_report(study, page=tmp_path / "page.md")
    text = report["markdown"].read_text()
    assert report["page"].read_text().startswith("# Results: ")
    assert report["page"].read_text().splitlines()[2].startswith("**Answer (a rule fixed in code before the run): ")
    assert "## Prevention and cure" in text and text.index("## Prevention and cure") < text.index("## Findings")
    # the tiny base answers no dev fact right: nothing forgotten to weigh, so each model's guided repair is skipped,
    # said in one line, and is no arm
    assert "- Skipped (nothing to report): importance level0-n8-seed0: no forgotten fact among its 20 in-domain dev " \
           "facts" in report["page"].read_text() and "| repair guided " not in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    for arm in ("plain SFT", *(f"guard {g}" for g in GUARDS), "LoRA", "repair wise", "repair restore"):
        assert arm in rows, arm
    plain_units = [u for u in units if u["kind"] == "guard-eval" and keys[u["spec"]["deps"]["model"]]["kind"] == "train"]
    own = [statistics.fmean(int(b) for levels in u["result"]["train_bits"].values() for b in "".join(levels.values()))
           for u in plain_units]
    assert f"| {100 * statistics.fmean(own):.1f} |" in rows["plain SFT"]
    # and its taught-facts-kept share, by hand from the prediction order of the split's test files
    from sftlens.taught import taught_facts

    inject = next(u for u in units if u["kind"] == "inject")
    taught = taught_facts(study / "units" / "inject" / inject["key"] / "model")
    split = next(u for u in units if u["kind"] == "split")
    order = []
    for path in sorted((study / "units" / "split" / split["key"] / "data" / "test").glob("*.jsonl")):
        order += [(path.stem.split("-level")[0], path.stem.split("-level")[1], json.loads(line)["fact_id"])
                  for line in path.read_text().splitlines()]

    def right(result: dict) -> dict:
        by_group: dict = {}
        for domain, level, fact in order:
            by_group.setdefault((domain, level), []).append(fact)
        return {f: b == "1" for (d, lv), facts in by_group.items() for f, b in zip(facts, result["test_bits"][d][lv])}

    base = right(next(u for u in units if u["kind"] == "eval" and "model" not in u["spec"]["deps"])["result"])
    known = [f for f in base if f in taught and base[f]]
    cells = [c.strip() for c in rows["plain SFT"].strip("|").split("|")]
    if known:
        kept = statistics.fmean(statistics.fmean(right(u["result"])[f] for f in known) for u in plain_units)
        assert cells[3] == f"{100 * kept:.1f}"
    else:  # a tiny base may answer no taught fact right: then nothing is claimed about keeping them
        assert cells[3] == cells[4] == "n/a" and "(% of 0)" in text


def test_guard_grids_are_checked_before_anything_runs(tmp_path):
    from sftlens.study.engine.config import load_study_config

    for table, message in [("l2 = { values = [0.1] }", "guards.replay.values: 3 values, but guards.l2.values has 1"),
                           ("forget = { values = [1, 2, 3] }", "guard 'forget' is unknown"),
                           ("mofo = { values = [0, 0.5, 1] }", "outside (0, 1]"),
                           ("replay = { values = [0.1, 0.2, 0.3] }", "use a multiple of 1/8")]:
        path = tmp_path / "bad.toml"
        path.write_text(f'extends = "guards"\n[study]\nlora_learning_rates = []\n[guards]\n{table}\n')
        with pytest.raises(SftlensError, match=re.escape(message)):
            load_study_config(str(path))


def test_the_guided_repair_in_a_study_weighs_dev_facts_only_and_is_an_arm_of_prevention_and_cure(
        tiny_model_dir, known_data_dir, tmp_path, monkeypatch):
    """The tiny base answers no dev fact right, so nothing is forgotten (the first test: every guided unit is
    skipped, in one line on the page). Here the weighing names two dev facts forgotten and two learned
    (their gold answers), so the importances, the guided repair's sweeps and its arm run for real; what the
    unit hands it must be the in-domain dev facts and nothing else."""
    import sftlens.study.engine.importance_stage as stage
    from sftlens.study.engine.commands import run_study
    from sftlens.study.engine.config import load_study_config
    from sftlens.study.report.page import write_report
    from sftlens.study.report.results import load_results
    from sftlens.weights.guided import Importances

    seen = []

    def weighed(rows, answers):
        seen.append([r["fact_id"] for r in rows])
        return {"forgotten": [(r["prompt"], r["answers"][0]) for r in rows[:2]],
                "learned": [(r["prompt"], r["answers"][0]) for r in rows[2:4]]}

    monkeypatch.setattr(stage, "weighed_facts", weighed)
    study_file = tmp_path / "guards.toml"
    study_file.write_text(TINY_GUARDS.format(model=tiny_model_dir, data=known_data_dir)
                          .replace("seeds = [0, 1]", "seeds = [0]"))
    study = tmp_path / "study"
    run_study(load_study_config(str(study_file)), study, progress=False)
    results = load_results(study)
    assert not [u["label"] for u in results.units if u["state"] != "done"] and not results.skipped()
    weighing = [u for u in results.units if u["kind"] == "importance"]
    assert len(weighing) == 1 and weighing[0]["result"] == {"dev": len(seen[0]), "forgotten": 2, "learned": 2}
    # the base's dev answers come from its one evaluation unit, not answered again per model
    base_eval = next(u for u in results.units if u["kind"] == "eval" and "model" not in u["spec"]["deps"])
    assert weighing[0]["spec"]["deps"]["base-eval"] == base_eval["key"]
    # the rows weighed: exactly the split's in-domain dev facts, no test or training fact
    split = next(u for u in results.units if u["kind"] == "split")
    dev_in = [json.loads(line)["fact_id"]
              for path in sorted((study / "units" / "split" / split["key"] / "data" / "dev").glob("in-*.jsonl"))
              for line in path.read_text().splitlines()]
    assert seen == [dev_in] and all("/dev/" in i for i in dev_in)
    importances = Importances.open(study / "units" / "importance" / weighing[0]["key"] / "importances.safetensors")
    assert importances.counts == {"forgotten": 2, "learned": 2}
    # the guided repair's units read it (its key is their dependency's) and its dev-chosen value is an arm
    guided = [u for u in results.units if u["kind"] in ("repair", "repaired") and "guided" in u["label"]]
    assert len(guided) == 2 and all(u["spec"]["deps"]["importances"] == weighing[0]["key"] for u in guided)
    repaired = next(u for u in guided if u["kind"] == "repaired")
    assert repaired["result"]["value"] in (5.0, 20.0)
    text = write_report(study)["markdown"].read_text()
    row = next(line for line in text.splitlines() if line.startswith("| repair guided "))
    assert f"| {repaired['result']['value']:g} |" in row
