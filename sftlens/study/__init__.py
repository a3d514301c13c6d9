"""Studies: the paper's whole grid as one resumable run (`sftlens study run|plan`, `sftlens demo`).

`config` (the study TOML and presets), `units` (the unit graph), `stages` (what each unit runs),
`engine` (keys, scheduling, resume), `db` (the SQLite state), `executors` (local, Ray).
"""

from sftlens.study.commands import add_cli, plan, run_demo, run_study
from sftlens.study.config import StudyConfig, StudySettings, load_study_config
from sftlens.study.units import build_units

__all__ = ["StudyConfig", "StudySettings", "add_cli", "build_units", "load_study_config", "plan", "run_demo",
           "run_study"]
