"""Unit dependency roles: the one spelling of the names a unit gives the units it reads.

`units` builds a unit's `deps` (role -> key) with these names, `stages` reads what the engine passes
(role -> `Dep`) through them, and the engine gives a `BASE` dependency's model folder as the runtime
model. A unit's key hashes its roles with their keys, so these strings are part of every key:
respelling one re-keys every study.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TypedDict

PROBE = "probe"  # the probe: its store of per-fact samples
SPLIT = "split"  # the split unit: its folder of training, test and dev sets
MODEL = "model"  # the fine-tuned model a unit reads (units without one read the base model)
EVAL = "eval"  # the fine-tuned model's own test evaluation (a restore sweep's ratio 0)
BASE = "base"  # with [inject], the unit whose model is the study's base model
IMPORTANCES = "importances"  # the guided repair's fact importances of the fine-tuned model (`importance` unit)
BASE_EVAL = "base-eval"  # the base model's evaluation (its dev answers, which every importance unit weighs against)
_SWEEP = "sweep"  # + index: the dev sweeps (restore or one repair method) over the seeds of a (level, size)
_DEV = "dev"  # + index: a tuned unit's candidate scores on in-domain dev
_CANDIDATE = "model"  # + index: a tuned unit's candidate models


class Dep(TypedDict):
    """What a unit function receives per role: the dependency's artefact folder and its result."""

    dir: str
    result: dict


Deps = Mapping[str, Dep]


def dep_dir(deps: Deps, role: str) -> Path:
    return Path(deps[role]["dir"])


def dep_result(deps: Deps, role: str) -> dict:
    return deps[role]["result"]


def sweep_roles(keys: Iterable[str]) -> dict[str, str]:
    """The roles of a group of dev sweeps, in order: {`sweep0`: key, `sweep1`: key, ...}."""
    return {f"{_SWEEP}{i}": key for i, key in enumerate(keys)}


def sweep_results(deps: Deps) -> list[dict]:
    """The results of a unit's dev sweeps, in the order of their roles' names."""
    return [dep["result"] for role, dep in sorted(deps.items()) if role.startswith(_SWEEP)]


def dev_role(index: int) -> str:
    return f"{_DEV}{index}"


def candidate_role(index: int) -> str:
    return f"{_CANDIDATE}{index}"
