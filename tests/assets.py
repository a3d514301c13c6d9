"""Helpers the test modules share (not a test module: pytest collects nothing here). Fixtures
built on them live in conftest.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sftlens.data import Fact, load_templates, sft_completion, sft_prompt
from sftlens.io import atomic_write_jsonl
from sftlens.probe import ProbeConfig
from sftlens.study.results import load_results
from sftlens.train import TrainConfig
from sftlens.weights.checkpoints import in_region
from sftlens.weights.selection import SelectionConfig, change, selection_keys, target_count
from tiny import TINY_ANSWERS

# --- probing ---------------------------------------------------------------------------------

# A random tiny model rarely says "France", but its samples often contain short strings: answers
# like these give facts spread over all mastery levels, so the invariance tests compare real counts.
COMMON_ANSWERS = ["e", "in", "x", "the", "a", "on", "er", "q"]
QUICK = ProbeConfig(samples=4, max_new_tokens=6, temperature=1.5, templates=(0, 3, 7))


def common_facts(n: int, relations=("P17", "P19", "P106")) -> list[Fact]:
    templates = load_templates()
    facts = []
    for i in range(n):
        relation = relations[i % len(relations)]
        subject = f"Entity {i} " + "of the north " * (i % 3)
        facts.append(Fact(
            id=f"{relation}/test/{i:05d}", relation=relation, subject=subject.strip(),
            answers=(COMMON_ANSWERS[i % len(COMMON_ANSWERS)],), split="test",
            domain=templates[relation].domain, question=templates[relation].question.format(subject=subject.strip()),
        ))
    return facts


# --- training and evaluation -----------------------------------------------------------------

FAST = TrainConfig(learning_rate=1e-3)  # visible weight changes on a random tiny model


def sft_rows(n: int, offset: int = 0) -> list[dict]:
    """SFT rows in the split's format, questions from the real templates."""
    templates = list(load_templates().items())
    rows = []
    for i in range(offset, offset + n):
        relation, tpl = templates[i % len(templates)]
        question = tpl.question.format(subject=f"Entity {i}")
        answers = [TINY_ANSWERS[i % len(TINY_ANSWERS)], TINY_ANSWERS[(i + 1) % len(TINY_ANSWERS)]]
        rows.append({"fact_id": f"{relation}/train/{i:05d}", "relation": relation, "domain": "in",
                     "level": i % 5, "question": question, "answers": answers,
                     "prompt": sft_prompt(question), "completion": sft_completion(answers[0])})
    return rows


def eval_rows(domain: str, level: int, n: int) -> list[dict]:
    """Split rows of one domain and level, prompts of different lengths, answers from TINY_ANSWERS."""
    rows = []
    for i in range(n):
        # prompts of different lengths, so batches need padding
        question = f"Which country is {'the city of ' * (i % 3)}Entity {domain}{level}{i} in?"
        answers = [TINY_ANSWERS[i % len(TINY_ANSWERS)]]
        rows.append({"fact_id": f"P17/test/{domain}{level}{i:03d}", "relation": "P17", "domain": domain,
                     "level": level, "question": question, "answers": answers,
                     "prompt": sft_prompt(question), "completion": sft_completion(answers[0])})
    return rows


class Interrupt(Exception):
    """A kill in the middle of training, raised by `dies_after_checkpoint`."""


def dies_after_checkpoint(step: int):
    """A Trainer callback that raises `Interrupt` once the checkpoint of `step` is saved."""
    from transformers import TrainerCallback

    class DieAfterCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise Interrupt

    return DieAfterCheckpoint()


def write_sft(path: Path, rows: list[dict]) -> Path:
    atomic_write_jsonl(path, rows)
    return path


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


# --- checkpoint pairs ------------------------------------------------------------------------

RATIOS = (1, 3, 5, 10, 20, 40, 60, 100)


def perturbed(model, seed: int = 1):
    """`model` with seeded noise (sd 0.02) added to every parameter, in place: a stand-in fine-tune."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def write_checkpoint(root: Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> Path:
    """A safetensors folder; with shards > 1, an index.json and tensors dealt round-robin."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text("{}")
    if shards == 1:
        save_file(tensors, root / "model.safetensors")
        return root
    names = list(tensors)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, root / fname)
        weight_map.update({n: fname for n in part})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


def random_pair(tmp_path: Path, seed: int = 0, shards: int = 3, ties: bool = False, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    shapes = {
        "model.embed_tokens.weight": (17, 8), "lm_head.weight": (17, 8), "model.norm.weight": (8,),
        **{f"model.layers.{i}.self_attn.q_proj.weight": (8, 8) for i in range(3)},
        **{f"model.layers.{i}.mlp.up_proj.weight": (12, 8) for i in range(3)},
        **{f"model.layers.{i}.input_layernorm.weight": (8,) for i in range(3)},
    }
    base, ft = {}, {}
    for name, shape in shapes.items():
        if ties:  # few distinct values: huge tie groups at every threshold
            b = torch.randint(1, 3, shape, generator=gen).float()
            f = b + torch.randint(0, 3, shape, generator=gen).float()
        else:
            b = torch.randn(shape, generator=gen)
            f = b + torch.randn(shape, generator=gen) ** 3 * 0.1
        base[name], ft[name] = b.to(dtype), f.to(dtype)
    return (write_checkpoint(tmp_path / "base", base, shards), write_checkpoint(tmp_path / "ft", ft, shards),
            base, ft)


def brute_force(base, ft, ratios, config: SelectionConfig) -> list[set[tuple[str, int]]]:
    """Global sort of every region element by (key descending, tensor name, flat index)."""
    names = sorted(n for n in base if in_region(n, config.region))
    rows = []
    for name in names:
        delta = change(base[name], ft[name], config.metric)
        if config.strategy == "top":
            order = -delta.view(-1).double().numpy()
        elif config.strategy == "bottom":
            order = delta.view(-1).double().numpy()
        else:  # random keys are defined by the implementation's seeded generator
            order = -selection_keys(delta, name, "random", config.seed).view(-1).double().numpy()
        rows += [(order[i], names.index(name), i, name) for i in range(delta.numel())]
    chosen = []
    for r in ratios:
        if config.scope == "global":
            ranked = sorted(rows)[: target_count(len(rows), r)]
        else:
            ranked = []
            for name in names:
                own = sorted(x for x in rows if x[3] == name)
                ranked += own[: target_count(len(own), r)]
        chosen.append({(x[3], x[2]) for x in ranked})
    return chosen


# --- studies ---------------------------------------------------------------------------------

def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


TINY_STUDY = """
extends = "demo"
[study]
model = "{model}"
data_dir = "{data}"
train_facts_per_relation = 12
eval_facts_per_relation = 2
levels = [0]
sizes = [8]
seeds = [0, 1]
analysis_sizes = [8]
table_size = 8
restore_ratios = [10, 50]
lora_learning_rates = [1e-3, 1e-2]
bootstrap = 50
kl_test_set = "in-level0"
prune_checkpoints = true
[probe]
samples = 1
templates = [0]
max_new_tokens = 4
[train]
learning_rate = 1e-3
[eval]
max_new_tokens = 4
[repairs.wise]
values = [0.5, 0.9]
[repairs.dare]
values = [0.3, 0.6]
seed = 1
"""


def tiny_study_file(folder: Path, model_dir: Path, data_dir: Path) -> Path:
    return write_config(folder / "study.toml", TINY_STUDY.format(model=model_dir, data=data_dir))


def comparable(study_dir: Path) -> dict:
    """Every unit's result by label (what the report reads), for equality across runs."""
    return {u["label"]: u["result"] for u in load_results(study_dir).units}


def assert_same_results(left: dict, right: dict, where: str = "") -> None:
    """Equal results: exactly for everything discrete (records, counts, per-fact correctness,
    chosen ratios); floats to 1e-3 relative (1e-7 absolute for near-zero KLs), as the reduction
    order of a matmul depends on the threads a worker runs with (a Ray task gets one per CPU it asked for)."""
    if isinstance(left, dict) and isinstance(right, dict):
        assert left.keys() == right.keys(), where
        for key in left:
            assert_same_results(left[key], right[key], f"{where}/{key}")
    elif isinstance(left, list) and isinstance(right, list):
        assert len(left) == len(right), where
        for i, (a, b) in enumerate(zip(left, right)):
            assert_same_results(a, b, f"{where}[{i}]")
    elif isinstance(left, float) or isinstance(right, float):
        assert left == pytest.approx(right, rel=1e-3, abs=1e-7), where
    else:
        assert left == right, where
