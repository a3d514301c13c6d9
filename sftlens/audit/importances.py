"""The guided repair's step of an audit: fact importances of the dev slice (`sftlens.weights.guided`), in one
pass of the fine-tuned model over its forgotten and learned dev facts, stored at `DIR/steps/importances.safetensors`
with their key inside. No test fact ever enters (`importance_facts` reads the dev slice alone)."""

from __future__ import annotations

from pathlib import Path

from sftlens.audit.engine import FORMAT, ROLES, Context, greedy_output
from sftlens.audit.prompts import prompt_tokenizer
from sftlens.audit.transitions import transition
from sftlens.errors import SftlensError
from sftlens.io import stable_hash
from sftlens.weights import open_pair
from sftlens.weights.guided import KINDS, Importances, fisher_diagonals, write_importances


def importance_facts(ctx: Context, greedy: dict) -> dict[str, list[tuple[str, str, str]]]:
    """The facts the guided repair weighs, from the dev slice only (no test fact ever enters): each
    kind -> (fact id, the fine-tuned model's prompt, the answer whose likelihood counts): forgotten facts
    with the base model's greedy answer (judged right), learned ones with the fine-tune's."""
    facts: dict[str, list[tuple[str, str, str]]] = {kind: [] for kind in KINDS}
    for f, prompt in zip(ctx.facts, ctx.prompts["finetuned"]):
        if ctx.slice_of[f.id] != "dev":
            continue
        moved = transition(greedy["base"]["correct"][f.id], greedy["finetuned"]["correct"][f.id])
        if moved in facts:
            role = "base" if moved == "forgotten" else "finetuned"
            facts[moved].append((f.id, prompt, greedy[role]["answers"][f.id]))
    return facts


def importance_key(ctx: Context, facts: dict) -> str:
    return stable_hash({"format": FORMAT, "models": ctx.fingerprints, "dtype": ctx.audit.probe.dtype,
                        "prompt": ctx.settings.prompt, "facts": facts})


def importance_skip(ctx: Context, facts: dict) -> str | None:
    """Why the guided repair cannot run (one line), or None."""
    empty = next((kind for kind in KINDS if not facts[kind]), None)
    if empty is None:
        return None
    dev = sum(v == "dev" for v in ctx.slice_of.values())
    return (f"guided repair skipped: no {empty} fact among the {dev} dev facts (greedy: "
            f"{'right on the base, wrong on the fine-tune' if empty == 'forgotten' else 'wrong on the base, right on the fine-tune'})")


def stored_importances_key(path: Path) -> str | None:
    try:
        return Importances.open(path).key
    except SftlensError:  # none yet, or unreadable: computed (again)
        return None


def importance_plan(ctx: Context) -> tuple[int | None, bool]:
    """For the plan: (facts the importance step has left to pass over, None while the greedy answers it
    needs are not there; whether the guided repair will be skipped)."""
    greedy = {role: greedy_output(ctx, role).finished() for role in ROLES}
    if not all(greedy.values()):
        return None, False
    facts = importance_facts(ctx, greedy)
    if importance_skip(ctx, facts) is not None:
        return 0, True
    done = stored_importances_key(ctx.importances) == importance_key(ctx, facts)
    return 0 if done else sum(map(len, facts.values())), False


def importance_step(ctx: Context, greedy: dict) -> None:
    """Fact importances of the dev slice for the guided repair (`sftlens.weights.guided`), in one
    pass of the fine-tuned model over its forgotten and learned dev facts; reused while the key (models,
    facts, prompts, answers, dtype) holds. No forgotten or no learned dev fact: the method is skipped."""
    facts = importance_facts(ctx, greedy)
    reason = importance_skip(ctx, facts)
    if reason is not None:
        ctx.skipped["guided"] = reason
        return
    key = importance_key(ctx, facts)
    if stored_importances_key(ctx.importances) == key:
        return
    model, tokenizer = ctx.model("finetuned")
    names = open_pair(ctx.folders["base"], ctx.folders["finetuned"]).region_names("all")
    pairs = {kind: [(prompt, answer) for _, prompt, answer in facts[kind]] for kind in KINDS}
    fishers, counts = fisher_diagonals(model, prompt_tokenizer(tokenizer, ctx.settings.prompt), pairs, names,
                                       ctx.progress)
    write_importances(ctx.importances, fishers, counts, key, ctx.fingerprints["finetuned"])
