"""Repair methods (restore, wise, dare, trim) against their closed forms and brute-force sorts,
written as folders and applied in memory."""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction

import pytest
import torch

from sftlens.config import config_from_dict
from sftlens.errors import SftlensError
from sftlens.weights import METHODS, RepairConfig, parse_values, repair_sweep, repaired_models
from sftlens.weights.checkpoints import in_region
from sftlens.weights.methods import mix
from sftlens.weights.selection import random_keys

from assets import load_folder, random_pair, write_checkpoint

NEUTRAL = {"wise": 1.0, "dare": 0.0, "trim": 100.0}


def _assert_outside_region_is_finetuned(got, ft, region="body"):
    for name in ft:
        if not in_region(name, region):
            assert torch.equal(got[name], ft[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wise_equals_the_closed_form(tmp_path, chunking, dtype):
    base_dir, ft_dir, base, ft = random_pair(tmp_path, shards=3, dtype=dtype)
    alphas = (0.0, 0.25, 0.7, 1.0)
    folders = repair_sweep(base_dir, ft_dir, alphas, RepairConfig(method="wise"), tmp_path / "out", progress=False)
    assert [f.name for f in folders.values()] == ["wise-0", "wise-0.25", "wise-0.7", "wise-1"]
    ulp = torch.finfo(dtype).eps
    for alpha, folder in folders.items():
        got = load_folder(folder)
        _assert_outside_region_is_finetuned(got, ft)
        for name in (n for n in ft if in_region(n, "body")):
            b, f = base[name].double(), ft[name].double()
            exact = b + alpha * (f - b)
            assert got[name].dtype == dtype
            # rounded once to the dtype (fp32 arithmetic adds a few fp32 ulps at most)
            assert ((got[name].double() - exact).abs() <= ulp * exact.abs() + 4 * 2.0 ** -23 * (b.abs() + f.abs())).all()
            if alpha == 0:
                assert torch.equal(got[name], base[name])
            if alpha == 1:
                assert torch.equal(got[name], ft[name])
        manifest = json.loads((folder / "repair.json").read_text())
        assert (manifest["method"], manifest["alpha"], manifest["config"]) == ("wise", alpha, {"region": "body"})


def _dare_pair(tmp_path, shards: int, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"model.layers.0.mlp.up_proj.weight": (160, 125), "model.layers.1.self_attn.q_proj.weight": (7, 9),
              "model.layers.0.input_layernorm.weight": (9,), "lm_head.weight": (5, 9)}
    base = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    ft = {n: t + 0.1 * torch.randn(t.shape, generator=gen) for n, t in base.items()}
    name = f"{shards}shards"
    return write_checkpoint(tmp_path / f"base-{name}", base, shards), write_checkpoint(tmp_path / f"ft-{name}", ft, shards), base, ft


def test_dare_drops_a_binomial_share_rescales_exactly_and_ignores_blocks(tmp_path, chunking):
    base_dir, ft_dir, base, ft = _dare_pair(tmp_path, shards=1)
    ps = (0.1, 0.5, 0.9)
    config = RepairConfig(method="dare", seed=11)
    folders = repair_sweep(base_dir, ft_dir, ps, config, tmp_path / "out", progress=False)
    dropped_before = None
    for p, folder in folders.items():
        got = load_folder(folder)
        _assert_outside_region_is_finetuned(got, ft)
        drops = {}
        for name in (n for n in ft if in_region(n, "body")):
            # the mask from whole-tensor keys: the same however the tensor was read in blocks
            drop = random_keys(name, 11, 0, ft[name].shape) < round(p * 2 ** 31)
            kept = ~drop
            assert torch.equal(got[name][drop], base[name][drop])
            assert torch.equal(got[name][kept], mix(base[name], ft[name], 1 / (1 - p))[kept])
            closed = base[name].double() + (ft[name].double() - base[name].double()) / (1 - p)
            torch.testing.assert_close(got[name][kept].double(), closed[kept], rtol=1e-6, atol=1e-6)
            drops[name] = drop
        n = sum(d.numel() for d in drops.values())
        dropped = sum(int(d.sum()) for d in drops.values())
        assert abs(dropped - n * p) <= 5 * math.sqrt(n * p * (1 - p)), (p, dropped, n)
        assert json.loads((folder / "repair.json").read_text())["reset"] == dropped
        if dropped_before is not None:  # nested: what p drops, every larger p drops too
            assert all((dropped_before[name] & ~drops[name]).sum() == 0 for name in drops)
        dropped_before = drops


def test_dare_mask_does_not_depend_on_sharding_or_seed_reuse(tmp_path):
    one = repair_sweep(*_dare_pair(tmp_path, shards=1)[:2], (0.3,), RepairConfig(method="dare"), tmp_path / "o1",
                       progress=False)
    two = repair_sweep(*_dare_pair(tmp_path, shards=2)[:2], (0.3,), RepairConfig(method="dare"), tmp_path / "o2",
                       progress=False)
    other_seed = repair_sweep(*_dare_pair(tmp_path, shards=1)[:2], (0.3,), RepairConfig(method="dare", seed=1),
                              tmp_path / "o3", progress=False)
    a, b, c = (load_folder(f[0.3]) for f in (one, two, other_seed))
    assert len(list(two[0.3].glob("*.safetensors"))) == 2
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], c["model.layers.0.mlp.up_proj.weight"])


def _trim_brute_force(base, ft, d: float, scope: str, region: str = "body") -> dict[str, torch.Tensor]:
    """Keep the floor(n d / 100) largest |ft - base| (ties: sorted name, then flat index), rest = base."""
    names = sorted(n for n in ft if in_region(n, region))
    rows = [(-float(v), i_name, i, name) for i_name, name in enumerate(names)
            for i, v in enumerate((ft[name].float() - base[name].float()).abs().view(-1).tolist())]
    groups = [rows] if scope == "global" else [[r for r in rows if r[3] == name] for name in names]
    out = {n: t.clone() for n, t in ft.items()}
    for name in names:
        out[name] = base[name].clone()
    for group in groups:
        for _, _, i, name in sorted(group)[: math.floor(len(group) * Fraction(repr(d)) / 100)]:
            out[name].view(-1)[i] = ft[name].view(-1)[i]
    return out


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_trim_equals_a_brute_force_sort(tmp_path, chunking, scope, ties):
    base_dir, ft_dir, base, ft = random_pair(tmp_path, shards=3, ties=ties)
    ds = (5, 20, 50, 100)
    config = RepairConfig(method="trim", scope=None if scope == "tensor" else "global")
    folders = repair_sweep(base_dir, ft_dir, ds, config, tmp_path / "out", progress=False)
    for d, folder in folders.items():
        got, want = load_folder(folder), _trim_brute_force(base, ft, d, scope)
        assert all(torch.equal(got[n], want[n]) for n in ft), d
        manifest = json.loads((folder / "repair.json").read_text())
        assert manifest["config"] == {"metric": "absolute", "scope": scope, "region": "body"}


@pytest.mark.parametrize("method", ["wise", "dare", "trim"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_neutral_values_give_back_the_finetuned_weights_bit_for_bit(tmp_path, method, dtype):
    # base and fine-tuned of very different magnitudes: base + (ft - base) is not ft in floating point
    gen = torch.Generator().manual_seed(0)
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight", "lm_head.weight"]
    base = {n: (torch.randn(6, 7, generator=gen) * 10).to(dtype) for n in names}
    ft = {n: (torch.randn(6, 7, generator=gen) * 1e-3).to(dtype) for n in names}
    base_dir, ft_dir = write_checkpoint(tmp_path / "base", base, 2), write_checkpoint(tmp_path / "ft", ft, 2)
    config = RepairConfig(method=method, region="all")
    folder = repair_sweep(base_dir, ft_dir, (NEUTRAL[method],), config, tmp_path / "out", progress=False)[NEUTRAL[method]]
    got = load_folder(folder)
    assert all(torch.equal(got[n], ft[n]) for n in ft)
    assert (folder / "model.safetensors.index.json").read_bytes() == (ft_dir / "model.safetensors.index.json").read_bytes()
    assert METHODS[method].neutral == NEUTRAL[method]


@pytest.mark.parametrize("method,values", [
    ("restore", (5, 40)), ("wise", (0.3, 1.0)), ("dare", (0.0, 0.6)), ("trim", (20, 100)), ("spectral", (0, 1, 3))])
def test_written_folders_load_and_equal_the_in_memory_edit(tmp_path, tiny_tokenizer, tiny_pair, method, values):
    from transformers import AutoModelForCausalLM

    from tiny import tiny_model

    base_dir, ft_dir, ft_state = tiny_pair
    config = RepairConfig(method=method, region="all")
    folders = repair_sweep(base_dir, ft_dir, values, config, tmp_path / "out", progress=False)
    model = tiny_model(seed=0, tokenizer=tiny_tokenizer)[0]
    model.load_state_dict(ft_state)
    for (value, folder), (value_in_memory, edited) in zip(
            folders.items(), repaired_models(model, base_dir, ft_dir, values, config, progress=False)):
        assert value == value_in_memory
        loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
        state = edited.state_dict()
        assert all(torch.equal(loaded[n], state[n]) for n in state), (method, value)
        changed = {n for n in state if not torch.equal(state[n], ft_state[n])}
        if value == METHODS[method].neutral:
            assert not changed
        elif method != "dare" or value > 0:
            assert changed
        if method == "spectral":  # only matrices move
            assert all(state[n].dim() == 2 for n in changed)
        assert (folder / "tokenizer.json").is_file()


def test_sweep_skips_finished_values_and_is_keyed_by_the_settings_the_method_reads(tmp_path):
    base_dir, ft_dir, _, _ = random_pair(tmp_path)
    first = repair_sweep(base_dir, ft_dir, (0.2,), RepairConfig(method="dare"), tmp_path / "out", progress=False)
    stamp = (first[0.2] / "repair.json").stat().st_mtime_ns
    # scope and metric are not read by dare: same key, skipped
    again = repair_sweep(base_dir, ft_dir, (0.2, 0.4), RepairConfig(method="dare", scope="tensor"), tmp_path / "out",
                         progress=False)
    assert (again[0.2] / "repair.json").stat().st_mtime_ns == stamp and (again[0.4] / "config.json").is_file()
    reseeded = repair_sweep(base_dir, ft_dir, (0.2,), RepairConfig(method="dare", seed=5), tmp_path / "out",
                            progress=False)
    assert (reseeded[0.2] / "repair.json").stat().st_mtime_ns != stamp


def test_restore_through_repair_is_the_restore_stage(tmp_path):
    from sftlens.restore import RestoreConfig, as_repair

    base_dir, ft_dir, _, _ = random_pair(tmp_path)
    restored = repair_sweep(base_dir, ft_dir, (3,), as_repair(RestoreConfig(strategy="random")), tmp_path / "out", progress=False)
    stamp = (restored[3.0] / "restore.json").stat().st_mtime_ns
    repaired = repair_sweep(base_dir, ft_dir, (3,), RepairConfig(strategy="random"), tmp_path / "out", progress=False)
    assert repaired == restored and (repaired[3.0] / "restore.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("method,value,message", [
    ("wise", 1.5, "wise alpha 1.5 is outside [0, 1]"), ("wise", -0.1, "outside [0, 1]"),
    ("dare", 1, "dare p 1 is outside [0, 1)"), ("dare", -0.5, "outside [0, 1)"),
    ("trim", 0, "trim d 0 is outside (0, 100]"), ("trim", 101, "outside"), ("wise", "nan", "outside"),
    ("dare", "x", "dare p 'x' is not a number"), ("restore", 0, "ratio 0 is outside (0, 100]"),
])
def test_bad_values_are_one_line_errors_and_write_nothing(tmp_path, method, value, message):
    base_dir, ft_dir, _, _ = random_pair(tmp_path)
    with pytest.raises(SftlensError, match=re.escape(message)) as err:
        repair_sweep(base_dir, ft_dir, (NEUTRAL.get(method, 1), value), RepairConfig(method=method), tmp_path / "out",
                     progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="unknown repair method 'ties'"):
        RepairConfig(method="ties")
    with pytest.raises(SftlensError, match="repair.method: 'ties' is not one of"):
        config_from_dict(RepairConfig, {"method": "ties"}, "repair")
    with pytest.raises(SftlensError, match="unknown repair method 'ties'"):
        parse_values("ties", [1])
    assert config_from_dict(RepairConfig, {"method": "trim", "scope": "global"}, "repair").selection().scope == "global"


def test_parse_values_sorts_and_deduplicates():
    assert parse_values("wise", ["1", 0.5, "0.5", 0]) == (0.0, 0.5, 1.0)
    assert parse_values("dare", (0, 0.9)) == (0.0, 0.9)
    with pytest.raises(SftlensError, match="no trim d values"):
        parse_values("trim", [])


def test_cli_writes_one_folder_per_value_and_refuses_settings_the_method_ignores(tmp_path, capsys):
    from sftlens.cli import main

    base_dir, ft_dir, _, ft = random_pair(tmp_path)
    common = ["repair", "--base", str(base_dir), "--finetuned", str(ft_dir), "--out", str(tmp_path / "o")]
    assert main([*common, "--method", "dare", "--values", "0.5,0.1", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "dare-0.1" in out and "dare-0.5" in out and "2 dare models" in out
    assert json.loads((tmp_path / "o" / "dare-0.5" / "repair.json").read_text())["config"] == {"region": "body", "seed": 3}
    assert main([*common, "--method", "trim", "--values", "100", "--region", "mlp"]) == 0
    got = load_folder(tmp_path / "o" / "trim-100")
    assert all(torch.equal(got[n], ft[n]) for n in ft)
    capsys.readouterr()
    for bad, message in ((["--method", "wise", "--values", "0.5", "--scope", "tensor"], "--scope does not apply to --method wise"),
                         (["--method", "wise", "--values", "0.5,2"], "wise alpha '2' is outside [0, 1]"),
                         (["--method", "dare", "--values", "1"], "dare p '1' is outside [0, 1)")):
        assert main([*common[:-1], str(tmp_path / "bad"), *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
        assert not (tmp_path / "bad").exists() or not [p for p in (tmp_path / "bad").iterdir() if not p.name.startswith(".")]


def test_cli_eval_sweeps_in_memory_with_the_finetuned_model_as_reference(tmp_path, eval_pair, capsys):
    from sftlens.cli import main
    from sftlens.evaluate import EvalConfig, evaluate_model, summarize

    base_model, ft_model, tok, rows, test = (eval_pair.base_model, eval_pair.ft_model, eval_pair.tokenizer,
                                             eval_pair.rows, eval_pair.test_file)
    base_dir, ft_dir = eval_pair.base_dir, eval_pair.ft_dir
    command = ["repair", "--method", "wise", "--values", "0", "--region", "all", "--base", str(base_dir),
               "--finetuned", str(ft_dir), "--out", str(tmp_path / "o"), "--eval", "--test", str(test),
               "--max-new-tokens", "3"]
    assert main(command) == 0
    out = capsys.readouterr().out
    assert "| wise alpha | test in Acc | test out Acc |" in out and "evaluated 2 models in memory" in out
    cached = {p.name: json.loads(p.read_text())["records"] for p in (tmp_path / "o" / "eval").glob("wise-*.json")}
    assert sorted(cached) == ["wise-0.json", "wise-1.json"]
    config = EvalConfig(max_new_tokens=3)
    for name, model in (("wise-0.json", base_model), ("wise-1.json", ft_model)):
        want = summarize(evaluate_model(model, tok, rows, config, progress=False))
        assert [{k: v for k, v in r.items() if k not in ("split", "method", "repair_value")} for r in cached[name]] == want
    assert (tmp_path / "o" / "eval" / "wise-table.md").is_file()
    # a cache written when the field was `value` reads back as `repair_value`
    legacy = tmp_path / "o" / "eval" / "wise-0.json"
    written = json.loads(legacy.read_text())
    written["records"] = [{("value" if k == "repair_value" else k): v for k, v in r.items()} for r in written["records"]]
    legacy.write_text(json.dumps(written))
    assert main(command) == 0
    assert capsys.readouterr().out.split("evaluated")[0] == out.split("evaluated")[0]  # the same table
