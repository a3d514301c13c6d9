"""The guided repair's unit of a study (`importance`): the fact importances (`sftlens.weights.guided`) of one
fine-tuned model, from the in-domain dev facts only, as an audit computes them from its dev slice: the base and
the fine-tuned model answer every dev fact greedily ([eval]; the base's answers are its evaluation unit's, shared by
every model); forgotten facts (right on the base, wrong on the fine-tune) weigh the base's answer, learned facts (the
reverse) the fine-tune's. No test or training fact enters. Without a forgotten or a learned dev fact there is nothing
to weigh: the unit ends with `skipped` (one line), and so do the method's units of that model (the report leaves them
out and says why). The file is the unit's artefact (its own key inside: models, facts, answers, dtype); the method's
repair and repaired units read it through their `importances` dependency, so the importance unit's key (the model,
the split, the base's evaluation, [eval]) enters theirs."""

from __future__ import annotations

from pathlib import Path

from sftlens.evaluate import evaluate_model
from sftlens.io import read_jsonl, stable_hash
from sftlens.models import model_fingerprint
from sftlens.split import eval_files
from sftlens.study.engine import roles
from sftlens.study.engine.inputs import IMPORTANCES_FILE, predictions_file, split_folder
from sftlens.study.engine.params import ImportanceParams, Runtime
from sftlens.study.engine.stages import eval_config, load_rows, model_path, unit_model
from sftlens.weights import open_pair
from sftlens.weights.guided import KINDS, fisher_diagonals, write_importances


def weighed_facts(rows: list[dict], answers: dict[str, dict]) -> dict[str, list[tuple[str, str]]]:
    """kind -> (prompt, answer whose likelihood counts) of the rows, from both models' predictions
    (role -> fact id -> prediction)."""
    facts: dict[str, list[tuple[str, str]]] = {kind: [] for kind in KINDS}
    for row in rows:
        base, tuned = (answers[role][row["fact_id"]] for role in ("base", "finetuned"))
        if base["correct"] and not tuned["correct"]:
            facts["forgotten"].append((row["prompt"], base["prediction"]))
        elif tuned["correct"] and not base["correct"]:
            facts["learned"].append((row["prompt"], tuned["prediction"]))
    return facts


def importance_unit(params, out: Path, deps) -> dict:
    p, runtime = ImportanceParams.of(params), Runtime.of(params)
    eval_cfg = eval_config(params)
    finetuned = model_path(params, deps)
    rows = load_rows(eval_files(split_folder(deps), "dev", p.dev))
    model, tokenizer = unit_model(finetuned, eval_cfg, runtime)
    # the base's dev answers are its evaluation unit's, shared by every model's importances (not answered again)
    answers = {"base": {q["fact_id"]: q for q in read_jsonl(predictions_file(roles.dep_dir(deps, roles.BASE_EVAL), "dev"))},
               "finetuned": {q["fact_id"]: q for q in evaluate_model(model, tokenizer, rows, eval_cfg, progress=False)}}
    facts = weighed_facts(rows, answers)
    counts = {kind: len(facts[kind]) for kind in KINDS}
    empty = next((kind for kind in KINDS if not facts[kind]), None)
    if empty is not None:  # done, with nothing to weigh: the guided repair of this model is skipped, in one line
        return {"dev": len(rows), **counts, "skipped": f"no {empty} fact among its {len(rows)} {p.dev}-domain dev "
                                                        "facts (greedy, base against fine-tune)"}
    names = open_pair(runtime.model, finetuned).region_names("all")
    fishers, counts = fisher_diagonals(model, tokenizer, facts, names, progress=False)
    fingerprint = model_fingerprint(finetuned)
    key = stable_hash({"models": [model_fingerprint(runtime.model), fingerprint], "dtype": eval_cfg.dtype,
                       "facts": facts})
    write_importances(out / IMPORTANCES_FILE, fishers, counts, key, fingerprint)
    return {"dev": len(rows), **counts}
