"""The paper's claims, tested on one finished study: each claim's effect, a 95 % interval, n and
a verdict from a rule fixed before any run (`sftlens.reporting.bootstrap.verdict`).

Intervals are percentile bootstraps (`sftlens.reporting.bootstrap`). Test facts are resampled within each
(domain, test level), with the same draw for every model, since all models of a study answer the same test facts (comparisons are
paired over facts). Seeds are resampled with replacement within each arm, jointly where both arms are
the same models (a model before and after restoration), independently otherwise (other sizes, levels).

The rule (`sftlens.reporting.bootstrap.verdict`): "holds" when the whole interval lies on the side the paper predicts, "reversed"
when it lies wholly on the other side, "inconclusive" when it contains 0 (or the claim's threshold),
and "not tested: <why>" when the study has no data for the claim, or only cells with fewer than
`MIN_N` facts, which never decide anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sftlens.evaluate import MIN_N
from sftlens.reporting.bootstrap import Estimate, FactDraws, SeedDraws, arm_difference, estimate, verdict
from sftlens.study.engine.choice import chosen_ratio
from sftlens.study.report.results import (
    ARMS,
    StudyResults,
    arm_view,
    arms,
    controls_of,
    level_n,
    level_name,
    size_sort_key,
    sweep_groups,
    train_levels,
)

# C5: the update counts as concentrated when the top 1 % of elements holds at least this share of
# the total change (ten times the 1 % a uniform change would give).
CONCENTRATED_SHARE = 0.10
NOT_TESTED = "not tested"


@dataclass(frozen=True)
class Finding:
    claim: str  # C1 ... C6
    comparison: str  # what is compared, in the reader's terms
    effect: Estimate | None
    n: str  # the facts, seeds or models behind the effect
    verdict: str
    unit: str = "pts"  # pts (accuracy points), KL, r, % (share)


def not_tested(claim: str, comparison: str, why: str, unit: str = "pts") -> Finding:
    return Finding(claim, comparison, None, "–", f"{NOT_TESTED}: {why}", unit)


# --- the study's models ------------------------------------------------------------------------


def decisive_levels(records: list[dict], domain: str) -> list[int]:
    """Test levels with at least MIN_N facts: the only ones a verdict may use."""
    return sorted(level for level, n in level_n(records, domain).items() if n >= MIN_N)


def describe_levels(records: list[dict], domain: str, levels: list[int]) -> str:
    sizes = level_n(records, domain)
    return ", ".join(f"level {lv}: {sizes[lv]}" for lv in levels) + " test facts"


def fine_tuned(results: StudyResults) -> list[dict]:
    """Each evaluated fine-tuned model: tags, test records and bits, training examples."""
    train = {u["key"]: results.outcome(u) for kind in ARMS for u in results.done(kind)}  # either arm's models
    out = []
    for unit in results.done("eval"):
        tags, evaluated = results.model_tags(unit), results.outcome(unit)
        if tags["train_level"] == "base" or not evaluated.test_bits:
            continue
        records = [r for r in evaluated.records if r["split"] == "test"]
        model = train.get(unit["spec"]["deps"]["model"])
        out.append({**tags, "records": records, "bits": evaluated.test_bits,
                    "examples": model.examples if model else None})
    return out


def _group(models: list[dict], level, size) -> list[dict]:
    return sorted((m for m in models if m["train_level"] == level and m["size"] == size), key=lambda m: m["seed"])


def _short_examples(group: list[dict], size) -> list[int]:
    """The training-set sizes of `group` that fall short of the requested `size` (a level with fewer facts)."""
    return sorted({m["examples"] for m in group if isinstance(size, int) and m["examples"] is not None
                   and m["examples"] < size})


def _size_text(group: list[dict], size) -> str:
    short = _short_examples(group, size)
    return f"n={size} (short: {'/'.join(map(str, short))} facts)" if short else f"n={size}"


def reference_size(sizes: list, largest) -> object | None:
    """The size C1 and C4 compare the largest with: the paper's 240, or the nearest size below the largest."""
    smaller = [s for s in sizes if s != largest and isinstance(s, int)]
    return min(smaller, key=lambda s: (abs(s - 240), s)) if smaller else None


# --- the claims ------------------------------------------------------------------------------------


class Claims:
    """Computes every finding of one study; `facts` and `seeds` are the shared bootstrap draws."""

    def __init__(self, results: StudyResults, samples: int = 1000, seed: int = 0):
        self.results = results
        self.models = fine_tuned(results)
        self.samples = max(samples, 1)
        self.facts = FactDraws(self.samples, seed)
        self.seeds = SeedDraws(self.samples, seed + 1)
        self.records = self.models[0]["records"] if self.models else []
        self.levels = decisive_levels(self.records, "in")

    def sizes(self, level) -> list:
        return sorted({m["size"] for m in self.models if m["train_level"] == level}, key=size_sort_key)

    def acc_gap(self, a: list[dict], b: list[dict], key: str, paired: bool = False) -> Estimate:
        return arm_difference(self.facts, self.seeds, a, b, "in", self.levels, paired, key=key)

    def n_text(self, *arms: list[dict]) -> str:
        seeds = " vs ".join(str(len(arm)) for arm in arms)
        return f"{describe_levels(self.records, 'in', self.levels)}; seeds {seeds}"

    def no_levels(self) -> str | None:
        if not self.models:
            return "no fine-tuned model was evaluated"
        if not self.levels:
            return f"no in-domain test level has {MIN_N} facts"
        return None

    def c1_more_data(self) -> list[Finding]:
        """C1: Acc(largest size) - Acc(240 or the nearest size), per training level; the paper: < 0."""
        why = self.no_levels()
        if why:
            return [not_tested("C1", "Acc(largest size) - Acc(240)", why)]
        out = []
        for level in train_levels(self.models):
            sizes = self.sizes(level)
            largest = sizes[-1]
            ref = reference_size(sizes, largest)
            if ref is None:
                out.append(not_tested("C1", f"{level_name(level)}: Acc(n={largest}) - Acc(a smaller n)",
                                      "one training size only"))
                continue
            big, small = _group(self.models, level, largest), _group(self.models, level, ref)
            label = f"{level_name(level)}: Acc({_size_text(big, largest)}) - Acc(n={ref})"
            effect = self.acc_gap(big, small, f"C1 {label}")
            out.append(Finding("C1", label, effect, self.n_text(big, small), verdict(effect.low, effect.high, -1)))
        return out

    def c2_training_level(self) -> list[Finding]:
        """C2: best minus worst training level (0-4) at one size, among sets not short of it; the paper: > 0."""
        why = self.no_levels()
        if why:
            return [not_tested("C2", "best - worst training level", why)]
        out = []
        levels = [lv for lv in train_levels(self.models) if isinstance(lv, int)]
        for size in sorted({m["size"] for m in self.models}, key=size_sort_key):
            groups = {lv: _group(self.models, lv, size) for lv in levels}
            full = {lv: g for lv, g in groups.items() if g and not bool(_short_examples(g, size))}
            if len(full) < 2:
                short = [lv for lv, g in groups.items() if g and bool(_short_examples(g, size))]
                reason = f"sets short of {size} facts: levels {short}" if short else "fewer than 2 training levels"
                out.append(not_tested("C2", f"n={size}: best - worst training level", reason))
                continue
            mean_acc = {lv: np.mean([self.facts.acc(m["bits"], "in", self.levels)[0] for m in g]) for lv, g in full.items()}
            best, worst = max(mean_acc, key=mean_acc.get), min(mean_acc, key=mean_acc.get)
            label = f"n={size}: Acc({level_name(best)}) - Acc({level_name(worst)}) (best - worst)"
            effect = self.acc_gap(full[best], full[worst], f"C2 {label}")
            out.append(Finding("C2", label, effect, self.n_text(full[best], full[worst]),
                               verdict(effect.low, effect.high, +1)))
        return out

    def c3_subsets_vary(self) -> list[Finding]:
        """C3: at the largest size, best minus worst same-size model (seeds of one level, then all
        levels and seeds), paired over facts; the paper: > 0 (subsets differ beyond fact noise)."""
        why = self.no_levels()
        if why:
            return [not_tested("C3", "best - worst subset of one size", why)]
        size = max((m["size"] for m in self.models), key=size_sort_key)
        at_size = [m for m in self.models if m["size"] == size]
        groups = [(f"{level_name(lv)}, {_size_text(_group(at_size, lv, size), size)}: best - worst seed",
                   _group(at_size, lv, size)) for lv in train_levels(at_size)]
        groups.append((f"{_size_text(at_size, size)}: best - worst of all levels and seeds", at_size))
        out = []
        for label, group in groups:
            if len(group) < 2:
                out.append(not_tested("C3", label, "fewer than 2 models"))
                continue
            ranked = sorted(group, key=lambda m: self.facts.acc(m["bits"], "in", self.levels)[0])
            best, worst = ranked[-1], ranked[0]
            effect = arm_difference(self.facts, self.seeds, [best], [worst], "in", self.levels, paired_seeds=True,
                                    key=f"C3 {label}")
            tags = f" ({level_name(best['train_level'])} seed {best['seed']} vs {level_name(worst['train_level'])} seed {worst['seed']})"
            out.append(Finding("C3", label + tags, effect, f"{describe_levels(self.records, 'in', self.levels)}; "
                               f"{len(group)} models", verdict(effect.low, effect.high, +1)))
        return out

    def c4_kl(self) -> list[Finding]:
        """C4: KL(largest) - KL(240 or nearest) per level (the paper: > 0 past 240), bootstrap over
        seeds; and the correlation across models of KL with accuracy on the KL's facts (the paper: < 0)."""
        points = [{**self.results.model_tags(u), "kl": (kl := self.results.outcome(u).kl)["mean"], "n": kl.get("n", 0)}
                  for u in self.results.done("kl")]
        points = [p for p in points if p["train_level"] != "base"]
        if not points:
            return [not_tested("C4", "KL vs size; corr(KL, accuracy)", "no KL in this study", "KL")]
        if min(p["n"] for p in points) < MIN_N:
            return [not_tested("C4", "KL vs size; corr(KL, accuracy)",
                               f"the KL's test set has {min(p['n'] for p in points)} facts (< {MIN_N})", "KL")]
        out = []
        for level in train_levels(points):
            sizes = sorted({p["size"] for p in points if p["train_level"] == level}, key=size_sort_key)
            ref = reference_size(sizes, sizes[-1])
            label = f"{level_name(level)}: KL(n={sizes[-1]}) - KL(n={ref})"
            if ref is None:
                out.append(not_tested("C4", label, "one training size only", "KL"))
                continue
            big = np.array([p["kl"] for p in _group(points, level, sizes[-1])])
            small = np.array([p["kl"] for p in _group(points, level, ref)])
            draws = (big[self.seeds.pick(len(big), ["C4", label, "big"])].mean(axis=1)
                     - small[self.seeds.pick(len(small), ["C4", label, "small"])].mean(axis=1))
            effect = estimate(big.mean() - small.mean(), draws)
            out.append(Finding("C4", label, effect, f"{points[0]['n']} test facts; seeds {len(big)} vs {len(small)} "
                               "(mean KL per model)",
                               verdict(effect.low, effect.high, +1), "KL"))
        out.append(self.kl_accuracy_correlation(points))
        return out

    def kl_accuracy_correlation(self, points: list[dict]) -> Finding:
        test_set = self.results.config.get("study", {}).get("kl_test_set", "in")
        domain, _, level = test_set.partition("-level")
        label = f"corr(KL, accuracy on {test_set} test facts) across fine-tuned models"
        by_model = {(m["train_level"], m["size"], m["seed"]): m for m in self.models}
        pairs = []
        for p in points:
            model = by_model.get((p["train_level"], p["size"], p["seed"]))
            if model is None:
                continue
            levels = [int(level)] if level else decisive_levels(model["records"], domain)
            if not levels or any(level_n(model["records"], domain).get(lv, 0) < MIN_N for lv in levels):
                return not_tested("C4", label, f"fewer than {MIN_N} facts in {test_set}", "r")
            pairs.append((p["kl"], self.facts.acc(model["bits"], domain, levels)[0]))
        if len(pairs) < 4:
            return not_tested("C4", label, "fewer than 4 models with KL and accuracy", "r")
        kl, accuracy = np.array(pairs).T
        pick = self.seeds.pick(len(kl), ["C4", label])
        draws = np.array([_pearson(kl[i], accuracy[i]) for i in pick])
        effect = estimate(_pearson(kl, accuracy), draws[~np.isnan(draws)])
        return Finding("C4", label, effect, f"{len(kl)} models (resampled)", verdict(effect.low, effect.high, -1), "r")

    def c5_concentration(self) -> list[Finding]:
        """C5: share of the total change held by the top 1 % of elements, per metric, mean over seeds
        (bootstrap over seeds); holds when above CONCENTRATED_SHARE."""
        units = [(self.results.model_tags(u), self.results.outcome(u)) for u in self.results.done("deltas")]
        if not units or 1.0 not in units[0][1].ratios:
            return [not_tested("C5", "top-1 % share of the change", "no update statistics at 1 %", "%")]
        out = []
        at = units[0][1].ratios.index(1.0)
        for level, size in sorted({(t["train_level"], t["size"]) for t, _ in units}, key=lambda k: (str(k[0]), size_sort_key(k[1]))):
            group = [r for t, r in units if t["train_level"] == level and t["size"] == size]
            metrics = group[0].shares_by_metric or {group[0].metric: group[0].shares}
            zero = [r.zero_base["zero_base_share_of_relative_change"] for r in group if r.zero_base]
            for metric in metrics:
                shares = np.array([(r.shares_by_metric or {metric: r.shares})[metric][at] for r in group])
                key = ["C5", level, size, metric]
                effect = estimate(shares.mean(), shares[self.seeds.pick(len(shares), key)].mean(axis=1))
                note = ""
                if metric == "relative" and zero and np.mean(zero) > 0.5:
                    note = f"; {100 * np.mean(zero):.1f} % of it sits on elements whose base value is exactly 0"
                out.append(Finding("C5", f"{level_name(level)}, n={size}: top-1 % share, {metric} change{note}", effect,
                                   f"{len(shares)} models", verdict(effect.low, effect.high, +1, CONCENTRATED_SHARE), "%"))
        return out

    def c6_restoration(self) -> list[Finding]:
        """C6: at the dev-chosen ratio, restored minus unrestored and restored minus the random control,
        on test and on each model's own training set, paired over seeds and facts; the paper: > 0."""
        sweeps, controls = sweep_groups(self.results), controls_of(self.results)
        if not sweeps:
            return [not_tested("C6", "restoration gain", "no restoration sweep in this study")]
        out = []
        for (level, size), group in sweeps.items():
            if not any(r["restore_ratio"] for sweep in group for r in sweep.outcome.records):
                out.append(not_tested("C6", f"{level_name(level)}, n={size}: restored - fine-tuned",
                                      "the sweep has no restore ratios (restoration may take part in Repair methods)"))
                continue
            ratio = chosen_ratio([sweep.outcome.records for sweep in group])
            name = f"{level_name(level)}, n={size}, restore {ratio:g} % (dev-chosen)"
            for split in ("test", "train"):
                out += self._restoration_rows(name, split, group, controls, level, size, ratio)
        return out

    def _restoration_rows(self, name, split, group, controls, level, size, ratio) -> list[Finding]:
        key = f"{ratio:g}"
        field = f"{split}_bits"
        if ratio == 0 or any(key not in getattr(s.outcome, field) for s in group):
            return [not_tested("C6", f"{name}, {split}", f"no {split} evaluation at the chosen ratio")]
        records = [r for r in group[0].outcome.records if r["split"] == split and r["restore_ratio"] == 0]
        levels = decisive_levels(records, "in")
        if not levels:
            return [not_tested("C6", f"{name}, {split}", f"no {split} level with {MIN_N} facts")]

        def arm(bits_of) -> list[dict]:
            return [{"bits": bits_of(s), "scope": f"{split}-{level}-{size}-{s.seed}" if split == "train" else "test"}
                    for s in group]
        before, after = arm(lambda s: getattr(s.outcome, field)["0"]), arm(lambda s: getattr(s.outcome, field)[key])
        n = describe_levels(records, "in", levels).replace("test facts", f"{split} facts")
        gain = arm_difference(self.facts, self.seeds, after, before, "in", levels, paired_seeds=True,
                              key=f"C6 {name}, {split}: restored")
        rows = [Finding("C6", f"{name}, {split}: restored - fine-tuned", gain, f"{n}; {len(group)} seeds",
                        verdict(gain.low, gain.high, +1))]
        mine = controls.get((level, size), {})
        paired = [(a, mine[s.seed]) for a, s in zip(after, group) if s.seed in mine and getattr(mine[s.seed], field)]
        if not paired:
            return rows + [not_tested("C6", f"{name}, {split}: restored - random control", "no random control")]
        randoms = [{"bits": getattr(c, field), "scope": a["scope"]} for a, c in paired]
        edge = arm_difference(self.facts, self.seeds, [a for a, _ in paired], randoms, "in", levels, paired_seeds=True,
                              key=f"C6 {name}, {split}: control")
        return rows + [Finding("C6", f"{name}, {split}: restored - random control", edge, f"{n}; {len(paired)} seeds",
                               verdict(edge.low, edge.high, +1))]

    def all(self) -> list[Finding]:
        return [*self.c1_more_data(), *self.c2_training_level(), *self.c3_subsets_vary(), *self.c4_kl(),
                *self.c5_concentration(), *self.c6_restoration()]


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


CLAIMS = {
    "C1": "More data can hurt: the largest training set gives lower Acc than 240 examples (or the nearest size).",
    "C2": "The training level matters: at the same size, some mastery levels train better models than others.",
    "C3": "Same-size subsets vary: models trained on different subsets of one size differ in Acc.",
    "C4": "KL tracks harm: the first-token KL to the base model grows with data, and higher KL goes with lower accuracy.",
    "C5": "The update is concentrated: the top 1 % of elements hold a large share (here >= 10 %) of the total change.",
    "C6": "Restoration helps: restoring the most-changed elements raises accuracy, more than restoring random ones.",
}
EXPECTED = {"C1": "< 0", "C2": "> 0", "C3": "> 0", "C4": "KL gap > 0, r < 0", "C5": f">= {CONCENTRATED_SHARE:.0%}",
            "C6": "> 0"}


def findings(results: StudyResults, samples: int = 1000, seed: int = 0) -> list[Finding]:
    return Claims(results, samples, seed).all()


# With a tuned arm the analyses (update statistics, restoration) read the tuned models only.
ANALYSED_CLAIMS = {"C5": ("top-1 % share of the change", "%"), "C6": ("restoration gain", "pts")}


def arm_findings(results: StudyResults, samples: int = 1000, seed: int = 0) -> dict[str, list[Finding]]:
    """The claims per arm of the study: "fixed" ([train]'s learning rate) and, with `learning_rates`,
    "tuned" (the dev-chosen rate), each on its own models with the same bootstrap draws."""
    present = arms(results)
    if len(present) < 2:
        return {(present or ["fixed"])[0]: findings(results, samples, seed)}
    out = {arm: findings(arm_view(results, arm), samples, seed) for arm in present}
    why = "the analyses read the tuned-rate models (study.learning_rates)"
    out["fixed"] = [f for f in out["fixed"] if f.claim not in ANALYSED_CLAIMS] + [
        not_tested(claim, comparison, why, unit) for claim, (comparison, unit) in ANALYSED_CLAIMS.items()]
    return out


def verdict_word(finding: Finding) -> str:
    return finding.verdict.split(":")[0]


def verdict_changes(fixed: list[Finding], tuned: list[Finding]) -> list[tuple[Finding | None, Finding | None, str]]:
    """Each comparison at [train]'s rate beside the same comparison at the tuned rate, and whether the
    verdict differs ("changed", "same", or "not compared" where the arms' comparisons do not pair up:
    a claim tested in one arm only). Comparisons pair by their order within a claim, which the same
    grid gives both arms."""
    out = []
    for claim in CLAIMS:
        mine = [f for f in fixed if f.claim == claim], [f for f in tuned if f.claim == claim]
        if len(mine[0]) != len(mine[1]):
            out += [(a, None, "not compared") for a in mine[0]] + [(None, b, "not compared") for b in mine[1]]
            continue
        for a, b in zip(*mine):
            tested = NOT_TESTED not in a.verdict and NOT_TESTED not in b.verdict
            out.append((a, b, "not compared" if not tested else "same" if verdict_word(a) == verdict_word(b)
                        else "changed"))
    return out
