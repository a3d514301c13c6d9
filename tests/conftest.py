"""Shared fixtures: tiny in-process models, a tiny EntityQuestions-like data dir, the real data
and the embedded SmolLM2 (integration tests only)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

import assets
from tiny import write_tiny_data

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "entityquestions"
# The longest files (each builds an expensive session fixture its tests share) run first: under make
# test's two workers, one file each, the other files fill in around them.
LONG_FILES_FIRST = ("test_smollm2.py", "test_study.py")


def pytest_collection_modifyitems(items) -> None:
    items.sort(key=lambda item: item.path.name not in LONG_FILES_FIRST)  # stable: the rest keep their order


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


@pytest.fixture
def eval_pair(tmp_path, tiny_tokenizer) -> SimpleNamespace:
    """Two different tiny Llamas saved as base and fine-tuned folders, and a split test file of 10
    facts over both domains and every level: the set-up of every in-memory sweep evaluation."""
    from sftlens.io import atomic_write_jsonl

    from tiny import save_model, tiny_model

    base_model, tokenizer = tiny_model(seed=0, tokenizer=tiny_tokenizer)
    ft_model = tiny_model(seed=5, tokenizer=tiny_tokenizer)[0]
    rows = [{"fact_id": f"P17/test/{i:05d}", "relation": "P17", "domain": domain, "level": i % 5,
             "question": f"Which country is X{i} located in?", "answers": ["France"],
             "prompt": f"<question> Which country is X{i} located in? <answer>", "completion": " France "}
            for i, domain in enumerate(["in", "out"] * 5)]
    test_file = tmp_path / "test.jsonl"
    atomic_write_jsonl(test_file, rows)
    return SimpleNamespace(base_model=base_model, ft_model=ft_model, tokenizer=tokenizer, rows=rows, test_file=test_file,
                           base_dir=save_model(base_model, tokenizer, tmp_path / "base"),
                           ft_dir=save_model(ft_model, tokenizer, tmp_path / "ft"))


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    path = Path(os.environ.get("SFTLENS_DATA_DIR", SHARED_DATA))
    if not path.is_dir():
        pytest.skip(f"EntityQuestions not found at {path} (set SFTLENS_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    """A finished tiny study, run once for the session (the study tests, the Ray executor's among
    them, compare against it; none changes it): its config file and directory."""
    from sftlens.study.engine.commands import run_study
    from sftlens.study.engine.config import load_study_config

    from assets import tiny_study_file
    from tiny import save_model, tiny_model

    root = tmp_path_factory.mktemp("tiny-study")
    model, tokenizer = tiny_model(seed=0)
    model_dir = save_model(model, tokenizer, root / "model")
    config_file = tiny_study_file(root, model_dir, write_tiny_data(root / "eq"))
    run_study(load_study_config(str(config_file)), root / "study", progress=False)
    return config_file, root / "study"


@pytest.fixture(scope="session")
def smollm2_sft(smollm2_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(SFT file, fine-tuned folder): SmolLM2 trained once for the session on 32 facts that all answer
    "France" (4 steps of 8 at lr 1e-4), for the slow training and evaluation tests."""
    from sftlens.data import sft_completion
    from sftlens.train import TrainConfig, train

    from assets import eval_rows, write_sft

    root = tmp_path_factory.mktemp("smollm2-sft")
    rows = [{**row, "answers": ["France"], "completion": sft_completion("France")} for row in eval_rows("in", 2, 32)]
    data = write_sft(root / "sft.jsonl", rows)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SFTLENS_CACHE", str(smollm2_dir.parents[1]))  # reuse the weight fingerprint
        return data, train(str(smollm2_dir), data, root / "tuned", TrainConfig(learning_rate=1e-4), progress=False)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M as a safetensors folder (converted once into the user cache)."""
    from sftlens.models import prepare_builtin

    return prepare_builtin("smollm2-135m")


@pytest.fixture
def tiny_pair(tmp_path, tiny_tokenizer):
    """(base folder, fine-tuned folder, fine-tuned state): a tiny Llama and a perturbed copy."""
    from tiny import save_model, tiny_model

    base_model, tok = tiny_model(seed=0, tokenizer=tiny_tokenizer)
    base_dir = save_model(base_model, tok, tmp_path / "base")
    ft_model = assets.perturbed(tiny_model(seed=0, tokenizer=tiny_tokenizer)[0])
    ft_dir = save_model(ft_model, tok, tmp_path / "ft")
    return base_dir, ft_dir, {n: t.clone() for n, t in ft_model.state_dict().items()}


@pytest.fixture
def audit_pair(tmp_path, tiny_tokenizer, private_cache):
    """(base folder, fine-tuned folder, data folder) of a tiny audit: 24 relations x 3 test facts."""
    from tiny import save_model, tiny_model

    model, tok = tiny_model(seed=0, tokenizer=tiny_tokenizer)
    base = save_model(model, tok, tmp_path / "base")
    ft = save_model(assets.audit_perturbed(model, 0.4), tok, tmp_path / "ft")
    return base, ft, assets.audit_data(tmp_path / "eq")


@pytest.fixture
def known_data_dir(tiny_data_dir):
    """The tiny data with every other fact answered "e": a random tiny model's samples nearly always contain it,
    so the taught base knows facts at level 4 (replay's pool), as a real base knows some."""
    for path in tiny_data_dir.glob("*/*.json"):
        records = json.loads(path.read_text())
        for i, record in enumerate(records):
            if i % 2 == 0:
                record["answers"] = ["e"]
        path.write_text(json.dumps(records))
    return tiny_data_dir
