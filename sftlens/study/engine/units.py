"""The study's unit graph: probe -> split -> train -> eval, kl, deltas, restore sweep -> control, and
per repair method: repair (its values on dev) -> repaired (the dev-chosen value on test and train), and per
analysed model an importance unit (its forgotten and learned dev facts' importances) that the guided repair reads;
with `lora_learning_rates`, per analysed training set and rate: lora (LoRA SFT) -> lora-eval; with
`learning_rates`, per training set, seed and rate at the sizes the rate is chosen at: tune ([train]'s
recipe at that rate) -> tune-eval (in-domain dev), then per model of the grid: tuned (the recipe at the
dev-chosen rate), which the analyses read instead of the models at [train]'s own rate. With
`[inject]`, an inject unit comes first and every other unit depends on it as its `base`: the model it
taught is the study's base model.

`build_units` expands a StudyConfig into units in dependency order. Keys hash the settings a
unit's result depends on (the model's weight fingerprint, the data files' bytes, the stage
config) and its dependencies' keys; paths and the device are runtime values outside the key.

Facts: `[study] facts`/`in_domain` (or `[data]`, or `study run --facts`) put a fact set in place of the
data folder: `Runtime.facts` (outside keys) tells `stages.study_facts` where to read, and
`FactSelection.data` is the set's fingerprint (its bytes and in-domain choice); `GraphBuilder.check_fact_set`
refuses a set the study cannot use. A taught base (`[inject]`): the inject unit (`InjectParams`: the
probe's fact selection, the base fingerprint, `InjectConfig`) comes first and every other unit depends on
it in the role `base`; the engine gives such a unit that unit's model folder as its runtime `model`. The
tuned arm reuses a `[train]` unit at its own rate and hard-links a candidate of the same set, size and
seed (`stages.tuned_unit`); the budget rule (every arm tuned on dev gets as many candidates) is
`config._check_rate_arms`. The eval batch size is a runtime value too (`sftlens.config.keyed_dict`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from sftlens.config import config_to_dict, keyed_dict
from sftlens.data import FactSet, data_dir_from, first_per_relation, load_fact_set, load_facts, parse_relations
from sftlens.data.factset import fingerprint as fact_set_fingerprint
from sftlens.errors import SftlensError
from sftlens.models import model_fingerprint
from sftlens.study.engine import roles
from sftlens.study.engine.choice import VALUE_CHOICE
from sftlens.study.engine.config import StudyConfig
from sftlens.study.engine.guard_units import guard_arm
from sftlens.study.engine.kinds import KINDS
from sftlens.study.engine.params import (
    ControlParams,
    DeltasParams,
    EvalParams,
    FactSelection,
    ImportanceParams,
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
    UnitParams,
)
from sftlens.study.engine.scheduler import Unit
from sftlens.weights import METHODS

RATE_CHOICE = {  # how the tuned arm's rate is chosen, in words (part of a tuned unit's key)
    "largest": "best mean dev Acc (in-domain) over seeds at the training set's largest size; ties: the smaller",
    "per-size": "best mean dev Acc (in-domain) over seeds at the model's own size; ties: the smaller",
}
TUNED = "tuned-"  # the tuned arm's models: `tuned-level0-n240-seed0`


def data_fingerprint(data_dir: Path, relations_by_split: dict[str, tuple[str, ...]]) -> str:
    """sha256 over the bytes of the data files the study reads."""
    digest = hashlib.sha256()
    for split, relations in sorted(relations_by_split.items()):
        for relation in relations:
            path = data_dir / split / f"{relation}.{split}.json"
            digest.update(f"{split}/{relation}:".encode())
            digest.update(path.read_bytes() if path.is_file() else b"<missing>")
    return digest.hexdigest()[:16]


def train_set_name(level: int | None) -> str:
    return "mixed" if level is None else f"level{level}"


def size_name(size: int | None) -> str:
    return "all" if size is None else str(size)


class GraphBuilder:
    def __init__(self, config: StudyConfig, data_dir: str | Path | None):
        self.config = config
        self.s = config.study
        self.fact_set: FactSet | None = None
        if self.s.facts:
            if data_dir or self.s.data_dir:
                raise SftlensError(f"{config.source}: study.facts and a data_dir (--data-dir): give one")
            self.fact_set = load_fact_set(self.s.facts, self.s.in_domain)
            self.data_dir = None
            self.in_rel = _topics(self.s.in_relations, self.fact_set)
            self.out_rel = _topics(self.s.out_relations, self.fact_set)
        else:
            self.data_dir = data_dir_from(data_dir or self.s.data_dir).resolve()
            self.in_rel = parse_relations(self.s.in_relations)
            self.out_rel = parse_relations(self.s.out_relations)
        self.units: list[Unit] = []
        self.base: Unit | None = None  # with [inject], the unit whose model every later unit reads as its base
        device = self.s.device
        self.res = {"cpus": self.s.cpus_per_unit, "gpus": self.s.gpus_per_unit}
        facts = {"facts": str(Path(self.s.facts).expanduser().resolve()), "in_domain": self.s.in_domain} \
            if self.fact_set else {}
        self.runtime = Runtime(model=self.s.model, data_dir=str(self.data_dir or ""), device=device,
                               eval_batch_size=config.stages["eval"].batch_size, **facts)

    def add(self, kind: str, label: str, params: UnitParams, deps: dict | None = None, work: float = 0.0,
            prune: tuple[str, ...] = ()) -> Unit:
        """A unit of `kind` (its function and parameter type: `kinds.KINDS`)."""
        declared = KINDS[kind]
        if not isinstance(params, declared.params):
            raise TypeError(f"a {kind} unit takes {declared.params.__name__}, not {type(params).__name__}")
        deps = {**(deps or {}), **({roles.BASE: self.base.key} if self.base else {})}
        unit = Unit(kind, label, declared.fn, params.to_params(), deps, self.runtime.to_params(), work=work,
                    prune=prune, **self.res)
        self.units.append(unit)
        return unit

    def relations_by_split(self) -> dict[str, tuple[str, ...]]:
        both = tuple(dict.fromkeys((*self.in_rel, *self.out_rel)))
        return {"train": self.in_rel, "dev": both, "test": both}

    def probe(self) -> Unit:
        rel = self.relations_by_split()
        data = fact_set_fingerprint(self.s.facts, self.s.in_domain) if self.fact_set else data_fingerprint(self.data_dir, rel)
        selection = FactSelection(
            data=data, relations={k: list(v) for k, v in rel.items()},
            train_facts_per_relation=self.s.train_facts_per_relation,
            eval_facts_per_relation=self.s.eval_facts_per_relation,
            dev_facts_per_relation=self.s.dev_facts_per_relation,
        )
        limits = {split: selection.limit(split) for split in rel}
        if self.fact_set:
            counts = {split: len(select_facts(self.fact_set, split, rel[split], limits[split])) for split in rel}
            self.check_fact_set(counts)
        else:
            counts = _fact_counts(self.data_dir, rel, limits)
        probe_cfg = self.config.stages["probe"]
        self.selection = selection.to_params()
        params = ProbeParams(**self.selection, model_fingerprint=model_fingerprint(self.s.model),
                             probe=config_to_dict(probe_cfg))
        self.n_facts = counts
        if self.config.inject is not None:
            self.base = self.inject(model_fingerprint(self.s.model), sum(counts.values()))
        return self.add("probe", "probe", params, work=sum(counts.values()) * _probe_samples(probe_cfg))

    def inject(self, fingerprint: str, facts: int) -> Unit:
        """The unit teaching the study's facts to its base model (statements x epochs as its work)."""
        inject = self.config.inject
        statements = facts * inject.share * sum(inject.doses) / len(inject.doses)
        return self.add("inject", "inject",
                        InjectParams(**self.selection, model_fingerprint=fingerprint, inject=config_to_dict(inject)),
                        work=statements * inject.epochs)

    def build(self) -> list[Unit]:
        s = self.s
        probe = self.probe()
        split = self.add("split", "split", SplitParams(grid=self.grid_params(), **self.selection),
                         {roles.PROBE: probe.key})
        eval_rows = self.evaluated_rows("test")
        dev_rows = self.evaluated_rows("dev")
        eval_cfg = keyed_dict(self.config.stages["eval"])
        self.split_key, self.eval_cfg = split.key, eval_cfg
        self.base_eval = self.add("eval", "eval base", EvalParams(eval=eval_cfg, splits=["test", "dev"]),
                 {roles.SPLIT: split.key}, work=eval_rows + dev_rows)
        sweeps: dict[tuple, list[Unit]] = {}
        repairs: dict[tuple, list[Unit]] = {}
        importances: dict[tuple, dict[str, str]] = {}  # (model key, method) -> its importances dependency
        guarded: dict[tuple, list[tuple]] = {}  # (level, size) -> its analysed models, for the guards' arm
        models: list[tuple[int | None, int | None, int, Unit, str]] = []
        train_rows = self.n_facts["train"] // max(1, len(s.levels))
        for level in (*s.levels, *((None,) if s.mixed else ())):
            for size in (*s.sizes, *((None,) if s.include_all else ())):
                for seed in s.seeds:
                    name = f"{train_set_name(level)}-n{size_name(size)}-seed{seed}"
                    train_cfg = config_to_dict(self.config.stages["train"]) | {"seed": seed}
                    train = self.add(
                        "train", f"train {name}",
                        TrainParams(set=train_set_name(level), size=size_name(size), seed=seed, train=train_cfg),
                        {roles.SPLIT: split.key}, work=(size or train_rows) * self.config.stages["train"].epochs,
                        prune=("model",),
                    )
                    models.append((level, size, seed, train, name))
        # with learning_rates the analyses read the tuned arm; [train]'s rate stays an arm (eval and KL)
        analysed = self.tuned_arm(models, split, train_rows) if s.learning_rates else models
        analysed_keys = {train.key for *_, train, _ in analysed}
        for level, size, seed, train, name in (*models, *(analysed if s.learning_rates else ())):
            deps = {roles.MODEL: train.key, roles.SPLIT: split.key}
            evaluation = self.add("eval", f"eval {name}", EvalParams(eval=eval_cfg, splits=["test"]),
                                  deps, work=eval_rows)
            if s.kl:
                self.add("kl", f"kl {name}",
                         KLParams(kl=config_to_dict(self.config.stages["kl"]), test_set=s.kl_test_set, **self.selection),
                         {**deps, roles.PROBE: probe.key}, work=self.kl_rows())
            if level is None or size not in s.analysis_sizes or train.key not in analysed_keys:
                continue
            self.add("deltas", f"deltas {name}",
                     DeltasParams(deltas=config_to_dict(self.config.stages["deltas"]), ratios=list(s.concentration_ratios)),
                     {roles.MODEL: train.key}, work=1)
            ratios, own_rows = list(s.restore_ratios), size or train_rows
            if ratios:  # none: restoration is left out (or compared as a repair method, `[repairs] restore`)
                sweeps.setdefault((level, size), []).append(self.add(
                    "restore", f"restore {name}",
                    RestoreParams(restore=config_to_dict(self.config.stages["restore"]), ratios=ratios, eval=eval_cfg,
                                  dev="in"),
                    {**deps, roles.EVAL: evaluation.key},
                    work=len(ratios) * (eval_rows + dev_rows / 2 + own_rows) + dev_rows / 2 + own_rows))
            weighed = self.importance(name, deps, eval_cfg, dev_rows / 2)
            for method, grid in self.config.repairs.items():
                unit = self.add("repair", f"repair {method} {name}",
                                RepairParams(repair=grid.params(), values=list(grid.values), eval=eval_cfg, dev="in"),
                                {**deps, **weighed.get(method, {})}, work=len(grid.values) * dev_rows / 2)
                repairs.setdefault((level, size, method), []).append(unit)
                importances[train.key, method] = weighed.get(method, {})
            self.lora_arm(level, size, seed, name.removeprefix(TUNED), eval_rows + dev_rows / 2 + own_rows)
            guarded.setdefault((level, size), []).append((seed, train, name.removeprefix(TUNED)))
        for (level, size), members in guarded.items():
            guard_arm(self, (train_set_name(level), size_name(size)), size or train_rows, members, probe,
                      eval_rows + dev_rows / 2 + (size or train_rows))
        if s.random_control:
            for level, size, seed, train, name in analysed:
                group = sweeps.get((level, size))
                if not group:
                    continue
                deps = {roles.MODEL: train.key, roles.SPLIT: split.key, **roles.sweep_roles(u.key for u in group)}
                self.add("control", f"control {name}",
                         ControlParams(restore=config_to_dict(self.config.stages["restore"]), eval=eval_cfg, seed=seed,
                                       ratio_choice="best mean dev Acc (in-domain) over seeds, ratio > 0"),
                         deps, work=eval_rows + (size or train_rows))
        for level, size, _, train, name in analysed:
            for method, grid in self.config.repairs.items():
                group = repairs.get((level, size, method))
                if not group:
                    continue
                deps = {roles.MODEL: train.key, roles.SPLIT: split.key, **roles.sweep_roles(u.key for u in group),
                        **importances[train.key, method]}
                self.add("repaired", f"repaired {method} {name}",
                         RepairedParams(repair=grid.params(), eval=eval_cfg, value_choice=VALUE_CHOICE),
                         deps, work=eval_rows + (size or train_rows))
        return self.units

    def importance(self, name: str, deps: dict, eval_cfg: dict, dev_rows: float) -> dict[str, dict[str, str]]:
        """The fact importances of one analysed model, if a repair method reads them (guided): method ->
        its `importances` dependency. One unit per model, whatever reads it."""
        readers = [m for m in self.config.repairs if "importances" in METHODS[m].settings]
        if not readers:
            return {}
        unit = self.add("importance", f"importance {name}", ImportanceParams(eval=eval_cfg, dev="in"),
                        {**deps, roles.BASE_EVAL: self.base_eval.key}, work=dev_rows)
        return {m: {roles.IMPORTANCES: unit.key} for m in readers}

    def candidates(self, kind: str, recipe, rates: tuple[float, ...], level, size, seed: int, name: str,
                   scoring: tuple[list[str], float], reuse: dict[float, Unit]) -> list[tuple[float, Unit, Unit]]:
        """`recipe` on one training set and seed at each candidate learning rate (a `kind` unit; a rate
        in `reuse` reads that model instead), each scored by a `{kind}-eval` unit (`scoring`: its
        splits and work): [(rate, model, scores)]."""
        splits, scored = scoring
        examples = (size or self.n_facts["train"] // max(1, len(self.s.levels))) * recipe.epochs
        out = []
        for rate in rates:
            label = f"{name} lr{rate:g}"
            model = reuse.get(rate) or self.add(
                kind, f"{kind} {label}", TrainParams(set=train_set_name(level), size=size_name(size), seed=seed,
                            train=config_to_dict(dataclasses.replace(recipe, learning_rate=rate, seed=seed))),
                {roles.SPLIT: self.split_key}, work=examples, prune=("model",))
            scores = self.add(f"{kind}-eval", f"{kind}-eval {label}", EvalParams(eval=self.eval_cfg, splits=splits),
                              {roles.MODEL: model.key, roles.SPLIT: self.split_key}, work=scored)
            out.append((rate, model, scores))
        return out

    def lora_arm(self, level, size, seed: int, name: str, scored: float) -> None:
        """LoRA SFT on the same training set and seed at each candidate learning rate, every candidate
        scored on test, in-domain dev and its training set (the report picks the rate on dev)."""
        lora = dataclasses.replace(self.config.stages["train"], method="lora")
        self.candidates("lora", lora, self.s.lora_learning_rates, level, size, seed, name,
                        (["test", "dev-in", "train"], scored), {})

    def tuned_arm(self, models: list[tuple], split: Unit, train_rows: int) -> list[tuple]:
        """[train]'s recipe at each of `learning_rates` on every training set and seed at the sizes
        where the rate is chosen (`rate_choice`), scored on in-domain dev ([train]'s own rate, when a
        candidate, is its model); then per model of the grid a `tuned` unit: the recipe at the rate its
        set's candidates chose over seeds, linked from the candidate of the same set, size and seed
        when there is one. Returns the tuned arm, as `models`."""
        s, recipe = self.s, self.config.stages["train"]
        largest = None if s.include_all else max(s.sizes)
        dev_rows = self.evaluated_rows("dev") / 2
        dev: dict[tuple, dict[str, float]] = {}  # (level, choice size) -> {candidate scores' key: rate}
        own: dict[tuple, dict[float, Unit]] = {}  # (level, size, seed) -> {rate: model}
        for level, size, seed, train, name in models:
            paper = {recipe.learning_rate: train} if recipe.learning_rate in s.learning_rates else {}
            own[(level, size, seed)] = paper
            if s.rate_choice == "largest" and size != largest:
                continue
            for rate, model, scores in self.candidates("tune", recipe, s.learning_rates, level, size, seed, name,
                                                       (["dev-in"], dev_rows), paper):
                dev.setdefault((level, size), {})[scores.key] = rate
                own[(level, size, seed)][rate] = model
        tuned = []
        for level, size, seed, _, name in models:
            choice = dev[(level, size if s.rate_choice == "per-size" else largest)]
            mine = own[(level, size, seed)]
            params = TunedParams(set=train_set_name(level), size=size_name(size), seed=seed,
                                 train=config_to_dict(recipe) | {"seed": seed}, rate_choice=RATE_CHOICE[s.rate_choice],
                                 dev={roles.dev_role(i): rate for i, rate in enumerate(choice.values())},
                                 models={roles.candidate_role(i): rate for i, rate in enumerate(mine)})
            deps = {roles.SPLIT: split.key, **{roles.dev_role(i): key for i, key in enumerate(choice)},
                    **{roles.candidate_role(i): unit.key for i, unit in enumerate(mine.values())}}
            work = 0 if len(mine) == len(s.learning_rates) else (size or train_rows) * recipe.epochs
            unit = self.add("tuned", f"tuned {name}", params, deps, work=work, prune=("model",))
            tuned.append((level, size, seed, unit, f"{TUNED}{name}"))
        return tuned

    def evaluated_rows(self, split: str) -> float:
        """Test or dev facts a model is evaluated on; under `eval_facts_per_level` roughly the cap
        per domain (level 0 holds most facts of a weak model) plus the rarer levels (a fifth)."""
        n = self.n_facts[split]
        cap = self.s.eval_facts_per_level
        return n if cap is None else min(n, 2 * cap + 0.2 * n)

    def kl_rows(self) -> float:
        """Facts of the KL's test set: a domain's test facts, a fifth of them for a single level."""
        domain, _, level = self.s.kl_test_set.partition("-")
        relations = self.in_rel if domain == "in" else self.out_rel
        share = len(relations) / max(1, len(set(self.in_rel) | set(self.out_rel)))
        rows = self.n_facts["test"] * share / (5 if level else 1)
        cap = self.s.eval_facts_per_level
        return rows if cap is None else min(rows, cap * (1 if level else 5))

    def grid_params(self) -> dict:
        s = self.s
        grid = {"levels": list(s.levels), "sizes": list(s.sizes), "include_all": s.include_all,
                "seeds": list(s.seeds), "mixed": s.mixed}
        if s.eval_facts_per_level is not None:  # only when set, so older studies keep their keys
            grid["eval_facts_per_level"] = s.eval_facts_per_level
        return grid


    def check_fact_set(self, counts: dict[str, int]) -> None:
        """A fact set the study cannot use is an error naming what is missing, before any unit runs."""
        s, name = self.s, f"{self.config.source}: fact set {self.fact_set.name}"
        if not self.in_rel:
            raise SftlensError(f"{name}: no in-domain topics for study.in_relations {s.in_relations!r}")
        largest = max(s.sizes, default=1)
        if counts["train"] < largest:
            raise SftlensError(f"{name}: {counts['train']} in-domain train facts (after train_facts_per_relation), "
                               f"fewer than the largest of study.sizes ({largest})")
        if not counts["test"]:
            raise SftlensError(f"{name}: no test facts for study.in_relations / out_relations")
        if s.analysis_sizes and not counts["dev"]:
            raise SftlensError(f"{name}: no dev facts, but study.analysis_sizes choose restore ratios and repair "
                               "values on dev")


def select_facts(fact_set: FactSet, split: str, relations, limit: int | None) -> list:
    """A study's facts of one split of a fact set (none where the set has no such split)."""
    if not relations or all(f.split != split for f in fact_set.facts):
        return []
    return fact_set.select(list(relations), (split,), limit)


def _topics(spec: str, fact_set: FactSet) -> tuple[str, ...]:
    """A fact set's topics of `spec`; a domain with no topic (every topic in-domain) is empty."""
    if spec in ("in", "out"):
        return tuple(t for t, d in fact_set.domains().items() if d == spec)
    return parse_relations(spec, fact_set.topics())


def _probe_samples(probe_cfg) -> int:
    return (len(probe_cfg.templates) or 21) * probe_cfg.samples


def _fact_counts(data_dir: Path, rel: dict, limits: dict[str, int | None]) -> dict[str, int]:
    return {split: len(first_per_relation(load_facts(data_dir, splits=(split,), relations=relations).facts,
                                          limits[split]))
            for split, relations in rel.items()}


def build_units(config: StudyConfig, data_dir: str | Path | None = None) -> list[Unit]:
    return GraphBuilder(config, data_dir).build()
