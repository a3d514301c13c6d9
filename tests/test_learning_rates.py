"""The tuned arm (`[study] learning_rates`): [train]'s learning rate chosen on in-domain dev, the
analyses on the tuned models, [train]'s own rate kept as an arm, and the report naming both."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sftlens.errors import SftlensError
from sftlens.study.engine.choice import chosen_rate
from sftlens.study.engine.commands import plan, run_study
from sftlens.study.engine.config import load_study_config
from sftlens.study.report.results import load_results, train_tags

from assets import TINY_STUDY, write_config

# the tiny study with a tuned arm: two sizes, so the rate chosen at the largest (8) also trains size 4;
# [train]'s own rate (1e-3) is one of the candidates
TUNED_STUDY = TINY_STUDY.replace("\nsizes = [8]", "\nsizes = [4, 8]").replace(
    "lora_learning_rates = [1e-3, 1e-2]", "lora_learning_rates = [1e-3, 1e-2]\nlearning_rates = [1e-3, 3e-2]")


def dev_record(level: int, correct: int, n: int = 30) -> dict:
    return {"domain": "in", "split": "dev", "test_level": level, "n": n, "correct": correct, "accuracy": correct / n}


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from([1e-5, 1e-4, 3e-4, 1e-3]),
                       st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30)), min_size=1, max_size=3),
                       min_size=1))
def test_the_rate_choice_is_the_argmax_of_the_mean_dev_acc_ties_the_smaller(scores):
    candidates = {rate: [[dev_record(0, a), dev_record(1, b)] for a, b in seeds]  # each seed's records
                  for rate, seeds in scores.items()}
    mean = {rate: statistics.fmean((a / 30 + b / 30) / 2 for a, b in seeds) for rate, seeds in scores.items()}
    best = max(mean.values())
    assert chosen_rate(candidates) == min(rate for rate, m in mean.items() if m == best)


def test_no_dev_scores_choose_no_rate():
    assert chosen_rate({1e-4: [[]]}) is None


@pytest.mark.parametrize("text, message", [
    ("learning_rates = [1e-3]\n", "study.learning_rates: 1 values, but study.lora_learning_rates has 2: every arm"),
    ("learning_rates = [1e-3, 1e-2, 3e-2]\nlora_learning_rates = []\n",
     "study.learning_rates: 3 values, but repairs.wise.values has 2: every arm"),
    ("learning_rates = [1e-3, 1e-3]\n", "learning_rates must be distinct, got [0.001, 0.001]"),
    ('rate_choice = "smallest"\n', "study.rate_choice"),
])
def test_the_budget_rule_refuses_a_grid_of_another_length_in_one_line(tmp_path, text, message):
    study = TINY_STUDY.replace("lora_learning_rates = [1e-3, 1e-2]\n", "lora_learning_rates = [1e-3, 1e-2]\n" + text)
    if "lora_learning_rates = []" in text:
        study = study.replace("lora_learning_rates = [1e-3, 1e-2]\n", "", 1)
    path = write_config(tmp_path / "s.toml", study.format(model="m", data=tmp_path))
    with pytest.raises(SftlensError) as err:
        load_study_config(str(path))
    assert message in str(err.value) and "\n" not in str(err.value)


def _tiny_files(root: Path) -> tuple[Path, Path]:
    from tiny import save_model, tiny_model, write_tiny_data

    model, tokenizer = tiny_model(seed=0)
    return save_model(model, tokenizer, root / "model"), write_tiny_data(root / "eq")


@pytest.fixture(scope="module")
def tuned_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("tuned-study")
    model_dir, data_dir = _tiny_files(root)
    config_file = write_config(root / "study.toml", TUNED_STUDY.format(model=model_dir, data=data_dir))
    run_study(load_study_config(str(config_file)), root / "study", progress=False)
    return config_file, root / "study"


def test_the_plan_shows_the_tuned_arms_units(tuned_study, tmp_path):
    config_file, _ = tuned_study
    text = plan(load_study_config(str(config_file)), tmp_path / "fresh")
    # 2 sets (level 0, mixed) x 2 seeds at size 8 (the largest) x 2 rates, one of them [train]'s own (its
    # model is the train unit); then a tuned model per set, size and seed, as many as [train]'s own
    assert "| tune | 4 | 4 |" in text and "| tune-eval | 8 | 8 |" in text
    assert "| tuned | 8 | 8 |" in text and "| train | 8 | 8 |" in text


def test_the_tuned_models_train_at_the_rate_a_brute_force_argmax_over_dev_records_picks(tuned_study):
    _, study = tuned_study
    results = load_results(study)
    keys = results.by_key()
    assert {u["state"] for u in results.units} == {"done"}
    dev: dict[str, dict[float, list[float]]] = {}
    for unit in results.done("tune-eval"):
        model = keys[unit["spec"]["deps"]["model"]]
        assert train_tags(model["spec"]["params"])["size"] == 8, "candidates only at the largest size"
        records = [r for r in unit["result"]["records"] if r["split"] == "dev"]
        assert records and {r["domain"] for r in records} == {"in"}
        levels = [r for r in records if r["n"] >= 30] or records
        rate = model["spec"]["params"]["train"]["learning_rate"]
        dev.setdefault(model["spec"]["params"]["set"], {}).setdefault(rate, []).append(
            sum(r["accuracy"] for r in levels) / len(levels))
    tuned = results.done("tuned")
    assert len(tuned) == 8
    for train_set in ("level0", "mixed"):
        scores = dev[train_set]
        assert sorted(scores) == [1e-3, 3e-2] and all(len(s) == 2 for s in scores.values())
        best = max(statistics.fmean(s) for s in scores.values())
        expected = min(rate for rate, s in scores.items() if statistics.fmean(s) == best)
        mine = [u for u in tuned if u["spec"]["params"]["set"] == train_set]
        assert len(mine) == 4 and {u["result"]["learning_rate"] for u in mine} == {expected}
        for unit in mine:
            size = train_tags(unit["spec"]["params"])["size"]
            # a candidate of the same set, size and seed is the same run: linked, not retrained
            assert unit["result"]["linked"] == (size == 8 or expected == 1e-3)


def test_the_analyses_read_the_tuned_models_and_the_fixed_rate_stays_an_arm(tuned_study):
    _, study = tuned_study
    results = load_results(study)
    keys = results.by_key()
    for unit in results.units:
        model = unit["spec"]["deps"].get("model")
        if unit["kind"] in ("deltas", "restore", "control", "repair", "repaired"):
            assert keys[model]["kind"] == "tuned", unit["label"]
    for kind in ("train", "tune", "tuned"):
        assert not list(study.glob(f"units/{kind}/*/model")), "prune_checkpoints drops every arm's weights"
    evaluated = [keys[u["spec"]["deps"]["model"]]["kind"] for u in results.units
                 if u["kind"] in ("eval", "kl") and "model" in u["spec"]["deps"]]
    assert evaluated.count("train") == evaluated.count("tuned") == 8 * 2  # eval and KL of 8 models per arm


def test_the_report_names_the_tuned_and_untuned_arms_and_the_verdicts_that_change(tuned_study):
    from sftlens.study.report.page import write_report

    _, study = tuned_study
    results = load_results(study)
    rate, = {u["result"]["learning_rate"] for u in results.done("tuned") if u["spec"]["params"]["set"] == "level0"}
    markdown = write_report(study, page=study / "page.md")["markdown"].read_text()
    repairs = markdown[markdown.index("## Repair methods"):]
    assert f"| plain SFT | lr = {rate:g} (tuned on dev among 0.001 / 0.03) |" in repairs
    assert "| plain SFT at [train]'s rate | lr = 0.001 (fixed: [train]'s, not tuned) |" in repairs
    assert "| LoRA SFT (r=16, alpha=32) | lr = " in repairs and "(tuned on dev among 0.001 / 0.01) |" in repairs
    findings = markdown[markdown.index("## Findings"):markdown.index("## Table 1")]
    assert "*the evidence, tuned rate (among 0.001 / 0.03)*" in findings
    assert "*the evidence, [train]'s fixed rate 0.001 (not tuned)*" in findings
    assert "*verdicts that change with the tuned rate*" in findings
    changes = findings[findings.index("*verdicts that change"):]
    for claim in ("C1", "C2", "C3", "C4", "C5", "C6"):
        assert f"| {claim} |" in changes
    assert "the analyses read the tuned-rate models" in findings  # C5, C6 at the fixed rate
    page = (study / "page.md").read_text()
    assert "Verdicts at the tuned learning rate; against [train]'s fixed rate, " in page


def test_verdict_changes_pair_each_comparison_across_the_arms():
    from sftlens.reporting.bootstrap import Estimate
    from sftlens.study.report.findings import Finding, not_tested, verdict_changes

    def finding(claim: str, comparison: str, verdict: str) -> Finding:
        return Finding(claim, comparison, Estimate(0.1, 0.05, 0.15), "n", verdict)

    fixed = [finding("C1", "D_train-0", "reversed"), finding("C1", "D_train-1", "inconclusive"),
             finding("C2", "n=60", "holds"), not_tested("C6", "restoration gain", "analyses on the tuned models")]
    tuned = [finding("C1", "D_train-0", "holds"), finding("C1", "D_train-1", "inconclusive"),
             finding("C2", "n=60", "holds"), finding("C6", "restore 5 %, test", "holds"),
             finding("C6", "restore 5 %, train", "holds")]
    changes = [(a and a.comparison, b and b.comparison, change) for a, b, change in verdict_changes(fixed, tuned)]
    assert changes == [("D_train-0", "D_train-0", "changed"), ("D_train-1", "D_train-1", "same"),
                       ("n=60", "n=60", "same"), ("restoration gain", None, "not compared"),
                       (None, "restore 5 %, test", "not compared"), (None, "restore 5 %, train", "not compared")]


def test_a_linked_model_is_the_candidates_files_and_appears_whole(tmp_path):
    from sftlens.study.engine.stages import _link_folder

    source = tmp_path / "candidate" / "model"
    source.mkdir(parents=True)
    (source / "model.safetensors").write_bytes(b"weights")
    (source / "config.json").write_text("{}")
    target = tmp_path / "tuned" / "model"
    target.parent.mkdir()
    (target.parent / ".model.partial").mkdir()  # left by a killed unit
    _link_folder(source, target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert (target / "model.safetensors").stat().st_ino == (source / "model.safetensors").stat().st_ino
    assert not (target.parent / ".model.partial").exists()
