"""The audit's resumable steps under its folder, each keyed by its inputs and written atomically.

    DIR/audit.json                   the audit (models, facts, settings) and its sessions
    DIR/probe/{role}-{model}-{key}/  probe stores (`sftlens.probe.run_probe`: resumable fact by fact)
    DIR/steps/greedy-{role}.json     greedy answers (a partial log resumes a killed step)
    DIR/steps/kl.json, deltas.json   first-token KL per fact; update concentration, zero-base check
    DIR/steps/importances.safetensors  the guided repair's fact importances (dev facts only; key inside)
    DIR/repairs/{dev,test}/M-V.json  a repair value's answers on the dev facts its objective reads (every
                                     candidate; under recovered, those whose correctness differs between
                                     the models) or on every test fact (the value chosen on dev)
    DIR/facts.jsonl, summary.json    per fact; everything the report reads
    DIR/best/                        with --write-best: the chosen repaired model and how it was chosen

A step whose file holds its key is skipped; a changed input changes the key and re-runs the step. The guided
repair's importance step lives in `sftlens.audit.importances`; the steps run in order in `sftlens.audit.run`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from sftlens.analysis.deltas import DeltasConfig, concentration, zero_base_mass
from sftlens.analysis.kl import KL_CHUNK, first_token_kl, summarize_kl
from sftlens.audit import repairs as rp
from sftlens.audit.checks import check_pair
from sftlens.audit.config import Audit
from sftlens.audit.prompts import prompt_tokenizer, question_prompt, require_chat_template
from sftlens.audit.transitions import transition
from sftlens.errors import SftlensError
from sftlens.evaluate import EvalConfig, evaluate_model
from sftlens.io import JsonlAppender, KeyedOutput, atomic_write_json, read_jsonl, stable_hash
from sftlens.models import load_model, load_tokenizer, model_fingerprint
from sftlens.probe import ProbeConfig, best_templates, default_store, run_probe
from sftlens.taught import held_out_templates
from sftlens.weights import METHODS, RepairConfig, repair_sweep, repaired_models
from sftlens.weights.selection import DEFAULT_RATIOS

ROLES = ("base", "finetuned")
IMPORTANCES = "importances.safetensors"
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
    skipped: dict[str, str] = field(default_factory=dict)  # method -> why it was not run (one line)
    announce: Callable[[str], None] | None = None  # receives a line per finished step (the CLI: print)
    seconds: dict[str, float] = field(default_factory=dict)  # step (the plan's names) -> wall seconds this session

    def tell(self, line: str) -> None:
        if self.announce is not None:
            self.announce(line)

    @contextmanager
    def timed(self, step: str):
        """Adds the block's wall seconds to `step`'s: the session record keeps them, to measure the plan's rates."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[step] = self.seconds.get(step, 0.0) + time.perf_counter() - start

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

    @property
    def importances(self) -> Path:
        return self.out / "steps" / IMPORTANCES

    def repair_config(self, method: str) -> RepairConfig:
        """A method's config: its defaults, and this audit's importances where it reads them."""
        reads = "importances" in METHODS[method].settings
        return RepairConfig(method=method, importances=str(self.importances) if reads else None)

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


def step_output(path: Path, key: str) -> KeyedOutput:
    """A step's JSON file: done when it holds `key`; another key (a changed input) re-runs the step."""
    return KeyedOutput(path, key, stale="redo")


def probe_store(ctx: Context, role: str) -> Path:
    """A store per model and probe settings (`default_store`'s name), so changed settings re-probe."""
    return ctx.out / "probe" / f"{role}-{default_store(ctx.folders[role], ctx.probe).name}"


def probe_step(ctx: Context, role: str) -> dict:
    """Mastery of every fact, probed with the same seeded draws for both models."""
    return run_probe(ctx.folders[role], ctx.facts, ctx.probe, probe_store(ctx, role), ctx.progress)


def greedy_key(ctx: Context, role: str, rows: list[dict], edit: dict | None = None) -> str:
    return stable_hash({"format": FORMAT, "model": ctx.fingerprints[role], "edit": edit, "tokens": ctx.settings.answer_tokens,
                        "dtype": ctx.audit.probe.dtype, "rows": [(r["fact_id"], r["prompt"], r["answers"]) for r in rows]})


def _answers(ctx: Context, output: KeyedOutput, model, tokenizer, rows: list[dict], progress: bool | None = None) -> dict:
    """Greedy answers of `rows`, resumable: finished batches go to a partial log first; a bar of
    their own unless `progress` is False (default: the audit's)."""
    progress = ctx.progress if progress is None else progress
    partial = output.log()
    done = {r["fact_id"]: r for r in read_jsonl(partial)} if partial.is_file() else {}
    todo = [r for r in rows if r["fact_id"] not in done]
    if todo:
        with JsonlAppender(partial) as log:
            def persist(batch):
                for _, p in batch:
                    log.write({"fact_id": p["fact_id"], "answer": p["prediction"], "correct": p["correct"]})

            for p in evaluate_model(model, tokenizer, todo, ctx.eval_config(), progress, on_batch=persist):
                done[p["fact_id"]] = {"fact_id": p["fact_id"], "answer": p["prediction"], "correct": p["correct"]}
    result = output.write({"answers": {r["fact_id"]: done[r["fact_id"]]["answer"] for r in rows},
                           "correct": {r["fact_id"]: bool(done[r["fact_id"]]["correct"]) for r in rows}})
    partial.unlink(missing_ok=True)
    return result


def greedy_output(ctx: Context, role: str) -> KeyedOutput:
    return step_output(ctx.out / "steps" / f"greedy-{role}.json", greedy_key(ctx, role, ctx.rows(role)))


def greedy_step(ctx: Context, role: str) -> dict:
    output = greedy_output(ctx, role)
    cached = output.finished()
    if cached is not None:
        return cached
    model, tokenizer = ctx.model(role)
    return _answers(ctx, output, model, prompt_tokenizer(tokenizer, ctx.settings.prompt), ctx.rows(role))


def kl_output(ctx: Context, base_records: dict) -> KeyedOutput:
    """The KL step's file, keyed by both models, the prompts (each relation's best template by the base's
    probe records) and the facts."""
    templates = best_templates(base_records, ctx.facts)
    chat = ctx.settings.prompt == "chat"
    # Question-only facts' plain prompts are keyed, as they were the bare question before the QA format
    # (only where there are some, so other audits keep their keys).
    asked = [f.probe_prompt(0) for f in ctx.facts if f.question_only and not chat]
    key = stable_hash({"format": FORMAT, "models": ctx.fingerprints, "top_k": ctx.settings.kl_top_k,
                       "dtype": ctx.audit.probe.dtype,
                       "templates": templates, "prompts": ctx.prompts if chat else None,
                       "facts": [(f.id, f.question) for f in ctx.facts], **({"asked": asked} if asked else {})})
    return step_output(ctx.out / "steps" / "kl.json", key)


def kl_step(ctx: Context, base_records: dict) -> dict:
    """The paper's first-token top-k KL per fact (plain: each relation's best probe template for
    both models; chat: each model's chat-rendered question)."""
    output = kl_output(ctx, base_records)
    cached = output.finished()
    if cached is not None:
        return cached
    templates = best_templates(base_records, ctx.facts)
    chat = ctx.settings.prompt == "chat"
    (ft, tokenizer), (base, _) = ctx.model("finetuned"), ctx.model("base")
    tokenizer = prompt_tokenizer(tokenizer, ctx.settings.prompt)
    if chat:
        pairs = list(zip(ctx.prompts["finetuned"], ctx.prompts["base"]))
    else:  # a fact's own topic templates: a fact set's as well as the paper's
        pairs = [(p, p) for p in (f.probe_prompt(templates.get(f.relation, 0)) for f in ctx.facts)]
    # Resumable chunk by chunk: a finished chunk's values go to a partial log; the chunks are fixed by position,
    # so a resumed run batches every prompt as an uninterrupted one does (the same values, bit for bit).
    partial = output.log()
    done = {r["fact_id"]: r["kl"] for r in read_jsonl(partial)} if partial.is_file() else {}
    with JsonlAppender(partial) as log:
        for start in range(0, len(pairs), KL_CHUNK):
            facts = ctx.facts[start:start + KL_CHUNK]
            if all(f.id in done for f in facts):
                continue
            values = first_token_kl(ft, base, tokenizer, pairs[start:start + KL_CHUNK], ctx.settings.kl_top_k)
            for f, v in zip(facts, values):
                log.write({"fact_id": f.id, "kl": v})
                done[f.id] = v
    values = [done[f.id] for f in ctx.facts]
    result = output.write({"style": "chat" if chat else "template", "summary": summarize_kl(values),
                           "facts": [{"fact_id": f.id, "kl": v} for f, v in zip(ctx.facts, values)]})
    partial.unlink(missing_ok=True)
    return result


def deltas_output(ctx: Context) -> KeyedOutput:
    key = stable_hash({"format": FORMAT, "models": ctx.fingerprints, "ratios": list(DEFAULT_RATIOS)})
    return step_output(ctx.out / "steps" / "deltas.json", key)


def deltas_step(ctx: Context) -> dict:
    """Update concentration under the three metrics, and the zero-base diagnostic."""
    output = deltas_output(ctx)
    cached = output.finished()
    if cached is not None:
        return cached
    from tqdm.auto import tqdm

    base, ft = ctx.folders["base"], ctx.folders["finetuned"]
    by_metric = {}
    # one bar for the step (each metric's passes, then the zero-base pass), not one per pass
    with tqdm(total=len(METRICS) + 1, desc="update concentration", unit="step", disable=not ctx.progress) as bar:
        for metric in METRICS:
            full = concentration(base, ft, DeltasConfig(metric=metric), DEFAULT_RATIOS, progress=False)
            by_metric[metric] = {k: full[k] for k in ("ratios", "selected", "shares", "elements", "total_change")}
            bar.update()
        zero_base = zero_base_mass(base, ft)
        bar.update()
    return output.write({"concentration": by_metric, "zero_base": zero_base})


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


def repair_targets(ctx: Context, method: str, values, part: str,
                   ids: set[str] | None = None) -> tuple[list[dict], RepairConfig, dict]:
    """(rows of the `part` slice, or of its facts in `ids`, the method's config, each value's output)."""
    rows = [row for row in ctx.rows("finetuned")
            if ctx.slice_of[row["fact_id"]] == part and (ids is None or row["fact_id"] in ids)]
    config = ctx.repair_config(method)
    outputs = {v: step_output(ctx.out / "repairs" / part / f"{method}-{v:g}.json",
                              greedy_key(ctx, "finetuned", rows, {"base": ctx.fingerprints["base"], "method": method,
                                                                  "settings": config.settings(), "value": v}))
               for v in values}
    return rows, config, outputs


def repair_answers(ctx: Context, method: str, values, part: str, ids: set[str] | None = None) -> dict[float, dict]:
    """Each value's answers on the facts of `part` (dev or test; only those in `ids` if given), every
    unfinished value in one in-memory sweep of the fine-tuned model (`Context.edited`)."""
    rows, config, outputs = repair_targets(ctx, method, values, part, ids)
    done = {v: c for v in values if (c := outputs[v].finished()) is not None}
    todo = [v for v in values if v not in done]
    if todo and not rows:  # no fact to answer: no model to edit
        done.update({v: outputs[v].write({"answers": {}, "correct": {}}) for v in todo})
    elif todo:
        from tqdm.auto import tqdm

        model, tokenizer = ctx.edited()
        tokenizer = prompt_tokenizer(tokenizer, ctx.settings.prompt)
        # one bar per method and slice (a value: its weight passes and answers), not one per pass and value
        with tqdm(total=len(todo), desc=f"repair {method} on {part}", unit="value", disable=not ctx.progress) as bar:
            for value, edited in repaired_models(model, ctx.folders["base"], ctx.folders["finetuned"], todo, config,
                                                 progress=False):
                done[value] = _answers(ctx, outputs[value], edited, tokenizer, rows, progress=False)
                bar.update()
    return {v: done[v] for v in values}


def objective_ids(ctx: Context, rows: list[dict]) -> set[str]:
    """The dev facts the objective reads (`repairs.objective_facts`): the only ones candidates answer."""
    return {r["fact_id"] for r in rp.objective_facts([r for r in rows if r["slice"] == "dev"], ctx.settings.objective)}


def repair_step(ctx: Context, rows: list[dict]) -> dict:
    """Per method: every candidate on the dev facts its objective reads, the objective's choice, its
    scores on test (`correct`: the chosen value's answers, dev facts read and every test fact)."""
    s = ctx.settings
    dev = [r for r in rows if r["slice"] == "dev"]
    test = [r for r in rows if r["slice"] == "test"]
    read = objective_ids(ctx, rows)
    out = {}
    for method, values in ctx.values.items():
        if method in ctx.skipped:
            continue
        with ctx.timed("repairs on dev"):
            on_dev = repair_answers(ctx, method, values, "dev", read)
        scores = {v: rp.objective(dev, on_dev[v]["correct"], s.objective) for v in values}
        chosen = rp.choose(scores, method)
        with ctx.timed("repairs on test"):
            on_test = repair_answers(ctx, method, [chosen], "test")[chosen]
        out[method] = {"knob": METHODS[method].knob, "candidates": list(values),
                       "dev_scores": {f"{v:g}": scores[v] for v in values}, "chosen": chosen,
                       "test": rp.held_out_scores(test, on_test["correct"], s.bootstrap, ctx.audit.probe.seed),
                       "correct": {**on_dev[chosen]["correct"], **on_test["correct"]}}
        recovered = out[method]["test"]["recovered"]
        ctx.tell(f"repair {method}: {METHODS[method].knob} = {chosen:g} chosen on dev ({s.objective} "
                 f"{100 * scores[chosen]:+.1f} %); test: "
                 + ("no forgotten fact" if recovered is None else f"{100 * recovered.value:.0f} % of "
                    f"{out[method]['test']['forgotten_n']} forgotten facts recovered"))
    return out


def write_best(ctx: Context, repairs: dict) -> Path:
    """The repaired model of the method with the best dev objective (ties: METHODS order), as an HF folder."""
    from sftlens.audit.summary import best_repair

    method = best_repair(repairs)
    value = repairs[method]["chosen"]
    folder = repair_sweep(ctx.folders["base"], ctx.folders["finetuned"], [value], ctx.repair_config(method),
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
