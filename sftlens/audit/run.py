"""`sftlens audit`: run (resumable, one writer: the CLI holds the folder's lock), `--plan`, the report."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from sftlens.audit.config import SELECTION_KEYS, Audit, AuditConfig, preset
from sftlens.audit.engine import (
    FORMAT,
    ROLES,
    Context,
    deltas_output,
    deltas_step,
    fact_rows,
    greedy_output,
    greedy_step,
    kl_output,
    kl_step,
    objective_ids,
    prepare,
    probe_step,
    probe_store,
    repair_step,
    repair_targets,
    write_best,
)
from sftlens.audit.importances import importance_plan, importance_step
from sftlens.audit.report import write_audit_report
from sftlens.audit.summary import summarize_audit
from sftlens.config import add_config_arguments, config_from_dict
from sftlens.data import add_fact_source_arguments
from sftlens.errors import SftlensError
from sftlens.io import atomic_write_json, atomic_write_jsonl, read_jsonl
from sftlens.markdown import markdown_table
from sftlens.probe import LEVELS, ProbeConfig, load_probe, template_indices
from sftlens.reporting.costs import AUDIT_RATES, RATES_FROM
from sftlens.reporting.provenance import code_version, machine
from sftlens.weights import METHODS
from sftlens.weights.checkpoints import open_pair


def run_steps(ctx: Context, best: bool = False) -> dict:
    """Every step in order (finished ones skipped); returns the summary the report reads."""
    probes, greedy = {}, {}
    for role in ROLES:
        with ctx.timed(f"probe {role}"):
            probes[role] = probe_step(ctx, role)
        levels = Counter(r.level for r in probes[role].values())
        ctx.tell(f"probe {role}: {len(probes[role])} facts, levels 0-4: {' / '.join(str(levels[lv]) for lv in LEVELS)}")
    for role in ROLES:
        with ctx.timed(f"greedy {role}"):
            greedy[role] = greedy_step(ctx, role)
        ctx.tell(f"greedy {role}: {sum(greedy[role]['correct'].values())} of {len(ctx.facts)} facts answered right")
    with ctx.timed("first-token KL"):
        kl = kl_step(ctx, probes["base"])
    if kl["summary"]["n"]:
        ctx.tell(f"first-token KL: mean {kl['summary']['mean']:.4f}, median {kl['summary']['median']:.4f} "
                 f"over {kl['summary']['n']} facts")
    ctx.release("base")
    with ctx.timed("update concentration"):
        deltas = deltas_step(ctx)
    top = deltas["concentration"]["relative"]
    ctx.tell(f"update concentration: the top {top['ratios'][0]:g} % of elements hold "
             f"{100 * top['shares'][0]:.1f} % of the relative change")
    rows = fact_rows(ctx, probes, greedy, kl)
    atomic_write_jsonl(ctx.out / "facts.jsonl", rows)
    with ctx.timed("fact importances (guided)"):
        importance_step(ctx, greedy)
    repairs = repair_step(ctx, rows)
    ctx.models.clear()
    summary = summarize_audit(ctx, rows, kl, deltas, repairs)
    if best:
        summary["best"] = str(write_best(ctx, repairs).relative_to(ctx.out))
    atomic_write_json(ctx.out / "summary.json", summary)
    return summary


RECORD = "audit.json"
# The rates are SmolLM2-135M's on this project's 2-core CPU (`sftlens.reporting.costs.AUDIT_RATES`); a larger
# model scales them by its parameter count. Update concentration: 3 metrics x (2 selection passes + 1 sum
# pass) + the zero-base pass.
REFERENCE_PARAMETERS = 134.5e6
DELTAS_PASSES = 10
# Before the greedy answers, the share of dev facts whose correctness differs between the two models (the
# facts the repair objective reads) is not known: the plan assumes this one, between the 4 % of the
# 1,008-fact bench pair and the 17 % of the demo's pair (2026-12-06). Under --objective acc every dev fact.
READ_SHARE = 0.15


def read_record(out: Path) -> dict:
    path = out / RECORD
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SftlensError(f"{path}: unreadable audit record ({err})") from None
    if record.get("format") != FORMAT:
        raise SftlensError(f"{path}: not an audit record of format {FORMAT}")
    return record


def run_audit(audit: Audit, out: str | Path, *, write_best: bool = False, progress: bool = True,
              command: str | None = None, page: str | Path | None = None, focus: str | Path | None = None,
              announce: Callable[[str], None] | None = None) -> dict:
    """Check everything, run every unfinished step, write the report (DIR/report/, and `page`);
    returns the summary (DIR/summary.json) with the report's files under `report`. `announce`
    receives the plan (the work left and its estimated time) before anything runs, then a line per
    finished step; `progress`: the steps' bars."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SftlensError(f"{out}: exists and is not a folder; choose another --out")
    ctx = prepare(audit, out, progress)
    ctx.announce = announce
    if announce is not None:
        announce(plan_text(ctx))
    record = read_record(out)
    start, started = time.perf_counter(), time.time()
    base = {"format": FORMAT, "audit": audit.to_dict(), "folders": ctx.folders}
    atomic_write_json(out / RECORD, {**base, "sessions": record.get("sessions", [])})
    summary = run_steps(ctx, write_best)
    session = {"command": command or "sftlens audit (in-process)", "code": code_version(), "machine": machine(),
               "started": started,
               "wall_s": round(time.perf_counter() - start, 1),
               # each step's seconds, named as the plan names them (its rates are measured from these)
               "steps": {step: round(seconds, 1) for step, seconds in ctx.seconds.items()}}
    atomic_write_json(out / RECORD, {**base, "sessions": [*record.get("sessions", []), session]})
    return {**summary, "report": write_audit_report(out, page, focus)}


def _stored_records(store: Path) -> dict:
    return load_probe(store) if (store / "probe.json").is_file() else {}


def dev_facts_read(ctx: Context) -> set[str] | None:
    """The dev facts the repair objective reads (`sftlens.audit.engine.objective_ids`), None while the
    greedy answers that decide them are not there."""
    greedy = {role: greedy_output(ctx, role).finished() for role in ROLES}
    if not all(greedy.values()):
        return None
    rows = [{"fact_id": f.id, "slice": ctx.slice_of[f.id], **{f"{role}_correct": greedy[role]["correct"][f.id]
                                                              for role in ROLES}} for f in ctx.facts]
    return objective_ids(ctx, rows)


def plan_rows(ctx: Context) -> list[list]:
    """(step, work to run, its unit, estimated seconds) for every step; finished work counts as none."""
    pair = open_pair(ctx.folders["base"], ctx.folders["finetuned"])
    scale = sum(pair.numel(n) for n in pair.base.shapes) / REFERENCE_PARAMETERS
    draws = len(template_indices(ctx.facts, ctx.probe)) * ctx.audit.probe.samples
    n = len(ctx.facts)
    rows = []
    # Finished work is what the steps themselves would skip: the same outputs and keys (`sftlens.io.KeyedOutput`).
    stored = {role: _stored_records(probe_store(ctx, role)) for role in ROLES}
    ids = sorted({f.id for f in ctx.facts})
    for role in ROLES:
        todo = len(ids) - len(set(stored[role]) & set(ids))
        rows.append([f"probe {role}", todo * draws, "samples", todo * draws * AUDIT_RATES["probe"] * scale])
    for role in ROLES:
        work = 0 if greedy_output(ctx, role).done() else n
        rows.append([f"greedy {role}", work, "answers", work * AUDIT_RATES["answer"] * scale])
    # KL's key needs the base's probe records (each relation's best template): not done until they are all there
    kl_work = 2 * n
    if all(i in stored["base"] for i in ids):
        output = kl_output(ctx, {i: stored["base"][i] for i in ids})
        partial = output.log()  # a killed step's finished chunks are not computed again
        logged = {r["fact_id"] for r in read_jsonl(partial)} if partial.is_file() else set()
        kl_work = 0 if output.done() else 2 * (n - len(logged & set(ids)))
    rows.append(["first-token KL", kl_work, "forward passes", kl_work * AUDIT_RATES["kl"] * scale])
    deltas_done = deltas_output(ctx).done()
    rows.append(["update concentration", 0 if deltas_done else DELTAS_PASSES, "weight passes",
                 0 if deltas_done else AUDIT_RATES["deltas"] * scale])
    # The dev facts whose correctness differs between the models: the facts the objective reads and the guided
    # repair weighs. Until the greedy answers are there, their number is READ_SHARE's estimate.
    dev = sum(v == "dev" for v in ctx.slice_of.values())
    read = dev_facts_read(ctx)
    moved = round(READ_SHARE * dev) if read is None else len(read)
    importance_work, guided_skipped = importance_plan(ctx)
    guided_ready = importance_work == 0 and not guided_skipped
    work = moved if importance_work is None else importance_work
    rows.append(["fact importances (guided)", work, "forward+backward passes",
                 (work * AUDIT_RATES["importance"] + (AUDIT_RATES["importance_file"] if work else 0)) * scale])
    for part in ("dev", "test"):
        answers, edits = repair_work(ctx, part, read, dev if ctx.settings.objective == "acc" else moved,
                                     guided_ready, guided_skipped)
        rows.append([f"repairs on {part}", answers, f"answers ({edits} edits)",
                     (answers * AUDIT_RATES["answer"] + edits * AUDIT_RATES["edit"]) * scale])
    return rows


def repair_work(ctx: Context, part: str, read: set[str] | None, read_n: int, guided_ready: bool,
                guided_skipped: bool) -> tuple[int, int]:
    """(greedy answers, edited models) the repairs on `part` have left: on dev every candidate of every method
    on the facts the objective reads (`read`; before the greedy answers, `read_n` of them), on test each
    method's chosen value on every test fact."""
    answers = edits = 0
    test = len(ctx.facts) - sum(v == "dev" for v in ctx.slice_of.values())
    for method, values in ctx.values.items():
        if "importances" in METHODS[method].settings and not guided_ready:  # not keyed before its importances
            if not guided_skipped:
                answers += len(values) * read_n if part == "dev" else test
                edits += len(values) if part == "dev" else 1
            continue
        if part == "test":
            done = any((ctx.out / "repairs" / "test").glob(f"{method}-*.json"))
            answers, edits = answers + (0 if done else test), edits + (0 if done else 1)
            continue
        if read is None:
            answers, edits = answers + len(values) * read_n, edits + (len(values) if read_n else 0)
            continue
        facts, _, outputs = repair_targets(ctx, method, values, part, read)
        todo = [v for v in values if not outputs[v].done()] if facts else []
        answers, edits = answers + len(facts) * len(todo), edits + len(todo)
    return answers, edits


def plan_text(ctx: Context) -> str:
    rows = plan_rows(ctx)
    total = sum(r[3] for r in rows)
    table = markdown_table(["step", "work to run", "unit", "est. time"],
                           [[s, f"{w:,}", u, f"{sec / 60:.1f} min"] for s, w, u, sec in rows] +
                           [["**all**", "", "", f"{total / 60:.1f} min"]], "lrlr")
    methods = ", ".join(f"{m} ({', '.join(f'{v:g}' for v in vs)})" for m, vs in ctx.values.items())
    dev = sum(v == "dev" for v in ctx.slice_of.values())
    return (f"audit of {len(ctx.facts)} facts ({dev} dev, {len(ctx.facts) - dev} test); candidates: {methods}\n{table}\n"
            f"(rates: {RATES_FROM}; scaled by parameter count)")


# --- CLI ------------------------------------------------------------------------------------


def _given(args: argparse.Namespace, cls) -> dict:
    names = {f for f in cls.__dataclass_fields__}
    return {k: v for k, v in vars(args).items() if k in names}


def _values(items: list[str]) -> tuple:
    out = {}
    for item in items or ():
        method, sep, text = item.partition("=")
        if not sep or not text.strip():
            raise SftlensError(f"--values {item!r}: expected METHOD=V1,V2,... (e.g. wise=0.25,0.5,0.75)")
        out[method.strip()] = tuple(x.strip() for x in text.split(",") if x.strip())
    return tuple(sorted(out.items()))


def audit_from_args(args: argparse.Namespace) -> Audit:
    if args.base is None and args.finetuned is None:
        record = read_record(Path(args.out))
        if not record:
            raise SftlensError(f"{args.out}: no audit there yet; give --base and --finetuned")
        return Audit.from_dict(record["audit"], str(Path(args.out) / RECORD))
    if args.base is None or args.finetuned is None:
        raise SftlensError("give both --base and --finetuned")
    chosen = preset(args.preset) if args.preset else {}
    given = {k: getattr(args, k) for k in SELECTION_KEYS if getattr(args, k) is not None}
    selection = {**chosen.get("selection", {}), **given}
    probe = config_from_dict(ProbeConfig, {**chosen.get("probe", {}), **_given(args, ProbeConfig)}, "probe")
    settings = config_from_dict(AuditConfig, {**chosen.get("audit", {}), **_given(args, AuditConfig)}, "audit")
    return Audit(args.base, args.finetuned, probe=probe, settings=settings, values=_values(args.values), **selection)


def _run(args: argparse.Namespace) -> None:
    audit = audit_from_args(args)
    if args.plan:
        print(plan_text(prepare(audit, args.out)))
        return
    quiet = getattr(args, "quiet", False)  # sftlens --quiet: the result lines only
    summary = run_audit(audit, args.out, write_best=args.write_best, page=args.page, focus=args.focus_facts,
                        progress=not quiet, announce=None if quiet else print,
                        command=" ".join(["sftlens", *sys.argv[1:]]) if "audit" in sys.argv[1:3] else None)
    a = summary["all"]
    print(f"{summary['facts']} facts: {a['kept']} kept, {a['forgotten']} forgotten, {a['learned']} learned, "
          f"{a['never']} never right")
    for reason in summary.get("skipped_repairs", {}).values():
        print(reason)
    for path in summary["report"].values():
        print(path)
    if "best" in summary:
        print(f"chosen repaired model: {Path(args.out) / summary['best']}")


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "audit", help="audit a fine-tune against its base: forgotten and learned facts, and which repair undoes the harm",
        description="Probe and greedily answer the same facts with a base model and its fine-tune, report the "
                    "knowledge transitions, KL and update concentration, and tune every repair method on dev facts "
                    "(one budget), scored on held-out facts. Re-run to resume; without --base/--finetuned, the "
                    "audit recorded in --out is re-run (a no-op when finished) and its report rewritten.",
        epilog=f"Preset audit-demo: {os.linesep}sftlens audit --preset audit-demo --base B --finetuned F --out DIR")
    parser.add_argument("--base", help="base model: built-in name, local folder or hub id")
    parser.add_argument("--finetuned", help="fine-tuned model of the same architecture and shape")
    parser.add_argument("--out", required=True, help="the audit folder")
    parser.add_argument("--preset", help="audit-demo: a small sizing for the embedded model on CPU")
    add_fact_source_arguments(parser)
    parser.add_argument("--relations", help="comma list of relation ids (or a fact set's topics), or in/out/all "
                                            "(default: all)")
    parser.add_argument("--split", help="comma list of train,dev,test (default: test)")
    parser.add_argument("--limit", type=int, help="first N facts per relation and split")
    parser.add_argument("--values", action="append", metavar="METHOD=V1,V2,...",
                        help="a repair method's candidate values (as many as --candidates; repeatable)")
    parser.add_argument("--write-best", action="store_true", help="write the chosen repaired model to DIR/best/")
    parser.add_argument("--plan", action="store_true", help="print the work and a time estimate, run nothing")
    parser.add_argument("--page", help="also write a results page (Markdown, PNGs beside it) to this file")
    parser.add_argument("--focus-facts", help="taught fact ids (one per line, or a JSON list): the report adds their "
                                              "recall (default: the base folder's sftlens_inject.json, if any)")
    # A question-only topic is probed in the audit's --prompt style (`engine.prepare`): no flag of its own.
    add_config_arguments(parser, ProbeConfig, exclude=("question_prompt",))
    add_config_arguments(parser, AuditConfig)
    parser.set_defaults(func=_run, writes="out")
