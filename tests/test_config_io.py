import argparse
import json
import os
from dataclasses import dataclass, field
from typing import Literal

import pytest

from sftlens.config import add_config_arguments, config_from_args, config_from_dict, config_to_dict
from sftlens.errors import SftlensError
from sftlens.io import JsonlAppender, atomic_directory, atomic_write_json, read_jsonl, stable_hash


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
