"""Pinned values: a silent numerical drift (a transformers or torch upgrade, a changed default)
fails here even when every invariant still holds. Re-pin only after checking why a value moved.

Values measured with torch 2.13.0 (CPU) and transformers as installed by `make test` (2026-11-25).
"""

from __future__ import annotations

import json

import pytest
import torch

from sftlens.probe import probe_facts
from sftlens.train import LOSS_FILE, train

from assets import FAST, QUICK, common_facts, sft_rows, write_sft

# three AdamW steps (batch 8, lr 1e-3, seed 0) of the tiny random-init Llama on 24 SFT rows
PINNED_LOSSES = [6.204559803009033, 6.1316938400268555, 6.079470157623291]
# correct samples of 6 facts, probe QUICK (3 templates x 4 samples, T = 1.5, seed 0), one thread
PINNED_PROBE_COUNTS = {"P17/test/00000": 6, "P19/test/00001": 3, "P106/test/00002": 0, "P17/test/00003": 0,
                       "P19/test/00004": 5, "P106/test/00005": 0}


def test_sft_losses_are_pinned(tiny_model_dir, tmp_path):
    sft = write_sft(tmp_path / "sft.jsonl", sft_rows(24))
    out = train(str(tiny_model_dir), sft, tmp_path / "ft", FAST, progress=False)
    losses = [json.loads(line)["loss"] for line in (out / LOSS_FILE).read_text().splitlines()]
    assert losses == pytest.approx(PINNED_LOSSES, abs=1e-4)


def test_probe_counts_are_pinned(tiny):
    model, tokenizer = tiny
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        records = probe_facts(model, tokenizer, common_facts(6), QUICK, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert {fid: r.correct for fid, r in records.items()} == PINNED_PROBE_COUNTS

