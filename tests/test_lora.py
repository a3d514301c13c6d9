"""LoRA SFT (`TrainConfig(method="lora")`): trained through PEFT, merged into a plain HF folder."""

import json
import math
import sys

import pytest
import torch

from sftlens.cli import main
from sftlens.config import config_to_dict
from sftlens.errors import SftlensError
from sftlens.evaluate import EvalConfig, evaluate
from sftlens.io import read_jsonl
from sftlens.train import LOSS_FILE, RUN_FILE, TrainConfig, _run_identity, train

from assets import Interrupt, dies_after_checkpoint, sft_rows, weights, write_sft

# What `default_lora_targets` finds in a Llama-shaped model, written out by hand
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

pytestmark = pytest.mark.usefixtures("private_cache")

LORA = TrainConfig(method="lora", learning_rate=1e-2, lora_rank=4, lora_alpha=8)


@pytest.fixture
def sft20(tmp_path):
    return write_sft(tmp_path / "sft.jsonl", sft_rows(20))


def is_lora_target(name: str) -> bool:
    return any(f".{target}." in name for target in LLAMA_PROJECTIONS)


def test_merged_weights_move_only_in_the_target_projections(tiny_model_dir, sft20, tmp_path):
    out = train(str(tiny_model_dir), sft20, tmp_path / "lora", LORA, progress=False)
    base, merged = weights(tiny_model_dir), weights(out)
    assert set(merged) == set(base)  # the base model's tensor names, no adapter tensors
    targets = [name for name in base if is_lora_target(name)]
    others = [name for name in base if not is_lora_target(name)]
    assert len(targets) == 2 * len(LLAMA_PROJECTIONS)  # 2 layers
    assert all(not torch.equal(base[name], merged[name]) for name in targets)
    assert all(torch.equal(base[name], merged[name]) for name in others)  # norms, embeddings, lm_head
    for name in targets:  # a rank-4 update, as LoRA's B @ A
        assert torch.linalg.matrix_rank(merged[name] - base[name]).item() <= 4
    losses = [row["loss"] for row in read_jsonl(out / LOSS_FILE)]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    run = json.loads((out / RUN_FILE).read_text())
    assert run["method"] == "lora"
    assert run["config"]["lora_rank"] == 4 and run["config"]["lora_targets"] == list(LLAMA_PROJECTIONS)
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_merged_folder_loads_and_scores_through_eval(tiny_model_dir, sft20, tmp_path):
    from transformers import AutoModelForCausalLM

    out = train(str(tiny_model_dir), sft20, tmp_path / "lora", LORA, progress=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    saved = weights(out)
    assert all(torch.equal(tensor, saved[name]) for name, tensor in model.state_dict().items() if name in saved)
    records = evaluate(str(out), [sft20], tmp_path / "eval", EvalConfig(max_new_tokens=4), progress=False)
    assert sum(r["n"] for r in records) == 20
    assert all(0 <= r["accuracy"] <= 1 for r in records)


def test_same_seed_same_weights_other_seed_other_weights(tiny_model_dir, sft20, tmp_path):
    a = weights(train(str(tiny_model_dir), sft20, tmp_path / "a", LORA, progress=False))
    b = weights(train(str(tiny_model_dir), sft20, tmp_path / "b", LORA, progress=False))
    other = TrainConfig(**{**config_to_dict(LORA), "seed": 1})
    c = weights(train(str(tiny_model_dir), sft20, tmp_path / "c", other, progress=False))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_full_sft_run_keys_are_those_from_before_lora(monkeypatch):
    from sftlens import train as train_module

    monkeypatch.setattr(train_module, "model_fingerprint", lambda model: "f" * 16)
    manifest = {"sha256": "0" * 64, "count": 20}

    def key(config):
        return _run_identity("m", manifest, config)["key"]

    # keys computed by the code before `method` existed
    assert key(TrainConfig()) == "6d47578eef881c66"
    assert key(TrainConfig(learning_rate=1e-3, seed=2, batch_size=4)) == "93fed4e626a89ad3"
    assert key(TrainConfig(lora_rank=4, lora_alpha=1)) == key(TrainConfig())  # unused by full SFT
    assert "method" not in config_to_dict(TrainConfig())
    lora_keys = {key(TrainConfig(method="lora")), key(TrainConfig(method="lora", lora_rank=8)),
                 key(TrainConfig(method="lora", lora_targets=("q_proj",)))}
    assert len(lora_keys) == 3 and key(TrainConfig()) not in lora_keys


def test_targets_missing_from_the_model_are_an_error_and_nothing_is_written(tiny_model_dir, sft20, tmp_path):
    config = TrainConfig(method="lora", lora_targets=("q_proj", "c_attn", "c_fc"))
    with pytest.raises(SftlensError, match=r"lora_targets: c_attn, c_fc not found in the modules of .*tiny-model"):
        train(str(tiny_model_dir), sft20, tmp_path / "run", config, progress=False)
    assert not (tmp_path / "run").exists() and not (tmp_path / ".run.partial").exists()


def test_without_peft_the_error_says_what_to_install(tiny_model_dir, sft20, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` raise ImportError
    with pytest.raises(SftlensError, match=r"pip install 'sftlens\[lora\]'"):
        train(str(tiny_model_dir), sft20, tmp_path / "run", LORA, progress=False)
    assert not (tmp_path / "run").exists() and not (tmp_path / ".run.partial").exists()


@pytest.mark.parametrize("setting", [{"lora_rank": 0}, {"lora_alpha": -1}, {"lora_dropout": 1.0},
                                     {"lora_targets": ()}])
def test_bad_lora_settings_name_the_key(setting):
    with pytest.raises(ValueError, match=next(iter(setting))):
        TrainConfig(method="lora", **setting)


def test_cli_flags(tiny_model_dir, sft20, tmp_path, capsys):
    out = tmp_path / "cli-lora"
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(sft20), "--out", str(out),
                 "--method", "lora", "--lora-rank", "2", "--lora-targets", "q_proj,v_proj",
                 "--learning-rate", "1e-2"])
    assert code == 0
    run = json.loads((out / RUN_FILE).read_text())
    assert run["config"]["lora_rank"] == 2 and run["config"]["lora_targets"] == ["q_proj", "v_proj"]
    base, merged = weights(tiny_model_dir), weights(out)
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    assert changed == {f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj")}
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(sft20), "--out", str(tmp_path / "x"),
                 "--method", "lora", "--lora-rank", "0"]) == 2
    assert "lora_rank must be positive" in capsys.readouterr().err


def test_resume_after_interruption_gives_the_same_merged_weights(tiny_model_dir, sft20, tmp_path):
    config = TrainConfig(**{**config_to_dict(LORA), "save_steps": 1})
    out = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        train(str(tiny_model_dir), sft20, out, config, progress=False, callbacks=[dies_after_checkpoint(2)])
    assert not out.exists()
    train(str(tiny_model_dir), sft20, out, config, progress=False)
    straight = weights(train(str(tiny_model_dir), sft20, tmp_path / "straight", LORA, progress=False))
    resumed = weights(out)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert json.loads((out / RUN_FILE).read_text())["resumed_from"] == "checkpoint-2"
