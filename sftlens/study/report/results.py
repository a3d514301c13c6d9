"""A finished study's numbers, read from its database alone: tagged long-format records, means
and spreads over seeds (`mean_spread`: the one statistic over seeds; `size_sort_key`: sizes in order), the
candidates and dev curves behind each dev choice.

Every evaluation record gets the study's tags: `train_level` (0-4, "mixed", or "base"), `size`
(int or "all"), `seed`, `split` (test, dev, train), `restore_ratio` (0 = not restored) and
`strategy` ("base", "sft", "restore", "random").

The report's side of the engine/report seam: it reads the engine's database and unit parameters, and
Acc and the dev choices (the rules the units applied) from `sftlens.study.engine.choice`; the engine
never reads this module.

Arms: `arm_view(results, "fixed" | "tuned")` keeps the units reading one arm's models (`train` /
`tuned`); `findings.arm_findings` tests the claims per arm and `verdict_changes` pairs each comparison
across the arms; with a tuned arm the paper's tables read the tuned view.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from sftlens.io import read_jsonl
from sftlens.split import eval_files
from sftlens.study.engine.choice import acc, chosen_rate
from sftlens.study.engine.db import StudyDB
from sftlens.study.engine.kinds import KINDS
from sftlens.study.engine.outcomes import Outcome, skipped
from sftlens.study.engine.params import TrainParams
from sftlens.study.engine.scheduler import DATA, unit_folder


def mean_spread(values: list[float | None]) -> tuple[float, float, int]:
    """The one statistic over seeds: mean, sample standard deviation (0 for one value) and count;
    missing values (None) are left out, none at all gives NaNs and 0."""
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan"), 0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def size_sort_key(size) -> tuple:
    """Training sizes ascending, then "all" (a level's every fact)."""
    return (1, 0) if size == "all" else (0, size)


@dataclass
class StudyResults:
    config: dict
    source: str
    units: list[dict]  # the current plan's units with spec, state and result
    sessions: list[dict] = field(default_factory=list)  # each `study run`: command, code, machine, wall time

    def done(self, kind: str) -> list[dict]:
        """The finished units of `kind` with something to report (not `skipped`: see `skipped`)."""
        return [u for u in self.units if u["kind"] == kind and u["state"] == "done" and not skipped(u["result"])]

    def skipped(self) -> dict[str, str]:
        """label -> why: finished units with nothing to report (a guided repair without a forgotten or a
        learned dev fact to weigh)."""
        return {u["label"]: reason for u in self.units if u["state"] == "done" and (reason := skipped(u["result"]))}

    def by_key(self) -> dict[str, dict]:
        return {u["key"]: u for u in self.units}

    @staticmethod
    def outcome(unit: dict) -> Outcome:
        """A finished unit's result as its kind declares it (`sftlens.study.engine.kinds`)."""
        return KINDS[unit["kind"]].result.of(unit["result"])

    def model_tags(self, unit: dict) -> dict:
        """The training set, size and seed of the model a unit read (the base model: train_level "base")."""
        model_key = unit["spec"]["deps"].get("model")
        if model_key is None:
            return {"train_level": "base", "size": None, "seed": None}
        return train_tags(self.by_key()[model_key]["spec"]["params"])

    def counts(self) -> list[dict]:
        probe = self.done("probe")
        return self.outcome(probe[0]).level_counts if probe else []


def train_tags(params: dict) -> dict:
    """The training set, size and seed of a model unit's parameters."""
    train = TrainParams.of(params)
    level = train.set.removeprefix("level")
    return {"train_level": "mixed" if level == "mixed" else int(level),
            "size": train.size if train.size == "all" else int(train.size), "seed": train.seed}


def load_results(study_dir: str | Path) -> StudyResults:
    with StudyDB(study_dir, create=False) as db:
        return StudyResults(db.meta("config", {}), db.meta("source", "?"), db.planned_units(), db.meta("sessions", []))


def train_levels(items: list[dict]) -> list:
    """The training levels present among records or models (`train_level`): 0-4 ascending, then mixed."""
    levels = sorted({r["train_level"] for r in items if isinstance(r["train_level"], int)})
    return levels + (["mixed"] if any(r["train_level"] == "mixed" for r in items) else [])


def level_name(level) -> str:
    return f"D_train-{level}" if isinstance(level, int) else str(level)


def level_n(records: list[dict], domain: str) -> dict[int, int]:
    """Facts per test level of one domain (every model of a study shares its test sets)."""
    return {r["test_level"]: r["n"] for r in records if r["domain"] == domain}


@dataclass(frozen=True)
class Seeded:
    """A finished unit's typed result and the seed of the model it read; a learning-rate candidate's also its
    rate (`value`), recipe and training seconds."""

    seed: int
    outcome: Outcome
    value: float | None = None
    recipe: dict | None = None
    seconds: float | None = None


def sweep_groups(results: StudyResults) -> dict[tuple, list[Seeded]]:
    """(train level, size) -> the restoration sweeps of its seeds, in seed order."""
    groups: dict[tuple, list[Seeded]] = {}
    for unit in results.done("restore"):
        tags = results.model_tags(unit)
        groups.setdefault((tags["train_level"], tags["size"]), []).append(Seeded(tags["seed"], results.outcome(unit)))
    return {k: sorted(v, key=lambda s: s.seed) for k, v in
            sorted(groups.items(), key=lambda kv: (size_sort_key(kv[0][1]), str(kv[0][0])))}


def controls_of(results: StudyResults) -> dict[tuple, dict[int, Outcome]]:
    """(train level, size) -> {seed: random-control outcome}."""
    controls: dict[tuple, dict[int, Outcome]] = {}
    for unit in results.done("control"):
        tags = results.model_tags(unit)
        controls.setdefault((tags["train_level"], tags["size"]), {})[tags["seed"]] = results.outcome(unit)
    return controls


def eval_records(results: StudyResults) -> list[dict]:
    """Records of plain models (base and fine-tuned, not restored), every split they were evaluated on."""
    out = []
    for unit in results.done("eval"):
        tags = results.model_tags(unit)
        strategy = "base" if tags["train_level"] == "base" else "sft"
        out += [{**r, **tags, "restore_ratio": 0.0, "strategy": strategy} for r in results.outcome(unit).records]
    return out


def restore_records(results: StudyResults) -> list[dict]:
    """Records of the restoration sweeps (ratio 0 included) and of the random controls."""
    out = []
    for kind, strategy in (("restore", "restore"), ("control", "random")):
        for unit in results.done(kind):
            tags = results.model_tags(unit)
            out += [{**r, **tags, "strategy": strategy} for r in results.outcome(unit).records]
    return out



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





def repair_groups(results: StudyResults) -> dict[tuple, list[Seeded]]:
    """(method, train level, size) -> the dev-chosen repairs of its seeds ("repaired" results), in seed order."""
    groups: dict[tuple, list[Seeded]] = {}
    for unit in results.done("repaired"):
        tags, outcome = results.model_tags(unit), results.outcome(unit)
        groups.setdefault((outcome.method, tags["train_level"], tags["size"]), []).append(Seeded(tags["seed"], outcome))
    return {k: sorted(v, key=lambda s: s.seed) for k, v in groups.items()}


def repair_dev_curves(results: StudyResults) -> dict[tuple, dict[float, list[float]]]:
    """(method, train level, size) -> {value: dev Acc of each seed}: what each method's choice saw."""
    curves: dict[tuple, dict[float, list[float]]] = {}
    for unit in results.done("repair"):
        tags = results.model_tags(unit)
        outcome = results.outcome(unit)
        curve = curves.setdefault((outcome.method, tags["train_level"], tags["size"]), {})
        records = outcome.records
        for value in sorted({r["repair_value"] for r in records}):
            score = acc([r for r in records if r["repair_value"] == value], "in")
            if score is not None:
                curve.setdefault(value, []).append(score)
    return curves


def rate_candidates(results: StudyResults, kind: str) -> dict[tuple, dict[float, list[Seeded]]]:
    """(train level, size) -> {learning rate: the scored candidates of its seeds (seed order)}; `kind`:
    the scoring units, `lora-eval` (LoRA SFT) or `tune-eval` ([train]'s recipe, in-domain dev only)."""
    groups: dict[tuple, dict[float, list[Seeded]]] = {}
    keys = results.by_key()
    for unit in results.done(kind):
        tags = results.model_tags(unit)
        recipe = TrainParams.of(keys[unit["spec"]["deps"]["model"]]["spec"]["params"]).train
        rate = recipe["learning_rate"]
        groups.setdefault((tags["train_level"], tags["size"]), {}).setdefault(rate, []).append(
            Seeded(tags["seed"], results.outcome(unit), rate, recipe, keys[unit["spec"]["deps"]["model"]]["seconds"]))
    return {k: {rate: sorted(models, key=lambda m: m.seed) for rate, models in v.items()} for k, v in groups.items()}




def records_by_rate(candidates: dict[float, list[Seeded]]) -> dict[float, list[list[dict]]]:
    """rate -> each seed's records: what the engine's rate choice (`choice.chosen_rate`) reads."""
    return {rate: [m.outcome.records for m in models] for rate, models in candidates.items()}


def chosen_models(candidates: dict[float, list[Seeded]]) -> list[Seeded]:
    """The candidates at the chosen rate (each seed's model)."""
    rate = chosen_rate(records_by_rate(candidates))
    return [] if rate is None else candidates[rate]


# The models of the grid come in up to two arms: [train]'s own learning rate ("train" units) and, with
# `learning_rates`, the dev-tuned rate ("tuned" units).
ARMS = {"train": "fixed", "tuned": "tuned"}


def arms(results: StudyResults) -> list[str]:
    """The arms this study's plan has, [train]'s fixed rate first."""
    kinds = {u["kind"] for u in results.units}
    return [arm for kind, arm in ARMS.items() if kind in kinds]


def arm_view(results: StudyResults, arm: str) -> StudyResults:
    """The study as seen by one arm: units reading a model of the other arm are left out (the
    candidates' scores are kept: they belong to the choice, not to an arm), so every table and claim
    built on it describes that arm's models only."""
    keys = results.by_key()

    def mine(unit: dict) -> bool:
        model = unit["spec"]["deps"].get("model")
        if model is None or unit["kind"] == "tune-eval":
            return True
        return ARMS.get(keys[model]["kind"], arm) == arm

    return dataclasses.replace(results, units=[u for u in results.units if mine(u)])


def tuned_rates(results: StudyResults) -> dict[tuple, dict]:
    """(train level, size) -> {seed: the learning rate its tuned model trained at}."""
    rates: dict[tuple, dict] = {}
    for unit in results.done("tuned"):
        tags = train_tags(unit["spec"]["params"])
        rates.setdefault((tags["train_level"], tags["size"]), {})[tags["seed"]] = results.outcome(unit).learning_rate
    return rates


def taught_records(results: StudyResults, taught: bool) -> list[dict]:
    """`eval_records` over the facts a taught base (`[inject]`) was taught (True) or not (False);
    empty for a study on an untaught base."""
    out = []
    for unit in results.done("eval"):
        tags = results.model_tags(unit)
        strategy = "base" if tags["train_level"] == "base" else "sft"
        out += [{**r, **tags, "restore_ratio": 0.0, "strategy": strategy}
                for r in results.outcome(unit).taught_records or [] if r["taught"] == taught]
    return out


def taught_restore_records(results: StudyResults, taught: bool) -> list[dict]:
    """The restoration sweeps' records (`restore_records`, strategy "restore") over the taught facts
    (True) or the others (False) of a taught base; empty for a study on an untaught base."""
    out = []
    for unit in results.done("restore"):
        tags = results.model_tags(unit)
        out += [{**r, **tags, "strategy": "restore"}
                for r in results.outcome(unit).taught_records or [] if r["taught"] == taught]
    return out


def test_order(results: StudyResults, study_dir: Path) -> dict[tuple[str, str], list[str]]:
    """(domain, level) -> the test fact ids in split-file order: the order of every unit's `test_bits`."""
    split = results.done("split")[0]
    order = {}
    for path in eval_files(unit_folder(study_dir, split["kind"], split["key"]) / DATA, "test"):
        domain, level = path.stem.split("-level")
        order[domain, level] = [row["fact_id"] for row in read_jsonl(path)]
    return order


def test_correct(bits: dict, order: dict[tuple[str, str], list[str]]) -> dict[str, bool]:
    """fact id -> right, from a unit's {domain: {level: "0110..."}} (facts in split-file order)."""
    return {fact: flag == "1" for domain, levels in bits.items() for level, string in levels.items()
            for fact, flag in zip(order[domain, level], string)}

