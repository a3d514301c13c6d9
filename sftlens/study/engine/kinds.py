"""One declaration per unit kind: the function that runs it, the parameters that key it, the typed result
it returns (`outcomes`: the report reads results through it) and what its work counts (the plan prices it by
kind with the rates measured on this project's machine: `sftlens.reporting.costs`). The graph
(`units`, `guard_units`) adds a unit by its kind alone, the plan (`commands`) names its work from here, the report
(`study.report.results.StudyResults.outcome`) reads its result as declared; a new kind is one entry here, its
function and its outcome.

A function's module is part of every unit key (`scheduler.keyed_fn`): moving a unit function re-keys
its units, so each entry names the module it has always lived in.
"""

from __future__ import annotations

from dataclasses import dataclass

from sftlens.study.engine.outcomes import (
    ControlOutcome,
    DeltasOutcome,
    EvalOutcome,
    ImportanceOutcome,
    InjectOutcome,
    KLOutcome,
    Outcome,
    ProbeOutcome,
    RepairedOutcome,
    RepairOutcome,
    RestoreOutcome,
    SplitOutcome,
    TrainOutcome,
)
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
    result: type[Outcome]  # what it returns
    work: str  # what a unit's `work` counts (its price per work item: `sftlens.reporting.costs`, by kind)


def _stage(name: str, module: str = STAGES) -> str:
    return f"{module}:{name}"


KINDS: dict[str, UnitKind] = {
    "inject": UnitKind(_stage("inject_unit"), InjectParams, InjectOutcome, "statements"),
    "probe": UnitKind(_stage("probe_unit"), ProbeParams, ProbeOutcome, "samples"),
    "split": UnitKind(_stage("split_unit"), SplitParams, SplitOutcome, "-"),
    "train": UnitKind(_stage("train_unit"), TrainParams, TrainOutcome, "examples"),
    "eval": UnitKind(_stage("eval_unit"), EvalParams, EvalOutcome, "generations"),
    "kl": UnitKind(_stage("kl_unit"), KLParams, KLOutcome, "prompts"),
    "deltas": UnitKind(_stage("deltas_unit"), DeltasParams, DeltasOutcome, "models"),
    "restore": UnitKind(_stage("restore_unit"), RestoreParams, RestoreOutcome, "generations"),
    "control": UnitKind(_stage("control_unit"), ControlParams, ControlOutcome, "generations"),
    "importance": UnitKind(_stage("importance_unit", IMPORTANCE_STAGE), ImportanceParams, ImportanceOutcome, "generations"),
    "repair": UnitKind(_stage("repair_unit"), RepairParams, RepairOutcome, "generations"),
    "repaired": UnitKind(_stage("repaired_unit"), RepairedParams, RepairedOutcome, "generations"),
    # the tuned arm: [train]'s recipe at candidate rates, scored on in-domain dev, then at the chosen rate
    "tune": UnitKind(_stage("train_unit"), TrainParams, TrainOutcome, "examples"),
    "tune-eval": UnitKind(_stage("eval_unit"), EvalParams, EvalOutcome, "generations"),
    "tuned": UnitKind(_stage("tuned_unit"), TunedParams, TrainOutcome, "examples"),
    # LoRA SFT at candidate rates, each scored on test, in-domain dev and its training set
    "lora": UnitKind(_stage("train_unit"), TrainParams, TrainOutcome, "examples"),
    "lora-eval": UnitKind(_stage("scored_unit"), EvalParams, EvalOutcome, "generations"),
    # the guards' arm
    "guard": UnitKind(_stage("guard_unit", GUARD_STAGES), GuardParams, TrainOutcome, "examples"),
    "guarded": UnitKind(_stage("guarded_unit", GUARD_STAGES), GuardedParams, TrainOutcome, "examples"),
    "guard-eval": UnitKind(_stage("scored_unit"), EvalParams, EvalOutcome, "generations"),
}
