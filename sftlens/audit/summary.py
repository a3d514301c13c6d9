"""The audit's summary: everything its report shows, as plain JSON (`DIR/summary.json`).

Besides the rates and repairs: `probe_prompts` (topic -> its probe prompt, stated under the report's
transitions) and exact McNemar p-values (`sftlens.reporting.stats.mcnemar`): `mcnemar_p` of forgotten
against learned per group (`all`, `by_level`, `by_domain`, `by_relation`), each repair's `test.mcnemar_p`
against the fine-tune, `reference_mcnemar_p.base` (base against fine-tune on test).
"""

from __future__ import annotations

import dataclasses

from sftlens.audit.repairs import OBJECTIVES, acc_gain
from sftlens.audit.transitions import group_rates, mastery_matrix, rates_by, transition_counts
from sftlens.probe import probe_prompts
from sftlens.reporting.bootstrap import Estimate
from sftlens.reporting.stats import mcnemar
from sftlens.weights import METHODS


def plain(value):
    """JSON-ready: estimates as {value, low, high}, keys as strings."""
    if isinstance(value, Estimate):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def best_repair(repairs: dict) -> str:
    """The method whose dev-chosen value scored best on the dev objective (ties: the first in `METHODS`
    order; summary.json's keys are sorted): the model `--write-best` writes, the report's best repair."""
    order = list(METHODS)
    return max(repairs, key=lambda m: (repairs[m]["dev_scores"][f"{repairs[m]['chosen']:g}"], -order.index(m)))


def summarize_audit(ctx, rows: list[dict], kl: dict, deltas: dict, repairs: dict) -> dict:
    s, seed = ctx.settings, ctx.audit.probe.seed
    test = [r for r in rows if r["slice"] == "test"]
    references = {
        "fine-tuned": acc_gain(test, {r["fact_id"]: r["finetuned_correct"] for r in test}, s.bootstrap, seed),
        "base": acc_gain(test, {r["fact_id"]: r["base_correct"] for r in test}, s.bootstrap, seed),
    }
    on_test = transition_counts(test)
    return plain({
        "audit": ctx.audit.to_dict(), "facts": len(rows),
        # topic -> the prompt its facts were probed with (question-only topics: the audit's --prompt style)
        "probe_prompts": probe_prompts({f.relation: f.relation_templates() for f in ctx.facts}, ctx.probe.question_prompt),
        "slices": {"dev": sum(r["slice"] == "dev" for r in rows), "test": len(test)},
        "matrix": mastery_matrix(rows),
        "all": group_rates(rows, s.bootstrap, seed),
        "by_level": rates_by(rows, "base_level", s.bootstrap, seed),
        "by_domain": rates_by(rows, "domain", s.bootstrap, seed),
        "by_relation": rates_by(rows, "relation", s.bootstrap, seed),
        "kl": {"style": kl["style"], "top_k": s.kl_top_k, **kl["summary"]},
        "deltas": {k: v for k, v in deltas.items() if k != "key"},
        "objective": {"name": s.objective, "text": OBJECTIVES[s.objective], "budget": s.candidates},
        "repairs": repairs, "skipped_repairs": ctx.skipped, "references": references,
        # the base against the fine-tune on the test slice the repairs are scored on
        "reference_mcnemar_p": {"base": mcnemar(on_test["forgotten"], on_test["learned"])},
    })
