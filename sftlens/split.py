"""Data division by mastery level (paper Sections 3.1 and 3.3).

Training sets: for each level L, size N and seed S, N in-domain training facts of level L balanced
across the topics (relations): topics take turns in a seeded order, so shares are equal to within
one, and a topic that runs out simply stops taking turns while the others fill the set. A "mixed"
set is drawn the same way from all levels. Size `all` is every fact of the level (one file per seed,
in seeded order); a level smaller than a size gives a file of all its facts, flagged `short` in the
manifest. Test and dev facts are divided by domain and level: all of them, or at most
`eval_facts_per_level` per (domain, level), topic-balanced.

Layout under the output folder: `train/level{L}-n{N}-seed{S}.jsonl` (size `all`: `-nall-`),
`train/mixed-n{N}-seed{S}.jsonl`, `test/{in,out}-level{L}.jsonl`, `dev/{in,out}-level{L}.jsonl` (rows:
`sftlens.data.rows`) and `manifest.json`: `format`, `inputs` (the hash of the inputs: the output's key),
`config`, `train_available` {level: {relation: n}}, `sets` {name: {path, kind, size, fact_ids,
composition, levels, level, requested, seed, short | domain}}. The folder is written as a whole (a
`sftlens.io.KeyedOutput` keyed by `inputs`): a re-run with the same inputs leaves it untouched, other
inputs replace it.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sftlens.config import add_config_arguments, config_from_args, config_to_dict
from sftlens.data import Fact, add_fact_source_arguments, fact_set_from_args, parse_fact_id
from sftlens.data.rows import split_row
from sftlens.errors import SftlensError
from sftlens.io import KeyedOutput, atomic_write_json, atomic_write_jsonl, stable_hash
from sftlens.markdown import markdown_table
from sftlens.probe import LEVELS, ProbeRecord, load_probe

SPLIT_FORMAT = 1
MANIFEST = "manifest.json"
ALL = "all"


@dataclass(frozen=True)
class SplitConfig:
    sizes: tuple[int, ...] = field(
        default=(60, 120, 240, 480, 960, 1920), metadata={"help": "training-set sizes (facts per set)"}
    )
    include_all: bool = field(default=True, metadata={"help": "also write each whole level as size 'all'"})
    seeds: tuple[int, ...] = field(default=(0, 1, 2, 3, 4), metadata={"help": "one training set per seed"})
    levels: tuple[int, ...] = field(default=LEVELS, metadata={"help": "mastery levels to build training sets for"})
    mixed: bool = field(default=True, metadata={"help": "also build level-agnostic 'mixed' training sets"})
    eval_facts_per_level: int | None = field(
        default=None, metadata={"help": "at most this many test (and dev) facts per domain and level, "
                                        "topic-balanced (default: all)"})

    def __post_init__(self) -> None:
        for name in ("sizes", "seeds", "levels"):  # callers may pass lists (dataclasses.replace)
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if any(size < 1 for size in self.sizes):
            raise ValueError(f"sizes must be positive, got {list(self.sizes)}")
        if not self.sizes and not self.include_all:
            raise ValueError("no training sizes: give sizes or include_all")
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")
        if self.eval_facts_per_level is not None and self.eval_facts_per_level < 1:
            raise ValueError(f"eval_facts_per_level must be positive, got {self.eval_facts_per_level}")
        bad = [level for level in self.levels if level not in LEVELS]
        if bad:
            raise ValueError(f"levels: {bad[0]} is not a mastery level (0..4)")

    def size_names(self) -> list[str]:
        return [str(size) for size in self.sizes] + ([ALL] if self.include_all else [])


def balanced_sample(pools: dict[str, list[Fact]], size: int | None, seed: int, salt: str) -> list[Fact]:
    """`size` facts (None: all) spread evenly over the topics of `pools`, in a seeded order.

    Each topic's pool is shuffled by (seed, salt, topic); topics then take turns in a seeded order,
    a topic that runs out drops out, and the result is shuffled so topics interleave.
    """
    rng = random.Random(stable_hash([seed, salt]))
    queues = {}
    for topic in sorted(pools):
        pool = sorted(pools[topic], key=lambda f: f.id)
        random.Random(stable_hash([seed, salt, topic])).shuffle(pool)
        queues[topic] = pool
    order = sorted(queues)
    rng.shuffle(order)
    target = sum(map(len, queues.values())) if size is None else size
    taken: list[Fact] = []
    position = dict.fromkeys(order, 0)
    while len(taken) < target:
        active = [t for t in order if position[t] < len(queues[t])]
        if not active:
            break
        for topic in active:
            if len(taken) == target:
                break
            taken.append(queues[topic][position[topic]])
            position[topic] += 1
    rng.shuffle(taken)
    return taken


def _levels_of(facts: list[Fact], records: dict[str, ProbeRecord]) -> dict[str, int]:
    missing = [f.id for f in facts if f.id not in records]
    if missing:
        raise SftlensError(f"{len(missing)} facts have no probe record (e.g. {missing[0]}); probe them first")
    return {f.id: records[f.id].level for f in facts}


def _inputs_key(facts: list[Fact], levels: dict[str, int], config: SplitConfig) -> str:
    # A fact set's domains follow its in-domain choice, so they join the key; EntityQuestions' keys stay.
    facts_part = sorted((f.id, f.question, list(f.accepted_answers), levels[f.id], *((f.domain,) if f.templates else ()))
                        for f in facts)
    return stable_hash([SPLIT_FORMAT, config_to_dict(config), facts_part], length=32)


def _set_entry(path: str, kind: str, facts: list[Fact], levels: dict[str, int], **extra) -> dict:
    return {
        "path": path, "kind": kind, "size": len(facts), "fact_ids": [f.id for f in facts],
        "composition": dict(sorted(Counter(f.relation for f in facts).items())),
        "levels": {str(k): v for k, v in sorted(Counter(levels[f.id] for f in facts).items())},
        **extra,
    }


def train_set(name: str, size: int | str, seed: int) -> str:
    """The one spelling of a training set's path in a split folder (no suffix): `name` is
    `level{L}` or `mixed`, `size` a number or `all`."""
    return f"train/{name}-n{size}-seed{seed}"


def eval_set(split: str, domain: str, level: int) -> str:
    """The one spelling of a test or dev set's path in a split folder (no suffix)."""
    return f"{split}/{domain}-level{level}"


def set_path(name: str) -> str:
    """A set's file relative to its split folder (the manifest's `path`); `name` from `train_set` or `eval_set`."""
    return f"{name}.jsonl"


def set_file(split_dir: str | Path, path: str) -> Path:
    """The file of a set in a split folder; `path` as `set_path` gives it."""
    return Path(split_dir) / path


def eval_files(split_dir: str | Path, split: str, domain: str | None = None) -> list[Path]:
    """A split folder's test or dev files (every level; of one domain if given), in name order."""
    return sorted((Path(split_dir) / split).glob(f"{domain or '*'}-level*.jsonl"))


def _train_sets(train: list[Fact], levels: dict[str, int], config: SplitConfig):
    """Yield (name, facts, manifest fields) for every training set. A level with fewer facts than
    a size asks for still gets its file, holding all it has, flagged `short` in the manifest."""
    groups = [(f"level{level}", level) for level in config.levels] + ([("mixed", None)] if config.mixed else [])
    for prefix, level in groups:
        chosen = [f for f in train if level is None or levels[f.id] == level]
        pools: dict[str, list[Fact]] = {}
        for fact in chosen:
            pools.setdefault(fact.relation, []).append(fact)
        for size in config.size_names():
            wanted = None if size == ALL else int(size)
            for seed in config.seeds:
                facts = balanced_sample(pools, wanted, seed, prefix)
                yield train_set(prefix, size, seed), facts, {
                    "level": "mixed" if level is None else level, "requested": size, "seed": seed,
                    "short": wanted is not None and len(facts) < wanted,
                }


def _eval_sample(facts: list[Fact], limit: int | None, name: str) -> list[Fact]:
    """A test or dev level's facts, at most `limit` of them balanced over topics, in fact-id order
    (a weak model leaves thousands of level-0 facts, and a few hundred already give a tight interval)."""
    if limit is None or len(facts) <= limit:
        return facts
    pools: dict[str, list[Fact]] = {}
    for fact in facts:
        pools.setdefault(fact.relation, []).append(fact)
    return sorted(balanced_sample(pools, limit, 0, name), key=lambda f: f.id)


def build_splits(facts: Iterable[Fact], records: dict[str, ProbeRecord], config: SplitConfig, out_dir) -> dict:
    """Write the training, test and dev sets of `facts` (every one probed) under `out_dir`; return the manifest."""
    facts = sorted({f.id: f for f in facts}.values(), key=lambda f: f.id)
    if not facts:
        raise SftlensError("empty fact selection: nothing to split")
    levels = _levels_of(facts, records)
    out_dir = Path(out_dir)
    key = _inputs_key(facts, levels, config)
    output = KeyedOutput(out_dir, key, MANIFEST, stale="redo", key_field="inputs")
    existing = output.finished()
    if existing is not None:
        return existing

    train = [f for f in facts if f.split == "train" and f.domain == "in"]
    sets: dict[str, dict] = {}
    files: dict[str, list[dict]] = {}
    for name, chosen, extra in _train_sets(train, levels, config):
        sets[name] = _set_entry(set_path(name), "train", chosen, levels, **extra)
        files[name] = [split_row(f, levels[f.id]) for f in chosen]
    for split in ("test", "dev"):
        for domain in ("in", "out"):
            part = [f for f in facts if f.split == split and f.domain == domain]
            for level in LEVELS if part else ():
                name = eval_set(split, domain, level)
                chosen = _eval_sample([f for f in part if levels[f.id] == level], config.eval_facts_per_level, name)
                sets[name] = _set_entry(set_path(name), split, chosen, levels, domain=domain, level=level)
                files[name] = [split_row(f, level) for f in chosen]

    available = Counter((levels[f.id], f.relation) for f in train)
    manifest = {
        "format": SPLIT_FORMAT, "inputs": key, "config": config_to_dict(config),
        "train_available": {
            str(level): {rel: available[level, rel] for rel in sorted({f.relation for f in train})} for level in LEVELS
        },
        "sets": sets,
    }
    with output.writing() as tmp:
        for name, rows in files.items():
            atomic_write_jsonl(set_file(tmp, set_path(name)), rows)
        atomic_write_json(tmp / MANIFEST, manifest)
    return _read_manifest(out_dir / MANIFEST)


def _read_manifest(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def summary(manifest: dict) -> str:
    """A short Markdown table of the written sets with their topic balance."""
    rows = []
    for name, entry in manifest["sets"].items():
        counts = list(entry["composition"].values()) or [0]
        short = f" (short of {entry['requested']})" if entry.get("short") else ""
        rows.append([name, f"{entry['size']}{short}", len(entry["composition"]), f"{min(counts)}-{max(counts)}"])
    return markdown_table(["set", "facts", "topics", "per topic (min-max)"], rows, "lrrl") + "\n"


def _run(args: argparse.Namespace) -> None:
    config = config_from_args(SplitConfig, args)
    records = load_probe(args.store)
    if not records:
        raise SftlensError(f"{args.store}: no probe records")
    ids = [parse_fact_id(fid) for fid in records]
    relations = sorted({relation for relation, _, _ in ids})
    splits = sorted({split for _, split, _ in ids})
    facts = [f for f in fact_set_from_args(args, tuple(splits), tuple(relations)).facts if f.id in records]
    manifest = build_splits(facts, records, config, args.out)
    print(summary(manifest), end="")
    print(f"written to {args.out}")


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("split", help="divide probed facts into SFT sets by mastery level")
    parser.add_argument("--store", required=True, help="probe store folder (from `sftlens probe`)")
    add_fact_source_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder for the sets and manifest.json")
    add_config_arguments(parser, SplitConfig)
    parser.set_defaults(func=_run, writes="out")
