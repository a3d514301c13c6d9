"""The dev choices a study's units make, and the report reads back: the restore ratio (control), a
repair method's value (repaired), the learning rate (tuned; the report's choice among LoRA's rates).

Each picks the candidate with the best mean in-domain dev Acc over the seeds of a (level, size), by the
rule the audit's repair choice uses too (`sftlens.reporting.choice.best_mean`; ties: the smaller rate or
ratio, or the least edit, `least_edit`). The engine applies them while it runs (`stages`); the report
(`sftlens.study.report.results`, `sections`, `findings`) reads the same rules here, so the dependency points
from the report to the engine only.
"""

from __future__ import annotations

from sftlens.evaluate import acc_of
from sftlens.reporting.choice import best_mean, least_edit


def acc(records: list[dict], domain: str, levels: list[int] | None = None) -> float | None:
    """Acc of one model (`sftlens.evaluate.acc_of`: over the levels with enough facts; every model of
    a study shares its test sets, so they average the same levels); None without records."""
    if not any(r["domain"] == domain for r in records):
        return None
    return acc_of(records, domain, levels)


def chosen_ratio(sweeps: list[list[dict]], domain: str = "in") -> float:
    """The restore ratio (> 0) with the best mean dev Acc over the seeds of one (level, size) (`sweeps`: each
    seed's sweep records); ties: the smaller. Ratio 0 is the un-restored baseline the gain is measured
    against, not a candidate."""
    by_ratio: dict[float, list[float]] = {}
    for records in sweeps:
        for ratio in {r["restore_ratio"] for r in records} - {0.0}:
            dev = [r for r in records if r["split"] == "dev" and r["restore_ratio"] == ratio]
            value = acc(dev, domain)
            if value is not None:
                by_ratio.setdefault(ratio, []).append(value)
    if not by_ratio:
        return 0.0
    return best_mean(by_ratio, lambda ratio: ratio)


VALUE_CHOICE = "best mean dev Acc (in-domain) over seeds; ties: the least edit"  # in words, part of unit keys


def chosen_value(sweeps: list[list[dict]], neutral: float, domain: str = "in") -> float:
    """The repair value with the best mean dev Acc over the seeds of one (level, size) (`sweeps`: each seed's
    dev records); ties: the one closest to the method's neutral value (the least edit)."""
    by_value: dict[float, list[float]] = {}
    for records in sweeps:
        for value in {r["repair_value"] for r in records}:
            score = acc([r for r in records if r["repair_value"] == value], domain)
            if score is not None:
                by_value.setdefault(value, []).append(score)
    if not by_value:
        raise ValueError("no dev evaluation to choose a repair value from")
    return best_mean(by_value, least_edit(neutral))  # values lie on one side of neutral: the nearest


def rate_dev_curve(candidates: dict[float, list[list[dict]]]) -> dict[float, list[float]]:
    """{learning rate: in-domain dev Acc of each seed} (`candidates`: rate -> each seed's records): what the
    rate's choice sees."""
    return {rate: [score for records in seeds
                   if (score := acc([r for r in records if r["split"] == "dev"], "in")) is not None]
            for rate, seeds in sorted(candidates.items())}


def chosen_rate(candidates: dict[float, list[list[dict]]]) -> float | None:
    """The learning rate with the best mean in-domain dev Acc over seeds (ties: the smaller); None
    without dev scores. The one rule for LoRA's rate and for the tuned arm's."""
    curve = {rate: scores for rate, scores in rate_dev_curve(candidates).items() if scores}
    return best_mean(curve, lambda rate: rate) if curve else None


def chosen_guard_value(candidates: dict[float, list[list[dict]]], neutral: float) -> float:
    """A guard's value with the best mean in-domain dev Acc over its candidates' seeds (value -> each seed's
    scored records, dev among them), ties: the value nearest the guard's neutral one (the least guarding), as a repair's value."""
    curve = {value: scores for value, scores in rate_dev_curve(candidates).items() if scores}
    if not curve:
        raise ValueError("no in-domain dev evaluation to choose a guard value from")
    return best_mean(curve, least_edit(neutral))
