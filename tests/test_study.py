"""The study: engine (keys, resume, failures, pruning), config, unit graph, plan, report, demo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftlens.errors import SftlensError
from sftlens.study.db import StudyDB
from sftlens.study.engine import Unit, run_units, unit_dir
from sftlens.study.executors import LocalExecutor


# --- the engine on a small graph of arithmetic units ------------------------------------------


def add_unit(params, out: Path, deps) -> dict:
    """value = x + the dependencies' values; logs each execution; writes a droppable artefact."""
    if params.get("fail"):
        raise SftlensError(f"unit {params['name']} was told to fail")
    with open(params["log"], "a") as f:
        f.write(params["name"] + "\n")
    value = params["x"] + sum(d["result"]["value"] for d in deps.values())
    for d in deps.values():
        assert (Path(d["dir"]) / "weights.bin").is_file(), "a dependency's artefact must exist while it is read"
    (out / "weights.bin").write_bytes(b"w" * 8)
    return {"value": value}


def diamond(log: Path, b_x: int = 2, fail_c: bool = False, extra: bool = False) -> list[Unit]:
    def unit(name, x, deps=None, fail=False):
        params = {"name": name, "x": x, "log": str(log), **({"fail": True} if fail else {})}
        return Unit("add", name, "test_study:add_unit", params, deps or {}, prune=("weights.bin",))

    a = unit("a", 1)
    b = unit("b", b_x, {"up": a.key})
    c = unit("c", 3, {"up": a.key}, fail=fail_c)
    d = unit("d", 4, {"left": b.key, "right": c.key})
    units = [a, b, c, d]
    if extra:
        units.append(unit("e", 5, {"up": b.key}))
    return units


def executions(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def values(study: Path) -> dict[str, int]:
    with StudyDB(study) as db:
        return {u["label"]: u["result"]["value"] for u in db.planned_units() if u["result"]}


def test_engine_runs_in_dependency_order_and_skips_done_units(tmp_path):
    log = tmp_path / "log"
    summary = run_units(diamond(log), tmp_path / "s", LocalExecutor(1), progress=False)
    assert summary.ran == ["a", "b", "c", "d"] and not summary.failed
    assert values(tmp_path / "s") == {"a": 1, "b": 3, "c": 4, "d": 4 + 3 + 4}
    again = run_units(diamond(log), tmp_path / "s", LocalExecutor(1), progress=False)
    assert again.ran == [] and again.skipped == 4
    assert executions(log) == ["a", "b", "c", "d"]


def test_edited_settings_recompute_only_the_affected_units(tmp_path):
    log = tmp_path / "log"
    run_units(diamond(log), tmp_path / "s", LocalExecutor(1), progress=False)
    summary = run_units(diamond(log, b_x=10), tmp_path / "s", LocalExecutor(1), progress=False)
    assert summary.ran == ["b", "d"]
    assert values(tmp_path / "s") == {"a": 1, "b": 11, "c": 4, "d": 19}


def test_a_failed_unit_blocks_its_dependents_and_is_retried_next_run(tmp_path):
    log = tmp_path / "log"
    summary = run_units(diamond(log, fail_c=True), tmp_path / "s", LocalExecutor(1), progress=False)
    assert summary.failed == {"c": "unit c was told to fail"}
    assert summary.ran == ["a", "b"]
    with StudyDB(tmp_path / "s") as db:
        states = {u["label"]: u["state"] for u in db.planned_units()}
    assert states == {"a": "done", "b": "done", "c": "failed", "d": "pending"}
    fixed = run_units(diamond(log), tmp_path / "s", LocalExecutor(1), progress=False)
    assert fixed.ran == ["c", "d"] and not fixed.failed


def test_pruning_drops_artefacts_once_dependents_are_done_and_recomputes_when_needed(tmp_path):
    log = tmp_path / "log"
    units = diamond(log)
    summary = run_units(units, tmp_path / "s", LocalExecutor(1), prune=True, progress=False)
    assert set(summary.pruned) == {"a", "b", "c", "d"}
    assert not any((unit_dir(tmp_path / "s", u) / "weights.bin").exists() for u in units)
    assert values(tmp_path / "s")["d"] == 11  # results stay
    # a new dependent of b needs b's artefact again, and b needs a's: both are recomputed, c and d not
    more = run_units(diamond(log, extra=True), tmp_path / "s", LocalExecutor(1), prune=True, progress=False)
    assert more.ran == ["a", "b", "e"]
    assert values(tmp_path / "s")["e"] == 5 + 3


def test_a_process_pool_gives_the_same_results(tmp_path):
    log = tmp_path / "log"
    executor = LocalExecutor(2)
    try:
        summary = run_units(diamond(log), tmp_path / "pool", executor, progress=False)
    finally:
        executor.close()
    run_units(diamond(tmp_path / "log2"), tmp_path / "seq", LocalExecutor(1), progress=False)
    assert sorted(summary.ran) == ["a", "b", "c", "d"]
    assert values(tmp_path / "pool") == values(tmp_path / "seq")
    assert sorted(executions(log)) == ["a", "b", "c", "d"]
