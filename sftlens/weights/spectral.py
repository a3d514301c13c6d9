"""Data-free spectral repair ("DG-Hard", arXiv 2605.20296): per weight matrix, keep only the singular
directions of the update Delta = F - B that stand above the noise, by the Gavish-Donoho optimal hard
threshold for an unknown noise level (Gavish & Donoho 2014, "The optimal hard threshold for singular
values is 4/sqrt(3)"):

    tau = omega(beta) * median(singular values of Delta),   beta = min(m, n) / max(m, n),
    omega(beta) = lambda*(beta) / sqrt(mu_beta),
    lambda*(beta) = sqrt(2 (beta + 1) + 8 beta / (beta + 1 + sqrt(beta^2 + 14 beta + 1))),

with mu_beta the median of the Marchenko-Pastur law of ratio beta. This module computes the EXACT
form: mu_beta by bisection on the Marchenko-Pastur CDF, integrated by Gauss-Legendre quadrature after
the substitution x = a + (b - a)(1 - cos t) / 2 that makes the integrand smooth on [0, pi] (it removes
the square-root edges and, for beta = 1, the 1 / sqrt(x) pole), so mu_beta is accurate to ~1e-12; the
published cubic 0.56 beta^3 - 0.95 beta^2 + 1.82 beta + 1.43 agrees to within 0.02.

The knob c scales the threshold: the repaired matrix is B + sum over s_i > c tau of s_i u_i v_i^T.
c = 1 is the Gavish-Donoho threshold itself (the method's default sweep); c > 1 drops more of the
update (towards B: any c above s_1 / tau keeps nothing and gives B exactly), c < 1 keeps more; c = 0
is the neutral value and gives F bit for bit (special-cased: a full-rank reconstruction would only
be F up to rounding). Kept ranks are nested: what c keeps, every smaller c keeps too.

Only 2-D tensors are decomposed; every other tensor of the region (norms, biases) stays fine-tuned.
One matrix is read (both checkpoints) and decomposed at a time, in fp32 (fp64 for fp64 weights), with
one SVD for all the values of a sweep; the edited matrix is handed out in the row blocks of
`sftlens.weights.checkpoints.row_blocks`, so a sweep holds one block per value, not one matrix.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from functools import cache

import numpy as np
import torch

from sftlens.weights.checkpoints import CheckpointPair, Chunk, assert_finite, row_blocks

_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(96)


def _mp_cdf_at(t: float, beta: float) -> float:
    """The Marchenko-Pastur (ratio beta, unit variance) CDF at x(t) = a + (b - a)(1 - cos t) / 2."""
    a, b = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2
    theta = t * (_NODES + 1) / 2
    x = a + (b - a) * (1 - np.cos(theta)) / 2
    # density sqrt((b - x)(x - a)) / (2 pi beta x), times dx/dtheta; both square roots are (b - a) sin / 2
    integrand = ((b - a) / 2 * np.sin(theta)) ** 2 / (2 * math.pi * beta * x)
    return float(t / 2 * np.dot(_WEIGHTS, integrand))


@cache
def mp_median(beta: float) -> float:
    """Median of the Marchenko-Pastur law of aspect ratio beta in (0, 1], by bisection on its CDF."""
    low, high = 0.0, math.pi
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if _mp_cdf_at(mid, beta) < 0.5 else (low, mid)
    a, b = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2
    return a + (b - a) * (1 - math.cos((low + high) / 2)) / 2


def omega(beta: float) -> float:
    """Gavish-Donoho's unknown-noise coefficient: tau = omega(beta) * median singular value."""
    lam = math.sqrt(2 * (beta + 1) + 8 * beta / (beta + 1 + math.sqrt(beta * beta + 14 * beta + 1)))
    return lam / math.sqrt(mp_median(beta))


def gd_threshold(singular_values: torch.Tensor, shape: Sequence[int]) -> float:
    """The optimal hard threshold of an m x n matrix with these singular values (the median of an
    even count is the mean of the middle two, as in Gavish-Donoho's code)."""
    m, n = shape
    s = torch.sort(singular_values.double()).values
    k = s.numel()
    median = float(s[(k - 1) // 2] + s[k // 2]) / 2
    return omega(min(m, n) / max(m, n)) * median


def kept_rank(singular_values: torch.Tensor, shape: Sequence[int], c: float) -> int:
    """How many directions value c keeps: singular values strictly above c times the threshold."""
    return int(torch.count_nonzero(singular_values.double() > c * gd_threshold(singular_values, shape)))


def _svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD; a wide matrix is decomposed as its transpose (LAPACK's is ~1.5x faster on tall ones)."""
    if matrix.shape[0] >= matrix.shape[1]:
        return torch.linalg.svd(matrix, full_matrices=False)
    v, s, uh = torch.linalg.svd(matrix.T, full_matrices=False)
    return uh.T, s, v.T


def spectral_blocks(pair: CheckpointPair, name: str,
                    values: Sequence[float]) -> Iterator[tuple[Chunk, list[torch.Tensor], list[int]]]:
    """(chunk, each value's edited block, each value's count of elements set to base) of tensor `name`:
    for a matrix, each value's B + its kept part of Delta, from one SVD; any other tensor stays F."""
    base, finetuned = pair.base.read(name, None), pair.finetuned.read(name, None)
    assert_finite(pair.base, name, base)
    assert_finite(pair.finetuned, name, finetuned)
    shape = tuple(base.shape)
    if len(shape) != 2 or base.numel() == 0:
        for rows, offset in row_blocks(shape):
            b, f = (base, finetuned) if rows is None else (base[rows[0]:rows[1]], finetuned[rows[0]:rows[1]])
            yield Chunk(rows, offset, b, f), [f] * len(values), [0] * len(values)
        return
    wide = torch.promote_types(finetuned.dtype, torch.float32)
    u, s, vh = _svd(finetuned.to(wide) - base.to(wide))
    ranks = [kept_rank(s, shape, c) if c > 0 else None for c in values]
    us = u.mul_(s)  # scaled columns: each value's update is us[:, :k] @ vh[:k]
    for rows, offset in row_blocks(shape):
        b, f = base[rows[0]:rows[1]], finetuned[rows[0]:rows[1]]
        blocks = [f if k is None else b if k == 0 else (b.to(wide) + us[rows[0]:rows[1], :k] @ vh[:k]).to(b.dtype)
                  for k in ranks]
        yield Chunk(rows, offset, b, f), blocks, [b.numel() if k == 0 else 0 for k in ranks]
