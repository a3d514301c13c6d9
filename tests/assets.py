"""Helpers the test modules share (not a test module: pytest collects nothing here). Fixtures
built on them live in conftest.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig

from sftlens.data import Fact, default_matcher, encode_prompt, load_templates, sft_completion, sft_prompt
from sftlens.io import atomic_write_jsonl
from sftlens.probe import ProbeConfig, prompt_ids, sample_seed
from sftlens.study.report.results import load_results
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
mixed = true
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


def greedy_by_hand(model, tokenizer, prompt: str, steps: int) -> str:
    ids = encode_prompt(tokenizer, prompt)
    new = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def hf_generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """The unoptimised path: transformers' batched greedy `generate`, finished rows padded along."""
    batch = tokenizer.pad([{"input_ids": encode_prompt(tokenizer, p)} for p in prompts], padding=True,
                          padding_side="left", return_tensors="pt")
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.inference_mode():
        out = model.generate(**batch, generation_config=config)
    return [t.strip() for t in tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)]


def reference_correct(lm, tokenizer, fact: Fact, template: int, config: ProbeConfig) -> int:
    """The probe's definition, brute force: each sample decoded alone, without a KV cache, its full
    budget (to EOS or max_new_tokens, or with stop_at_newline its first newline after some non-blank
    text), then matched once."""
    prompt = prompt_ids(tokenizer, fact, template, config.question_prompt)
    correct = 0
    for j in range(config.samples):
        generator = torch.Generator().manual_seed(sample_seed(config.seed, fact.id, template, j))
        new: list[int] = []
        with torch.inference_mode():
            while len(new) < config.max_new_tokens:
                scores = lm(input_ids=torch.tensor([prompt + new])).logits[0, -1].float()
                noise = torch.empty_like(scores).uniform_(generator=generator)
                new.append(int((-(-noise.log()).log() + scores / config.temperature).argmax()))
                text = tokenizer.decode(new, skip_special_tokens=True)
                if new[-1] == tokenizer.eos_token_id or (config.stop_at_newline and "\n" in text.lstrip()):
                    break
        correct += default_matcher().is_correct(tokenizer.decode(new, skip_special_tokens=True), fact.answers,
                                              fact.alias_table())
    return correct


def load_folder(folder) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder, whatever its sharding."""
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


# --- audits ----------------------------------------------------------------------------------

# Short answers that a random tiny model's outputs contain now and then: every transition occurs.
AUDIT_ANSWERS = ["e", "a", "o", "t", "q", "in", "the", "s"]


def audit_data(root: Path, per_file: int = 3) -> Path:
    """An EntityQuestions-like data folder: `per_file` test facts per relation with AUDIT_ANSWERS."""
    (root / "test").mkdir(parents=True)
    for r, (relation, tpl) in enumerate(load_templates().items()):
        records = [{"question": tpl.question.format(subject=f"Entity {relation} {i}"),
                    "answers": [AUDIT_ANSWERS[(3 * i + r) % len(AUDIT_ANSWERS)]]} for i in range(per_file)]
        (root / "test" / f"{relation}.test.json").write_text(json.dumps(records))
    return root


def audit_perturbed(model, scale: float, seed: int = 1):
    """`model` with seeded noise of `scale` times each parameter's mean size added, in place: a
    fine-tune that forgets and learns some of the audit's facts."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.abs().mean().clamp(min=1e-3))
    return model


# The stages of a tiny study on a taught base (`[inject]` then probe, SFT and evaluation at toy sizes), shared by the
# tiny testbed and guards studies.
TINY_TAUGHT_STAGES = """[inject]
templates = [0, 1, 2]
doses = [1, 3]
learning_rate = 1e-2
epochs = 2
[probe]
max_new_tokens = 4
[train]
learning_rate = 1e-3
[eval]
max_new_tokens = 4
"""
