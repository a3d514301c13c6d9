"""Every stage on tiny random models of seven families saved as plain HF folders: probe, full and
LoRA SFT, eval, KL, deltas, regions, restore and every repair, each against an independent reference
(a brute-force sampler, HF `generate`, the module structure, closed forms)."""

from __future__ import annotations

import json
from functools import cache

import pytest
import torch
from safetensors.torch import load_file

from sftlens.analysis.deltas import DeltasConfig, concentration
from sftlens.analysis.kl import KLConfig, compute_kl, kl_prompts
from sftlens.data import encode_prompt, sft_prompt
from sftlens.errors import SftlensError
from sftlens.evaluate import EvalConfig, evaluate, evaluate_model
from sftlens.lora import default_lora_targets, lora_targets, with_lora
from sftlens.models import load_model, model_fingerprint
from sftlens.probe import ProbeConfig, probe_facts
from sftlens.train import RUN_FILE, TrainConfig, train
from sftlens.weights import METHODS, RepairConfig, open_pair, repair_sweep, repaired_models
from sftlens.weights.checkpoints import in_region
from sftlens.weights.guided import fisher_diagonals, write_importances
from sftlens.weights.selection import change, target_count
from sftlens.weights.spectral import kept_rank

from assets import (
    brute_force,
    common_facts,
    eval_rows,
    greedy_by_hand,
    hf_generate_answers,
    reference_correct,
    sft_rows,
    write_sft,
)
from tiny import FAMILY_TOKENIZERS, family_model, save_model

FAMILIES = tuple(FAMILY_TOKENIZERS)
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Written out by hand from each family's modeling code: what `default_lora_targets` must find.
TARGETS = {"llama": LLAMA_PROJECTIONS, "qwen2": LLAMA_PROJECTIONS, "mistral": LLAMA_PROJECTIONS,
           "gemma2": LLAMA_PROJECTIONS, "phi3": ("o_proj", "qkv_proj", "gate_up_proj", "down_proj"),
           "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
           "gpt2": ("c_attn", "c_proj", "c_fc")}
FULL = TrainConfig(learning_rate=1e-2, batch_size=4)
LORA = TrainConfig(method="lora", learning_rate=1e-2, batch_size=4, lora_rank=4, lora_alpha=8)
VALUES = {"restore": 100, "wise": 0.5, "dare": 0.5, "trim": 50, "spectral": 1.0, "guided": 100}  # none neutral


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


@pytest.fixture(autouse=True)
def one_thread_own_cache(root, monkeypatch):
    """One thread (tiny models gain nothing from more on a shared CPU), and a cache of this module's
    own for the fingerprints of its folders."""
    monkeypatch.setenv("SFTLENS_CACHE", str(root / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Folders:
    """Each family's base folder and fine-tuned folders (on one SFT set), built on first use."""

    def __init__(self, root):
        self.root = root
        self.sft = write_sft(root / "sft.jsonl", sft_rows(8))

    @cache
    def base(self, family: str):
        return save_model(*family_model(family), self.root / family / "base")

    @cache
    def finetuned(self, family: str, method: str):
        config = FULL if method == "full" else LORA
        return train(str(self.base(family)), self.sft, self.root / family / method, config, progress=False)


@pytest.fixture(scope="session")
def folders(root) -> Folders:
    return Folders(root)


def loaded(folder):
    """(model, tokenizer) as every stage loads a folder (a missing padding token becomes EOS)."""
    return load_model(str(folder), dtype="float32", device="cpu")


def blocks_of(model) -> str:
    """Path of the ModuleList of transformer blocks, found from the structure, not from names."""
    lists = [name for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) == model.config.num_hidden_layers]
    assert len(lists) == 1, lists
    return lists[0]


def module_names(model, saved: dict[str, torch.Tensor]) -> dict[str, str]:
    """Saved tensor name -> the model's own name for it, matched by value (random weights are all
    distinct): transformers may save under other names (GPT-NeoX's head `lm_head` as `embed_out`)."""
    state = model.state_dict()
    return {name: name if name in state else next(n for n, t in state.items() if t.shape == tensor.shape
                                                  and torch.equal(t, tensor)) for name, tensor in saved.items()}


def expected_regions(model, name: str) -> set[str]:
    """The regions tensor `name` (the model's name for it) belongs to, read from the module that owns it."""
    owner_name = name.rsplit(".", 1)[0]
    owner = model.get_submodule(owner_name)
    if isinstance(owner, torch.nn.Embedding) or owner is model.get_output_embeddings():
        return {"embeddings"}
    blocks = blocks_of(model)
    if "norm" in type(owner).__name__.lower() or not owner_name.startswith(blocks + "."):
        return set()
    child = model.get_submodule(".".join(owner_name.split(".")[:blocks.count(".") + 3]))  # blocks.N.child
    kind = type(child).__name__.lower()
    return {"body"} | {region for region, word in (("attention", "attention"), ("mlp", "mlp")) if word in kind}


def test_regions_follow_the_module_structure(family, folders):
    model, _ = family_model(family)
    names = module_names(model, load_file(folders.base(family) / "model.safetensors"))
    for saved, name in names.items():
        want = expected_regions(model, name)
        got = {region for region in ("body", "attention", "mlp", "embeddings") if in_region(saved, region)}
        assert got == want, saved
        assert want != {"body"}, f"{saved}: in a block but neither attention nor MLP"
    found = set().union(*(expected_regions(model, n) for n in names.values()))
    assert found == {"body", "attention", "mlp", "embeddings"}


def test_probe_counts_equal_a_brute_force_sampler(family, folders):
    lm, tokenizer = loaded(folders.base(family))
    config = ProbeConfig(samples=3, max_new_tokens=6, temperature=1.5, templates=(0, 3))
    facts = common_facts(4)
    expected = {f.id: tuple(reference_correct(lm, tokenizer, f, t, config) for t in config.templates) for f in facts}
    records = probe_facts(lm, tokenizer, facts, config, batch_size=8, progress=False)
    assert {f: r.template_correct for f, r in records.items()} == expected
    assert any(sum(c) for c in expected.values())  # some samples do name their answer


def test_eval_equals_hf_generate_on_left_padded_batches(family, folders):
    lm, tokenizer = loaded(folders.base(family))
    rows = eval_rows("in", 0, 6)
    prompts = [r["prompt"] for r in rows]
    assert len({len(encode_prompt(tokenizer, p)) for p in prompts}) == 3  # mixed lengths: padding
    window = getattr(lm.config, "sliding_window", None)
    assert window is None or min(len(encode_prompt(tokenizer, p)) for p in prompts) > window
    predictions = evaluate_model(lm, tokenizer, rows, EvalConfig(max_new_tokens=6, batch_size=6), progress=False)
    got = [p["prediction"] for p in predictions]
    assert got == hf_generate_answers(lm, tokenizer, prompts, 6)
    assert got == [greedy_by_hand(lm, tokenizer, p, 6) for p in prompts]
    assert any(got)


def test_full_sft_trains_every_weight_and_scores_through_eval(family, folders, tmp_path):
    base, out = load_file(folders.base(family) / "model.safetensors"), folders.finetuned(family, "full")
    tuned = load_file(out / "model.safetensors")
    assert set(tuned) == set(base)
    assert all(not torch.equal(base[n], tuned[n]) for n in base if in_region(n, "body"))
    records = evaluate(str(out), [folders.sft], tmp_path / "eval", EvalConfig(max_new_tokens=4), progress=False)
    assert sum(r["n"] for r in records) == 8


def test_lora_targets_are_the_linear_layers_of_the_blocks(family, folders):
    base_dir, out = folders.base(family), folders.finetuned(family, "lora")
    model, _ = family_model(family)
    assert default_lora_targets(model) == TARGETS[family]
    run = json.loads((out / RUN_FILE).read_text())
    assert run["config"]["lora_targets"] == list(TARGETS[family])
    base, merged = load_file(base_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(merged) == set(base)
    blocks = blocks_of(model) + "."
    targets = {f"{name}.weight" for name, m in model.named_modules()
               if name.startswith(blocks) and name.rsplit(".", 1)[-1] in TARGETS[family]}
    assert {n for n in base if not torch.equal(base[n], merged[n])} == targets
    for name in targets:
        assert torch.linalg.matrix_rank(merged[name] - base[name]).item() <= 4


def test_auto_targets_are_a_new_lora_key_and_named_targets_keep_theirs(monkeypatch):
    from sftlens import train as train_module

    monkeypatch.setattr(train_module, "model_fingerprint", lambda model: "f" * 16)
    manifest = {"sha256": "0" * 64, "count": 20}

    def key(config):
        return train_module._run_identity("m", manifest, config)["key"]

    # "d12302de5f0083d6": the default LoRA run's key when the default was Llama's projections
    assert key(TrainConfig(method="lora", lora_targets=LLAMA_PROJECTIONS)) == "d12302de5f0083d6"
    assert key(TrainConfig(method="lora")) not in {"d12302de5f0083d6", key(TrainConfig())}
    assert key(TrainConfig(lora_targets=("c_attn",))) == key(TrainConfig()) == "6d47578eef881c66"


def test_named_targets_override_and_must_exist(family):
    model, _ = family_model(family)
    first = TARGETS[family][:1]
    assert lora_targets(model, "m", TrainConfig(method="lora", lora_targets=first)) == first
    if TARGETS[family] != LLAMA_PROJECTIONS:  # the error that the Llama default used to give these families
        with pytest.raises(SftlensError, match=r"lora_targets: q_proj, .* not found in the modules of m"):
            lora_targets(model, "m", TrainConfig(method="lora", lora_targets=LLAMA_PROJECTIONS))
    with pytest.raises(SftlensError, match="no linear layer found in the transformer blocks of toy"):
        lora_targets(torch.nn.Sequential(torch.nn.Embedding(4, 2), torch.nn.Linear(2, 4)), "toy", LORA)


def test_merged_lora_computes_what_the_adapters_did(family):
    """Merging folds B @ A into each weight the right way round (GPT-2's Conv1D stores it transposed)."""
    model, _ = family_model(family)
    net = with_lora(model, TARGETS[family], LORA)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
        ids = torch.tensor([[3, 17, 42, 99, 7, 5, 11, 60, 2, 13]])
        adapted = net(input_ids=ids).logits
        merged = net.merge_and_unload()
        assert not any("lora" in name for name, _ in merged.named_parameters())
        assert torch.allclose(merged(input_ids=ids).logits, adapted, atol=1e-4)


def test_kl_equals_one_prompt_at_a_time(family, folders):
    base_dir, ft_dir = folders.base(family), folders.finetuned(family, "full")
    result = compute_kl(str(base_dir), str(ft_dir), folders.sft, KLConfig(top_k=5, batch_size=8))
    (base, tokenizer), (ft, _) = loaded(base_dir), loaded(ft_dir)
    rows = [json.loads(line) for line in folders.sft.read_text().splitlines()]
    expected = []
    with torch.no_grad():
        for ft_prompt, base_prompt in kl_prompts(rows, "template", {}):
            p = ft(torch.tensor([encode_prompt(tokenizer, ft_prompt)])).logits[0, -1]
            q = base(torch.tensor([encode_prompt(tokenizer, base_prompt)])).logits[0, -1]
            top = p.topk(5).indices
            expected.append(float(torch.nn.functional.kl_div(q[top].log_softmax(-1), p[top].log_softmax(-1),
                                                             log_target=True, reduction="sum")))
    assert [f["kl"] for f in result["facts"]] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert max(expected) > 0


def test_deltas_shares_equal_brute_force(family, folders):
    base_dir, ft_dir = folders.base(family), folders.finetuned(family, "full")
    config, ratios = DeltasConfig(metric="relative", region="body"), (1, 10, 50)
    result = concentration(base_dir, ft_dir, config, ratios, progress=False)
    base, ft = load_file(base_dir / "model.safetensors"), load_file(ft_dir / "model.safetensors")
    names = [n for n in base if in_region(n, "body")]
    deltas = {n: change(base[n], ft[n], "relative").view(-1).double() for n in names}
    total = sum(float(d.sum()) for d in deltas.values())
    for share, chosen in zip(result["shares"], brute_force(base, ft, ratios, config)):
        assert share == pytest.approx(sum(float(deltas[n][i]) for n, i in chosen) / total, rel=1e-9)


def test_every_repair_method_edits_the_body_only_and_loads(family, folders, tmp_path):
    from transformers import AutoModelForCausalLM

    base_dir, ft_dir = folders.base(family), folders.finetuned(family, "full")
    base, ft = load_file(base_dir / "model.safetensors"), load_file(ft_dir / "model.safetensors")
    model, tokenizer = loaded(ft_dir)  # each in-memory edit rewrites the whole region, so one model serves all
    # the guided repair's importances: every checkpoint tensor found among the model's parameters (renamed or tied)
    names = open_pair(base_dir, ft_dir).region_names("all")
    facts = {"forgotten": [(sft_prompt("Which country is Paris in?"), "France")],
             "learned": [(sft_prompt("Which country is Rome in?"), "Italy")]}
    fishers, counts = fisher_diagonals(model, tokenizer, facts, names, progress=False)
    assert counts == {"forgotten": 1, "learned": 1}
    assert all(sum(bool(t.gt(0).any()) for t in f.values()) > len(names) // 2 for f in fishers.values())
    importances = write_importances(tmp_path / "importances.safetensors", fishers, counts, family,
                                    model_fingerprint(str(ft_dir)))
    configs = {m: RepairConfig(method=m, importances=str(importances) if m == "guided" else None) for m in METHODS}
    for method in METHODS:
        value = VALUES[method]
        folder = repair_sweep(base_dir, ft_dir, (value,), configs[method], tmp_path / method, progress=False)[value]
        got = load_file(folder / "model.safetensors")
        for name in base:
            b, f, g = base[name], ft[name], got[name]
            if not in_region(name, "body"):
                assert torch.equal(g, f), (method, name)
            elif method in ("restore", "guided"):  # 100 % of the body restored
                assert torch.equal(g, b), name
            elif method == "wise":
                assert torch.equal(g, torch.lerp(b, f, 0.5)), name
            elif method == "dare":  # each change dropped, or kept and scaled by 1 / (1 - p)
                dropped = g == b
                assert torch.allclose(g[~dropped], (b + 2 * (f - b))[~dropped], atol=1e-6), name
            elif method == "trim":  # each tensor keeps exactly its half largest changes
                kept = g != b
                # exactly the half largest changes are chosen; a chosen element that did not change reads as not kept
                assert int(kept.sum()) == min(target_count(b.numel(), 50), int((f != b).sum())), name
                assert (f - b).abs()[kept].min() >= (f - b).abs()[~kept].max(), name
                assert torch.equal(g[kept], f[kept])
            elif b.dim() != 2:  # spectral decomposes matrices only
                assert torch.equal(g, f), name
            else:  # spectral: the update's singular directions above the Gavish-Donoho threshold
                u, s, vh = torch.linalg.svd((f - b).double(), full_matrices=False)
                k = kept_rank(s, tuple(b.shape), 1.0)
                assert torch.allclose(g.double(), b.double() + (u[:, :k] * s[:k]) @ vh[:k], atol=1e-5), name
        written = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        names = module_names(written, got)
        state = written.state_dict()
        assert all(torch.equal(state[names[n]], got[n]) for n in got), method
        ((_, edited),) = repaired_models(model, base_dir, ft_dir, (value,), configs[method], progress=False)
        assert all(torch.equal(t, state[n]) for n, t in edited.state_dict().items()), method


def test_cli_names_the_targets_it_found(folders, tmp_path, capsys):
    from sftlens.cli import main

    out = tmp_path / "lora"
    assert main(["train", "--model", str(folders.base("gpt2")), "--data", str(folders.sft), "--out", str(out),
                 "--method", "lora", "--lora-rank", "2", "--learning-rate", "1e-2"]) == 0
    assert "LoRA on c_attn, c_proj, c_fc\n" in capsys.readouterr().out
    assert json.loads((out / RUN_FILE).read_text())["config"]["lora_targets"] == ["c_attn", "c_proj", "c_fc"]


def test_an_in_memory_edit_reaches_a_tensor_transformers_renames(folders):
    """GPT-NeoX saves its head as `embed_out` and loads it as `lm_head`: restoring the embeddings
    region in memory must write the loaded head."""
    base_dir, ft_dir = folders.base("gpt_neox"), folders.finetuned("gpt_neox", "full")
    model, _ = loaded(ft_dir)
    config = RepairConfig(method="restore", region="embeddings")
    ((_, edited),) = repaired_models(model, base_dir, ft_dir, (100,), config, progress=False)
    base = load_file(base_dir / "model.safetensors")
    assert torch.equal(edited.state_dict()["lm_head.weight"], base["embed_out.weight"])
    assert torch.equal(edited.state_dict()["gpt_neox.embed_in.weight"], base["gpt_neox.embed_in.weight"])
