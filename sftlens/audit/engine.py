"""The audit's resumable steps under its folder, each keyed by its inputs and written atomically.

    DIR/audit.json                   the audit (models, facts, settings) and its sessions
    DIR/probe/{role}-{model}-{key}/  probe stores (`sftlens.probe.run_probe`: resumable fact by fact)
    DIR/steps/greedy-{role}.json     greedy answers (a partial log resumes a killed step)
    DIR/steps/kl.json, deltas.json   first-token KL per fact; update concentration, zero-base check
    DIR/repairs/{dev,test}/M-V.json  a repair value's answers on the dev (every candidate) or test
                                     facts (the value chosen on dev)
    DIR/facts.jsonl, summary.json    per fact; everything the report reads
    DIR/best/                        with --write-best: the chosen repaired model and how it was chosen

A step whose file holds its key is skipped; a changed input changes the key and re-runs the step.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from sftlens.analysis.deltas import DeltasConfig, concentration, zero_base_mass
from sftlens.analysis.kl import first_token_kl, summarize_kl
from sftlens.audit import repairs as rp
from sftlens.audit.checks import check_pair
from sftlens.audit.config import Audit
from sftlens.audit.prompts import prompt_tokenizer, question_prompt, require_chat_template
from sftlens.audit.transitions import transition
from sftlens.errors import SftlensError
from sftlens.evaluate import EvalConfig, evaluate_model
from sftlens.io import JsonlAppender, atomic_write_json, atomic_write_jsonl, read_jsonl, stable_hash
from sftlens.models import load_model, load_tokenizer, model_fingerprint
from sftlens.probe import ProbeConfig, best_templates, default_store, run_probe
from sftlens.taught import held_out_templates
from sftlens.weights import METHODS, RepairConfig, repair_sweep, repaired_models
from sftlens.weights.selection import DEFAULT_RATIOS

ROLES = ("base", "finetuned")
METRICS = ("absolute", "relative", "relative_nonzero")
FORMAT = 1


@dataclass
class Context:
    """A checked audit, ready to run: nothing is written before it exists."""

    audit: Audit
    out: Path
    folders: dict[str, str]  # role -> local model folder
    facts: list
    slice_of: dict[str, str]  # fact id -> dev | test
    values: dict[str, tuple[float, ...]]  # method -> candidates
    prompts: dict[str, list[str]]  # role -> prompt per fact
    fingerprints: dict[str, str]
    # Both models' probe settings: on an injected base, its held-out templates for the fine-tune too
    # (which carries no inject record), so both are probed with the same draws.
    probe: ProbeConfig
    progress: bool = True
    models: dict = field(default_factory=dict)

    @property
    def settings(self):
        return self.audit.settings

    def eval_config(self) -> EvalConfig:
        return EvalConfig(max_new_tokens=self.settings.answer_tokens, dtype=self.audit.probe.dtype)

    def model(self, role: str):
        if role not in self.models:
            self.models[role] = load_model(self.folders[role], dtype=self.audit.probe.dtype)
        return self.models[role]

    def release(self, role: str) -> None:
        self.models.pop(role, None)

    def edited(self):
        """The one model every repair edits in place (the fine-tuned model, taken over once): each
        in-memory edit rewrites the whole region, the same for every method, from the checkpoints,
        so no earlier edit leaks into the next."""
        if "edited" not in self.models:
            self.models["edited"] = self.models.pop("finetuned", None) or \
                load_model(self.folders["finetuned"], dtype=self.audit.probe.dtype)
        return self.models["edited"]

    def rows(self, role: str) -> list[dict]:
        """Evaluation rows of the facts with `role`'s prompts; `level` is a placeholder (the audit
        groups answers by the probed levels itself)."""
        return [{"fact_id": f.id, "relation": f.relation, "domain": f.domain, "level": 0, "question": f.question,
                 "answers": list(f.accepted_answers), "prompt": p} for f, p in zip(self.facts, self.prompts[role])]


def prepare(audit: Audit, out: str | Path, progress: bool = True) -> Context:
    """Every check on the inputs (models, facts, slices, candidate values, chat templates)."""
    facts = audit.selected_facts()
    slice_of = rp.slices(facts, audit.settings.dev_share, audit.probe.seed, audit.settings.min_slice)
    given = dict(audit.values)
    unknown = sorted(set(given) - set(METHODS))
    if unknown:
        raise SftlensError(f"--values {unknown[0]}: unknown repair method (known: {', '.join(METHODS)})")
    values = {m: rp.candidates(m, audit.settings.candidates, given.get(m)) for m in METHODS}
    folders = dict(zip(ROLES, check_pair(audit.base, audit.finetuned)))
    prompts = {}
    for role in ROLES:
        tokenizer = load_tokenizer(folders[role])
        if audit.settings.prompt == "chat":
            require_chat_template(tokenizer, f"--{role} {getattr(audit, role)}")
        prompts[role] = [question_prompt(tokenizer, f.question, audit.settings.prompt) for f in facts]
    fingerprints = {role: model_fingerprint(folders[role]) for role in ROLES}
    probe = held_out_templates(folders["base"], audit.probe, facts)
    if any(f.question_only for f in facts):
        # A question-only topic is probed with the question as the audit asks it (plain or chat); only
        # then, so an audit of template topics keeps its probe stores' keys.
        probe = replace(probe, question_prompt=audit.settings.prompt)
    return Context(audit, Path(out), folders, facts, slice_of, values, prompts, fingerprints, probe, progress)


# --- steps ----------------------------------------------------------------------------------


def _cached(path: Path, key: str) -> dict | None:
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
        data = json.loads(path.read_text())
        if data.get("key") == key:
            return data
    return None


def probe_store(ctx: Context, role: str) -> Path:
    """A store per model and probe settings (`default_store`'s name), so changed settings re-probe."""
    return ctx.out / "probe" / f"{role}-{default_store(ctx.folders[role], ctx.probe).name}"


def probe_step(ctx: Context, role: str) -> dict:
    """Mastery of every fact, probed with the same seeded draws for both models."""
    return run_probe(ctx.folders[role], ctx.facts, ctx.probe, probe_store(ctx, role), ctx.progress)


def greedy_key(ctx: Context, role: str, rows: list[dict], edit: dict | None = None) -> str:
    return stable_hash({"format": FORMAT, "model": ctx.fingerprints[role], "edit": edit, "tokens": ctx.settings.answer_tokens,
                        "dtype": ctx.audit.probe.dtype, "rows": [(r["fact_id"], r["prompt"], r["answers"]) for r in rows]})


def _answers(ctx: Context, path: Path, key: str, model, tokenizer, rows: list[dict]) -> dict:
    """Greedy answers of `rows`, resumable: finished batches go to a partial log first."""
    partial = path.with_name(f".{path.stem}.{key}.partial.jsonl")
    done = {r["fact_id"]: r for r in read_jsonl(partial)} if partial.is_file() else {}
    todo = [r for r in rows if r["fact_id"] not in done]
    if todo:
        with JsonlAppender(partial) as log:
            def persist(batch):
                for _, p in batch:
                    log.write({"fact_id": p["fact_id"], "answer": p["prediction"], "correct": p["correct"]})

            for p in evaluate_model(model, tokenizer, todo, ctx.eval_config(), ctx.progress, on_batch=persist):
                done[p["fact_id"]] = {"fact_id": p["fact_id"], "answer": p["prediction"], "correct": p["correct"]}
    result = {"key": key, "answers": {r["fact_id"]: done[r["fact_id"]]["answer"] for r in rows},
              "correct": {r["fact_id"]: bool(done[r["fact_id"]]["correct"]) for r in rows}}
    atomic_write_json(path, result)
    partial.unlink(missing_ok=True)
    return result


def greedy_step(ctx: Context, role: str) -> dict:
    rows = ctx.rows(role)
    path, key = ctx.out / "steps" / f"greedy-{role}.json", greedy_key(ctx, role, rows)
    cached = _cached(path, key)
    if cached is not None:
        return cached
    model, tokenizer = ctx.model(role)
    return _answers(ctx, path, key, model, prompt_tokenizer(tokenizer, ctx.settings.prompt), rows)


def kl_step(ctx: Context, base_records: dict) -> dict:
    """The paper's first-token top-k KL per fact (plain: each relation's best probe template for
    both models; chat: each model's chat-rendered question)."""
    templates = best_templates(base_records, ctx.facts)
    chat = ctx.settings.prompt == "chat"
    # Question-only facts' plain prompts are keyed, as they were the bare question before the QA format
    # (only where there are some, so other audits keep their keys).
    asked = [f.probe_prompt(0) for f in ctx.facts if f.question_only and not chat]
    key = stable_hash({"format": FORMAT, "models": ctx.fingerprints, "top_k": ctx.settings.kl_top_k,
                       "dtype": ctx.audit.probe.dtype,
                       "templates": templates, "prompts": ctx.prompts if chat else None,
                       "facts": [(f.id, f.question) for f in ctx.facts], **({"asked": asked} if asked else {})})
    path = ctx.out / "steps" / "kl.json"
    cached = _cached(path, key)
    if cached is not None:
        return cached
    (ft, tokenizer), (base, _) = ctx.model("finetuned"), ctx.model("base")
    if chat:
        pairs = list(zip(ctx.prompts["finetuned"], ctx.prompts["base"]))
    else:  # a fact's own topic templates: a fact set's as well as the paper's
        pairs = [(p, p) for p in (f.probe_prompt(templates.get(f.relation, 0)) for f in ctx.facts)]
    values = first_token_kl(ft, base, prompt_tokenizer(tokenizer, ctx.settings.prompt), pairs, ctx.settings.kl_top_k)
    result = {"key": key, "style": "chat" if chat else "template", "summary": summarize_kl(values),
              "facts": [{"fact_id": f.id, "kl": v} for f, v in zip(ctx.facts, values)]}
    atomic_write_json(path, result)
    return result


def deltas_step(ctx: Context) -> dict:
    """Update concentration under the three metrics, and the zero-base diagnostic."""
    key = stable_hash({"format": FORMAT, "models": ctx.fingerprints, "ratios": list(DEFAULT_RATIOS)})
    path = ctx.out / "steps" / "deltas.json"
    cached = _cached(path, key)
    if cached is not None:
        return cached
    base, ft = ctx.folders["base"], ctx.folders["finetuned"]
    by_metric = {}
    for metric in METRICS:
        full = concentration(base, ft, DeltasConfig(metric=metric), DEFAULT_RATIOS, ctx.progress)
        by_metric[metric] = {k: full[k] for k in ("ratios", "selected", "shares", "elements", "total_change")}
    result = {"key": key, "concentration": by_metric, "zero_base": zero_base_mass(base, ft)}
    atomic_write_json(path, result)
    return result


def fact_rows(ctx: Context, probes: dict, greedy: dict, kl: dict) -> list[dict]:
    """One row per fact: both models' levels, greedy answers and correctness, transition, slice, KL."""
    kl_of = {r["fact_id"]: r["kl"] for r in kl["facts"]}
    rows = []
    for i, f in enumerate(ctx.facts):
        b, t = probes["base"][f.id], probes["finetuned"][f.id]
        right = {role: greedy[role]["correct"][f.id] for role in ROLES}
        rows.append({"fact_id": f.id, "relation": f.relation, "domain": f.domain, "question": f.question,
                     "answers": list(f.accepted_answers), "base_level": b.level, "finetuned_level": t.level,
                     "base_R": b.R, "finetuned_R": t.R,
                     "base_answer": greedy["base"]["answers"][f.id], "finetuned_answer": greedy["finetuned"]["answers"][f.id],
                     "base_correct": right["base"], "finetuned_correct": right["finetuned"],
                     "transition": transition(right["base"], right["finetuned"]), "slice": ctx.slice_of[f.id],
                     "kl": kl_of.get(f.id), "base_prompt": ctx.prompts["base"][i],
                     "finetuned_prompt": ctx.prompts["finetuned"][i]})
    return rows


def repair_targets(ctx: Context, method: str, values, part: str) -> tuple[list[dict], RepairConfig, dict, dict]:
    """(rows of the `part` slice, the method's config, each value's file and key)."""
    rows = [row for row in ctx.rows("finetuned") if ctx.slice_of[row["fact_id"]] == part]
    config = RepairConfig(method=method)
    paths = {v: ctx.out / "repairs" / part / f"{method}-{v:g}.json" for v in values}
    keys = {v: greedy_key(ctx, "finetuned", rows, {"base": ctx.fingerprints["base"], "method": method,
                                                    "settings": config.settings(), "value": v}) for v in values}
    return rows, config, paths, keys


def repair_answers(ctx: Context, method: str, values, part: str) -> dict[float, dict]:
    """Each value's answers on the facts of `part` (dev or test), every unfinished value in one
    in-memory sweep of the fine-tuned model (`Context.edited`)."""
    rows, config, paths, keys = repair_targets(ctx, method, values, part)
    done = {v: c for v in values if (c := _cached(paths[v], keys[v])) is not None}
    todo = [v for v in values if v not in done]
    if todo:
        model, tokenizer = ctx.edited()
        tokenizer = prompt_tokenizer(tokenizer, ctx.settings.prompt)
        for value, edited in repaired_models(model, ctx.folders["base"], ctx.folders["finetuned"], todo, config,
                                             ctx.progress):
            done[value] = _answers(ctx, paths[value], keys[value], edited, tokenizer, rows)
    return {v: done[v] for v in values}


def repair_step(ctx: Context, rows: list[dict]) -> dict:
    """Per method: every candidate on dev, the objective's choice, its scores on test."""
    s = ctx.settings
    dev = [r for r in rows if r["slice"] == "dev"]
    test = [r for r in rows if r["slice"] == "test"]
    out = {}
    for method, values in ctx.values.items():
        on_dev = repair_answers(ctx, method, values, "dev")
        scores = {v: rp.objective(dev, on_dev[v]["correct"], s.objective) for v in values}
        chosen = rp.choose(scores, method)
        on_test = repair_answers(ctx, method, [chosen], "test")[chosen]
        out[method] = {"knob": METHODS[method].knob, "candidates": list(values),
                       "dev_scores": {f"{v:g}": scores[v] for v in values}, "chosen": chosen,
                       "test": rp.held_out_scores(test, on_test["correct"], s.bootstrap, ctx.audit.probe.seed),
                       "correct": {**on_dev[chosen]["correct"], **on_test["correct"]}}
    return out


def write_best(ctx: Context, repairs: dict) -> Path:
    """The repaired model of the method with the best dev objective (ties: METHODS order), as an HF folder."""
    method = max(repairs, key=lambda m: (repairs[m]["dev_scores"][f"{repairs[m]['chosen']:g}"], -list(METHODS).index(m)))
    value = repairs[method]["chosen"]
    folder = repair_sweep(ctx.folders["base"], ctx.folders["finetuned"], [value], RepairConfig(method=method),
                          ctx.out / "best", ctx.progress)[value]
    atomic_write_json(ctx.out / "best" / "chosen.json", {
        "folder": folder.name, "method": method, "value": value, "objective": ctx.settings.objective,
        "objective_text": rp.OBJECTIVES[ctx.settings.objective], "dev_facts": sum(v == "dev" for v in ctx.slice_of.values()),
        "budget": ctx.settings.candidates,
        "dev_scores": {m: r["dev_scores"] for m, r in repairs.items()},
        "chosen_per_method": {m: r["chosen"] for m, r in repairs.items()},
        "rule": "per method the candidate with the best dev objective (ties: the least edit); across methods the best "
                "of those (ties: the first method)"})
    return folder


def run_steps(ctx: Context, best: bool = False) -> dict:
    """Every step in order (finished ones skipped); returns the summary the report reads."""
    from sftlens.audit.summary import summarize_audit

    probes = {role: probe_step(ctx, role) for role in ROLES}
    greedy = {role: greedy_step(ctx, role) for role in ROLES}
    kl = kl_step(ctx, probes["base"])
    ctx.release("base")
    deltas = deltas_step(ctx)
    rows = fact_rows(ctx, probes, greedy, kl)
    atomic_write_jsonl(ctx.out / "facts.jsonl", rows)
    repairs = repair_step(ctx, rows)
    ctx.models.clear()
    summary = summarize_audit(ctx, rows, kl, deltas, repairs)
    if best:
        summary["best"] = str(write_best(ctx, repairs).relative_to(ctx.out))
    atomic_write_json(ctx.out / "summary.json", summary)
    return summary
