"""Running a study: the units, their keys, their scheduling and the database they are recorded in.

`config` (the study TOML and presets), `params` (what enters a unit key), `roles` (the names a unit
gives the units it reads), `units` (the unit graph), `stages` (what each unit runs), `choice` (the dev
choices units make: restore ratio, repair value, learning rate), `scheduler` (`Unit` and its key, the
unit folder layout, scheduling, resume), `db` (the SQLite state), `executors` (local, Ray), `commands`
(the `study` verb, `plan`; a session's provenance and the plan's rates: `sftlens.reporting`).

The dependency points one way: the report (`sftlens.study.report`) reads the engine (`db`, `params`,
`choice`, the unit folder layout); the engine never imports the report.
"""
