"""Stage: teach a base model known facts before the paper's pipeline runs on it (a knowledge testbed).

A small base model knows few facts, so fine-tuning has little to erase and a repair little to bring
back. `inject` continues training the base model on *statements*: a fact's subject in one of its
relation's mapping templates, the answer as the completion (" {answer}."), loss on the answer only
(`sftlens.train`), never the SFT question format. The taught model is then probed, split, fine-tuned
and repaired like any base model.

Which facts are taught, and how strongly (the design):
- per (relation, split) of the selection, a seeded `share` of the facts (at least one) is taught, the
  rest stay untaught as controls; train, dev and test facts alike, so every set has both;
- the taught facts take the `doses` in turn (group after group, each in its seeded order): dose d = the
  fact is stated in d mapping templates of the `templates` pool (a seeded rotation of the pool per
  fact), each statement once per epoch. Graded doses give graded mastery, so every mastery level is populated on the taught
  model (untaught facts stay mostly at level 0).

Every template of the pool counts as taught: the probe of an injected model (`sftlens.taught.held_out_templates`,
called by `sftlens.probe.run_probe`) measures mastery only on the other mapping templates, refusing
a probe that names a taught one, so mastery is measured on phrasings the model never saw.

The output is the fine-tuned HF folder plus `sftlens_inject.json` (key, model, config, `templates`,
`facts`: the taught fact ids, `doses` and `fact_templates` per fact) and the statements it was taught
on (read back by `sftlens.taught`). Work happens in a hidden sibling `.{out}.partial/` (`sftlens.io.KeyedOutput`;
the training run resumes from its checkpoints) and is renamed to `out` at the end; the same key again is a
no-op, another run in `out` an error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sftlens.config import add_config_arguments, config_from_args, config_to_dict
from sftlens.data import Fact, add_fact_arguments, available_templates, facts_from_args
from sftlens.data.rows import data_manifest
from sftlens.errors import SftlensError
from sftlens.io import KeyedOutput, atomic_write_json, atomic_write_jsonl, stable_hash
from sftlens.taught import RECORD_FILE, inject_record

STATEMENTS_FILE = "inject_statements.jsonl"
RECORD_FORMAT = 1


@dataclass(frozen=True)
class InjectConfig:
    templates: tuple[int, ...] = field(
        default=(0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
        metadata={"help": "mapping templates the statements use (all taught; the probe uses the others)"})
    doses: tuple[int, ...] = field(
        default=(1, 2, 3, 5), metadata={"help": "templates per taught fact, taken in turn by the taught facts"})
    share: float = field(default=0.5, metadata={"help": "share of each relation and split's facts taught (at least one)"})
    seed: int = field(default=0, metadata={"help": "seed of the choice of facts, their templates and the training"})
    learning_rate: float = field(default=2e-4, metadata={"help": "peak learning rate of the statement training"})
    epochs: float = field(default=3.0, metadata={"help": "passes over the statements"})
    batch_size: int = field(default=8, metadata={"help": "statements per optimizer step"})

    def __post_init__(self):
        if not self.templates or any(t < 0 for t in self.templates) or len(set(self.templates)) != len(self.templates):
            raise ValueError(f"templates must be distinct non-negative indices, got {list(self.templates)}")
        if not self.doses or any(not 1 <= d <= len(self.templates) for d in self.doses):
            raise ValueError(f"doses must be in 1..{len(self.templates)} (the templates given), got {list(self.doses)}")
        if not 0 < self.share <= 1:
            raise ValueError(f"share must be in (0, 1], got {self.share}")
        for name in ("learning_rate", "epochs", "batch_size"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def train_config(self):
        from sftlens.train import TrainConfig

        return TrainConfig(batch_size=self.batch_size, epochs=self.epochs, learning_rate=self.learning_rate,
                           seed=self.seed)


# --- what is taught ------------------------------------------------------------------------------


def taught_doses(facts: Iterable[Fact], config: InjectConfig) -> dict[str, int]:
    """Fact id -> dose of every taught fact: per (relation, split), ceil(share * n) facts in a seeded
    order; the doses are taken in turn along those facts, group after group (sorted), so every dose
    goes to as many facts as the others to within one, however small the groups. Depends only on the
    facts' ids and the config."""
    groups: dict[tuple[str, str], list[Fact]] = {}
    for fact in facts:
        groups.setdefault((fact.relation, fact.split), []).append(fact)
    taught = []
    for _, group in sorted(groups.items()):
        order = sorted(group, key=lambda f: stable_hash([config.seed, "inject", f.id]))
        taught += order[:math.ceil(config.share * len(order))]
    doses = {fact.id: config.doses[i % len(config.doses)] for i, fact in enumerate(taught)}
    return dict(sorted(doses.items()))


def fact_templates(fact_id: str, dose: int, config: InjectConfig) -> list[int]:
    """The `dose` templates a fact is stated in: the pool rotated by a seeded offset per fact, so every
    template of the pool is used about equally."""
    pool = config.templates
    offset = int(stable_hash([config.seed, "templates", fact_id]), 16) % len(pool)
    return [pool[(offset + j) % len(pool)] for j in range(dose)]


def statement_rows(facts: Iterable[Fact], doses: dict[str, int], config: InjectConfig) -> list[dict]:
    """One training row per (taught fact, template): the filled template, then " {first answer}."."""
    rows = []
    for fact in facts:
        if fact.id not in doses:
            continue
        for template in fact_templates(fact.id, doses[fact.id], config):
            text = fact.probe_prompt(template)
            rows.append({"fact_id": fact.id, "template": template, "prompt": text,
                         "completion": f" {fact.answers[0].strip()}."})
    return rows


def _check_templates(facts: list[Fact], config: InjectConfig) -> None:
    available = available_templates(facts)
    bad = [t for t in config.templates if t >= available]
    if bad:
        raise SftlensError(f"inject template {bad[0]} out of range: relations have {available} mapping templates")
    if len(config.templates) >= available:
        raise SftlensError(f"inject templates: all {available} mapping templates are taught; leave some for the probe")


# --- the stage -----------------------------------------------------------------------------------


def inject(model: str, facts: list[Fact], out_dir: str | os.PathLike, config: InjectConfig = InjectConfig(),
           progress: bool = True) -> Path:
    """Teach `model` the chosen facts of `facts` in statement form; return the injected model folder."""
    from sftlens.models import RUN_FILE, model_fingerprint
    from sftlens.train import train

    if not facts:
        raise SftlensError("empty fact selection: nothing to inject")
    _check_templates(facts, config)
    out_dir = Path(out_dir)
    doses = taught_doses(facts, config)
    identity = {"model_fingerprint": model_fingerprint(model), "config": config_to_dict(config), "doses": doses}
    output = KeyedOutput(out_dir, stable_hash(identity), RECORD_FILE, what="an injected model")
    if output.done():
        if progress:
            print(f"{out_dir}: already injected, skipping")
        return out_dir

    rows = statement_rows(sorted(facts, key=lambda f: f.id), doses, config)
    work = output.partial(say=print if progress else None)
    statements = work / STATEMENTS_FILE
    atomic_write_jsonl(statements, rows)
    staged = train(model, statements, work / "model", config.train_config(), progress=progress)
    run = json.loads((staged / RUN_FILE).read_text())
    record = {
        "format": RECORD_FORMAT, "key": output.key, "model": model, **identity, "seed": config.seed,
        "templates": list(config.templates), "facts": list(doses), "candidates": len(facts),
        "fact_templates": {fid: fact_templates(fid, dose, config) for fid, dose in doses.items()},
        "statements": {**data_manifest(statements, rows), "path": STATEMENTS_FILE},
        "steps": run["steps"], "train_loss": run["train_loss"],
    }
    shutil.copyfile(statements, staged / STATEMENTS_FILE)
    atomic_write_json(staged / RECORD_FILE, record)
    return output.publish(staged)


def _run(args: argparse.Namespace) -> None:
    config = config_from_args(InjectConfig, args)
    facts = facts_from_args(args)
    out = inject(args.model, facts, Path(args.out), config)
    record = inject_record(out)
    doses = Counter(record["doses"].values())
    print(f"{out}: taught {len(record['facts'])} of {record['candidates']} facts "
          f"({', '.join(f'{n} in {d} template(s)' for d, n in sorted(doses.items()))}) from templates "
          f"{record['templates']}, {record['steps']} steps, loss {record['train_loss']:.4f}")


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "inject", help="teach the base model a known set of facts in statement form (a knowledge testbed)",
        description="Continued training on statements (mapping template + ' answer.') of a seeded share of the "
                    "selected facts, at graded doses; the probe of the result uses only the other templates.")
    parser.add_argument("--model", required=True, help="built-in name, local HF folder or hub id")
    parser.add_argument("--out", required=True, help="folder for the injected model")
    add_fact_arguments(parser, split="train,dev,test")
    add_config_arguments(parser, InjectConfig)
    parser.set_defaults(func=_run, writes="out")
