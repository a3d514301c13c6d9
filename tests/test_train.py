import json
import math
from pathlib import Path

import pytest
import torch

from sftlens.cli import main
from sftlens.data import sft_completion, sft_prompt
from sftlens.errors import SftlensError
from sftlens.io import read_jsonl
from sftlens.train import (
    IGNORE_INDEX,
    LOSS_FILE,
    RUN_FILE,
    TrainConfig,
    encode_example,
    train,
)

from assets import FAST, Interrupt, dies_after_checkpoint, sft_rows, weights, write_sft

pytestmark = pytest.mark.usefixtures("private_cache")

@pytest.fixture
def sft20(tmp_path) -> Path:
    return write_sft(tmp_path / "sft.jsonl", sft_rows(20))


def test_labels_mask_the_prompt_token_ids(tiny_tokenizer):
    prompt, completion = sft_prompt("Which country is Paris in?"), sft_completion("France")
    example = encode_example(tiny_tokenizer, prompt, completion)
    ids, labels = example["input_ids"], example["labels"]
    n_prompt = len(tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]) + 1  # + BOS
    assert ids[0] == tiny_tokenizer.bos_token_id and ids[-1] == tiny_tokenizer.eos_token_id
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tiny_tokenizer.decode(labels[n_prompt:-1]) == " France "


def test_loss_covers_only_answer_tokens(tiny):
    model, tokenizer = tiny
    example = encode_example(tokenizer, sft_prompt("Which country is Rome in?"), sft_completion("Italy"))
    ids, labels = torch.tensor([example["input_ids"]]), torch.tensor([example["labels"]])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
        hf_loss = model(ids, labels=labels).loss
    targets = labels[0, 1:]
    answer = targets != IGNORE_INDEX
    by_hand = torch.nn.functional.cross_entropy(logits[answer], targets[answer])
    everything = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
    torch.testing.assert_close(hf_loss, by_hand)
    assert not torch.isclose(hf_loss, everything)


def test_cosine_schedule_and_steps_of_a_run(tiny_model_dir, sft20, tmp_path):
    out = train(str(tiny_model_dir), sft20, tmp_path / "run", FAST, progress=False)
    log = read_jsonl(out / LOSS_FILE)
    total = 3  # ceil(20 / 8): the last, partial batch is kept
    assert [row["step"] for row in log] == [1, 2, 3]
    expected = [1e-3 * 0.5 * (1 + math.cos(math.pi * t / total)) for t in range(total)]
    assert [row["learning_rate"] for row in log] == pytest.approx(expected)
    assert all(math.isfinite(row["loss"]) for row in log)
    run = json.loads((out / RUN_FILE).read_text())
    assert run["steps"] == 3 and run["config"]["batch_size"] == 8
    assert run["data"]["count"] == 20 and len(run["data"]["sha256"]) == 64


def test_output_is_a_standard_model_folder(tiny_model_dir, sft20, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = train(str(tiny_model_dir), sft20, tmp_path / "run", FAST, progress=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).eos_token == "<eos>"
    before = weights(tiny_model_dir)
    after = model.state_dict()
    assert set(before) <= set(after)
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_same_seed_same_weights_other_seed_other_weights(tiny_model_dir, sft20, tmp_path):
    a = weights(train(str(tiny_model_dir), sft20, tmp_path / "a", FAST, progress=False))
    b = weights(train(str(tiny_model_dir), sft20, tmp_path / "b", FAST, progress=False))
    c = weights(train(str(tiny_model_dir), sft20, tmp_path / "c", TrainConfig(learning_rate=1e-3, seed=1),
                      progress=False))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resume_after_interruption_gives_the_same_weights(tiny_model_dir, sft20, tmp_path):
    config = TrainConfig(learning_rate=1e-3, save_steps=1)
    out = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        train(str(tiny_model_dir), sft20, out, config, progress=False, callbacks=[dies_after_checkpoint(2)])
    assert not out.exists()
    assert (tmp_path / ".resumed.partial" / "checkpoints" / "checkpoint-2").is_dir()

    train(str(tiny_model_dir), sft20, out, config, progress=False)
    straight = train(str(tiny_model_dir), sft20, tmp_path / "straight", FAST, progress=False)
    resumed_w, straight_w = weights(out), weights(straight)
    assert all(torch.equal(resumed_w[k], straight_w[k]) for k in straight_w)
    assert json.loads((out / RUN_FILE).read_text())["resumed_from"] == "checkpoint-2"
    assert [r["step"] for r in read_jsonl(out / LOSS_FILE)] == [1, 2, 3]
    assert read_jsonl(out / LOSS_FILE) == read_jsonl(straight / LOSS_FILE)
    assert not (tmp_path / ".resumed.partial").exists()


def test_finished_run_is_not_redone(tiny_model_dir, sft20, tmp_path, monkeypatch, capsys):
    from sftlens import train as train_module

    out = train(str(tiny_model_dir), sft20, tmp_path / "run", FAST, progress=False)
    stamp = (out / "model.safetensors").stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(train_module, "_build_trainer", no_training)
    # save_steps does not change the result, so this is still the same run
    assert train(str(tiny_model_dir), sft20, out, TrainConfig(learning_rate=1e-3, save_steps=7)) == out
    assert "already trained" in capsys.readouterr().out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_out_dir_holding_another_run_is_an_error_and_untouched(tiny_model_dir, sft20, tmp_path):
    out = train(str(tiny_model_dir), sft20, tmp_path / "run", FAST, progress=False)
    before = weights(out)
    with pytest.raises(SftlensError, match=r"run: holds another training run"):
        train(str(tiny_model_dir), sft20, out, TrainConfig(learning_rate=1e-3, seed=1), progress=False)
    other_data = write_sft(tmp_path / "other.jsonl", sft_rows(20, offset=3))
    with pytest.raises(SftlensError, match="holds another training run"):
        train(str(tiny_model_dir), other_data, out, FAST, progress=False)
    after = weights(out)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_out_dir_with_foreign_files_is_an_error(tiny_model_dir, sft20, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SftlensError, match="not an sftlens training run"):
        train(str(tiny_model_dir), sft20, out, FAST, progress=False)
    assert (out / "notes.txt").read_text() == "keep me"


def test_empty_sft_set_is_an_error(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SftlensError, match=r"empty.jsonl: no examples"):
        train(str(tiny_model_dir), empty, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_rows_without_a_completion_name_file_and_line(tiny_model_dir, tmp_path):
    rows = sft_rows(3)
    del rows[1]["completion"]
    bad = write_sft(tmp_path / "bad.jsonl", rows)
    with pytest.raises(SftlensError, match=r"bad.jsonl:2: missing key 'completion'"):
        train(str(tiny_model_dir), bad, tmp_path / "run", progress=False)


def test_example_longer_than_the_context_is_an_error(tiny_model_dir, sft20, tmp_path):
    with pytest.raises(SftlensError, match=r"example 1 \(P\w+/train/00000\) is \d+ tokens, longer than the context of 6"):
        train(str(tiny_model_dir), sft20, tmp_path / "run", TrainConfig(max_length=6), progress=False)
    assert not (tmp_path / "run").exists() and not (tmp_path / ".run.partial").exists()


def test_bad_settings_are_errors():
    with pytest.raises(ValueError, match="batch_size must be positive"):
        TrainConfig(batch_size=0)


def test_cli_trains_and_reports_the_loss(tiny_model_dir, sft20, tmp_path, capsys):
    out = tmp_path / "cli-run"
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(sft20), "--out", str(out),
                 "--learning-rate", "1e-3", "--batch-size", "4", "--seed", "3"])
    assert code == 0
    assert "5 steps, loss" in capsys.readouterr().out
    run = json.loads((out / RUN_FILE).read_text())
    assert run["config"]["batch_size"] == 4 and run["config"]["seed"] == 3
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(empty), "--out", str(out)]) == 2
    assert "no examples" in capsys.readouterr().err
