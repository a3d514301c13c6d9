"""Faults: one writer per output folder, failures that explain themselves, nothing half-written."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sftlens.errors import SftlensError
from sftlens.io import atomic_write_bytes, exclusive_writer, lock_path
from sftlens.study.engine.executors import LocalExecutor
from sftlens.study.engine.scheduler import Unit, run_units

HOLD = """
import sys, time
from sftlens.io import exclusive_writer
with exclusive_writer(sys.argv[1], "study folder"):
    print("locked", flush=True)
    time.sleep(60)
"""


def hold_lock(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path):
    holder = hold_lock(tmp_path / "study")
    try:
        with pytest.raises(SftlensError) as err:
            with exclusive_writer(tmp_path / "study", "study folder"):
                pass
        message = str(err.value)
        assert "\n" not in message
        assert f"pid {holder.pid}" in message and "another sftlens run is writing this study folder" in message
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_writer_leaves_no_stale_lock(tmp_path):
    holder = hold_lock(tmp_path / "study")
    holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the flock
    holder.wait()
    assert lock_path(tmp_path / "study").is_file()
    with exclusive_writer(tmp_path / "study"):
        info = json.loads(lock_path(tmp_path / "study").read_text())
        assert info["pid"] == os.getpid()


def test_the_cli_refuses_a_second_writer_in_one_line(tmp_path):
    holder = hold_lock(tmp_path / "ev")
    try:
        done = subprocess.run([sys.executable, "-m", "sftlens", "eval", "--model", "x", "--test", "t.jsonl",
                               "--out", str(tmp_path / "ev")], capture_output=True, text=True, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sftlens: error: ") and f"pid {holder.pid}" in lines[0]


def test_study_run_refuses_a_folder_another_run_holds(tmp_path):
    from sftlens.study.engine.commands import run_study
    from sftlens.study.engine.config import load_study_config

    holder = hold_lock(tmp_path / "study")
    try:
        with pytest.raises(SftlensError, match="another sftlens run is writing this study folder"):
            run_study(load_study_config("demo"), tmp_path / "study", data_dir=tmp_path / "no-data")
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "study" / "study.db").exists(), "the refused run touched nothing"


def crash_unit(params, out: Path, deps) -> dict:
    (out / "partial").write_text("x")
    json.loads(params["text"])  # a deep error with no user-facing message
    return {}


def test_a_unit_error_is_one_line_naming_unit_stage_and_log(tmp_path):
    unit = Unit("train", "train level0-n8-seed0", "test_faults:crash_unit", {"text": "{bad"})
    summary = run_units([unit], tmp_path / "s", LocalExecutor(1), progress=False)
    (line,) = summary.failed.values()
    assert "\n" not in line
    assert line.startswith("train level0-n8-seed0 (train stage): JSONDecodeError: ")
    log = Path(line.rsplit("[traceback: ", 1)[1].rstrip("]"))
    assert log.is_file() and "json.loads" in log.read_text()


class FullDisk:
    """A file object whose writes fail as on a full disk, after half of the data went through."""

    def __init__(self, real):
        self.real = real

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.real.close()

    def write(self, data):
        self.real.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")


def test_enospc_while_writing_leaves_the_old_file_and_no_partial(tmp_path, monkeypatch):
    target = tmp_path / "report.md"
    target.write_text("old report")
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *a, **k: FullDisk(real_fdopen(fd, mode, *a, **k)))
    with pytest.raises(OSError) as err:
        atomic_write_bytes(target, b"new report" * 1000)
    assert err.value.errno == errno.ENOSPC
    assert target.read_text() == "old report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"], "no temporary file left behind"


def test_a_truncated_jsonl_input_line_names_the_file_and_line(tmp_path):
    from sftlens.data.rows import read_split_rows

    path = tmp_path / "set.jsonl"
    path.write_text('{"prompt": "q", "completion": "a"}\n{"prompt": "q2", "compl')
    with pytest.raises(SftlensError, match=f"{path}:2: not valid JSON"):
        read_split_rows(path, ("prompt", "completion"))


def test_a_truncated_safetensors_shard_names_the_file(tmp_path):
    import torch
    from safetensors.torch import save_file

    from sftlens.weights.checkpoints import open_pair

    for name in ("base", "ft"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        save_file({"model.layers.0.mlp.up_proj.weight": torch.ones(64, 64)}, tmp_path / name / "model.safetensors")
    shard = tmp_path / "ft" / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(SftlensError, match=str(shard)):
        open_pair(tmp_path / "base", tmp_path / "ft")


def test_enospc_while_writing_restored_folders_leaves_no_folder(tmp_path, monkeypatch):
    import sftlens.weights.apply
    from sftlens.restore import RestoreConfig, as_repair
    from sftlens.weights import repair_sweep

    from assets import random_pair

    base_dir, ft_dir, _, _ = random_pair(tmp_path, shards=2)
    real, calls = sftlens.weights.apply._as_bytes, []

    def fails_on_the_third_block(tensor):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensor)

    monkeypatch.setattr(sftlens.weights.apply, "_as_bytes", fails_on_the_third_block)
    with pytest.raises(OSError):
        repair_sweep(base_dir, ft_dir, (1, 10), as_repair(RestoreConfig(region="all")), tmp_path / "out", progress=False)
    assert list((tmp_path / "out").iterdir()) == [], "no partial restored folder"
    monkeypatch.setattr(sftlens.weights.apply, "_as_bytes", real)
    folders = repair_sweep(base_dir, ft_dir, (1, 10), as_repair(RestoreConfig(region="all")), tmp_path / "out", progress=False)
    assert all((folder / "restore.json").is_file() for folder in folders.values())


def test_the_cli_reports_a_full_disk_in_one_line(tmp_path, monkeypatch, capsys):
    from sftlens import cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "report.md"))

    monkeypatch.setattr(cli, "build_parser", lambda command=None: _parser_running(full))
    assert cli.main(["x"]) == 2
    assert capsys.readouterr().err == f"sftlens: error: {tmp_path / 'report.md'}: No space left on device\n"


def _parser_running(func):
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    parser.set_defaults(func=func)
    return parser
