"""`sftlens report DIR`: a study's report, rebuilt from its database alone.

Findings come first (each of the paper's claims, `sftlens.study.report.findings`, with its effect, 95 %
interval, n and a verdict from the rule in `sftlens.reporting.bootstrap`), then every table and figure of
the paper (`sftlens.study.report.sections`). Written as a self-contained HTML page (figures embedded) and
Markdown with the PNGs beside it (`sftlens.reporting.page`, the writer the audit report shares). `--page
FILE` also writes a results page for a repository: the same Markdown, headed by the command, date, wall
time, machine and code version of the run and a summary of the verdicts, with its PNGs beside it.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from sftlens.evaluate import MIN_N
from sftlens.reporting.page import Section, interval_text, write_page, write_sections
from sftlens.reporting.provenance import code_version
from sftlens.study.report.findings import (
    CLAIMS,
    EXPECTED,
    NOT_TESTED,
    Finding,
    arm_findings,
    verdict_changes,
    verdict_word,
)
from sftlens.study.report.prevention_section import answer_of, prevention_section
from sftlens.study.report.repair_section import repair_methods
from sftlens.study.report.results import (
    StudyResults,
    arm_view,
    arms,
    eval_records,
    level_name,
    load_results,
    restore_records,
    tuned_rates,
)
from sftlens.study.report.sections import (
    figure2,
    figure4,
    figure5,
    restoration,
    table1,
    table2,
    table3,
    table4,
    table5,
    table6,
)
from sftlens.study.report.taught_section import taught_claims, taught_sections

EFFECT_FORMAT = {"pts": (100.0, 1, "+", " pts"), "KL": (1.0, 4, "+", ""), "r": (1.0, 2, "+", ""), "%": (100.0, 1, "", " %")}


def effect_text(finding: Finding) -> str:
    if finding.effect is None:
        return "–"
    scale, digits, sign, suffix = EFFECT_FORMAT[finding.unit]
    return interval_text(finding.effect, scale, digits, sign) + suffix


EVIDENCE_HEADER = ["claim", "comparison", "effect [95 % CI]", "n", "verdict"]


def evidence_rows(found: list[Finding]) -> list[list[str]]:
    return [[f.claim, f.comparison, effect_text(f), f.n, f.verdict] for f in found]


def findings_section(results: StudyResults, samples: int, study_dir: Path | None = None
                     ) -> tuple[Section, dict[str, list[Finding]]]:
    """The claims on the study's models (on a taught base, C1, C4 and C6 again on the taught facts alone); with a
    tuned arm, on each arm and which verdicts the tuned rate changes. Returns the section and the findings per arm
    ("tuned" first when there is one)."""
    by_arm = dict(sorted(arm_findings(results, samples).items(), key=lambda kv: kv[0] != "tuned"))
    if study_dir is not None:
        views = {arm: arm_view(results, arm) if len(by_arm) > 1 else results for arm in by_arm}
        by_arm = {arm: found + taught_claims(views[arm], study_dir, samples) for arm, found in by_arm.items()}
    claims = [[claim, text, EXPECTED[claim]] for claim, text in CLAIMS.items()]
    text = (f"Each claim of the paper, tested on this study. Effects with a 95 % percentile bootstrap interval "
            f"({samples} resamples; test facts resampled within each level, paired wherever the same facts are "
            "compared; seeds resampled within each arm, paired where both arms are the same models). Verdict rule, "
            "fixed in code before any run: holds = the whole interval lies on the side the paper predicts; reversed = "
            f"wholly on the other side; inconclusive = it contains 0 (or the threshold); levels with fewer than {MIN_N} "
            "facts never enter a verdict. Accuracies are in-domain Acc over the test levels with enough facts.")
    tables = [("the claims", ["claim", "statement", "the paper predicts"], claims)]
    if "tuned" not in by_arm:
        evidence = ("the evidence", EVIDENCE_HEADER, evidence_rows(by_arm["fixed"]))
        return Section("Findings", text, [*tables, evidence]), by_arm
    rate = results.config.get("train", {}).get("learning_rate")
    candidates = " / ".join(f"{r:g}" for r in results.config.get("study", {}).get("learning_rates", []))
    text += (f" Two arms: SFT at the learning rate chosen on in-domain dev among {candidates} (the tuned arm: "
             f"{RATE_CHOICE_TEXT.get(results.config['study'].get('rate_choice'), '')}; "
             f"chosen: {_chosen_text(results)}; "
             "the analyses, C5 and C6 and the tables below, read its models) and SFT at [train]'s fixed rate "
             f"{rate:g} (the paper's recipe, not tuned). The last table pairs each comparison across the arms: "
             "which verdicts the tuned rate changes.")
    changes = [[(a or b).claim, (b or a).comparison, _verdict_cell(a), _verdict_cell(b), change]
               for a, b, change in verdict_changes(by_arm["fixed"], by_arm["tuned"])]
    tables += [(f"the evidence, tuned rate (among {candidates})", EVIDENCE_HEADER, evidence_rows(by_arm["tuned"])),
               (f"the evidence, [train]'s fixed rate {rate:g} (not tuned)", EVIDENCE_HEADER,
                evidence_rows(by_arm["fixed"])),
               ("verdicts that change with the tuned rate",
                ["claim", "comparison (tuned arm)", f"lr {rate:g} (fixed)", "tuned lr", "verdict"], changes)]
    return Section("Findings", text, tables), by_arm


RATE_CHOICE_TEXT = {"largest": "one rate per training set, chosen at its largest size and used at every size",
                    "per-size": "one rate per training set and size"}


def _chosen_text(results: StudyResults) -> str:
    """The tuned arm's rates: `D_train-0 n=60, 240: 0.0001; ...`, one entry per training set and rate."""
    sizes: dict[tuple, list] = {}
    for (level, size), by_seed in tuned_rates(results).items():
        for rate in sorted(set(by_seed.values())):
            sizes.setdefault((level, rate), []).append(size)
    return "; ".join(f"{level_name(level)} n={', '.join(map(str, s))}: {rate:g}"
                     for (level, rate), s in sizes.items()) or "–"


def _verdict_cell(finding: Finding | None) -> str:
    return "–" if finding is None else f"{effect_text(finding)}: {finding.verdict}"


def verdict_summary(by_arm: dict[str, list[Finding]]) -> list[str]:
    """One line per claim: how its comparisons came out (in the tuned arm, when there is one), and
    which verdicts the tuned rate changes."""
    found = next(iter(by_arm.values()))
    lines = []
    for claim, statement in CLAIMS.items():
        mine = [verdict_word(f) for f in found if f.claim == claim]
        counts = Counter(mine)
        parts = [f"{word} in {counts[word]}" for word in ("holds", "reversed", "inconclusive", NOT_TESTED) if counts[word]]
        zero = sum(1 for f in found if f.claim == claim and f.effect and f.effect.low == f.effect.high == 0)
        note = f" In {zero} of them the effect is exactly 0: not one prediction changed." if zero else ""
        lines.append(f"- **{claim}** {statement} — {', '.join(parts)} of {len(mine)} comparison(s).{note}")
    if "tuned" in by_arm:
        changed = [f"{b.claim} {b.comparison}: {verdict_word(a)} -> {verdict_word(b)}"
                   for a, b, change in verdict_changes(by_arm["fixed"], by_arm["tuned"]) if change == "changed"]
        lines.append("- Verdicts at the tuned learning rate; against [train]'s fixed rate, "
                     + (f"{len(changed)} change: " + "; ".join(changed) if changed else "none changes") + ".")
    return lines


def run_header(results: StudyResults, study_dir: Path, page: Path) -> list[str]:
    sessions = results.sessions
    units = Counter(u["state"] for u in results.units)
    if not sessions:
        return ["No run record in this study's database (it predates run records)."]
    wall = sum(s.get("wall_s", 0.0) for s in sessions)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(sessions[0]["started"]))
    codes = ", ".join(dict.fromkeys(s["code"] for s in sessions))
    lines = [
        f"- Study run: `{sessions[0]['command']}` ({len(sessions)} session(s)), started {started}",
        f"- Wall time: **{wall / 60:.1f} min** (sum over sessions); units: "
        + ", ".join(f"{n} {state}" for state, n in sorted(units.items())),
        *(["- Skipped (nothing to report): " + "; ".join(f"{label}: {why}" for label, why in skipped.items())]
          if (skipped := results.skipped()) else []),
        f"- Machine: {sessions[-1]['machine']}",
        f"- Code: sftlens at git commit `{codes}`",
        f"- This page: `sftlens report {study_dir} --page {page}`, by sftlens `{code_version()}` (every number below "
        "comes from the study database; re-running the command regenerates the page)",
    ]
    return lines


def sections(results: StudyResults, out: Path) -> tuple[list[Section], dict[str, list[Finding]]]:
    """The report's sections; with a tuned arm, the paper's tables show the tuned models (the Findings
    and "Repair methods" show both arms)."""
    study = results.config.get("study", {})
    samples = study.get("bootstrap", 1000)

    def png(name: str) -> Path:
        return out / f"{name}.png"

    found_section, found = findings_section(results, samples, out.parent)
    shown = arm_view(results, "tuned") if "tuned" in arms(results) else results
    records, sweeps = eval_records(shown), restore_records(shown)
    selection, chosen = restoration(shown, records, png("restoration"), samples)
    size = study.get("table_size")
    parts = [found_section, table1(shown), figure2(records, png("figure2")), table2(records, size),
             figure4(records, png("figure4")), figure5(shown, png("figure5")), table3(shown), table4(sweeps),
             table5(sweeps), selection, table6(records, sweeps, chosen, size)]
    # a section whose every table came out empty and which has no figure (e.g. Table 4 without a restoration sweep)
    parts = [p for p in parts if not p.tables or p.figure or any(rows for _, _, rows in p.tables)]
    repairs = repair_methods(results, png("repairs"), samples)
    prevention = prevention_section(results, out.parent, png("prevention"), samples)
    # with guards, the answer to the study's question comes first
    head = [prevention] if prevention else []
    return head + parts + ([repairs] if repairs else []) + taught_sections(results, out, size), found


def write_report(study_dir: str | Path, page: str | Path | None = None) -> dict[str, Path]:
    """Write `report/report.html` (self-contained) and `report/report.md` (+ PNGs) under the study,
    and, with `page`, a results page (Markdown, PNGs beside it named `<page stem>-<figure>.png`)."""
    study_dir = Path(study_dir)
    results = load_results(study_dir)
    out = study_dir / "report"
    parts, found = sections(results, out)
    model = results.config.get("study", {}).get("model", "?")
    paths = write_sections(f"sftlens study report: {results.source} ({model})", parts, out)
    if page is not None:
        page = Path(page)
        prevention = next((p for p in parts if p.title == "Prevention and cure"), None)
        answer = [f"**{answer_of(prevention)}**", ""] if prevention else []
        preamble = [*answer, *run_header(results, study_dir, page), "", "**Summary of the verdicts at this scale** "
                    "(generated from the Findings table below):", "", *verdict_summary(found)]
        paths["page"] = write_page(page, f"Results: {results.source} study of {model}", parts, preamble)
    return paths


def _run_report(args) -> None:
    for path in write_report(args.dir, args.page).values():
        print(path)


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("report", help="a study's report (HTML + Markdown), rebuilt from its database")
    parser.add_argument("dir", help="study directory (holding study.db)")
    parser.add_argument("--page", help="also write a results page (Markdown, PNGs beside it) to this file")
    parser.set_defaults(func=_run_report)
