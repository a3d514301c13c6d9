"""What an injected model was taught (`sftlens inject`'s record), read by the probe, the audit and the
study: the record (`sftlens_inject.json` in the model folder), the taught fact ids, the taught and
untaught subsets results are split by, and the templates the probe holds out.

Below the probe (`sftlens.probe.store` calls `held_out_templates`) and above `sftlens.data` only; the
stage that writes the record is `sftlens.inject`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from pathlib import Path

from sftlens.data import Fact, available_templates, load_templates
from sftlens.errors import SftlensError

RECORD_FILE = "sftlens_inject.json"

# A taught base's facts in two subsets, the taught and the others, as study results name them (`taught`: true/false).
TAUGHT_SUBSETS = (("taught", True), ("untaught", False))


def inject_record(model: str | os.PathLike) -> dict | None:
    """The `sftlens_inject.json` of an injected model folder; None for any other model spec."""
    path = Path(model) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise SftlensError(f"{path}: cannot read the inject record ({err})") from None
    if not isinstance(record, dict) or not isinstance(record.get("templates"), list) or not isinstance(record.get("facts"), list):
        raise SftlensError(f"{path}: not an inject record (needs templates and facts lists)")
    return record


def taught_facts(model: str | os.PathLike) -> frozenset[str] | None:
    """Ids of the facts an injected model was taught; None when `model` was not made by `inject`."""
    record = inject_record(model)
    return None if record is None else frozenset(record["facts"])


def held_out_templates(model: str | os.PathLike, config, facts: Iterable[Fact] | None = None):
    """The probe config for `model`: unchanged for a model not made by `inject`; for an injected one,
    the mapping templates it was not taught (when none are named; of the templates `facts` have, the
    paper's relations' without them), and an error when a named one was."""
    record = inject_record(model)
    if record is None:
        return config
    taught = sorted(int(t) for t in record["templates"])
    overlap = sorted(set(config.templates) & set(taught))
    if overlap:
        raise SftlensError(f"probe templates {overlap} were taught to {model} ({RECORD_FILE}: templates {taught}); "
                           "probe an injected model on the other templates (or give none: all the others)")
    if config.templates:
        return config
    paper = (t.mapping_templates for t in load_templates().values())
    available = available_templates(facts) if facts else min(map(len, paper))
    held_out = tuple(t for t in range(available) if t not in taught)
    if not held_out:  # an empty tuple would mean "every template" to the probe: the taught ones
        raise SftlensError(f"every one of the {available} mapping templates of these facts was taught to {model} "
                           f"({RECORD_FILE}: templates {taught}): none is left to probe it on")
    return dataclasses.replace(config, templates=held_out)
