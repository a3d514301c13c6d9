"""The streamed selection equals a brute-force global sort; concentration shares equal brute force."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sftlens.analysis.deltas import DeltasConfig, concentration, write_concentration, zero_base_mass
from sftlens.errors import SftlensError
from sftlens.weights.checkpoints import in_region, open_pair
from sftlens.weights.selection import (
    SelectionConfig,
    change,
    parse_ratios,
    random_keys,
    select,
    selection_keys,
    target_count,
)

from assets import RATIOS, brute_force, random_pair, write_checkpoint


def streamed(base_dir, ft_dir, ratios, config) -> list[set[tuple[str, int]]]:
    pair = open_pair(base_dir, ft_dir)
    selection = select(pair, ratios, config, progress=False)
    chosen = [set() for _ in selection.ratios]
    for name in selection.names:
        b, f = pair.base.read(name, None), pair.finetuned.read(name, None)
        keys = selection_keys(change(b, f, config.metric), name, config.strategy, config.seed)
        for i, mask in enumerate(selection.cutter(name).masks(keys)):
            chosen[i] |= {(name, int(j)) for j in mask.view(-1).nonzero().view(-1)}
    return chosen


@pytest.mark.parametrize("strategy", ["top", "bottom", "random"])
@pytest.mark.parametrize("metric", ["relative", "absolute"])
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_selection_equals_brute_force_sort(tmp_path, strategy, metric, scope, chunking):
    base_dir, ft_dir, base, ft = random_pair(tmp_path, seed=len(strategy) + len(metric) + len(scope))
    config = SelectionConfig(metric=metric, scope=scope, strategy=strategy, region="all", seed=3)
    got = streamed(base_dir, ft_dir, RATIOS, config)
    want = brute_force(base, ft, RATIOS, config)
    total = sum(t.numel() for t in base.values())
    for r, g, w in zip(RATIOS, got, want):
        assert g == w, f"ratio {r}"
        if scope == "global":
            assert len(g) == math.floor(total * r / 100)
    assert all(a <= b for a, b in zip(got, got[1:])), "selections must be nested"


@pytest.mark.parametrize("strategy", ["top", "bottom"])
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_many_ties_broken_by_tensor_order_then_flat_index(tmp_path, strategy, scope, chunking):
    base_dir, ft_dir, base, ft = random_pair(tmp_path, ties=True)
    config = SelectionConfig(metric="absolute", scope=scope, strategy=strategy, region="body")
    pair = open_pair(base_dir, ft_dir)
    selection = select(pair, RATIOS, config, progress=False)
    assert any(cut is not None and cut.ties is not None for cuts in selection.cuts.values() for cut in cuts), \
        "the case must split tie groups"
    assert selection.passes == (1 if scope == "tensor" and chunking == "whole" else 2)
    assert streamed(base_dir, ft_dir, RATIOS, config) == brute_force(base, ft, RATIOS, config)


def test_selection_does_not_depend_on_sharding(tmp_path):
    _, _, base, ft = random_pair(tmp_path / "a", ties=True)
    config = SelectionConfig(metric="absolute", region="all")
    one = streamed(write_checkpoint(tmp_path / "b1", base), write_checkpoint(tmp_path / "f1", ft), RATIOS, config)
    many = streamed(write_checkpoint(tmp_path / "b5", base, 5), write_checkpoint(tmp_path / "f5", ft, 5),
                    RATIOS, config)
    assert one == many


def test_random_keys_depend_on_flat_index_only_and_never_tie():
    whole = random_keys("model.layers.0.mlp.up_proj.weight", 3, 0, (1000, 100))
    parts = [random_keys("model.layers.0.mlp.up_proj.weight", 3, start, (n, 100))
             for start, n in ((0, 10), (1000, 1), (1100, 989))]
    assert torch.equal(whole, torch.cat([p.view(-1, 100) for p in parts]))
    assert whole.dtype == torch.int32 and int(whole.min()) >= 0
    assert whole.unique().numel() == whole.numel()
    assert abs(whole.double().mean() / 2 ** 30 - 1) < 0.01
    other = random_keys("model.layers.1.mlp.up_proj.weight", 3, 0, (1000, 100))
    reseeded = random_keys("model.layers.0.mlp.up_proj.weight", 4, 0, (1000, 100))
    for keys in (other, reseeded):
        assert (keys == whole).double().mean() < 1e-3
    # the top 10 % of one tensor's keys is a uniform draw: about 10 % of every region of it
    top = whole.view(-1) >= whole.view(-1).kthvalue(90_000).values
    assert all(abs(float(part.double().mean()) - 0.1) < 0.01 for part in top.view(10, -1))


def test_bf16_checkpoints_rank_in_fp32(tmp_path):
    base_dir, ft_dir, base, ft = random_pair(tmp_path, dtype=torch.bfloat16)
    config = SelectionConfig(region="all")
    assert streamed(base_dir, ft_dir, RATIOS, config) == brute_force(base, ft, RATIOS, config)


@pytest.mark.parametrize("strategy", ["top", "random"])
def test_concentration_shares_equal_brute_force(tmp_path, strategy, chunking):
    base_dir, ft_dir, base, ft = random_pair(tmp_path, seed=5)
    config = DeltasConfig(metric="relative", region="body", strategy=strategy)
    result = concentration(base_dir, ft_dir, config, RATIOS, progress=False)
    names = sorted(n for n in base if in_region(n, "body"))
    deltas = {n: change(base[n], ft[n], "relative").view(-1).double().numpy() for n in names}
    total = sum(d.sum() for d in deltas.values())
    for share, chosen in zip(result["shares"], brute_force(base, ft, RATIOS, config)):
        want = sum(deltas[n][i] for n, i in chosen) / total
        assert share == pytest.approx(want, rel=1e-12)
    assert result["shares"][-1] == pytest.approx(1.0)
    assert result["elements"] == sum(deltas[n].size for n in names)
    by_name = {t["name"]: t for t in result["tensors"]}
    assert set(by_name) == set(names)
    for n in names:
        assert by_name[n]["mean"] == pytest.approx(deltas[n].mean(), rel=1e-9)
    for i in range(len(RATIOS)):
        assert sum(t["share_of_selected"][i] for t in result["tensors"]) == pytest.approx(1.0)


def planted_zeros(tmp_path: Path, zeros: int = 9):
    """A random pair whose base has `zeros` exact zeros planted in body tensors (changed in ft)."""
    base_dir, ft_dir, base, ft = random_pair(tmp_path, seed=11, shards=2)
    names = sorted(n for n in base if in_region(n, "body"))
    gen = torch.Generator().manual_seed(4)
    for k in range(zeros):
        name = names[k % len(names)]
        i = int(torch.randint(0, base[name].numel(), (1,), generator=gen))
        base[name].view(-1)[i] = 0.0
    return write_checkpoint(tmp_path / "zbase", base, 2), ft_dir, base, ft, names


def test_zero_base_mass_equals_brute_force(tmp_path, chunking):
    base_dir, ft_dir, base, ft, names = planted_zeros(tmp_path)
    got = zero_base_mass(base_dir, ft_dir, "body")
    b = np.concatenate([base[n].view(-1).double().numpy() for n in names])
    f = np.concatenate([ft[n].view(-1).double().numpy() for n in names])
    relative = np.abs(f - b) / (np.abs(b) + 1e-8)
    assert got["elements"] == b.size and got["zero_base_elements"] == int((b == 0).sum()) == 9
    assert got["zero_base_share_of_relative_change"] == pytest.approx(relative[b == 0].sum() / relative.sum(), rel=1e-5)
    assert got["zero_base_share_of_relative_change"] > 0.99  # |d| / 1e-8 swamps everything else


def test_relative_nonzero_concentration_ignores_zero_base_elements(tmp_path, chunking):
    base_dir, ft_dir, base, ft, names = planted_zeros(tmp_path)
    plain = concentration(base_dir, ft_dir, DeltasConfig(metric="relative"), RATIOS, progress=False)
    without = concentration(base_dir, ft_dir, DeltasConfig(metric="relative_nonzero"), RATIOS, progress=False)
    b = np.concatenate([base[n].view(-1).double().numpy() for n in names])
    f = np.concatenate([ft[n].view(-1).double().numpy() for n in names])
    kept = np.where(b == 0, 0.0, np.abs(f - b) / (np.abs(b) + 1e-8))
    ranked = np.sort(kept)[::-1]
    for r, share in zip(RATIOS, without["shares"]):
        assert share == pytest.approx(ranked[: target_count(b.size, r)].sum() / kept.sum(), rel=1e-5)
    assert plain["shares"][1] > 0.99 > without["shares"][1]  # top 3 % holds every planted zero


def test_top_concentrates_more_than_random(tmp_path):
    base_dir, ft_dir, _, _ = random_pair(tmp_path, seed=2)
    top = concentration(base_dir, ft_dir, DeltasConfig(), RATIOS, progress=False)["shares"]
    rnd = concentration(base_dir, ft_dir, DeltasConfig(strategy="random"), RATIOS, progress=False)["shares"]
    assert all(t > r for t, r in zip(top[:-1], rnd[:-1]))
    assert np.all(np.diff(top) >= 0)


def test_regions_for_llama_and_gpt2_names():
    llama = ["model.layers.3.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight",
             "model.layers.3.input_layernorm.weight", "model.layers.3.self_attn.q_norm.weight",
             "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
             "model.layers.0.self_attn.k_proj.bias"]
    gpt2 = ["transformer.h.0.attn.c_attn.weight", "h.1.mlp.c_fc.bias", "transformer.h.0.ln_1.weight",
            "transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"]
    pick = {region: [n for n in llama + gpt2 if in_region(n, region)]
            for region in ("body", "attention", "mlp", "embeddings")}
    assert pick["body"] == ["model.layers.3.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight",
                            "model.layers.0.self_attn.k_proj.bias", "transformer.h.0.attn.c_attn.weight",
                            "h.1.mlp.c_fc.bias"]
    assert pick["attention"] == ["model.layers.3.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.bias",
                                 "transformer.h.0.attn.c_attn.weight"]
    assert pick["mlp"] == ["model.layers.3.mlp.down_proj.weight", "h.1.mlp.c_fc.bias"]
    assert pick["embeddings"] == ["model.embed_tokens.weight", "lm_head.weight", "transformer.wte.weight",
                                  "transformer.wpe.weight"]
    assert in_region("model.layers.3.mlp.down_proj.weight", r"layers\.3\.")


def test_concentration_files(tmp_path):
    base_dir, ft_dir, _, _ = random_pair(tmp_path)
    result = concentration(base_dir, ft_dir, DeltasConfig(), (1, 10), progress=False)
    files = write_concentration(result, tmp_path / "out")
    assert files["figure"].read_bytes()[:4] == b"\x89PNG"
    assert files["csv"].read_text().splitlines()[0] == "ratio,elements,share"
    assert "| 10 |" in files["markdown"].read_text()
    assert len(files["tensors"].read_text().splitlines()) == 1 + len(result["tensors"])


def test_cli_prints_table(tmp_path, capsys):
    from sftlens.cli import main

    base_dir, ft_dir, _, _ = random_pair(tmp_path)
    assert main(["deltas", "--base", str(base_dir), "--finetuned", str(ft_dir), "--out", str(tmp_path / "o"),
                 "--ratios", "1,5", "--metric", "absolute"]) == 0
    out = capsys.readouterr().out
    assert "absolute change" in out and "| 5 |" in out
    assert "Elements whose base value is exactly 0: 0 of" in out and "dominated" not in out
    assert (tmp_path / "o" / "concentration.png").is_file()
    assert json.loads((tmp_path / "o" / "concentration.json").read_text())["zero_base"]["zero_base_elements"] == 0


def test_cli_warns_when_zero_base_elements_dominate(tmp_path, capsys):
    from sftlens.cli import main

    base_dir, ft_dir, _, _, _ = planted_zeros(tmp_path)
    assert main(["deltas", "--base", str(base_dir), "--finetuned", str(ft_dir), "--out", str(tmp_path / "o"),
                 "--ratios", "1,5"]) == 0
    out = capsys.readouterr().out
    assert "9 of" in out and "The relative metric is dominated by them" in out


def _error(base_dir, ft_dir, ratios=(1,)) -> str:
    with pytest.raises(SftlensError) as err:
        concentration(base_dir, ft_dir, DeltasConfig(region="all"), ratios, progress=False)
    return str(err.value)


def test_bad_checkpoints_are_clear_errors(tmp_path, chunking):
    _, _, base, ft = random_pair(tmp_path / "ok")
    good = write_checkpoint(tmp_path / "good", base)
    renamed = write_checkpoint(tmp_path / "renamed", {k.replace("q_proj", "qq"): v for k, v in ft.items()})
    assert "missing from" in _error(good, renamed)
    reshaped = write_checkpoint(tmp_path / "reshaped", {**ft, "lm_head.weight": torch.zeros(8, 17)})
    assert "lm_head.weight: shape [17, 8]" in _error(good, reshaped)
    half = write_checkpoint(tmp_path / "half", {**ft, "lm_head.weight": ft["lm_head.weight"].half()})
    assert "dtype F32" in _error(good, half)
    bad = ft["model.layers.1.mlp.up_proj.weight"].clone()
    bad[2, 3] = float("nan")
    nan = write_checkpoint(tmp_path / "nan", {**ft, "model.layers.1.mlp.up_proj.weight": bad})
    assert "model.layers.1.mlp.up_proj.weight contains NaN or Inf" in _error(good, nan)
    sharded = write_checkpoint(tmp_path / "sharded", ft, shards=3)
    (sharded / "model-00002-of-00003.safetensors").unlink()
    assert "model-00002-of-00003.safetensors: shard listed" in _error(good, sharded)
    for ratio in (0, -1, 100.5, "x"):
        with pytest.raises(SftlensError, match="ratio"):
            parse_ratios([ratio])
    with pytest.raises(SftlensError, match="matches no"):
        concentration(good, good, DeltasConfig(region="nothing_here"), (1,), progress=False)
