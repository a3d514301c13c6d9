import subprocess
import sys

import pytest

from sftlens.cli import COMMAND_MODULES, build_parser, main


def test_help_lists_every_registered_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    names = build_parser()._subparsers._group_actions[0].choices
    for name in names:
        assert name in out
    assert {"models", "data"} <= set(names)
    assert len(names) >= len(COMMAND_MODULES)


def test_data_stats_prints_counts(tiny_data_dir, capsys):
    assert main(["data", "stats", "--data-dir", str(tiny_data_dir), "--relations", "P17,P26"]) == 0
    out = capsys.readouterr().out
    assert "| P17 | in | train | 12 | 2 | 0 |" in out
    assert "train: 24 records, 4 multi-answer, 0 unmatched" in out


def test_errors_are_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sftlens", "data", "stats", "--data-dir", str(tmp_path / "missing")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"sftlens: error: data directory {tmp_path / 'missing'} does not exist"]


def test_unknown_model_name_cli_error(capsys):
    assert main(["models", "prepare", "gpt-17"]) == 2
    assert "unknown model name 'gpt-17'" in capsys.readouterr().err


@pytest.mark.slow
def test_shared_data_stats_totals(shared_data_dir, capsys):
    assert main(["data", "stats", "--data-dir", str(shared_data_dir)]) == 0
    out = capsys.readouterr().out
    assert "train: 176560 records, 7396 multi-answer, 0 unmatched" in out
    assert "dev: 22068 records" in out and "test: 22075 records" in out
