"""Beyond the paper, for a study on a taught base (`[inject]`): what was taught, the mastery levels the
probe found among taught and untaught facts, and the paper's accuracy tables over plain and restored
models (Figure 2, Tables 2, 4 and 5) again over the facts the base was taught and over the others (each
level's facts of the two add up to the whole table's), and the repair methods scored on the taught
test facts: of those the plain fine-tune forgot (right on the base, wrong after SFT), the share each
repaired model answers right again, and of those it learned, the share kept. Those counts come from the
units' correctness strings and the study's own files (the split's test files give the facts' order,
the inject unit's record the taught ids). The Findings test C1, C4 and C6 again on the taught test facts
alone (`taught_claims`): on a taught base the harm sits there, and over all facts the many untaught ones can
hide it. The other bootstrapped sections (the restoration choice, Table 6, the repair-methods comparison) are
reported on all facts only."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from sftlens.analysis.kl import KL_FILE
from sftlens.probe import LEVELS
from sftlens.reporting.page import Section
from sftlens.study.engine.outcomes import InjectOutcome
from sftlens.study.engine.scheduler import unit_folder
from sftlens.study.report.findings import Claims, Finding
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
    parts = [_overview(results, results.outcome(injected[0]))]
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
    plain = {u["spec"]["deps"].get("model"): test_correct(results.outcome(u).test_bits, order)
             for u in results.done("eval")}
    base = plain.pop(None)
    groups: dict[tuple, list[int]] = {}
    for unit in repaired:
        repair = results.outcome(unit)
        sft, fixed = plain[unit["spec"]["deps"]["model"]], test_correct(repair.test_bits, order)
        tags = results.model_tags(unit)
        counts = groups.setdefault((repair.method, tags["train_level"], tags["size"]), [0] * 5)
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


def _overview(results: StudyResults, injected: InjectOutcome) -> Section:
    text = (f"The base model was taught {injected.taught} of the study's {injected.candidates} facts in "
            f"statement form ({injected.statements} statements in mapping templates {injected.templates}, "
            f"{injected.steps} steps, final loss {injected.train_loss:.4f}) before probing; the probe used "
            "only the other templates. Below, Figure 2 and Tables 2, 4 and 5 again over the taught facts and over the "
            "others.")
    probe = results.done("probe")
    by_subset = (results.outcome(probe[0]).level_counts_taught or {}) if probe else {}
    header = ["facts", "set", *(f"level {i}" for i in LEVELS), "total"]
    rows = [[name, r["set"], *(str(r[f"level{i}"]) for i in LEVELS), str(r["total"])]
            for name, _ in TAUGHT_SUBSETS for r in by_subset.get(name, [])]
    return Section("Taught and untaught facts", text,
                   [("facts per mastery level of the taught base", header, rows)] if rows else [])


# The claims about harm and its repair, which a taught base makes testable on the facts it was taught.
TAUGHT_CLAIMS = ("C1", "C4", "C6")


def taught_claims(results: StudyResults, study_dir: Path, samples: int) -> list[Finding]:
    """C1, C4 and C6 on the taught test facts alone (comparisons named "taught facts: ..."); none without [inject]."""
    view = taught_view(results, study_dir)
    if view is None:
        return []
    found = Claims(view, samples)
    return [dataclasses.replace(f, comparison=f"taught facts: {f.comparison}")
            for f in (*found.c1_more_data(), *found.c4_kl(), *found.c6_restoration())]


def taught_view(results: StudyResults, study_dir: Path) -> StudyResults | None:
    """The study as if its test sets held only the taught facts: each eval, restore and control unit's test
    correctness strings and test records cut to them (dev records kept: the ratios were chosen on all dev facts;
    training-set strings dropped), each KL the mean over the taught facts of its per-fact file."""
    injected = results.done("inject")
    if not injected or not results.done("split"):
        return None
    taught = taught_facts(unit_folder(study_dir, "inject", injected[0]["key"]) / "model")
    keep = {where: [f in taught for f in ids] for where, ids in test_order(results, study_dir).items()}

    def cut(bits: dict) -> dict:
        return {d: {lv: "".join(b for b, k in zip(s, keep[d, lv]) if k) for lv, s in levels.items()}
                for d, levels in bits.items()}

    def records(outcome) -> list[dict]:
        mine = [{k: v for k, v in r.items() if k != "taught"} for r in outcome.taught_records or []
                if r["taught"] and r["split"] == "test"]
        return mine + [r for r in outcome.records if r["split"] == "dev"]

    units = []
    for unit in results.units:
        kind = unit["kind"]
        if unit["state"] != "done" or kind not in ("eval", "restore", "control", "kl"):
            units.append(unit)
            continue
        outcome = results.outcome(unit)
        if kind == "eval":
            outcome = dataclasses.replace(outcome, records=records(outcome), test_bits=cut(outcome.test_bits), train_bits={})
        elif kind == "restore":
            outcome = dataclasses.replace(outcome, records=records(outcome), train_bits={},
                                          test_bits={r: cut(b) for r, b in outcome.test_bits.items()})
        elif kind == "control":
            outcome = dataclasses.replace(outcome, test_bits=cut(outcome.test_bits), train_bits={})
        else:
            per_fact = json.loads((unit_folder(study_dir, "kl", unit["key"]) / KL_FILE).read_text())["facts"]
            kls = [f["kl"] for f in per_fact if f["fact_id"] in taught]
            outcome = dataclasses.replace(outcome, kl={**outcome.kl, "mean": sum(kls) / len(kls) if kls else 0.0,
                                                       "n": len(kls)})
        units.append({**unit, "result": dataclasses.asdict(outcome)})
    return dataclasses.replace(results, units=units)

