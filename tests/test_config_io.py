import argparse
import json
import os
from dataclasses import dataclass, field
from typing import Literal

import pytest

from sftlens.config import (
    NOT_KEYED,
    add_config_arguments,
    config_from_args,
    config_from_dict,
    config_to_dict,
    keyed_dict,
)
from sftlens.errors import SftlensError
from sftlens.io import JsonlAppender, KeyedOutput, atomic_directory, atomic_write_json, read_jsonl, stable_hash


@dataclass(frozen=True)
class Demo:
    lr: float = 1e-5
    steps: int = 3
    mode: Literal["a", "b"] = "a"
    sizes: tuple[int, ...] = (1, 2)
    name: str | None = None
    flag: bool = False


@dataclass(frozen=True)
class WithOption:
    lr: float = 1e-5
    mode: Literal["plain", "extra"] = field(default="plain", metadata={"omit_unless": ("mode", "extra")})
    extra_size: int = field(default=4, metadata={"omit_unless": ("mode", "extra")})


def test_settings_of_an_unused_option_are_left_out_and_round_trip():
    assert config_to_dict(WithOption(extra_size=9)) == {"lr": 1e-5}
    used = WithOption(mode="extra", extra_size=9)
    assert config_to_dict(used) == {"lr": 1e-5, "mode": "extra", "extra_size": 9}
    assert config_from_dict(WithOption, config_to_dict(used)) == used
    assert config_from_dict(WithOption, config_to_dict(WithOption())) == WithOption()


def test_config_from_dict_checks_keys_and_types():
    assert config_from_dict(Demo, {"lr": 1, "sizes": [4, 5]}) == Demo(lr=1.0, sizes=(4, 5))
    with pytest.raises(SftlensError, match=r"unknown setting train\.lrr"):
        config_from_dict(Demo, {"lrr": 1}, "train")
    with pytest.raises(SftlensError, match=r"train\.steps: expected an integer, got '3'"):
        config_from_dict(Demo, {"steps": "3"}, "train")
    with pytest.raises(SftlensError, match=r"train\.sizes\[1\]"):
        config_from_dict(Demo, {"sizes": [1, "x"]}, "train")
    with pytest.raises(SftlensError, match=r"mode: 'c' is not one of"):
        config_from_dict(Demo, {"mode": "c"})


def test_cli_flags_follow_the_dataclass():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Demo)
    assert config_from_args(Demo, parser.parse_args([])) == Demo()
    got = config_from_args(Demo, parser.parse_args(["--lr", "0.5", "--sizes", "7,8", "--flag", "--mode", "b"]))
    assert got == Demo(lr=0.5, sizes=(7, 8), flag=True, mode="b")


def test_stable_hash_ignores_key_order():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError
    assert os.listdir(tmp_path) == []
    with atomic_directory(tmp_path / "out") as tmp:
        atomic_write_json(tmp / "a.json", {"x": 1})
    assert json.loads((tmp_path / "out" / "a.json").read_text()) == {"x": 1}
    assert os.listdir(tmp_path) == ["out"]


def test_keyed_folder_output_done_partial_publish(tmp_path):
    out = KeyedOutput(tmp_path / "run", "k1", "record.json", what="an sftlens test run")
    assert out.finished() is None and not out.done()
    work = out.partial()
    assert work == tmp_path / ".run.partial" and (work / "run_key").read_text() == "k1\n"
    (work / "checkpoint").write_text("half")
    assert out.partial() == work and (work / "checkpoint").is_file()  # the same key resumes
    said = []
    other = KeyedOutput(tmp_path / "run", "k2", "record.json")
    assert other.partial(say=said.append) == work and not (work / "checkpoint").exists()  # another key: cleared
    assert said == [f"discarding {work}: an interrupted run with other inputs"]
    staged = work / "model"
    staged.mkdir()
    atomic_write_json(staged / "record.json", {"key": "k2", "x": 1})
    assert other.publish(staged) == tmp_path / "run" and os.listdir(tmp_path) == ["run"]
    assert other.finished() == {"key": "k2", "x": 1} and other.done()
    with pytest.raises(SftlensError, match=r"run: holds another test run \(key k2\); choose another --out"):
        out.done()
    assert not KeyedOutput(tmp_path / "run", "k1", "record.json", stale="redo").done()  # a cache: redone
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / ".notes.k1.partial.jsonl").write_text("")  # a partial log is no foreign file
    assert KeyedOutput(foreign, "k1", "record.json").finished() is None
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(SftlensError, match=r"mine: holds files that are not an sftlens test run \(notes.txt\)"):
        KeyedOutput(foreign, "k1", "record.json", what="an sftlens test run").done()
    (tmp_path / "file").write_text("x")
    with pytest.raises(SftlensError, match="file: exists and is not a folder"):
        KeyedOutput(tmp_path / "file", "k1", "record.json").done()


def test_keyed_writing_replaces_a_stale_output_whole_or_leaves_nothing(tmp_path):
    out = KeyedOutput(tmp_path / "sets", "new", "manifest.json", stale="redo", key_field="inputs")
    (tmp_path / "sets").mkdir()
    atomic_write_json(tmp_path / "sets" / "manifest.json", {"inputs": "old"})
    (tmp_path / "sets" / "stale.jsonl").write_text("")
    with pytest.raises(RuntimeError):
        with out.writing() as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError
    assert sorted(os.listdir(tmp_path / "sets")) == ["manifest.json", "stale.jsonl"] and len(os.listdir(tmp_path)) == 1
    with out.writing() as tmp:
        atomic_write_json(tmp / "manifest.json", {"inputs": "new"})
    assert os.listdir(tmp_path / "sets") == ["manifest.json"] and out.finished() == {"inputs": "new"}


def test_keyed_json_output_and_its_partial_log(tmp_path):
    step = KeyedOutput(tmp_path / "steps" / "greedy.json", "aa11", stale="redo")
    assert step.finished() is None
    log = step.log()
    assert log == tmp_path / "steps" / ".greedy.aa11.partial.jsonl"
    log.parent.mkdir()
    (log.parent / ".greedy.bb22.partial.jsonl").write_text("")  # another key's log: removed
    (log.parent / ".greedy-base.bb22.partial.jsonl").write_text("")  # another file's: kept
    log.write_text("")
    assert step.log() == log and sorted(os.listdir(log.parent)) == [".greedy-base.bb22.partial.jsonl", log.name]
    assert step.write({"answers": 1}) == {"key": "aa11", "answers": 1}
    assert step.finished() == {"key": "aa11", "answers": 1}
    (tmp_path / "steps" / "greedy.json").write_text("{torn")
    assert step.finished() is None  # unreadable: redone


def test_keyed_dict_leaves_out_the_fields_marked_not_keyed():
    @dataclass(frozen=True)
    class Run:
        lr: float = 1e-5
        batch_size: int = field(default=8, metadata={"help": "x", **NOT_KEYED})

    assert config_to_dict(Run()) == {"lr": 1e-5, "batch_size": 8}
    assert keyed_dict(Run(batch_size=3)) == keyed_dict(Run()) == {"lr": 1e-5}


def test_jsonl_appender_drops_a_torn_tail(tmp_path):
    path = tmp_path / "log.jsonl"
    with JsonlAppender(path) as log:
        log.write({"i": 0})
    with open(path, "a") as f:
        f.write('{"i": 1')  # a writer killed mid-line
    assert read_jsonl(path) == [{"i": 0}]
    with JsonlAppender(path) as log:
        log.write({"i": 2})
    assert read_jsonl(path) == [{"i": 0}, {"i": 2}]
