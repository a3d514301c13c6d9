"""Percentile bootstrap of accuracy differences between groups of models scored on shared facts, and
the verdict rule an interval decides (the study's findings and the audit's repairs both use them).

Facts are resampled within each (scope, domain, level) with one draw per scope shared by every model
(so models answering the same facts are compared on the same resampled facts: paired over facts);
seeds are resampled with replacement within each arm of a comparison, jointly when the two arms are
the same models (paired over seeds). Each draw comes from a generator seeded by what it resamples (the
facts' scope, domain, level and count; a comparison's key for its seeds), never from a stream shared in
the order comparisons are made: adding or dropping one comparison never moves another's interval.

The rule (`verdict`), fixed before any run: "holds" when the whole interval lies on the side predicted,
"reversed" when it lies wholly on the other side, "inconclusive" when it contains the threshold (0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sftlens.io import stable_hash


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float


def estimate(point: float, draws: np.ndarray) -> Estimate:
    low, high = np.percentile(draws, [2.5, 97.5])
    return Estimate(float(point), float(low), float(high))


def verdict(low: float, high: float, expected: int, threshold: float = 0.0) -> str:
    """`expected` = +1 when an effect above `threshold` is predicted, -1 below it."""
    above, below = low > threshold, high < threshold
    if not (above or below):
        return "inconclusive"
    return "holds" if above == (expected > 0) else "reversed"


# --- bootstrap of accuracies -------------------------------------------------------------------


def _bits(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8) - ord("0")


def keyed_rng(seed: int, key) -> np.random.Generator:
    """A generator seeded by `seed` and a JSON-able `key` alone."""
    return np.random.default_rng([seed, int(stable_hash(key)[:12], 16)])


class FactDraws:
    """Bootstrap draws of fact indices per (scope, domain, level), each seeded by its key, so every model
    scored on the same facts gets the same draw whatever was drawn before."""

    def __init__(self, samples: int, seed: int):
        self.samples = samples
        self.seed = seed
        self.index: dict[tuple, np.ndarray] = {}

    def draws(self, key: tuple, n: int) -> np.ndarray:
        if (key, n) not in self.index:
            self.index[key, n] = keyed_rng(self.seed, [*key, n]).integers(0, n, size=(self.samples, n))
        return self.index[key, n]

    def acc(self, bits: dict[str, dict[str, str]], domain: str, levels: list[int], scope: str = "test"):
        """(Acc, Acc per draw) of one model: the mean over `levels` of the share of correct facts."""
        points, per_draw = [], []
        for level in levels:
            correct = _bits(bits[domain][str(level)])
            points.append(correct.mean())
            per_draw.append(correct[self.draws((scope, domain, level), len(correct))].mean(axis=1))
        return float(np.mean(points)), np.mean(per_draw, axis=0)


class SeedDraws:
    """Resampled seeds: `pick(k, key)` is seeded by the comparison's `key` (without one, the next draw of
    one stream, as callers that make a fixed sequence of comparisons had it)."""

    def __init__(self, samples: int, seed: int):
        self.samples = samples
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def pick(self, k: int, key=None) -> np.ndarray:
        rng = self.rng if key is None else keyed_rng(self.seed, [key, k])
        return rng.integers(0, k, size=(self.samples, k))

    @staticmethod
    def mean(per_seed: np.ndarray, pick: np.ndarray) -> np.ndarray:
        """per_seed: (seeds, draws) -> (draws,): each draw's mean over its resampled seeds."""
        return per_seed[pick, np.arange(per_seed.shape[1])[:, None]].mean(axis=1)


def arm_difference(facts: FactDraws, seeds: SeedDraws, arm_a: list[dict], arm_b: list[dict], domain: str,
                   levels: list[int], paired_seeds: bool, scope: str = "test", key=None) -> Estimate:
    """Mean Acc over the models of arm a minus that of arm b; each model is {"bits": ...}; paired arms
    list the same seeds in the same order; `key` names the comparison (its seeds' draws)."""
    def arm(models):
        scored = [facts.acc(m["bits"], domain, levels, m.get("scope", scope)) for m in models]
        return np.array([p for p, _ in scored]), np.stack([d for _, d in scored])

    points_a, draws_a = arm(arm_a)
    points_b, draws_b = arm(arm_b)
    pick_a = seeds.pick(len(arm_a), None if key is None else [key, "a"])
    pick_b = pick_a if paired_seeds else seeds.pick(len(arm_b), None if key is None else [key, "b"])
    draws = SeedDraws.mean(draws_a, pick_a) - SeedDraws.mean(draws_b, pick_b)
    return estimate(points_a.mean() - points_b.mean(), draws)


def arm_acc(facts: FactDraws, seeds: SeedDraws, arm: list[dict], domain: str, levels: list[int],
            scope: str = "test", key=None) -> Estimate:
    """Mean Acc over the models of one arm, with its interval (facts and seeds resampled)."""
    scored = [facts.acc(m["bits"], domain, levels, m.get("scope", scope)) for m in arm]
    points, draws = np.array([p for p, _ in scored]), np.stack([d for _, d in scored])
    return estimate(points.mean(), SeedDraws.mean(draws, seeds.pick(len(arm), key)))
