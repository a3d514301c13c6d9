"""Integration tests on the embedded SmolLM2-135M (slow: minutes): the model itself, full SFT, its
evaluation and LoRA. One file, so a parallel run (make test: one worker per file) converts the model and
fine-tunes it once (the session fixtures `smollm2_dir`, `smollm2_sft`)."""

import math

import pytest
import torch

from sftlens.evaluate import evaluate
from sftlens.io import read_jsonl
from sftlens.models import load_model, model_fingerprint
from sftlens.train import LOSS_FILE, TrainConfig, train

from assets import sft_rows, weights, write_sft


def is_lora_target(name: str) -> bool:
    return any(f".{target}." in name for target in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                       "down_proj"))


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france(smollm2_dir):
    model, tokenizer = load_model("smollm2-135m", device="cpu")
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
    assert model_fingerprint("smollm2-135m") == model_fingerprint(str(smollm2_dir))


@pytest.mark.slow
def test_sft_of_smollm2_lowers_the_loss(smollm2_sft):
    _, out = smollm2_sft
    losses = [row["loss"] for row in read_jsonl(out / LOSS_FILE)]
    assert len(losses) == 4
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_trained_smollm2_answers_in_the_trained_format(smollm2_dir, smollm2_sft, tmp_path, monkeypatch):
    """The base model and its SFT both evaluate; training on the facts raises train-set accuracy."""
    monkeypatch.setenv("SFTLENS_CACHE", str(smollm2_dir.parents[1]))  # reuse the weight fingerprint
    data, tuned = smollm2_sft
    base = evaluate(str(smollm2_dir), [data], tmp_path / "base-eval", progress=False)
    after = evaluate(str(tuned), [data], tmp_path / "tuned-eval", progress=False)
    assert after[0]["accuracy"] > base[0]["accuracy"]
    assert after[0]["accuracy"] >= 0.75


@pytest.mark.slow
def test_lora_on_smollm2_keeps_the_tied_embeddings(smollm2_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SFTLENS_CACHE", str(smollm2_dir.parents[1]))  # reuse the weight fingerprint
    data = write_sft(tmp_path / "sft.jsonl", sft_rows(16))
    config = TrainConfig(method="lora", learning_rate=1e-3)
    out = train(str(smollm2_dir), data, tmp_path / "smol-lora", config, progress=False)
    base, merged = weights(smollm2_dir), weights(out)
    assert set(merged) == set(base)
    assert all(torch.equal(base[name], merged[name]) == (not is_lora_target(name)) for name in base)
    assert all(math.isfinite(row["loss"]) for row in read_jsonl(out / LOSS_FILE))
