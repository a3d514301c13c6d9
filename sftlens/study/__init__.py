"""Studies: the paper's whole grid as one resumable run (`sftlens study run|plan`, `sftlens demo`).

Running a study: `config` (the study TOML and presets), `params` (what enters a unit key), `units`
(the unit graph), `stages` (what each unit runs), `engine` (keys, scheduling, resume), `db` (the
SQLite state), `executors` (local, Ray), `commands` (the `study` and `demo` verbs, `plan`),
`provenance` (code version and machine of a session).
Reporting it, from `study.db` alone: `results` (tagged records, the dev-chosen values), `bootstrap`
(paired bootstrap), `findings` (claims C1-C6, the verdict rule), `sections` (the paper's tables and
figures), `repair_section` ("Repair methods"), `report` (the report and results page, the `report` verb).
"""

from sftlens.study.engine.commands import add_cli, plan, run_demo, run_study
from sftlens.study.engine.config import StudyConfig, StudySettings, load_study_config
from sftlens.study.engine.units import build_units

__all__ = ["StudyConfig", "StudySettings", "add_cli", "build_units", "load_study_config", "plan", "run_demo",
           "run_study"]
