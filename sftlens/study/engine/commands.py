"""`sftlens study run|plan` (the paper's demo study: `sftlens study run demo`, then `sftlens report`).

One writer: `run_study` holds the study folder's `exclusive_writer` lock for the whole run; a second
run on the folder fails at once naming the holder; `plan` and `report` only read. A failed unit records
one line (`label (kind stage): cause [traceback: units/{kind}/{key}/error.log]`). `study.db` meta
`sessions`: per `study run` the command, code version (git commit, `+dirty`), machine, load average at
start and end, wall seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

from sftlens.errors import SftlensError
from sftlens.io import exclusive_writer
from sftlens.markdown import markdown_table
from sftlens.reporting.costs import DEFAULT_RATES, FIXED_SECONDS
from sftlens.reporting.provenance import code_version, machine
from sftlens.study.engine.config import PRESETS, StudyConfig, load_study_config
from sftlens.study.engine.db import StudyDB
from sftlens.study.engine.executors import make_executor
from sftlens.study.engine.kinds import KINDS
from sftlens.study.engine.scheduler import Unit, run_units, units_to_run
from sftlens.study.engine.units import build_units


def measured_rates(db: StudyDB) -> dict[str, float]:
    """Seconds per work item per kind, from every unit this study folder has finished, including
    units an edited config (or a newer sftlens) has since re-keyed: they ran on this machine."""
    spent: Counter = Counter()
    work: Counter = Counter()
    for kind, seconds, unit_work in db.finished_work():
        if seconds and unit_work:
            spent[kind] += max(0.0, seconds - FIXED_SECONDS.get(kind, 0))
            work[kind] += unit_work
    return {kind: spent[kind] / work[kind] for kind in work}


def estimate_seconds(unit: Unit, rates: dict[str, float]) -> float:
    """A unit's fixed part and its work at `rates` (a study's own measured rate per work item where it has one)."""
    return FIXED_SECONDS.get(unit.kind, 0) + unit.work * rates.get(unit.kind, DEFAULT_RATES.get(unit.kind, 0.0))


def plan_table(units: list[Unit], todo: list[Unit], rates: dict[str, float], measured: set[str]) -> str:
    kinds = list(dict.fromkeys(u.kind for u in units))
    rows = []
    total_seconds = 0.0
    for kind in kinds:
        todo_kind = [u for u in todo if u.kind == kind]
        seconds = sum(estimate_seconds(u, rates) for u in todo_kind)
        total_seconds += seconds
        work = sum(u.work for u in todo_kind)
        rows.append([kind, sum(u.kind == kind for u in units), len(todo_kind), f"{work:,.0f} {KINDS[kind].work}",
                     _duration(seconds), "this study" if kind in measured else "default (135M, 2 CPUs)"])
    rows.append(["**all**", len(units), len(todo), "", _duration(total_seconds), ""])
    return markdown_table(["unit", "total", "to run", "work to run", "est. time", "rate from"], rows, "lrrrrl")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def plan(config: StudyConfig, out: Path, data_dir: str | None = None, listing: bool = False) -> str:
    units = build_units(config, data_dir)
    states: dict = {}
    rates: dict = {}
    if (out / "study.db").is_file():
        with StudyDB(out) as db:
            states = db.states()
            rates = measured_rates(db)
    todo = units_to_run(units, states)
    text = [f"study {config.source} -> {out}: {len(units)} units, {len(todo)} to run", "",
            plan_table(units, todo, {**DEFAULT_RATES, **rates}, set(rates))]
    if listing:
        text += ["", *(f"{u.kind:8} {u.key}  {u.label}" for u in todo)]
    return "\n".join(text)


def _record_session(db: StudyDB, session: dict) -> None:
    """Each `study run` is one session; a study's wall time is the sum over sessions (a resumed run)."""
    sessions = [s for s in db.meta("sessions", []) if s["started"] != session["started"]]
    db.set_meta("sessions", [*sessions, session])


def run_study(config: StudyConfig, out: Path, data_dir: str | None = None, executor: str = "local",
              address: str | None = None, workers: int | None = None, progress: bool = True):
    session = {"started": time.time(), "command": " ".join(["sftlens", *sys.argv[1:]]), "code": code_version(),
               "machine": machine(), "executor": executor, "load_average_at_start": os.getloadavg()}
    with exclusive_writer(out, "study folder"):  # before anything else: a second writer stops at once
        units = build_units(config, data_dir)
        with StudyDB(out) as db:
            db.set_meta("config", config.to_dict())
            db.set_meta("source", config.source)
        engine = make_executor(executor, address, workers)
        try:
            summary = run_units(units, out, engine, prune=config.study.prune_checkpoints, progress=progress)
        finally:
            engine.close()
            with StudyDB(out) as db:
                _record_session(db, {**session, "finished": time.time(), "wall_s": time.time() - session["started"],
                                     "load_average": os.getloadavg()})
    if summary.failed:
        raise SftlensError(f"{len(summary.failed)} unit(s) failed, first {next(iter(summary.failed.values()))} "
                           f"(`sftlens study run` again retries them)")
    return summary


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help=f"study TOML, or a preset: {', '.join(PRESETS)}")
    parser.add_argument("--out", required=True, help="study directory (database + artefacts)")
    parser.add_argument("--data-dir", help="EntityQuestions folder (default: the study's data_dir or $SFTLENS_DATA_DIR)")
    parser.add_argument("--facts", help="a fact set instead (folder from `sftlens data import`, or a native JSONL "
                                        "file): the study's [data] facts")
    parser.add_argument("--in-domain", help="with --facts: topics that count as in-domain (default: as the set declares)")


def _study_config(args) -> StudyConfig:
    """The study file, with --facts / --in-domain in place of its [data] keys."""
    data = {k: v for k, v in (("facts", args.facts and str(Path(args.facts).resolve())),
                              ("in_domain", args.in_domain)) if v}
    return load_study_config(args.config, {"study": data} if data else None)


def _add_executor(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--executor", choices=("local", "ray"), default="local", help="where units run (default: local)")
    parser.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    parser.add_argument("--workers", type=int, help="local executor: parallel units (default: one per local GPU, else 1)")


def _run(args) -> None:
    config = _study_config(args)
    start = time.perf_counter()
    summary = run_study(config, Path(args.out), args.data_dir, args.executor, args.address, args.workers)
    print(f"{args.out}: {len(summary.ran)} units run, {summary.skipped} already done, "
          f"{len(summary.pruned)} pruned ({time.perf_counter() - start:.0f} s)")


def _plan(args) -> None:
    print(plan(_study_config(args), Path(args.out), args.data_dir, args.list))


def add_cli(subparsers) -> None:
    study = subparsers.add_parser("study", help="the whole grid as one resumable study")
    sub = study.add_subparsers(dest="study_command", metavar="ACTION", required=True)
    run = sub.add_parser("run", help="run the study's units not done yet")
    _add_common(run)
    _add_executor(run)
    run.set_defaults(func=_run)
    plan_parser = sub.add_parser("plan", help="the units still to run and an estimate of their cost")
    _add_common(plan_parser)
    plan_parser.add_argument("--list", action="store_true", help="list every unit still to run")
    plan_parser.set_defaults(func=_plan)
