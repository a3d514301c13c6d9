"""What the study's units read from the study: its facts (a fact set's read once per process), the probe unit's
records, the split unit's folder, a model's training file and its fact importances (the guided repair's). `stages`,
`guard_stages` and `importance_stage` read them here."""

from __future__ import annotations

import functools
from pathlib import Path

from sftlens.data import Fact, FactSet, first_per_relation, load_fact_set, load_facts
from sftlens.probe import load_probe
from sftlens.split import set_file, set_path
from sftlens.split import train_set as split_train_set
from sftlens.study.engine import roles
from sftlens.study.engine.params import FactSelection, Runtime, TrainParams
from sftlens.study.engine.scheduler import DATA
from sftlens.study.engine.units import select_facts


def study_facts(params) -> list[Fact]:
    """The facts a study probes: per split its relations, the first N per relation if limited."""
    selection, runtime = FactSelection.of(params), Runtime.of(params)
    facts: list[Fact] = []
    for split, relations in selection.relations.items():
        if runtime.facts:
            facts += select_facts(fact_set(runtime.facts, runtime.in_domain), split, relations, selection.limit(split))
            continue
        loaded = load_facts(runtime.data_dir, splits=(split,), relations=tuple(relations)).facts
        facts += first_per_relation(loaded, selection.limit(split))
    return facts


@functools.lru_cache(maxsize=2)
def fact_set(path: str, in_domain: str | None) -> FactSet:
    return load_fact_set(path, in_domain)


def probe_records(deps: roles.Deps):
    return load_probe(roles.dep_dir(deps, roles.PROBE) / "store")


def split_folder(deps: roles.Deps) -> Path:
    return roles.dep_dir(deps, roles.SPLIT) / DATA


def training_file(p: TrainParams, deps) -> Path:
    return set_file(split_folder(deps), set_path(split_train_set(p.set, p.size, p.seed)))


IMPORTANCES_FILE = "importances.safetensors"  # under the importance unit's folder


def importances_path(deps: roles.Deps) -> str | None:
    """The importances file of a unit's `importances` dependency (the guided repair's), if it has one."""
    return str(roles.dep_dir(deps, roles.IMPORTANCES) / IMPORTANCES_FILE) if roles.IMPORTANCES in deps else None


def predictions_file(folder: Path, split: str) -> Path:
    """An eval unit's per-fact answers on one split (fact_id, prediction, correct, ...) under its `folder`."""
    return folder / f"predictions-{split}.jsonl"
