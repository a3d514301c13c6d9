import json

import pytest
import torch

from sftlens import models
from sftlens.errors import SftlensError
from sftlens.models import load_model, model_fingerprint, resolve_model

from tiny import save_model


def test_unknown_model_name_is_a_one_line_error():
    with pytest.raises(SftlensError, match="unknown model 'no-such-model'"):
        resolve_model("no-such-model")


def test_model_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(SftlensError, match="no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(SftlensError, match="not a file"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_hub_ids_pass_through():
    assert resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_tiny_model_round_trips_through_a_folder(tiny, tiny_model_dir):
    model, tokenizer = tiny
    loaded, loaded_tok = load_model(str(tiny_model_dir), device="cpu")
    ids = torch.tensor([loaded_tok("Paris is in France")["input_ids"]])
    assert loaded.dtype == torch.float32
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert loaded_tok.decode(ids[0]) == "Paris is in France"


def test_dtype_can_be_overridden(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir), dtype="bf16", device="cpu")
    assert model.dtype == torch.bfloat16
    with pytest.raises(SftlensError, match="unknown dtype 'int3'"):
        load_model(str(tiny_model_dir), dtype="int3", device="cpu")


def test_fingerprint_follows_the_weights(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("SFTLENS_CACHE", str(tmp_path / "cache"))
    model, tokenizer = tiny
    a = save_model(model, tokenizer, tmp_path / "a")
    b = save_model(model, tokenizer, tmp_path / "b")
    assert model_fingerprint(str(a)) == model_fingerprint(str(b)) == model_fingerprint(str(a))
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1
    save_model(model, tokenizer, b)
    assert model_fingerprint(str(a)) != model_fingerprint(str(b))


def test_fingerprint_ignores_the_transformers_release_that_wrote_the_config(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("SFTLENS_CACHE", str(tmp_path / "cache"))
    model, tokenizer = tiny
    a = save_model(model, tokenizer, tmp_path / "a")
    before = model_fingerprint(str(a))
    config = json.loads((a / "config.json").read_text())
    (a / "config.json").write_text(json.dumps({**config, "transformers_version": "0.0.1"}))
    assert model_fingerprint(str(a)) == before
    (a / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 0.5}))
    assert model_fingerprint(str(a)) != before


def _fake_gguf_conversion(monkeypatch, tmp_path, model, tokenizer):
    """Make prepare_builtin convert the tiny model instead of the real GGUF (seconds, not a minute)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("SFTLENS_CACHE", str(tmp_path / "cache"))
    spec = models.BUILTIN_MODELS["smollm2-135m"]
    monkeypatch.setattr(models, "_builtin_gguf_path", lambda name, s: tmp_path / "fake.gguf")
    monkeypatch.setattr(models, "_sha256", lambda path: spec.sha256)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: model)


def test_interrupted_preparation_leaves_no_cache_entry(tiny, tmp_path, monkeypatch):
    """A conversion killed while saving must leave nothing that a later run would take as done."""
    model, tokenizer = tiny
    _fake_gguf_conversion(monkeypatch, tmp_path, model, tokenizer)
    real_save = type(model).save_pretrained

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(model), "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        models.prepare_builtin("smollm2-135m")
    parent = models.builtin_model_dir("smollm2-135m").parent
    assert list(parent.iterdir()) == []

    monkeypatch.setattr(type(model), "save_pretrained", real_save)
    target = models.prepare_builtin("smollm2-135m")
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    assert models.prepare_builtin("smollm2-135m") == target


def test_a_gguf_with_the_wrong_checksum_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTLENS_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a model")
    monkeypatch.setattr(models, "_builtin_gguf_path", lambda name, s: fake)
    with pytest.raises(SftlensError, match="sha256"):
        models.prepare_builtin("smollm2-135m")
