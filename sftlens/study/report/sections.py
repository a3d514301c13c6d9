"""The paper's tables and figures for one study, each a `Section` built from the study database.

Every accuracy cell is a mean ± sd over seeds and carries its n (test facts per level, a row or a
column of its table); a cell whose level has fewer than `MIN_N` facts is marked † and never decides a
finding. Acc is the mean over the in-domain (or out-of-domain) test levels with at least `MIN_N`
facts, named in each caption (`acc_levels`).
"""

from __future__ import annotations

import math
from pathlib import Path

from sftlens.evaluate import MIN_N, acc_levels
from sftlens.probe import LEVELS
from sftlens.reporting.bootstrap import FactDraws, SeedDraws, arm_acc, arm_difference
from sftlens.reporting.figures import plot_bands, plot_series
from sftlens.reporting.page import Section, interval_text
from sftlens.study.engine.choice import acc, chosen_ratio
from sftlens.study.report.results import (
    Seeded,
    StudyResults,
    acc_over_seeds,
    controls_of,
    level_acc_over_seeds,
    level_n,
    level_name,
    mean_spread,
    size_sort_key,
    sweep_groups,
    train_levels,
)

DOMAINS = (("in", "in-domain"), ("out", "out-of-domain"))
SMALL = "†"


def mean_sd_text(mean: float, spread: float, n: int, scale: float = 100.0, digits: int = 1) -> str:
    """A cell of a statistic over seeds (`mean_spread`): "mean ± sd" in % by default, "–" without data."""
    if n == 0 or math.isnan(mean):
        return "–"
    return f"{mean * scale:.{digits}f} ± {spread * scale:.{digits}f}"


def sizes_of(records) -> list:
    return sorted({r["size"] for r in records if r["size"] is not None}, key=size_sort_key)


def acc_caption(records: list[dict], domain: str) -> str:
    """Which levels Acc averaged, with their n, and whether any is too small to decide anything."""
    levels = acc_levels(records, domain)
    n = level_n(records, domain)
    if not levels:
        return "no test facts"
    text = ", ".join(f"{lv} (n={n[lv]})" for lv in levels)
    small = any(n[lv] < MIN_N for lv in levels)
    return f"levels {text}" + (f" {SMALL} fewer than {MIN_N} facts: no verdict rests on it" if small else "")


def test_records(records: list[dict], strategy: str) -> list[dict]:
    return [r for r in records if r["split"] == "test" and r["strategy"] == strategy]


def base_acc(records: list[dict], domain: str, levels: list[int] | None = None) -> float | None:
    base = test_records(records, "base")
    return acc(base, domain, levels) if base else None


# --- sections -----------------------------------------------------------------------------------


def table1(results: StudyResults) -> Section:
    rows = [[r["set"], *(str(r[f"level{i}"]) for i in LEVELS), str(r["total"])] for r in results.counts()]
    tables = [("", ["set", *(f"level {i}" for i in LEVELS), "total"], rows)]
    split = results.done("split")
    short = [[name, str(entry["size"]), str(entry["requested"])]
             for name, entry in (results.outcome(split[0]).sets.items() if split else []) if entry.get("short")]
    if short:
        tables.append(("training sets short of their size (a level with fewer facts than asked: all it has)",
                       ["training set", "facts", "requested"], short))
    evaluated = [[name, str(entry["size"])] for name, entry in (results.outcome(split[0]).sets.items() if split else [])
                 if entry.get("kind") == "test"]
    if evaluated:
        tables.append(("test facts evaluated per domain and level (after the study's per-level cap)",
                       ["test set", "facts"], evaluated))
    return Section("Table 1: facts per mastery level", "Counts of probed facts per mastery level of the base model."
                   + _fact_set_text(results), tables)


def _fact_set_text(results: StudyResults) -> str:
    """Which fact set the study read, when it was not EntityQuestions."""
    probe = results.done("probe")
    source = results.outcome(probe[0]).fact_set if probe else None
    if not source:
        return ""
    counts = lambda d: ", ".join(f"{k} {v}" for k, v in d.items())  # noqa: E731
    return (f" Facts: fact set {source['name']} ({source['facts']} facts, {source['topics']} topics; "
            f"splits: {counts(source['splits'])}; domains: {counts(source['domains'])}).")


def figure2(records: list[dict], out: Path) -> Section:
    test = test_records(records, "sft")
    sizes = sizes_of(test)
    panels, rows, references = [], [], []
    for domain, name in DOMAINS:
        lines = {level_name(lv): {s: acc_over_seeds(test, domain, train_level=lv, size=s) for s in sizes}
                 for lv in train_levels(test)}
        panels.append((f"Acc ({name})", lines))
        references.append(base_acc(records, domain))
        caption = acc_caption(test, domain)
        rows += [[name, label, *(mean_sd_text(*lines[label][s]) for s in sizes), caption] for label in lines]
    path = plot_series(out, panels, "Acc (%)", sizes, references=references)
    return Section("Figure 2: Acc vs training size",
                   "Acc (%), mean ± sd over seeds; the dashed line is the base model. Acc averages the test levels "
                   "named in the last column (those with enough facts).",
                   [("", ["domain", "train set", *map(str, sizes), "Acc over test levels"], rows)], path)


def table2(records: list[dict], size) -> Section:
    title = f"Table 2: train level x test level ({size} training examples)"
    test = [r for r in test_records(records, "sft") if r["size"] == size]
    if not test:
        return Section(title, "No models of this size.")
    header, n_row = ["train set"], ["n (test facts)"]
    for domain, _ in DOMAINS:
        n = level_n(test, domain)
        header += [f"{domain} {lv}" for lv in sorted(n)] + [f"{domain} Acc"]
        n_row += [f"{n[lv]}{SMALL if n[lv] < MIN_N else ''}" for lv in sorted(n)] + [acc_caption(test, domain)]
    rows = [n_row]
    for lv in train_levels(test):
        row = [level_name(lv)]
        for domain, _ in DOMAINS:
            n = level_n(test, domain)
            row += [mean_sd_text(*level_acc_over_seeds(test, domain, t, train_level=lv, size=size)) + (SMALL if n[t] < MIN_N else "")
                     for t in sorted(n)]
            row.append(mean_sd_text(*acc_over_seeds(test, domain, train_level=lv, size=size)))
        rows.append(row)
    return Section(title, f"Accuracy (%) per domain and test level, then Acc; mean ± sd over seeds. {SMALL}: fewer "
                   f"than {MIN_N} test facts (shown, never used for a verdict).", [("", header, rows)])


def figure4(records: list[dict], out: Path) -> Section:
    """The paper plots test level 4 (facts the base model mastered best); a weak base model may
    have few or none there, so the highest in-domain level with MIN_N facts stands in, named as such."""
    test = test_records(records, "sft")
    n = level_n(test, "in")
    level = max((lv for lv, k in n.items() if k >= MIN_N), default=max(n, default=4))
    sizes = sizes_of(test)
    lines = {level_name(lv): {s: level_acc_over_seeds(test, "in", level, train_level=lv, size=s) for s in sizes}
             for lv in train_levels(test)}
    reference = base_acc(records, "in", [level])
    path = plot_series(out, [(f"Acc on in-domain test level {level} (n={n.get(level, 0)})", lines)],
                       "accuracy (%)", sizes, references=[reference])
    rows = [[label, *(mean_sd_text(*lines[label][s]) for s in sizes)] for label in lines]
    note = "" if level == 4 else f" Level 4 has {n.get(4, 0)} in-domain test facts; level {level} is the best-mastered level with {MIN_N}+."
    return Section(f"Figure 4: accuracy on test level {level} vs size",
                   f"In-domain test facts the base model mastered best (n={n.get(level, 0)}); dashed: base model." + note,
                   [("", ["train set", *map(str, sizes)], rows)], path)


def kl_points(results: StudyResults) -> list[dict]:
    return [{**results.model_tags(u), "kl": (kl := results.outcome(u).kl)["mean"], "n": kl.get("n")}
            for u in results.done("kl")]


def figure5(results: StudyResults, out: Path) -> Section:
    points = kl_points(results)
    if not points:
        return Section("Figure 5: KL divergence vs size",
                       "Not measured: no KL unit of this study is done (`[study] kl = false` plans none).")
    sizes = sizes_of(points)
    lines = {}
    for lv in train_levels(points):
        lines[level_name(lv)] = {
            s: mean_spread([p["kl"] for p in points if p["train_level"] == lv and p["size"] == s]) for s in sizes}
    path = plot_series(out, [("first-token KL(ft || base)", lines)], "KL", sizes, scale=1.0)
    rows = [[label, *(mean_sd_text(*lines[label][s], scale=1.0, digits=4) for s in sizes)] for label in lines]
    n = sorted({p["n"] for p in points if p["n"]})
    test_set = results.config.get("study", {}).get("kl_test_set", "?")
    return Section("Figure 5: KL divergence vs size",
                   f"Mean first-token KL of the re-normalised top-10 logits (fine-tuned vs base) over the {test_set} test "
                   f"facts (n={'/'.join(map(str, n)) or '?'}), mean ± sd over seeds.",
                   [("", ["train set", *map(str, sizes)], rows)], path)


def table3(results: StudyResults) -> Section:
    """Table 3 under every metric the deltas units measured, and the zero-base diagnostic: the share
    of the relative change held by elements whose base value is exactly 0."""
    units = [(results.model_tags(u), results.outcome(u)) for u in results.done("deltas")]
    if not units:
        return Section("Table 3: update concentration", "No update statistics in this study.")
    ratios = units[0][1].ratios
    metrics = list(units[0][1].shares_by_metric or {units[0][1].metric: None})
    tables, zero_rows, zero_shares = [], [], []
    for size in sizes_of([t for t, _ in units]):
        for metric in metrics:
            rows = []
            for lv in train_levels([t for t, _ in units]):
                group = [r for t, r in units if t["train_level"] == lv and t["size"] == size]
                if not group:
                    continue
                shares = [(r.shares_by_metric or {metric: r.shares})[metric] for r in group]
                rows.append([level_name(lv), str(len(group)),
                             *(mean_sd_text(*mean_spread([s[i] for s in shares]), digits=2) for i in range(len(ratios)))])
                zeros = [r.zero_base for r in group if r.zero_base]
                if zeros and metric == metrics[0]:
                    zero_shares += [z["zero_base_share_of_relative_change"] for z in zeros]
                    zero_rows.append([level_name(lv), str(size), f"{zeros[0]['zero_base_elements']:,} of {zeros[0]['elements']:,} "
                                      f"({100 * zeros[0]['zero_base_share_of_elements']:.4f} %)",
                                      mean_sd_text(*mean_spread([z["zero_base_share_of_relative_change"] for z in zeros]), digits=2)])
            tables.append((f"{size} training examples, {METRIC_NAMES.get(metric, metric)}",
                           ["train set", "models", *(f"top {r:g} %" for r in ratios)], rows))
    text = "Share (%) of the total parameter change held by the k % most changed elements, mean ± sd over models."
    if zero_rows:
        tables.append(("artefact check: elements whose base value is exactly 0 (|d| / (0 + 1e-8) is huge there)",
                       ["train set", "size", "zero-base elements", "their share of the relative change (%)"], zero_rows))
        if max(zero_shares) > 0.5:
            text += (" The relative metric is dominated by elements whose base value is exactly 0 (here an artefact of the "
                     "embedded checkpoint's Q4_1 de-quantisation, which rounds small weights to 0): read the absolute and "
                     "the zero-excluded tables.")
    return Section("Table 3: update concentration", text, tables)


METRIC_NAMES = {"relative": "relative change |d|/(|base|+1e-8)", "absolute": "absolute change |d|",
                "relative_nonzero": "relative change without exact-zero base elements"}


def _sweep_records(sweeps: list[dict], split: str, size) -> list[dict]:
    return [r for r in sweeps if r["size"] == size and r["split"] == split and r["strategy"] == "restore"]


def _ratio_table(part: list[dict], domain: str) -> tuple[list[str], list[list[str]]]:
    levels = train_levels(part)
    header = ["restore", *(f"{level_name(lv)} (n={_facts(part, domain, lv)})" for lv in levels)]
    rows = []
    for ratio in sorted({r["restore_ratio"] for r in part}):
        rows.append([f"{ratio:g} %", *(mean_sd_text(*acc_over_seeds(part, domain, train_level=lv, restore_ratio=ratio))
                                        for lv in levels)])
    return header, rows


def _facts(records: list[dict], domain: str, train_level) -> str:
    """The facts behind one model's Acc: n per averaged level (a training set differs per level)."""
    mine = [r for r in records if r["train_level"] == train_level and r["restore_ratio"] == 0
            and r["seed"] == min(x["seed"] for x in records if x["train_level"] == train_level)]
    n = level_n(mine, domain)
    return "+".join(str(n[lv]) for lv in acc_levels(mine, domain))


def table4(sweeps: list[dict]) -> Section:
    tables = []
    for size in sizes_of(sweeps):
        part = _sweep_records(sweeps, "test", size)
        for domain, name in DOMAINS:
            header, rows = _ratio_table(part, domain)
            tables.append((f"{name}, {size} training examples; Acc over {acc_caption(part, domain)}", header, rows))
    return Section("Table 4: Acc vs restore ratio", "Test Acc (%) after restoring the top k % most changed elements, "
                   "mean ± sd over seeds; n = test facts per averaged level.", tables)


def table5(sweeps: list[dict]) -> Section:
    tables = []
    for size in sizes_of(sweeps):
        header, rows = _ratio_table(_sweep_records(sweeps, "train", size), "in")
        tables.append((f"{size} training examples", header, rows))
    return Section("Table 5: training-set accuracy after restoration",
                   "Accuracy (%) of each model on its own training set (n = its facts), mean ± sd over seeds.", tables)


def restoration(results: StudyResults, records: list[dict], path: Path, samples: int) -> tuple[Section, dict]:
    """Beyond the paper: the ratio chosen on dev, its test gain with a paired bootstrap CI against
    the fine-tuned model and against random restoration at the same ratio, and the curve."""
    controls = controls_of(results)
    facts, seeds = FactDraws(max(samples, 1), 0), SeedDraws(max(samples, 1), 1)
    rows, chosen, panels, references = [], {}, [], []
    for (level, size), sweeps in sweep_groups(results).items():
        ratio = chosen_ratio([s.outcome.records for s in sweeps])
        chosen[(level, size)] = ratio
        test0 = [r for r in sweeps[0].outcome.records if r["split"] == "test" and r["restore_ratio"] == 0]
        levels = acc_levels(test0, "in")
        arm = {f"{k}": [{"bits": s.outcome.test_bits[k]} for s in sweeps] for k in sweeps[0].outcome.test_bits}
        where = f"{level_name(level)}, n={size}"
        curve = [(float(k), *_value_low_high(arm_acc(facts, seeds, models, "in", levels, key=[where, "top", k])))
                 for k, models in arm.items()]
        panel = {"top (most changed)": curve}
        ctrl = controls.get((level, size), {})
        paired = [s for s in sweeps if s.seed in ctrl and ctrl[s.seed].test_bits]
        random_cell = "–"
        if ratio and paired:
            randoms = [{"bits": ctrl[s.seed].test_bits} for s in paired]
            panel[f"random control ({len(paired)} seeds)"] = [
                (ratio, *_value_low_high(arm_acc(facts, seeds, randoms, "in", levels, key=[where, "random"])))]
            before = [{"bits": s.outcome.test_bits["0"]} for s in paired]
            random_cell = interval_text(arm_difference(facts, seeds, randoms, before, "in", levels, paired_seeds=True,
                                                       key=[where, "random - fine-tuned"]))
        panels.append((f"{level_name(level)}, n={size}", panel))
        references.append(base_acc(records, "in", levels))
        gain_cell = "–"
        if ratio:
            before = [{"bits": s.outcome.test_bits["0"]} for s in sweeps]
            after = [{"bits": s.outcome.test_bits[f"{ratio:g}"]} for s in sweeps]
            gain_cell = interval_text(arm_difference(facts, seeds, after, before, "in", levels, paired_seeds=True,
                                                     key=[where, "restored - fine-tuned"]))
        before_acc = mean_sd_text(*mean_spread([acc(test_at(s, 0.0), "in") for s in sweeps]))
        after_acc = mean_sd_text(*mean_spread([acc(test_at(s, ratio), "in") for s in sweeps]))
        chosen_cell = f"{ratio:g} %" if ratio else "none: no restore ratios"
        rows.append([level_name(level), str(size), str(len(sweeps)), chosen_cell, before_acc, after_acc, gain_cell,
                     random_cell, acc_caption(test0, "in")])
    figure = plot_bands(path, panels, "in-domain test Acc (%)", "restore ratio (%)", references) if panels else None
    section = Section(
        "Restoration ratio chosen on dev, reported on test",
        "Unlike the paper (which picked the ratio on test), the ratio maximises the mean in-domain dev Acc over seeds. "
        "Gains are in-domain test Acc points with a 95 % bootstrap interval, paired over facts and seeds; the control "
        "restores the same number of randomly chosen elements. Figure: Acc vs ratio with 95 % bands; dashed: base model.",
        [("", ["train set", "size", "seeds", "dev-chosen ratio", "Acc before", "Acc after", "gain [95 % CI]",
               "random control gain [95 % CI]", "Acc over in-domain test levels"], rows)], figure)
    return section, chosen


def _value_low_high(estimate) -> tuple[float, float, float]:
    return estimate.value, estimate.low, estimate.high


def test_at(sweep: Seeded, ratio: float) -> list[dict]:
    return [r for r in sweep.outcome.records if r["split"] == "test" and r["restore_ratio"] == ratio]


def table6(records: list[dict], sweeps: list[dict], chosen: dict, size) -> Section:
    test = [r for r in records if r["split"] == "test"]
    rows = []
    base = [r for r in test if r["strategy"] == "base"]
    rows.append(["base model", "–", *(f"{100 * acc(base, d):.1f}" if base else "–" for d, _ in DOMAINS)])

    def best(candidates: list[tuple[str, list[dict]]]) -> list[str] | None:
        scored = [(acc_over_seeds(rs, "in"), label, rs) for label, rs in candidates if rs]
        if not scored:
            return None
        (m, _, _), label, rs = max(scored, key=lambda t: t[0][0])
        return [label, *(mean_sd_text(*acc_over_seeds(rs, d)) for d, _ in DOMAINS)]

    sft = [r for r in test if r["strategy"] == "sft"]
    mixed = best([(f"n={s}", [r for r in sft if r["train_level"] == "mixed" and r["size"] == s]) for s in sizes_of(sft)])
    divided = best([(level_name(lv), [r for r in sft if r["train_level"] == lv and r["size"] == size])
                    for lv in train_levels(sft) if lv != "mixed"])
    restored = best([(f"{level_name(lv)}, {chosen[(lv, size)]:g} %",
                      [r for r in sweeps if r["train_level"] == lv and r["size"] == size and r["split"] == "test"
                       and r["strategy"] == "restore" and r["restore_ratio"] == chosen[(lv, size)]])
                     for (lv, s) in chosen if s == size])
    for name, row in (("SFT (mixed), best size", mixed), (f"SFT (divided), best level at n={size}", divided),
                      (f"SFT + restoration (dev-chosen ratio), n={size}", restored)):
        rows.append([name, *(row or ["–", "–", "–"])])
    return Section("Table 6: strategies", "Test Acc (%), mean ± sd over seeds; the best configuration of each strategy "
                   "is chosen by in-domain test Acc as in the paper (so these rows are optimistic), except the restore "
                   f"ratio (chosen on dev). Acc over {acc_caption(sft, 'in')} (in-domain), {acc_caption(sft, 'out')} "
                   "(out-of-domain).", [("", ["strategy", "configuration", "Acc in-domain", "Acc out-of-domain"], rows)])
