"""Beyond the paper, for a study on a taught base (`[inject]`): what was taught, the mastery levels the
probe found among taught and untaught facts, and the paper's accuracy tables over plain and restored
models (Figure 2, Tables 2, 4 and 5) again over the facts the base was taught and over the others (each
level's facts of the two add up to the whole table's), and the repair methods scored on the taught
test facts: of those the plain fine-tune forgot (right on the base, wrong after SFT), the share each
repaired model answers right again, and of those it learned, the share kept. Those counts come from the
units' correctness strings and the study's own files (the split's test files give the facts' order,
the inject unit's record the taught ids). The bootstrapped sections (Findings, the restoration choice,
Table 6, the repair-methods comparison) are reported on all facts only."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sftlens.probe import LEVELS
from sftlens.reporting.page import Section
from sftlens.study.engine.scheduler import unit_folder
from sftlens.study.report.results import (
    StudyResults,
    taught_records,
    taught_restore_records,
    test_correct,
    test_order,
)
from sftlens.study.report.sections import figure2, table2, table4, table5
from sftlens.taught import TAUGHT_SUBSETS, taught_facts


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
    repaired = results.done("repaired")
    if repaired:
        parts.append(_repairs_on_taught_facts(results, out.parent, injected[0], repaired))
    return parts


def _repairs_on_taught_facts(results: StudyResults, study_dir: Path, injected: dict, repaired: list[dict]) -> Section:
    taught = taught_facts(unit_folder(study_dir, injected["kind"], injected["key"]) / "model")
    order = test_order(results, study_dir)
    plain = {u["spec"]["deps"].get("model"): test_correct(u["result"]["test_bits"], order)
             for u in results.done("eval")}
    base = plain.pop(None)
    groups: dict[tuple, list[int]] = {}
    for unit in repaired:
        sft, fixed = plain[unit["spec"]["deps"]["model"]], test_correct(unit["result"]["test_bits"], order)
        tags = results.model_tags(unit)
        counts = groups.setdefault((unit["result"]["method"], tags["train_level"], tags["size"]), [0] * 5)
        for fact in taught & fixed.keys():
            forgotten, learned = base[fact] and not sft[fact], sft[fact] and not base[fact]
            counts[0] += base[fact]
            counts[1] += forgotten
            counts[2] += forgotten and fixed[fact]
            counts[3] += learned
            counts[4] += learned and fixed[fact]
    header = ["method", "train set", "size", "taught facts right on the base", "forgotten by SFT",
              "recovered (% of forgotten)", "learned by SFT", "kept (% of learned)"]
    rows = [[method, f"level {level}" if isinstance(level, int) else str(level), str(size), str(right),
             str(forgotten), _share(recovered, forgotten), str(learned), _share(kept, learned)]
            for (method, level, size), (right, forgotten, recovered, learned, kept) in sorted(groups.items(), key=str)]
    text = ("Each repair at its dev-chosen value, scored on the taught test facts (both domains), counts summed over "
            "seeds: a taught fact is forgotten when the base answered it right and the plain fine-tune does not, "
            "learned when the reverse; recovered and kept: the repaired model answers it right.")
    return Section("Repairs on the taught facts", text, [("", header, rows)])


def _share(part: int, whole: int) -> str:
    return f"{part} ({100 * part / whole:.0f} %)" if whole else str(part)


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
