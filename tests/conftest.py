"""Shared fixtures: tiny in-process models, a tiny EntityQuestions-like data dir, the real data
and the embedded SmolLM2 (integration tests only)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tiny import write_tiny_data

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "entityquestions"


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A cache dir of the test's own, so fingerprints and conversions never touch the user's."""
    monkeypatch.setenv("SFTLENS_CACHE", str(tmp_path / "cache"))


@pytest.fixture(params=["whole", "chunked"])
def chunking(request, monkeypatch):
    """'chunked' makes the weight passes read every tensor in blocks of a row or a few elements,
    so tie groups, random keys and restored values all span blocks."""
    if request.param == "chunked":
        import sftlens.weights.checkpoints

        monkeypatch.setattr(sftlens.weights.checkpoints, "CHUNK_ELEMENTS", 5)
    return request.param


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture
def tiny(tiny_tokenizer):
    """(model, tokenizer): a random-init 2-layer Llama, fresh per test."""
    from tiny import tiny_model

    return tiny_model(seed=0, tokenizer=tiny_tokenizer)


@pytest.fixture
def tiny_model_dir(tiny, tmp_path) -> Path:
    """The tiny model saved as a standard HF folder."""
    from tiny import save_model

    model, tokenizer = tiny
    return save_model(model, tokenizer, tmp_path / "tiny-model")


@pytest.fixture
def tiny_data_dir(tmp_path) -> Path:
    return write_tiny_data(tmp_path / "eq")


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    path = Path(os.environ.get("SFTLENS_DATA_DIR", SHARED_DATA))
    if not path.is_dir():
        pytest.skip(f"EntityQuestions not found at {path} (set SFTLENS_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M as a safetensors folder (converted once into the user cache)."""
    from sftlens.models import prepare_builtin

    return prepare_builtin("smollm2-135m")
