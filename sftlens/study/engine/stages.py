"""The study's unit functions: each calls one stage with the settings of its unit.

Signature `fn(params, out, deps) -> result`: `params` are the unit's settings (read as the unit
kind's record of `sftlens.study.engine.params`) plus the runtime values (`Runtime`: model, data_dir, device),
`out` its artefact folder, `deps` maps a role (`sftlens.study.engine.roles`) to the dependency's folder and
result. A result is small JSON (records, counts, per-fact correctness) that the driver stores in the
study database, so the report needs nothing else.

Unit results (what the report reads): eval -> `records` + `test_bits` ({domain: {level: "0101..."}},
facts in split-file order, the same for every model: the paired bootstraps' input); restore -> `records`
(test both domains, in-domain dev, own training set; ratio 0's test records are its eval unit's) +
`test_bits`/`train_bits` per ratio; control -> `ratio`, `records`, `test_bits`, `train_bits`; repair ->
`method`, `records` (dev, tagged `repair_value`); repaired -> `method`, `value`, `records` (test, train),
`test_bits`, `train_bits`; lora-eval -> `records` (test, dev, train), `test_bits`, `train_bits`;
tune-eval -> `records` (dev, in-domain); tuned -> train's result + `learning_rate`, `linked`; deltas ->
`shares`, `shares_by_metric` (relative, absolute, relative_nonzero), `zero_base`; kl -> `kl` summary; on a
taught base, eval and restore add `taught_records`. The guards' units: `sftlens.study.engine.guard_stages`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from sftlens.analysis.deltas import DeltasConfig, concentration, write_concentration, zero_base_mass
from sftlens.analysis.kl import KLConfig, compute_kl
from sftlens.config import config_from_dict
from sftlens.data import fact_set_stats
from sftlens.evaluate import EvalConfig, evaluate_splits, summarize
from sftlens.inject import InjectConfig, inject
from sftlens.io import KeyedOutput, atomic_write_jsonl, read_jsonl
from sftlens.models import load_model
from sftlens.probe import ProbeConfig, best_templates, level_counts, run_probe
from sftlens.restore import RestoreConfig, restore_in_memory, restored_models
from sftlens.split import SplitConfig, build_splits, eval_files, eval_set, set_file, set_path
from sftlens.split import train_set as split_train_set
from sftlens.study.engine import roles
from sftlens.study.engine.choice import chosen_rate, chosen_ratio, chosen_value
from sftlens.study.engine.inputs import (
    fact_set,
    importances_path,
    predictions_file,
    probe_records,
    split_folder,
    study_facts,
    training_file,
)
from sftlens.study.engine.outcomes import skipped
from sftlens.study.engine.params import (
    ControlParams,
    DeltasParams,
    EvalParams,
    InjectParams,
    KLParams,
    ProbeParams,
    RepairedParams,
    RepairParams,
    RestoreParams,
    Runtime,
    SplitParams,
    TrainParams,
    TunedParams,
)
from sftlens.study.engine.scheduler import DATA
from sftlens.taught import TAUGHT_SUBSETS, inject_record, taught_facts
from sftlens.train import RUN_FILE, TrainConfig, train
from sftlens.weights import METHODS, RepairConfig, repaired_models

# --- inject, probe and split -------------------------------------------------------------------


def inject_unit(params, out: Path, deps) -> dict:
    """The study's base model taught a seeded share of the study's facts (`[inject]`); later units
    read `out/model` as their base (role `sftlens.study.engine.roles.BASE`)."""
    p = InjectParams.of(params)
    model_dir = inject(Runtime.of(params).model, study_facts(params), out / "model",
                       config_from_dict(InjectConfig, p.inject, "inject"))
    record = inject_record(model_dir)
    return {"taught": len(record["facts"]), "candidates": record["candidates"], "templates": record["templates"],
            "statements": record["statements"]["count"], "steps": record["steps"], "train_loss": record["train_loss"]}


def probe_unit(params, out: Path, deps) -> dict:
    p, runtime = ProbeParams.of(params), Runtime.of(params)
    config = config_from_dict(ProbeConfig, p.probe, "probe")
    records = run_probe(runtime.model, study_facts(params), config, out / "store", progress=True,
                        device=runtime.device_or_none)
    facts = fact_set(runtime.facts, runtime.in_domain) if runtime.facts else None
    domains = facts.domains() if facts else None
    result = {"facts": len(records), "level_counts": level_counts(records.values(), domains)}
    if facts:
        stats = fact_set_stats(facts)
        result["fact_set"] = {key: stats[key] for key in ("name", "facts", "topics", "splits", "domains")}
    taught = taught_facts(runtime.model)
    if taught is not None:
        result["level_counts_taught"] = {
            name: level_counts((r for r in records.values() if (r.fact_id in taught) == flag), domains)
            for name, flag in TAUGHT_SUBSETS}
    return result


def split_unit(params, out: Path, deps) -> dict:
    config = config_from_dict(SplitConfig, SplitParams.of(params).grid, "split")
    manifest = build_splits(study_facts(params), probe_records(deps), config, out / DATA)
    # the manifest's fact-id lists stay in the file; the database keeps the sizes and compositions
    sets = {name: {k: v for k, v in entry.items() if k != "fact_ids"} for name, entry in manifest["sets"].items()}
    return {"sets": sets}


# --- models ------------------------------------------------------------------------------------


def train_unit(params, out: Path, deps) -> dict:
    p = TrainParams.of(params)
    return train_model(params, p, config_from_dict(TrainConfig, p.train, "train"), out, deps)


def train_model(params, p: TrainParams, config: TrainConfig, out: Path, deps, replay=None) -> dict:
    """`p`'s training set trained with `config` (`replay`: the known facts a replay guard mixes in); a guarded
    run's result adds its guard's record (value, extra memory, frozen tensors, how many facts it replayed)."""
    model_dir = train(Runtime.of(params).model, training_file(p, deps), out / "model", config, progress=True,
                      replay=replay)
    run = json.loads((model_dir / RUN_FILE).read_text())
    result = {"train_set": set_path(split_train_set(p.set, p.size, p.seed)), "examples": run["data"]["count"],
              "steps": run["steps"], "train_loss": run["train_loss"]}
    if "guard" in run:
        guard = run["guard"]
        result["guard"] = {**{k: v for k, v in guard.items() if k != "replayed"},
                           **({"replayed": len(guard["replayed"])} if "replayed" in guard else {})}
    return result


def tuned_unit(params, out: Path, deps) -> dict:
    """[train]'s recipe at the learning rate its candidates chose on in-domain dev over seeds
    (`sftlens.study.engine.choice.chosen_rate`). A candidate trained on this very set, size and seed at that
    rate is the same run, so its folder is linked rather than trained again."""
    p = TunedParams.of(params)
    by_rate: dict[float, list[list[dict]]] = {}
    for role, rate in p.dev.items():
        by_rate.setdefault(rate, []).append(roles.dep_result(deps, role)["records"])
    rate = chosen_rate(by_rate)
    if rate is None:
        raise ValueError("no in-domain dev evaluation to choose a learning rate from")
    source = next((role for role, candidate in p.models.items() if candidate == rate), None)
    if source is None:
        config = dataclasses.replace(config_from_dict(TrainConfig, p.train, "train"), learning_rate=rate)
        return {**train_model(params, p, config, out, deps), "learning_rate": rate, "linked": False}
    _link_folder(roles.dep_dir(deps, source) / "model", out / "model")
    return {**roles.dep_result(deps, source), "learning_rate": rate, "linked": True}


def _link_folder(source: Path, target: Path) -> None:
    """`target` as a copy of `source` made of hard links (copies across file systems), renamed into
    place whole (`sftlens.io.KeyedOutput.writing`: the unit's key is its folder's), so a killed unit leaves no
    half folder under the name."""
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    with KeyedOutput(target, stale="redo").writing() as staging:
        shutil.copytree(source, staging, copy_function=link, dirs_exist_ok=True)


def eval_config(params) -> EvalConfig:
    """A unit's evaluation settings; the batch size comes from the runtime, as it changes no prediction."""
    return config_from_dict(EvalConfig, {**params["eval"], "batch_size": Runtime.of(params).eval_batch_size}, "eval")


def model_path(params, deps: roles.Deps) -> str:
    """The fine-tuned model a unit reads, or the base model for units without one."""
    return str(roles.dep_dir(deps, roles.MODEL) / "model") if roles.MODEL in deps else Runtime.of(params).model


def unit_model(path: str, eval_cfg: EvalConfig, runtime: Runtime):
    """(model, tokenizer) at `path` as a unit evaluates it: [eval]'s dtype, its device or the study's."""
    return load_model(path, dtype=eval_cfg.dtype, device=eval_cfg.device or runtime.device_or_none)


def load_rows(files: list[Path]) -> list[dict]:
    return [row for path in files for row in read_jsonl(path)]


def eval_unit(params, out: Path, deps) -> dict:
    p = EvalParams.of(params)
    config = eval_config(params)
    model, tokenizer = unit_model(model_path(params, deps), config, Runtime.of(params))
    rows = {}
    for split in p.splits:  # `dev-in`: the in-domain dev facts only, tagged split "dev"
        name, _, domain = split.partition("-")
        rows[name] = load_rows(eval_files(split_folder(deps), name, domain or None))
    records, predictions = evaluate_splits(model, tokenizer, rows, config, {})
    for split, split_predictions in predictions.items():
        atomic_write_jsonl(predictions_file(out, split), split_predictions)
    result = {"records": records, "test_bits": _bits_by_level(predictions["test"]) if "test" in predictions else {}}
    taught = taught_facts(Runtime.of(params).model)
    if taught is not None:
        result["taught_records"] = taught_split(predictions, taught)
    return result


def taught_split(predictions: dict[str, list[dict]], taught: frozenset[str]) -> list[dict]:
    """Evaluation records per split and subset (`taught`: true/false): each split's records again,
    over the taught facts and over the others."""
    return [{**record, "split": split, "taught": flag}
            for split, rows in predictions.items() for _, flag in TAUGHT_SUBSETS
            for record in summarize([p for p in rows if (p["fact_id"] in taught) == flag])]


# --- analyses ----------------------------------------------------------------------------------


def _kl_test_file(split_folder: Path, test_set: str, out: Path) -> Path:
    """`in-level4` names one test file; `in` / `out` all test levels of a domain, gathered in one file."""
    domain, _, level = test_set.partition("-level")
    if level:
        return set_file(split_folder, set_path(eval_set("test", domain, int(level))))
    gathered = out / f"test-{test_set}.jsonl"
    atomic_write_jsonl(gathered, load_rows(eval_files(split_folder, "test", domain)))
    return gathered


def kl_unit(params, out: Path, deps) -> dict:
    """First-token KL against the base model on one test file, prompted with each relation's best
    mapping template from the probe (the paper's Section 4.1)."""
    p, runtime = KLParams.of(params), Runtime.of(params)
    config = config_from_dict(KLConfig, p.kl, "kl")
    if config.device is None and runtime.device_or_none:
        config = dataclasses.replace(config, device=runtime.device_or_none)
    templates = best_templates(probe_records(deps), study_facts(params))
    test_file = _kl_test_file(split_folder(deps), p.test_set, out)
    relations = fact_set(runtime.facts, runtime.in_domain).templates if runtime.facts else None
    result = compute_kl(runtime.model, model_path(params, deps), test_file, config, templates, out, relations)
    return {"kl": result["summary"], "test_set": p.test_set}


# Table 3 under the configured metric, and the two views a reader needs to judge it: the absolute
# change, and the relative change without elements whose base value is exactly 0.
CONCENTRATION_METRICS = ("relative", "absolute", "relative_nonzero")


def deltas_unit(params, out: Path, deps) -> dict:
    p, base = DeltasParams.of(params), Runtime.of(params).model
    config = config_from_dict(DeltasConfig, p.deltas, "deltas")
    finetuned = model_path(params, deps)
    result = concentration(base, finetuned, config, tuple(p.ratios), progress=True)
    write_concentration(result, out)
    by_metric = {config.metric: result["shares"]}
    for metric in CONCENTRATION_METRICS:
        if metric not in by_metric:
            other = concentration(base, finetuned, dataclasses.replace(config, metric=metric), tuple(p.ratios),
                                  progress=True)
            by_metric[metric] = other["shares"]
    return {"ratios": result["ratios"], "shares": result["shares"], "elements": result["elements"],
            "metric": config.metric, "shares_by_metric": by_metric,
            "zero_base": zero_base_mass(base, finetuned, config.region)}


# --- restoration -------------------------------------------------------------------------------


def _bits_by_level(predictions: list[dict]) -> dict[str, dict[str, str]]:
    """{domain: {level: correctness string}} in row order, for paired bootstraps in the report."""
    out: dict[str, dict[str, list[str]]] = {}
    for p in predictions:
        out.setdefault(p["domain"], {}).setdefault(str(p["level"]), []).append("1" if p["correct"] else "0")
    return {d: {lv: "".join(bits) for lv, bits in levels.items()} for d, levels in out.items()}


def _own_train_rows(deps: roles.Deps) -> list[dict]:
    """The rows of the training set the unit's model was fine-tuned on."""
    return read_jsonl(set_file(split_folder(deps), roles.dep_result(deps, roles.MODEL)["train_set"]))


def _sweep_rows(dev_domain: str, deps: roles.Deps) -> dict[str, list[dict]]:
    """Test (both domains), dev of the domain the ratio is chosen on, and the model's training set."""
    folder = split_folder(deps)
    return {"test": load_rows(eval_files(folder, "test")), "dev": load_rows(eval_files(folder, "dev", dev_domain)),
            "train": _own_train_rows(deps)}


def _evaluate_splits(model, tokenizer, rows_by_split: dict, config, ratio: float,
                     taught: frozenset[str] | None = None) -> tuple[list[dict], dict, list[dict]]:
    """Records of every split, per split but dev its correctness strings ({split: {domain: {level: bits}}}),
    and on a taught base (`taught`: its taught facts) the records per taught subset (`taught_split`)."""
    records, predictions = evaluate_splits(model, tokenizer, rows_by_split, config, {"restore_ratio": ratio})
    subsets = [] if taught is None else [{**r, "restore_ratio": ratio} for r in taught_split(predictions, taught)]
    return records, {split: _bits_by_level(p) for split, p in predictions.items() if split != "dev"}, subsets


def restore_unit(params, out: Path, deps) -> dict:
    """Evaluate the fine-tuned model restored at every ratio (0 = as fine-tuned) on test, dev and
    its own training set; restoration happens in memory, one selection for the whole sweep."""
    p, runtime = RestoreParams.of(params), Runtime.of(params)
    eval_cfg = eval_config(params)
    restore_cfg = config_from_dict(RestoreConfig, p.restore, "restore")
    finetuned = model_path(params, deps)
    model, tokenizer = unit_model(finetuned, eval_cfg, runtime)
    rows = _sweep_rows(p.dev, deps)
    # ratio 0 is the fine-tuned model itself, already scored on test by its eval unit
    unrestored = roles.dep_result(deps, roles.EVAL)
    taught = taught_facts(runtime.model)
    records, bits0, subsets = _evaluate_splits(model, tokenizer, {k: v for k, v in rows.items() if k != "test"},
                                               eval_cfg, 0.0, taught)
    records += [{**r, "restore_ratio": 0.0} for r in unrestored["records"] if r["split"] == "test"]
    subsets += [{**r, "restore_ratio": 0.0} for r in unrestored.get("taught_records", []) if r["split"] == "test"]
    bits = {"0": {**bits0, "test": unrestored["test_bits"]}}
    # no ratios: the sweep only scores the fine-tuned model on dev and its training set (plain SFT for repairs)
    for ratio, restored in restored_models(model, runtime.model, finetuned, p.ratios, restore_cfg) if p.ratios else ():
        ratio_records, ratio_bits, ratio_subsets = _evaluate_splits(restored, tokenizer, rows, eval_cfg, float(ratio),
                                                                    taught)
        records += ratio_records
        subsets += ratio_subsets
        bits[f"{float(ratio):g}"] = ratio_bits
    result = {"records": records, "test_bits": {r: b["test"] for r, b in bits.items()},
              "train_bits": {r: b["train"] for r, b in bits.items()}}
    if taught is not None:
        result["taught_records"] = subsets
    return result


def control_unit(params, out: Path, deps) -> dict:
    """Random restoration at the ratio the dev split chose for this (level, size) over all its
    seeds: does restoring the *most changed* elements matter, or would any elements do?"""
    ratio = chosen_ratio([result["records"] for result in roles.sweep_results(deps)])
    if ratio == 0:
        return {"ratio": 0.0, "records": [], "test_bits": {}}
    p, runtime = ControlParams.of(params), Runtime.of(params)
    eval_cfg = eval_config(params)
    restore_cfg = dataclasses.replace(config_from_dict(RestoreConfig, p.restore, "restore"), strategy="random", seed=p.seed)
    finetuned = model_path(params, deps)
    model, tokenizer = unit_model(finetuned, eval_cfg, runtime)
    restore_in_memory(model, runtime.model, finetuned, ratio, restore_cfg)
    rows = {"test": load_rows(eval_files(split_folder(deps), "test")), "train": _own_train_rows(deps)}
    records, bits, _ = _evaluate_splits(model, tokenizer, rows, eval_cfg, ratio)
    return {"ratio": ratio, "records": records, "test_bits": bits["test"], "train_bits": bits["train"]}


def scored_unit(params, out: Path, deps) -> dict:
    """A model on test, in-domain dev and its own training set, with per-fact correctness on test and
    training set: a LoRA candidate of the repair comparison (the report picks its rate on dev)."""
    runtime, eval_cfg = Runtime.of(params), eval_config(params)
    model, tokenizer = unit_model(model_path(params, deps), eval_cfg, runtime)
    records, predictions = evaluate_splits(model, tokenizer, _sweep_rows("in", deps), eval_cfg, {})
    return {"records": records, "test_bits": _bits_by_level(predictions["test"]),
            "train_bits": _bits_by_level(predictions["train"])}


# --- repair methods ------------------------------------------------------------------------------


def _skipped(deps: roles.Deps) -> str | None:
    """Why the model's guided repair is skipped (its importance unit found nothing to weigh), or None."""
    return skipped(roles.dep_result(deps, roles.IMPORTANCES)) if roles.IMPORTANCES in deps else None


def _repair_config(repair: dict, deps: roles.Deps) -> RepairConfig:
    """The unit's repair, reading its model's fact importances where the method does (guided)."""
    return config_from_dict(RepairConfig, {**repair, "importances": importances_path(deps)}, "repair")


def repair_unit(params, out: Path, deps) -> dict:
    """Every value of one repair method on the in-domain dev facts: what the method's choice sees."""
    p, runtime = RepairParams.of(params), Runtime.of(params)
    if skipped := _skipped(deps):
        return {"method": p.repair["method"], "records": [], "skipped": skipped}
    eval_cfg = eval_config(params)
    config = _repair_config(p.repair, deps)
    finetuned = model_path(params, deps)
    model, tokenizer = unit_model(finetuned, eval_cfg, runtime)
    dev = {"dev": _sweep_rows(p.dev, deps)["dev"]}
    records = []
    for value, repaired in repaired_models(model, runtime.model, finetuned, p.values, config):
        records += evaluate_splits(repaired, tokenizer, dev, eval_cfg, {"repair_value": value})[0]
    return {"method": config.method, "records": records}


def repaired_unit(params, out: Path, deps) -> dict:
    """The method at the value its dev sweeps chose for this (level, size) over all seeds (a seed whose guided
    repair was skipped has no dev scores: the others choose), on test and on the model's own training set, with
    per-fact correctness for the paired bootstraps."""
    p, runtime = RepairedParams.of(params), Runtime.of(params)
    if skipped := _skipped(deps):
        return {"method": p.repair["method"], "skipped": skipped}
    eval_cfg = eval_config(params)
    config = _repair_config(p.repair, deps)
    value = chosen_value([result["records"] for result in roles.sweep_results(deps)], METHODS[config.method].neutral)
    finetuned = model_path(params, deps)
    model, tokenizer = unit_model(finetuned, eval_cfg, runtime)
    rows = {k: v for k, v in _sweep_rows("in", deps).items() if k != "dev"}
    (_, repaired), = repaired_models(model, runtime.model, finetuned, [value], config)
    records, predictions = evaluate_splits(repaired, tokenizer, rows, eval_cfg, {"repair_value": value})
    return {"method": config.method, "value": value, "records": records,
            "test_bits": _bits_by_level(predictions["test"]), "train_bits": _bits_by_level(predictions["train"])}
