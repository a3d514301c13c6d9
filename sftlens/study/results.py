"""A finished study's numbers, read from its database alone: tagged long-format records, means
and spreads over seeds, the dev-chosen restore ratio and paired bootstrap intervals.

Every evaluation record gets the study's tags: `train_level` (0-4, "mixed", or "base"), `size`
(int or "all"), `seed`, `split` (test, dev, train), `restore_ratio` (0 = not restored) and
`strategy` ("base", "sft", "restore", "random").
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass
from pathlib import Path

from sftlens.study.db import StudyDB


@dataclass
class StudyResults:
    config: dict
    source: str
    units: list[dict]  # the current plan's units with spec, state and result

    def done(self, kind: str) -> list[dict]:
        return [u for u in self.units if u["kind"] == kind and u["state"] == "done"]

    def by_key(self) -> dict[str, dict]:
        return {u["key"]: u for u in self.units}

    def model_tags(self, unit: dict) -> dict:
        """The training set, size and seed of the model a unit read (the base model: train_level "base")."""
        model_key = unit["spec"]["deps"].get("model")
        if model_key is None:
            return {"train_level": "base", "size": None, "seed": None}
        params = self.by_key()[model_key]["spec"]["params"]
        level = params["set"].removeprefix("level")
        size = params["size"]
        return {"train_level": "mixed" if level == "mixed" else int(level),
                "size": size if size == "all" else int(size), "seed": params["seed"]}

    def counts(self) -> list[dict]:
        probe = self.done("probe")
        return probe[0]["result"]["level_counts"] if probe else []


def load_results(study_dir: str | Path) -> StudyResults:
    with StudyDB(study_dir, create=False) as db:
        return StudyResults(db.meta("config", {}), db.meta("source", "?"), db.planned_units())


def eval_records(results: StudyResults) -> list[dict]:
    """Records of plain models (base and fine-tuned, not restored), every split they were evaluated on."""
    out = []
    for unit in results.done("eval"):
        tags = results.model_tags(unit)
        strategy = "base" if tags["train_level"] == "base" else "sft"
        out += [{**r, **tags, "restore_ratio": 0.0, "strategy": strategy} for r in unit["result"]["records"]]
    return out


def restore_records(results: StudyResults) -> list[dict]:
    """Records of the restoration sweeps (ratio 0 included) and of the random controls."""
    out = []
    for kind, strategy in (("restore", "restore"), ("control", "random")):
        for unit in results.done(kind):
            tags = results.model_tags(unit)
            out += [{**r, **tags, "strategy": strategy} for r in unit["result"]["records"]]
    return out


# A level with fewer facts than this is too noisy to average or to decide anything on: its cells are
# marked in the report, it is left out of Acc, and no verdict uses it.
MIN_N = 30


def acc_levels(records: list[dict], domain: str, min_n: int = MIN_N) -> list[int]:
    """The test levels Acc averages for one domain: those with at least `min_n` facts, or, when
    none has that many (a toy study), every level with a fact, which the report marks as small."""
    present = sorted({r["test_level"] for r in records if r["domain"] == domain and r["n"] > 0})
    large = [lv for lv in present if all(r["n"] >= min_n for r in records
                                         if r["domain"] == domain and r["test_level"] == lv)]
    return large or present


def acc(records: list[dict], domain: str, levels: list[int] | None = None) -> float | None:
    """The paper's Acc, the mean of per-level accuracies of one model, over `levels` (default
    `acc_levels`: the levels with enough facts; every model of a study shares its test sets, so
    they average the same levels)."""
    levels = acc_levels(records, domain) if levels is None else levels
    values = [r["accuracy"] for r in records if r["domain"] == domain and r["test_level"] in levels]
    return sum(values) / len(values) if values else None


def mean_spread(values: list[float]) -> tuple[float, float, int]:
    """Mean and sample standard deviation over seeds (0 with a single seed)."""
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan"), 0
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), spread, len(values)


def per_seed(records: list[dict], **match) -> dict:
    """Group records matching `match` by seed."""
    out: dict = {}
    for r in records:
        if all(r.get(k) == v for k, v in match.items()):
            out.setdefault(r["seed"], []).append(r)
    return out


def acc_over_seeds(records: list[dict], domain: str, **match) -> tuple[float, float, int]:
    return mean_spread([acc(rs, domain) for rs in per_seed(records, **match).values()])


def level_acc_over_seeds(records: list[dict], domain: str, test_level: int, **match) -> tuple[float, float, int]:
    groups = per_seed([r for r in records if r["domain"] == domain and r["test_level"] == test_level], **match)
    return mean_spread([rs[0]["accuracy"] for rs in groups.values()])


def chosen_ratio(sweep_results: list[dict], domain: str = "in") -> float:
    """The restore ratio (> 0) with the best mean dev Acc over the seeds of one (level, size); ties:
    the smaller. Ratio 0 is the un-restored baseline the gain is measured against, not a candidate."""
    by_ratio: dict[float, list[float]] = {}
    for result in sweep_results:
        for ratio in {r["restore_ratio"] for r in result["records"]} - {0.0}:
            dev = [r for r in result["records"] if r["split"] == "dev" and r["restore_ratio"] == ratio]
            value = acc(dev, domain)
            if value is not None:
                by_ratio.setdefault(ratio, []).append(value)
    if not by_ratio:
        return 0.0
    return max(sorted(by_ratio), key=lambda ratio: statistics.fmean(by_ratio[ratio]))


def bootstrap_gain(pairs: list[tuple[dict, dict]], samples: int, seed: int = 0) -> tuple[float, float, float]:
    """Mean over seeds of Acc(after) - Acc(before) on test, in-domain, with a paired bootstrap 95 %
    interval: facts are resampled within each test level (so Acc stays a mean of level accuracies),
    the same draw for every seed, since all seeds share the test set.

    Each pair is (before, after): {level: '0'/'1' correctness string in a fixed fact order}.
    """
    def gain(draw: dict[int, list[int]] | None) -> float:
        diffs = []
        for before, after in pairs:
            levels = []
            for level, bits in before.items():
                idx = draw[level] if draw else range(len(bits))
                n = len(idx)
                levels.append(sum(int(after[level][i]) - int(bits[i]) for i in idx) / n)
            diffs.append(statistics.fmean(levels))
        return statistics.fmean(diffs)

    point = gain(None)
    if samples <= 0 or not pairs:
        return point, float("nan"), float("nan")
    rng = random.Random(seed)
    sizes = {level: len(bits) for level, bits in pairs[0][0].items()}
    gains = sorted(gain({lv: [rng.randrange(n) for _ in range(n)] for lv, n in sizes.items()}) for _ in range(samples))
    return point, gains[int(0.025 * (samples - 1))], gains[int(round(0.975 * (samples - 1)))]
