"""The study engine: units of work keyed by their inputs, run by a pluggable executor.

A unit's key hashes its function, settings and the keys of the units it depends on, so a key
changes exactly when something upstream of it changed: an edited config re-runs only the units
whose keys moved, and a killed study resumes with the units it had not recorded as done. Each
unit writes its artefacts under `units/{kind}/{key}/` and returns a JSON result, which the driver
(the only writer of the database) records.
"""

from __future__ import annotations

import importlib
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sftlens.errors import SftlensError
from sftlens.io import atomic_write_text, stable_hash
from sftlens.study.engine import roles
from sftlens.study.engine.db import StudyDB

# Bump when the meaning of a unit's result changes, so old results are not reused.
UNIT_FORMAT = 1

STAGES = "sftlens.study.engine.stages"  # the module of the study's unit functions (`units` names them on it)
# Keys spell STAGES' functions by the module's path before the engine/report split, so existing studies keep their results.
KEYED_STAGES = "sftlens.study.stages"


@dataclass(frozen=True)
class Unit:
    kind: str
    label: str
    fn: str  # "module:function", importable on every worker (keyed as `keyed_fn` spells it)
    params: dict[str, Any]
    deps: dict[str, str] = field(default_factory=dict)  # role -> key of the unit it reads
    # where things are (model path, data folder, device): passed to the unit, not part of its key,
    # so a moved data folder or another device does not invalidate results
    runtime: dict[str, Any] = field(default_factory=dict)
    cpus: float = 1.0
    gpus: float = 0.0
    work: float = 0.0  # size of the job (generations, training examples...), for `study plan` estimates
    prune: tuple[str, ...] = ()  # artefact paths (relative to the unit dir) droppable once dependents are done

    @property
    def key(self) -> str:
        return stable_hash({"format": UNIT_FORMAT, "fn": keyed_fn(self.fn), "params": self.params, "deps": self.deps})

    def spec(self) -> dict:
        return {"fn": self.fn, "params": self.params, "deps": self.deps, "runtime": self.runtime,
                "cpus": self.cpus, "gpus": self.gpus, "work": self.work}


def keyed_fn(fn: str) -> str:
    """A unit function as its key spells it: a stage by its module's pre-split path (`KEYED_STAGES`)."""
    module, name = fn.split(":")
    return f"{KEYED_STAGES}:{name}" if module == STAGES else fn


DATA = "data"  # the split unit's split folder, under its artefact folder


def unit_dir(study_dir: str | Path, unit: Unit) -> Path:
    return unit_folder(study_dir, unit.kind, unit.key)


def unit_folder(study_dir: str | Path, kind: str, key: str) -> Path:
    """A unit's artefact folder: the one spelling of the study folder's layout."""
    return Path(study_dir) / "units" / kind / key


def execute(payload: dict) -> dict:
    """Run one unit (in the driver, a local worker process or a Ray task) and return its result."""
    module, name = payload["fn"].split(":")
    fn = getattr(importlib.import_module(module), name)
    out = Path(payload["unit_dir"])
    out.mkdir(parents=True, exist_ok=True)
    return fn(payload["params"], out, payload["deps"])


def check_graph(units: list[Unit]) -> None:
    """Units must come in dependency order with unique keys (build_units guarantees both)."""
    seen: set[str] = set()
    for unit in units:
        missing = [k for k in unit.deps.values() if k not in seen]
        if missing:
            raise ValueError(f"unit {unit.label} depends on {missing[0]}, which does not precede it")
        if unit.key in seen:
            raise ValueError(f"duplicate unit {unit.label} ({unit.key})")
        seen.add(unit.key)


def dependents(units: list[Unit]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {u.key: [] for u in units}
    for unit in units:
        for dep in unit.deps.values():
            out[dep].append(unit.key)
    return out


def units_to_run(units: list[Unit], states: dict[str, dict]) -> list[Unit]:
    """Units not recorded as done, plus pruned units that an unfinished dependent still reads."""
    done = {k for k, s in states.items() if s["state"] == "done"}
    needed: set[str] = {u.key for u in units if u.key not in done}
    for unit in reversed(units):
        if unit.key in needed:
            needed.update(k for k in unit.deps.values() if states.get(k, {}).get("pruned"))
    return [u for u in units if u.key in needed]


def cause(err: BaseException) -> str:
    """The cause of a unit's failure in one line: an SftlensError's own message (which names the file,
    key or value at fault), else the exception's type and message."""
    text = str(err) if isinstance(err, SftlensError) else f"{type(err).__name__}: {err}"
    return " ".join(text.split()) or type(err).__name__


def record_failure(unit: Unit, err: BaseException, study_dir: Path) -> str:
    """Write the traceback to the unit's `error.log`; return the one line the user sees."""
    log = unit_dir(study_dir, unit) / "error.log"
    atomic_write_text(log, "".join(traceback.format_exception(err)))
    return f"{unit.label} ({unit.kind} stage): {cause(err)} [traceback: {log}]"


@dataclass
class RunSummary:
    ran: list[str] = field(default_factory=list)
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # label -> error
    pruned: list[str] = field(default_factory=list)


def _prune_finished(unit_by_key, children, finished: set[str], candidates, study_dir, db, summary) -> None:
    for key in candidates:
        unit = unit_by_key[key]
        if not unit.prune or not all(c in finished for c in children[key]):
            continue
        for rel in unit.prune:
            target = unit_dir(study_dir, unit) / rel
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        db.mark_pruned(key)
        summary.pruned.append(unit.label)


def run_units(units: list[Unit], study_dir: str | Path, executor, prune: bool = False, progress: bool = True) -> RunSummary:
    """Run every unit not yet done, each once its dependencies are, and record the results."""
    check_graph(units)
    study_dir = Path(study_dir)
    summary = RunSummary()
    unit_by_key = {u.key: u for u in units}
    children = dependents(units)
    with StudyDB(study_dir) as db:
        db.register(units)
        states = db.states()
        todo = units_to_run(units, states)
        todo_keys = {u.key for u in todo}
        finished = {u.key for u in units if u.key not in todo_keys}
        summary.skipped = len(finished)
        results = {k: db.result(k) for k in finished}
        blocked: set[str] = set()
        pending: dict[Any, Unit] = {}
        waiting = list(todo)
        bar = tqdm(total=len(todo), desc="study", unit="unit", disable=not progress)
        try:
            while waiting or pending:
                for unit in list(waiting):
                    if any(d in blocked for d in unit.deps.values()):
                        waiting.remove(unit)
                        blocked.add(unit.key)
                        bar.update(1)
                        continue
                    if len(pending) >= executor.capacity or not all(d in finished for d in unit.deps.values()):
                        continue
                    waiting.remove(unit)
                    payload = {
                        "fn": unit.fn, "params": _unit_params(unit, study_dir, unit_by_key),
                        "unit_dir": str(unit_dir(study_dir, unit)),
                        "deps": {
                            role: {"dir": str(unit_dir(study_dir, unit_by_key[k])), "result": results[k]}
                            for role, k in unit.deps.items()
                        },
                    }
                    db.mark_running(unit.key)
                    pending[executor.submit(unit, payload)] = unit
                if not pending:
                    continue
                for handle, ok, value, seconds in executor.wait(list(pending)):
                    unit = pending.pop(handle)
                    bar.update(1)
                    if ok:
                        db.mark_done(unit.key, value, seconds)
                        results[unit.key] = value
                        finished.add(unit.key)
                        summary.ran.append(unit.label)
                        if prune:
                            _prune_finished(unit_by_key, children, finished, [unit.key, *unit.deps.values()], study_dir, db, summary)
                    else:
                        line = record_failure(unit, value, study_dir)
                        db.mark_failed(unit.key, line)
                        summary.failed[unit.label] = line
                        blocked.add(unit.key)
                        bar.write(f"failed: {line}")
        finally:
            bar.close()
            for unit in pending.values():
                db.mark_pending(unit.key)
    return summary


def _unit_params(unit: Unit, study_dir, unit_by_key: dict) -> dict:
    """A unit's settings and runtime values, its base model taken from its `base` dependency if any."""
    params = {**unit.params, **unit.runtime}
    # a unit depending on another as its base reads that unit's `model` folder as the study's base model:
    # how a study runs on a model it made itself (`[inject]`)
    if roles.BASE in unit.deps:
        params["model"] = str(unit_dir(study_dir, unit_by_key[unit.deps[roles.BASE]]) / "model")
    return params


def timed_execute(payload: dict) -> tuple[dict, float]:
    start = time.perf_counter()
    result = execute(payload)
    return result, time.perf_counter() - start
