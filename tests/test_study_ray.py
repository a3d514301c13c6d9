"""The Ray executor on a local Ray instance (CPU): every unit runs exactly once and the results
equal the local executor's."""

from __future__ import annotations

import pytest

from assets import assert_same_results, comparable

ray = pytest.importorskip("ray")


def test_ray_executor_runs_each_unit_once_with_the_local_results(tiny_study, tmp_path):
    from sftlens.study.commands import run_study
    from sftlens.study.config import load_study_config
    from sftlens.study.db import StudyDB

    config_file, reference = tiny_study
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_study(load_study_config(str(config_file)), tmp_path / "ray", executor="ray", progress=False)
    finally:
        ray.shutdown()
    with StudyDB(tmp_path / "ray") as db:
        units = db.planned_units()
    assert len(summary.ran) == len(units) and not summary.failed
    assert {u["runs"] for u in units} == {1}
    assert_same_results(comparable(tmp_path / "ray"), comparable(reference))
