"""The spectral repair (Gavish-Donoho hard threshold of each matrix's update) against numpy: the
threshold, the kept rank, the reconstruction, its ends (B and F bit for bit), a planted low-rank
update, and the method through `repair_sweep`, `repaired_models` and `sftlens repair`."""

from __future__ import annotations

import json
import math
import re
from functools import cache

import numpy as np
import pytest
import torch

from sftlens.errors import SftlensError
from sftlens.weights import METHODS, RepairConfig, parse_values, repair_sweep
from sftlens.weights.checkpoints import in_region
from sftlens.weights.spectral import gd_threshold, kept_rank, mp_median, omega

from assets import load_folder, random_pair, write_checkpoint


@cache
def _mp_median_by_grid(beta: float) -> float:
    """The Marchenko-Pastur median by trapezoids on a dense grid in u, x = a + (b - a) u^2 (which tames
    the 1 / sqrt(x) pole of beta = 1), not the module's Gauss-Legendre quadrature in an angle."""
    a, b = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2
    u = np.linspace(0, 1, 2_000_001)
    x = a + (b - a) * u ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        integrand = np.nan_to_num(np.sqrt(np.maximum((b - x) * (x - a), 0)) / (2 * math.pi * beta * x)
                                  * 2 * (b - a) * u)
    if beta == 1:  # a = 0: the integrand's limit at u = 0 is b / pi
        integrand[0] = b / math.pi
    cdf = np.concatenate([[0], np.cumsum((integrand[1:] + integrand[:-1]) / 2 * np.diff(u))])
    return float(np.interp(0.5 * cdf[-1], cdf, x))


def _numpy_threshold(matrix: np.ndarray, c: float = 1.0) -> tuple[float, int]:
    """(threshold, kept rank) of a matrix in float64 numpy, with the published closed forms."""
    s = np.linalg.svd(matrix, compute_uv=False)
    beta = min(matrix.shape) / max(matrix.shape)
    lam = math.sqrt(2 * (beta + 1) + 8 * beta / (beta + 1 + math.sqrt(beta ** 2 + 14 * beta + 1)))
    tau = lam / math.sqrt(_mp_median_by_grid(beta)) * float(np.median(s))
    return tau, int((s > c * tau).sum())


@pytest.mark.parametrize("beta", [1.0, 0.75, 0.5, 1 / 3, 0.1, 0.02])
def test_omega_is_the_exact_form_and_near_the_published_cubic(beta):
    assert mp_median(beta) == pytest.approx(_mp_median_by_grid(beta), abs=1e-8)
    assert omega(beta) == pytest.approx(0.56 * beta ** 3 - 0.95 * beta ** 2 + 1.82 * beta + 1.43, abs=0.02)


def test_square_matrices_use_gavish_donohos_2_858():
    assert mp_median(1.0) == pytest.approx(0.6528, abs=1e-4)
    assert omega(1.0) == pytest.approx(2.858, abs=5e-4)  # the paper's value for beta = 1


@pytest.mark.parametrize("shape", [(40, 40), (30, 70), (70, 31), (1, 9)])
def test_threshold_and_rank_equal_numpy(shape):
    gen = torch.Generator().manual_seed(shape[0] * 100 + shape[1])
    low_rank = torch.randn(shape[0], 3, generator=gen, dtype=torch.float64) @ torch.randn(3, shape[1], generator=gen,
                                                                                            dtype=torch.float64)
    matrix = low_rank + 0.3 * torch.randn(shape, generator=gen, dtype=torch.float64)
    s = torch.linalg.svdvals(matrix)
    for c in (0.5, 1.0, 2.0):
        tau, rank = _numpy_threshold(matrix.numpy(), c)
        assert gd_threshold(s, shape) == pytest.approx(tau, rel=1e-5)
        assert kept_rank(s, shape, c) == rank
    if min(shape) > 3:
        assert kept_rank(s, shape, 1.0) == 3


def _brute_force(base: torch.Tensor, ft: torch.Tensor, c: float) -> torch.Tensor:
    """B + the update's directions above c tau, in float64 numpy."""
    delta = ft.double().numpy() - base.double().numpy()
    u, s, vh = np.linalg.svd(delta, full_matrices=False)
    _, k = _numpy_threshold(delta, c)
    return torch.from_numpy(base.double().numpy() + (u[:, :k] * s[:k]) @ vh[:k])


def test_sweep_equals_a_brute_force_svd_and_leaves_other_tensors_finetuned(tmp_path, chunking):
    _, _, base, ft = random_pair(tmp_path, shards=3)
    gen = torch.Generator().manual_seed(7)
    for name, shape in (("model.layers.0.mlp.down_proj.weight", (8, 13)), ("model.layers.0.mlp.up_proj.bias", (12,))):
        base[name] = torch.randn(shape, generator=gen)  # a wide matrix (decomposed transposed) and a bias
        ft[name] = base[name] + 0.1 * torch.randn(shape, generator=gen)
    base_dir, ft_dir = write_checkpoint(tmp_path / "b", base, 3), write_checkpoint(tmp_path / "f", ft, 3)
    values = (0.5, 1.0, 2.0)
    folders = repair_sweep(base_dir, ft_dir, values, RepairConfig(method="spectral"), tmp_path / "out", progress=False)
    assert [f.name for f in folders.values()] == ["spectral-0.5", "spectral-1", "spectral-2"]
    ranks = {}
    for c, folder in folders.items():
        got = load_folder(folder)
        for name in ft:
            if not in_region(name, "body") or ft[name].dim() != 2:
                assert torch.equal(got[name], ft[name]), name
                continue
            want = _brute_force(base[name], ft[name], c)
            torch.testing.assert_close(got[name].double(), want, rtol=0, atol=1e-5)
            ranks[c, name] = _numpy_threshold(ft[name].double().numpy() - base[name].double().numpy(), c)[1]
        manifest = json.loads((folder / "repair.json").read_text())
        assert (manifest["method"], manifest["c"], manifest["config"]) == ("spectral", c, {"region": "body"})
    names = sorted({name for _, name in ranks})
    assert all(ranks[0.5, n] >= ranks[1.0, n] >= ranks[2.0, n] for n in names)
    assert any(0 < ranks[1.0, n] < min(ft[n].shape) for n in names)  # the threshold did cut somewhere


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_ends_are_exact_neutral_is_finetuned_zero_update_and_high_c_are_base(tmp_path, dtype):
    # base and fine-tuned of very different magnitudes: base + (ft - base) is not ft in floating point
    gen = torch.Generator().manual_seed(0)
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.bias", "lm_head.weight"]
    shapes = [(6, 7), (6,), (5, 7)]
    base = {n: (torch.randn(s, generator=gen) * 10).to(dtype) for n, s in zip(names, shapes)}
    ft = {n: (torch.randn(s, generator=gen) * 1e-3).to(dtype) for n, s in zip(names, shapes)}
    base_dir, ft_dir = write_checkpoint(tmp_path / "base", base, 2), write_checkpoint(tmp_path / "ft", ft, 2)
    config = RepairConfig(method="spectral", region="all")
    folders = repair_sweep(base_dir, ft_dir, (0, 1e6), config, tmp_path / "out", progress=False)
    neutral, far = load_folder(folders[0.0]), load_folder(folders[1e6])
    assert all(torch.equal(neutral[n], ft[n]) for n in ft) and METHODS["spectral"].neutral == 0
    # above s_1 / tau nothing is kept: every matrix is its base; the bias (1-D) stays fine-tuned
    assert torch.equal(far[names[0]], base[names[0]]) and torch.equal(far[names[2]], base[names[2]])
    assert torch.equal(far[names[1]], ft[names[1]])
    assert json.loads((folders[1e6] / "repair.json").read_text())["reset"] == 6 * 7 + 5 * 7
    # no update at all: every value gives the base back, bit for bit
    same = repair_sweep(base_dir, base_dir, (0.5, 1), config, tmp_path / "same", progress=False)
    for folder in same.values():
        got = load_folder(folder)
        assert all(torch.equal(got[n], base[n]) for n in base)


@pytest.mark.parametrize("m,n", [(96, 64), (64, 96)])
def test_a_planted_low_rank_update_is_recovered_from_noise(tmp_path, m, n):
    gen = torch.Generator().manual_seed(1)
    rank = 4
    base = {"model.layers.0.mlp.down_proj.weight": torch.randn(m, n, generator=gen)}
    planted = (torch.randn(m, rank, generator=gen) @ torch.randn(rank, n, generator=gen)) * 0.05
    noise = 0.002 * torch.randn(m, n, generator=gen)
    name = next(iter(base))
    ft = {name: base[name] + planted + noise}
    folder = repair_sweep(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "f", ft), (1,),
                          RepairConfig(method="spectral"), tmp_path / "out", progress=False)[1.0]
    update = load_folder(folder)[name].double() - base[name].double()
    assert torch.linalg.matrix_rank(update, rtol=1e-4) == rank
    # the hard threshold removes most of the noise: far closer to the planted update than ft is
    error = torch.linalg.norm(update - planted.double()) / torch.linalg.norm(planted.double())
    raw = torch.linalg.norm(noise.double()) / torch.linalg.norm(planted.double())
    assert error < 0.5 * raw and error < 0.05


def test_cli_defaults_to_the_threshold_itself_and_refuses_bad_values_in_one_line(tmp_path, capsys):
    from sftlens.cli import main

    base_dir, ft_dir, base, ft = random_pair(tmp_path)
    common = ["repair", "--base", str(base_dir), "--finetuned", str(ft_dir), "--out", str(tmp_path / "o")]
    assert main([*common, "--method", "spectral"]) == 0
    assert "spectral-1" in capsys.readouterr().out
    got = load_folder(tmp_path / "o" / "spectral-1")
    name = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(got[name].double(), _brute_force(base[name], ft[name], 1.0), rtol=0, atol=1e-5)
    assert main([*common, "--method", "spectral", "--values", "0,2", "--region", "mlp"]) == 0
    assert all(torch.equal(load_folder(tmp_path / "o" / "spectral-0")[n], ft[n]) for n in ft)
    capsys.readouterr()
    for bad, message in ((["--method", "spectral", "--values", "-1"], "spectral c '-1' is outside [0, inf)"),
                         (["--method", "spectral", "--values", "inf"], "spectral c 'inf' is outside [0, inf)"),
                         (["--method", "spectral", "--values", "x"], "spectral c 'x' is not a number"),
                         (["--method", "spectral", "--seed", "3"], "--seed does not apply to --method spectral"),
                         (["--method", "wise"], "--method wise needs --values (only spectral has a default)")):
        assert main([*common[:-1], str(tmp_path / "bad"), *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
        bad_out = tmp_path / "bad"
        assert not bad_out.exists() or not [p for p in bad_out.iterdir() if not p.name.startswith(".")]


def test_values_and_settings():
    assert parse_values("spectral", ["2", 1, "1", 0]) == (0.0, 1.0, 2.0)
    assert RepairConfig(method="spectral", scope="tensor", seed=4).settings() == {"region": "body"}
    with pytest.raises(SftlensError, match=re.escape("spectral c 'nan' is outside [0, inf)")):
        parse_values("spectral", ["nan"])
