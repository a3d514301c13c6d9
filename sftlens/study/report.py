"""`sftlens report DIR`: every table and figure of the paper's analysis for one study, rebuilt
from its database alone, as a self-contained HTML page (figures embedded as base64 PNG) and a
Markdown file with the PNGs beside it. Every number is a mean over seeds with its spread (sample
standard deviation, `mean ± sd`; `n` seeds where fewer than the study's seeds finished).
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path

from sftlens.io import atomic_write_bytes, atomic_write_text
from sftlens.report import level_table, plot_series, size_sort_key
from sftlens.study.results import (
    StudyResults,
    acc,
    acc_over_seeds,
    bootstrap_gain,
    chosen_ratio,
    eval_records,
    level_acc_over_seeds,
    load_results,
    mean_spread,
    restore_records,
)

LEVELS = (0, 1, 2, 3, 4)
DOMAINS = (("in", "in-domain"), ("out", "out-of-domain"))


@dataclass
class Section:
    title: str
    text: str = ""
    tables: list[tuple[str, list[str], list[list[str]]]] = field(default_factory=list)  # (caption, header, rows)
    figure: Path | None = None


def fmt(mean: float, spread: float, n: int, scale: float = 100.0, digits: int = 1) -> str:
    if n == 0 or math.isnan(mean):
        return "–"
    return f"{mean * scale:.{digits}f} ± {spread * scale:.{digits}f}"


def _train_levels(records) -> list:
    levels = sorted({r["train_level"] for r in records if isinstance(r["train_level"], int)})
    return levels + (["mixed"] if any(r["train_level"] == "mixed" for r in records) else [])


def _level_name(level) -> str:
    return f"D_train-{level}" if isinstance(level, int) else str(level)


# --- sections -----------------------------------------------------------------------------------


def table1(results: StudyResults) -> Section:
    rows = [[r["set"], *(str(r[f"level{i}"]) for i in LEVELS), str(r["total"])] for r in results.counts()]
    tables = [("", ["set", *(f"level {i}" for i in LEVELS), "total"], rows)]
    split = results.done("split")
    short = [[name, str(entry["size"]), str(entry["requested"])]
             for name, entry in (split[0]["result"]["sets"].items() if split else []) if entry.get("short")]
    if short:
        tables.append(("training sets short of their size (a level with fewer facts than asked: all it has)",
                       ["training set", "facts", "requested"], short))
    return Section("Table 1: facts per mastery level", "Counts of probed facts per mastery level of the base model.",
                   tables)


def _sizes(records) -> list:
    return sorted({r["size"] for r in records if r["size"] is not None}, key=size_sort_key)


def figure2(records: list[dict], out: Path) -> Section:
    test = [r for r in records if r["split"] == "test" and r["strategy"] == "sft"]
    sizes = _sizes(test)
    panels, rows = [], []
    for domain, name in DOMAINS:
        lines = {_level_name(lv): {s: acc_over_seeds(test, domain, train_level=lv, size=s) for s in sizes}
                 for lv in _train_levels(test)}
        panels.append((f"Acc ({name})", lines))
        rows += [[name, label, *(fmt(*lines[label][s]) for s in sizes)] for label in lines]
    path = plot_series(out / "figure2.png", panels, "Acc (%)", sizes)
    return Section("Figure 2: Acc vs training size", "Acc = mean of the 5 test-level accuracies (%), mean ± sd over seeds.",
                   [("", ["domain", "train set", *map(str, sizes)], rows)], path)


def table2(records: list[dict], size) -> Section:
    test = [r for r in records if r["split"] == "test" and r["size"] == size and r["strategy"] == "sft"]
    if not test:
        return Section(f"Table 2: train level x test level ({size} training examples)", "No models of this size.")
    table = level_table(test, size, digits=1)
    rows = [[_level_name(row[0]), *("–" if c is None else f"{c.mean:.1f} ± {c.std:.1f}" for c in row[1:])]
            for row in table.rows]
    return Section(f"Table 2: train level x test level ({size} training examples)",
                   "Accuracy (%) per domain and test level, then Acc; mean ± sd over seeds.",
                   [("", list(table.columns), rows)])


def figure4(records: list[dict], out: Path) -> Section:
    """The paper plots test level 4 (facts the base model mastered best); a weak base model may
    have none there, so the highest in-domain test level that has facts stands in, named as such."""
    test = [r for r in records if r["split"] == "test" and r["strategy"] == "sft"]
    present = [r["test_level"] for r in test if r["domain"] == "in" and r["n"] > 0]
    level = max(present, default=4)
    sizes = _sizes(test)
    lines = {_level_name(lv): {s: level_acc_over_seeds(test, "in", level, train_level=lv, size=s) for s in sizes}
             for lv in _train_levels(test)}
    path = plot_series(out / "figure4.png", [(f"Acc on in-domain test level {level}", lines)], "accuracy (%)", sizes)
    rows = [[label, *(fmt(*lines[label][s]) for s in sizes)] for label in lines]
    note = "" if level == 4 else f" The base model has no in-domain test facts at level 4; level {level} is its best."
    return Section(f"Figure 4: accuracy on test level {level} vs size",
                   "In-domain test facts the base model mastered best." + note,
                   [("", ["train set", *map(str, sizes)], rows)], path)


def kl_points(results: StudyResults) -> list[dict]:
    return [{**results.model_tags(u), "kl": u["result"]["kl"]["mean"]} for u in results.done("kl")]


def figure5(results: StudyResults, out: Path) -> Section:
    points = kl_points(results)
    sizes = _sizes(points)
    lines = {}
    for lv in _train_levels(points):
        lines[_level_name(lv)] = {
            s: mean_spread([p["kl"] for p in points if p["train_level"] == lv and p["size"] == s]) for s in sizes}
    path = plot_series(out / "figure5.png", [("first-token KL(ft || base)", lines)], "KL", sizes, scale=1.0)
    rows = [[label, *(fmt(*lines[label][s], scale=1.0, digits=4) for s in sizes)] for label in lines]
    return Section("Figure 5: KL divergence vs size",
                   "Mean first-token KL of the re-normalised top-10 logits (fine-tuned vs base), mean ± sd over seeds.",
                   [("", ["train set", *map(str, sizes)], rows)], path)


def table3(results: StudyResults) -> Section:
    units = [(results.model_tags(u), u["result"]) for u in results.done("deltas")]
    if not units:
        return Section("Table 3: update concentration", "No update statistics in this study.")
    ratios = units[0][1]["ratios"]
    tables = []
    for size in _sizes([t for t, _ in units]):
        rows = []
        for lv in _train_levels([t for t, _ in units]):
            shares = [r["shares"] for t, r in units if t["train_level"] == lv and t["size"] == size]
            rows.append([_level_name(lv), *(fmt(*mean_spread([s[i] for s in shares]), digits=2) for i in range(len(ratios)))])
        tables.append((f"{size} training examples", ["train set", *(f"top {r:g} %" for r in ratios)], rows))
    return Section("Table 3: update concentration",
                   "Share (%) of the total parameter change held by the k % most changed elements.", tables)


def _ratio_table(sweeps: list[dict], split: str, domain: str, size) -> list[list[str]]:
    part = [r for r in sweeps if r["size"] == size and r["split"] == split and r["strategy"] == "restore"]
    levels = _train_levels(part)
    rows = []
    for ratio in sorted({r["restore_ratio"] for r in part}):
        cells = [fmt(*acc_over_seeds(part, domain, train_level=lv, restore_ratio=ratio)) for lv in levels]
        rows.append([f"{ratio:g} %", *cells])
    return [["restore", *map(_level_name, levels)], *rows]


def table4(sweeps: list[dict]) -> Section:
    tables = []
    for size in _sizes(sweeps):
        for domain, name in DOMAINS:
            header, *rows = _ratio_table(sweeps, "test", domain, size)
            tables.append((f"{name}, {size} training examples", header, rows))
    return Section("Table 4: Acc vs restore ratio", "Test Acc (%) after restoring the top k % most changed elements.", tables)


def table5(sweeps: list[dict]) -> Section:
    tables = []
    for size in _sizes(sweeps):
        header, *rows = _ratio_table(sweeps, "train", "in", size)
        tables.append((f"{size} training examples", header, rows))
    return Section("Table 5: training-set accuracy after restoration",
                   "Accuracy (%) of each model on its own training set.", tables)


def _sweep_groups(results: StudyResults) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for unit in results.done("restore"):
        tags = results.model_tags(unit)
        groups.setdefault((tags["train_level"], tags["size"]), []).append({**unit["result"], "seed": tags["seed"]})
    return groups


def restoration_selection(results: StudyResults, samples: int) -> tuple[Section, dict]:
    """Beyond the paper: the ratio chosen on dev, its test gain with a bootstrap CI, and the
    random-restoration control at the same ratio."""
    controls: dict[tuple, dict] = {}
    for unit in results.done("control"):
        tags = results.model_tags(unit)
        controls.setdefault((tags["train_level"], tags["size"]), {})[tags["seed"]] = unit["result"]
    rows, chosen = [], {}
    for (level, size), sweeps in sorted(_sweep_groups(results).items(), key=lambda kv: (size_sort_key(kv[0][1]), str(kv[0][0]))):
        ratio = chosen_ratio(sweeps)
        chosen[(level, size)] = ratio
        key = f"{ratio:g}"
        before = [s["test_bits"]["0"]["in"] for s in sweeps]
        after = [s["test_bits"][key]["in"] for s in sweeps]
        accs0 = mean_spread([acc([r for r in s["records"] if r["split"] == "test" and r["restore_ratio"] == 0], "in") for s in sweeps])
        accs = mean_spread([acc([r for r in s["records"] if r["split"] == "test" and r["restore_ratio"] == ratio], "in") for s in sweeps])
        gain, low, high = bootstrap_gain(list(zip(before, after)), samples)
        ctrl = controls.get((level, size), {})
        random_pairs = [(s["test_bits"]["0"]["in"], ctrl[s["seed"]]["test_bits"]["in"]) for s in sweeps
                        if s["seed"] in ctrl and ctrl[s["seed"]]["test_bits"]]
        if random_pairs:
            rgain, rlow, rhigh = bootstrap_gain(random_pairs, samples)
            random_cell = f"{100 * rgain:+.1f} [{100 * rlow:+.1f}, {100 * rhigh:+.1f}]"
        else:
            random_cell = "–"
        rows.append([_level_name(level), str(size), f"{ratio:g} %", fmt(*accs0), fmt(*accs),
                     f"{100 * gain:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]", random_cell])
    section = Section(
        "Restoration ratio chosen on dev, reported on test",
        "Unlike the paper (which picked the ratio on test), the ratio maximises the mean in-domain dev Acc over "
        "seeds; gains are in-domain test Acc points with a paired bootstrap 95 % interval (facts resampled within "
        "each test level); the control restores the same number of randomly chosen elements.",
        [("", ["train set", "size", "dev-chosen ratio", "Acc before", "Acc after", "gain [95 % CI]",
               "random control gain [95 % CI]"], rows)])
    return section, chosen


def table6(results: StudyResults, records: list[dict], sweeps: list[dict], chosen: dict, size) -> Section:
    test = [r for r in records if r["split"] == "test"]
    rows = []
    base = [r for r in test if r["strategy"] == "base"]
    rows.append(["base model", "–", *(f"{100 * acc(base, d):.1f}" if base else "–" for d, _ in DOMAINS)])

    def best(candidates: list[tuple[str, list[dict]]]) -> list[str] | None:
        scored = [(acc_over_seeds(rs, "in"), label, rs) for label, rs in candidates if rs]
        if not scored:
            return None
        (m, _, _), label, rs = max(scored, key=lambda t: t[0][0])
        return [label, *(fmt(*acc_over_seeds(rs, d)) for d, _ in DOMAINS)]

    sft = [r for r in test if r["strategy"] == "sft"]
    mixed = best([(f"n={s}", [r for r in sft if r["train_level"] == "mixed" and r["size"] == s]) for s in _sizes(sft)])
    divided = best([(_level_name(lv), [r for r in sft if r["train_level"] == lv and r["size"] == size])
                    for lv in _train_levels(sft) if lv != "mixed"])
    restored = best([(f"{_level_name(lv)}, {chosen[(lv, size)]:g} %",
                      [r for r in sweeps if r["train_level"] == lv and r["size"] == size and r["split"] == "test"
                       and r["strategy"] == "restore" and r["restore_ratio"] == chosen[(lv, size)]])
                     for (lv, s) in chosen if s == size])
    for name, row in (("SFT (mixed), best size", mixed), (f"SFT (divided), best level at n={size}", divided),
                      (f"SFT + restoration (dev-chosen ratio), n={size}", restored)):
        rows.append([name, *(row or ["–", "–", "–"])])
    return Section("Table 6: strategies", "Test Acc (%), mean ± sd over seeds; the best configuration of each strategy "
                   "is chosen by in-domain test Acc as in the paper, except the restore ratio (chosen on dev).",
                   [("", ["strategy", "configuration", "Acc in-domain", "Acc out-of-domain"], rows)])


# --- rendering ----------------------------------------------------------------------------------


def sections(results: StudyResults, out: Path) -> list[Section]:
    study = results.config.get("study", {})
    records = eval_records(results)
    sweeps = restore_records(results)
    selection, chosen = restoration_selection(results, study.get("bootstrap", 1000))
    size = study.get("table_size")
    return [table1(results), figure2(records, out), table2(records, size), figure4(records, out),
            figure5(results, out), table3(results), table4(sweeps), table5(sweeps), selection,
            table6(results, records, sweeps, chosen, size)]


def _markdown(title: str, parts: list[Section]) -> str:
    lines = [f"# {title}", ""]
    for s in parts:
        lines += [f"## {s.title}", "", s.text, ""]
        if s.figure:
            lines += [f"![{s.title}]({s.figure.name})", ""]
        for caption, header, rows in s.tables:
            if caption:
                lines += [f"*{caption}*", ""]
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
            lines.append("")
    return "\n".join(lines)


def _html(title: str, parts: list[Section]) -> str:
    esc = html.escape
    body = [f"<h1>{esc(title)}</h1>"]
    for s in parts:
        body += [f"<h2>{esc(s.title)}</h2>", f"<p>{esc(s.text)}</p>"]
        if s.figure:
            data = base64.b64encode(s.figure.read_bytes()).decode()
            body.append(f'<img alt="{esc(s.title)}" src="data:image/png;base64,{data}">')
        for caption, header, rows in s.tables:
            body.append("<table>" + (f"<caption>{esc(caption)}</caption>" if caption else ""))
            body.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
            body += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
            body.append("</table>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}caption{font-style:italic}img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n"


def write_report(study_dir: str | Path) -> dict[str, Path]:
    """Write `report/report.html` (self-contained) and `report/report.md` (+ PNGs) under the study."""
    study_dir = Path(study_dir)
    results = load_results(study_dir)
    out = study_dir / "report"
    parts = sections(results, out)
    title = f"sftlens study report: {results.source} ({results.config.get('study', {}).get('model', '?')})"
    atomic_write_text(out / "report.md", _markdown(title, parts))
    atomic_write_bytes(out / "report.html", _html(title, parts).encode("utf-8"))
    return {"html": out / "report.html", "markdown": out / "report.md"}
