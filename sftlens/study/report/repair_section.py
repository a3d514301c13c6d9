"""The report's "Repair methods" section: every repair of the study's `[repairs]` at the value its
dev sweeps chose, against plain SFT, on test (both domains) and on each model's own training set.

Kept apart from the paper's sections (`sftlens.study.report.sections`): it reads the `repair` and
`repaired` units, and plain SFT from the restoration sweep's ratio 0 (the fine-tuned model as it is,
scored on test, dev and its training set), so it adds no evaluation of its own.
"""

from __future__ import annotations

from pathlib import Path

from sftlens.evaluate import acc_levels
from sftlens.reporting.bootstrap import FactDraws, SeedDraws, arm_difference, verdict
from sftlens.reporting.figures import plot_bands
from sftlens.reporting.page import Section, interval_text
from sftlens.study.engine.choice import acc, rate_dev_curve
from sftlens.study.engine.outcomes import EvalOutcome
from sftlens.study.report.findings import fine_tuned
from sftlens.study.report.results import (
    Seeded,
    StudyResults,
    arm_view,
    chosen_models,
    level_name,
    mean_spread,
    rate_candidates,
    records_by_rate,
    repair_dev_curves,
    repair_groups,
    sweep_groups,
    tuned_rates,
)
from sftlens.study.report.sections import DOMAINS, acc_caption, mean_sd_text
from sftlens.weights import METHODS

LORA_TEXT = ("LoRA SFT: not a repair of the fully fine-tuned model but the other recipe, [train]'s LoRA adapters "
             "trained on the same training set and seed and merged, its learning rate chosen on dev among as many "
             "candidates (ties: the smaller rate). ")
FIXED_RATE_TEXT = ("Full SFT keeps [train]'s one rate (not tuned): part of a gap between LoRA and full SFT can be "
                   "LoRA's tuning. ")
TUNED_RATE_TEXT = ("Plain SFT is full SFT at its own dev-chosen rate (study.learning_rates, as many candidates, the "
                   "same rule), so LoRA and full SFT are compared each at its own tuned rate, and every repair "
                   "edits the tuned models; the row at [train]'s rate is full SFT untuned (the paper's recipe), its "
                   "gains against the tuned plain SFT (test only: it is not scored on its training set). ")


def _scope(split: str, level, size, seed) -> str:
    # test facts are shared by every model; a training set is each model's own
    return "test" if split == "test" else f"train-{level}-{size}-{seed}"


class _Group:
    """Plain SFT of one (train level, size): its seeds' bits and records, from the restore sweeps."""

    def __init__(self, level, size, sweeps: list[Seeded]):
        self.level, self.size = level, size
        self.by_seed = {s.seed: s.outcome for s in sweeps}

    def records(self, seed, split: str) -> list[dict]:
        return [r for r in self.by_seed[seed].records if r["split"] == split and r["restore_ratio"] == 0.0]

    def bits(self, seed, split: str) -> dict:
        return getattr(self.by_seed[seed], f"{split}_bits")["0"]

    def arm(self, seeds: list, split: str, bits_of) -> list[dict]:
        return [{"bits": bits_of(seed), "scope": _scope(split, self.level, self.size, seed)} for seed in seeds]


def _cells(per_seed_records: list[list[dict]]) -> list[str]:
    """Acc in-domain, Acc out-of-domain (test), training-set accuracy: mean ± sd over seeds."""
    test = [[r for r in rs if r["split"] == "test"] for rs in per_seed_records]
    train = [[r for r in rs if r["split"] == "train"] for rs in per_seed_records]
    return [*(mean_sd_text(*mean_spread([acc(rs, d) for rs in test if acc(rs, d) is not None])) for d, _ in DOMAINS),
            mean_sd_text(*mean_spread([acc(rs, "in") for rs in train if acc(rs, "in") is not None]))]


def _gains(group: _Group, repaired: list[Seeded], facts: FactDraws, seeds: SeedDraws, arm: str) -> list[str]:
    """Repaired minus plain SFT, paired over facts and seeds: in-domain, out-of-domain, training set (the seeds'
    draws keyed by the arm and the cell)."""
    mine = [r for r in repaired if r.seed in group.by_seed]
    if not mine:
        return ["–"] * 3
    cells = []
    for split, domain in (("test", "in"), ("test", "out"), ("train", "in")):
        levels = acc_levels(group.records(mine[0].seed, split), domain)
        if not levels or not getattr(mine[0].outcome, f"{split}_bits"):
            cells.append("–")
            continue
        by_seed = {r.seed: r.outcome for r in mine}
        after = group.arm(list(by_seed), split,
                          lambda seed, by_seed=by_seed, split=split: getattr(by_seed[seed], f"{split}_bits"))
        before = group.arm(list(by_seed), split, lambda seed, split=split: group.bits(seed, split))
        gain = arm_difference(facts, seeds, after, before, domain, levels, paired_seeds=True,
                              key=[group.level, group.size, arm, split, domain])
        cells.append(interval_text(gain) + (f" {verdict(gain.low, gain.high, +1)}" if (split, domain) == ("test", "in") else ""))
    return cells


def _value_text(method: str, values: list[float]) -> str:
    knob = METHODS[method].knob
    chosen = sorted(set(values))
    unit = " %" if method in ("restore", "trim") else ""
    return f"{knob} = " + " / ".join(f"{v:g}{unit}" for v in chosen)


def _figure(results: StudyResults, groups: dict, path: Path) -> Path | None:
    """Dev Acc against each method's knob (mean ± sd over seeds), one panel per method; the point at
    the neutral value is plain SFT (the restoration sweep's ratio 0), shown, not a candidate."""
    curves = repair_dev_curves(results)
    panels = []
    for method in dict.fromkeys(m for m, _, _ in curves):
        neutral = METHODS[method].neutral
        lines = {}
        for (m, level, size), by_value in curves.items():
            if m != method:
                continue
            plain = groups.get((level, size))
            points = dict(by_value)
            if plain is not None:
                points.setdefault(neutral, [acc(plain.records(seed, "dev"), "in") for seed in plain.by_seed])
            lines[f"{level_name(level)}, n={size}"] = _band(points)
        panels.append((f"{method} ({METHODS[method].knob}; neutral {neutral:g})", lines))
    for kind, title in (("tune-eval", "full SFT (learning rate)"), ("lora-eval", "LoRA SFT (learning rate)")):
        lines = {f"{level_name(level)}, n={size}": _band(rate_dev_curve(records_by_rate(candidates)))
                 for (level, size), candidates in rate_candidates(results, kind).items()}
        if lines:
            panels.append((title, lines))
    if not panels:
        return None
    return plot_bands(path, panels, "in-domain dev Acc (%)", "the method's value", None)


def _band(points: dict[float, list]) -> list[tuple]:
    """(value, mean, mean - sd, mean + sd) over seeds at each value."""
    return [(value, mean, mean - sd, mean + sd) for value, scores in sorted(points.items())
            for mean, sd, _ in [mean_spread([s for s in scores if s is not None])]]


def _lora_name(models: list[Seeded]) -> str:
    recipe = models[0].recipe
    return f"LoRA SFT (r={recipe['lora_rank']}, alpha={recipe['lora_alpha']})"


def _rate_text(rates: list[float], candidates: list[float] | None) -> str:
    """The learning rate(s) an arm trained at, and whether they were tuned and among which values."""
    chosen = " / ".join(f"{r:g}" for r in sorted(set(rates)))
    if not candidates:
        return f"lr = {chosen} (fixed: [train]'s, not tuned)"
    return f"lr = {chosen} (tuned on dev among {' / '.join(f'{r:g}' for r in candidates)})"


def _fixed_rate_models(results: StudyResults, level, size) -> list[Seeded]:
    """Full SFT at [train]'s own rate on one (level, size): its seeds' test records and bits."""
    models = [m for m in fine_tuned(arm_view(results, "fixed")) if (m["train_level"], m["size"]) == (level, size)]
    return [Seeded(m["seed"], EvalOutcome(records=m["records"], test_bits=m["bits"]))
            for m in sorted(models, key=lambda m: m["seed"])]


def repair_methods(results: StudyResults, path: Path, samples: int) -> Section | None:
    """The comparison table and figure; None when the study compares no repair methods."""
    repaired, lora = repair_groups(results), rate_candidates(results, "lora-eval")
    if not repaired and not lora:
        return None
    groups = {key: _Group(*key, sweeps) for key, sweeps in sweep_groups(results).items()}
    if not groups:  # plain SFT's scores on test, dev and its training set come from the restoration sweep's ratio 0
        return Section("Repair methods", "Not shown: this study has no restoration sweep (study.restore_ratios is "
                       "empty), which this table reads plain SFT's scores from. With [guards], \"Prevention and "
                       "cure\" compares every repair with plain SFT on the same facts.")
    facts, seeds = FactDraws(max(samples, 1), 2), SeedDraws(max(samples, 1), 3)
    study, fixed_rate = results.config.get("study", {}), results.config.get("train", {}).get("learning_rate")
    tuned, tuned_candidates = tuned_rates(results), study.get("learning_rates") or []
    budgets = ({len(values) for values in _budget(results).values()} | {len(rates) for rates in lora.values()}
               | ({len(tuned_candidates)} if tuned_candidates else set()))
    rows, captions = [], []
    for (level, size), group in groups.items():
        methods = [(m, rs) for (m, lv, sz), rs in repaired.items() if (lv, sz) == (level, size)]
        lora_models = chosen_models(lora.get((level, size), {}))
        if not methods and not lora_models:
            continue
        name = f"{level_name(level)}, n={size}"
        seeds_present = sorted(group.by_seed)
        plain_rates = list(tuned.get((level, size), {}).values()) or [fixed_rate]
        rows.append([name, "plain SFT", _rate_text(plain_rates, tuned_candidates), str(len(seeds_present)),
                     *_cells([group.records(s, "test") + group.records(s, "train") for s in seeds_present]),
                     "–", "–", "–"])
        untuned = _fixed_rate_models(results, level, size) if tuned_candidates else []
        if untuned:
            rows.append([name, "plain SFT at [train]'s rate", _rate_text([fixed_rate], None), str(len(untuned)),
                         *_cells([m.outcome.records for m in untuned]), *_gains(group, untuned, facts, seeds, "untuned")])
        for method, reps in methods:
            rows.append([name, method, _value_text(method, [r.outcome.value for r in reps]), str(len(reps)),
                         *_cells([r.outcome.records for r in reps]), *_gains(group, reps, facts, seeds, method)])
        if lora_models:
            rate = _rate_text([lora_models[0].value], sorted(lora[(level, size)]))
            rows.append([name, _lora_name(lora_models), rate, str(len(lora_models)),
                         *_cells([m.outcome.records for m in lora_models]),
                         *_gains(group, lora_models, facts, seeds, "lora")])
        first = seeds_present[0]
        captions.append(f"{name}: in-domain test {acc_caption(group.records(first, 'test'), 'in')}; out-of-domain "
                        f"{acc_caption(group.records(first, 'test'), 'out')}; training set "
                        f"{acc_caption(group.records(first, 'train'), 'in').replace('levels', 'level')}")
    budget = " / ".join(str(b) for b in sorted(budgets)) or "?"
    text = (f"Each method chose its value among the same number of candidates ({budget} per model, each scored on the "
            "in-domain dev facts: the same tuning budget), by the best mean dev Acc over seeds (ties: the least edit), "
            "and is reported on test and on each model's own training set. Cells: mean ± sd over seeds; gains: "
            "repaired minus plain SFT in Acc points with a 95 % bootstrap interval, paired over facts and seeds; the "
            "in-domain gain carries the Findings' verdict rule (holds: the whole interval above 0). "
            "wise: WiSE-FT, base + alpha (ft - base); dare: drop each update element with probability p, rescale "
            "the rest by 1/(1-p); trim: TIES' trim, keep the top d % of |ft - base| per tensor (TIES' sign election "
            "is a no-op for one model); restore: the paper's, the top ratio % of relative change set back to base. "
            + (SPECTRAL_TEXT if "spectral" in _budget(results) else "") + (LORA_TEXT if lora else "")
            + (TUNED_RATE_TEXT if tuned_candidates else FIXED_RATE_TEXT if lora else "") +
            "Figure: dev Acc against each method's value (band: ± sd over seeds); the point at the neutral value is "
            "plain SFT, not a candidate. " + " ".join(captions))
    header = ["train set", "method", "chosen on dev", "seeds", "Acc in-domain", "Acc out-of-domain", "train-set Acc",
              "gain in-domain [95 % CI]", "gain out-of-domain [95 % CI]", "gain train set [95 % CI]"]
    return Section("Repair methods", text, [("", header, rows)], _figure(results, groups, path))


SPECTRAL_TEXT = ("spectral: per weight matrix, keep the singular directions of ft - base above c times the "
                 "Gavish-Donoho threshold (c = 1: the threshold itself; c = 0: plain SFT). ")


def _budget(results: StudyResults) -> dict[str, list[float]]:
    """Each method's candidate values, from the study's configuration."""
    return {m: table["values"] for m, table in results.config.get("repairs", {}).items()}
