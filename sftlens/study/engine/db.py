"""The study database: unit states and results in one SQLite file, written by the driver only.

Workers never open it; they return a JSON result that the driver records, so a cluster needs a
shared filesystem for artefacts but no shared database. The `plan` table lists the units of the
config last run, so the report ignores units a later edit of the config left behind.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from sftlens.errors import SftlensError
from sftlens.study.engine.outcomes import skipped

DB_NAME = "study.db"

SCHEMA = """
CREATE TABLE IF NOT EXISTS units (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    label TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    result TEXT,
    error TEXT,
    runs INTEGER NOT NULL DEFAULT 0,
    seconds REAL,
    finished REAL,
    pruned INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS plan (position INTEGER PRIMARY KEY, key TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class StudyDB:
    def __init__(self, study_dir: str | Path, create: bool = True):
        self.path = Path(study_dir) / DB_NAME
        if not create and not self.path.is_file():
            raise SftlensError(f"{study_dir}: not a study directory (no {DB_NAME})")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.executescript(SCHEMA)
        except sqlite3.DatabaseError as err:
            raise SftlensError(f"{self.path}: not a usable study database ({err})") from None

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> StudyDB:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_meta(self, name: str, value) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, json.dumps(value)))

    def meta(self, name: str, default=None):
        row = self.conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return json.loads(row[0]) if row else default

    def register(self, units) -> None:
        """Make `units` the current plan; units already known keep their state and results."""
        with self.conn:
            self.conn.execute("BEGIN")
            for unit in units:
                self.conn.execute(
                    "INSERT OR IGNORE INTO units (key, kind, label, spec) VALUES (?, ?, ?, ?)",
                    (unit.key, unit.kind, unit.label, json.dumps(unit.spec(), sort_keys=True)),
                )
            self.conn.execute("DELETE FROM plan")
            self.conn.executemany("INSERT INTO plan VALUES (?, ?)", [(i, u.key) for i, u in enumerate(units)])

    def states(self) -> dict[str, dict]:
        rows = self.conn.execute("SELECT key, state, runs, pruned, seconds FROM units").fetchall()
        return {k: {"state": s, "runs": r, "pruned": bool(p), "seconds": sec} for k, s, r, p, sec in rows}

    def mark_running(self, key: str) -> None:
        self.conn.execute("UPDATE units SET state = 'running', runs = runs + 1, error = NULL WHERE key = ?", (key,))

    def mark_done(self, key: str, result: dict, seconds: float) -> None:
        self.conn.execute(
            "UPDATE units SET state = 'done', result = ?, seconds = ?, finished = ?, pruned = 0 WHERE key = ?",
            (json.dumps(result, sort_keys=True), seconds, time.time(), key),
        )

    def mark_failed(self, key: str, error: str) -> None:
        self.conn.execute("UPDATE units SET state = 'failed', error = ? WHERE key = ?", (error, key))

    def mark_pending(self, key: str) -> None:
        self.conn.execute("UPDATE units SET state = 'pending' WHERE key = ? AND state = 'running'", (key,))

    def mark_pruned(self, key: str) -> None:
        self.conn.execute("UPDATE units SET pruned = 1 WHERE key = ?", (key,))

    def result(self, key: str) -> dict | None:
        row = self.conn.execute("SELECT result FROM units WHERE key = ? AND state = 'done'", (key,)).fetchone()
        return json.loads(row[0]) if row and row[0] else None

    def finished_work(self) -> list[tuple[str, float, float]]:
        """(kind, seconds, work) of every finished unit, planned now or not; a unit that ended `skipped` did
        none of its planned work (it would make its kind's measured rate look fast)."""
        rows = self.conn.execute("SELECT kind, seconds, spec, result FROM units WHERE state = 'done'").fetchall()
        return [(kind, seconds, json.loads(spec).get("work", 0.0)) for kind, seconds, spec, result in rows
                if not skipped(json.loads(result) if result else None)]

    def planned_units(self) -> list[dict]:
        """The current plan's units in order, with their spec, state and result."""
        rows = self.conn.execute(
            "SELECT u.key, u.kind, u.label, u.spec, u.state, u.result, u.runs, u.seconds, u.error "
            "FROM plan p JOIN units u ON u.key = p.key ORDER BY p.position"
        ).fetchall()
        return [
            {
                "key": key, "kind": kind, "label": label, "spec": json.loads(spec), "state": state,
                "result": json.loads(result) if result else None, "runs": runs, "seconds": seconds,
                "error": error,
            }
            for key, kind, label, spec, state, result, runs, seconds, error in rows
        ]
