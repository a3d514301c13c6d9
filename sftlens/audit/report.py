"""The audit report (`sftlens audit`): transitions, forgotten/learned by base level, the repair
table, KL and update concentration, the recall of forgotten taught facts when a list of them
is given, and every fact in an explorer (the HTML page: filters, search, sorting). Built from the
audit folder alone (summary.json, facts.jsonl, audit.json, the best repair's answers under repairs/)
as `Section`s of the report layer the study report shares (`sftlens.reporting.page`: one Markdown
and self-contained HTML writer).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from sftlens.analysis.deltas import zero_base_note
from sftlens.audit.summary import best_repair
from sftlens.audit.transitions import TRANSITIONS, row_shares
from sftlens.errors import SftlensError
from sftlens.io import read_jsonl
from sftlens.probe import LEVELS
from sftlens.probe.tables import prompt_lines
from sftlens.reporting.bootstrap import Estimate
from sftlens.reporting.explorer import Column, Filter, explorer_html
from sftlens.reporting.figures import figure_panels, save_figure
from sftlens.reporting.page import Section, interval_text, write_page, write_sections
from sftlens.taught import RECORD_FILE, taught_facts


def _est(data: dict | None) -> Estimate | None:
    return None if data is None else Estimate(data["value"], data["low"], data["high"])


def _rate(data: dict | None) -> str:
    est = _est(data)
    return "–" if est is None else interval_text(est, sign="")


def _pct(counts: int, total: int) -> str:
    return f"{100 * counts / total:.1f}" if total else "–"


def _p(value: float | None) -> str:
    """An exact McNemar p-value (a summary from before it: –)."""
    return "–" if value is None else "< 0.001" if value < 0.001 else f"{value:.3f}"


def transitions_section(summary: dict, out: Path) -> Section:
    counts = summary["matrix"]
    shares = row_shares(counts)
    figure, (ax,) = figure_panels(1, width=5.5)
    grid = np.array([[np.nan if v is None else 100 * v for v in row] for row in shares])
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100)
    for i in LEVELS:
        for j in LEVELS:
            ax.text(j, i, str(counts[i][j]), ha="center", va="center", color="white" if (grid[i, j] or 0) < 50 else "black")
    ax.set_xticks(LEVELS)
    ax.set_yticks(LEVELS)
    ax.set_xlabel("fine-tuned mastery level")
    ax.set_ylabel("base mastery level")
    ax.set_title("row % (cells: facts)")
    figure.colorbar(image, ax=ax, label="% of the base level's facts")
    rows = [[f"level {i}", *(f"{counts[i][j]} ({'–' if shares[i][j] is None else f'{100 * shares[i][j]:.0f} %'})"
                             for j in LEVELS), sum(counts[i])] for i in LEVELS]
    prompts = summary.get("probe_prompts", {})  # topic -> its probe prompt (none in a summary from before)
    text = ("Mastery level of every audited fact before (rows) and after (columns) fine-tuning, both models probed "
            "with the same seeded draws (the probe's templates and samples); cells: facts (row %). "
            + " ".join(prompt_lines(prompts, prompts)))
    return Section("Knowledge transitions", text, [("base level -> fine-tuned level",
                                                    ["base \\ fine-tuned", *(f"level {j}" for j in LEVELS), "n"], rows)],
                   save_figure(figure, out / "transitions.png"))


def _rates_rows(groups: list, label) -> list[list]:
    return [[label(value), g["n"], *(g[t] for t in TRANSITIONS), _rate(g["forgotten_rate"]), _rate(g["learned_rate"]),
             _p(g.get("mcnemar_p"))] for value, g in groups]


RATE_HEADER = ["", "n", "kept right", "forgotten", "learned", "never right", "forgotten % of base-right [95 % CI]",
               "learned % of base-wrong [95 % CI]", "McNemar p"]


def greedy_section(summary: dict, out: Path) -> Section:
    by_level = summary["by_level"]
    figure, (ax,) = figure_panels(1, width=6)
    for offset, (key, label) in enumerate((("forgotten_rate", "forgotten"), ("learned_rate", "learned"))):
        xs = [lv + (offset - 0.5) * 0.35 for lv, g in by_level if g[key]]
        ests = [_est(g[key]) for _, g in by_level if g[key]]
        ax.bar(xs, [100 * e.value for e in ests], width=0.35, label=label,
               yerr=[[100 * (e.value - e.low) for e in ests], [100 * (e.high - e.value) for e in ests]], capsize=3)
    ax.set_xticks(LEVELS)
    ax.set_xlabel("base mastery level")
    ax.set_ylabel("% (95 % bootstrap CI)")
    ax.set_title("forgotten (of base-right) and learned (of base-wrong)")
    ax.legend()
    text = ("Greedy closed-book answers of both models (the prompt of the audit), per fact: kept right, forgotten "
            "(right -> wrong), learned (wrong -> right), never right. Rates with 95 % percentile bootstrap intervals "
            "over the facts of each row; McNemar p: exact two-sided test of forgotten against learned (base against "
            "fine-tune on the same facts).")
    tables = [("by base mastery level", ["base level", *RATE_HEADER[1:]],
               _rates_rows(by_level, lambda v: f"level {v}") + _rates_rows([("all", summary["all"])], str)),
              ("by domain", ["domain", *RATE_HEADER[1:]], _rates_rows(summary["by_domain"], str)),
              ("by relation", ["relation", *RATE_HEADER[1:]], _rates_rows(summary["by_relation"], str))]
    return Section("Forgotten and learned", text, tables, save_figure(figure, out / "forgotten-learned.png"))


def _acc_cell(acc: dict, domain: str, gain: bool) -> str:
    if domain not in acc:
        return "–"
    cell = f"{100 * acc[domain]['acc']:.1f}"
    return cell + (f" ({interval_text(_est(acc[domain]['gain']))})" if gain else "")


def repair_section(summary: dict) -> Section:
    objective = summary["objective"]
    rows = []
    for method, r in summary["repairs"].items():
        t = r["test"]
        rows.append([method, f"{r['knob']} = {r['chosen']:g}", _rate(t["recovered"]), _rate(t["learned_kept"]),
                     _acc_cell(t["acc"], "in", True), _acc_cell(t["acc"], "out", True), _p(t.get("mcnemar_p"))])
    for name, acc in summary["references"].items():
        rows.append([f"{name} (no repair)" if name == "fine-tuned" else name, "–", "–", "–",
                     _acc_cell(acc, "in", False), _acc_cell(acc, "out", False),
                     _p(summary.get("reference_mcnemar_p", {}).get(name))])
    any_test = next(iter(summary["repairs"].values()))["test"]
    text = (f"Each repair's value chosen on the dev slice ({summary['slices']['dev']} facts) by one objective, "
            f"{objective['text']}, among {objective['budget']} candidates per method (ties: the least edit), then "
            f"scored on the held-out test slice ({summary['slices']['test']} facts: {any_test['forgotten_n']} forgotten, "
            f"{any_test['learned_n']} learned by the fine-tune). Recovered: forgotten test facts the repaired model "
            "answers right again; learned kept: learned test facts it still answers right; Acc: the paper's (mean over "
            "base levels) on test, with the gain over the fine-tune, paired over facts (95 % bootstrap); McNemar p: "
            "exact two-sided test of the model against the fine-tune on the same test facts (right for one, wrong for "
            "the other)." + "".join(f" {why[0].upper()}{why[1:]}." for why in summary.get("skipped_repairs", {}).values()))
    dev = [[m, ", ".join(f"{v}: {100 * s:+.1f}" if objective["name"] == "recovered" else f"{v}: {100 * s:.1f}"
                         for v, s in sorted(r["dev_scores"].items(), key=lambda item: float(item[0]))), f"{r['chosen']:g}"]
           for m, r in summary["repairs"].items()]
    return Section("Which repair brings it back", text, [
        ("held-out test facts", ["method", "chosen value", "recovered % [95 % CI]", "learned kept % [95 % CI]",
                                 "in-domain Acc (gain [95 % CI])", "out-of-domain Acc (gain [95 % CI])",
                                 "McNemar p vs fine-tuned"], rows),
        (f"dev objective per candidate ({objective['name']}, %)", ["method", "candidate: score", "chosen"], dev)])


def movement_section(summary: dict) -> Section:
    kl, deltas = summary["kl"], summary["deltas"]
    prompts = "each relation's best probe template" if kl["style"] == "template" else "each model's chat-rendered question"
    kl_rows = [[kl["n"], *(f"{kl[k]:.4f}" for k in ("mean", "median", "std", "q25", "q75", "max"))]] if kl["n"] else []
    by_metric = deltas["concentration"]
    ratios = next(iter(by_metric.values()))["ratios"]
    conc = [[f"{r:g}", *(f"{100 * by_metric[m]['shares'][i]:.2f}" for m in by_metric)] for i, r in enumerate(ratios)]
    text = (f"First-token KL(p_ft || p_base) over the fine-tune's top-{kl['top_k']} logits (the paper's Figure 5 "
            f"measure) on the audited facts, prompted with {prompts}. Update concentration: the share of the total "
            "change held by the k % most changed elements of the layers without norms, under each metric "
            "(relative_nonzero: relative, with exact-zero base elements counted as unchanged). "
            + zero_base_note(deltas["zero_base"]))
    return Section("How far and where it moved", text, [
        ("first-token KL", ["facts", "mean", "median", "sd", "q25", "q75", "max"], kl_rows),
        ("share of the total change (%) held by the top k % of elements", ["k (%)", *by_metric], conc)])


def read_focus(path: str | Path) -> list[str]:
    """Fact ids from a file: a JSON list, a JSON object with a `facts` list, or one id per line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise SftlensError(f"{path}: cannot read the focus facts ({err.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    ids = data.get("facts") if isinstance(data, dict) else data
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise SftlensError(f"{path}: expected a JSON list of fact ids (or an object with a 'facts' list)")
    return ids


def focus_section(summary: dict, facts: list[dict], focus: list[str], source: str) -> Section:
    by_id = {r["fact_id"]: r for r in facts}
    mine = [by_id[i] for i in dict.fromkeys(focus) if i in by_id]
    held_out = [r for r in mine if r["slice"] == "test"]

    def row(name: str, group: list[dict], right) -> list:
        forgotten = [r for r in group if r["transition"] == "forgotten"]
        return [name, len(group), _pct(sum(right(r) for r in group), len(group)), len(forgotten),
                _pct(sum(right(r) for r in forgotten), len(forgotten))]

    # every row over the same facts, the held-out ones: a repair is scored only where its value was not chosen
    base = row("base model", held_out, lambda r: r["base_correct"])
    rows = [[*base[:4], "–"],  # every forgotten fact is right on the base, by definition
            row("fine-tuned", held_out, lambda r: r["finetuned_correct"])]
    for method, r in summary["repairs"].items():
        rows.append(row(f"{method} ({r['knob']} = {r['chosen']:g})", held_out,
                        lambda x, right=r["correct"]: right[x["fact_id"]]))
    forgotten = sum(r["transition"] == "forgotten" for r in mine)
    text = (f"Taught facts ({source}): {len(mine)} of the {len(set(focus))} listed are among the audited facts; the "
            f"fine-tune forgot {forgotten} of them (greedy right -> wrong). Below, the {len(held_out)} of them in the "
            "held-out test slice (the dev facts chose each repair's value). Recall: share answered right (greedy); "
            "recall of forgotten taught facts: share of those the fine-tune forgot that the model answers right.")
    return Section("Recall of forgotten taught facts", text, [
        ("", ["model", "taught facts (n)", "recall of taught facts (%)", "forgotten taught facts (n)",
              "recall of forgotten taught facts (%)"], rows)])


def best_repair_answers(audit_dir: Path, summary: dict) -> tuple[str, dict[str, str]] | None:
    """(the best repair's name and value, its greedy answer per test fact): the method `best_repair` picks,
    at its dev-chosen value (its answer file under DIR/repairs/test/); None without it."""
    if not summary.get("repairs"):
        return None
    method = best_repair(summary["repairs"])
    r = summary["repairs"][method]
    path = audit_dir / "repairs" / "test" / f"{method}-{r['chosen']:g}.json"
    try:
        return f"{method} ({r['knob']} = {r['chosen']:g})", json.loads(path.read_text())["answers"]
    except (OSError, json.JSONDecodeError, KeyError):
        return None


def facts_section(summary: dict, facts: list[dict], audit_dir: Path) -> Section:
    """Every audited fact in one explorer (HTML page only): filters, search, sortable columns."""
    repair = best_repair_answers(audit_dir, summary)  # test facts only: a dev fact's cells stay empty
    right = summary["repairs"][best_repair(summary["repairs"])]["correct"] if repair else {}
    right = {i: right[i] for i in repair[1]} if repair else {}
    rows = [{"fact_id": f["fact_id"], "relation": f["relation"], "domain": f["domain"], "slice": f["slice"],
             "question": f["question"], "gold": " | ".join(f["answers"]),
             "base_answer": f["base_answer"], "base_correct": f["base_correct"],
             "finetuned_answer": f["finetuned_answer"], "finetuned_correct": f["finetuned_correct"],
             **({"repair_answer": repair[1].get(f["fact_id"]), "repair_correct": right.get(f["fact_id"])}
                if repair else {}),
             "base_level": f["base_level"], "finetuned_level": f["finetuned_level"], "transition": f["transition"],
             "kl": f.get("kl")} for f in facts]
    columns = [Column("fact_id", "fact"), Column("relation", "relation"), Column("domain", "domain"),
               Column("slice", "slice"), Column("question", "question"), Column("gold", "gold answers"),
               Column("base_answer", "base answer", right="base_correct"),
               Column("finetuned_answer", "fine-tuned answer", right="finetuned_correct"),
               *([Column("repair_answer", f"best repair: {repair[0]}, test facts", right="repair_correct")] if repair else []),
               Column("base_level", "base level", numeric=True), Column("finetuned_level", "fine-tuned level", numeric=True),
               Column("transition", "transition"), Column("kl", "first-token KL", numeric=True, digits=4)]
    filters = [Filter("transition", "transition", TRANSITIONS),
               Filter("relation", "relation", tuple(sorted({f["relation"] for f in facts}))),
               Filter("domain", "domain", tuple(sorted({f["domain"] for f in facts}))),
               Filter("base_level", "base level", tuple(sorted({f["base_level"] for f in facts})))]
    text = (f"Every audited fact ({len(facts)}; DIR/facts.jsonl holds the same rows): its gold answers (with aliases), "
            "each model's greedy answer (✓ right, ✗ wrong)"
            + (f", the best repair's on the held-out test facts ({repair[0]}: the best dev objective; the dev facts "
               "chose it)"
               if repair else "")
            + ", both mastery levels, the transition and the first-token KL. In the HTML report: filter by transition, "
            "relation, domain and base level, search any words of a row, click a column header to sort (again: "
            "reversed).")
    html = explorer_html("facts", rows, columns, filters, search=["fact_id", "question", "gold", "base_answer",
                                                                  "finetuned_answer", "repair_answer"], row_id="fact_id")
    return Section("Every fact", text, html=html)


def header_lines(record: dict, audit_dir: Path, page: Path | None) -> list[str]:
    sessions = record.get("sessions", [])
    if not sessions:
        return ["No run record in this audit folder."]
    wall = sum(s.get("wall_s", 0.0) for s in sessions)
    codes = list(dict.fromkeys(s["code"] for s in sessions))
    dirty = [c for c in codes if c.endswith("+dirty")]
    lines = [f"- Audit run: `{sessions[0]['command']}` ({len(sessions)} session(s)), started "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(sessions[0]['started']))}",
             f"- Wall time: **{wall / 60:.1f} min** (sum over sessions)", f"- Machine: {sessions[-1]['machine']}",
             f"- Code: sftlens at git commit `{', '.join(codes)}`"]
    if dirty:
        lines.append("- **Warning: `+dirty` code**: the run had uncommitted changes; no commit reproduces these numbers.")
    if page is not None:
        lines.append(f"- This page: `sftlens audit --out {audit_dir} --page {page}` (every number comes from the audit folder)")
    return lines


def focus_ids(audit_dir: Path, record: dict, focus_file: str | Path | None) -> tuple[list[str], str] | None:
    """The taught facts: --focus-facts, else the base model folder's sftlens_inject.json, if any."""
    if focus_file is not None:
        return read_focus(focus_file), str(focus_file)
    base = Path(record.get("folders", {}).get("base", ""))
    taught = taught_facts(base)
    return None if taught is None else (sorted(taught), str(base / RECORD_FILE))


def write_audit_report(audit_dir: str | Path, page: str | Path | None = None,
                       focus_file: str | Path | None = None) -> dict[str, Path]:
    audit_dir = Path(audit_dir)
    try:
        summary = json.loads((audit_dir / "summary.json").read_text())
        record = json.loads((audit_dir / "audit.json").read_text())
        facts = read_jsonl(audit_dir / "facts.jsonl")
    except (OSError, json.JSONDecodeError) as err:
        raise SftlensError(f"{audit_dir}: not a finished audit ({err})") from None
    out = audit_dir / "report"
    parts = [transitions_section(summary, out), greedy_section(summary, out), repair_section(summary),
             movement_section(summary)]
    focus = focus_ids(audit_dir, record, focus_file)
    if focus is not None:
        parts.append(focus_section(summary, facts, *focus))
    parts.append(facts_section(summary, facts, audit_dir))
    audit = summary["audit"]
    title = f"sftlens audit: {audit['finetuned']} against {audit['base']} ({summary['facts']} facts)"
    paths = write_sections(title, parts, out)
    if page is not None:
        paths["page"] = write_page(Path(page), title, parts, header_lines(record, audit_dir, Path(page)))
    return paths
