"""The report's "Prevention and cure" (a study with `[guards]`, on a taught base): plain SFT, each training-time
guard at its dev-chosen value, LoRA at its dev-chosen rate and each post-hoc repair of plain SFT at its dev-chosen
value, measured alike on the same facts and seeds:

- taught facts kept: of the taught test facts (both domains) the base model answers right, the share the model
  still answers right (100 - forgotten %); and the share right of the taught facts at probe level 4;
- what the fine-tune was for: the share of its own training facts it answers right (learned), and of the
  untaught test facts, in-domain and out-of-domain;
- cost: training time relative to plain SFT's (the units' wall seconds; a repair's: its dev sweep, the guided
  repair's with its importance unit), and the memory a guard holds beyond plain SFT.

Each arm's kept and learned points are compared with plain SFT's by a paired bootstrap over facts (one draw of the
test facts shared by every seed; each seed's own training facts) and seeds (paired by seed), its draws seeded by the
comparison's own key, so adding or dropping an arm never moves another's interval; the verdict is the Findings'
rule (`sftlens.reporting.bootstrap.verdict`). The answer line applies a rule fixed here: of the guards whose kept
gain holds, the one with the largest learned point; the same over the repairs; none: "no ... at this scale".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sftlens.guards import GUARDS, parse_guard
from sftlens.io import stable_hash
from sftlens.reporting.bootstrap import Estimate, estimate, verdict
from sftlens.reporting.figures import figure_panels, save_figure
from sftlens.reporting.page import Section, interval_text
from sftlens.study.engine import roles
from sftlens.study.engine.choice import chosen_guard_value
from sftlens.study.engine.outcomes import Outcome
from sftlens.study.engine.scheduler import unit_folder
from sftlens.study.report.results import Seeded, StudyResults, chosen_models, rate_candidates, test_correct, test_order
from sftlens.taught import taught_facts


@dataclass
class Arm:
    name: str
    value: str  # the chosen value, as text
    models: dict  # seed -> a scored outcome (its test_bits, train_bits)
    seconds: list = field(default_factory=list)  # the training (or repair) units' wall seconds
    extra: str = "-"  # memory beyond plain SFT
    kind: str = "guard"  # plain | guard | lora | repair


@dataclass
class Facts:
    """Which test facts each metric reads, in one order for every model."""

    order: dict  # (domain, level) -> fact ids in split-file order
    kept: list[str]  # taught, right on the base
    level4: list[str]  # taught, probe level 4
    untaught: dict  # domain -> untaught fact ids

    def vector(self, result: Outcome, ids: list[str]) -> np.ndarray:
        correct = test_correct(result.test_bits, self.order)
        return np.array([correct[f] for f in ids], dtype=float)


def _train_vector(result: Outcome) -> np.ndarray:
    bits = "".join(s for levels in result.train_bits.values() for _, s in sorted(levels.items()))
    return np.frombuffer(bits.encode("ascii"), dtype=np.uint8) - ord("0")


def _seed_of(key: list) -> int:
    return int(stable_hash(key)[:12], 16)


def paired_gain(arm: list[np.ndarray], plain: list[np.ndarray], shared: bool, samples: int, key: list) -> Estimate:
    """Mean over seeds of arm minus plain (0/1 vectors over the same facts per seed), with a percentile bootstrap
    over facts (one draw for every seed when `shared`: the same test facts) and seeds (paired)."""
    rng = np.random.default_rng(_seed_of(key))
    draw = rng.integers(0, len(arm[0]), (samples, len(arm[0]))) if shared else None
    per_seed = []
    for a, b in zip(arm, plain):
        index = draw if shared else rng.integers(0, len(a), (samples, len(a)))
        per_seed.append(a[index].mean(axis=1) - b[index].mean(axis=1))
    pick = rng.integers(0, len(arm), (samples, len(arm)))
    draws = np.stack(per_seed)[pick, np.arange(samples)[:, None]].mean(axis=1)
    return estimate(float(np.mean([a.mean() - b.mean() for a, b in zip(arm, plain)])), draws)


def _facts(results: StudyResults, study_dir: Path) -> Facts | None:
    injected, base = results.done("inject"), [u for u in results.done("eval") if "model" not in u["spec"]["deps"]]
    if not injected or not base:
        return None
    taught = taught_facts(unit_folder(study_dir, "inject", injected[0]["key"]) / "model")
    order = test_order(results, study_dir)
    right = test_correct(results.outcome(base[0]).test_bits, order)
    ids = [f for fs in order.values() for f in fs]
    return Facts(order, [f for f in ids if f in taught and right[f]],
                 [f for (_, level), fs in order.items() if level == "4" for f in fs if f in taught],
                 {d: [f for (dom, _), fs in order.items() if dom == d for f in fs if f not in taught]
                  for d in ("in", "out")})


def _arms(results: StudyResults) -> list[Arm]:
    keys = results.by_key()
    model_of = {u["key"]: keys[u["spec"]["deps"]["model"]] for u in results.done("guard-eval")}
    plain = Arm("plain SFT", "-", {}, kind="plain")
    candidates: dict[str, dict[float, list[tuple[Seeded, dict]]]] = {}  # guard -> value -> (scores, model unit)
    guarded: dict[str, list[tuple[dict, dict]]] = {}
    for unit in results.done("guard-eval"):
        model = model_of[unit["key"]]
        seed = model["spec"]["params"]["seed"]
        if model["kind"] in ("train", "tuned"):
            plain.models[seed] = results.outcome(unit)
            plain.seconds.append(model["seconds"])
        elif model["kind"] == "guard":
            name, value = parse_guard(model["spec"]["params"]["train"]["guard"])
            candidates.setdefault(name, {}).setdefault(value, []).append((Seeded(seed, results.outcome(unit)), model))
        else:
            guarded.setdefault(model["spec"]["params"]["guard"], []).append((unit, model))
    arms = [plain]
    for name, by_value in candidates.items():
        value = chosen_guard_value({v: [s.outcome.records for s, _ in ms] for v, ms in by_value.items()},
                                   GUARDS[name].neutral)
        chosen = by_value[value]
        arm = Arm(f"guard {name}", f"{value:g}", {s.seed: s.outcome for s, _ in chosen},
                  [model["seconds"] for _, model in chosen],
                  _megabytes(results.outcome(chosen[0][1]).guard["extra_bytes"]))
        for unit, model in guarded.get(name, []):
            if results.outcome(model).value != value:  # the units chose by the same rule: a mismatch is a defect
                raise ValueError(f"guarded unit {model['label']} chose {results.outcome(model).value}, the report {value}")
            arm.models[model["spec"]["params"]["seed"]] = results.outcome(unit)
            arm.seconds.append(model["seconds"])
        arms.append(arm)
    groups = rate_candidates(results, "lora-eval")
    for (level, size), by_rate in groups.items():
        chosen = chosen_models(by_rate)
        if chosen:
            arms.append(Arm("LoRA" if len(groups) == 1 else f"LoRA ({level}, n={size})", f"lr {chosen[0].value:g}",
                            {m.seed: m.outcome for m in chosen}, [m.seconds for m in chosen], "adapters only", kind="lora"))
    for unit in results.done("repaired"):
        method = results.outcome(unit).method
        arm = next((a for a in arms if a.name == f"repair {method}"), None)
        if arm is None:
            arm = Arm(f"repair {method}", f"{results.outcome(unit).value:g}", {}, kind="repair", extra="the base weights")
            arms.append(arm)
        arm.models[results.model_tags(unit)["seed"]] = results.outcome(unit)
        sweeps = [keys[k] for role, k in unit["spec"]["deps"].items() if role.startswith("sweep")]
        weighed = unit["spec"]["deps"].get(roles.IMPORTANCES)  # the guided repair's importance unit
        arm.seconds.append(sum(s["seconds"] or 0 for s in sweeps) / max(1, len(sweeps))
                           + ((keys[weighed]["seconds"] or 0) if weighed else 0))
    return arms


def _train_n(plain: Arm) -> str:
    sizes = {len(_train_vector(result)) for result in plain.models.values()}
    return "/".join(map(str, sorted(sizes))) or "?"


def _megabytes(n: int) -> str:
    return f"{n / 2**20:,.0f} MB" if n else "0"


def _share(vectors: list[np.ndarray]) -> str:
    if not vectors or not all(len(v) for v in vectors):
        return "n/a"
    return f"{100 * np.mean([v.mean() for v in vectors]):.1f}"


def _forgotten(kept: str) -> str:
    return kept if kept == "n/a" else f"{100 - float(kept):.1f}"


def _time(arm: Arm, plain: Arm) -> str:
    if not arm.seconds or not plain.seconds or None in arm.seconds:
        return "n/a"
    ratio = np.mean(arm.seconds) / np.mean(plain.seconds)
    return f"+{ratio:.2f}x (dev sweep)" if arm.kind == "repair" else f"{ratio:.2f}x"


def _answer(rows: list[tuple[Arm, Estimate, Estimate, str]], kind: str, what: str) -> str:
    winners = [(arm, learned) for arm, kept, learned, word in rows if arm.kind == kind and word == "holds"]
    if not winners:
        return f"no {what} kept significantly more taught facts than plain SFT at this scale"
    arm, learned = max(winners, key=lambda w: w[1].value)
    return f"{arm.name} ({arm.value}) keeps the most learning among the {what}s that keep more taught facts " \
           f"(learned vs plain SFT {interval_text(learned)} points)"


def prevention_section(results: StudyResults, study_dir: Path, path: Path, samples: int) -> Section | None:
    if not results.done("guard-eval"):
        return None
    facts = _facts(results, study_dir)
    if facts is None:
        return None
    arms = _arms(results)
    plain = arms[0]
    header = ["arm", "chosen value", "seeds", f"taught kept (% of {len(facts.kept)})", "forgotten (%)",
              f"taught level 4 right (% of {len(facts.level4)})",
              f"learned: own training facts right (% of {_train_n(plain)} per seed)",
              f"untaught in-domain right (% of {len(facts.untaught['in'])})",
              f"untaught out-of-domain right (% of {len(facts.untaught['out'])})",
              "kept vs plain (pts)", "learned vs plain (pts)", "more kept", "time vs plain SFT", "extra memory"]
    table, scored, points = [], [], []
    for arm in arms:
        seeds = sorted(set(arm.models) & set(plain.models))
        kept = [facts.vector(arm.models[s], facts.kept) for s in seeds]
        learned = [_train_vector(arm.models[s]) for s in seeds]
        cells = [arm.name, arm.value, str(len(seeds)), _share(kept), _forgotten(_share(kept)),
                 _share([facts.vector(arm.models[s], facts.level4) for s in seeds]), _share(learned),
                 *(_share([facts.vector(arm.models[s], facts.untaught[d]) for s in seeds]) for d in ("in", "out"))]
        if arm is plain:
            cells += ["-", "-", "-"]
        elif not facts.kept or not seeds:
            cells += ["n/a", "n/a", "not tested: no taught fact the base answers right" if seeds else "no seed"]
        else:
            base_kept = [facts.vector(plain.models[s], facts.kept) for s in seeds]
            base_learned = [_train_vector(plain.models[s]) for s in seeds]
            gain = paired_gain(kept, base_kept, True, samples, ["prevention", arm.name, "kept"])
            cost = paired_gain(learned, base_learned, False, samples, ["prevention", arm.name, "learned"])
            word = verdict(gain.low, gain.high, +1)
            scored.append((arm, gain, cost, word))
            cells += [interval_text(gain), interval_text(cost), word]
        table.append(cells + [_time(arm, plain), arm.extra if arm is not plain else "0"])
        if facts.kept and seeds:
            points.append((arm, _own_interval(learned, samples, arm.name, "learned"),
                           _own_interval(kept, samples, arm.name, "kept")))
    text = (f"{ANSWER}{_answer(scored, 'guard', 'guard')}; {_answer(scored, 'repair', 'repair')}.{END}"
            "Plain SFT, each training-time guard (`sftlens.guards`) at the value its seed-0 candidates chose on "
            "in-domain dev (then trained on the other seeds), LoRA at its dev-chosen rate and each repair of plain "
            "SFT at its dev-chosen value, scored on the same facts. Kept: of the taught test facts (both domains) the "
            "base answers right, the share still right; learned: the model's own training facts right. Gains vs "
            "plain SFT: paired bootstrap 95 % CIs over facts and seeds; more kept: holds / reversed / inconclusive "
            "by the Findings' rule. A guard that keeps facts by learning less shows a negative learned gain.")
    return Section("Prevention and cure", text, [("", header, table)], _figure(points, path))


ANSWER, END = "Answer (a rule fixed in code before the run): ", "\n"  # the answer is the text's first line


def answer_of(section: Section) -> str:
    """The answer sentence a "Prevention and cure" section opens with (a results page repeats it first)."""
    return section.text.split(END, 1)[0]


def _own_interval(vectors: list[np.ndarray], samples: int, name: str, metric: str) -> Estimate:
    """An arm's own mean over seeds with its bootstrap interval (for the figure's error bars)."""
    rng = np.random.default_rng(_seed_of(["prevention-arm", name, metric]))
    per_seed = [v[rng.integers(0, len(v), (samples, len(v)))].mean(axis=1) for v in vectors]
    pick = rng.integers(0, len(vectors), (samples, len(vectors)))
    return estimate(float(np.mean([v.mean() for v in vectors])),
                    np.stack(per_seed)[pick, np.arange(samples)[:, None]].mean(axis=1))


MARKERS = {"plain": "s", "guard": "o", "lora": "D", "repair": "^"}


def _figure(points: list[tuple[Arm, Estimate, Estimate]], path: Path) -> Path:
    """Knowledge kept against knowledge learned, one point per arm with its 95 % intervals (marker: the arm's kind)."""
    figure, (ax,) = figure_panels(1, width=7.0)
    for arm, learned, kept in points:
        ax.errorbar([100 * learned.value], [100 * kept.value],
                    xerr=[[100 * (learned.value - learned.low)], [100 * (learned.high - learned.value)]],
                    yerr=[[100 * (kept.value - kept.low)], [100 * (kept.high - kept.value)]],
                    marker=MARKERS[arm.kind], capsize=3, linestyle="none", label=f"{arm.name} ({arm.value})"
                    if arm.value != "-" else arm.name)
    ax.set_xlabel("learned: own training facts right (%)")
    ax.set_ylabel("kept: taught facts the base knew, still right (%)")
    ax.set_title("Prevention and cure: knowledge kept vs learned")
    ax.grid(alpha=0.3)
    if points:  # none: no taught fact the base knew, so no point to draw (the table says n/a)
        ax.legend(fontsize="small", loc="best")
    return save_figure(figure, path)
