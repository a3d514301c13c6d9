"""Studies: the paper's whole grid as one resumable run (`sftlens study run|plan`), and its report.

Two subpackages, the dependency pointing one way (report -> engine):

- `engine/`, running a study: `config` (the study TOML and presets), `params` (what enters a unit key),
  `roles` (dependency roles), `units` (the unit graph), `stages` (what each unit runs), `choice` (the dev
  choices units make), `scheduler` (`Unit` and its key, unit folders, scheduling, resume), `db` (the
  SQLite state), `executors` (local, Ray), `commands` (the `study` verb, `plan`).
- `report/`, reporting it from `study.db` alone: `results` (tagged records, arms, the statistic over seeds),
  `findings` (claims C1-C6), `sections` (the paper's tables and figures), `repair_section` ("Repair
  methods"), `taught_section` ("Taught and untaught facts"), `page` (the report and results page, the `report` verb).

Both stand on `sftlens.reporting` (paired bootstrap, verdict rule, page writer, figures, provenance, costs), which
the audit (`sftlens.audit`, a peer: neither imports the other) shares.

The report reads the engine's database, parameters, choice rules and unit folders; the engine never imports
the report.
"""

from sftlens.study.engine.commands import add_cli, plan, run_study
from sftlens.study.engine.config import StudyConfig, StudySettings, load_study_config
from sftlens.study.engine.units import build_units

__all__ = ["StudyConfig", "StudySettings", "add_cli", "build_units", "load_study_config", "plan", "run_study"]
