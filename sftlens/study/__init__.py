"""Studies: the paper's whole grid as one resumable run (`sftlens study run|plan`, `sftlens demo`), and its report.

Two subpackages, the dependency pointing one way (report -> engine):

- `engine/`, running a study: `config` (the study TOML and presets), `params` (what enters a unit key),
  `roles` (dependency roles), `units` (the unit graph), `stages` (what each unit runs), `choice` (the dev
  choices units make), `scheduler` (`Unit` and its key, unit folders, scheduling, resume), `db` (the
  SQLite state), `executors` (local, Ray), `commands` (the `study` and `demo` verbs, `plan`),
  `provenance` (code version and machine of a session).
- `report/`, reporting it from `study.db` alone: `results` (tagged records, arms), `bootstrap` (paired
  bootstrap), `findings` (claims C1-C6, the verdict rule), `sections` (the paper's tables and figures),
  `repair_section` ("Repair methods"), `taught_section` ("Taught and untaught facts"), `audit_section`
  (the `sftlens audit` report, from its `summary.json`), `page` (the report and results page, the `report` verb).

The report reads the engine's database, parameters, choice rules and unit folders; the engine imports
the report only to write the demo's report (`engine.commands.run_demo`).
"""

from sftlens.study.engine.commands import add_cli, plan, run_demo, run_study
from sftlens.study.engine.config import StudyConfig, StudySettings, load_study_config
from sftlens.study.engine.units import build_units

__all__ = ["StudyConfig", "StudySettings", "add_cli", "build_units", "load_study_config", "plan", "run_demo",
           "run_study"]
