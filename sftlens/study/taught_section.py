"""Beyond the paper, for a study on a taught base (`[inject]`): what was taught, the mastery levels the
probe found among taught and untaught facts, and the paper's accuracy tables over plain and restored
models (Figure 2, Tables 2, 4 and 5) again over the facts the base was taught and over the others (each
level's facts of the two add up to the whole table's). The bootstrapped sections (Findings, the
restoration choice, Table 6, repair methods) are reported on all facts only."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sftlens.study.results import TAUGHT_SUBSETS, StudyResults, taught_records, taught_restore_records
from sftlens.study.sections import LEVELS, Section, figure2, table2, table4, table5


def taught_sections(results: StudyResults, out: Path, size) -> list[Section]:
    """The sections of a taught base; none for a study without `[inject]`."""
    injected = results.done("inject")
    if not injected:
        return []
    parts = [_overview(results, injected[0]["result"])]
    for name, flag in TAUGHT_SUBSETS:
        records, sweeps = taught_records(results, flag), taught_restore_records(results, flag)
        subset = [figure2(records, out / f"figure2-{name}.png"), table2(records, size)] if records else []
        subset += [table4(sweeps), table5(sweeps)] if sweeps else []
        parts += [dataclasses.replace(section, title=f"{section.title} ({name} facts)") for section in subset]
    return parts


def _overview(results: StudyResults, injected: dict) -> Section:
    text = (f"The base model was taught {injected['taught']} of the study's {injected['candidates']} facts in "
            f"statement form ({injected['statements']} statements in mapping templates {injected['templates']}, "
            f"{injected['steps']} steps, final loss {injected['train_loss']:.4f}) before probing; the probe used "
            "only the other templates. Below, Figure 2 and Tables 2, 4 and 5 again over the taught facts and over the "
            "others.")
    probe = results.done("probe")
    by_subset = probe[0]["result"].get("level_counts_taught", {}) if probe else {}
    header = ["facts", "set", *(f"level {i}" for i in LEVELS), "total"]
    rows = [[name, r["set"], *(str(r[f"level{i}"]) for i in LEVELS), str(r["total"])]
            for name, _ in TAUGHT_SUBSETS for r in by_subset.get(name, [])]
    return Section("Taught and untaught facts", text,
                   [("facts per mastery level of the taught base", header, rows)] if rows else [])
