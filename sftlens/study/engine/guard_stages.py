"""The unit functions of the guards' arm (`[guards]`): a guard at one value on one training set and seed
(`guard_unit`), and a guard at the value its candidates chose on in-domain dev (`guarded_unit`, the rule the
repair methods' values follow: best mean dev Acc, ties the value nearest the guard's neutral one). Both train
[train]'s recipe from the study's base model, as the plain models of the grid are trained."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sftlens.config import config_from_dict
from sftlens.data.rows import read_split_rows
from sftlens.guards import GUARDS, guard_spec, known_rows, parse_guard
from sftlens.study.engine import roles
from sftlens.study.engine.choice import chosen_guard_value
from sftlens.study.engine.inputs import probe_records, study_facts, training_file
from sftlens.study.engine.params import GuardedParams, GuardParams
from sftlens.study.engine.stages import train_model
from sftlens.train import TrainConfig


def guard_unit(params, out: Path, deps) -> dict:
    p = GuardParams.of(params)
    return _guarded_train(params, p, config_from_dict(TrainConfig, p.train, "train"), out, deps)


def guarded_unit(params, out: Path, deps) -> dict:
    p = GuardedParams.of(params)
    by_value: dict[float, list[list[dict]]] = {}
    for role, value in p.dev.items():
        by_value.setdefault(value, []).append(roles.dep_result(deps, role)["records"])
    value = chosen_guard_value(by_value, GUARDS[p.guard].neutral)
    config = dataclasses.replace(config_from_dict(TrainConfig, p.train, "train"), guard=guard_spec(p.guard, value))
    return {**_guarded_train(params, p, config, out, deps), "value": value}


def _guarded_train(params, p: GuardParams, config: TrainConfig, out: Path, deps) -> dict:
    """Train with the guard; a replaying run mixes in the base's known training facts (its probe's level 4),
    the training set's own facts left out."""
    replay = None
    if parse_guard(config.guard)[0] == "replay":
        own = {row.get("fact_id") for row in read_split_rows(training_file(p, deps), ("prompt", "completion"))}
        replay = known_rows(probe_records(deps), study_facts(params), own)
    return train_model(params, p, config, out, deps, replay)
