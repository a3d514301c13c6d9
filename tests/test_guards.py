"""Training-time guards (`sftlens.guards`, `sftlens train --guard`): neutral values are plain SFT bit for
bit, each guard does exactly what its docstring states (checked against brute forces), bad input is one line."""

import dataclasses
import json
import math
from collections import Counter

import pytest
import torch

from sftlens.cli import main
from sftlens.data import Fact
from sftlens.guards import (
    GUARDS,
    IGNORE_INDEX,
    ActiveGuard,
    completion_kl,
    frozen_names,
    known_rows,
    parse_guard,
    replay_order,
    update_mask,
)
from sftlens.probe import ProbeRecord
from sftlens.train import RUN_FILE, TrainConfig, encode_example, train

from assets import FAST, sft_rows, weights, write_sft

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture
def sft20(tmp_path):
    return write_sft(tmp_path / "sft.jsonl", sft_rows(20))


def _guarded(spec: str) -> TrainConfig:
    return dataclasses.replace(FAST, guard=spec)


def test_every_guard_at_its_neutral_value_is_plain_sft_bit_for_bit(tiny_model_dir, sft20, tmp_path):
    plain = weights(train(str(tiny_model_dir), sft20, tmp_path / "plain", FAST, progress=False))
    for name, guard in GUARDS.items():
        out = train(str(tiny_model_dir), sft20, tmp_path / name, _guarded(f"{name}={guard.neutral}"), progress=False)
        guarded = weights(out)
        assert guarded.keys() == plain.keys()
        assert all(torch.equal(guarded[k], plain[k]) for k in plain), name
        assert json.loads((out / RUN_FILE).read_text())["guard"]["name"] == name


def test_freeze_leaves_the_lowest_blocks_and_the_embeddings_bit_identical(tiny_model_dir, sft20, tmp_path):
    base = weights(tiny_model_dir)
    out = train(str(tiny_model_dir), sft20, tmp_path / "run", _guarded("freeze=0.5"), progress=False)
    after = weights(out)
    frozen = [k for k in base if k.startswith("model.layers.0.") or k == "model.embed_tokens.weight"]
    trained = [k for k in base if k.startswith("model.layers.1.") or k == "lm_head.weight"]
    assert frozen and trained
    assert all(torch.equal(base[k], after[k]) for k in frozen)
    assert all(not torch.equal(base[k], after[k]) for k in trained)
    assert sorted(json.loads((out / RUN_FILE).read_text())["guard"]["frozen"]) == sorted(frozen)


def test_freeze_share_counts_blocks_from_the_bottom(tiny):
    model, _ = tiny
    assert frozen_names(model, 0.0) == []
    assert frozen_names(model, 0.49) == ["model.embed_tokens.weight"]  # floor(0.49 x 2) = 0 blocks
    assert {n.split(".")[2] for n in frozen_names(model, 1.0) if n.startswith("model.layers.")} == {"0", "1"}


def _batch(tokenizer, n: int = 3):
    rows = sft_rows(n)
    examples = [encode_example(tokenizer, r["prompt"], r["completion"]) for r in rows]
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.tensor([e["input_ids"] + [tokenizer.pad_token_id] * (width - len(e["input_ids"])) for e in examples])
    labels = torch.tensor([e["labels"] + [IGNORE_INDEX] * (width - len(e["labels"])) for e in examples])
    mask = (torch.arange(width)[None] < torch.tensor([len(e["input_ids"]) for e in examples])[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _moved(model, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))


def test_l2_gradient_is_that_of_the_stated_loss(tiny):
    model, tokenizer = tiny
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    guard = ActiveGuard("l2", 0.3, model)
    _moved(model)
    batch = _batch(tokenizer)
    outputs = model(**batch)
    (outputs.loss + guard.penalty(model, batch, outputs.logits)).backward()
    guarded = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(**batch).loss.backward()
    for name, param in model.named_parameters():  # d/dtheta of 0.3 ||theta - base||^2 = 0.6 (theta - base)
        expected = param.grad + 0.6 * (param.detach() - base[name])
        torch.testing.assert_close(guarded[name], expected, rtol=1e-5, atol=1e-7)


def _kl_by_hand(logits, base_logits, labels) -> torch.Tensor:
    terms = []
    for row in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if labels[row, t] != IGNORE_INDEX:  # position t - 1 predicts completion token t
                p = torch.softmax(logits[row, t - 1].double(), -1)
                q = torch.softmax(base_logits[row, t - 1].double(), -1)
                terms.append(sum(p[v] * torch.log(p[v] / q[v]) for v in range(p.shape[0])))
    return torch.stack(terms).mean()


def test_kl_penalty_and_its_gradient_equal_a_brute_force(tiny):
    model, tokenizer = tiny
    guard = ActiveGuard("kl", 0.7, model)
    batch = _batch(tokenizer, 2)
    logits = model(**batch).logits
    assert guard.penalty(model, batch, logits).item() == 0.0  # step 0: the model is the base
    _moved(model)
    logits = model(**batch).logits
    guard.penalty(model, batch, logits).backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.no_grad():
        base_logits = guard.base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    by_hand = 0.7 * _kl_by_hand(model(**batch).logits, base_logits, batch["labels"])
    by_hand.backward()
    assert by_hand.item() > 0
    for name, param in model.named_parameters():
        torch.testing.assert_close(fast[name], param.grad, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(completion_kl(logits, base_logits, batch["labels"]).double(), by_hand.detach() / 0.7,
                               rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("share", [0.3, 0.05])
def test_mofo_updates_exactly_the_share_with_the_largest_moments(tiny, share):
    model, tokenizer = tiny
    guard = ActiveGuard("mofo", share, model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    guard.attach(optimizer)
    batch = _batch(tokenizer)
    name = "model.layers.0.self_attn.q_proj.weight"
    param = dict(model.named_parameters())[name]
    for _ in range(2):
        before = param.detach().clone()
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
        changed = param.detach() != before
        moment = optimizer.state[param]["exp_avg"].abs().flatten()
        k = math.floor(share * param.numel())
        assert int(changed.sum()) == k  # every selected element has a nonzero Adam update here
        threshold = torch.sort(moment, descending=True).values[k - 1]
        assert bool((moment[changed.flatten()] >= threshold).all())


@pytest.mark.parametrize("seed", range(5))
def test_update_mask_equals_a_stable_sort(seed):
    gen = torch.Generator().manual_seed(seed)
    moment = torch.randn(64, 33, generator=gen).round(decimals=1)  # many ties
    for share in (0.01, 0.3, 0.5, 0.999):
        keep = math.floor(share * moment.numel())
        order = torch.sort(moment.abs().flatten(), descending=True, stable=True).indices[:keep]
        expected = torch.zeros(moment.numel(), dtype=torch.bool)
        expected[order] = True
        assert torch.equal(update_mask(moment, share), expected.view_as(moment))


def test_update_mask_breaks_ties_by_flat_index():
    mask = update_mask(torch.tensor([1.0, -3.0, 3.0, 0.5, 3.0]), 0.4)
    assert mask.tolist() == [False, True, True, False, False]
    assert update_mask(torch.ones(7), 1.0).all() and not update_mask(torch.ones(7), 0.1).any()


def _fact(split: str, index: int) -> Fact:
    return Fact(id=f"P17/{split}/{index:05d}", relation="P17", subject=f"E{index}", answers=("France",),
                split=split, domain="in", question=f"Which country is E{index} in?")


def test_replay_rows_are_only_the_bases_known_training_facts():
    facts = [_fact(split, i) for split in ("train", "dev", "test") for i in range(6)]
    records = {f.id: ProbeRecord(f.id, correct=[0, 1, 2, 3, 4, 4][int(f.id[-1])], total=4, template_correct=()) for f in facts}
    rows = known_rows(records, facts, exclude={"P17/train/00005"})
    assert [r["fact_id"] for r in rows] == ["P17/train/00004"]  # level 4, train, not in the SFT set
    assert rows[0]["prompt"].startswith("<question>") and rows[0]["completion"] == " France "


def test_replay_order_mixes_the_stated_share_into_every_batch():
    order = replay_order(n_sft=20, pool=5, batch_size=8, per_batch=2, seed=0)
    batches = [order[i:i + 8] for i in range(0, len(order), 8)]
    assert len(batches) == math.ceil(20 / 6)
    assert all(Counter(kind for kind, _ in b)["replay"] == 2 for b in batches)
    assert sorted(i for kind, i in order if kind == "sft") == list(range(20))
    replayed = [i for kind, i in order if kind == "replay"]
    assert set(replayed) == set(range(5)) and max(Counter(replayed).values()) - min(Counter(replayed).values()) <= 1


def test_replay_run_trains_on_the_mixed_batches(tiny_model_dir, sft20, tmp_path):
    pool = sft_rows(4, offset=100)
    out = train(str(tiny_model_dir), sft20, tmp_path / "run", _guarded("replay=0.25"), progress=False, replay=pool)
    run = json.loads((out / RUN_FILE).read_text())
    assert run["steps"] == math.ceil(20 / 6) and run["replay"]["count"] == 4
    assert set(run["guard"]["replayed"]) == {r["fact_id"] for r in pool}
    other = train(str(tiny_model_dir), sft20, tmp_path / "other", _guarded("replay=0.25"), progress=False,
                  replay=sft_rows(4, offset=200))
    assert json.loads((other / RUN_FILE).read_text())["key"] != run["key"]  # the pool is keyed


@pytest.mark.parametrize("spec, message", [
    ("forget=1", "guard 'forget' is unknown"), ("mofo=0", "outside (0, 1]"), ("freeze=1.5", "outside [0, 1]"),
    ("l2=-1", "outside [0, inf)"), ("replay=0.1", "use a multiple of 1/8"), ("kl", "expected kl=VALUE"),
    ("l2=1,kl=1", "one guard per run"),
])
def test_bad_guards_are_one_line_errors(tiny_model_dir, sft20, tmp_path, capsys, spec, message):
    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(sft20), "--out", str(out), "--guard", spec])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--guard", "replay=0.25"], "needs the base's probe store"),
    (["--guard", "l2=1", "--guard", "kl=1"], "one guard per run"),
    (["--guard", "l2=1", "--probe-store", "x"], "--probe-store is read by --guard replay only"),
])
def test_guard_flags_that_cannot_work_are_one_line_errors(tiny_model_dir, sft20, tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(sft20), "--out", str(out), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and not out.exists()


def test_a_guard_on_lora_is_refused():
    with pytest.raises(ValueError, match="guards apply to full SFT"):
        TrainConfig(method="lora", guard="l2=1")


def test_a_config_without_guard_keeps_its_dict_and_so_its_keys():
    from sftlens.config import config_to_dict

    assert "guard" not in config_to_dict(TrainConfig())
    assert config_to_dict(TrainConfig(guard="l2=1"))["guard"] == "l2=1.0"
    assert parse_guard("mofo=0.25") == ("mofo", 0.25)


def test_the_cli_replays_the_known_training_facts_of_a_probe_store(tiny_model_dir, known_data_dir, sft20, tmp_path):
    from sftlens.data import load_facts
    from sftlens.probe import ProbeConfig, run_probe

    facts = load_facts(known_data_dir, splits=("train",), relations=("P17", "P19", "P106")).facts
    store = tmp_path / "store"
    records = run_probe(str(tiny_model_dir), facts, ProbeConfig(samples=2, templates=(0,), max_new_tokens=4), store,
                        progress=False)
    own = {row["fact_id"] for row in json.loads(f"[{','.join(sft20.read_text().splitlines())}]")}
    known = {f for f, r in records.items() if r.level == 4 and f not in own}
    assert known  # the "e" answers: a random model's samples contain them
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(sft20), "--out", str(out), "--learning-rate",
                 "1e-3", "--guard", "replay=0.25", "--probe-store", str(store), "--data-dir", str(known_data_dir)]) == 0
    run = json.loads((out / RUN_FILE).read_text())
    assert run["replay"]["count"] == len(known) and set(run["guard"]["replayed"]) <= known
    assert run["steps"] == math.ceil(20 / 6)
