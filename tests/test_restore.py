"""Restoration: exactly the selected elements take base values, outputs are complete HF folders."""

from __future__ import annotations

import json

import pytest
import torch

from sftlens.errors import SftlensError
from sftlens.restore import MANIFEST, RestoreConfig, as_repair, restore_in_memory, restored_models
from sftlens.weights import repair_sweep
from sftlens.weights.checkpoints import open_pair
from sftlens.weights.selection import select

from assets import RATIOS, brute_force, load_folder, perturbed, random_pair, write_checkpoint
from tiny import save_model


def _expected(base, ft, chosen: set[tuple[str, int]]) -> dict[str, torch.Tensor]:
    out = {n: t.clone() for n, t in ft.items()}
    for name, i in chosen:
        out[name].view(-1)[i] = base[name].view(-1)[i]
    return out


@pytest.mark.parametrize("config", [
    RestoreConfig(),
    RestoreConfig(metric="absolute", scope="tensor", strategy="bottom", region="all"),
    RestoreConfig(strategy="random", region="mlp", seed=7),
], ids=["paper", "tensor-bottom", "random-mlp"])
def test_restored_elements_equal_base_and_rest_equal_finetuned(tmp_path, config, chunking):
    base_dir, ft_dir, base, ft = random_pair(tmp_path, shards=3, dtype=torch.bfloat16)
    folders = repair_sweep(base_dir, ft_dir, RATIOS, as_repair(config), tmp_path / "out", progress=False)
    assert list(folders) == [float(r) for r in RATIOS]
    for (ratio, folder), chosen in zip(folders.items(), brute_force(base, ft, RATIOS, config)):
        got = load_folder(folder)
        want = _expected(base, ft, chosen)
        assert set(got) == set(want)
        for name in want:
            assert got[name].dtype == torch.bfloat16
            assert torch.equal(got[name], want[name]), f"{ratio}: {name}"
        manifest = json.loads((folder / MANIFEST).read_text())
        assert manifest["restored"] == len(chosen)
        assert sorted(p.name for p in folder.glob("*.safetensors")) == sorted(p.name for p in ft_dir.glob("*.safetensors"))
        assert (folder / "model.safetensors.index.json").read_text() == (ft_dir / "model.safetensors.index.json").read_text()
        assert len((folder / "restored.tsv").read_text().splitlines()) == 1 + len(manifest["tensors"])


def test_sweep_is_resumable_and_keyed_by_settings(tmp_path):
    base_dir, ft_dir, _, _ = random_pair(tmp_path)
    first = repair_sweep(base_dir, ft_dir, (1, 10), as_repair(RestoreConfig()), tmp_path / "out", progress=False)
    stamps = {r: (f / MANIFEST).stat().st_mtime_ns for r, f in first.items()}
    again = repair_sweep(base_dir, ft_dir, (1, 10, 20), as_repair(RestoreConfig()), tmp_path / "out", progress=False)
    assert {r: (again[r] / MANIFEST).stat().st_mtime_ns for r in first} == stamps
    assert (again[20.0] / "config.json").is_file()
    absolute = repair_sweep(base_dir, ft_dir, (1,), as_repair(RestoreConfig(metric="absolute")), tmp_path / "out", progress=False)
    assert (absolute[1.0] / MANIFEST).stat().st_mtime_ns != stamps[1.0]
    assert json.loads((absolute[1.0] / MANIFEST).read_text())["config"]["metric"] == "absolute"
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_output_loads_with_from_pretrained_and_matches_in_memory_restore(tmp_path, tiny_tokenizer, chunking):
    from transformers import AutoModelForCausalLM

    from tiny import tiny_model

    base_model, tok = tiny_model(seed=0, tokenizer=tiny_tokenizer)
    base_dir = save_model(base_model, tok, tmp_path / "base")
    ft_model = perturbed(tiny_model(seed=0, tokenizer=tiny_tokenizer)[0])
    ft_dir = save_model(ft_model, tok, tmp_path / "ft")
    for record in ("sftlens_train.json", "loss_log.jsonl"):  # what `sftlens train` leaves beside weights
        (ft_dir / record).write_text("{}\n")
    config = RestoreConfig()
    folders = repair_sweep(base_dir, ft_dir, (5, 40), as_repair(config), tmp_path / "out", progress=False)

    base_sd, ft_sd = base_model.state_dict(), ft_model.state_dict()
    chosen = brute_force(base_sd, ft_sd, (5, 40), config)
    ids = torch.tensor([tok("<question> Where is Paris? <answer>")["input_ids"]])
    for (_, folder), picked, (_, in_memory) in zip(
            folders.items(), chosen, restored_models(ft_model, base_dir, ft_dir, (5, 40), config, progress=False)):
        loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        expected = tiny_model(seed=0, tokenizer=tiny_tokenizer)[0]
        expected.load_state_dict(_expected(base_sd, ft_sd, picked))
        with torch.no_grad():
            want = expected(ids).logits
            assert torch.equal(loaded(ids).logits, want)
            assert torch.equal(in_memory(ids).logits, want)
        assert (folder / "tokenizer.json").is_file()
        assert not (folder / "sftlens_train.json").exists() and not (folder / "loss_log.jsonl").exists()


def test_in_memory_restore_of_one_ratio_from_a_sweep_selection(tmp_path, tiny_tokenizer):
    from tiny import tiny_model

    base_model, tok = tiny_model(seed=0, tokenizer=tiny_tokenizer)
    base_dir = save_model(base_model, tok, tmp_path / "base")
    ft_dir = save_model(perturbed(tiny_model(seed=0, tokenizer=tiny_tokenizer)[0]), tok, tmp_path / "ft")
    selection = select(open_pair(base_dir, ft_dir), (1, 100), RestoreConfig(region="all"), progress=False)
    model = tiny_model(seed=0, tokenizer=tiny_tokenizer)[0]
    restore_in_memory(model, base_dir, ft_dir, 100, RestoreConfig(region="all"), selection)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, base_model.state_dict()[name]), name
    with pytest.raises(SftlensError, match="not part of the selection"):
        restore_in_memory(model, base_dir, ft_dir, 3, RestoreConfig(region="all"), selection)


def test_cli_writes_every_ratio(tmp_path, capsys):
    from sftlens.cli import main

    base_dir, ft_dir, _, _ = random_pair(tmp_path)
    assert main(["restore", "--base", str(base_dir), "--finetuned", str(ft_dir), "--out", str(tmp_path / "o"),
                 "--ratios", "1,3,5", "--strategy", "random"]) == 0
    out = capsys.readouterr().out
    assert out.count(str(tmp_path / "o" / "random-")) == 3 and "3 restored models" in out
    assert main(["restore", "--base", str(base_dir), "--finetuned", str(ft_dir), "--out", str(ft_dir),
                 "--ratios", "1"]) == 2
    assert "overlaps the input checkpoint" in capsys.readouterr().err


def test_bad_input_writes_nothing(tmp_path, chunking):
    base_dir, ft_dir, base, ft = random_pair(tmp_path)
    for out, ft_at in ((ft_dir, ft_dir), (base_dir / "inside", ft_dir), (tmp_path, tmp_path / "top-1")):
        ft_dir.rename(ft_at)
        with pytest.raises(SftlensError, match="overlaps the input"):
            repair_sweep(base_dir, ft_at, (1,), as_repair(RestoreConfig()), out, progress=False)
        ft_at.rename(ft_dir)
    for ratio in (0, 101):
        with pytest.raises(SftlensError, match="outside"):
            repair_sweep(base_dir, ft_dir, (1, ratio), as_repair(RestoreConfig()), tmp_path / "out", progress=False)
    embed = ft["model.embed_tokens.weight"].clone()
    embed[0, 0] = float("inf")
    broken = write_checkpoint(tmp_path / "broken", {**ft, "model.embed_tokens.weight": embed}, shards=3)
    with pytest.raises(SftlensError, match="model.embed_tokens.weight contains NaN or Inf"):
        repair_sweep(base_dir, broken, (1, 5), as_repair(RestoreConfig()), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_eval_sweep_restores_in_memory_and_caches(tmp_path, eval_pair, monkeypatch):
    from sftlens.evaluate import EvalConfig, summarize
    from sftlens.repair import evaluate_repaired, repair_table

    base_model, ft_model, tok, rows, test = (eval_pair.base_model, eval_pair.ft_model, eval_pair.tokenizer,
                                             eval_pair.rows, eval_pair.test_file)
    base_dir, ft_dir = eval_pair.base_dir, eval_pair.ft_dir
    outputs = {}
    import sftlens.evaluate

    real = sftlens.evaluate.evaluate_model

    def recording(model, tokenizer, eval_rows, config, progress=True):
        predictions = real(model, tokenizer, eval_rows, config, progress=False)
        outputs.setdefault("runs", []).append([p["prediction"] for p in predictions])
        return predictions

    monkeypatch.setattr(sftlens.evaluate, "evaluate_model", recording)
    config, eval_config = RestoreConfig(region="all"), EvalConfig(max_new_tokens=3)
    records = evaluate_repaired(base_dir, ft_dir, (50, 100), as_repair(config), [test], tmp_path / "out", eval_config,
                                train_file=test, progress=False)
    assert sorted({r["restore_ratio"] for r in records}) == [0.0, 50.0, 100.0]
    assert {r["split"] for r in records} == {"test", "train"}
    runs = outputs["runs"]
    assert len(runs) == 6
    base_preds = [p["prediction"] for p in real(base_model, tok, rows, eval_config, progress=False)]
    ft_preds = [p["prediction"] for p in real(ft_model, tok, rows, eval_config, progress=False)]
    assert runs[0] == ft_preds and runs[4] == base_preds, "ratio 0 = fine-tuned, 100 % of all = base"
    assert summarize(real(base_model, tok, rows, eval_config, progress=False)) == [
        {k: v for k, v in r.items() if k not in ("split", "restore_ratio", "strategy")}
        for r in records if r["restore_ratio"] == 100 and r["split"] == "test"]
    table = repair_table(records, "restore")
    assert table.splitlines()[0] == "| restore (%) | test in Acc | test out Acc | train in Acc | train out Acc |"
    assert len(table.splitlines()) == 5
    again = evaluate_repaired(base_dir, ft_dir, (50, 100), as_repair(config), [test], tmp_path / "out", eval_config,
                              train_file=test, progress=False)
    assert again == records and len(outputs["runs"]) == 6, "cached ratios are not re-evaluated"
    with pytest.raises(SftlensError, match="needs --test"):
        evaluate_repaired(base_dir, ft_dir, (50,), as_repair(config), [], tmp_path / "out", eval_config, progress=False)
