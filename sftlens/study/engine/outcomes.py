"""What each unit kind's function returns, as `study.db` stores it and the report reads it: one frozen dataclass
per kind (`kinds.KINDS` names each kind's). Its fields are the result's keys, so the field names have one
owner: `of` refuses a key the declaration does not know, and a unit function and the report cannot drift
apart unnoticed. Correctness strings (`Bits`) are {domain: {level: "0110..."}} in split-file order.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

Bits = dict[str, dict[str, str]]


def skipped(result: dict | None) -> str | None:
    """Why a finished unit did none of its work (a guided repair with nothing to weigh), or None: such a unit
    holds no numbers for the report and none for a study's measured rates."""
    return (result or {}).get("skipped")


@dataclass(frozen=True)
class Outcome:
    @classmethod
    def of(cls, result: dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(result) - known)
        if unknown:
            raise ValueError(f"a {cls.__name__} has no field {unknown[0]!r} (its fields: {', '.join(sorted(known))})")
        return cls(**result)


@dataclass(frozen=True)
class InjectOutcome(Outcome):
    taught: int  # facts taught
    candidates: int
    templates: list
    statements: int
    steps: int
    train_loss: float


@dataclass(frozen=True)
class ProbeOutcome(Outcome):
    facts: int
    level_counts: list  # per split and domain: facts per mastery level
    level_counts_taught: dict | None = None  # on a taught base: the same per taught subset
    fact_set: dict | None = None  # a fact set's name, facts, topics, splits and domains, when the study reads one


@dataclass(frozen=True)
class SplitOutcome(Outcome):
    sets: dict  # set name -> its size and whether it fell short


@dataclass(frozen=True)
class TrainOutcome(Outcome):
    """Every kind that trains: train, tune, lora, tuned, guard, guarded."""

    train_set: str
    examples: int
    steps: int
    train_loss: float
    guard: dict | None = None  # a guarded run's guard record
    value: float | None = None  # guarded: the guard value its candidates chose
    learning_rate: float | None = None  # tuned: the rate its candidates chose
    linked: bool | None = None  # tuned: linked from the candidate at that rate


@dataclass(frozen=True)
class EvalOutcome(Outcome):
    """eval, tune-eval, lora-eval, guard-eval: records (per split, domain, level) and correctness strings."""

    records: list
    test_bits: Bits = field(default_factory=dict)
    train_bits: Bits = field(default_factory=dict)
    taught_records: list | None = None  # on a taught base: the records per taught subset


@dataclass(frozen=True)
class KLOutcome(Outcome):
    kl: dict  # the summary: mean, median, n, ...
    test_set: str


@dataclass(frozen=True)
class DeltasOutcome(Outcome):
    ratios: list
    shares: list  # under `metric`
    elements: int
    metric: str = "relative"
    shares_by_metric: dict | None = None  # metric -> shares (studies since the three metrics)
    zero_base: dict | None = None  # the zero-base diagnostic (idem)


@dataclass(frozen=True)
class RestoreOutcome(Outcome):
    records: list
    test_bits: dict  # ratio -> Bits
    train_bits: dict = field(default_factory=dict)  # ratio -> Bits (none in the report's taught-facts view)
    taught_records: list | None = None


@dataclass(frozen=True)
class ControlOutcome(Outcome):
    ratio: float
    records: list
    test_bits: Bits
    train_bits: Bits = field(default_factory=dict)


@dataclass(frozen=True)
class ImportanceOutcome(Outcome):
    dev: int
    forgotten: int
    learned: int
    skipped: str | None = None  # why there was nothing to weigh


@dataclass(frozen=True)
class RepairOutcome(Outcome):
    method: str
    records: list
    skipped: str | None = None


@dataclass(frozen=True)
class RepairedOutcome(Outcome):
    method: str
    value: float | None = None
    records: list = field(default_factory=list)
    test_bits: Bits = field(default_factory=dict)
    train_bits: Bits = field(default_factory=dict)
    skipped: str | None = None
