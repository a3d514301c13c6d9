"""A study file: one TOML describing the whole grid.

Sections: `[study]` (StudySettings below: model, data, grid, analysis choices) and one section per
stage, each checked against that stage's config dataclass: `[probe]`, `[train]`, `[eval]`, `[kl]`,
`[deltas]`, `[restore]`, and `[repairs]`: the repair methods to compare, one table per method with its
values and settings (`wise = { values = [0.25, 0.5, 0.75] }`; `sftlens.weights.RepairConfig` fields),
every method with as many values as the others (the same tuning budget on dev), and as many as `[study]`
`learning_rates` (full SFT's rate, tuned on dev) and `lora_learning_rates` have rates; `[guards]`: the
training-time guards to compare (`replay = { values = [0.125, 0.25, 0.5] }`; `sftlens.guards`), each with as
many values as every repair method (one tuning budget); `[inject]`
(`sftlens.inject.InjectConfig`; present, even empty, it makes the study's base the model taught the
study's facts by `inject`). The split has no section: every setting of `SplitConfig` is the study's grid
(`[study]` levels, sizes, include_all, seeds, mixed, eval_facts_per_level), so a `[split]` key would
have no effect and is an error naming it. A file may start from a shipped preset with
`extends = "demo"` (or "paper", or a path) and override single keys; unknown keys and wrong types
are errors naming the key (`train.learning_rate: expected a number, got 'fast'`).
"""

from __future__ import annotations

import importlib
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from sftlens.config import config_from_dict, config_to_dict
from sftlens.errors import SftlensError

PRESETS = ("paper", "demo", "repro", "repairs", "testbed", "guards")

# section -> (module, config class): the stage sections a study file may have, each checked against its
# stage's config (`stage_class` imports the module by name).
STAGE_SECTIONS = {
    "probe": ("sftlens.probe", "ProbeConfig"),
    "train": ("sftlens.train", "TrainConfig"),
    "eval": ("sftlens.evaluate", "EvalConfig"),
    "kl": ("sftlens.analysis.kl", "KLConfig"),
    "deltas": ("sftlens.analysis.deltas", "DeltasConfig"),
    "restore": ("sftlens.restore", "RestoreConfig"),
}


@dataclass(frozen=True)
class StudySettings:
    model: str = field(default="smollm2-135m", metadata={"help": "base model: built-in name, local folder or hub id"})
    data_dir: str | None = field(
        default=None, metadata={"help": "EntityQuestions folder (default: --data-dir or $SFTLENS_DATA_DIR)"})
    facts: str | None = field(
        default=None, metadata={"help": "a fact set instead of EntityQuestions: a folder from `sftlens data import` "
                                        "or a native JSONL file (also `[data] facts`)"})
    in_domain: str | None = field(
        default=None, metadata={"help": "with facts: the topics that count as in-domain (default: as the set "
                                        "declares, else all)"})
    in_relations: str = field(default="in", metadata={"help": "in-domain relations (training and Acc_test)"})
    out_relations: str = field(default="out", metadata={"help": "out-of-domain relations (Acc_testood)"})
    train_facts_per_relation: int | None = field(
        default=None, metadata={"help": "probe at most this many training facts per relation (default: all)"})
    eval_facts_per_relation: int | None = field(
        default=None, metadata={"help": "probe at most this many test facts (and dev facts, unless "
                                        "dev_facts_per_relation) per relation (default: all)"})
    dev_facts_per_relation: int | None = field(
        default=None, metadata={"help": "probe at most this many dev facts per relation (default: as test)"})
    eval_facts_per_level: int | None = field(
        default=None, metadata={"help": "evaluate at most this many test (and dev) facts per domain and mastery "
                                        "level, topic-balanced (default: all probed)"})
    levels: tuple[int, ...] = field(default=(0, 1, 2, 3, 4), metadata={"help": "mastery levels to train on"})
    sizes: tuple[int, ...] = field(
        default=(60, 120, 240, 480, 960, 1920), metadata={"help": "training-set sizes"})
    include_all: bool = field(default=True, metadata={"help": "also train on each whole level set ('All')"})
    seeds: tuple[int, ...] = field(default=(0, 1, 2, 3, 4), metadata={"help": "seeds (data sample and training)"})
    mixed: bool = field(default=True, metadata={"help": "also train on level-mixed sets (Table 6 'SFT (Mixed)')"})
    analysis_sizes: tuple[int, ...] = field(
        default=(240, 1920), metadata={"help": "sizes whose models get update statistics and restoration (Tables 3-5)"})
    table_size: int = field(default=1920, metadata={"help": "training size of Table 2 and Table 6"})
    concentration_ratios: tuple[float, ...] = field(
        default=(1, 3, 5, 10, 20, 40, 60), metadata={"help": "top-k %% of Table 3 (update concentration)"})
    restore_ratios: tuple[float, ...] = field(
        default=(1, 3, 5, 10, 20, 40, 60), metadata={"help": "restore ratios (%%) of the sweep (Tables 4-5)"})
    kl: bool = field(default=True, metadata={"help": "first-token KL of every fine-tuned model (Figure 5)"})
    kl_test_set: str = field(
        default="in-level4", metadata={"help": "test facts of the KL (Figure 5): {in,out}-level{L}, or in / out (all levels)"})
    learning_rates: tuple[float, ...] = field(
        default=(), metadata={"help": "tune [train]'s learning rate on dev: one model per training set, seed and rate "
                                      "(at the sizes rate_choice names), the rate with the best mean in-domain dev Acc "
                                      "over seeds (ties: the smaller) trains the tuned arm, which the analyses "
                                      "(update statistics, restoration, repairs) then read; [train]'s own rate stays "
                                      "an arm (as many rates as LoRA's and each repair method's values)"})
    rate_choice: Literal["largest", "per-size"] = field(
        default="largest", metadata={"help": "with learning_rates: choose each training set's rate at its largest size "
                                             "and train its other sizes at that rate (largest), or choose at every "
                                             "size (per-size: as many candidates at every size)"})
    lora_learning_rates: tuple[float, ...] = field(
        default=(), metadata={"help": "LoRA SFT beside full SFT in the repair comparison: one LoRA model ([train]'s "
                                      "lora_* settings) per analysed training set, seed and learning rate, the rate "
                                      "chosen on dev (as many rates as each repair method has values)"})
    random_control: bool = field(
        default=True, metadata={"help": "random restoration at the dev-chosen ratio, as a control"})
    bootstrap: int = field(default=1000, metadata={"help": "bootstrap resamples for restoration-gain intervals"})
    prune_checkpoints: bool = field(
        default=False, metadata={"help": "delete fine-tuned weights once every unit reading them is done"})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": "device of every unit"})
    cpus_per_unit: float = field(default=1.0, metadata={"help": "CPUs a unit asks the Ray executor for"})
    gpus_per_unit: float = field(default=0.0, metadata={"help": "GPUs a unit asks the Ray executor for"})

    def __post_init__(self):
        if not self.levels or any(not 0 <= level <= 4 for level in self.levels):
            raise ValueError(f"levels must be in 0..4, got {list(self.levels)}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        if not self.sizes and not self.include_all:
            raise ValueError("no training sizes: give sizes or include_all = true")
        if any(s <= 0 for s in self.sizes):
            raise ValueError(f"sizes must be positive, got {list(self.sizes)}")
        missing = [s for s in self.analysis_sizes if s not in self.sizes]
        if missing:
            raise ValueError(f"analysis_sizes {missing} are not among sizes {list(self.sizes)}")
        for name in ("train_facts_per_relation", "eval_facts_per_relation", "dev_facts_per_relation",
                     "eval_facts_per_level"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.kl_test_set not in ("in", "out") and not re.fullmatch(r"(in|out)-level[0-4]", self.kl_test_set):
            raise ValueError(f"kl_test_set must be in, out or {{in,out}}-level{{0..4}}, got {self.kl_test_set!r}")
        for name in ("learning_rates", "lora_learning_rates"):
            rates = getattr(self, name)
            if any(not rate > 0 for rate in rates):
                raise ValueError(f"{name} must be positive, got {list(rates)}")
            if len(set(rates)) != len(rates):
                raise ValueError(f"{name} must be distinct, got {list(rates)}")
        if self.bootstrap < 0:
            raise ValueError(f"bootstrap must be >= 0, got {self.bootstrap}")


@dataclass(frozen=True)
class RepairGrid:
    """One repair method of the comparison: its settings and the values tried on dev."""

    config: object  # sftlens.weights.RepairConfig
    values: tuple[float, ...]

    def params(self) -> dict:
        """What enters a repair unit's key: the method and the settings it reads (the guided repair's
        importances through its importance unit, a dependency whose key is part of the unit's)."""
        return {"method": self.config.method, **self.config.settings(importances=False)}


@dataclass(frozen=True)
class StudyConfig:
    study: StudySettings
    stages: dict  # section -> that stage's config dataclass
    source: str  # where it came from (preset name or file), for messages
    repairs: dict = field(default_factory=dict)  # method -> RepairGrid, in the file's order
    inject: object | None = None  # sftlens.inject.InjectConfig: the study's base is the taught model
    guards: dict = field(default_factory=dict)  # guard -> its values (sftlens.guards), in the file's order


    def to_dict(self) -> dict:
        out = {"study": config_to_dict(self.study), **{k: config_to_dict(v) for k, v in self.stages.items()}}
        if self.repairs:
            out["repairs"] = {m: {"values": list(g.values), **g.params()} for m, g in self.repairs.items()}
        if self.inject is not None:
            out["inject"] = config_to_dict(self.inject)
        if self.guards:
            out["guards"] = {name: {"values": list(values)} for name, values in self.guards.items()}
        return out


def stage_class(section: str):
    module, name = STAGE_SECTIONS[section]
    return getattr(importlib.import_module(module), name)


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise SftlensError(f"{path}: cannot read ({err.strerror})") from None
    except tomllib.TOMLDecodeError as err:
        raise SftlensError(f"{path}: not valid TOML ({err})") from None


def preset_text(name: str) -> str:
    return resources.files("sftlens.resources").joinpath("presets", f"{name}.toml").read_text(encoding="utf-8")


def _load_raw(spec: str, seen: tuple[str, ...] = ()) -> dict:
    """The merged tables of a preset name or TOML path, following `extends`."""
    if spec in seen:
        raise SftlensError(f"{spec}: `extends` loops ({' -> '.join((*seen, spec))})")
    if spec in PRESETS:
        raw, base_dir = tomllib.loads(preset_text(spec)), None
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise SftlensError(f"{spec}: no such study file (or preset: {', '.join(PRESETS)})")
        raw, base_dir = _read_toml(path), path.parent
    parent = raw.pop("extends", None)
    if parent is not None and not isinstance(parent, str):
        raise SftlensError(f"{spec}: extends: expected a preset name or a path, got {parent!r}")
    _data_section(raw, spec)
    for key in ("data_dir", "facts"):
        value = raw.get("study", {}).get(key) if isinstance(raw.get("study"), dict) else None
        if base_dir is not None and isinstance(value, str) and not Path(value).expanduser().is_absolute():
            raw["study"][key] = str((base_dir / value).resolve())  # relative to the study file
    if parent is None:
        return raw
    if base_dir is not None and parent not in PRESETS:
        parent = str(base_dir / parent)
    merged = _load_raw(parent, (*seen, spec))
    for section, table in raw.items():
        if isinstance(table, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **table}
        else:
            merged[section] = table
    return merged


def _data_section(raw: dict, spec: str) -> None:
    """`[data]` (facts, in_domain): the study's fact set, read as the `[study]` keys of the same names."""
    data = raw.pop("data", None)
    if data is None:
        return
    if not isinstance(data, dict) or set(data) - {"facts", "in_domain"}:
        bad = sorted(set(data) - {"facts", "in_domain"})[0] if isinstance(data, dict) else data
        raise SftlensError(f"{spec}: data.{bad}: unknown key (known: facts, in_domain)")
    if not isinstance(raw.setdefault("study", {}), dict):
        raise SftlensError(f"{spec}: study: expected a table")
    raw["study"].update(data)


def load_study_config(spec: str, overrides: dict | None = None) -> StudyConfig:
    """Load a study from a preset name or a TOML path; `overrides` = {section: {key: value}}."""
    raw = _load_raw(spec)
    for section, table in (overrides or {}).items():
        raw[section] = {**raw.get(section, {}), **table}
    if raw.get("split"):
        key = next(iter(raw["split"])) if isinstance(raw["split"], dict) else ""
        raise SftlensError(f"{spec}: split.{key} has no effect in a study: the split follows [study] "
                           "(levels, sizes, include_all, seeds, mixed, eval_facts_per_level); set it there")
    raw.pop("split", None)
    known = ("study", *STAGE_SECTIONS, "repairs", "inject", "guards")
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise SftlensError(f"{spec}: unknown section or key {unknown[0]!r} (known: extends, {', '.join(known)})")
    study = config_from_dict(StudySettings, raw.get("study", {}), "study")
    stages = {s: config_from_dict(stage_class(s), raw.get(s, {}), s) for s in STAGE_SECTIONS}
    repairs = repair_grids(raw.get("repairs", {}), spec)
    guards = guard_grids(raw.get("guards", {}), stages["train"], spec)
    _check_rate_arms(study, stages["train"], repairs, guards, spec)
    return StudyConfig(study, stages, spec, repairs, _inject_config(raw, stages["probe"], spec), guards)


def _inject_config(raw: dict, probe, spec: str):
    """`[inject]` (even empty: the defaults) makes the study's base the model taught by `sftlens.inject`;
    its probe may not use a taught template (checked here, before anything runs)."""
    if "inject" not in raw:
        return None
    from sftlens.inject import InjectConfig

    inject = config_from_dict(InjectConfig, raw["inject"], "inject")
    overlap = sorted(set(probe.templates) & set(inject.templates))
    if overlap:
        raise SftlensError(f"{spec}: probe.templates {overlap} are taught by inject.templates {list(inject.templates)}; "
                           "probe a taught base on the other templates (or give none: all the others)")
    return inject


def _check_rate_arms(study: StudySettings, train, repairs: dict, guards: dict, spec: str) -> None:
    """LoRA is compared with full SFT; every arm tuned on dev (full SFT's rate, LoRA's rate, each
    repair method's value, each guard's value) gets the same tuning budget: as many candidates as the others."""
    if study.lora_learning_rates and train.method == "lora":
        raise SftlensError(f"{spec}: study.lora_learning_rates compares LoRA with full SFT, but train.method is "
                           "already 'lora'; set train.method = 'full'")
    budgets = [(f"study.{name}", len(getattr(study, name))) for name in ("learning_rates", "lora_learning_rates")
               if getattr(study, name)]
    budgets += [(f"repairs.{method}.values", len(grid.values)) for method, grid in list(repairs.items())[:1]]
    budgets += [(f"guards.{name}.values", len(values)) for name, values in guards.items()]
    if guards and not study.analysis_sizes:
        raise SftlensError(f"{spec}: [guards] train on the analysed training sets: set study.analysis_sizes")
    for (name, n), (other, m) in zip(budgets, budgets[1:]):
        if n != m:
            raise SftlensError(f"{spec}: {name}: {n} values, but {other} has {m}: every arm tuned on dev gets the "
                               "same tuning budget (as many candidates)")


def repair_grids(raw: dict, spec: str) -> dict[str, RepairGrid]:
    """The `[repairs]` tables: method -> its settings and values; every method gets as many values
    as the others, so each has the same number of dev evaluations to choose with."""
    from sftlens.weights import RepairConfig, parse_values

    if not isinstance(raw, dict):
        raise SftlensError(f"{spec}: repairs: expected tables like wise = {{ values = [0.5, 0.75] }}, got {raw!r}")
    grids = {}
    for method, table in raw.items():
        where = f"repairs.{method}"
        if not isinstance(table, dict) or "values" not in table:
            raise SftlensError(f"{spec}: {where}: expected a table with values = [...], got {table!r}")
        settings = {k: v for k, v in table.items() if k != "values"}
        if "method" in settings:
            raise SftlensError(f"{spec}: {where}.method: the table's name is the method; remove the key")
        config = config_from_dict(RepairConfig, {"method": method, **settings}, where)
        if settings.get("importances") is not None:
            raise SftlensError(f"{spec}: {where}.importances: a study computes each fine-tuned model's importances "
                               "itself (its importance units); remove the key")
        if not isinstance(table["values"], list):
            raise SftlensError(f"{spec}: {where}.values: expected a list of numbers, got {table['values']!r}")
        try:
            values = parse_values(method, table["values"])
        except SftlensError as err:
            raise SftlensError(f"{spec}: {where}.values: {err}") from None
        grids[method] = RepairGrid(config, values)
    budgets = {m: len(g.values) for m, g in grids.items()}
    if len(set(budgets.values())) > 1:
        first, *others = budgets.items()
        odd = next((m, n) for m, n in others if n != first[1])
        raise SftlensError(f"{spec}: repairs.{odd[0]}.values: {odd[1]} values, but {first[0]} has {first[1]}: every "
                           "method gets the same number of values (the same tuning budget on dev)")
    return grids


def guard_grids(raw: dict, train, spec: str) -> dict[str, tuple[float, ...]]:
    """The `[guards]` tables: guard -> its values (sorted, distinct, each a valid `--guard` of [train]'s recipe)."""
    import dataclasses

    if not isinstance(raw, dict):
        raise SftlensError(f"{spec}: guards: expected tables like l2 = {{ values = [0.1, 1] }}, got {raw!r}")
    grids = {}
    for name, table in raw.items():
        where = f"{spec}: guards.{name}"
        if not isinstance(table, dict) or set(table) != {"values"} or not isinstance(table["values"], list) \
                or not table["values"]:
            raise SftlensError(f"{where}: expected a table with values = [...] and nothing else, got {table!r}")
        values = []
        for value in table["values"]:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SftlensError(f"{where}.values: expected numbers, got {value!r}")
            try:
                dataclasses.replace(train, guard=f"{name}={float(value)!r}")
            except (ValueError, SftlensError) as err:
                raise SftlensError(f"{where}.values: {err}") from None
            values.append(float(value))
        grids[name] = tuple(sorted(set(values)))
    return grids

