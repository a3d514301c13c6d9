"""Findings: the verdict rule and each claim on constructed study databases (no model runs)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from sftlens.evaluate import acc_levels
from sftlens.reporting.bootstrap import FactDraws, SeedDraws, arm_difference, verdict
from sftlens.study.engine.choice import acc
from sftlens.study.report.findings import Claims, findings, reference_size
from sftlens.study.report.results import StudyResults


def bits(p: float, n: int, rng: random.Random) -> str:
    """n facts, each correct with probability p (exactly round(p * n) correct, shuffled)."""
    ones = round(p * n)
    out = ["1"] * ones + ["0"] * (n - ones)
    rng.shuffle(out)
    return "".join(out)


class StudyBuilder:
    """A study database in memory: train, eval, kl, deltas, restore and control units with results."""

    def __init__(self, level_n: dict[int, int] | None = None, seed: int = 0):
        self.level_n = level_n or {0: 100, 1: 80}
        self.rng = random.Random(seed)
        self.units: list[dict] = []

    def unit(self, kind: str, params: dict, deps: dict, result: dict) -> str:
        key = f"{kind}{len(self.units)}"
        self.units.append({"key": key, "kind": kind, "label": key, "state": "done", "result": result,
                           "spec": {"params": params, "deps": deps}})
        return key

    def eval_result(self, accuracy: dict[int, float]) -> dict:
        test_bits = {"in": {str(lv): bits(accuracy[lv], n, self.rng) for lv, n in self.level_n.items()}}
        records = [{"split": "test", "domain": "in", "test_level": lv, "n": n,
                    "correct": test_bits["in"][str(lv)].count("1"), "accuracy": test_bits["in"][str(lv)].count("1") / n}
                   for lv, n in self.level_n.items()]
        return {"records": records, "test_bits": test_bits}

    def model(self, level, size: int, seed: int, accuracy: dict[int, float], examples: int | None = None,
              kl: float | None = None, kind: str = "train") -> str:
        train = self.unit(kind, {"set": f"level{level}" if level != "mixed" else "mixed", "size": str(size),
                                    "seed": seed, "train": {}}, {},
                          {"train_set": f"train/level{level}-n{size}-seed{seed}.jsonl", "examples": examples or size,
                           "steps": (examples or size) // 8, "train_loss": 1.0})
        self.unit("eval", {}, {"model": train}, self.eval_result(accuracy))
        if kl is not None:
            self.unit("kl", {}, {"model": train}, {"kl": {"mean": kl, "n": 80}, "test_set": "in-level1"})
        return train

    def results(self, **study) -> StudyResults:
        return StudyResults({"study": {"kl_test_set": "in-level1", **study}}, "constructed", self.units)


def grid(builder: StudyBuilder, acc_by_size: dict[int, float], level=0, seeds=(0, 1, 2), kind="train") -> None:
    for size, p in acc_by_size.items():
        for seed in seeds:
            builder.model(level, size, seed, {lv: p for lv in builder.level_n}, kind=kind)


def c1(results: StudyResults):
    return [f for f in findings(results, samples=400) if f.claim == "C1"]


def test_verdict_rule():
    assert verdict(0.01, 0.05, +1) == "holds"
    assert verdict(-0.05, -0.01, +1) == "reversed"
    assert verdict(-0.01, 0.05, +1) == "inconclusive"
    assert verdict(-0.05, -0.01, -1) == "holds"
    assert verdict(0.2, 0.3, +1, threshold=0.1) == "holds"
    assert verdict(0.05, 0.3, +1, threshold=0.1) == "inconclusive"


def test_more_data_hurting_clearly_holds():
    builder = StudyBuilder()
    grid(builder, {60: 0.6, 240: 0.2})
    (finding,) = c1(builder.results())
    assert finding.verdict == "holds"
    assert finding.effect.value == pytest.approx(-0.4, abs=0.02)
    assert finding.effect.high < 0
    assert "level 0: 100" in finding.n and "level 1: 80" in finding.n and "seeds 3 vs 3" in finding.n


def test_more_data_helping_is_reversed():
    builder = StudyBuilder()
    grid(builder, {60: 0.2, 240: 0.6})
    (finding,) = c1(builder.results())
    assert finding.verdict == "reversed" and finding.effect.low > 0


def test_no_difference_is_inconclusive():
    builder = StudyBuilder()
    grid(builder, {60: 0.4, 240: 0.4})
    (finding,) = c1(builder.results())
    assert finding.verdict == "inconclusive"
    assert finding.effect.low < 0 < finding.effect.high


def test_a_study_without_a_level_of_30_facts_is_not_tested():
    builder = StudyBuilder(level_n={0: 20, 1: 8})
    grid(builder, {60: 0.9, 240: 0.0})
    for claim in ("C1", "C2", "C3"):
        (finding,) = [f for f in findings(builder.results(), samples=50) if f.claim == claim]
        assert finding.verdict.startswith("not tested") and finding.effect is None


def test_a_small_level_never_feeds_a_verdict():
    # level 1 has 10 facts and a huge drop; level 0 (100 facts) does not move: inconclusive, not holds
    builder = StudyBuilder(level_n={0: 100, 1: 10})
    for size, p1 in ((60, 1.0), (240, 0.0)):
        for seed in (0, 1, 2):
            builder.model(0, size, seed, {0: 0.5, 1: p1})
    (finding,) = c1(builder.results())
    assert finding.verdict == "inconclusive"
    assert "level 1" not in finding.n
    records = builder.units[1]["result"]["records"]
    assert acc_levels(records, "in") == [0]
    assert acc(records, "in") == pytest.approx(0.5)


def test_only_one_size_is_not_tested():
    builder = StudyBuilder()
    grid(builder, {240: 0.5})
    (finding,) = c1(builder.results())
    assert finding.verdict == "not tested: one training size only"


def test_reference_size_is_240_or_the_nearest_below_the_largest():
    assert reference_size([60, 240, 960], 960) == 240
    assert reference_size([15, 60, 240], 240) == 60
    assert reference_size([240], 240) is None


@pytest.mark.parametrize("kind", ["train", "tuned"])  # either arm's models: [train]'s rate, the dev-tuned one
def test_training_level_skips_short_sets_and_finds_a_real_gap(kind):
    builder = StudyBuilder()
    grid(builder, {60: 0.2, 240: 0.2}, level=0, kind=kind)
    grid(builder, {60: 0.6}, level=1, kind=kind)
    for seed in (0, 1, 2):  # level 1 has only 100 facts: its 240 set is short
        builder.model(1, 240, seed, {0: 0.9, 1: 0.9}, examples=100, kind=kind)
    c2 = {f.comparison.split(":")[0]: f for f in findings(builder.results(), samples=400) if f.claim == "C2"}
    assert c2["n=60"].verdict == "holds" and "D_train-1" in c2["n=60"].comparison
    assert c2["n=240"].verdict.startswith("not tested") and "short" in c2["n=240"].verdict


def test_kl_correlation_with_accuracy_holds_when_kl_goes_with_harm():
    builder = StudyBuilder()
    for i, (size, p) in enumerate([(60, 0.7), (60, 0.65), (60, 0.6), (240, 0.3), (240, 0.25), (240, 0.2)]):
        builder.model(0, size, i % 3, {0: 0.5, 1: p}, kl=0.1 + (1 - p))
    c4 = [f for f in findings(builder.results(), samples=400) if f.claim == "C4"]
    size_gap, correlation = c4
    assert size_gap.verdict == "holds" and size_gap.effect.value == pytest.approx(0.4, abs=1e-6)
    assert correlation.verdict == "holds" and correlation.effect.value < -0.9


def test_restoration_gain_against_the_unrestored_model_and_the_random_control():
    builder = StudyBuilder()
    rng = builder.rng
    for seed in (0, 1, 2):
        train = builder.model(0, 240, seed, {0: 0.3, 1: 0.3})
        ev = builder.units[-1]["result"]
        dev = [{"split": "dev", "domain": "in", "test_level": 0, "n": 50, "correct": c, "accuracy": c / 50,
                "restore_ratio": r} for r, c in ((0.0, 10), (1.0, 30), (5.0, 20))]
        train_bits = {k: {"in": {"0": bits(p, 240, rng)}} for k, p in (("0", 0.5), ("1", 0.8), ("5", 0.6))}
        test_bits = {"0": ev["test_bits"], "1": {"in": {lv: bits(0.7, n, rng) for lv, n in (("0", 100), ("1", 80))}},
                     "5": ev["test_bits"]}
        records = dev + [{**r, "restore_ratio": 0.0} for r in ev["records"]] + [
            {"split": "train", "domain": "in", "test_level": 0, "n": 240, "correct": 0, "accuracy": 0.0, "restore_ratio": 0.0}]
        builder.unit("restore", {}, {"model": train}, {"records": records, "test_bits": test_bits, "train_bits": train_bits})
        builder.unit("control", {}, {"model": train}, {"ratio": 1.0, "records": [], "test_bits": ev["test_bits"],
                                                       "train_bits": {"in": {"0": bits(0.5, 240, rng)}}})
    c6 = [f for f in findings(builder.results(), samples=400) if f.claim == "C6"]
    assert [f.comparison.rsplit(": ", 1)[1] for f in c6] == ["restored - fine-tuned", "restored - random control"] * 2
    assert all("restore 1 % (dev-chosen)" in f.comparison for f in c6)
    assert all(f.verdict == "holds" for f in c6), [(f.comparison, f.verdict) for f in c6]
    assert c6[0].effect.value == pytest.approx(0.4)  # 0.7 - 0.3 on both test levels
    assert c6[2].effect.value == pytest.approx(0.3, abs=0.01)  # train: 0.8 - 0.5


def test_concentration_uses_the_threshold_and_names_the_zero_base_artefact():
    builder = StudyBuilder()
    for seed in (0, 1):
        train = builder.model(0, 240, seed, {0: 0.3, 1: 0.3})
        builder.unit("deltas", {}, {"model": train}, {
            "ratios": [1.0, 5.0], "shares": [0.999, 0.9995], "elements": 1000, "metric": "relative",
            "shares_by_metric": {"relative": [0.999, 0.9995], "absolute": [0.017 + seed * 0.001, 0.08]},
            "zero_base": {"zero_base_share_of_relative_change": 0.998, "zero_base_share_of_elements": 0.0003,
                          "elements": 1000, "zero_base_elements": 3}})
    relative, absolute = [f for f in findings(builder.results(), samples=200) if f.claim == "C5"]
    assert relative.verdict == "holds" and "exactly 0" in relative.comparison
    assert absolute.verdict == "reversed" and absolute.effect.value == pytest.approx(0.0175)


def test_paired_bootstrap_of_identical_arms_is_exactly_zero():
    rng = random.Random(1)
    models = [{"bits": {"in": {"0": bits(0.4, 50, rng)}}} for _ in range(3)]
    gap = arm_difference(FactDraws(200, 0), SeedDraws(200, 1), models, models, "in", [0], paired_seeds=True)
    assert (gap.value, gap.low, gap.high) == (0.0, 0.0, 0.0)


def test_fact_draws_are_shared_by_models_of_one_scope():
    draws = FactDraws(10, 0)
    a = draws.draws(("test", "in", 0), 50)
    assert draws.draws(("test", "in", 0), 50) is a
    assert not np.array_equal(draws.draws(("train-1", "in", 0), 50), a)


def test_claims_of_an_empty_study_are_all_not_tested():
    found = Claims(StudyResults({"study": {}}, "empty", [])).all()
    assert {f.claim for f in found} == {"C1", "C2", "C3", "C4", "C5", "C6"}
    assert all(f.verdict.startswith("not tested") for f in found)


def test_kl_over_too_few_facts_is_not_tested():
    builder = StudyBuilder()
    for size, kl in ((60, 0.1), (240, 0.9)):
        for seed in (0, 1, 2):
            train = builder.model(0, size, seed, {0: 0.5, 1: 0.5})
            builder.unit("kl", {}, {"model": train}, {"kl": {"mean": kl, "n": 12}, "test_set": "in-level1"})
    (finding,) = [f for f in findings(builder.results(), samples=100) if f.claim == "C4"]
    assert finding.verdict == "not tested: the KL's test set has 12 facts (< 30)"


def test_dropping_one_comparison_never_moves_another_interval():
    builder = StudyBuilder()
    grid(builder, {60: 0.6, 240: 0.4}, level=1)
    both = builder.results()
    grid(builder, {60: 0.3, 240: 0.5}, level=0)  # a C1 comparison tested before level 1's, and C2 ones
    more = builder.results()
    first = {f.comparison: f.effect for f in findings(both, samples=300) if f.claim == "C1"}
    again = {f.comparison: f.effect for f in findings(more, samples=300) if f.claim == "C1"}
    assert len(again) == 2 and all(again[c] == effect for c, effect in first.items())
