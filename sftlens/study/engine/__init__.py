"""Running a study: the units, their keys, their scheduling and the database they are recorded in.

`config` (the study TOML and presets), `params` (what enters a unit key), `roles` (the names a unit gives
the units it reads), `units` (the unit graph), `stages` (what each unit runs), `scheduler` (`Unit` and its key, the unit folder
layout, scheduling, resume), `db` (the SQLite state), `executors` (local, Ray), `commands` (the `study`
and `demo` verbs, `plan`), `provenance` (code version and machine of a session).

`stages` reads the dev choices from `sftlens.study.report.results`, and `commands.run_demo` writes the
demo's report.
"""
