"""One declaration per unit kind: the function that runs it, the parameters that key it, what its work
counts, and the plan's cost of it (seconds per work item and per unit, measured on this project's machine:
`sftlens.reporting.costs`). The graph (`units`, `guard_units`) adds a unit by its kind alone, the plan
(`commands`) prices it from here; a new kind is one entry here and its function.

A function's module is part of every unit key (`scheduler.keyed_fn`): moving a unit function re-keys
its units, so each entry names the module it has always lived in.
"""

from __future__ import annotations

from dataclasses import dataclass

from sftlens.reporting.costs import DEFAULT_RATES, FIXED_SECONDS
from sftlens.study.engine.params import (
    ControlParams,
    DeltasParams,
    EvalParams,
    GuardedParams,
    GuardParams,
    ImportanceParams,
    InjectParams,
    KLParams,
    ProbeParams,
    RepairedParams,
    RepairParams,
    RestoreParams,
    SplitParams,
    TrainParams,
    TunedParams,
    UnitParams,
)
from sftlens.study.engine.scheduler import STAGES

GUARD_STAGES = "sftlens.study.engine.guard_stages"
IMPORTANCE_STAGE = "sftlens.study.engine.importance_stage"


@dataclass(frozen=True)
class UnitKind:
    fn: str  # module:function, called as fn(params, out, deps) -> result
    params: type[UnitParams]  # what enters its key, with its dependencies' keys
    work: str  # what a unit's `work` counts

    def seconds(self, kind: str, work: float, rates: dict[str, float]) -> float:
        """Estimated seconds of a unit of this kind: its fixed part and `work` at `rates` (a study's own
        measured rate per work item where it has one, else the default)."""
        return FIXED_SECONDS.get(kind, 0) + work * rates.get(kind, DEFAULT_RATES.get(kind, 0.0))


def _stage(name: str, module: str = STAGES) -> str:
    return f"{module}:{name}"


KINDS: dict[str, UnitKind] = {
    "inject": UnitKind(_stage("inject_unit"), InjectParams, "statements"),
    "probe": UnitKind(_stage("probe_unit"), ProbeParams, "samples"),
    "split": UnitKind(_stage("split_unit"), SplitParams, "-"),
    "train": UnitKind(_stage("train_unit"), TrainParams, "examples"),
    "eval": UnitKind(_stage("eval_unit"), EvalParams, "generations"),
    "kl": UnitKind(_stage("kl_unit"), KLParams, "prompts"),
    "deltas": UnitKind(_stage("deltas_unit"), DeltasParams, "models"),
    "restore": UnitKind(_stage("restore_unit"), RestoreParams, "generations"),
    "control": UnitKind(_stage("control_unit"), ControlParams, "generations"),
    "importance": UnitKind(_stage("importance_unit", IMPORTANCE_STAGE), ImportanceParams, "generations"),
    "repair": UnitKind(_stage("repair_unit"), RepairParams, "generations"),
    "repaired": UnitKind(_stage("repaired_unit"), RepairedParams, "generations"),
    # the tuned arm: [train]'s recipe at candidate rates, scored on in-domain dev, then at the chosen rate
    "tune": UnitKind(_stage("train_unit"), TrainParams, "examples"),
    "tune-eval": UnitKind(_stage("eval_unit"), EvalParams, "generations"),
    "tuned": UnitKind(_stage("tuned_unit"), TunedParams, "examples"),
    # LoRA SFT at candidate rates, each scored on test, in-domain dev and its training set
    "lora": UnitKind(_stage("train_unit"), TrainParams, "examples"),
    "lora-eval": UnitKind(_stage("scored_unit"), EvalParams, "generations"),
    # the guards' arm
    "guard": UnitKind(_stage("guard_unit", GUARD_STAGES), GuardParams, "examples"),
    "guarded": UnitKind(_stage("guarded_unit", GUARD_STAGES), GuardedParams, "examples"),
    "guard-eval": UnitKind(_stage("scored_unit"), EvalParams, "generations"),
}
