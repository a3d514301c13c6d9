"""The guards' arm of a study's unit graph (`[guards]`): per analysed training set, each guard at each value on
the first seed (`guard` units, scored by `guard-eval`), then on every other seed at the value those candidates
chose on in-domain dev (`guarded`, scored alike); and the plain models scored the same way. The unit functions
are `sftlens.study.engine.guard_stages`'."""

from __future__ import annotations

import dataclasses

from sftlens.config import config_to_dict
from sftlens.guards import guard_work
from sftlens.study.engine import roles
from sftlens.study.engine.choice import VALUE_CHOICE
from sftlens.study.engine.params import EvalParams, GuardedParams, GuardParams
from sftlens.study.engine.scheduler import Unit


def guard_arm(builder, names: tuple[str, str], rows: int, members: list[tuple], probe: Unit, scored: float) -> None:
    """Per guard of `[guards]`: [train]'s recipe with the guard at each value on the first seed's training
    set (`guard`, scored by `guard-eval` on test, in-domain dev and the training set), then on every other
    seed at the value those candidates chose on dev (`guarded`, scored alike); the plain models get the
    same scoring, so every arm of "Prevention and cure" is measured alike."""
    if not builder.config.guards:
        return
    recipe = builder.config.stages["train"]
    examples = rows * recipe.epochs
    deps = {roles.SPLIT: builder.split_key, roles.PROBE: probe.key}
    for _, train, member in members:
        _scored(builder, "guard-eval", f"guard-eval {member} plain", train, scored)
    (first, _, name), others = members[0], members[1:]
    for guard, values in builder.config.guards.items():
        dev = {}
        for value in values:
            params = GuardParams(**builder.selection, set=names[0], size=names[1], seed=first,
                                 train=config_to_dict(dataclasses.replace(recipe, seed=first, guard=f"{guard}={value!r}")))
            model = builder.add("guard", f"guard {name} {guard}={value:g}", params, deps,
                                work=examples * guard_work(guard, value), prune=("model",))
            dev[_scored(builder, "guard-eval", f"guard-eval {name} {guard}={value:g}", model, scored).key] = value
        for seed, _, seed_name in others:
            params = GuardedParams(**builder.selection, set=names[0], size=names[1], seed=seed,
                                   train=config_to_dict(dataclasses.replace(recipe, seed=seed)), guard=guard,
                                   value_choice=VALUE_CHOICE, dev={roles.dev_role(i): v for i, v in enumerate(dev.values())})
            model = builder.add("guarded", f"guarded {seed_name} {guard}", params,
                                {**deps, **{roles.dev_role(i): key for i, key in enumerate(dev)}},
                                work=examples * guard_work(guard, max(values)), prune=("model",))
            _scored(builder, "guard-eval", f"guard-eval {seed_name} {guard}", model, scored)


def _scored(builder, kind: str, label: str, model: Unit, work: float) -> Unit:
    return builder.add(kind, label, EvalParams(eval=builder.eval_cfg, splits=["test", "dev-in", "train"]),
                       {roles.MODEL: model.key, roles.SPLIT: builder.split_key}, work=work)
