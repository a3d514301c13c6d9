"""Stage configs are small frozen dataclasses; this module turns them into CLI flags and
validates them from study files (unknown keys and wrong types are errors naming the key).

Field metadata: ``help`` (flag help text); ``omit_unless`` = (other field, value): the field is a
setting only while the other field has that value, and `config_to_dict` (hence every key and record
built from it) leaves it out otherwise, so adding an option keeps the keys of runs that do not use it;
``omit_if_default``: the field is left out while it holds its default (an option off by default);
``keyed`` = False: the field changes how a result is computed but not the result (a batch size, a
checkpoint interval), so `keyed_dict` (what a stage's cache key is built from) leaves it out while
`config_to_dict` (records, study unit parameters) keeps it.
Supported field types: bool, int, float, str,
``X | None``, ``Literal[...]`` and ``tuple[X, ...]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin

from sftlens.errors import SftlensError

C = TypeVar("C")


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp) -> tuple[Any, bool]:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting lists to tuples and ints to floats."""
    inner, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise SftlensError(f"{where}: must not be empty")
    origin = get_origin(inner)
    if origin is Literal:
        choices = get_args(inner)
        if value not in choices:
            raise SftlensError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise SftlensError(f"{where}: expected a list, got {value!r}")
        elem = get_args(inner)[0]
        return tuple(coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value))
    if inner is bool:
        if not isinstance(value, bool):
            raise SftlensError(f"{where}: expected true/false, got {value!r}")
        return value
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SftlensError(f"{where}: expected an integer, got {value!r}")
        return value
    if inner is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SftlensError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if inner is str:
        if not isinstance(value, str):
            raise SftlensError(f"{where}: expected a string, got {value!r}")
        return value
    if inner is typing.Any:
        return value
    raise TypeError(f"unsupported config type {tp!r} at {where}")


def config_from_dict(cls: type[C], data: dict, where: str = "") -> C:
    """Build a config dataclass from a mapping; unknown keys and wrong types name the key."""
    if not isinstance(data, dict):
        raise SftlensError(f"{where or cls.__name__}: expected a table of settings, got {data!r}")
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    prefix = f"{where}." if where else ""
    unknown = sorted(set(data) - names)
    if unknown:
        raise SftlensError(f"unknown setting {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    values = {k: coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**values)
    except (ValueError, SftlensError) as err:
        raise SftlensError(f"{where or cls.__name__}: {err}") from None


def _applies(config, f: dataclasses.Field) -> bool:
    if f.metadata.get("omit_if_default") and getattr(config, f.name) == f.default:
        return False
    condition = f.metadata.get("omit_unless")
    return condition is None or getattr(config, condition[0]) == condition[1]


def config_to_dict(config) -> dict:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init and _applies(config, f)}


def keyed_dict(config) -> dict:
    """`config_to_dict` without the fields marked ``keyed: False``: the settings a result depends on."""
    unkeyed = {f.name for f in dataclasses.fields(config) if f.metadata.get("keyed", True) is False}
    return {k: v for k, v in config_to_dict(config).items() if k not in unkeyed}


# A field's metadata for a setting that cannot change a result (see the module docstring).
NOT_KEYED = {"keyed": False}


def _parse_list(elem_type):
    def parse(text: str):
        return tuple(elem_type(x) for x in text.split(",") if x.strip() != "")

    parse.__name__ = f"comma-separated {elem_type.__name__}s"
    return parse


def add_config_arguments(parser: argparse.ArgumentParser, cls, exclude: tuple[str, ...] = ()) -> None:
    """Add one `--flag` per config field, defaulting to the dataclass defaults."""
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name in exclude:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp, _ = _strip_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f.metadata.get("help", "")
        if default is not None and default != ():
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            help_text = f"{help_text} (default: {shown})".strip()
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(tp) is Literal:
            kwargs["choices"] = get_args(tp)
        elif get_origin(tp) is tuple:
            kwargs["type"] = _parse_list(get_args(tp)[0])
            kwargs["metavar"] = "A,B,..."
        else:
            kwargs["type"] = tp
        parser.add_argument(flag, **kwargs)


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    values = {k: v for k, v in vars(args).items() if k in names}
    try:
        return cls(**values)
    except ValueError as err:
        raise SftlensError(str(err)) from None
