import subprocess
import sys

import pytest

from sftlens.cli import COMMANDS, build_parser, main


def test_help_lists_every_command_with_its_summary(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name, (_, summary) in COMMANDS.items():
        assert name in out and summary.split()[0] in out
    assert set(build_parser()._subparsers._group_actions[0].choices) == set(COMMANDS)


def test_help_imports_no_stage_module():
    code = ("import sys\nfrom sftlens.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('sftlens.probe', 'sftlens.train'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_loads_its_own_parser(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"usage: sftlens {command}" in capsys.readouterr().out


def test_data_stats_prints_counts(tiny_data_dir, capsys):
    assert main(["data", "stats", "--data-dir", str(tiny_data_dir), "--relations", "P17,P26"]) == 0
    out = capsys.readouterr().out
    assert "| P17 | in | train | 12 | 2 | 0 |" in out
    assert "train: 24 records, 4 multi-answer, 0 unmatched" in out


# What a tqdm bar leaves on a stream (a pipe, here): its bar, its percentage, a carriage return between updates.
BAR_MARKS = ("█", "%|", "\r", "it/s")


def test_quiet_before_or_after_the_verb_prints_no_progress_bar(tiny_model_dir, tiny_data_dir, tmp_path, capfd):
    """transformers' own bars ("Loading weights") are never drawn; --quiet leaves no bar at all, only the
    result lines, and puts every switch back as it was (main runs in-process here)."""
    from tqdm import std
    from transformers.utils import logging as hf_logging

    init, library_bars = vars(std.tqdm)["__init__"], hf_logging.is_progress_bar_enabled()
    probe = ["probe", "--model", str(tiny_model_dir), "--data-dir", str(tiny_data_dir), "--split", "test",
             "--relations", "P17,P19", "--limit", "2", "--samples", "2", "--templates", "0", "--max-new-tokens", "4"]
    capfd.readouterr()
    assert main([*probe, "--store", str(tmp_path / "loud")]) == 0
    out, err = capfd.readouterr()
    assert "probing 4 facts" in err and "Loading weights" not in err  # sftlens's bar, not the library's
    assert "store: " in out
    for i, argv in enumerate((["--quiet", *probe], [*probe, "--quiet"])):
        assert main([*argv, "--store", str(tmp_path / f"quiet{i}")]) == 0
        out, err = capfd.readouterr()
        assert not [mark for mark in BAR_MARKS if mark in err], err
        assert out.startswith(f"store: {tmp_path / f'quiet{i}'} (4 facts of this selection)")
    assert vars(std.tqdm)["__init__"] is init and hf_logging.is_progress_bar_enabled() == library_bars
    assert build_parser("probe").parse_args(probe).quiet is False


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
