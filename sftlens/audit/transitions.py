"""Knowledge transitions between a base model and its fine-tune, fact by fact.

Mastery: the 5 x 5 matrix of (base level -> fine-tuned level), both probed with the same seeded
draws. Greedy: each fact's closed-book answer before and after, one of four transitions: kept
(right -> right), forgotten (right -> wrong), learned (wrong -> right), never (wrong -> wrong).
Rates: forgotten = forgotten / base right, learned = learned / base wrong, each with a 95 %
percentile bootstrap over the facts of its group (all, a domain, a relation, a base level), and the
exact McNemar p-value of forgotten against learned (`sftlens.reporting.stats.mcnemar`).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from sftlens.probe import LEVELS
from sftlens.reporting.bootstrap import Estimate, estimate
from sftlens.reporting.stats import mcnemar

TRANSITIONS = ("kept", "forgotten", "learned", "never")


def transition(base_correct: bool, finetuned_correct: bool) -> str:
    if base_correct:
        return "kept" if finetuned_correct else "forgotten"
    return "learned" if finetuned_correct else "never"


def mastery_matrix(rows: list[dict]) -> list[list[int]]:
    """counts[base level][fine-tuned level]."""
    counts = [[0] * len(LEVELS) for _ in LEVELS]
    for row in rows:
        counts[row["base_level"]][row["finetuned_level"]] += 1
    return counts


def row_shares(counts: list[list[int]]) -> list[list[float | None]]:
    """Each row of the matrix as shares of its total (None for an empty row)."""
    return [[c / sum(row) if sum(row) else None for c in row] for row in counts]


def transition_counts(rows: list[dict]) -> Counter:
    return Counter(transition(r["base_correct"], r["finetuned_correct"]) for r in rows)


def ratio_estimate(hits: np.ndarray, eligible: np.ndarray, samples: int, seed: int) -> Estimate | None:
    """sum(hits) / sum(eligible) (hits within eligible) with a percentile bootstrap over the facts;
    draws without an eligible fact are left out. None when no fact is eligible."""
    if not eligible.any():
        return None
    n = len(eligible)
    draws = np.random.default_rng(seed).integers(0, n, size=(samples, n))
    num, den = hits[draws].sum(axis=1), eligible[draws].sum(axis=1)
    return estimate(hits.sum() / eligible.sum(), num[den > 0] / den[den > 0])


def group_rates(rows: list[dict], samples: int, seed: int) -> dict:
    """Counts of the four transitions and the forgotten and learned rates of one group of facts."""
    base = np.array([r["base_correct"] for r in rows], dtype=bool)
    tuned = np.array([r["finetuned_correct"] for r in rows], dtype=bool)
    counts = transition_counts(rows)
    return {"n": len(rows), **{t: counts[t] for t in TRANSITIONS},
            "forgotten_rate": ratio_estimate(base & ~tuned, base, samples, seed),
            "learned_rate": ratio_estimate(~base & tuned, ~base, samples, seed),
            # Base against fine-tune on the same facts: did it forget more than it learned, beyond chance?
            "mcnemar_p": mcnemar(counts["forgotten"], counts["learned"])}


def rates_by(rows: list[dict], key: str, samples: int, seed: int) -> list[tuple[object, dict]]:
    """(group value, its rates) per value of `key` (e.g. base_level, domain, relation), sorted."""
    groups: dict = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row)
    return [(value, group_rates(groups[value], samples, seed)) for value in sorted(groups)]
