"""Typed parameters of each unit kind: `units.py` builds them, `stages.py` reads them.

A record's `to_params()` is the dict that enters the unit's key (field name -> value; a field listed in
`OMIT_IF_NONE` is left out while unset, so adding an optional setting does not re-key older studies);
`of(params)` reads the record back from what a unit function receives (its params plus the runtime
values of `Runtime`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar


@dataclass(frozen=True, kw_only=True)
class UnitParams:
    OMIT_IF_NONE: ClassVar[tuple[str, ...]] = ()

    def to_params(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if not (f.name in self.OMIT_IF_NONE and getattr(self, f.name) is None)}

    @classmethod
    def of(cls, params: dict):
        return cls(**{f.name: params[f.name] for f in fields(cls) if f.name in params})


@dataclass(frozen=True, kw_only=True)
class Runtime(UnitParams):
    """Where things are: passed to every unit, never part of a key."""

    OMIT_IF_NONE: ClassVar[tuple[str, ...]] = ("facts", "in_domain")
    model: str
    data_dir: str
    device: str  # auto, cpu or cuda
    eval_batch_size: int  # prompts decoded together (no prediction depends on it)
    facts: str | None = None  # a fact set in place of the EntityQuestions folder (`sftlens.data.factset`)
    in_domain: str | None = None  # its in-domain topics (keyed through FactSelection.data)

    @property
    def device_or_none(self) -> str | None:
        return None if self.device == "auto" else self.device


@dataclass(frozen=True, kw_only=True)
class FactSelection(UnitParams):
    """Which EntityQuestions facts a study probes (and so splits and scores)."""

    OMIT_IF_NONE: ClassVar[tuple[str, ...]] = ("dev_facts_per_relation",)
    data: str  # fingerprint of the data files' bytes
    relations: dict[str, list[str]]  # split -> relations
    train_facts_per_relation: int | None
    eval_facts_per_relation: int | None
    dev_facts_per_relation: int | None = None

    def limit(self, split: str) -> int | None:
        """At most this many facts per relation of `split` (None: all)."""
        if split == "train":
            return self.train_facts_per_relation
        if split == "dev" and self.dev_facts_per_relation is not None:
            return self.dev_facts_per_relation
        return self.eval_facts_per_relation


@dataclass(frozen=True, kw_only=True)
class ProbeParams(FactSelection):
    model_fingerprint: str
    probe: dict  # ProbeConfig


@dataclass(frozen=True, kw_only=True)
class SplitParams(FactSelection):
    grid: dict  # SplitConfig: the study's levels, sizes, include_all, seeds, mixed (, eval_facts_per_level)


@dataclass(frozen=True, kw_only=True)
class TrainParams(UnitParams):
    set: str  # level{L} or mixed
    size: str  # a number or all
    seed: int
    train: dict  # TrainConfig


@dataclass(frozen=True, kw_only=True)
class EvalParams(UnitParams):
    eval: dict  # EvalConfig
    splits: list[str]


@dataclass(frozen=True, kw_only=True)
class KLParams(FactSelection):
    kl: dict  # KLConfig
    test_set: str  # {in,out}-level{L}, or in / out


@dataclass(frozen=True, kw_only=True)
class DeltasParams(UnitParams):
    deltas: dict  # DeltasConfig
    ratios: list[float]


@dataclass(frozen=True, kw_only=True)
class RestoreParams(UnitParams):
    restore: dict  # RestoreConfig
    ratios: list[float]
    eval: dict  # EvalConfig
    dev: str  # the dev domain the ratio is chosen on


@dataclass(frozen=True, kw_only=True)
class ControlParams(UnitParams):
    restore: dict  # RestoreConfig (its strategy becomes random)
    eval: dict
    seed: int
    ratio_choice: str  # how the ratio is chosen, in words (part of the key)


@dataclass(frozen=True, kw_only=True)
class RepairParams(UnitParams):
    repair: dict  # the method and the RepairConfig settings it reads
    values: list[float]
    eval: dict  # EvalConfig
    dev: str  # the dev domain the value is chosen on


@dataclass(frozen=True, kw_only=True)
class ImportanceParams(UnitParams):
    eval: dict  # EvalConfig: how both models answer the dev facts
    dev: str  # the dev domain whose forgotten and learned facts are weighed


@dataclass(frozen=True, kw_only=True)
class RepairedParams(UnitParams):
    repair: dict
    eval: dict
    value_choice: str  # how the value is chosen, in words (part of the key)


@dataclass(frozen=True, kw_only=True)
class InjectParams(FactSelection):
    """The study's facts taught to its base model (`[inject]`), before anything else reads it."""

    model_fingerprint: str
    inject: dict  # InjectConfig


@dataclass(frozen=True, kw_only=True)
class TunedParams(TrainParams):
    """[train]'s recipe (`train`, at its own rate) retrained at the learning rate its dev candidates chose."""

    rate_choice: str  # how the rate is chosen, in words (part of the key)
    dev: dict[str, float]  # role of a candidate's in-domain dev scores -> its learning rate (every seed)
    models: dict[str, float]  # role of a model of this very set, size and seed -> its rate (linked when chosen)


@dataclass(frozen=True, kw_only=True)
class GuardParams(FactSelection):
    """[train]'s recipe with one guard at one value (in `train`: `TrainConfig.guard`) on an analysed training
    set; the fact selection tells a replaying run which facts to read."""

    set: str
    size: str
    seed: int
    train: dict  # TrainConfig


@dataclass(frozen=True, kw_only=True)
class GuardedParams(GuardParams):
    """[train]'s recipe (`train`, no guard) with `guard` at the value its candidates chose on in-domain dev."""

    guard: str  # the guard's name
    value_choice: str  # how the value is chosen, in words (part of the key)
    dev: dict[str, float]  # role of a candidate's scores -> its value

